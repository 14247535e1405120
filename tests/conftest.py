"""Shared fixtures: the implementations under test, seeded inputs, tolerances.

Every implementation of the contract is listed in ``IMPLEMENTATIONS``; tests of
behaviour that both must share (errors, empty sizes, masked rows) fan out over it,
and accuracy tests compare ``fastattn`` against the float64 ``reference``.
"""

import numpy as np
import pytest

import fastattn
import fastattn.blas
import reference

IMPLEMENTATIONS = {
    "fastattn": fastattn.scaled_dot_product_attention,
    "reference": reference.scaled_dot_product_attention,
}

# The contract: float32 within 2e-5 (absolute and relative) of the float64
# reference, float64 within 1e-10. float16 results are float32 results rounded
# to float16, so they may sit one float16 rounding step (~1e-3 relative) away.
TOLERANCE = {
    np.dtype(np.float16): 2e-3,
    np.dtype(np.float32): 2e-5,
    np.dtype(np.float64): 1e-10,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS), ids=sorted(IMPLEMENTATIONS))
def attention(request):
    """Each implementation of ``scaled_dot_product_attention`` in turn."""
    return IMPLEMENTATIONS[request.param]


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.skipif(
    fastattn.blas.available()[name] is not None,
    reason=f"{name}: {fastattn.blas.available()[name]}")) for name in fastattn.blas.BACKENDS])
def blas_backend(request):
    """Run the test with the kernels calling each BLAS backend in turn
    (:mod:`fastattn.blas`), the process's choice restored after."""
    previous = fastattn.blas.use(request.param)
    try:
        yield request.param
    finally:
        fastattn.blas.use(previous or "auto")


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


def random_inputs(rng, q_shape, kv_shape, value_dim=None, dtype=np.float64):
    """Standard-normal query ``q_shape``, key ``kv_shape`` and value with ``Dv`` columns."""
    value_dim = kv_shape[-1] if value_dim is None else value_dim
    query = rng.standard_normal(q_shape).astype(dtype)  # (*batch, Lq, Dk)
    key = rng.standard_normal(kv_shape).astype(dtype)  # (*batch, Lk, Dk)
    value = rng.standard_normal(kv_shape[:-1] + (value_dim,)).astype(dtype)  # (*batch, Lk, Dv)
    return query, key, value


def as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def assert_close_to_reference(query, key, value, mask=None, **options):
    """Run both implementations and compare every returned array.

    The reference gets float64 copies of the inputs, so it is the float64 truth;
    the tolerance is that of fastattn's result dtype, applied both absolutely and
    relatively. Returns fastattn's results.
    """
    result = as_tuple(fastattn.scaled_dot_product_attention(query, key, value, mask, **options))
    expected = as_tuple(reference.scaled_dot_product_attention(
        np.asarray(query, np.float64), np.asarray(key, np.float64),
        np.asarray(value, np.float64), mask, **options))
    assert len(result) == len(expected)
    for got, want in zip(result, expected):
        assert got.shape == want.shape
        assert not np.isnan(got).any(), "NaN in fastattn's result"
        tolerance = TOLERANCE[got.dtype]
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=tolerance, atol=tolerance)
    return result


# ---------------------------------------------------------------- gradients

def forward_options(options):
    """``options`` without the backward-only ``score_mod_grad`` and
    ``score_mod_args_grad``."""
    return {name: value for name, value in options.items()
            if name not in ("score_mod_grad", "score_mod_args_grad")}


def forward_and_backward(function_pair, query, key, value, mask, grad_out, **options):
    forward, backward = function_pair
    out, lse = forward(query, key, value, mask, return_lse=True, **forward_options(options))
    return backward(grad_out, query, key, value, out, lse, mask, **options)


FASTATTN = (fastattn.scaled_dot_product_attention, fastattn.scaled_dot_product_attention_backward)
REFERENCE = (reference.scaled_dot_product_attention,
             reference.scaled_dot_product_attention_backward)


def assert_gradients_match_reference(rng, query, key, value, mask=None, **options):
    """fastattn's gradients against the float64 reference on float64 copies.

    The float32 tolerance is relative to the largest entry of the three gradients,
    since a gradient is a sum of many terms of either sign: it can cancel to exactly
    0 (one key: every weight is 1 and ``dS = dP - D = 0``) while its float32 terms
    carry the noise of ``dP`` and ``D``, which scales like the other gradients.
    """
    out_shape = fastattn.scaled_dot_product_attention(query, key, value, mask,
                                                      **forward_options(options)).shape
    grad_out = rng.standard_normal(out_shape).astype(query.dtype)
    got = forward_and_backward(FASTATTN, query, key, value, mask, grad_out, **options)
    as64 = [np.asarray(array, np.float64) for array in (query, key, value, grad_out)]
    want = forward_and_backward(REFERENCE, *as64[:3], mask, as64[3], **options)
    magnitude = max([1.0] + [np.abs(w).max(initial=0.0) for w in want])
    for name, g, w, source in zip(("query", "key", "value"), got, want, (query, key, value)):
        assert g.shape == source.shape, name
        assert g.dtype == query.dtype, name
        assert not np.isnan(g).any(), name
        tolerance = TOLERANCE[g.dtype] * magnitude
        np.testing.assert_allclose(g, w, rtol=0, atol=tolerance, err_msg=name)
    return got


def assert_matches_finite_differences(**options):
    """Both backwards (fastattn's and the reference's) against central differences
    of ``sum(out * G)`` in float64, on small inputs with a broadcast batch axis.
    ``options`` are the forward's keywords plus, with a ``score_mod``,
    ``score_mod_grad``."""
    rng = np.random.default_rng(11)
    query = 2 * rng.standard_normal((2, 2, 3, 2))  # (B, H, Lq=3, Dk=2)
    key = rng.standard_normal((2, 2, 4, 2))  # (B, H, Lk=4, Dk)
    value = rng.standard_normal((1, 2, 4, 3))  # (1, H, Lk, Dv=3) broadcast batch
    grad_out = rng.standard_normal((2, 2, 3, 3))  # (B, H, Lq, Dv)

    def loss(q, k, v):
        out = reference.scaled_dot_product_attention(q, k, v, **forward_options(options))
        return (out * grad_out).sum()

    analytic = forward_and_backward(REFERENCE, query, key, value, None, grad_out, **options)
    fused = forward_and_backward(FASTATTN, query, key, value, None, grad_out, **options)
    step = 1e-6
    for position, (array, gradient, fused_gradient) in enumerate(
            zip((query, key, value), analytic, fused)):
        numeric = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            plus, minus = [query, key, value], [query, key, value]
            for arrays, sign in ((plus, 1), (minus, -1)):
                shifted = array.copy()
                shifted[index] += sign * step
                arrays[position] = shifted
            numeric[index] = (loss(*plus) - loss(*minus)) / (2 * step)
        np.testing.assert_allclose(gradient, numeric, atol=1e-7, rtol=1e-6)
        np.testing.assert_allclose(fused_gradient, numeric, atol=1e-7, rtol=1e-6)
