"""Prepared decoding steps (fastattn._dispatch.decode_steps): a step prepared once per
signature gives, for every key length, bitwise what fastattn.scaled_dot_product_attention
gives for the same call; calls the decode kernel does not take get no step; a call the
checks refuse raises its own error."""

import numpy as np
import pytest

import fastattn
from fastattn._dispatch import decode_steps
from fastattn._dispatch.tiling import DECODE_BLOCK_K as BLOCK_K

try:
    from ml_dtypes import bfloat16
except ImportError:  # pragma: no cover - fastattn[half] not installed
    bfloat16 = None

# (B, Hq, Hkv, Lq): grouped-query decoding (folded), multi-head, one head, a batch, and
# a few query rows per head (speculative decoding; not folded)
HEADS = [(1, 8, 2, 1), (2, 4, 4, 1), (1, 1, 1, 1), (3, 6, 2, 1), (2, 2, 2, 3)]
# one key, one below, at and past a block, several spans of keys
KV_LENGTHS = [1, BLOCK_K - 1, BLOCK_K, BLOCK_K + 1, 1040, 4097]
OPTIONS = {
    "plain": {},
    "causal-bottom-right": dict(causal=True, causal_alignment="bottom_right"),
    "softcap-scale": dict(softcap=3.0, scale=0.7),
    "window": dict(window=(BLOCK_K + 3, 0), causal=True, causal_alignment="bottom_right"),
}
DTYPES = [np.float32, np.float64, np.float16] + ([bfloat16] if bfloat16 is not None else [])


def inputs(batch, q_heads, kv_heads, q_len, kv_len, dtype, head_dim=64, value_dim=64, seed=0):
    rng = np.random.default_rng(seed)
    query = rng.standard_normal((batch, q_heads, q_len, head_dim)).astype(dtype)
    key = rng.standard_normal((batch, kv_heads, kv_len, head_dim)).astype(dtype)
    value = rng.standard_normal((batch, kv_heads, kv_len, value_dim)).astype(dtype)
    return query, key, value


def keywords_for(options, q_heads, kv_heads):
    return dict(options, enable_gqa=q_heads != kv_heads)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: np.dtype(dtype).name)
@pytest.mark.parametrize("option_name", sorted(OPTIONS))
@pytest.mark.parametrize("batch, q_heads, kv_heads, q_len", HEADS)
def test_step_is_bitwise_the_general_path(batch, q_heads, kv_heads, q_len, option_name, dtype):
    keywords = keywords_for(OPTIONS[option_name], q_heads, kv_heads)
    steps = set()
    for kv_len in KV_LENGTHS:  # one step serves every key length of a decoding loop
        query, key, value = inputs(batch, q_heads, kv_heads, q_len, kv_len, dtype,
                                   seed=kv_len)
        step = decode_steps.decode_step(query, key, value, keywords)
        assert step is not None
        steps.add(step)
        got = step(query, key, value)
        expected = fastattn.scaled_dot_product_attention(query, key, value, **keywords)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))
    assert len(steps) == 1


def test_value_dim_differs_from_key_dim():
    keywords = keywords_for({}, 8, 2)
    for kv_len in (3, 300):
        query, key, value = inputs(1, 8, 2, 1, kv_len, np.float32, head_dim=16, value_dim=24)
        step = decode_steps.decode_step(query, key, value, keywords)
        np.testing.assert_array_equal(
            step(query, key, value),
            fastattn.scaled_dot_product_attention(query, key, value, **keywords))


def test_nan_and_layout_as_the_general_path():
    """A NaN key makes the outputs NaN as the general path does; a key cache that is a
    non-contiguous view (a slice of a larger buffer) is read as it is given."""
    keywords = keywords_for(OPTIONS["causal-bottom-right"], 8, 2)
    query, key, value = inputs(1, 8, 2, 1, 700, np.float32)
    key[0, 1, 333, 5] = np.nan
    buffer = np.zeros((1, 2, 1024, 64), np.float32)  # a cache with room to grow
    buffer[:, :, :700] = value
    value = buffer[:, :, :700]
    step = decode_steps.decode_step(query, key, value, keywords)
    got = step(query, key, value)
    expected = fastattn.scaled_dot_product_attention(query, key, value, **keywords)
    assert np.isnan(got[0, 4:]).all() and not np.isnan(got[0, :4]).any()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("case, keywords, shapes", [
    ("too many rows per block", {}, ((1, 2, 9, 8), (1, 2, 40, 8))),
    ("top-left causal", dict(causal=True), ((1, 4, 1, 8), (1, 2, 40, 8))),
    ("kv_lengths", dict(kv_lengths=[20]), ((1, 2, 1, 8), (1, 2, 40, 8))),
    ("dropout", dict(dropout_p=0.1, dropout_seed=0), ((1, 2, 1, 8), (1, 2, 40, 8))),
    ("alibi", dict(alibi_slopes=[0.5, 0.25]), ((1, 2, 1, 8), (1, 2, 40, 8))),
])
def test_calls_the_decode_kernel_does_not_take_get_no_step(case, keywords, shapes):
    query_shape, key_shape = shapes
    rng = np.random.default_rng(0)
    query = rng.standard_normal(query_shape).astype(np.float32)
    key = rng.standard_normal(key_shape).astype(np.float32)
    keywords = dict(keywords, enable_gqa=query_shape[1] != key_shape[1])
    assert decode_steps.decode_step(query, key, key, keywords) is None, case


def test_key_and_value_lengths_differ():
    query, key, value = inputs(1, 2, 2, 1, 10, np.float32)
    assert decode_steps.decode_step(query, key, value[:, :, :9], {}) is None


@pytest.mark.parametrize("query_shape, key_shape, message", [
    ((1, 8, 1, 32), (1, 2, 50, 64), "Dk"),
    ((1, 6, 1, 64), (1, 4, 50, 64), "enable_gqa|heads"),
])
def test_a_refused_call_raises_its_own_error(query_shape, key_shape, message):
    rng = np.random.default_rng(0)
    query = rng.standard_normal(query_shape).astype(np.float32)
    key = rng.standard_normal(key_shape).astype(np.float32)
    with pytest.raises(ValueError, match=message) as general:
        fastattn.scaled_dot_product_attention(query, key, key, enable_gqa=True)
    with pytest.raises(ValueError) as stepped:
        decode_steps.decode_step(query, key, key, dict(enable_gqa=True))
    assert str(stepped.value) == str(general.value)
