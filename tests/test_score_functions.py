"""User score functions (score_mod, mask_mod, score_mod_grad) and block masks:
fastattn against the reference on awkward lengths and after the built-in options,
the ``b``/``h`` convention against explicit bias and mask arrays, block masks
against the element-wise mask_mod, central finite differences, compiling, and the
errors of block masks and of the backward. Each user option family alone and with
the visibility rules, GQA, split keys and the argument errors are tested with the
built-in options in ``test_scores.py``; the functions are in ``user_functions.py``."""

import math

import numba
import numpy as np
import pytest
from conftest import (FASTATTN, IMPLEMENTATIONS, REFERENCE, assert_close_to_reference,
                      assert_gradients_match_reference, assert_matches_finite_differences,
                      forward_and_backward, forward_options, random_inputs)
from hypothesis import given, settings
from hypothesis import strategies as st

import fastattn
import fastattn.score_math
import reference
from fastattn.block_mask import EMPTY, FULL, PARTIAL
from fastattn.kernels.hooks import block_hook
from fastattn._contract.problem import check_attention
from user_functions import (CAP, MASK_MODS, USER_OPTIONS, documents, not_compiled, prefix_lm,
                            relative_bias, scattered, tanh_cap, tanh_cap_grad, unit_grad, wobble,
                            wobble_grad)

# ---------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (1, 1000), (127, 129), (129, 127),
                                           (255, 257), (257, 513)])
def test_awkward_lengths(rng, q_len, kv_len, dtype):
    query, key, value = random_inputs(rng, (1, 2, q_len, 8), (1, 2, kv_len, 8), 4, dtype)
    for alignment in ("top_left", "bottom_right"):
        assert_close_to_reference(query, key, value, causal=True, causal_alignment=alignment,
                                  return_lse=True, score_mod=wobble, mask_mod=scattered)
        block_mask = fastattn.create_block_mask(scattered, (1, 2), q_len, kv_len)
        assert_close_to_reference(query, key, value, causal=True, causal_alignment=alignment,
                                  return_lse=True, score_mod=wobble, block_mask=block_mask)


def test_rows_that_see_no_key(rng):
    """mask_mod hides every key of rows 0, 5, 10, ...: output 0, lse -inf, no NaN."""
    query, key, value = random_inputs(rng, (2, 3, 30, 8), (2, 3, 40, 8), 8, np.float32)
    block_mask = fastattn.create_block_mask(scattered, (2, 3), 30, 40, block_size=8)
    for options in (dict(mask_mod=scattered), dict(block_mask=block_mask)):
        out, lse = assert_close_to_reference(query, key, value, return_lse=True, **options)
        assert (out[:, :, ::5] == 0).all() and (lse[:, :, ::5] == -np.inf).all()


def test_score_mod_leaves_hidden_keys_hidden(rng):
    """A score_mod that would lift every score to a constant cannot unhide a key
    hidden by a -inf bias, a mask or a rule."""

    @numba.njit
    def flatten(s, b, h, i, j):
        return 0.0

    query, key, value = random_inputs(rng, (20, 8), (30, 8), 8)
    bias = np.where(rng.random((20, 30)) < 0.3, -np.inf, 0.0)
    visible = (bias == 0.0) & np.tril(np.ones((20, 30), bool))
    _, weights = fastattn.scaled_dot_product_attention(query, key, value, bias=bias, causal=True,
                                                       score_mod=flatten, return_weights=True)
    expected = visible / np.maximum(visible.sum(axis=1, keepdims=True), 1)
    np.testing.assert_allclose(weights, expected, atol=1e-12)


def test_nan_behind_a_mask_mod_stays_out(rng):
    query, key, value = random_inputs(rng, (1, 1, 74, 8), (1, 1, 74, 8), 8, np.float32)
    key[0, 0, 40] = np.nan  # document 1 (keys 37..73)
    out = fastattn.scaled_dot_product_attention(query, key, value, mask_mod=documents)
    assert not np.isnan(out[0, 0, :37]).any()
    assert np.isnan(out[0, 0, 40:]).all() and not np.isnan(out[0, 0, 37:40]).any()


# ---------------------------------------------------------------- the b, h convention

@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3), (2, 2, 3)])
def test_batch_and_head_indices(rng, batch_shape):
    """``h`` indexes the last of two or more batch axes, ``b`` the others in C order;
    one batch axis is ``b``; none gives 0 and 0. Checked against explicit arrays."""
    q_len, kv_len = 12, 17
    query, key, value = random_inputs(rng, batch_shape + (q_len, 8), batch_shape + (kv_len, 8))
    heads = batch_shape[-1] if len(batch_shape) >= 2 else 1
    entry = np.arange(math.prod(batch_shape)).reshape(batch_shape + (1, 1))
    b, h = entry // heads, entry % heads  # (*batch, 1, 1)
    i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    bias = 0.1 * b - 0.05 * h + 0.01 * (i - j)  # (*batch, Lq, Lk)
    mask = ((i + 2 * j + b + 3 * h) % 4 != 0) & (i % 5 != 0)  # (*batch, Lq, Lk)

    @numba.njit
    def offsets(s, b, h, i, j):
        return s + 0.1 * b - 0.05 * h + 0.01 * (i - j)

    for attention in IMPLEMENTATIONS.values():
        got = attention(query, key, value, score_mod=offsets, mask_mod=scattered)
        want = fastattn.scaled_dot_product_attention(query, key, value, mask,
                                                      bias=bias)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- equivalences

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_score_mod_softcap_equals_the_builtin(rng, dtype):
    query, key, value = random_inputs(rng, (2, 3, 60, 16), (2, 3, 80, 16), 8, np.float64)
    query, key, value = (3 * query).astype(dtype), key.astype(dtype), value.astype(dtype)
    grad_out = rng.standard_normal((2, 3, 60, 8)).astype(dtype)
    tolerance = 2e-5 if dtype == np.float32 else 1e-10
    builtin = forward_and_backward(FASTATTN, query, key, value, None, grad_out, causal=True,
                                   softcap=CAP)
    user = forward_and_backward(FASTATTN, query, key, value, None, grad_out, causal=True,
                                score_mod=tanh_cap, score_mod_grad=tanh_cap_grad)
    for got, want in zip(user, builtin):
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
    out_user = fastattn.scaled_dot_product_attention(query, key, value, score_mod=tanh_cap)
    out_builtin = fastattn.scaled_dot_product_attention(query, key, value, softcap=CAP)
    np.testing.assert_allclose(out_user, out_builtin, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("block_size", [128, (64, 100), (16, 8), 1])
@pytest.mark.parametrize("mask_name", list(MASK_MODS))
def test_block_mask_equals_mask_mod(rng, mask_name, block_size):
    mask_mod = MASK_MODS[mask_name]
    query, key, value = random_inputs(rng, (2, 3, 150, 16), (2, 3, 140, 16), 8, np.float32)
    block_mask = fastattn.create_block_mask(mask_mod, (2, 3), 150, 140, block_size=block_size)
    grad_out = rng.standard_normal((2, 3, 150, 8)).astype(np.float32)
    for combined in ({}, dict(causal=True, causal_alignment="bottom_right"),
                     dict(window=(30, 3), kv_lengths=[140, 77])):
        elementwise = forward_and_backward(FASTATTN, query, key, value, None, grad_out,
                                           mask_mod=mask_mod, **combined)
        blocked = forward_and_backward(FASTATTN, query, key, value, None, grad_out,
                                       block_mask=block_mask, **combined)
        for got, want in zip(blocked, elementwise):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        out_blocked, weights, lse = fastattn.scaled_dot_product_attention(
            query, key, value, block_mask=block_mask, return_weights=True, return_lse=True,
            **combined)
        out, weights_elementwise, lse_elementwise = fastattn.scaled_dot_product_attention(
            query, key, value, mask_mod=mask_mod, return_weights=True, return_lse=True,
            **combined)
        np.testing.assert_allclose(out_blocked, out, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(weights, weights_elementwise, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(lse, lse_elementwise, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mask_name", ["scattered", "documents"])
def test_block_mask_states_match_the_mask(mask_name):
    mask_mod = MASK_MODS[mask_name]
    block_mask = fastattn.create_block_mask(mask_mod, (2, 3), 50, 70, block_size=(8, 16))
    dense = reference.attention.call_over_grid(
        mask_mod, check_attention(np.zeros((2, 3, 50, 1)), np.zeros((2, 3, 70, 1)),
                                  np.zeros((2, 3, 70, 1))))  # (2, 3, 50, 70)
    states = block_mask.states.reshape(2, 3, 7, 5)
    for t in range(7):
        for u in range(5):
            tile = dense[:, :, 8 * t:8 * t + 8, 16 * u:16 * u + 16]  # (2, 3, <=8, <=16)
            expected = np.where(tile.all(axis=(-2, -1)), FULL,
                                np.where(tile.any(axis=(-2, -1)), PARTIAL, EMPTY))
            np.testing.assert_array_equal(states[:, :, t, u], expected)
    assert not block_mask.states.flags.writeable
    if mask_name == "documents":  # every kind of tile
        assert set(np.unique(block_mask.states)) == {EMPTY, PARTIAL, FULL}
        assert 0.0 < block_mask.sparsity() < 1.0
        assert "partial" in repr(block_mask)


def test_block_mask_skips_tiles_it_says_are_empty(rng):
    """Empty tiles are never computed: a NaN key inside an empty tile of a block
    mask cannot reach any output, even through the block products."""
    query, key, value = random_inputs(rng, (1, 1, 256, 8), (1, 1, 256, 8), 8, np.float32)
    block_mask = fastattn.create_block_mask(documents, (1, 1), 256, 256, block_size=(32, 32))
    value[0, 0, 200] = np.nan  # document of rows 185..221
    out = fastattn.scaled_dot_product_attention(query, key, value, block_mask=block_mask)
    nan_rows = np.isnan(out[0, 0]).any(axis=1)
    np.testing.assert_array_equal(np.flatnonzero(nan_rows), np.arange(200, 222))


def test_block_mask_is_reusable(rng):
    block_mask = fastattn.create_block_mask(prefix_lm, (2, 3), 40, 40)
    for seed in range(3):
        query, key, value = random_inputs(np.random.default_rng(seed), (2, 3, 40, 8),
                                          (2, 3, 40, 8))
        assert_close_to_reference(query, key, value, block_mask=block_mask)


# ---------------------------------------------------------------- backward

@pytest.mark.parametrize("user", list(USER_OPTIONS.values()), ids=list(USER_OPTIONS))
def test_with_softcap_and_alibi(rng, user):
    """User functions after the built-in options, forward and backward (each option
    family alone and with the visibility rules: test_scores.py)."""
    query, key, value = random_inputs(rng, (2, 3, 70, 16), (2, 3, 90, 16), 8, np.float64)
    builtins = dict(softcap=3.0, alibi_slopes=np.array([0.5, 0.125, 0.03125]))
    assert_close_to_reference(query, key, value, return_weights=True, return_lse=True,
                              **forward_options(user), **builtins)
    assert_gradients_match_reference(rng, query.astype(np.float32), key.astype(np.float32),
                                      value.astype(np.float32), **user, **builtins)


FD_OPTIONS = {
    "wobble": dict(score_mod=wobble, score_mod_grad=wobble_grad),
    "wobble-softcap-causal": dict(score_mod=wobble, score_mod_grad=wobble_grad, softcap=1.1,
                                  causal=True, causal_alignment="bottom_right"),
    "relative-bias-prefix-lm": dict(score_mod=relative_bias, score_mod_grad=unit_grad,
                                    mask_mod=prefix_lm),
}


@pytest.mark.parametrize("options", list(FD_OPTIONS.values()), ids=list(FD_OPTIONS))
def test_against_finite_differences(options):
    """Central differences of sum(out * G) in float64; both backwards must match them."""
    assert_matches_finite_differences(**options)


# ---------------------------------------------------------------- random combinations

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), q_len=st.integers(1, 70), kv_len=st.integers(1, 70),
       user=st.sampled_from(sorted(USER_OPTIONS)), use_block_mask=st.booleans(),
       block_size=st.sampled_from([8, 16, (4, 32)]), causal=st.booleans(),
       window=st.sampled_from([None, (5, 2), (0, 0)]),
       alignment=st.sampled_from(["top_left", "bottom_right"]),
       softcap=st.sampled_from([None, 1.5]), dtype=st.sampled_from([np.float32, np.float64]))
def test_random_combinations(seed, q_len, kv_len, user, use_block_mask, block_size, causal,
                             window, alignment, softcap, dtype):
    rng = np.random.default_rng(seed)
    query, key, value = random_inputs(rng, (2, 3, q_len, 8), (2, 3, kv_len, 8), 4, dtype)
    options = dict(USER_OPTIONS[user], causal=causal, window=window, softcap=softcap,
                   causal_alignment=alignment)
    if use_block_mask and "mask_mod" in options:
        options["block_mask"] = fastattn.create_block_mask(options.pop("mask_mod"), (2, 3),
                                                           q_len, kv_len, block_size=block_size)
    assert_close_to_reference(query, key, value, return_lse=True, **forward_options(options))
    assert_gradients_match_reference(rng, query, key, value, **options)


# ---------------------------------------------------------------- compiling

def capped_with(tanh):
    """A softcap score_mod calling ``tanh`` from a closure."""

    @numba.njit
    def score_mod(s, b, h, i, j):
        return CAP * tanh(s / CAP)

    return score_mod


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spelling", ["math.tanh global", "closure math.tanh",
                                      "closure score_math.tanh"])
def test_math_in_score_functions(rng, spelling, dtype):
    """math.tanh and math.exp, however the function reaches them, run as fastattn's
    vectorised versions inside the kernels, within the contract's tolerance."""
    score_mod = {"math.tanh global": tanh_cap,
                 "closure math.tanh": capped_with(math.tanh),
                 "closure score_math.tanh": capped_with(fastattn.score_math.tanh)}[spelling]
    query, key, value = random_inputs(rng, (2, 3, 50, 16), (2, 3, 60, 16), 8, np.float64)
    query = (3 * query).astype(dtype)
    key, value = key.astype(dtype), value.astype(dtype)
    assert_close_to_reference(query, key, value, score_mod=score_mod, return_lse=True)
    builtin = fastattn.scaled_dot_product_attention(query, key, value, softcap=CAP)
    tolerance = 2e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(
        fastattn.scaled_dot_product_attention(query, key, value, score_mod=score_mod),
        builtin, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 2e-6), (np.float64, 1e-14)])
def test_score_math_matches_math(dtype, tolerance):
    @numba.njit
    def both(x):
        out = np.empty((2,) + x.shape, x.dtype)
        for index in range(x.size):
            out[0, index] = fastattn.score_math.tanh(x[index])
            out[1, index] = fastattn.score_math.exp(x[index])
        return out

    x = np.linspace(-80.0, 80.0, 20001).astype(dtype)
    tanh, exp = both(x)
    np.testing.assert_allclose(tanh, np.tanh(x.astype(np.float64)), rtol=tolerance, atol=0)
    np.testing.assert_allclose(exp, np.exp(x.astype(np.float64)), rtol=tolerance, atol=0)
    assert fastattn.score_math.tanh(0.5) == math.tanh(0.5)  # plain Python: math's
    assert fastattn.score_math.exp.py_func(0.5) == pytest.approx(math.exp(0.5), rel=1e-15)


def test_same_functions_compile_nothing_again(rng):
    query, key, value = random_inputs(rng, (2, 3, 20, 8), (2, 3, 30, 8), 8, np.float32)
    fastattn.scaled_dot_product_attention(query, key, value, score_mod=wobble,
                                          mask_mod=prefix_lm)
    hooks_before = block_hook.cache_info()
    overloads_before = len(wobble.overloads), len(prefix_lm.overloads)
    fastattn.scaled_dot_product_attention(2 * query, key, value, score_mod=wobble,
                                          mask_mod=prefix_lm)
    hooks_after = block_hook.cache_info()
    assert hooks_after.misses == hooks_before.misses
    assert hooks_after.hits == hooks_before.hits + 1
    assert (len(wobble.overloads), len(prefix_lm.overloads)) == overloads_before


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("made_for", [((2, 3), 4, 6), ((2, 3), 5, 5), ((3, 2), 4, 5), ((6,), 4, 5)])
def test_block_mask_of_another_shape(attention, made_for):
    query, key, value = random_inputs(np.random.default_rng(0), (2, 3, 4, 8), (2, 3, 5, 8))
    block_mask = fastattn.create_block_mask(prefix_lm, *made_for)
    with pytest.raises(ValueError) as raised:
        attention(query, key, value, block_mask=block_mask)
    for word in ("block_mask", str(made_for[0]), "(2, 3)", "create_block_mask"):
        assert word in str(raised.value)


def test_block_mask_with_another_mask_mod(attention):
    query, key, value = random_inputs(np.random.default_rng(0), (2, 3, 4, 8), (2, 3, 5, 8))
    block_mask = fastattn.create_block_mask(prefix_lm, (2, 3), 4, 5)
    attention(query, key, value, block_mask=block_mask, mask_mod=prefix_lm)  # the same: fine
    with pytest.raises(ValueError, match="block_mask carries its own mask_mod"):
        attention(query, key, value, block_mask=block_mask, mask_mod=documents)


@pytest.mark.parametrize("backward", [FASTATTN[1], REFERENCE[1]])
def test_backward_needs_score_mod_grad(backward):
    query, key, value = random_inputs(np.random.default_rng(0), (2, 3, 4, 8), (2, 3, 5, 8))
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                     score_mod=wobble)
    with pytest.raises(ValueError, match="score_mod_grad"):
        backward(out, query, key, value, out, lse, score_mod=wobble)
    with pytest.raises(ValueError, match="score_mod_grad was given without a score_mod"):
        backward(out, query, key, value, out, lse, score_mod_grad=wobble_grad)
    with pytest.raises(TypeError, match="score_mod_grad"):
        backward(out, query, key, value, out, lse, score_mod=wobble, score_mod_grad=not_compiled)


@pytest.mark.parametrize("arguments, error, word", [
    ((prefix_lm, (2, -3), 4, 5), ValueError, "batch_shape"),
    ((prefix_lm, (2, 3), 4.5, 5), TypeError, "q_len"),
    ((prefix_lm, (2, 3), 4, -1), ValueError, "kv_len"),
    ((not_compiled, (2, 3), 4, 5), TypeError, "mask_mod"),
])
def test_create_block_mask_checks_its_arguments(arguments, error, word):
    with pytest.raises(error, match=word):
        fastattn.create_block_mask(*arguments)


@pytest.mark.parametrize("block_size", [0, (4,), (4, 0), (1, 2, 3), 2.5])
def test_create_block_mask_checks_the_block_size(block_size):
    with pytest.raises((ValueError, TypeError), match="block_size"):
        fastattn.create_block_mask(prefix_lm, (2, 3), 4, 5, block_size=block_size)
