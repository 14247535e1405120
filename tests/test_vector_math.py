"""The kernels' vectorisable exp2 and maximum against NumPy."""

import numpy as np
import pytest

from fastattn.kernels.vector_math import exp2_check

# Relative error bounds: polynomial truncation plus float rounding.
EXP2_TOLERANCE = {np.float32: 4e-7, np.float64: 4e-16}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp2_matches_numpy_over_the_softmax_range(dtype):
    x = np.linspace(-120.0, 0.0, 200_001).astype(dtype)  # scores minus the row maximum
    expected = np.exp2(x.astype(np.float64))
    got = exp2_check(x)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, expected, rtol=EXP2_TOLERANCE[dtype], atol=0)


@pytest.mark.parametrize("dtype, smallest_exponent", [(np.float32, -126), (np.float64, -1022)])
def test_exp2_underflows_to_exact_zero(dtype, smallest_exponent):
    """Hidden keys (-inf) and anything far below the normal range contribute 0, never NaN."""
    x = np.array([-np.inf, -1e30, smallest_exponent - 1.0, smallest_exponent - 0.6], dtype)
    np.testing.assert_array_equal(exp2_check(x), 0.0)
    at_edge = exp2_check(np.array([smallest_exponent], dtype))
    np.testing.assert_allclose(at_edge, np.exp2(np.array([smallest_exponent], dtype)),
                               rtol=EXP2_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp2_of_integers_is_exact_enough(dtype):
    x = np.arange(-100, 1, dtype=dtype)
    np.testing.assert_allclose(exp2_check(x), np.exp2(x), rtol=EXP2_TOLERANCE[dtype], atol=0)
