"""Hypothesis: random combinations of shapes and options, fastattn against the reference."""

import numpy as np
from conftest import assert_close_to_reference, assert_gradients_match_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastattn._dispatch.tiling import FORWARD_BLOCK_K as BLOCK_K
from fastattn._dispatch.tiling import FORWARD_BLOCK_Q as BLOCK_Q


@st.composite
def attention_problems(draw):
    """A random call: lengths around the block sizes, broadcast batch dims, every option."""
    lengths = st.sampled_from([1, 2, 7, BLOCK_Q - 1, BLOCK_Q + 1, BLOCK_K, BLOCK_K + 1])
    q_len = draw(lengths)
    # 2 * BLOCK_K + 3 keys with few query blocks: the keys are split across tasks
    kv_len = draw(st.one_of(lengths, st.just(2 * BLOCK_K + 3)))
    head_dim, value_dim = draw(st.sampled_from([1, 4, 16])), draw(st.sampled_from([1, 3, 8]))
    batch, kv_heads = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    q_heads = kv_heads * draw(st.sampled_from([1, 2]))
    gqa = q_heads != kv_heads
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    query = rng.standard_normal((batch, q_heads, q_len, head_dim)).astype(dtype)
    key = rng.standard_normal((1 if draw(st.booleans()) else batch, kv_heads, kv_len, head_dim))
    value = rng.standard_normal(key.shape[:-1] + (value_dim,))
    # without weights, long keys split across tasks and GQA decoding folds heads
    options = dict(return_weights=draw(st.booleans()), return_lse=True, enable_gqa=gqa,
                   causal=draw(st.booleans()),
                   causal_alignment=draw(st.sampled_from(["top_left", "bottom_right"])))
    mask = None
    if draw(st.booleans()):
        mask_rows = draw(st.sampled_from([1, q_len]))
        mask = rng.random((batch, 1, mask_rows, kv_len)) < draw(st.sampled_from([0.1, 0.7, 1.0]))
    if draw(st.booleans()):
        options["bias"] = np.where(rng.random((q_len, kv_len)) < 0.1, -np.inf,
                                   rng.standard_normal((q_len, kv_len)))
    if draw(st.booleans()):
        options["window"] = (draw(st.integers(0, 600)), draw(st.integers(0, 70)))
    if draw(st.booleans()):
        options["kv_lengths"] = rng.integers(0, kv_len + 1, size=batch)
    if draw(st.booleans()):
        options["scale"] = draw(st.floats(-2, 2))
    return query, key.astype(dtype), value.astype(dtype), mask, options


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_problems())
def test_random_problems_match_reference(problem):
    query, key, value, mask, options = problem
    assert_close_to_reference(query, key, value, mask, **options)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_problems())
def test_random_problems_gradients_match_reference(problem):
    query, key, value, mask, options = problem
    options = {name: option for name, option in options.items()
               if name not in ("return_weights", "return_lse")}
    rng = np.random.default_rng(0)
    assert_gradients_match_reference(rng, query, key, value, mask, **options)
