"""16-bit inputs (bfloat16 and float16, fastattn.kernels.half): read as stored, computed
in float32, results in the input dtype and lse in float32; against the float64
reference on the same rounded inputs, with tolerances from 16-bit rounding."""

import tracemalloc

import numpy as np
import pytest
from conftest import random_inputs

import fastattn
import reference
from fastattn._dispatch import tiling
from fastattn.kernels import half

ml_dtypes = pytest.importorskip("ml_dtypes")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
HALF_DTYPES = [pytest.param(BFLOAT16, id="bfloat16"), pytest.param(FLOAT16, id="float16")]
# Relative size of one rounding step (half an ulp is the most a rounding moves a value).
UNIT_STEP = {BFLOAT16: 2.0 ** -7, FLOAT16: 2.0 ** -10}
BLOCK_Q, BLOCK_K = tiling.FORWARD_BLOCK_Q, tiling.FORWARD_BLOCK_K


def as64(array):
    return np.asarray(array).astype(np.float64)


def assert_rounded_result(got, want, dtype, scale_tolerance=2e-5):
    """``got`` (16-bit) is the float64 ``want`` computed in float32 and rounded once:
    within one 16-bit step of ``want`` (the float32 value may round to the other
    neighbour) plus float32 noise relative to the largest entry. NaN where ``want``
    is."""
    assert got.dtype == dtype and got.shape == want.shape
    got = as64(got)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    largest = np.nanmax(np.abs(want), initial=0.0)
    bound = UNIT_STEP[dtype] * np.abs(want) + scale_tolerance * max(largest, 1.0)
    excess = np.abs(got - want) - bound
    assert not np.any(excess[~np.isnan(want)] > 0), np.nanmax(excess)


def rounded_inputs(rng, q_shape, kv_shape, dtype, value_dim=None):
    """Standard-normal inputs in ``dtype`` (the values every implementation sees)."""
    return tuple(array.astype(dtype) for array in random_inputs(rng, q_shape, kv_shape,
                                                                value_dim, np.float32))


def check_forward(query, key, value, **options):
    """fastattn's out (16-bit) and lse (float32) against the reference on the same
    rounded inputs."""
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                     **options)
    want_out, want_lse = reference.scaled_dot_product_attention(
        as64(query), as64(key), as64(value), return_lse=True, **options)
    assert_rounded_result(out, want_out, query.dtype)
    assert lse.dtype == np.float32
    np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)
    return out, lse


def test_conversions_match_numpy_and_ml_dtypes_for_every_value():
    import numba

    @numba.njit
    def widen(bits, half_format):
        out = np.empty(bits.shape[0], np.float32)  # (n,)
        for i in range(bits.shape[0]):
            out[i] = half.as_compute(bits[i], half_format)
        return out

    @numba.njit
    def narrow(values, half_format):
        out = np.empty(values.shape[0], np.uint16)  # (n,)
        for i in range(values.shape[0]):
            out[i] = half.stored_value(values[i], out, half_format)
        return out

    every_bits = np.arange(2 ** 16, dtype=np.uint16)  # (65536,) every 16-bit pattern
    rng = np.random.default_rng(3)
    every_kind = np.concatenate([  # random bit patterns: subnormals, ties, inf, NaN
        rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 1 + 2.0 ** -8,
                  1 + 3 * 2.0 ** -8], np.float32)])  # (n,)
    for dtype, half_format in ((BFLOAT16, half.BFLOAT16), (FLOAT16, half.FLOAT16)):
        np.testing.assert_array_equal(widen(every_bits, half_format),
                                      every_bits.view(dtype).astype(np.float32))
        with np.errstate(over="ignore", invalid="ignore"):
            want = every_kind.astype(dtype)
        got = narrow(every_kind, half_format).view(dtype)
        finite = ~np.isnan(every_kind)
        np.testing.assert_array_equal(got[finite].view(np.uint16), want[finite].view(np.uint16))
        assert np.isnan(got[~finite].astype(np.float32)).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (17, 31), (BLOCK_Q - 1, BLOCK_K + 1),
                                            (BLOCK_Q + 1, BLOCK_K - 1), (300, 1100)])
def test_forward_awkward_shapes(rng, dtype, q_len, kv_len):
    query, key, value = rounded_inputs(rng, (2, q_len, 24), (2, kv_len, 24), dtype,
                                       value_dim=40)
    check_forward(query, key, value, causal=True, causal_alignment="bottom_right")
    check_forward(query, key, value)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("options", [
    dict(window=(40, 3)), dict(kv_lengths=[0, 70, 300]), dict(softcap=2.0, scale=0.3),
    dict(alibi_slopes=[0.5]), dict(enable_gqa=True)], ids=str)
def test_forward_options(rng, dtype, options):
    query, key, value = rounded_inputs(rng, (3, 4, 130, 16), (3, 2, 300, 16), dtype)
    if not options.get("enable_gqa"):
        key, value = np.repeat(key, 2, axis=1), np.repeat(value, 2, axis=1)
    out, lse = check_forward(query, key, value, **options)
    if "kv_lengths" in options:  # entry 0 sees no key: output 0, lse -inf
        assert not np.any(as64(out[0])) and np.all(lse[0] == -np.inf)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_forward_mask_bias_and_weights(rng, dtype):
    query, key, value = rounded_inputs(rng, (2, 70, 16), (2, 90, 16), dtype)
    mask = rng.random((70, 90)) < 0.7
    bias = rng.standard_normal((2, 70, 90)).astype(np.float32)
    out, weights, lse = fastattn.scaled_dot_product_attention(
        query, key, value, mask, bias=bias, return_weights=True, return_lse=True)
    want = reference.scaled_dot_product_attention(as64(query), as64(key), as64(value), mask,
                                                  bias=bias, return_weights=True,
                                                  return_lse=True)
    assert_rounded_result(out, want[0], dtype)
    assert_rounded_result(weights, want[1], dtype)
    np.testing.assert_allclose(lse, want[2], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("kv_len", [1, tiling.DECODE_BLOCK_K + 1, 5000])
def test_decode(rng, dtype, kv_len):
    """The streaming decode kernel (one query per head, grouped heads folded)."""
    query, key, value = rounded_inputs(rng, (2, 8, 1, 64), (2, 2, kv_len, 64), dtype)
    check_forward(query, key, value, enable_gqa=True)
    check_forward(query[:, :2], key, value, causal=True, causal_alignment="bottom_right",
                  kv_lengths=[kv_len, kv_len // 2])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("q_len, kv_len, options", [
    (1, 1, {}), (70, 90, dict(causal=True)), (tiling.BACKWARD_BLOCK_Q + 1, 300, {}),
    (130, 257, dict(window=(30, 2), softcap=3.0)), (40, 40, dict(kv_lengths=[0, 40]))],
    ids=str)
def test_backward(rng, dtype, q_len, kv_len, options):
    """Given an exact ``out``, the 16-bit gradients are the exact ones rounded once;
    given the forward's own 16-bit ``out`` (whose rounding enters ``rowsum(dO * O)``,
    as in every 16-bit backward), they are the float32 backward's on the same
    values, rounded once."""
    query, key, value = rounded_inputs(rng, (2, q_len, 24), (2, kv_len, 24), dtype)
    grad_out = rng.standard_normal((2, q_len, 24)).astype(dtype)
    exact_out, exact_lse = reference.scaled_dot_product_attention(
        as64(query), as64(key), as64(value), return_lse=True, **options)
    grads = fastattn.scaled_dot_product_attention_backward(
        grad_out, query, key, value, exact_out, exact_lse.astype(np.float32), **options)
    want = reference.scaled_dot_product_attention_backward(
        as64(grad_out), as64(query), as64(key), as64(value), exact_out, exact_lse, **options)
    for got, expected in zip(grads, want):
        assert_rounded_result(got, expected, dtype, scale_tolerance=1e-4)

    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                     **options)
    grads = fastattn.scaled_dot_product_attention_backward(grad_out, query, key, value, out,
                                                           lse, **options)
    as32 = [array.astype(np.float32) for array in (grad_out, query, key, value, out)]
    want = fastattn.scaled_dot_product_attention_backward(*as32, lse, **options)
    for got, expected in zip(grads, want):
        assert_rounded_result(got, as64(expected), dtype, scale_tolerance=1e-6)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_nan_reaches_only_the_rows_that_see_it(rng, dtype):
    query, key, value = rounded_inputs(rng, (1, 300, 16), (1, 600, 16), dtype)
    key[0, 250, 3] = np.nan  # seen by causal rows 250 and after
    value[0, 599, 0] = np.nan  # seen by no causal row
    out, lse = check_forward(query, key, value, causal=True)
    assert np.isnan(as64(out[0, 250:])).all() and not np.isnan(as64(out[0, :250])).any()
    grads = fastattn.scaled_dot_product_attention_backward(
        np.ones_like(out), query, key, value, out, lse, causal=True)
    assert not np.isnan(as64(grads[0][0, :250])).any()  # rows before the NaN key


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_layouts_and_read_only_inputs(rng, dtype):
    query, key, value = rounded_inputs(rng, (5, 16, 40), (7, 16, 40), dtype)
    for array in (query, key, value):
        array.flags.writeable = False
    check_forward(query.transpose(1, 0, 2), key.transpose(1, 0, 2)[:, ::-1],
                  value.transpose(1, 0, 2)[:, ::-1])


@pytest.mark.parametrize("first, second, result", [
    (np.float32, BFLOAT16, np.float32), (BFLOAT16, FLOAT16, np.float32),
    (np.float64, BFLOAT16, np.float64)], ids=str)
def test_mixed_dtypes_follow_result_type(rng, first, second, result):
    """A 16-bit key and value with a query of another dtype (a float32 query over a
    bfloat16 cache): computed in ``np.result_type``'s dtype (the 16-bit operands
    converted), returned in it."""
    query, key, value = random_inputs(rng, (2, 5, 16), (2, 700, 16), dtype=np.float32)
    query, key, value = query.astype(first), key.astype(second), value.astype(second)
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True)
    want_out, want_lse = reference.scaled_dot_product_attention(
        as64(query), as64(key), as64(value), return_lse=True)
    assert out.dtype == lse.dtype == result
    np.testing.assert_allclose(out, want_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)


def test_other_small_formats_are_refused_by_name(rng):
    query, key, value = rounded_inputs(rng, (4, 8), (4, 8), BFLOAT16)
    with pytest.raises(TypeError, match="key must hold real numbers.*float8"):
        fastattn.scaled_dot_product_attention(query, key.astype(ml_dtypes.float8_e4m3fn), value)


def test_bfloat16_forward_memory_does_not_grow_with_a_copy_of_the_inputs(rng):
    """Extra memory of a bfloat16 forward beyond its output (traced peak) grows by
    less than a quarter of the inputs' growth: the inputs are never copied, wider or
    not (a widened copy of q, k and v would add twice their bytes); what remains is
    the per-thread scratch, whose size depends on the block sizes only."""
    extra, inputs_bytes = [], []
    for n_batch in (4, 16):
        query, key, value = rounded_inputs(rng, (n_batch, 1024, 64), (n_batch, 1024, 64),
                                           BFLOAT16)
        fastattn.scaled_dot_product_attention(query, key, value)  # compiled, settings applied
        tracemalloc.start()
        try:
            out = fastattn.scaled_dot_product_attention(query, key, value)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        extra.append(peak - out.nbytes)
        inputs_bytes.append(query.nbytes + key.nbytes + value.nbytes)
    assert extra[1] - extra[0] < 0.25 * (inputs_bytes[1] - inputs_bytes[0]), extra


def _errors(got, want):
    """Median and largest absolute error of ``got`` against ``want`` (float64)."""
    error = np.abs(as64(got) - want)
    return np.median(error), error.max()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_no_less_accurate_than_pytorchs_16_bit_attention(rng, dtype):
    """Against the float64 reference on the same rounded inputs: fastattn's median
    error at most 1.5x, its largest at most 2x those of PyTorch's own 16-bit
    ``scaled_dot_product_attention``, forward and backward."""
    torch = pytest.importorskip("torch")
    import fastattn.torch as fastattn_torch

    torch_dtype = getattr(torch, dtype)
    shape = (1, 4, 513, 64)
    tensors = [torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(torch_dtype)
               for _ in range(4)]
    query, key, value, grad_out = tensors
    exact = [tensor.double().requires_grad_() for tensor in (query, key, value)]
    want_out = torch.nn.functional.scaled_dot_product_attention(*exact, is_causal=True)
    want_grads = torch.autograd.grad(want_out, exact, grad_out.double())
    results = {}
    for name, function in (("fastattn", lambda *t: fastattn_torch.scaled_dot_product_attention(
                                *t, causal=True)),
                           ("torch", lambda *t: torch.nn.functional.scaled_dot_product_attention(
                               *t, is_causal=True))):
        inputs = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
        out = function(*inputs)
        grads = torch.autograd.grad(out, inputs, grad_out)
        assert out.dtype == torch_dtype and all(g.dtype == torch_dtype for g in grads)
        results[name] = [_errors(t.detach().float().numpy(), w.detach().numpy())
                         for t, w in zip((out, *grads), (want_out, *want_grads))]
    for ours, theirs in zip(results["fastattn"], results["torch"]):
        assert ours[0] <= 1.5 * theirs[0] and ours[1] <= 2.0 * theirs[1], (ours, theirs)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_dask_chunks_give_the_same_16_bit_results(rng, dtype):
    dask = pytest.importorskip("dask")
    import dask.array as da

    import fastattn.dask

    query, key, value = rounded_inputs(rng, (2, 29, 12), (2, 29, 12), dtype)
    out, lse = fastattn.dask.scaled_dot_product_attention(
        da.from_array(query, chunks=(1, 10, 12)), key, value, causal=True, return_lse=True)
    got_out, got_lse = dask.compute(out, lse, scheduler="sync")
    want_out, want_lse = fastattn.scaled_dot_product_attention(query, key, value, causal=True,
                                                               return_lse=True)
    assert got_out.dtype == dtype and got_lse.dtype == np.float32
    np.testing.assert_allclose(as64(got_out), as64(want_out), rtol=UNIT_STEP[dtype], atol=1e-6)
    np.testing.assert_allclose(got_lse, want_lse, rtol=1e-6, atol=1e-6)
