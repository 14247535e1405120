"""Gradients: fastattn's fused backward against the reference backward, and the
reference against central finite differences of the forward."""

import numpy as np
import pytest
from conftest import (FASTATTN, REFERENCE, assert_gradients_match_reference,
                      forward_and_backward, random_inputs)

import fastattn
import reference
from fastattn._dispatch.tiling import BACKWARD_BLOCK_K as BLOCK_K
from fastattn._dispatch.tiling import BACKWARD_BLOCK_Q as BLOCK_Q
from fastattn._dispatch.tiling import BACKWARD_MIN_TASKS as MIN_TASKS
from fastattn._dispatch.tiling import choose_key_groups




@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (1, BLOCK_K + 1), (BLOCK_Q - 1, BLOCK_K),
                                           (BLOCK_Q + 1, BLOCK_K - 1), (2 * BLOCK_Q + 3, 37)])
def test_lengths_around_block_sizes(rng, q_len, kv_len, dtype):
    query, key, value = random_inputs(rng, (2, q_len, 16), (2, kv_len, 16), 8, dtype)
    assert_gradients_match_reference(rng, query, key, value)


# Several key blocks: the keys are dealt to groups (block g, g + G, ...) that add
# their shares of dQ separately. Each option must reach every group's blocks.
GROUP_OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "causal-bottom-right": dict(causal=True, causal_alignment="bottom_right"),
    "window-across-blocks": dict(window=(BLOCK_K + 7, 3)),
    "kv-lengths": dict(kv_lengths=[3 * BLOCK_K + 2, BLOCK_K - 1]),
}


@pytest.mark.parametrize("q_len", [1, BLOCK_Q + 5])
@pytest.mark.parametrize("options", list(GROUP_OPTIONS.values()), ids=list(GROUP_OPTIONS))
def test_key_groups(rng, options, q_len):
    kv_len = 3 * BLOCK_K + 5
    assert choose_key_groups(2, kv_len) == 4
    query, key, value = random_inputs(rng, (2, q_len, 16), (2, kv_len, 16), 8, np.float64)
    assert_gradients_match_reference(rng, query, key, value, **options)


@pytest.mark.parametrize("n_batch, kv_len, groups", [
    (1, 0, 1), (1, BLOCK_K, 1), (1, BLOCK_K + 1, 2), (1, 100 * BLOCK_K, MIN_TASKS),
    (3, 100 * BLOCK_K, -(-MIN_TASKS // 3)), (MIN_TASKS, 100 * BLOCK_K, 1)])
def test_key_groups_fill_the_tasks(n_batch, kv_len, groups):
    assert choose_key_groups(n_batch, kv_len) == groups


@pytest.mark.parametrize("head_dim, value_dim", [(1, 1), (3, 5), (64, 64), (128, 32)])
def test_head_and_value_dims(rng, head_dim, value_dim):
    query, key, value = random_inputs(rng, (2, 40, head_dim), (2, 70, head_dim), value_dim,
                                      np.float32)
    assert_gradients_match_reference(rng, query, key, value)


OPTIONS = {
    "causal": dict(causal=True),
    "causal-bottom-right": dict(causal=True, causal_alignment="bottom_right"),
    "window": dict(window=(20, 5)),
    "window-causal-bottom-right": dict(window=(30, 0), causal=True,
                                       causal_alignment="bottom_right"),
    "kv-lengths": dict(kv_lengths=[0, 90]),
    "scale": dict(scale=-0.4),
}


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_option(rng, options, dtype):
    query, key, value = random_inputs(rng, (2, 3, 150, 16), (2, 3, 140, 16), 8, dtype)
    assert_gradients_match_reference(rng, query, key, value, **options)


@pytest.mark.parametrize("mask_shape", [(140,), (150, 1), (2, 1, 150, 140), (3, 150, 140)])
def test_mask_and_bias(rng, mask_shape):
    query, key, value = random_inputs(rng, (2, 3, 150, 8), (2, 3, 140, 8))
    mask = rng.random(mask_shape) < 0.7
    bias = np.where(rng.random((150, 140)) < 0.1, -np.inf, rng.standard_normal((150, 140)))
    assert_gradients_match_reference(rng, query, key, value, mask, bias=bias)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grouped_query_heads_sum_their_group(rng, dtype):
    query, key, value = random_inputs(rng, (2, 8, 70, 16), (2, 2, 90, 16), 8, dtype)
    grad_query, grad_key, grad_value = assert_gradients_match_reference(
        rng, query, key, value, enable_gqa=True, causal=True)
    assert grad_key.shape == (2, 2, 90, 16) and grad_value.shape == (2, 2, 90, 8)


def test_broadcast_batch_dims_are_summed_back(rng):
    query = rng.standard_normal((2, 1, 30, 4))  # (2, 1, Lq, Dk) broadcast over heads
    key = rng.standard_normal((1, 3, 40, 4))  # (1, 3, Lk, Dk) broadcast over batch
    value = rng.standard_normal((40, 5))  # (Lk, Dv) broadcast over everything
    grads = assert_gradients_match_reference(rng, query, key, value)
    assert [g.shape for g in grads] == [query.shape, key.shape, value.shape]
    # value is shared by every batch entry: its gradient is the sum of theirs
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True)
    grad_out = np.ones_like(out)
    full_value = np.broadcast_to(value, (2, 3, 40, 5)).copy()
    per_entry = fastattn.scaled_dot_product_attention_backward(
        grad_out, query, key, full_value, out, lse)[2]  # (2, 3, Lk, Dv)
    shared = fastattn.scaled_dot_product_attention_backward(
        grad_out, query, key, value, out, lse)[2]  # (Lk, Dv)
    np.testing.assert_allclose(shared, per_entry.sum(axis=(0, 1)), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_option_at_once(rng, dtype):
    query, key, value = random_inputs(rng, (2, 4, 300, 16), (2, 2, 200, 16), 8, dtype)
    mask = rng.random((2, 1, 300, 200)) < 0.9
    assert_gradients_match_reference(
        rng, query, key, value, mask, bias=rng.standard_normal((300, 200)), causal=True,
        causal_alignment="bottom_right", window=(150, 20), kv_lengths=[180, 200], scale=0.3,
        enable_gqa=True)


def test_rows_that_see_no_key_have_zero_gradients(rng):
    query, key, value = random_inputs(rng, (6, 4), (5, 4), 3)
    mask = np.ones((6, 5), bool)
    mask[[1, 4]] = False
    grad_query, grad_key, grad_value = assert_gradients_match_reference(rng, query, key, value,
                                                                        mask)
    assert (grad_query[[1, 4]] == 0).all()
    # keys no query can see get no gradient either
    grad_query, grad_key, grad_value = assert_gradients_match_reference(
        rng, query, key, value, kv_lengths=[3])
    assert (grad_key[3:] == 0).all() and (grad_value[3:] == 0).all()


@pytest.mark.parametrize("dtype, out_dtype", [(np.float16, np.float16), (np.int32, np.float64)])
def test_promoted_dtypes(rng, dtype, out_dtype):
    query, key, value = (np.round(array * 2).astype(dtype)
                         for array in random_inputs(rng, (2, 9, 4), (2, 13, 4)))
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True)
    grads = fastattn.scaled_dot_product_attention_backward(np.ones_like(out), query, key, value,
                                                           out, lse)
    assert all(g.dtype == out_dtype for g in grads)


def test_empty_sizes(rng):
    query, key, value = random_inputs(rng, (2, 0, 4), (2, 5, 4), 3)
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True)
    grads = fastattn.scaled_dot_product_attention_backward(out, query, key, value, out, lse)
    assert [g.shape for g in grads] == [query.shape, key.shape, value.shape]
    assert not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("backward", [FASTATTN[1], REFERENCE[1]], ids=["fastattn", "reference"])
def test_bad_forward_results_are_refused(rng, backward):
    query, key, value = random_inputs(rng, (2, 5, 4), (2, 6, 4), 3)
    out, lse = FASTATTN[0](query, key, value, return_lse=True)
    with pytest.raises(ValueError, match=r"grad_out.*\(2, 5, 3\)"):
        backward(out[:, :4], query, key, value, out, lse)
    with pytest.raises(ValueError, match=r"lse.*\(2, 5\)"):
        backward(out, query, key, value, out, lse[:, None])
    with pytest.raises(TypeError, match="out"):
        backward(out, query, key, value, out.astype(complex), lse)


@pytest.mark.parametrize("q_shape, kv_shape", [
    ((4, 4, 300, 32), (4, 4, 400, 32)),  # one key group per entry
    ((1, 2, 300, 32), (1, 2, 1100, 32)),  # several key groups per entry
])
def test_results_identical_for_every_thread_count(rng, blas_backend, q_shape, kv_shape):
    import numba

    query, key, value = random_inputs(rng, q_shape, kv_shape, dtype=np.float32)
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, causal=True,
                                                     return_lse=True)
    default = fastattn.get_num_threads()
    results = []
    try:
        for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            fastattn.set_num_threads(threads)
            results.append(fastattn.scaled_dot_product_attention_backward(
                out, query, key, value, out, lse, causal=True))
    finally:
        fastattn.set_num_threads(default)
    for grads in results[1:]:
        for g, first in zip(grads, results[0]):
            np.testing.assert_array_equal(g, first)


# ---------------------------------------------------------------- finite differences

FD_OPTIONS = {
    "plain": {},
    "mask": dict(mask=np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], bool)),
    "bias": dict(bias=np.array([[0.5, -np.inf, 0.1, -0.3]])),
    "causal": dict(causal=True),
    "causal-bottom-right": dict(causal=True, causal_alignment="bottom_right"),
    "window": dict(window=(1, 0)),
    "kv-lengths": dict(kv_lengths=[2, 4]),
    "scale": dict(scale=1.7),
    "gqa": dict(enable_gqa=True),
}


@pytest.mark.parametrize("options", list(FD_OPTIONS.values()), ids=list(FD_OPTIONS))
def test_reference_against_finite_differences(options):
    """Central differences of sum(out * G) in float64 on tiny shapes, every option."""
    rng = np.random.default_rng(7)
    options = dict(options)
    mask = options.pop("mask", None)
    kv_heads = 1 if options.get("enable_gqa") else 2
    query = rng.standard_normal((2, 2, 3, 2))  # (B, H, Lq=3, Dk=2)
    key = rng.standard_normal((2, kv_heads, 4, 2))  # (B, Hkv, Lk=4, Dk)
    value = rng.standard_normal((1, kv_heads, 4, 3))  # (1, Hkv, Lk, Dv=3) broadcast batch
    grad_out = rng.standard_normal((2, 2, 3, 3))  # (B, H, Lq, Dv)

    def loss(q, k, v):
        return (reference.scaled_dot_product_attention(q, k, v, mask, **options) * grad_out).sum()

    analytic = forward_and_backward(REFERENCE, query, key, value, mask, grad_out, **options)
    step = 1e-6
    for position, (array, gradient) in enumerate(zip((query, key, value), analytic)):
        numeric = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            plus, minus = [query, key, value], [query, key, value]
            shifted = array.copy()
            shifted[index] += step
            plus[position] = shifted
            shifted = array.copy()
            shifted[index] -= step
            minus[position] = shifted
            numeric[index] = (loss(*plus) - loss(*minus)) / (2 * step)
        np.testing.assert_allclose(gradient, numeric, atol=1e-7, rtol=1e-6)
