"""Packed sequences of different lengths (``fastattn.varlen_attention``): the fused
kernels against the reference's per-sequence calls, on awkward lengths (0, 1, either
side of the kernels' tiles, ``Lq != Lk``), forward and backward, with GQA, both
causal alignments, windows and the score options; errors naming the offsets."""

import numba
import numpy as np
import pytest
from conftest import TOLERANCE
from user_functions import documents, wobble, wobble_grad

import fastattn
import reference
from fastattn._dispatch.tiling import BACKWARD_BLOCK_K, FORWARD_BLOCK_K, FORWARD_BLOCK_Q

# each side of the forward's query and key tiles and the backward's key tiles
Q_LENS = [0, 1, 17, FORWARD_BLOCK_Q - 1, FORWARD_BLOCK_Q + 1, 40, 3]
KV_LENS = [3, 0, 33, BACKWARD_BLOCK_K + 1, FORWARD_BLOCK_K + 1, 40, 1]


def packed_inputs(rng, q_lens, kv_lens, heads=4, kv_heads=2, head_dim=16, value_dim=8,
                  dtype=np.float64):
    """Standard-normal packed ``q``, ``k``, ``v`` and the offsets of these lengths."""
    cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)  # (n_seq + 1,)
    cu_k = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int64)  # (n_seq + 1,)
    q = rng.standard_normal((cu_q[-1], heads, head_dim)).astype(dtype)  # (total_q, H, Dk)
    k = rng.standard_normal((cu_k[-1], kv_heads, head_dim)).astype(dtype)  # (total_k, Hkv, Dk)
    v = rng.standard_normal((cu_k[-1], kv_heads, value_dim)).astype(dtype)  # (total_k, Hkv, Dv)
    return q, k, v, cu_q, cu_k


def assert_matches_reference(rng, q, k, v, cu_q, cu_k, grad_factor=10, **options):
    """Forward (out, lse) and backward (dq, dk, dv and any argument gradients) of the
    kernels against the reference, within the contract's tolerance of the dtype (the
    backward's ten times, relative to the largest gradient)."""
    tolerance = TOLERANCE[q.dtype]
    backward_options = {name: options.pop(name) for name in
                        ("score_mod_grad", "score_mod_args_grad") if name in options}
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **options)
    q64, k64, v64 = (array.astype(np.float64) for array in (q, k, v))
    want_out, want_lse = reference.varlen_attention(q64, k64, v64, cu_q, cu_k, return_lse=True,
                                                    **options)
    assert out.shape == want_out.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[1], q.shape[0])
    np.testing.assert_allclose(out, want_out, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(lse, want_lse, rtol=tolerance, atol=tolerance)
    grad_out = rng.standard_normal(out.shape).astype(q.dtype)
    grads = fastattn.varlen_attention_backward(grad_out, q, k, v, out, lse, cu_q, cu_k,
                                               **backward_options, **options)
    expected = reference.varlen_attention_backward(grad_out.astype(np.float64), q64, k64, v64,
                                                   want_out, want_lse, cu_q, cu_k,
                                                   **backward_options, **options)
    assert len(grads) == len(expected)
    for got, want in zip(grads[:3], expected[:3]):
        assert got.shape == want.shape
        scale = max(1.0, np.abs(want).max(initial=0.0))
        np.testing.assert_allclose(got, want, rtol=tolerance * grad_factor,
                                   atol=tolerance * grad_factor * scale)
    for got, want in zip(grads[3:][0] if len(grads) > 3 else (), expected[3:][0]
                         if len(expected) > 3 else ()):
        scale = max(1.0, np.abs(want).max(initial=0.0))
        np.testing.assert_allclose(got, want, rtol=tolerance * grad_factor,
                                   atol=tolerance * grad_factor * scale)
    return out, lse, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [
    {},
    dict(causal=True),
    dict(causal=True, causal_alignment="bottom_right"),
    dict(window=(20, 5)),
    dict(causal=True, causal_alignment="bottom_right", window=(9, 0)),
], ids=["plain", "causal", "causal-bottom-right", "window", "window-bottom-right"])
def test_matches_per_sequence_calls(rng, dtype, options):
    q, k, v, cu_q, cu_k = packed_inputs(rng, Q_LENS, KV_LENS, dtype=dtype)
    assert_matches_reference(rng, q, k, v, cu_q, cu_k, **options)


def test_score_options_see_the_sequence(rng):
    """softcap, per-sequence ALiBi slopes ``(n_seq, H)``, a score_mod that reads ``b``
    (the sequence), ``h``, ``i``, ``j``, a mask_mod and dropout."""
    q_lens, kv_lens = [9, 0, 40, 1, 23], [12, 5, 40, 0, 30]
    q, k, v, cu_q, cu_k = packed_inputs(rng, q_lens, kv_lens, heads=2, kv_heads=1)
    slopes = rng.uniform(0.01, 0.3, (len(q_lens), 2))  # (n_seq, H)
    for options in (dict(softcap=1.5, alibi_slopes=slopes, causal=True,
                         causal_alignment="bottom_right"),
                    dict(score_mod=wobble, score_mod_grad=wobble_grad, mask_mod=documents),
                    dict(dropout_p=0.3, dropout_seed=17, alibi_slopes=slopes[0])):
        assert_matches_reference(rng, q, k, v, cu_q, cu_k, **options)


@numba.njit
def sequence_bias(s, b, h, i, j, table):
    return s + table[b, h]


@numba.njit
def sequence_bias_grad(s, b, h, i, j, table):
    return 1.0


@numba.njit
def sequence_bias_args_grad(g, s, b, h, i, j, grads, table):
    grads[0][b, h] += g


def test_score_mod_args_gradients_by_sequence(rng):
    """A table read at ``(b, h)`` gets, at each sequence's entry, that sequence's
    gradient."""
    q, k, v, cu_q, cu_k = packed_inputs(rng, [5, 30, 0, 12], [7, 30, 2, 12], heads=2,
                                        kv_heads=2)
    table = rng.standard_normal((4, 2))  # (n_seq, H)
    _, _, grads = assert_matches_reference(
        rng, q, k, v, cu_q, cu_k, score_mod=sequence_bias, score_mod_args=(table,),
        score_mod_grad=sequence_bias_grad, score_mod_args_grad=sequence_bias_args_grad)
    assert np.all(grads[3][0][2] == 0)  # the sequence without queries


def test_each_sequence_equals_its_own_call(rng):
    """The packed result, sequence by sequence, is the ordinary function's on that
    sequence alone (GQA, bottom-right causal)."""
    q_lens, kv_lens = [70, 1, 300], [90, 4, 300]
    q, k, v, cu_q, cu_k = packed_inputs(rng, q_lens, kv_lens, dtype=np.float32)
    options = dict(causal=True, causal_alignment="bottom_right")
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **options)
    for s in range(len(q_lens)):
        rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        alone, alone_lse = fastattn.scaled_dot_product_attention(
            q[rows].transpose(1, 0, 2), k[keys].transpose(1, 0, 2), v[keys].transpose(1, 0, 2),
            enable_gqa=True, return_lse=True, **options)  # (H, Lq_s, Dv), (H, Lq_s)
        np.testing.assert_allclose(out[rows], alone.transpose(1, 0, 2), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(lse[:, rows], alone_lse, rtol=1e-6, atol=1e-6)


def test_rows_that_see_nothing_and_empty_calls(rng):
    q, k, v, cu_q, cu_k = packed_inputs(rng, [3, 2], [0, 4])
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True)
    assert np.all(out[:3] == 0) and np.all(lse[:, :3] == -np.inf)
    grads = fastattn.varlen_attention_backward(np.ones_like(out), q, k, v, out, lse, cu_q, cu_k)
    assert np.all(grads[0][:3] == 0) and np.all(np.isfinite(grads[0]))
    for q_lens in ([], [0, 0]):  # no sequence; sequences without rows
        q, k, v, cu_q, cu_k = packed_inputs(rng, q_lens, q_lens)
        out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True)
        assert out.shape == (0, 4, 8) and lse.shape == (4, 0)
        grads = fastattn.varlen_attention_backward(out, q, k, v, out, lse, cu_q, cu_k)
        assert [grad.shape for grad in grads] == [(0, 4, 16), (0, 2, 16), (0, 2, 8)]


def test_a_nan_stays_in_its_sequence(rng):
    q, k, v, cu_q, cu_k = packed_inputs(rng, [20, 30], [20, 30], dtype=np.float32)
    v[25, 0, 3] = np.nan  # sequence 1, kv head 0
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, causal=True)
    want = reference.varlen_attention(q.astype(np.float64), k.astype(np.float64),
                                      v.astype(np.float64), cu_q, cu_k, causal=True)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5, equal_nan=True)
    assert np.isfinite(out[:20]).all() and np.isfinite(lse).all()
    assert np.isnan(out[25:, :2, 3]).all() and np.isfinite(out[20:25]).all()


def test_same_for_every_thread_count(rng):
    q, k, v, cu_q, cu_k = packed_inputs(rng, [300, 5, 700, 64], [300, 9, 700, 64],
                                        dtype=np.float32)
    options = dict(causal=True, dropout_p=0.1, dropout_seed=3)
    default = fastattn.get_num_threads()
    results = []
    try:
        for threads in (1, default):
            fastattn.set_num_threads(threads)
            out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True,
                                                 **options)
            grads = fastattn.varlen_attention_backward(out, q, k, v, out, lse, cu_q, cu_k,
                                                       **options)
            results.append((out, lse) + grads)
    finally:
        fastattn.set_num_threads(default)
    for got, want in zip(results[0], results[-1]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("function", [fastattn.varlen_attention, reference.varlen_attention],
                         ids=["fastattn", "reference"])
@pytest.mark.parametrize("cu_q, cu_k, match", [
    ([1, 3, 5], [0, 2, 5], "cu_seqlens_q must start at 0"),
    ([0, 3, 2, 5], [0, 2, 2, 5], r"cu_seqlens_q must not decrease.*\[1\] = 3"),
    ([0, 3, 5], [0, 2, 4], "cu_seqlens_k must end at the row count of k, 5"),
    ([0, 3, 5], [0, 5], "one entry per sequence plus one"),
    ([[0, 5]], [0, 5], r"cu_seqlens_q must be 1-D"),
    ([0.0, 5.0], [0, 5], "cu_seqlens_q must hold integers"),
])
def test_bad_offsets_name_the_argument(rng, function, cu_q, cu_k, match):
    q, k, v, _, _ = packed_inputs(rng, [5], [5])
    error = TypeError if "integers" in match else ValueError
    with pytest.raises(error, match=match):
        function(q, k, v, np.array(cu_q), np.array(cu_k))


def test_bad_shapes_and_options(rng):
    q, k, v, cu_q, cu_k = packed_inputs(rng, [5], [5], heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        fastattn.varlen_attention(q, k, v, cu_q, cu_k)
    q, k, v, cu_q, cu_k = packed_inputs(rng, [5], [5])
    with pytest.raises(ValueError, match="q must be 3-D"):
        fastattn.varlen_attention(q[None], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="same last dim Dk"):
        fastattn.varlen_attention(q[..., :8], k, v, cu_q, cu_k)
    for name, value in (("bias", np.zeros((5, 5))), ("kv_lengths", [3])):
        with pytest.raises(NotImplementedError, match=f"does not take {name}="):
            fastattn.varlen_attention(q, k, v, cu_q, cu_k, **{name: value})
    with pytest.raises(ValueError, match="alibi_slopes"):
        fastattn.varlen_attention(q, k, v, cu_q, cu_k, alibi_slopes=np.ones((2, 4)))
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True)
    with pytest.raises(ValueError, match=r"lse must have the forward's shape \(H, total_q\)"):
        fastattn.varlen_attention_backward(out, q, k, v, out, lse.T, cu_q, cu_k)


def test_torch_gradients_match_autograd_of_per_sequence_calls():
    torch = pytest.importorskip("torch")
    import fastattn.torch

    generator = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 5, 30, 31], dtype=torch.int32)
    q = torch.randn(31, 4, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    k, v = (torch.randn(31, 2, 8, dtype=torch.float64, generator=generator, requires_grad=True)
            for _ in range(2))
    assert torch.autograd.gradcheck(lambda *tensors: fastattn.torch.varlen_attention(
        *tensors, cu, cu, causal=True, causal_alignment="bottom_right"), (q, k, v))
    out = fastattn.torch.varlen_attention(q, k, v, cu, cu, window=(3, 2))
    out.square().sum().backward()
    grads = [tensor.grad.clone() for tensor in (q, k, v)]
    for tensor in (q, k, v):
        tensor.grad = None
    for s in range(4):  # torch's own attention, sequence by sequence
        rows = slice(int(cu[s]), int(cu[s + 1]))
        i = torch.arange(rows.stop - rows.start)[:, None]
        visible = (i - 3 <= i.T) & (i.T <= i + 2)
        alone = torch.nn.functional.scaled_dot_product_attention(
            *(tensor[rows].transpose(0, 1) for tensor in (q, k, v)), attn_mask=visible,
            enable_gqa=True)
        alone.square().sum().backward()
    for got, tensor in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, tensor.grad)


def test_torch_head_major_views_without_autograd():
    torch = pytest.importorskip("torch")
    import fastattn.torch

    heads_first = torch.randn(4, 12, 8)  # (H, total, D)
    packed = heads_first.transpose(0, 1)  # (total, H, D), a view
    cu = np.array([0, 7, 12])
    with torch.no_grad():
        out, lse = fastattn.torch.varlen_attention(packed, packed, packed, cu, cu,
                                                   return_lse=True)
    want = fastattn.varlen_attention(packed.numpy().copy(), packed.numpy().copy(),
                                     packed.numpy().copy(), cu, cu)
    np.testing.assert_array_equal(out.numpy(), want)
    assert lse.shape == (4, 12) and not out.requires_grad


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_16_bit_inputs_are_read_as_stored(rng, name):
    """bfloat16 and float16 packed inputs: results in the input dtype within one
    16-bit rounding of the reference on the same rounded inputs, lse in float32, and a
    NaN's exact rows (computed in float32) written back in 16 bits."""
    dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16 if name == "bfloat16"
                     else np.float16)
    step = 2.0 ** -7 if name == "bfloat16" else 2.0 ** -10
    q, k, v, cu_q, cu_k = packed_inputs(rng, [7, 0, 300], [9, 2, 300], dtype=np.float32)
    q, k, v = (array.astype(dtype) for array in (q, k, v))
    v[20, 1, 2] = np.nan
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, causal=True)
    want, want_lse = reference.varlen_attention(*(array.astype(np.float64) for array in (q, k, v)),
                                                cu_q, cu_k, return_lse=True, causal=True)
    assert out.dtype == dtype and lse.dtype == np.float32
    got = out.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    assert np.all(np.abs(got - want)[finite] <= step * np.abs(want)[finite] + 2e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)
