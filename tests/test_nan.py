"""A NaN in query, key, value or bias reaches exactly what depends on it.

Forward: the rows that see it become NaN (only the columns it meets, for a NaN
value; output, visible weights and lse for a NaN score); every other row, entry and
column keeps the value it has without the NaN. Backward: fastattn's NaN pattern is
the reference's, and every finite gradient matches it. Both implementations.
"""

import numpy as np
import pytest
from conftest import FASTATTN, IMPLEMENTATIONS, REFERENCE, TOLERANCE, forward_and_backward

import fastattn
import reference

# B=2, H=2, Lq=37 against Lk=600 (two key blocks): few enough query blocks that the
# kernel splits the keys into spans, unless weights are asked for.
BATCH, HEADS, Q_LEN, KV_LEN, DIM = 2, 2, 37, 600, 8
ENTRY = (1, 0)  # the batch entry that holds the NaN
ROW, KEY, COLUMN = 20, 300, 3  # where the NaN goes

OPTIONS = {
    "plain": {},
    "causal": {"causal": True},  # top-left: no row sees KEY, so nothing is NaN
    "causal-bottom-right-window": {"causal": True, "causal_alignment": "bottom_right",
                                   "window": (40, 0)},
    "window": {"window": (5, 30), "causal_alignment": "bottom_right"},
    "kv-lengths": {"kv_lengths": [600, 250]},  # entry 1 never sees KEY
    "mask": {"mask": "random"},
    "bias": {"bias": "random"},
}


def problem(rng, dtype, options):
    """Inputs and options for one case; the mask and bias are drawn here."""
    query = rng.standard_normal((BATCH, HEADS, Q_LEN, DIM)).astype(dtype)
    key = rng.standard_normal((BATCH, HEADS, KV_LEN, DIM)).astype(dtype)
    value = rng.standard_normal((BATCH, HEADS, KV_LEN, DIM)).astype(dtype)
    options = dict(options)
    if options.get("mask") == "random":
        options["mask"] = rng.random((BATCH, 1, Q_LEN, KV_LEN)) < 0.7
        options["mask"][ENTRY[0], 0, ROW, KEY] = False  # KEY hidden from ROW only
    if options.get("bias") == "random":
        bias = rng.standard_normal((Q_LEN, KV_LEN)).astype(dtype)
        bias[rng.random((Q_LEN, KV_LEN)) < 0.2] = -np.inf
        bias[ROW + 1, KEY] = -np.inf  # KEY hidden from ROW + 1 by the bias
        options["bias"] = bias
    return query, key, value, options


def with_nan(where, query, key, value, options):
    """Copies of the inputs with one NaN at ``where``."""
    query, key, value = query.copy(), key.copy(), value.copy()
    options = dict(options)
    if where == "query":
        query[ENTRY + (ROW, COLUMN)] = np.nan
    elif where == "key":
        key[ENTRY + (KEY, COLUMN)] = np.nan
    elif where == "value":
        value[ENTRY + (KEY, COLUMN)] = np.nan
    else:  # a (Lq, Lk) bias shared by every entry
        bias = np.zeros((Q_LEN, KV_LEN), query.dtype) if options.get("bias") is None \
            else options["bias"].copy()
        bias[ROW, KEY] = np.nan
        bias[ROW + 1, KEY] = np.nan  # behind a -inf: hidden, if the bias is the random one
        options["bias"] = bias
    return query, key, value, options


def expected_nan(where, visible):
    """Boolean masks of the NaN entries of ``out (B, H, Lq, Dv)``, ``weights`` and
    ``lse``, given ``visible (B, H, Lq, Lk)`` of the run without the NaN."""
    nan_rows = np.zeros(visible.shape[:-1], bool)  # (B, H, Lq) rows with a NaN score
    out = np.zeros(visible.shape[:-1] + (DIM,), bool)  # (B, H, Lq, Dv)
    if where == "query":
        nan_rows[ENTRY + (ROW,)] = visible[ENTRY + (ROW,)].any()
    elif where == "key":
        nan_rows[ENTRY] = visible[ENTRY + (slice(None), KEY)]
    elif where == "bias":
        nan_rows[..., ROW] = visible[..., ROW, KEY]
        nan_rows[..., ROW + 1] |= visible[..., ROW + 1, KEY]
    else:  # value: the column it holds, in the rows that see its key
        out[ENTRY + (slice(None), COLUMN)] = visible[ENTRY + (slice(None), KEY)]
    out |= nan_rows[..., None]
    weights = nan_rows[..., None] & visible  # (B, H, Lq, Lk)
    return out, weights, nan_rows


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize("option_name", sorted(OPTIONS))
@pytest.mark.parametrize("where", ["query", "key", "value", "bias"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_reaches_exactly_the_rows_that_see_it(rng, implementation, return_weights,
                                                  option_name, where, dtype):
    attention = IMPLEMENTATIONS[implementation]
    query, key, value, options = problem(rng, dtype, OPTIONS[option_name])
    nan_inputs = with_nan(where, query, key, value, options)
    # the truth without the NaN: the same call with the NaN's bias entries as 0
    clean_options = dict(nan_inputs[3])
    if "bias" in clean_options:
        clean_options["bias"] = np.nan_to_num(clean_options["bias"], nan=0.0, neginf=-np.inf)
    as64 = [array.astype(np.float64) for array in (query, key, value)]
    clean_out, clean_weights, clean_lse = reference.scaled_dot_product_attention(
        *as64, return_weights=True, return_lse=True, **clean_options)

    results = attention(*nan_inputs[:3], return_weights=return_weights, return_lse=True,
                        **nan_inputs[3])
    out, lse = results[0], results[-1]
    nan_out, nan_weights, nan_lse = expected_nan(where, clean_weights > 0)
    tolerance = TOLERANCE[np.dtype(dtype)]
    for name, got, want, nan in (("out", out, clean_out, nan_out),
                                 ("lse", lse, clean_lse, nan_lse)) + (
            (("weights", results[1], clean_weights, nan_weights),) if return_weights else ()):
        np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{name}: where NaN")
        np.testing.assert_allclose(got[~nan], want[~nan], rtol=tolerance, atol=tolerance,
                                   err_msg=f"{name}: the entries the NaN cannot reach")


def test_fully_masked_rows_stay_zero_beside_a_nan(rng):
    """A row that sees no key gives 0 and lse -inf, even next to NaN inputs."""
    query, key, value, _ = problem(rng, np.float32, {})
    query[0, 0, 3] = np.nan
    key[0, 0, 7] = np.nan
    value[0, 0, 9] = np.nan
    mask = np.ones((Q_LEN, KV_LEN), bool)
    mask[3] = mask[4] = False
    for attention in IMPLEMENTATIONS.values():
        out, weights, lse = attention(query, key, value, mask, return_weights=True,
                                      return_lse=True)
        assert (out[0, 0, 3:5] == 0).all() and (weights[0, 0, 3:5] == 0).all()
        assert (lse[0, 0, 3:5] == -np.inf).all()
        assert np.isnan(out[0, 0, 5]).all() and not np.isnan(out[1]).any()


@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_nan_under_grouped_query_decoding(rng, where):
    """Decoding with GQA folds a kv group's heads into one block: a NaN in kv head 0
    reaches query heads 0 and 1 only."""
    query = rng.standard_normal((1, 4, 1, DIM)).astype(np.float32)
    key = rng.standard_normal((1, 2, 1500, DIM)).astype(np.float32)
    value = rng.standard_normal((1, 2, 1500, DIM)).astype(np.float32)
    clean = reference.scaled_dot_product_attention(query, key, value, enable_gqa=True)
    {"query": query, "key": key, "value": value}[where][0, 0, -1, 2] = np.nan
    for attention in IMPLEMENTATIONS.values():
        out = attention(query, key, value, enable_gqa=True)
        reached = np.isnan(out).any(axis=(-2, -1))[0]  # (Hq,)
        assert reached.tolist() == ([True, False, False, False] if where == "query"
                                    else [True, True, False, False])
        np.testing.assert_allclose(out[0, 2:], clean[0, 2:], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("option_name", sorted(OPTIONS))
@pytest.mark.parametrize("where", ["query", "key", "value", "bias"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_in_the_backward(rng, option_name, where, dtype):
    """Gradients: fastattn's NaN entries are the reference's, every finite entry
    matches it, and batch entries without the NaN equal their NaN-free gradients."""
    query, key, value, options = problem(rng, dtype, OPTIONS[option_name])
    query, key, value, options = with_nan(where, query, key, value, options)
    mask = options.pop("mask", None)
    grad_out = rng.standard_normal(query.shape[:-1] + (DIM,)).astype(dtype)
    got = forward_and_backward(FASTATTN, query, key, value, mask, grad_out, **options)
    as64 = [array.astype(np.float64) for array in (query, key, value, grad_out)]
    want = forward_and_backward(REFERENCE, *as64[:3], mask, as64[3], **options)
    tolerance = TOLERANCE[np.dtype(dtype)]
    for name, g, w in zip(("query", "key", "value"), got, want):
        nan = np.isnan(w)
        np.testing.assert_array_equal(np.isnan(g), nan, err_msg=f"grad_{name}: where NaN")
        scale = max(1.0, np.abs(w[~nan]).max(initial=0.0))
        np.testing.assert_allclose(g[~nan], w[~nan], rtol=0, atol=tolerance * scale,
                                   err_msg=f"grad_{name}")
    if where != "bias":  # the other batch entries never meet the NaN
        others = np.ones((BATCH, HEADS), bool)
        others[ENTRY] = False
        assert not any(np.isnan(g[others]).any() for g in got)
    if where == "value":  # dV = P^T dO never meets V
        assert not np.isnan(got[2]).any()


def test_nan_query_that_sees_no_key_changes_no_gradient(rng):
    """A NaN query row that sees no key (bottom-right causal with Lq > Lk: the first
    rows see nothing) enters no product: every gradient equals, bitwise, the one with
    that row set to 0, and the row's own query gradient is 0."""
    query = rng.standard_normal((2, 3, 300, 32)).astype(np.float32)
    key = rng.standard_normal((2, 3, 200, 32)).astype(np.float32)
    value = rng.standard_normal((2, 3, 200, 32)).astype(np.float32)
    grad_out = rng.standard_normal((2, 3, 300, 32)).astype(np.float32)
    options = dict(causal=True, causal_alignment="bottom_right")  # rows < 100 see no key
    clean = forward_and_backward(FASTATTN, query, key, value, None, grad_out, **options)
    query[1, 2, 40, 5] = np.nan
    got = forward_and_backward(FASTATTN, query, key, value, None, grad_out, **options)
    for g, c in zip(got, clean):
        np.testing.assert_array_equal(g, c)
