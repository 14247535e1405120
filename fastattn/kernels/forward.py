"""Fused forward attention kernel: scaled, masked online softmax and weighted sum.

FlashAttention-2 loop order: query blocks outside (one ``prange`` task per batch
entry and query block), key/value blocks inside. Each task keeps a running row
maximum, a running row sum and a rescaled output accumulator, so no ``(Lq, Lk)``
matrix is ever built; extra memory is one ``(block_q, block_k)`` score block and one
``(block_q, Dv)`` accumulator per task.

Visibility (causal, window, kv_lengths, mask) is applied block by block by
:mod:`fastattn.kernels.masking`; key blocks that no query of a block can see are
never visited.
"""

import math

import numpy as np
from numba import njit, prange, types

from fastattn.kernels.config import (array_type, jit_helper, kernel_per_dtype,
                                     problem_argument_types)
from fastattn.kernels.masking import mask_scores, visible_range
from fastattn.kernels.vector_math import LN2, LOG2E, exp2, maximum

# Query rows per group on the partly visible strips (causal diagonal, window edges).
EDGE_ROWS = 64
# Key counts of the partly visible strips, and of the fully visible range before them,
# are kept to multiples of this, so the block products and the softmax loops see whole
# SIMD widths; the extra keys are masked.
ALIGN = 16


@jit_helper
def online_softmax_block(scores, row_max, row_sum, acc):
    """Fold one key block into the running softmax of each row (log2 units).

    ``scores`` ``(rows, cols)`` holds ``log2(e) * score`` (``-inf`` where hidden) and is
    overwritten with ``exp2(score - new_row_max)``, ready to multiply the values.
    ``row_max``, ``row_sum`` ``(rows,)`` and ``acc`` ``(rows, Dv)`` are rescaled by
    ``exp2(old_max - new_max)`` so every row stays relative to its latest maximum.
    """
    rows, cols = scores.shape
    for r in range(rows):
        block_max = row_max[r]
        for c in range(cols):
            block_max = maximum(block_max, scores[r, c])
        if block_max == -np.inf:  # nothing visible to this row yet
            scores[r, :] = 0.0
            continue
        block_sum = row_sum[r] - row_sum[r]  # a zero of the compute dtype
        for c in range(cols):
            p = exp2(scores[r, c] - block_max)
            scores[r, c] = p
            block_sum += p
        correction = exp2(row_max[r] - block_max)  # 0 when row_max was -inf
        row_sum[r] = row_sum[r] * correction + block_sum
        row_max[r] = block_max
        if correction != 1.0:
            for d in range(acc.shape[1]):
                acc[r, d] *= correction


@jit_helper
def attend_key_range(q_rows, row_start, key_first, key_last, keys, values, row_max, row_sum,
                     acc, block_k, must_mask, common_first, common_last, kv_stop,
                     diag_offset, reach_left, reach_right,
                     mask, mask_entry, mask_row_step, mask_col_step, has_mask,
                     bias, bias_entry, bias_row_step, bias_col_step, has_bias):
    """Fold keys ``[key_first, key_last)`` into the running softmax of some query rows.

    ``q_rows`` ``(rows, Dk)`` are queries ``row_start + r`` in log2 units; ``row_max``,
    ``row_sum`` ``(rows,)`` and ``acc`` ``(rows, Dv)`` are their running state, updated
    in place, one block of at most ``block_k`` keys at a time. Every row sees keys
    ``[common_first, common_last)`` structurally: blocks inside that range skip the
    visibility pass unless ``must_mask`` (a user mask or bias) asks for it.
    """
    for key_start in range(key_first, key_last, block_k):
        key_stop = min(key_start + block_k, key_last)
        scores = np.dot(q_rows, keys[key_start:key_stop].T)  # (rows, cols)
        if must_mask or key_start < common_first or key_stop > common_last:
            mask_scores(scores, row_start, key_start, kv_stop, diag_offset, reach_left,
                        reach_right, mask, mask_entry, mask_row_step, mask_col_step,
                        has_mask, bias, bias_entry, bias_row_step, bias_col_step,
                        has_bias, LOG2E)
        online_softmax_block(scores, row_max, row_sum, acc)  # scores -> probabilities
        acc += np.dot(scores, values[key_start:key_stop])  # (rows, Dv)


def _attention_forward(query, key, value, query_index, key_index, value_index,
                       mask, mask_index, mask_row_step, mask_col_step, has_mask,
                       bias, bias_index, bias_row_step, bias_col_step, has_bias,
                       kv_lengths, has_kv_lengths, diag_offset, reach_left, reach_right,
                       scale, block_q, block_k, split_len, out, lse, weights, return_weights,
                       split_out, split_lse):
    """Compute attention for every batch entry ``b`` of the flattened batch.

    Entry ``b`` reads ``query[query_index[b]]`` ``(Lq, Dk)``, ``key[key_index[b]]``
    ``(Lk, Dk)``, ``value[value_index[b]]`` ``(Lk, Dv)``, and when their flags are set
    ``mask[mask_index[b]]``, ``bias[bias_index[b]]`` and ``kv_lengths[b]``; it writes
    ``out[b]`` ``(Lq, Dv)``, ``lse[b]`` ``(Lq,)`` and, if ``return_weights``,
    ``weights[b]`` ``(Lq, Lk)`` (which must be zeroed).

    Scores are kept in log2 units (``log2(e) * scale * q.k``) so the softmax uses
    ``exp2``; the query block is scaled once, before its products with the keys.

    Split keys (for calls with too few query blocks to busy every thread, such as
    decoding): with ``split_len < Lk`` each task covers one query block and one span
    of ``split_len`` keys, writes that span's normalised output to
    ``split_out[s, b]`` ``(Lq, Dv)`` and its log2-sum-exp to ``split_lse[s, b]``
    ``(Lq,)``, and a second loop merges the spans weighted by ``exp2(split_lse)``.
    Otherwise ``split_out`` and ``split_lse`` are unused placeholders.
    """
    n_batch, q_len, value_dim = out.shape
    head_dim = query.shape[2]
    log2_scale = scale * LOG2E
    n_q_blocks = (q_len + block_q - 1) // block_q
    n_splits = max(1, (key.shape[1] + split_len - 1) // split_len)
    for task in prange(n_batch * n_q_blocks * n_splits):
        split = task % n_splits
        b = task // (n_q_blocks * n_splits)
        # prange gives each thread an equal contiguous share of tasks, but a causal
        # block near the top sees few keys: visit blocks in zigzag order (first, last,
        # second, second to last, ...) so every share mixes cheap and costly blocks.
        step = task // n_splits - b * n_q_blocks
        q_block_index = step // 2 if step % 2 == 0 else n_q_blocks - 1 - step // 2
        q_start = q_block_index * block_q
        q_stop = min(q_start + block_q, q_len)
        rows = q_stop - q_start
        kv_stop = kv_lengths[b] if has_kv_lengths else key.shape[1]
        mask_entry = mask_index[b] if has_mask else 0
        bias_entry = bias_index[b] if has_bias else 0
        query_rows = query[query_index[b]]  # (Lq, Dk)
        # Slicing with [i] or [i, a:b] (no trailing ':') keeps Numba's 'C' layout, so
        # np.dot reads the blocks in place instead of copying them.
        keys = key[key_index[b]]  # (Lk, Dk)
        values = value[value_index[b]]  # (Lk, Dv)
        q_block = np.empty((rows, head_dim), dtype=out.dtype)  # (rows, Dk) in log2 units
        for r in range(rows):
            for d in range(head_dim):
                q_block[r, d] = query_rows[q_start + r, d] * log2_scale

        # keys this task may read, keys of them that some row of the block may see,
        # and keys every row of the block sees
        span_first = split * split_len
        span_last = min(key.shape[1], span_first + split_len)
        first_key = visible_range(q_start, kv_stop, diag_offset, reach_left, reach_right)[0]
        last_key = visible_range(q_stop - 1, kv_stop, diag_offset, reach_left, reach_right)[1]
        first_key, last_key = max(first_key, span_first), min(last_key, span_last)
        common_first = visible_range(q_stop - 1, kv_stop, diag_offset, reach_left, reach_right)[0]
        common_last = visible_range(q_start, kv_stop, diag_offset, reach_left, reach_right)[1]

        row_max = np.full(rows, -np.inf, dtype=out.dtype)  # (rows,) running max, log2 units
        row_sum = np.zeros(rows, dtype=out.dtype)  # (rows,) running sum of exp2(s - row_max)
        acc = np.zeros((rows, value_dim), dtype=out.dtype)  # (rows, Dv) unnormalised output

        # 1. Keys every row of the block sees: full-size blocks, masked only for a
        #    user mask or bias.
        full_first, full_last = max(common_first, first_key), min(common_last, last_key)
        if full_last > full_first:  # whole multiples of ALIGN keys; the rest is a strip
            full_last = full_first + (full_last - full_first) // ALIGN * ALIGN
        attend_key_range(q_block, q_start, full_first, full_last, keys, values, row_max,
                         row_sum, acc, block_k, has_mask or has_bias, full_first, full_last,
                         kv_stop, diag_offset,
                         reach_left, reach_right, mask, mask_entry, mask_row_step,
                         mask_col_step, has_mask, bias, bias_entry, bias_row_step,
                         bias_col_step, has_bias)
        # 2. Keys only some rows see (the causal diagonal, window edges): groups of
        #    EDGE_ROWS rows, each over its own visible range, so little is computed
        #    only to be masked.
        for group_start in range(0, rows, EDGE_ROWS):
            group_stop = min(group_start + EDGE_ROWS, rows)
            group_first, group_common_last = visible_range(
                q_start + group_start, kv_stop, diag_offset, reach_left, reach_right)
            group_common_first, group_last = visible_range(
                q_start + group_stop - 1, kv_stop, diag_offset, reach_left, reach_right)
            group_first, group_last = max(group_first, first_key), min(group_last, last_key)
            # The strips left and right of part 1, widened outwards (away from part 1)
            # to whole multiples of ALIGN keys; masking hides the keys added.
            if full_first < full_last:
                left_last = min(full_first, group_last)
                left_first = max(left_last - aligned_count(left_last - group_first), span_first)
                right_first = max(full_last, group_first)
            else:
                left_first = left_last = group_first
                right_first = group_first
            right_last = min(right_first + aligned_count(group_last - right_first), span_last)
            strips = ((left_first, left_last), (right_first, right_last))
            for strip_first, strip_last in strips:
                attend_key_range(q_block[group_start:group_stop], q_start + group_start,
                                 strip_first, strip_last, keys, values,
                                 row_max[group_start:group_stop],
                                 row_sum[group_start:group_stop], acc[group_start:group_stop],
                                 block_k, has_mask or has_bias, group_common_first,
                                 group_common_last, kv_stop, diag_offset, reach_left, reach_right,
                                 mask, mask_entry, mask_row_step, mask_col_step, has_mask,
                                 bias, bias_entry, bias_row_step, bias_col_step, has_bias)

        if n_splits == 1:
            out_rows = out[b]  # (Lq, Dv)
            lse_rows = lse[b]  # (Lq,) natural log
            lse_unit = LN2
        else:
            out_rows = split_out[split, b]  # (Lq, Dv) this span's share
            lse_rows = split_lse[split, b]  # (Lq,) log2 units, merged below
            lse_unit = 1.0
        for r in range(rows):
            row = q_start + r
            if row_sum[r] > 0.0:
                inverse_sum = 1.0 / row_sum[r]
                for d in range(value_dim):
                    out_rows[row, d] = acc[r, d] * inverse_sum
                row_max[r] += math.log2(row_sum[r])  # now log2 of the row's sum of exp
                lse_rows[row] = row_max[r] * lse_unit
            else:  # no visible key: output 0, lse -inf
                out_rows[row, :] = 0.0
                lse_rows[row] = -np.inf

        if return_weights:
            for key_start in range(first_key, last_key, block_k):
                key_stop = min(key_start + block_k, last_key)
                scores = np.dot(q_block, keys[key_start:key_stop].T)  # (rows, cols)
                mask_scores(scores, q_start, key_start, kv_stop, diag_offset, reach_left,
                            reach_right, mask, mask_entry, mask_row_step, mask_col_step,
                            has_mask, bias, bias_entry, bias_row_step, bias_col_step,
                            has_bias, LOG2E)
                for r in range(rows):
                    if row_sum[r] > 0.0:
                        for c in range(key_stop - key_start):
                            weights[b, q_start + r, key_start + c] = exp2(scores[r, c] - row_max[r])

    if n_splits > 1:
        merge_key_spans(split_out, split_lse, out, lse)


@njit(inline="always")
def aligned_count(count):
    """``count`` rounded up to a multiple of ``ALIGN`` (0 for ``count <= 0``)."""
    return -(-max(count, 0) // ALIGN) * ALIGN


@jit_helper
def merge_key_spans(split_out, split_lse, out, lse):
    """Merge per-span results: ``out = sum_s w_s out_s / sum_s w_s`` with
    ``w_s = exp2(lse_s - max_s lse_s)``, and ``lse = ln 2 * (max + log2 sum_s w_s)``.

    ``split_out`` ``(splits, N, Lq, Dv)`` holds each span's normalised output and
    ``split_lse`` ``(splits, N, Lq)`` its log2-sum-exp (``-inf`` for a span with no
    visible key); a row with no visible key in any span gets output 0, lse ``-inf``.
    """
    n_splits, n_batch, q_len, value_dim = split_out.shape
    for row_task in range(n_batch * q_len):
        b = row_task // q_len
        row = row_task - b * q_len
        top = -np.inf
        for split in range(n_splits):
            top = max(top, split_lse[split, b, row])
        out[b, row, :] = 0.0
        if top == -np.inf:
            lse[b, row] = -np.inf
            continue
        total = 0.0
        for split in range(n_splits):
            weight = exp2(split_lse[split, b, row] - top)  # 0 for an empty span
            total += weight
            for d in range(value_dim):
                out[b, row, d] += weight * split_out[split, b, row, d]
        inverse_total = 1.0 / total
        for d in range(value_dim):
            out[b, row, d] *= inverse_total
        lse[b, row] = (top + math.log2(total)) * LN2


def _forward_signature(dtype):
    return types.void(
        *problem_argument_types(dtype),
        types.int64, types.int64, types.int64,  # block_q, block_k, split_len
        array_type(dtype, 3, readonly=False), array_type(dtype, 2, readonly=False),
        array_type(dtype, 3, readonly=False), types.boolean,  # out, lse, weights, flag
        array_type(dtype, 4, readonly=False), array_type(dtype, 3, readonly=False),
    )


forward_kernel = kernel_per_dtype(_attention_forward, _forward_signature)
