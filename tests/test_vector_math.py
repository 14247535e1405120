"""The kernels' vectorisable exp2 and row maximum against NumPy."""

import numpy as np
import pytest

from fastattn.kernels.vector_math import exp2_check, row_maximum_check

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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [0, 1, 7, 15, 16, 17, 63, 64, 65, 130, 512, 1000])
def test_row_maximum_matches_numpy_on_every_length(dtype, length):
    """The vector loop, its four accumulators and the one-by-one tail all count."""
    rng = np.random.default_rng(length)
    row = rng.standard_normal(length).astype(dtype)
    expected = row.max() if length else -np.inf
    assert row_maximum_check(row, dtype(-np.inf)) == expected
    for position in {0, length // 2, length - 1} if length else ():  # the maximum anywhere
        peaked = row.copy()
        peaked[position] = 100.0
        assert row_maximum_check(peaked, dtype(-np.inf)) == 100.0
    assert row_maximum_check(row, dtype(50.0)) == 50.0  # the start value counts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_maximum_skips_nan(dtype):
    """A NaN entry never wins (the softmax finds NaN rows through its sums)."""
    row = np.full(100, -np.inf, dtype)
    row[[3, 70, 99]] = np.nan
    assert row_maximum_check(row, dtype(-np.inf)) == -np.inf
    row[50] = 2.0
    assert row_maximum_check(row, dtype(-np.inf)) == 2.0


def test_prefetch_line_changes_nothing_and_never_faults():
    """``prefetch_line`` is a hint: offsets inside, just past and far outside the array
    (even negative) leave it as it was and do not crash the process."""
    from numba import njit

    from fastattn.kernels.vector_math import prefetch_line

    @njit
    def touch(array, offsets):
        for offset in offsets:
            prefetch_line(array, offset)
        return array.sum()

    data = np.arange(1000, dtype=np.float32)  # (1000,)
    before = data.copy()
    offsets = np.array([0, 64, 3999, 4000, 1 << 40, -(1 << 40)], np.int64)
    assert touch(data, offsets) == before.sum()
    np.testing.assert_array_equal(data, before)
