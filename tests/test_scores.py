"""Score options, built in (softcap, ALiBi slopes) and user functions (the families of
``user_functions.py``): fastattn against the reference (forward, weights, lse and
backward) alone, with the visibility rules, mask, bias, GQA, broadcast batch and split
keys; the reference against the formula and central finite differences; the
vectorised tanh; and the argument errors."""

import numpy as np
import pytest
from conftest import (FASTATTN, IMPLEMENTATIONS, REFERENCE, assert_close_to_reference,
                      assert_gradients_match_reference, assert_matches_finite_differences,
                      forward_options, random_inputs)

import fastattn
import reference
from fastattn._dispatch.tiling import choose_block_q, choose_split_len
from fastattn.kernels.vector_math import exp2_check, probability_exp2_check, tanh_check
from fastattn._dispatch.layout import fold_query_groups
from fastattn._contract.options import AttentionOptions
from fastattn._contract.problem import check_attention
from user_functions import USER_ERRORS, USER_OPTIONS

SLOPES = np.array([0.5, 0.125, 0.03125])  # one per head of (B, 3, L, D) inputs
SCORE_OPTIONS = {  # the built-ins, then the user functions of user_functions.py
    "softcap": dict(softcap=2.0),
    "alibi": dict(alibi_slopes=SLOPES),
    "softcap-alibi": dict(softcap=3.0, alibi_slopes=SLOPES),
    **USER_OPTIONS,
}
COMBINED_WITH = {
    "alone": {},
    "causal": dict(causal=True),
    "causal-bottom-right": dict(causal=True, causal_alignment="bottom_right"),
    "window": dict(window=(20, 5)),
    "window-bottom-right": dict(window=(30, 0), causal_alignment="bottom_right"),
    "kv-lengths": dict(kv_lengths=[0, 60]),
    "scale": dict(scale=-0.7),
}


def scaled_inputs(rng, q_shape, kv_shape, value_dim, dtype):
    """Inputs whose scores reach several times the softcaps above, so the cap bends."""
    query, key, value = random_inputs(rng, q_shape, kv_shape, value_dim, np.float64)
    return (3 * query).astype(dtype), key.astype(dtype), value.astype(dtype)


# ---------------------------------------------------------------- vectorised math

@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 1e-6), (np.float64, 2e-15)])
def test_tanh_matches_numpy(dtype, tolerance):
    x = np.concatenate([np.linspace(-40.0, 40.0, 400_001), np.geomspace(1e-30, 1.0, 5001),
                        -np.geomspace(1e-30, 1.0, 5001), [0.0, 1e30, -1e30]]).astype(dtype)
    got = tanh_check(x)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, np.tanh(x.astype(np.float64)), rtol=tolerance, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_keeps_nan_and_infinities(dtype):
    got = tanh_check(np.array([np.nan, np.inf, -np.inf], dtype))
    assert np.isnan(got[0]) and got[1] == 1.0 and got[2] == -1.0


@pytest.mark.parametrize("dtype, cutoff", [(np.float32, -64.0), (np.float64, -600.0)])
def test_probabilities_far_below_the_maximum_are_zero(dtype, cutoff):
    x = np.array([cutoff - 1.0, cutoff - 1e-3, -np.inf], dtype)
    np.testing.assert_array_equal(probability_exp2_check(x), 0.0)
    kept = np.linspace(cutoff, 0.0, 1001).astype(dtype)
    np.testing.assert_array_equal(probability_exp2_check(kept), exp2_check(kept))
    assert np.isnan(probability_exp2_check(np.array([np.nan], dtype))[0])


# ---------------------------------------------------------------- the formula

def test_reference_follows_the_contract_order():
    """softcap, then ALiBi with the causal alignment's offset, then the bias, by hand."""
    rng = np.random.default_rng(3)
    query, key, value = rng.standard_normal((2, 3)), rng.standard_normal((5, 3)), \
        rng.standard_normal((5, 2))
    bias = rng.standard_normal((2, 5))
    cap, slope, scale = 0.8, 0.3, 0.9
    i, j = np.arange(2)[:, None], np.arange(5)[None, :]
    scores = cap * np.tanh(scale * query @ key.T / cap) - slope * np.abs(i + 3 - j) + bias
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    for attention in IMPLEMENTATIONS.values():
        out = attention(query, key, value, bias=bias, scale=scale, softcap=cap,
                        alibi_slopes=slope, causal_alignment="bottom_right")
        np.testing.assert_allclose(out, weights @ value, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("combined", list(COMBINED_WITH.values()), ids=list(COMBINED_WITH))
@pytest.mark.parametrize("score_options", list(SCORE_OPTIONS.values()), ids=list(SCORE_OPTIONS))
def test_forward_with_each_option(rng, score_options, combined, dtype):
    query, key, value = scaled_inputs(rng, (2, 3, 70, 16), (2, 3, 90, 16), 8, dtype)
    assert_close_to_reference(query, key, value, return_weights=True, return_lse=True,
                              **forward_options(score_options), **combined)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("score_options", list(SCORE_OPTIONS.values()), ids=list(SCORE_OPTIONS))
def test_forward_with_mask_bias_and_broadcast_batch(rng, score_options, dtype):
    query, key, value = scaled_inputs(rng, (2, 3, 40, 16), (1, 3, 50, 16), 8, dtype)
    mask = rng.random((3, 40, 50)) < 0.8  # (H, Lq, Lk) broadcast over B
    bias = np.where(rng.random((40, 1)) < 0.1, -np.inf, rng.standard_normal((40, 1)))
    assert_close_to_reference(query, key, value, mask, bias=bias, causal=True,
                              return_lse=True, **forward_options(score_options))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (255, 256), (257, 511), (513, 257),
                                           (256, 1), (511, 513)])
def test_awkward_lengths(rng, q_len, kv_len, dtype):
    query, key, value = scaled_inputs(rng, (1, 3, q_len, 8), (1, 3, kv_len, 8), 4, dtype)
    for causal_alignment in ("top_left", "bottom_right"):
        assert_close_to_reference(query, key, value, causal=True, return_lse=True,
                                  causal_alignment=causal_alignment, softcap=4.0,
                                  alibi_slopes=SLOPES)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("score_options", list(SCORE_OPTIONS.values()), ids=list(SCORE_OPTIONS))
def test_split_key_decoding(rng, score_options, dtype):
    """One query against a long cache, few heads: the keys are split into spans."""
    kv_len = 3000
    n_batch = 3
    assert choose_split_len(n_batch * -(-1 // choose_block_q(n_batch, 1)), kv_len) < kv_len
    query, key, value = scaled_inputs(rng, (1, 3, 1, 32), (1, 3, kv_len, 32), 16, dtype)
    assert_close_to_reference(query, key, value, causal=True, causal_alignment="bottom_right",
                              return_lse=True, **forward_options(score_options))


@pytest.mark.parametrize("q_len", [1, 33])
@pytest.mark.parametrize("score_options", list(SCORE_OPTIONS.values()), ids=list(SCORE_OPTIONS))
def test_grouped_query_heads(rng, score_options, q_len):
    """ALiBi slopes are per query head; decoding (Lq = 1) folds heads only without them."""
    slopes = np.array([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0])  # (Hq,)
    options = forward_options(score_options)
    if "alibi_slopes" in options:
        options["alibi_slopes"] = slopes
    query, key, value = scaled_inputs(rng, (2, 6, q_len, 16), (2, 2, 1100, 16), 8, np.float32)
    assert_close_to_reference(query, key, value, enable_gqa=True, return_weights=True,
                              return_lse=True, causal=True, causal_alignment="bottom_right",
                              **options)
    problem = check_attention(query, key, value, None, AttentionOptions(enable_gqa=True, **options))
    folds = fold_query_groups(problem) is not None
    assert folds == (q_len == 1 and "alibi_slopes" not in options
                     and not {"score_mod", "mask_mod"} & set(options))


def test_slopes_broadcast_over_the_batch(rng):
    """Slopes of any shape broadcastable to the batch shape: one value per batch entry."""
    query, key, value = scaled_inputs(rng, (2, 3, 30, 8), (2, 3, 40, 8), 8, np.float64)
    per_entry = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])  # (B, H)
    assert_close_to_reference(query, key, value, alibi_slopes=per_entry)
    assert_close_to_reference(query, key, value, alibi_slopes=per_entry[:, :1])  # (B, 1)
    assert_close_to_reference(query, key, value, alibi_slopes=0.25)  # scalar
    out = fastattn.scaled_dot_product_attention(query, key, value, alibi_slopes=per_entry)
    for b in range(2):
        for h in range(3):
            single = fastattn.scaled_dot_product_attention(
                query[b, h], key[b, h], value[b, h], alibi_slopes=per_entry[b, h])
            np.testing.assert_allclose(out[b, h], single, rtol=1e-12, atol=1e-12)


def test_softcap_bends_the_scores(rng):
    """A small cap flattens the weights, a huge one changes nothing."""
    query, key, value = scaled_inputs(rng, (20, 8), (30, 8), 4, np.float64)
    _, plain = fastattn.scaled_dot_product_attention(query, key, value, return_weights=True)
    _, capped = fastattn.scaled_dot_product_attention(query, key, value, return_weights=True,
                                                      softcap=0.5)
    _, loose = fastattn.scaled_dot_product_attention(query, key, value, return_weights=True,
                                                     softcap=1e6)
    assert capped.max() < plain.max()
    np.testing.assert_allclose(loose, plain, atol=1e-9)


# ---------------------------------------------------------------- backward

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("combined", list(COMBINED_WITH.values()), ids=list(COMBINED_WITH))
@pytest.mark.parametrize("score_options", list(SCORE_OPTIONS.values()), ids=list(SCORE_OPTIONS))
def test_backward_with_each_option(rng, score_options, combined, dtype):
    query, key, value = scaled_inputs(rng, (2, 3, 70, 16), (2, 3, 300, 16), 8, dtype)
    assert_gradients_match_reference(rng, query, key, value, **score_options, **combined)


@pytest.mark.parametrize("score_options", list(SCORE_OPTIONS.values()), ids=list(SCORE_OPTIONS))
def test_backward_with_mask_bias_gqa_and_broadcast(rng, score_options):
    options = dict(score_options)
    if "alibi_slopes" in options:
        options["alibi_slopes"] = np.array([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0])
    query, key, value = scaled_inputs(rng, (2, 6, 40, 16), (1, 2, 50, 16), 8, np.float64)
    mask = rng.random((40, 50)) < 0.8
    bias = np.where(rng.random((6, 1, 50)) < 0.1, -np.inf, rng.standard_normal((6, 1, 50)))
    assert_gradients_match_reference(rng, query, key, value, mask, bias=bias,
                                      enable_gqa=True, kv_lengths=[50, 33], **options)


FD_OPTIONS = {
    "softcap": dict(softcap=0.7),
    "softcap-alibi-causal": dict(softcap=1.1, alibi_slopes=np.array([0.3, 0.9]), causal=True,
                                 causal_alignment="bottom_right"),
    "alibi-window": dict(alibi_slopes=np.array([0.3, 0.9]), window=(1, 1)),
}


@pytest.mark.parametrize("options", list(FD_OPTIONS.values()), ids=list(FD_OPTIONS))
def test_against_finite_differences(options):
    """Central differences of sum(out * G) in float64; both backwards must match them."""
    assert_matches_finite_differences(**options)


# ---------------------------------------------------------------- errors

ERRORS = {  # the built-in options', then the user functions' (user_functions.py)
    "softcap-zero": (dict(softcap=0.0), ValueError, ["softcap", "positive"]),
    "softcap-negative": (dict(softcap=-2), ValueError, ["softcap", "-2"]),
    "softcap-inf": (dict(softcap=np.inf), ValueError, ["softcap", "finite"]),
    "softcap-nan": (dict(softcap=np.nan), ValueError, ["softcap"]),
    "softcap-string": (dict(softcap="30"), TypeError, ["softcap", "real"]),
    "softcap-bool": (dict(softcap=True), TypeError, ["softcap"]),
    "softcap-complex": (dict(softcap=1j), TypeError, ["softcap"]),
    "slopes-complex": (dict(alibi_slopes=np.ones(3, complex)), TypeError,
                       ["alibi_slopes", "complex"]),
    "slopes-strings": (dict(alibi_slopes=["a", "b", "c"]), TypeError, ["alibi_slopes"]),
    "slopes-nan": (dict(alibi_slopes=[0.5, np.nan, 0.1]), ValueError,
                   ["alibi_slopes", "finite"]),
    "slopes-inf": (dict(alibi_slopes=[0.5, np.inf, 0.1]), ValueError, ["alibi_slopes"]),
    "slopes-shape": (dict(alibi_slopes=np.ones(4)), ValueError,
                     ["alibi_slopes", "(4,)", "(2, 3)"]),
    "slopes-too-many-dims": (dict(alibi_slopes=np.ones((1, 2, 3))), ValueError,
                             ["alibi_slopes", "(1, 2, 3)", "(2, 3)"]),
    **USER_ERRORS,
}


@pytest.mark.parametrize("kwargs, error, words", list(ERRORS.values()), ids=list(ERRORS))
def test_bad_arguments(attention, kwargs, error, words):
    query, key, value = random_inputs(np.random.default_rng(0), (2, 3, 4, 8), (2, 3, 5, 8))
    with pytest.raises(error) as raised:
        attention(query, key, value, **kwargs)
    for word in words:
        assert word in str(raised.value)


@pytest.mark.parametrize("backward", [FASTATTN[1], REFERENCE[1]])
def test_backward_checks_the_options_too(backward):
    query, key, value = random_inputs(np.random.default_rng(0), (2, 3, 4, 8), (2, 3, 5, 8))
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True)
    with pytest.raises(ValueError, match="softcap"):
        backward(out, query, key, value, out, lse, softcap=-1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        backward(out, query, key, value, out, lse, alibi_slopes=np.ones(5))


@pytest.mark.parametrize("kwargs", [dict(softcap=30.0), dict(alibi_slopes=SLOPES)],
                         ids=["softcap", "alibi"])
def test_dask_refuses_score_options(kwargs):
    """fastattn.dask does not carry the score options to its chunks yet, and says so."""
    fastattn_dask = pytest.importorskip("fastattn.dask")
    query, key, value = random_inputs(np.random.default_rng(0), (2, 3, 4, 8), (2, 3, 5, 8))
    with pytest.raises(NotImplementedError, match=next(iter(kwargs))):
        fastattn_dask.scaled_dot_product_attention(query, key, value, **kwargs)
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True)
    with pytest.raises(NotImplementedError, match=next(iter(kwargs))):
        fastattn_dask.scaled_dot_product_attention_backward(out, query, key, value, out, lse,
                                                            **kwargs)
