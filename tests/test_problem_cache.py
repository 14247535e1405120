"""The shape-keyed shortcut of check_attention (plain ndarrays, no per-call operands)
builds the same problem, and refuses the same arguments with the same messages, as
the full checks; arrays of a shape seen before are never mixed up."""

import numpy as np
import pytest

import fastattn
import reference
from fastattn._contract.options import AttentionOptions, options_from
from fastattn._contract.problem import _checked_attention, _plain_problem_fields, check_attention


def full_checks(query, key, value, causal=False, causal_alignment="top_left",
                enable_gqa=False):
    options = AttentionOptions(causal=causal, causal_alignment=causal_alignment,
                               enable_gqa=enable_gqa)
    return _checked_attention(query, key, value, None, options)


@pytest.mark.parametrize("q_shape, kv_shape, dtype, causal, alignment, gqa", [
    ((1, 1, 16, 8), (1, 1, 16, 8), np.float32, False, "top_left", False),
    ((2, 3, 5, 4), (2, 3, 7, 4), np.float64, True, "bottom_right", False),
    ((4, 1), (9, 1), np.float16, True, "top_left", False),
    ((2, 8, 1, 16), (2, 2, 33, 16), np.float32, False, "bottom_right", True),
    ((3, 1, 5, 4), (1, 2, 6, 4), np.int64, False, "top_left", False),  # broadcast batch
    ((0, 2, 5, 4), (0, 2, 6, 4), np.float32, True, "top_left", False),  # empty batch
])
def test_shortcut_builds_the_full_checks_problem(rng, q_shape, kv_shape, dtype, causal,
                                                 alignment, gqa):
    query = rng.standard_normal(q_shape).astype(dtype)
    key = rng.standard_normal(kv_shape).astype(dtype)
    value = rng.standard_normal(kv_shape).astype(dtype)
    for _ in range(2):  # computed, then looked up
        fast = check_attention(query, key, value, None, options_from(dict(
            causal=causal, causal_alignment=alignment, enable_gqa=gqa)))
        full = full_checks(query, key, value, causal, alignment, gqa)
        for name in type(full).__slots__:
            got, expected = getattr(fast, name), getattr(full, name)
            if name == "options":
                assert got.as_keywords() == expected.as_keywords()
            elif isinstance(expected, np.ndarray):
                assert got is expected, name
            else:
                assert got == expected and type(got) is type(expected), name


@pytest.mark.parametrize("q_shape, kv_shape, v_shape, dtype, options", [
    ((2, 16, 8), (2, 16, 4), (2, 16, 8), np.float32, {}),  # Dk differs
    ((2, 16, 8), (2, 16, 8), (2, 15, 8), np.float32, {}),  # Lk of key vs value
    ((2, 16, 8), (3, 16, 8), (3, 16, 8), np.float32, {}),  # batch does not broadcast
    ((16,), (16, 8), (16, 8), np.float32, {}),  # 1-D query
    ((2, 16, 8), (2, 16, 8), (2, 16, 8), np.complex64, {}),  # complex
    ((2, 16, 8), (2, 16, 8), (2, 16, 8), np.float32, {"causal_alignment": "middle"}),
    ((1, 6, 4, 8), (1, 4, 4, 8), (1, 4, 4, 8), np.float32, {"enable_gqa": True}),
])
def test_shortcut_refuses_what_the_full_checks_refuse(q_shape, kv_shape, v_shape, dtype,
                                                      options):
    query, key, value = (np.zeros(shape, dtype) for shape in (q_shape, kv_shape, v_shape))
    with pytest.raises((ValueError, TypeError)) as full:
        full_checks(query, key, value, **dict(dict(causal=False), **options))
    for _ in range(2):  # an exception is never cached as a result
        with pytest.raises(full.type) as fast:
            fastattn.scaled_dot_product_attention(query, key, value, **options)
        assert str(fast.value) == str(full.value)


def test_same_shape_new_arrays_new_results(rng):
    shape = (1, 2, 16, 8)
    for _ in range(3):  # one cache entry, three sets of arrays
        query, key, value = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
        out = fastattn.scaled_dot_product_attention(query, key, value, causal=True)
        expected = reference.scaled_dot_product_attention(
            query.astype(np.float64), key.astype(np.float64), value.astype(np.float64),
            causal=True)
        np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)
        assert not np.shares_memory(out, query)


def test_shortcut_only_for_plain_arguments(rng):
    """Subclasses and per-call operands take the full checks; flags are normalised by
    the options object (``np.bool_(True)`` and ``True`` make the same options)."""
    query = rng.standard_normal((1, 1, 4, 8))
    _plain_problem_fields.cache_clear()
    check_attention(query.view(np.ma.MaskedArray), query, query)
    check_attention(query, query, query, None, AttentionOptions(kv_lengths=np.array([3])))
    check_attention(query, query, query, np.ones((4, 4), bool))
    assert _plain_problem_fields.cache_info().currsize == 0
    check_attention(query, query, query, None, options_from(dict(causal=True)))
    assert _plain_problem_fields.cache_info().currsize == 1
    problem = check_attention(query, query, query, None, options_from(dict(causal=np.bool_(1))))
    assert problem.causal is True and _plain_problem_fields.cache_info().currsize == 1


def test_scalar_options_take_the_shortcut(rng):
    """scale, window and softcap are scalars: decoding loops (transformers passes the
    scale) take the shortcut, with the same problem as the full checks."""
    query = rng.standard_normal((1, 2, 1, 8))
    key = rng.standard_normal((1, 2, 5, 8))
    _plain_problem_fields.cache_clear()
    keywords = dict(scale=0.5, window=(2, 0), softcap=20.0, causal=True,
                    causal_alignment="bottom_right")
    fast = check_attention(query, key, key, None, options_from(keywords))
    assert _plain_problem_fields.cache_info().currsize == 1
    full = _checked_attention(query, key, key, None, AttentionOptions(**keywords))
    assert (fast.scale, fast.diag_offset, fast.window, fast.softcap) == (
        full.scale, full.diag_offset, full.window, full.softcap) == (0.5, 4, (2, 0), 20.0)
    out = fastattn.scaled_dot_product_attention(query, key, key, **keywords)
    expected = reference.scaled_dot_product_attention(query, key, key, **keywords)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
