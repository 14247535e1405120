"""fastattn.merge_attention: results over disjoint key sets merge to the unsplit answer.

Each part is a local fastattn call over a subset of the keys. Options that depend on
positions (causal, window) are given to the parts as the equivalent boolean mask
restricted to the part's keys, built here from the contract's formulas; kv_lengths
are shifted to the part; bias, mask, GQA and broadcast batch dims are sliced along Lk.
"""

import numpy as np
import pytest

import fastattn
from conftest import TOLERANCE, random_inputs


def visibility(q_len, kv_len, causal=False, causal_alignment="top_left", window=None):
    """The contract's causal and window rules as a boolean (Lq, Lk) matrix."""
    off = kv_len - q_len if causal_alignment == "bottom_right" else 0
    rows = np.arange(q_len)[:, None] + off  # (Lq, 1) i + off
    cols = np.arange(kv_len)[None, :]  # (1, Lk) j
    visible = np.ones((q_len, kv_len), bool)
    if causal:
        visible &= cols <= rows
    if window is not None:
        visible &= (rows - window[0] <= cols) & (cols <= rows + window[1])
    return visible


def random_split(rng, kv_len, n_parts):
    """Cut points of ``[0, Lk)`` into ``n_parts`` ranges, empty ranges allowed."""
    inner = np.sort(rng.integers(0, kv_len + 1, size=n_parts - 1))
    return [0, *inner.tolist(), kv_len]


def split_and_merge(query, key, value, cuts, *, mask=None, bias=None, structure=None,
                    kv_lengths=None, enable_gqa=False):
    """Local fastattn over each key range of ``cuts``, merged."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    visible = visibility(q_len, kv_len, **(structure or {}))
    if mask is not None:
        visible = visible & mask  # (*batch, Lq, Lk)
    outs, lses = [], []
    for start, stop in zip(cuts[:-1], cuts[1:]):
        part_lengths = None
        if kv_lengths is not None:
            part_lengths = np.clip(np.asarray(kv_lengths) - start, 0, stop - start)
        out, lse = fastattn.scaled_dot_product_attention(
            query, key[..., start:stop, :], value[..., start:stop, :],
            visible[..., start:stop], bias=None if bias is None else bias[..., start:stop],
            kv_lengths=part_lengths, enable_gqa=enable_gqa, return_lse=True)
        outs.append(out)
        lses.append(lse)
    return fastattn.merge_attention(outs, lses)


def assert_merges_to_whole(rng, query, key, value, n_parts, *, mask=None, bias=None,
                           structure=None, kv_lengths=None, enable_gqa=False):
    want_out, want_lse = fastattn.scaled_dot_product_attention(
        query, key, value, mask, bias=bias, kv_lengths=kv_lengths, enable_gqa=enable_gqa,
        return_lse=True, **(structure or {}))
    for _ in range(3):
        cuts = random_split(rng, key.shape[-2], n_parts)
        out, lse = split_and_merge(query, key, value, cuts, mask=mask, bias=bias,
                                   structure=structure, kv_lengths=kv_lengths,
                                   enable_gqa=enable_gqa)
        assert out.shape == want_out.shape and lse.shape == want_lse.shape
        assert out.dtype == want_out.dtype and lse.dtype == want_lse.dtype
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        tolerance = TOLERANCE[out.dtype]
        np.testing.assert_allclose(out, want_out, rtol=tolerance, atol=tolerance,
                                   err_msg=f"cuts {cuts}")
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
        finite = np.isfinite(want_lse)
        np.testing.assert_allclose(lse[finite], want_lse[finite], rtol=tolerance,
                                   atol=tolerance, err_msg=f"cuts {cuts}")


SHAPES = [  # (q_shape, kv_shape)
    ((1, 1), (1, 1)),
    ((2, 3, 37, 16), (2, 3, 53, 16)),
    ((4, 65, 8), (4, 31, 8)),
    ((2, 1, 16), (2, 300, 16)),
]

STRUCTURES = [
    None,
    {"causal": True},
    {"causal": True, "causal_alignment": "bottom_right"},
    {"window": (3, 2)},
    {"window": (0, 5), "causal_alignment": "bottom_right"},
    {"causal": True, "window": (7, 0)},
]


@pytest.mark.parametrize("n_parts", [1, 2, 5])
@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
@pytest.mark.parametrize("q_shape, kv_shape", SHAPES, ids=str)
def test_any_split_merges_to_the_whole(rng, q_shape, kv_shape, structure, n_parts):
    query, key, value = random_inputs(rng, q_shape, kv_shape, value_dim=5)
    assert_merges_to_whole(rng, query, key, value, n_parts, structure=structure)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mask_bias_and_kv_lengths_split(rng, dtype):
    query, key, value = random_inputs(rng, (3, 2, 29, 8), (3, 2, 41, 8), dtype=dtype)
    mask = rng.random((3, 1, 29, 41)) < 0.7  # broadcast over heads
    bias = rng.standard_normal((29, 41)).astype(dtype)  # broadcast over batch and heads
    bias[rng.random(bias.shape) < 0.2] = -np.inf
    for structure in STRUCTURES:
        assert_merges_to_whole(rng, query, key, value, 4, mask=mask, bias=bias,
                               structure=structure, kv_lengths=[0, 17, 41])


def test_gqa_and_broadcast_batch_split(rng):
    query = rng.standard_normal((1, 6, 23, 8))  # batch broadcast against the keys
    key = rng.standard_normal((2, 2, 47, 8))
    value = rng.standard_normal((2, 2, 47, 3))
    for structure in STRUCTURES:
        assert_merges_to_whole(rng, query, key, value, 3, structure=structure,
                               kv_lengths=[47, 5], enable_gqa=True)


def test_minus_inf_parts_weigh_nothing_and_unseen_rows_give_zero():
    out_a = np.array([[1.0, 2.0], [3.0, 4.0], [np.nan, np.inf]])  # (Lq=3, Dv=2)
    lse_a = np.array([0.5, -np.inf, -np.inf])
    out_b = np.array([[np.inf, np.nan], [5.0, 6.0], [7.0, 8.0]])
    lse_b = np.array([-np.inf, 2.0, -np.inf])
    with np.errstate(all="raise"):
        out, lse = fastattn.merge_attention([out_a, out_b], [lse_a, lse_b])
    np.testing.assert_array_equal(out, [[1.0, 2.0], [5.0, 6.0], [0.0, 0.0]])
    np.testing.assert_array_equal(lse, [0.5, 2.0, -np.inf])


def test_merge_formula_and_no_overflow():
    outs = [np.array([[1.0]]), np.array([[3.0]])]
    lses = [np.array([1000.0]), np.array([1000.0 + np.log(3.0)])]
    out, lse = fastattn.merge_attention(outs, lses)
    np.testing.assert_allclose(out, [[(1.0 + 3.0 * 3.0) / 4.0]], rtol=1e-12)
    np.testing.assert_allclose(lse, [1000.0 + np.log(4.0)], rtol=1e-12)


def test_nan_lse_gives_nan_in_its_row_only():
    out, lse = fastattn.merge_attention([np.ones((2, 1)), np.ones((2, 1))],
                                        [np.array([np.nan, 0.0]), np.array([0.0, 0.0])])
    assert np.isnan(out[0]).all() and np.isnan(lse[0])
    np.testing.assert_allclose(out[1], [1.0])
    np.testing.assert_allclose(lse[1], np.log(2.0))


@pytest.mark.parametrize("dtypes, expected", [
    ((np.float32, np.float32), np.float32),
    ((np.float64, np.float64), np.float64),
    ((np.float16, np.float16), np.float16),
    ((np.float32, np.float64), np.float64),
    ((np.int32, np.int64), np.float64),
])
def test_dtype_rules(rng, dtypes, expected):
    out_dtype, lse_dtype = dtypes
    outs = [rng.standard_normal((2, 4, 3)).astype(out_dtype) for _ in range(2)]
    lses = [rng.standard_normal((2, 4)).astype(lse_dtype) for _ in range(2)]
    out, lse = fastattn.merge_attention(outs, lses)
    assert out.dtype == expected and lse.dtype == expected
    weights = np.exp(np.stack([lse_part.astype(np.float64) for lse_part in lses]))  # (2, 2, 4)
    want = np.einsum("sbq,sbqd->bqd", weights, np.stack(outs).astype(np.float64))
    want /= weights.sum(0)[..., None]
    tolerance = 2e-3 if expected == np.float16 else 1e-6
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=tolerance, atol=tolerance)


def test_inputs_are_not_modified(rng):
    outs = [rng.standard_normal((3, 2)) for _ in range(3)]
    lses = [np.array([0.0, -np.inf, 1.0]) for _ in range(3)]
    copies = [array.copy() for array in outs + lses]
    for array in outs + lses:
        array.flags.writeable = False
    fastattn.merge_attention(outs, lses)
    for array, copy in zip(outs + lses, copies):
        np.testing.assert_array_equal(array, copy)


@pytest.mark.parametrize("outs, lses, error, words", [
    ([], [], ValueError, "non-empty"),
    ([np.zeros((2, 3))], [], ValueError, "same length"),
    ([np.zeros((2, 3)), np.zeros((2, 4))], [np.zeros(2)] * 2, ValueError, "outs[1]"),
    ([np.zeros((2, 3))], [np.zeros(3)], ValueError, "lses[0] must have shape (2,)"),
    ([np.zeros(3)], [np.zeros(())], ValueError, "at least 2 dims"),
    ([np.zeros((2, 3))], [np.array([0.0, np.inf])], ValueError, "+inf"),
    ([np.zeros((2, 3), complex)], [np.zeros(2)], TypeError, "outs[0] must hold real"),
    ([np.zeros((2, 3))], [np.array(["a", "b"])], TypeError, "lses[0] must hold real"),
])
def test_bad_parts_are_refused_clearly(outs, lses, error, words):
    with pytest.raises(error) as raised:
        fastattn.merge_attention(outs, lses)
    assert words in str(raised.value)


def test_merge_attention_is_public():
    assert "merge_attention" in fastattn.__all__
    assert fastattn.merge_attention.__module__ == "fastattn.merge"
