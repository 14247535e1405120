"""The accumulating block product ``out += a @ b`` (gemm with beta = 1) against NumPy."""

import numba
import numpy as np
import pytest

from fastattn.kernels.products import dot_add


@numba.njit
def _dot_add(a, b, out):
    dot_add(a, b, out)


@numba.njit
def _dot_add_transposed_a(a_transposed, b, out):
    dot_add(a_transposed.T, b, out)  # an F-contiguous first operand


SHAPES = [(1, 1, 1), (3, 4, 5), (17, 33, 15), (256, 512, 64), (0, 3, 2), (3, 0, 2), (5, 7, 0)]
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_dot_add_accumulates_the_product(dtype, m, k, n):
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    out = rng.standard_normal((m, n)).astype(dtype)
    expected = out.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
    scale = max(1.0, np.sqrt(k))  # sums of k products of standard normals
    _dot_add(a, b, out)
    np.testing.assert_allclose(out, expected, rtol=0, atol=TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dot_add_reads_transposed_and_fortran_operands(dtype):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((40, 24)).astype(dtype)
    b = rng.standard_normal((24, 9)).astype(dtype)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    out = np.zeros((40, 9), dtype)
    _dot_add_transposed_a(np.ascontiguousarray(a.T), np.asfortranarray(b), out)
    np.testing.assert_allclose(out, expected, rtol=0, atol=TOLERANCE[dtype] * 5)
    _dot_add(a, b, out)  # a second product adds on top of the first
    np.testing.assert_allclose(out, 2 * expected, rtol=0, atol=TOLERANCE[dtype] * 10)
