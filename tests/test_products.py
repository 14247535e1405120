"""The kernels' block products (``out = a @ b`` and ``out += a @ b`` through the
gemm address of :mod:`fastattn.blas`) against NumPy, with every BLAS backend."""

import numba
import numpy as np
import pytest

from fastattn import blas
from fastattn.kernels.products import product, product_add, scaled_product


@numba.njit
def _product(gemm, a, b, out, accumulate):
    if accumulate:
        product_add(gemm, a, b, out)
    else:
        product(gemm, a, b, out)


@numba.njit
def _product_transposed_a(gemm, a_transposed, b, out, accumulate):
    _product(gemm, a_transposed.T, b, out, accumulate)  # an F-contiguous first operand


@numba.njit
def _scaled_product(gemm, alpha, a, b, out):
    scaled_product(gemm, alpha, a, b, out)


SHAPES = [(1, 1, 1), (3, 4, 5), (17, 33, 15), (256, 512, 64), (0, 3, 2), (3, 0, 2), (5, 7, 0)]
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_product_against_numpy(blas_backend, accumulate, dtype, m, k, n):
    gemm = blas.gemm_address(dtype)  # the fixture's backend
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    out = rng.standard_normal((m, n)).astype(dtype)
    if not accumulate:
        out[...] = np.nan  # never read: beta = 0, and k = 0 writes zeros
    expected = a.astype(np.float64) @ b.astype(np.float64)
    if accumulate:
        expected += out
    scale = max(1.0, np.sqrt(k))  # sums of k products of standard normals
    _product(gemm, a, b, out, accumulate)
    np.testing.assert_allclose(out, expected, rtol=0, atol=TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_product_reads_transposed_and_fortran_operands(blas_backend, dtype):
    gemm = blas.gemm_address(dtype)  # the fixture's backend
    rng = np.random.default_rng(7)
    a = rng.standard_normal((40, 24)).astype(dtype)
    b = rng.standard_normal((24, 9)).astype(dtype)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    out = np.full((40, 9), np.nan, dtype)
    _product_transposed_a(gemm, np.ascontiguousarray(a.T), np.asfortranarray(b), out, False)
    np.testing.assert_allclose(out, expected, rtol=0, atol=TOLERANCE[dtype] * 5)
    _product(gemm, a, b, out, True)  # a second product adds on top of the first
    np.testing.assert_allclose(out, 2 * expected, rtol=0, atol=TOLERANCE[dtype] * 10)
    _product_transposed_a(gemm, np.ascontiguousarray(a.T), b, out, True)
    np.testing.assert_allclose(out, 3 * expected, rtol=0, atol=TOLERANCE[dtype] * 15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha", [1.4426950408889634 / 8, -3.0, 0.0])
def test_scaled_product_scales_by_alpha(blas_backend, dtype, alpha):
    gemm = blas.gemm_address(dtype)  # the fixture's backend
    rng = np.random.default_rng(11)
    a = rng.standard_normal((37, 20)).astype(dtype)
    keys = rng.standard_normal((45, 20)).astype(dtype)
    out = np.full((37, 45), np.nan, dtype)
    _scaled_product(gemm, alpha, a, keys.T, out)  # a (F-contiguous) transposed operand
    expected = alpha * (a.astype(np.float64) @ keys.T.astype(np.float64))
    np.testing.assert_allclose(out, expected, rtol=0, atol=TOLERANCE[dtype] * 5 * (abs(alpha) + 1))
