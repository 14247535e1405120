"""fastattn's fused forward kernel against the float64 NumPy reference."""

import numpy as np
import pytest
from conftest import assert_close_to_reference, random_inputs

import fastattn
from fastattn._dispatch.tiling import FORWARD_BLOCK_K as BLOCK_K
from fastattn._dispatch.tiling import FORWARD_BLOCK_Q as BLOCK_Q
from fastattn._dispatch.tiling import FORWARD_MIN_TASKS as MIN_TASKS
from fastattn._dispatch.tiling import choose_block_q, choose_split_len

# Awkward lengths: 1, and one below, at and one past each block size.
Q_LENGTHS = [1, BLOCK_Q - 1, BLOCK_Q, BLOCK_Q + 1]
KV_LENGTHS = [1, BLOCK_K - 1, BLOCK_K, BLOCK_K + 1, 2 * BLOCK_K + 3]
DTYPES = [np.float32, np.float64]
ALL_OUTPUTS = dict(return_weights=True, return_lse=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_len", KV_LENGTHS)
@pytest.mark.parametrize("q_len", Q_LENGTHS)
def test_lengths_around_block_sizes(rng, q_len, kv_len, dtype):
    query, key, value = random_inputs(rng, (2, q_len, 16), (2, kv_len, 16), dtype=dtype)
    assert_close_to_reference(query, key, value, **ALL_OUTPUTS)


@pytest.mark.parametrize("q_len", [BLOCK_Q - 1, BLOCK_Q, BLOCK_Q + 1])
def test_full_size_query_blocks(rng, q_len):
    """Enough batch entries that query blocks keep their full size."""
    batch = 16
    assert choose_block_q(batch, q_len) == BLOCK_Q
    query, key, value = random_inputs(rng, (batch, q_len, 8), (batch, BLOCK_K + 1, 8),
                                      dtype=np.float32)
    assert_close_to_reference(query, key, value, causal=True, **ALL_OUTPUTS)


@pytest.mark.parametrize("batch, q_len", [(1, 1), (2, 63), (1, 4096), (64, 4096)])
def test_query_blocks_leave_enough_tasks(batch, q_len):
    block_q = choose_block_q(batch, q_len)
    assert 16 <= block_q <= BLOCK_Q
    assert block_q == BLOCK_Q or batch * -(-q_len // block_q) >= 16 or block_q == 16


@pytest.mark.parametrize("n_tasks", [1, 3, MIN_TASKS - 1, MIN_TASKS, 40])
@pytest.mark.parametrize("kv_len", [0, 1, BLOCK_K, BLOCK_K + 1, 3 * BLOCK_K, 40 * BLOCK_K + 7])
def test_key_spans_are_whole_blocks_and_fill_the_tasks(n_tasks, kv_len):
    split_len = choose_split_len(n_tasks, kv_len)
    n_key_blocks = -(-kv_len // BLOCK_K)
    if n_tasks >= MIN_TASKS or n_key_blocks < 2:
        assert split_len == kv_len
    else:
        n_splits = -(-kv_len // split_len)
        assert split_len % BLOCK_K == 0 and 2 <= n_splits <= n_key_blocks
        assert n_tasks * n_splits >= MIN_TASKS or split_len == BLOCK_K


# Few query blocks and many keys: the keys are split into spans whose results are
# merged by log-sum-exp. Each option must see the right keys in every span.
SPLIT_OPTIONS = {
    "plain": {},
    "causal-top-left": dict(causal=True),
    "causal-bottom-right": dict(causal=True, causal_alignment="bottom_right"),
    "window-inside-one-span": dict(window=(5, 3), causal_alignment="bottom_right"),
    "window-across-spans": dict(window=(BLOCK_K + 9, 0), causal=True,
                                causal_alignment="bottom_right"),
    "kv-lengths": dict(kv_lengths=[3 * BLOCK_K + 4, BLOCK_K - 2, 0]),
    "mask": "mask",
    "bias": "bias",
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("option", sorted(SPLIT_OPTIONS))
def test_keys_split_across_tasks(rng, option, q_len, dtype):
    kv_len = 3 * BLOCK_K + 5
    assert choose_split_len(3 * 2, kv_len) < kv_len  # this shape does split
    query, key, value = random_inputs(rng, (3, 2, q_len, 16), (3, 2, kv_len, 16), 8, dtype)
    options, mask = SPLIT_OPTIONS[option], None
    if option == "mask":  # random, one head's rows see nothing at all
        mask = rng.random((3, 2, q_len, kv_len)) < 0.3  # (B, H, Lq, Lk)
        mask[1, 0] = False
        options = {}
    elif option == "bias":  # finite, with whole spans hidden by -inf
        bias = rng.standard_normal((3, 1, q_len, kv_len))  # (B, 1, Lq, Lk)
        bias[0, :, :, :2 * BLOCK_K] = -np.inf
        options = dict(bias=bias)
    out, lse = assert_close_to_reference(query, key, value, mask, return_lse=True, **options)
    assert not np.isnan(out).any() and not np.isnan(lse).any()


def test_split_keys_agree_with_one_task_per_row(rng):
    """Asking for the weights keeps each row in one task; the merged result agrees."""
    query, key, value = random_inputs(rng, (1, 2, 1, 64), (1, 2, 4 * BLOCK_K, 64),
                                      dtype=np.float32)
    split_out, split_lse = fastattn.scaled_dot_product_attention(
        query, key, value, return_lse=True)
    whole_out, _, whole_lse = fastattn.scaled_dot_product_attention(
        query, key, value, return_weights=True, return_lse=True)
    np.testing.assert_allclose(split_out, whole_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split_lse, whole_lse, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, value_dim", [(1, 1), (3, 5), (8, 64), (64, 8), (128, 128), (256, 256)])
def test_head_and_value_dims(rng, head_dim, value_dim, dtype):
    query, key, value = random_inputs(rng, (3, 37, head_dim), (3, 70, head_dim), value_dim, dtype)
    assert_close_to_reference(query, key, value, return_lse=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_sequences_keep_contract_accuracy(rng, dtype):
    """L = 4096, D = 64: the longest rows accumulate over many key blocks."""
    query, key, value = random_inputs(rng, (1, 4096, 64), (1, 4096, 64), dtype=dtype)
    assert_close_to_reference(query[:, ::16], key, value, return_lse=True)


def test_unbatched_two_dimensional_inputs(rng):
    query, key, value = random_inputs(rng, (5, 6), (7, 6), 4)
    out, weights, lse = assert_close_to_reference(query, key, value, **ALL_OUTPUTS)
    assert out.shape == (5, 4) and weights.shape == (5, 7) and lse.shape == (5,)


@pytest.mark.parametrize(
    "mask_shape",
    [(7,), (1, 7), (5, 1), (5, 7), (2, 1, 1, 7), (1, 3, 5, 7), (2, 3, 5, 7), (3, 1, 1)],
    ids=lambda shape: "x".join(map(str, shape)),
)
def test_mask_broadcast_shapes(rng, mask_shape):
    query, key, value = random_inputs(rng, (2, 3, 5, 4), (2, 3, 7, 4))
    mask = rng.random(mask_shape) < 0.6
    assert_close_to_reference(query, key, value, mask, **ALL_OUTPUTS)


@pytest.mark.parametrize("bias_shape", [(7,), (5, 1), (5, 7), (3, 5, 7), (2, 1, 5, 7)],
                         ids=lambda shape: "x".join(map(str, shape)))
def test_bias_broadcast_shapes(rng, bias_shape):
    query, key, value = random_inputs(rng, (2, 3, 5, 4), (2, 3, 7, 4))
    bias = rng.standard_normal(bias_shape)
    bias[rng.random(bias_shape) < 0.3] = -np.inf
    assert_close_to_reference(query, key, value, bias=bias, **ALL_OUTPUTS)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (1, 200), (70, 70), (200, 70), (70, 200), (129, 257)])
def test_causal(rng, q_len, kv_len, alignment):
    query, key, value = random_inputs(rng, (2, q_len, 8), (2, kv_len, 8))
    assert_close_to_reference(query, key, value, causal=True, causal_alignment=alignment,
                              **ALL_OUTPUTS)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("window", [(0, 0), (3, 0), (0, 5), (40, 2), (1000, 0), (0, 1000)])
@pytest.mark.parametrize("causal", [False, True])
def test_window(rng, window, causal, alignment):
    query, key, value = random_inputs(rng, (2, 150, 8), (2, 290, 8))
    assert_close_to_reference(query, key, value, window=window, causal=causal,
                              causal_alignment=alignment, **ALL_OUTPUTS)


@pytest.mark.parametrize("lengths", [[0, 0], [1, 300], [129, 128], [300, 0]])
def test_kv_lengths(rng, lengths):
    query, key, value = random_inputs(rng, (2, 3, 70, 8), (2, 3, 300, 8))
    assert_close_to_reference(query, key, value, kv_lengths=np.array(lengths), **ALL_OUTPUTS)


@pytest.mark.parametrize("scale", [0.0, -0.7, 3.0, 1e-3])
def test_scale(rng, scale):
    query, key, value = random_inputs(rng, (2, 40, 8), (2, 50, 8))
    assert_close_to_reference(query, key, value, scale=scale, **ALL_OUTPUTS)


def test_large_scores_do_not_overflow(rng):
    """Scores near 1e4 would overflow exp() without subtracting the row maximum."""
    query, key, value = random_inputs(rng, (1, 20, 8), (1, 300, 8))
    out, lse = assert_close_to_reference(query * 100, key * 100, value, return_lse=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()


@pytest.mark.parametrize("q_heads, kv_heads", [(8, 2), (8, 1), (6, 3), (4, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_query_attention(rng, q_heads, kv_heads, dtype):
    query, key, value = random_inputs(rng, (2, q_heads, 33, 16), (2, kv_heads, 45, 16), 8, dtype)
    mask = rng.random((2, q_heads, 33, 45)) < 0.8
    assert_close_to_reference(query, key, value, mask, enable_gqa=True, causal=True,
                              **ALL_OUTPUTS)


# Decoding under GQA folds each group's query heads into the rows of one block
# where visibility cannot depend on the row; elsewhere it must not fold.
GQA_DECODE_OPTIONS = {
    "plain": ({}, True),
    "causal-bottom-right": (dict(causal=True, causal_alignment="bottom_right"), True),
    "kv-lengths": (dict(kv_lengths=[BLOCK_K + 20, 3, 0]), True),
    "causal-top-left": (dict(causal=True), False),
    "window": (dict(window=(40, 0), causal_alignment="bottom_right"), False),
    "mask": ("mask", False),
    "bias": ("bias", False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", sorted(GQA_DECODE_OPTIONS))
def test_grouped_query_decoding(rng, option, dtype):
    from fastattn._contract.options import AttentionOptions
    from fastattn._contract.problem import check_attention
    from fastattn._dispatch.layout import fold_query_groups

    query, key, value = random_inputs(rng, (3, 8, 1, 16), (3, 2, 2 * BLOCK_K + 9, 16), 8, dtype)
    options, folds = GQA_DECODE_OPTIONS[option]
    mask = None
    if options == "mask":  # differs per head: head 5 sees nothing
        mask = rng.random((3, 8, 1, key.shape[2])) < 0.5  # (B, Hq, 1, Lk)
        mask[:, 5] = False
        options = {}
    elif options == "bias":
        options = dict(bias=rng.standard_normal((1, 8, 1, key.shape[2])))  # (1, Hq, 1, Lk)
    problem = check_attention(query, key, value, mask, AttentionOptions(enable_gqa=True, **options))
    assert (fold_query_groups(problem) is not None) == folds
    assert_close_to_reference(query, key, value, mask, enable_gqa=True, **options,
                              **ALL_OUTPUTS)
    assert_close_to_reference(query, key, value, mask, enable_gqa=True, return_lse=True,
                              **options)


def test_grouped_query_decoding_with_heads_first(rng):
    """kv_lengths index the first batch axis; when that is the head axis, no folding."""
    from fastattn._contract.options import AttentionOptions
    from fastattn._contract.problem import check_attention
    from fastattn._dispatch.layout import fold_query_groups

    query, key, value = random_inputs(rng, (6, 1, 8), (2, 50, 8))
    lengths = np.array([50, 10, 0, 3, 49, 1])
    problem = check_attention(query, key, value, None,
                              AttentionOptions(enable_gqa=True, kv_lengths=lengths))
    assert fold_query_groups(problem) is None
    assert_close_to_reference(query, key, value, enable_gqa=True, kv_lengths=lengths,
                              **ALL_OUTPUTS)


def test_grouped_query_heads_read_their_group(rng):
    """Query head h must meet kv head h // group: compare with an explicit repeat."""
    query, key, value = random_inputs(rng, (1, 6, 9, 4), (1, 2, 9, 4))
    import fastattn

    grouped = fastattn.scaled_dot_product_attention(query, key, value, enable_gqa=True)
    repeated = fastattn.scaled_dot_product_attention(
        query, np.repeat(key, 3, axis=1), np.repeat(value, 3, axis=1))
    np.testing.assert_array_equal(grouped, repeated)


@pytest.mark.parametrize("q_shape, kv_shape", [
    ((2, 1, 9, 4), (1, 3, 11, 4)),  # both sides broadcast
    ((9, 4), (2, 3, 11, 4)),  # unbatched query against batched keys
    ((4, 2, 3, 9, 4), (3, 11, 4)),  # more batch dims on the query
])
def test_broadcast_batch_dims(rng, q_shape, kv_shape):
    query, key, value = random_inputs(rng, q_shape, kv_shape)
    assert_close_to_reference(query, key, value, **ALL_OUTPUTS)


def test_key_and_value_broadcast_differently(rng):
    query = rng.standard_normal((2, 3, 9, 4))  # (2, 3, Lq, Dk)
    key = rng.standard_normal((1, 3, 11, 4))  # (1, 3, Lk, Dk)
    value = rng.standard_normal((2, 1, 11, 6))  # (2, 1, Lk, Dv)
    assert_close_to_reference(query, key, value, **ALL_OUTPUTS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_option_at_once(rng, dtype):
    query, key, value = random_inputs(rng, (2, 4, 130, 32), (2, 2, 260, 32), 16, dtype)
    mask = rng.random((2, 1, 130, 260)) < 0.9
    bias = rng.standard_normal((4, 130, 260))
    assert_close_to_reference(
        query, key, value, mask, bias=bias, causal=True, causal_alignment="bottom_right",
        window=(100, 10), kv_lengths=[200, 260], scale=0.3, enable_gqa=True, **ALL_OUTPUTS)


def test_weights_and_lse_are_consistent(rng):
    import fastattn

    query, key, value = random_inputs(rng, (3, 40, 8), (3, 150, 8))
    out, weights, lse = fastattn.scaled_dot_product_attention(
        query, key, value, causal=True, **ALL_OUTPUTS)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(out, weights @ value, rtol=1e-10, atol=1e-12)
    scores = query @ key.swapaxes(-1, -2) / np.sqrt(8)  # (3, 40, 150)
    hidden = np.triu(np.ones((40, 150), bool), k=1)  # (40, 150) keys after each query
    expected_lse = np.log(np.where(hidden, 0.0, np.exp(scores)).sum(-1))  # (3, 40)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-12)
