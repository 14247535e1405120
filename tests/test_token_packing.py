"""The moves between a padded, token-major batch and the packed head-major layout
(fastattn._dispatch.token_packing, kernels in fastattn.kernels.packing): exact copies
of the bits, for every dtype, layout and row count."""

import ml_dtypes
import numpy as np
import pytest

import fastattn
from fastattn._dispatch import token_packing

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]


def _tokens(rng, shape, dtype):
    tokens = rng.standard_normal(shape).astype(dtype)  # (R, H, D)
    tokens.reshape(-1)[::7] = np.nan  # NaN bits travel as they are
    return tokens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,total", [((1, 1, 1), 1), ((9, 3, 5), 4), ((300, 12, 32), 211),
                                          ((5, 2, 3), 0)])
def test_packed_rows_equal_numpy_indexing(dtype, shape, total):
    rng = np.random.default_rng(total)
    tokens = _tokens(rng, shape, dtype)
    rows = np.sort(rng.choice(shape[0], total, replace=False)).astype(np.int64)  # (total,)
    packed = token_packing.packed_rows(tokens, rows)  # (total, H, D)
    assert packed.shape == (total,) + shape[1:] and packed.dtype == tokens.dtype
    assert packed.transpose(1, 0, 2).flags.c_contiguous  # head-major underneath
    np.testing.assert_array_equal(packed.view(np.uint8), tokens[rows].view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_rows_put_back_and_zero_padding(dtype):
    rng = np.random.default_rng(3)
    packed = _tokens(rng, (40, 4, 6), dtype)  # (total, H, D)
    rows = np.sort(rng.choice(70, 40, replace=False))  # (total,)
    source_of = np.full(70, -1, np.int64)  # (R,)
    source_of[rows] = np.arange(40)
    padded = token_packing.padded_rows(packed, source_of)  # (R, H, D)
    expected = np.zeros((70, 4, 6), packed.dtype)
    expected[rows] = packed
    assert padded.dtype == packed.dtype and padded.flags.c_contiguous
    np.testing.assert_array_equal(padded.view(np.uint8), expected.view(np.uint8))


def test_any_layout_is_read():
    """A transposed (B, H, L, D) view, as a model hands its heads over, and a strided one."""
    rng = np.random.default_rng(5)
    heads_first = rng.standard_normal((3, 4, 17, 8)).astype(np.float32)  # (B, H, L, D)
    tokens = heads_first.transpose(0, 2, 1, 3).reshape(-1, 4, 8)  # (B * L, H, D), a copy
    rows = np.array([0, 5, 16, 17, 40, 50], np.int64)
    packed = token_packing.packed_rows(heads_first.transpose(0, 2, 1, 3).reshape(-1, 4, 8), rows)
    np.testing.assert_array_equal(packed, tokens[rows])
    strided = tokens[::2]  # (26, H, D), not contiguous
    np.testing.assert_array_equal(token_packing.packed_rows(strided, rows[:4] // 2),
                                  strided[rows[:4] // 2])
    back = token_packing.padded_rows(packed[::-1][::-1], np.array([2, -1, 0], np.int64))
    np.testing.assert_array_equal(back, np.stack([tokens[16], np.zeros((4, 8)), tokens[0]]))


def test_one_and_two_threads_give_the_same_bits():
    rng = np.random.default_rng(7)
    tokens = _tokens(rng, (4000, 12, 32), np.float32)  # 6 MB: every thread available
    rows = np.flatnonzero(rng.random(4000) < 0.6)  # (total,)
    saved = fastattn.get_num_threads()
    try:
        fastattn.set_num_threads(1)
        alone = token_packing.packed_rows(tokens, rows)
    finally:
        fastattn.set_num_threads(saved)
    shared = token_packing.packed_rows(tokens, rows)
    np.testing.assert_array_equal(alone.view(np.uint32), shared.view(np.uint32))
    np.testing.assert_array_equal(alone.view(np.uint32), tokens[rows].view(np.uint32))
