"""Attention dropout: the same decisions everywhere, the right statistics, exact
gradients, and clear errors.

The decisions are a pure function of ``(seed, b, h, i, j)`` (Philox4x32-10): the
fused kernels, the NumPy reference, the forward and the backward, every thread count
and every tiling must agree on them.
"""

import numpy as np
import pytest
from conftest import TOLERANCE, random_inputs

import fastattn
import reference
from fastattn._dispatch.tiling import BACKWARD_BLOCK_K, FORWARD_BLOCK_K
from reference.dropout import keep_mask as keep_mask_at
from reference.dropout import philox4x32


def keep_mask(seed, p, batch_shape, q_len, kv_len, heads):
    """The reference's decisions over a whole call ``(*batch, Lq, Lk)``."""
    entries = np.arange(int(np.prod(batch_shape)))  # (N,)
    kept = keep_mask_at(seed, p, entries // heads, entries % heads, np.arange(q_len),
                        np.arange(kv_len))  # (N, Lq, Lk)
    return kept.reshape(tuple(batch_shape) + (q_len, kv_len))


def test_philox_known_answers():
    """Random123's published Philox4x32-10 vectors, in NumPy and in the kernels."""
    from fastattn.kernels.dropout import philox_words

    cases = [((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, 2 ** 64 - 1, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0A4093822,
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, seed, expected in cases:
        words = philox4x32([np.uint64(word) for word in counter], seed)
        assert tuple(int(word) for word in words) == expected
        assert philox_words(*counter, seed & 0xFFFFFFFF, seed >> 32) == expected


def test_kept_fraction_and_independence():
    """10^7 decisions: the kept fraction within 5 sigma of 1 - p; neighbouring
    decisions along i, j, h and b uncorrelated."""
    p = 0.1
    kept = keep_mask(1234, p, (4, 8), 250, 1250, heads=8).astype(np.float64)  # (4, 8, 250, 1250)
    n = kept.size
    assert n == 10 ** 7
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(kept.mean() - (1 - p)) < 5 * sigma
    for axis in range(4):  # b, h, i, j
        first = np.take(kept, range(kept.shape[axis] - 1), axis=axis).ravel()
        second = np.take(kept, range(1, kept.shape[axis]), axis=axis).ravel()
        assert abs(np.corrcoef(first, second)[0, 1]) < 0.01, axis
    other_seed = keep_mask(1235, p, (4, 8), 250, 1250, heads=8)
    assert abs(np.corrcoef(kept.ravel(), other_seed.ravel())[0, 1]) < 0.01


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q_len, kv_len, options", [
    (1, 1, {}),
    (7, FORWARD_BLOCK_K + 1, {}),
    (33, 2 * BACKWARD_BLOCK_K + 3, dict(causal=True)),
    (50, 37, dict(causal=True, causal_alignment="bottom_right", window=(9, 2))),
    (40, 70, dict(softcap=2.0, kv_lengths=[70, 13])),
])
def test_forward_and_backward_match_the_reference(rng, dtype, q_len, kv_len, options):
    query, key, value = random_inputs(rng, (2, 3, q_len, 16), (2, 3, kv_len, 16), 8, dtype)
    options = dict(options, dropout_p=0.25, dropout_seed=99)
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                     **options)
    q64, k64, v64 = (array.astype(np.float64) for array in (query, key, value))
    expected_out, expected_lse = reference.scaled_dot_product_attention(
        q64, k64, v64, return_lse=True, **options)
    tolerance = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(out, expected_out, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(lse, expected_lse, rtol=tolerance, atol=tolerance)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    grads = fastattn.scaled_dot_product_attention_backward(grad_out, query, key, value, out,
                                                           lse, **options)
    expected = reference.scaled_dot_product_attention_backward(
        grad_out.astype(np.float64), q64, k64, v64, expected_out, expected_lse, **options)
    for got, want in zip(grads, expected):
        scale = max(1.0, np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=tolerance * 10, atol=tolerance * 10 * scale)


def test_weights_and_lse_are_before_dropout(rng):
    query, key, value = random_inputs(rng, (2, 20, 8), (2, 30, 8))
    plain = fastattn.scaled_dot_product_attention(query, key, value, return_weights=True,
                                                  return_lse=True)
    dropped = fastattn.scaled_dot_product_attention(query, key, value, return_weights=True,
                                                    return_lse=True, dropout_p=0.5,
                                                    dropout_seed=3)
    np.testing.assert_array_equal(dropped[1], plain[1])
    np.testing.assert_array_equal(dropped[2], plain[2])
    assert np.abs(dropped[0] - plain[0]).max() > 0.1


def test_decisions_follow_the_weights(rng):
    """With values = identity, the output is the dropped weights themselves: zero
    exactly where the reference's decisions drop, ``P / (1 - p)`` elsewhere."""
    q_len, kv_len, p = 40, 600, 0.3
    query, key, _ = random_inputs(rng, (2, 3, q_len, 8), (2, 3, kv_len, 8))
    value = np.broadcast_to(np.eye(kv_len), (2, 3, kv_len, kv_len))
    out, weights = fastattn.scaled_dot_product_attention(
        query, key, value, return_weights=True, dropout_p=p, dropout_seed=2 ** 40 + 17)
    kept = keep_mask(2 ** 40 + 17, p, (2, 3), q_len, kv_len, heads=3)  # (2, 3, Lq, Lk)
    np.testing.assert_array_equal(out == 0, ~kept)
    np.testing.assert_allclose(out, np.where(kept, weights / (1 - p), 0.0), rtol=1e-12,
                               atol=1e-15)


def test_same_for_every_thread_count(rng):
    query, key, value = random_inputs(rng, (2, 4, 300, 32), (2, 4, 700, 32),
                                      dtype=np.float32)
    options = dict(causal=True, dropout_p=0.2, dropout_seed=5)
    default = fastattn.get_num_threads()
    results = []
    try:
        for threads in (1, default):
            fastattn.set_num_threads(threads)
            out, lse = fastattn.scaled_dot_product_attention(query, key, value,
                                                             return_lse=True, **options)
            grads = fastattn.scaled_dot_product_attention_backward(out, query, key, value, out,
                                                                   lse, **options)
            results.append((out, lse) + grads)
    finally:
        fastattn.set_num_threads(default)
    for got, want in zip(results[0], results[-1]):
        np.testing.assert_array_equal(got, want)


def test_grouped_query_heads_decide_per_query_head(rng):
    """Under GQA the decisions use the query head ``h``: as if the kv heads were
    repeated (no folding of query groups with dropout)."""
    query, key, value = random_inputs(rng, (2, 8, 1, 16), (2, 2, 900, 16))
    options = dict(dropout_p=0.4, dropout_seed=11, causal=True,
                   causal_alignment="bottom_right")
    out = fastattn.scaled_dot_product_attention(query, key, value, enable_gqa=True, **options)
    repeated = [np.repeat(array, 4, axis=1) for array in (key, value)]
    expected = reference.scaled_dot_product_attention(query, *repeated, **options)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_torch_autograd_through_the_same_decisions(rng):
    """Gradients against autograd of a dense computation with the same kept mask."""
    torch = pytest.importorskip("torch")
    query, key, value = random_inputs(rng, (2, 3, 30, 8), (2, 3, 45, 8))
    p, seed = 0.3, 77
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                     dropout_p=p, dropout_seed=seed)
    grad_out = rng.standard_normal(out.shape)
    grads = fastattn.scaled_dot_product_attention_backward(grad_out, query, key, value, out,
                                                           lse, dropout_p=p, dropout_seed=seed)
    kept = torch.from_numpy(keep_mask(seed, p, (2, 3), 30, 45, heads=3))
    q, k, v = (torch.tensor(array, requires_grad=True) for array in (query, key, value))
    weights = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(8), dim=-1)
    dense = (weights * kept / (1 - p)) @ v
    dense.backward(torch.from_numpy(grad_out))
    np.testing.assert_allclose(out, dense.detach().numpy(), rtol=1e-10, atol=1e-12)
    for got, tensor in zip(grads, (q, k, v)):
        np.testing.assert_allclose(got, tensor.grad.numpy(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("options, error, message", [
    (dict(dropout_p=0.1), ValueError, "needs dropout_seed="),
    (dict(dropout_p=1.0, dropout_seed=1), ValueError, "dropout_p must lie in"),
    (dict(dropout_p=-0.1, dropout_seed=1), ValueError, "dropout_p must lie in"),
    (dict(dropout_p="0.1", dropout_seed=1), TypeError, "dropout_p must be a real number"),
    (dict(dropout_p=0.1, dropout_seed=2 ** 64), ValueError, "dropout_seed must lie in"),
    (dict(dropout_p=0.1, dropout_seed=1.5), TypeError, "dropout_seed must be an int"),
])
@pytest.mark.parametrize("implementation", [fastattn, reference])
def test_bad_dropout_arguments_name_the_argument(implementation, options, error, message):
    query = np.zeros((4, 8))
    with pytest.raises(error, match=message):
        implementation.scaled_dot_product_attention(query, query, query, **options)


def test_numpy_integer_seed_and_zero_p(rng):
    query, key, value = random_inputs(rng, (3, 16, 8), (3, 20, 8))
    with_numpy_seed = fastattn.scaled_dot_product_attention(query, key, value, dropout_p=0.5,
                                                            dropout_seed=np.uint64(2 ** 63))
    with_int_seed = fastattn.scaled_dot_product_attention(query, key, value, dropout_p=0.5,
                                                          dropout_seed=2 ** 63)
    np.testing.assert_array_equal(with_numpy_seed, with_int_seed)
    np.testing.assert_array_equal(
        fastattn.scaled_dot_product_attention(query, key, value, dropout_p=0.0, dropout_seed=4),
        fastattn.scaled_dot_product_attention(query, key, value))


def test_a_chunk_takes_the_whole_call_s_decisions(rng):
    """Rows 13:40 of heads 1:3 of batch entry 1, computed alone with ``chunk_of``,
    equal those rows of the whole call (all keys), forward and backward."""
    query, key, value = random_inputs(rng, (2, 3, 50, 8), (2, 3, 70, 8))
    options = dict(dropout_p=0.4, dropout_seed=31, causal=True)
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                     **options)
    part = np.s_[1:2, 1:3, 13:40]
    # causal from row 13 on: query r of the chunk (row 13 + r) sees keys j <= r + 13
    chunk = dict(dropout_p=0.4, dropout_seed=31, window=(70, 13),
                 chunk_of=((2, 3), (1, 1), 13, 0))
    sub_out, sub_lse = fastattn.scaled_dot_product_attention(
        query[part], key[1:2, 1:3], value[1:2, 1:3], return_lse=True, **chunk)
    np.testing.assert_allclose(sub_out, out[part], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sub_lse, lse[part], rtol=1e-12, atol=1e-12)
    expected = reference.scaled_dot_product_attention(query[part], key[1:2, 1:3],
                                                      value[1:2, 1:3], **chunk)
    np.testing.assert_allclose(sub_out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_of, message", [
    (((2, 3), (1,), 0, 0), "batch_start as long as batch_shape"),
    (((2, 3), (1, 2), -1, 0), "non-negative"),
    ("no", "chunk_of must be"),
])
def test_bad_chunk_of_is_refused(chunk_of, message):
    query = np.zeros((1, 1, 4, 8))
    with pytest.raises(ValueError, match=message):
        fastattn.scaled_dot_product_attention(query, query, query, dropout_p=0.1,
                                              dropout_seed=1, chunk_of=chunk_of)


def test_chunk_outside_its_whole_is_refused():
    query = np.zeros((2, 3, 4, 8))
    with pytest.raises(ValueError, match="is not a block of the batch shape"):
        fastattn.scaled_dot_product_attention(query, query, query, dropout_p=0.1,
                                              dropout_seed=1, chunk_of=((2, 3), (1, 0), 0, 0))
