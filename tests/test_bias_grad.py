"""The bias gradient (``return_bias_grad=True``): against the reference and autograd,
in the bias's own shape for every way it broadcasts, the same for every thread count,
and refused with a clear message where it cannot be given."""

import numpy as np
import pytest
from conftest import TOLERANCE, random_inputs

import fastattn
import reference
from fastattn._dispatch.tiling import BACKWARD_BLOCK_K, BACKWARD_BLOCK_Q

Q_LEN, KV_LEN = BACKWARD_BLOCK_Q + 3, 2 * BACKWARD_BLOCK_K + 5  # several blocks and groups


def gradients(module, query, key, value, bias, **options):
    forward_options = {name: value for name, value in options.items()
                       if name != "score_mod_grad"}
    out, lse = module.scaled_dot_product_attention(query, key, value, bias=bias,
                                                   return_lse=True, **forward_options)
    grad_out = np.cos(np.arange(out.size)).reshape(out.shape).astype(out.dtype)
    return module.scaled_dot_product_attention_backward(
        grad_out, query, key, value, out, lse, bias=bias, return_bias_grad=True, **options)


@pytest.mark.parametrize("bias_shape", [
    (2, 3, Q_LEN, KV_LEN),  # one per entry
    (3, Q_LEN, KV_LEN),  # per head, shared by the batch (T5, Swin)
    (Q_LEN, KV_LEN),  # shared by every entry
    (2, 1, 1, KV_LEN),  # per key (padding-style), broadcast over rows
    (1, 3, Q_LEN, 1),  # per query row, broadcast over keys
    (KV_LEN,),  # 1-D
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_the_reference(rng, bias_shape, dtype):
    query, key, value = random_inputs(rng, (2, 3, Q_LEN, 16), (2, 3, KV_LEN, 16), 8, dtype)
    bias = rng.standard_normal(bias_shape).astype(dtype)
    got = gradients(fastattn, query, key, value, bias, causal=True)
    expected = gradients(reference, *(array.astype(np.float64) for array in
                                      (query, key, value, bias)), causal=True)
    assert got[3].shape == bias.shape and got[3].dtype == np.dtype(dtype)
    tolerance = TOLERANCE[np.dtype(dtype)] * 10
    for have, want in zip(got, expected):
        np.testing.assert_allclose(have, want, rtol=tolerance,
                                   atol=tolerance * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("options", [dict(softcap=3.0), dict(dropout_p=0.2, dropout_seed=8),
                                     dict(window=(20, 4), kv_lengths=[KV_LEN, 40]),
                                     dict(alibi_slopes=[0.5, 0.25, 0.125])])
def test_with_score_options(rng, options):
    query, key, value = random_inputs(rng, (2, 3, Q_LEN, 16), (2, 3, KV_LEN, 16))
    bias = rng.standard_normal((3, Q_LEN, KV_LEN))
    got = gradients(fastattn, query, key, value, bias, **options)
    expected = gradients(reference, query, key, value, bias, **options)
    for have, want in zip(got, expected):
        np.testing.assert_allclose(have, want, rtol=1e-9, atol=1e-11)


def test_through_score_mod(rng):
    from user_functions import SCORE_MODS

    query, key, value = random_inputs(rng, (2, 3, 40, 8), (2, 3, 70, 8))
    bias = rng.standard_normal((40, 70))
    options = SCORE_MODS["wobble"]  # score_mod and score_mod_grad
    got = gradients(fastattn, query, key, value, bias, **options)
    expected = gradients(reference, query, key, value, bias, **options)
    for have, want in zip(got, expected):
        np.testing.assert_allclose(have, want, rtol=1e-9, atol=1e-11)


def test_against_autograd(rng):
    torch = pytest.importorskip("torch")
    query, key, value = random_inputs(rng, (2, 3, 30, 8), (2, 3, 50, 8))
    bias = rng.standard_normal((3, 30, 50))
    bias[0, :, 7] = -np.inf  # a hidden key: no gradient
    got = gradients(fastattn, query, key, value, bias, causal=True,
                    causal_alignment="bottom_right")
    tensors = [torch.tensor(array, requires_grad=True) for array in (query, key, value, bias)]
    q, k, v, b = tensors
    hidden = torch.ones(30, 50, dtype=torch.bool).triu(50 - 30 + 1)
    scores = (q @ k.transpose(-1, -2) / np.sqrt(8) + b).masked_fill(hidden, -np.inf)
    out = torch.softmax(scores, dim=-1) @ v
    out.backward(torch.from_numpy(np.cos(np.arange(out.numel())).reshape(out.shape)))
    for have, tensor in zip(got, tensors):
        np.testing.assert_allclose(have, tensor.grad.numpy(), rtol=1e-9, atol=1e-11)
    assert (got[3][0, :, 7] == 0).all()


def test_same_for_every_thread_count(rng):
    query, key, value = random_inputs(rng, (4, 3, Q_LEN, 32), (4, 3, KV_LEN, 32),
                                      dtype=np.float32)
    bias = rng.standard_normal((3, Q_LEN, KV_LEN)).astype(np.float32)
    default = fastattn.get_num_threads()
    results = []
    try:
        for threads in (1, default):
            fastattn.set_num_threads(threads)
            results.append(gradients(fastattn, query, key, value, bias))
    finally:
        fastattn.set_num_threads(default)
    for have, want in zip(results[0], results[-1]):
        np.testing.assert_array_equal(have, want)


@pytest.mark.parametrize("implementation", [fastattn, reference])
def test_refusals_name_the_argument(rng, implementation):
    query, key, value = random_inputs(rng, (8, 4), (8, 4))
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True)
    backward = implementation.scaled_dot_product_attention_backward
    with pytest.raises(ValueError, match="return_bias_grad=True needs the bias="):
        backward(out, query, key, value, out, lse, return_bias_grad=True)
    from user_functions import SCORE_MODS

    with pytest.raises(ValueError, match="softcap= and score_mod="):
        backward(out, query, key, value, out, lse, bias=np.zeros((8, 8)), softcap=2.0,
                 return_bias_grad=True, **SCORE_MODS["wobble"])
