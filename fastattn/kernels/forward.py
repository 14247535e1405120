"""Fused forward attention kernel: scaled, masked online softmax and weighted sum.

FlashAttention-2 loop order: query blocks outside (one ``prange`` task per batch
entry and query block), key/value blocks inside. Each task keeps a running row
maximum, a running row sum and a rescaled output accumulator, so no ``(Lq, Lk)``
matrix is ever built; extra memory per task is one ``(block_q, block_k)`` score block,
one ``(block_q, Dv)`` product block and one ``(block_q, Dv)`` accumulator, carved
from scratch memory allocated once per call for each thread.

Scores come from :func:`fastattn.kernels.scores.block_scores`; key blocks that no
query of a block can see (:mod:`fastattn.kernels.masking`) are never visited.

NaN: a row whose running sum or output came out NaN is marked with a NaN lse and
computed again by :func:`exact_rows_kernel`, which sums over visible keys only, so a
NaN value behind a hidden key (which the block product multiplies by an exact 0)
cannot reach it, while a NaN score or value the row does see makes it NaN.
"""

import math

import numpy as np
from numba import njit, prange, types

from fastattn.kernels.tile_states import EMPTY, PARTIAL
from fastattn.kernels.config import jit_helper, kernel_per_dtype
from fastattn.kernels.dropout import drop_in_place, keep_factor
from fastattn.kernels.masking import entry_rule, row_block_keys
from fastattn.kernels.groups import (TILING_TYPE, array_type, forward_result_types,
                                      problem_types)
from fastattn.kernels.half import rows_in, staging, stored_value
from fastattn.kernels.scores import block_scores
from fastattn.kernels.products import product_add
from fastattn.kernels.vector_math import (LN2, block_view, cast_like, exp2, full_width_vectors,
                                          has_nan, line_aligned_rows, row_maximum,
                                          softmax_exp2, whole_lines)

# How far (log2 units) a row's scores may exceed its reference before the reference is
# raised and the row's sum and accumulator rescaled (online_softmax_block).
RESCALE_STEP = 8.0
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
    overwritten with ``exp2(score - reference)``, ready to multiply the values.
    ``row_max`` ``(rows,)`` holds each row's reference, ``row_sum`` ``(rows,)`` and
    ``acc`` ``(rows, Dv)`` its sum and weighted values relative to it. The reference
    is a row's largest score so far, but it is raised (and the sum and ``acc``
    rescaled by ``exp2(old - new)``) only when a block's scores exceed it by more than
    :data:`RESCALE_STEP`, so later blocks seldom pay the pass over ``acc``; the
    probabilities are then at most ``2**RESCALE_STEP``.
    A NaN score makes the row's sum NaN (``exp2`` keeps NaN; a block of NaN and
    ``-inf`` only is caught below, since ``row_maximum`` skips NaN).

    Two passes over each row: its maximum (an explicit 512-bit loop), then the
    probabilities and their sum; compiled at the CPU's full vector width
    (:func:`fastattn.kernels.vector_math.full_width_vectors`).
    """
    full_width_vectors()
    rows, cols = scores.shape
    for r in range(rows):
        top = row_maximum(scores[r], row_max[r])  # NaN scores skipped
        if top == -np.inf:  # nothing visible to this row yet, unless a NaN
            for c in range(cols):
                if scores[r, c] != scores[r, c]:
                    row_sum[r] = np.nan
            scores[r, :] = 0.0
            continue
        reference = row_max[r]
        if top > reference + RESCALE_STEP:  # a new reference (always, after -inf)
            correction = exp2(reference - top)  # 0 when the reference was -inf
            row_sum[r] *= correction  # 0 (or NaN) stays so
            if reference != -np.inf:  # before, acc holds only 0 (or NaN): nothing to do
                for d in range(acc.shape[1]):
                    acc[r, d] *= correction
            reference = top
            row_max[r] = top
        block_sum = row_sum[r] - row_sum[r]  # a zero of the compute dtype (or NaN)
        for c in range(cols):
            p = softmax_exp2(scores[r, c] - reference)  # <= 2**RESCALE_STEP, 0 far below
            scores[r, c] = p
            block_sum += p
        row_sum[r] += block_sum


@jit_helper
def attend_key_range(q_rows, row_start, key_first, key_last, keys, values, entry, rule,
                     options, mask, bias, check_mask_mod, block_k, score_buffer, row_max,
                     row_sum, acc, key_buffer, value_buffer, half_format):
    """Fold keys ``[key_first, key_last)`` into the running softmax of some query rows.

    ``q_rows`` ``(rows, Dk)`` are queries ``row_start + r``; ``row_max``,
    ``row_sum`` ``(rows,)`` and ``acc`` ``(rows, Dv)`` are their running state, updated
    in place, one block of at most ``block_k`` keys at a time, scored into
    ``score_buffer``, its product with the values added to ``acc`` by gemm.
    ``check_mask_mod``: whether the user's ``mask_mod`` must be applied. 16-bit
    ``keys`` and ``values`` are converted block by block into ``key_buffer`` and
    ``value_buffer`` (:func:`fastattn.kernels.half.rows_in`; unused for float ones).
    """
    rows = q_rows.shape[0]
    for key_start in range(key_first, key_last, block_k):
        key_stop = min(key_start + block_k, key_last)
        scores = block_view(score_buffer, rows, key_stop - key_start)  # (rows, cols)
        key_block = rows_in(keys, key_start, key_stop, key_buffer, half_format)  # (cols, Dk)
        block_scores(scores, q_rows, key_block, row_start, key_start, entry,
                     rule, options, mask, bias, scores, False, check_mask_mod, scores)
        online_softmax_block(scores, row_max, row_sum, acc)  # scores -> probabilities
        if options.has_dropout:  # after the row sums: they (and lse) are before dropout
            drop_in_place(scores, row_start, key_start, entry, options)
        product_add(options.gemm, scores,
                    rows_in(values, key_start, key_stop, value_buffer, half_format),
                    acc)  # (rows, Dv)


@jit_helper
def exact_row(q_row, row, key_first, key_last, keys, values, entry, rule, options, mask, bias,
              block_k, score_buffer, out_row, weights_row, return_weights):
    """One query row over keys ``[key_first, key_last)``, summing visible keys only.

    The slow path for rows the block products made NaN. Writes the row's
    normalised output to ``out_row`` ``(Dv,)`` and, if ``return_weights``, its weights
    into ``weights_row`` ``(Lk,)`` (zeroed); returns its log2-sum-exp. A NaN score
    of a visible key makes the output, the visible weights and the lse NaN; a NaN
    value makes the output columns it meets NaN; hidden keys are never read.
    ``q_row`` ``(1, Dk)`` is the query.
    """
    top = -np.inf
    nan_score = False
    total = 0.0
    out_row[:] = 0.0
    for summing in (False, True):  # first the largest score, then the sums
        if summing and top == -np.inf and not nan_score:  # no visible key
            return -np.inf
        for key_start in range(key_first, key_last, block_k):
            key_stop = min(key_start + block_k, key_last)
            scores = block_view(score_buffer, 1, key_stop - key_start)  # (1, cols)
            block_scores(scores, q_row, keys[key_start:key_stop], row, key_start, entry, rule,
                         options, mask, bias, scores, False, True, scores)
            for c in range(key_stop - key_start):
                score = scores[0, c]
                if not summing:
                    if score != score:
                        nan_score = True
                    elif score > top:
                        top = score
                elif score != -np.inf:  # hidden keys count neither weight nor value
                    p = np.nan if nan_score else exp2(score - top)
                    total += p
                    if options.has_dropout:
                        p *= keep_factor(row, key_start + c, entry, options)
                    for d in range(out_row.shape[0]):
                        out_row[d] += p * values[key_start + c, d]
                    if return_weights:  # before dropout
                        weights_row[key_start + c] = np.nan if nan_score else exp2(score - top)
    inverse_total = 1.0 / total
    for d in range(out_row.shape[0]):
        out_row[d] *= inverse_total
    if return_weights:
        for key in range(key_first, key_last):
            if weights_row[key] != 0.0:
                weights_row[key] *= inverse_total
    return top + math.log2(total)  # NaN after a NaN score


def _attention_forward(inputs, options, mask, bias, visibility, tiling, outputs, spans):
    """Compute attention for every batch entry ``b`` of the flattened batch.

    Entry ``b`` reads ``inputs.query[inputs.query_index[b]]`` ``(Lq, Dk)``, the key
    ``(Lk, Dk)`` and value ``(Lk, Dv)`` likewise, and ``mask`` and ``bias``
    (:class:`fastattn._dispatch.layout.ScoreOperand`) under the rule of ``visibility``; it writes
    ``outputs.out[b]`` ``(Lq, Dv)``, ``outputs.lse[b]`` ``(Lq,)`` and, if
    ``outputs.return_weights``, ``outputs.weights[b]`` ``(Lq, Lk)`` (which must be
    zeroed).

    Scores are kept in log2 units (``log2(e) * scale * q.k``) so the softmax uses
    ``exp2``; the query block is scaled once, before its products with the keys.

    Split keys (for calls with too few query blocks to busy every thread, such as
    decoding): with ``spans.span_len < Lk`` each task covers one query block and one
    span of keys, writes that span's normalised output to ``spans.out[s, b]``
    ``(Lq, Dv)`` and its log2-sum-exp to ``spans.lse[s, b]`` ``(Lq,)``, and
    :func:`merge_key_spans` combines the spans weighted by ``exp2(lse)``.

    Returns the number of rows (of spans, when split) that a NaN met: their lse is
    NaN, and :func:`exact_rows_kernel` computes them again.
    """
    n_batch, q_len = outputs.out.shape[:2]
    block_q = tiling.block_q
    n_q_blocks = (q_len + block_q - 1) // block_q
    n_splits = spans.out.shape[0]  # 1 for the placeholder: no split
    # Scratch memory of each slot (thread), allocated once per call: a buffer
    # allocated per task becomes a fresh, page-faulting mmap when the allocator is
    # told to trim (MALLOC_TRIM_THRESHOLD_, as in Dask's workers).
    n_tasks, slots = n_batch * n_q_blocks * n_splits, tiling.slots
    rows, cols = min(block_q, q_len), min(tiling.block_k, inputs.key.shape[1])
    scratch = line_aligned_rows(slots, task_scratch_size(rows, outputs.out.shape[2], cols)
                                + staging(inputs.key, staging_size(
                                    rows, cols, inputs.key.shape[2], inputs.value.shape[2])),
                                outputs.lse)
    marked = 0
    for slot in prange(slots):
        # Slot s takes an equal contiguous share of the tasks. Under a causal mask a
        # query block near the top sees few keys, so blocks are visited in zigzag
        # order (first, last, second, second to last, ...): every share mixes cheap
        # and costly blocks.
        for task in range(slot * n_tasks // slots, (slot + 1) * n_tasks // slots):
            split = task % n_splits
            b = task // (n_q_blocks * n_splits)
            step = task // n_splits - b * n_q_blocks
            q_block_index = step // 2 if step % 2 == 0 else n_q_blocks - 1 - step // 2
            q_start = q_block_index * block_q
            marked += forward_task(b, q_start, min(q_start + block_q, q_len), split, n_splits,
                                   inputs, options, mask, bias, visibility, tiling, outputs,
                                   spans, scratch[slot])
    if n_splits > 1:
        merge_key_spans(spans.out, spans.lse, outputs.out, outputs.lse, inputs.half_format)
    return marked


@jit_helper
def forward_task(b, q_start, q_stop, split, n_splits, inputs, options, mask, bias, visibility,
                 tiling, outputs, spans, scratch):
    """One task of :func:`_attention_forward`: query rows ``[q_start, q_stop)`` of batch
    entry ``b`` over key span ``split`` of ``n_splits`` (the whole key range when 1),
    its buffers carved from the thread's ``scratch`` (:func:`task_scratch_size`).
    Returns how many of its rows a NaN met (marked with a NaN lse)."""
    out, lse, weights, return_weights = outputs
    query, key, value = inputs.query, inputs.key, inputs.value
    value_dim, kv_len = out.shape[2], key.shape[1]
    block_k = tiling.block_k
    split_len = spans.span_len
    rows = q_stop - q_start
    rule = entry_rule(visibility, b, kv_len)
    query_rows = query[inputs.query_index[b]]  # (Lq, Dk)
    # Slicing with [i] or [i, a:b] (no trailing ':') keeps Numba's 'C' layout, so
    # the BLAS reads the blocks in place instead of copying them.
    keys = key[inputs.key_index[b]]  # (Lk, Dk)
    values = value[inputs.value_index[b]]  # (Lk, Dv)
    half_format = inputs.half_format
    # each buffer starts on a 64-byte line, as the slot's scratch does: the BLAS
    # reads every block from the same alignment whichever slot runs the task
    cols = min(block_k, kv_len)
    score_len = whole_lines(rows * cols)
    score_buffer = scratch[:score_len]
    acc = block_view(scratch[score_len:], rows, value_dim)  # (rows, Dv) unnormalised output
    taken = score_len + whole_lines(rows * value_dim)
    row_max = scratch[taken:taken + rows]  # (rows,) running max, log2 units
    row_sum = scratch[taken + rows:taken + 2 * rows]  # (rows,) running sum of exp2(s - max)
    # 16-bit inputs: the query block, once, and each key and value block, converted
    # to the compute dtype here (no buffers for float inputs, read in place)
    taken += whole_lines(2 * rows)
    head_dim = key.shape[2]
    query_buffer, key_buffer, value_buffer = staging_buffers(
        scratch[taken:taken + staging(key, staging_size(rows, cols, head_dim, value_dim))],
        rows, cols, head_dim, value_dim)
    q_rows = rows_in(query_rows, q_start, q_stop, query_buffer,
                     half_format)  # (rows, Dk), scaled by the score product
    for r in range(rows):
        for d in range(value_dim):
            acc[r, d] = 0.0
        row_max[r] = -np.inf
        row_sum[r] = 0.0

    # keys this task may read; keys of them that some row of the block may see,
    # and keys every row of the block sees
    span_first = split * split_len
    span_last = min(kv_len, span_first + split_len)
    first_key, last_key, common_first, common_last = row_block_keys(q_start, q_stop, rule)
    first_key, last_key = max(first_key, span_first), min(last_key, span_last)

    # 1. With a block mask, its tiles that are not empty, each checked with
    #    mask_mod only if partial; else the keys every row of the block sees, in
    #    full-size blocks (masked only for a user mask, bias or mask_mod).
    if visibility.has_block_mask:
        tile_states = visibility.block_states[visibility.block_states_index[b],
                                              q_start // tiling.block_q]  # (key tiles,)
        first_tile = first_key // block_k
        n_ranges = max(-(-last_key // block_k) - first_tile, 0)
        n_groups = 0
    else:
        tile_states = visibility.block_states[0, 0]  # (1,) placeholder, never read
        first_tile = 0
        n_ranges = 1
        n_groups = -(-rows // EDGE_ROWS)
    full_first, full_last = max(common_first, first_key), min(common_last, last_key)
    if full_last > full_first:  # whole multiples of ALIGN keys; the rest is a strip
        full_last = full_first + (full_last - full_first) // ALIGN * ALIGN
    for item in range(n_ranges):
        if visibility.has_block_mask:
            range_first, range_last, check_mask_mod = tile_key_range(
                first_tile + item, tile_states, block_k, first_key, last_key)
        else:
            range_first, range_last, check_mask_mod = full_first, full_last, options.has_mask_mod
        attend_key_range(q_rows, q_start, range_first, range_last, keys, values, b, rule,
                         options, mask, bias, check_mask_mod, block_k, score_buffer, row_max,
                         row_sum, acc, key_buffer, value_buffer, half_format)
    # 2. Without a block mask, the keys only some rows see (the causal diagonal,
    #    window edges): groups of EDGE_ROWS rows, each over its own visible range,
    #    so little is computed only to be masked.
    for group_start in range(0, n_groups * EDGE_ROWS, EDGE_ROWS):
        group_stop = min(group_start + EDGE_ROWS, rows)
        group_first, group_last = row_block_keys(q_start + group_start,
                                                 q_start + group_stop, rule)[:2]
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
        for strip_first, strip_last in ((left_first, left_last), (right_first, right_last)):
            attend_key_range(q_rows[group_start:group_stop], q_start + group_start,
                             strip_first, strip_last, keys, values, b, rule, options, mask, bias,
                             options.has_mask_mod, block_k, score_buffer,
                             row_max[group_start:group_stop], row_sum[group_start:group_stop],
                             acc[group_start:group_stop], key_buffer, value_buffer, half_format)

    if n_splits == 1:  # (Lq, Dv) in the inputs' storage, (Lq,) natural log
        marked = finish_rows(out[b], lse[b], LN2, q_start, row_max, row_sum, acc, half_format)
    else:  # this span's share (Lq, Dv) and its lse (Lq,) in log2 units, merged below
        marked = finish_rows(spans.out[split, b], spans.lse[split, b], 1.0, q_start, row_max,
                             row_sum, acc, half_format)

    if return_weights:
        for key_start in range(first_key, last_key, block_k):
            key_stop = min(key_start + block_k, last_key)
            scores = block_view(score_buffer, rows, key_stop - key_start)  # (rows, cols)
            block_scores(scores, q_rows, rows_in(keys, key_start, key_stop, key_buffer,
                                                 half_format),  # (cols, Dk)
                         q_start, key_start, b, rule, options, mask, bias, scores, False, True,
                         scores)
            for r in range(rows):
                if row_sum[r] > 0.0:
                    for c in range(key_stop - key_start):
                        weights[b, q_start + r, key_start + c] = exp2(scores[r, c] - row_max[r])
    return marked


@jit_helper
def finish_rows(out_rows, lse_rows, lse_unit, q_start, row_max, row_sum, acc, half_format):
    """Write a task's rows ``q_start + r`` of ``out_rows`` ``(Lq, Dv)`` (any storage,
    16-bit rounded to nearest even) and ``lse_rows`` ``(Lq,)`` (log2 sum-exp times
    ``lse_unit``) from its running state ``row_max``, ``row_sum`` ``(rows,)`` and
    ``acc`` ``(rows, Dv)``; ``row_max`` becomes each row's log2-sum-exp. A row a NaN
    met gets a NaN output and lse (marking it for :func:`exact_rows_kernel`) and a
    zero ``row_sum``; a row with no visible key output 0 and lse ``-inf``. Returns
    how many rows a NaN met."""
    rows, value_dim = acc.shape
    nan_entry = stored_value(np.nan, out_rows, half_format)
    zero_entry = stored_value(0.0, out_rows, half_format)
    acc_has_nan = has_nan(acc)  # one pass; rows are looked at only if it finds one
    marked = 0
    for r in range(rows):
        row = q_start + r
        if row_sum[r] != row_sum[r] or (acc_has_nan and has_nan(acc[r:r + 1])):  # NaN met
            out_rows[row, :] = nan_entry  # lse NaN marks the row for exact_rows_kernel
            lse_rows[row] = np.nan
            row_sum[r] = 0.0  # no weights from the pass below
            marked += 1
        elif row_sum[r] > 0.0:
            inverse_sum = 1.0 / row_sum[r]
            for d in range(value_dim):
                out_rows[row, d] = stored_value(acc[r, d] * inverse_sum, out_rows, half_format)
            row_max[r] += math.log2(row_sum[r])  # now log2 of the row's sum of exp
            lse_rows[row] = row_max[r] * lse_unit
        else:  # no visible key: output 0, lse -inf
            out_rows[row, :] = zero_entry
            lse_rows[row] = -np.inf
    return marked


@jit_helper
def tile_key_range(k_tile, tile_states, block_k, first_key, last_key):
    """The keys of the block mask's tile ``k_tile`` within ``[first_key, last_key)``
    and whether they need ``mask_mod``: ``(key_first, key_last, check_mask_mod)``,
    an empty range for an empty tile (``tile_states`` ``(key tiles,)``)."""
    state = tile_states[k_tile]
    if state == EMPTY:
        return first_key, first_key, False
    return (max(k_tile * block_k, first_key), min((k_tile + 1) * block_k, last_key),
            state == PARTIAL)


def _exact_rows(inputs, options, mask, bias, visibility, tiling, outputs, rows):
    """Compute the rows ``rows`` ``(K, 2)`` of ``(entry, query)`` again with
    :func:`exact_row` over every key, writing ``outputs`` (out, natural-log lse and,
    if asked, weights) for those rows only.

    The forward kernel marks the rows where a NaN met its block products with a NaN
    lse; this separate kernel is compiled only when such a row first occurs.
    """
    out, lse, weights, return_weights = outputs
    query, key, value = inputs.query, inputs.key, inputs.value
    kv_len = key.shape[1]
    block_k = tiling.block_k
    for task in prange(rows.shape[0]):
        b, row = rows[task, 0], rows[task, 1]
        rule = entry_rule(visibility, b, kv_len)
        q_row = query[inputs.query_index[b], row:row + 1]  # (1, Dk)
        score_buffer = np.empty(min(block_k, kv_len), dtype=out.dtype)
        first_key, last_key = row_block_keys(row, row + 1, rule)[:2]
        weights_row = weights[b, row] if return_weights else weights[0, 0]  # (Lk,)
        lse[b, row] = LN2 * exact_row(
            q_row, row, first_key, last_key, key[inputs.key_index[b]],
            value[inputs.value_index[b]], b, rule, options, mask, bias, block_k, score_buffer,
            out[b, row], weights_row, return_weights)


@njit(inline="always")
def task_scratch_size(rows, value_dim, cols):
    """Scratch entries of a forward task of ``rows`` query rows and key blocks of
    ``cols`` keys: the score block, the accumulator, the running maxima and sums,
    each rounded up to whole 64-byte lines (:func:`whole_lines`)."""
    return whole_lines(rows * cols) + whole_lines(rows * value_dim) + whole_lines(2 * rows)


@njit(inline="always")
def staging_size(rows, cols, head_dim, value_dim):
    """Scratch entries a 16-bit task converts its blocks into: the query block
    ``(rows, Dk)``, a key block ``(cols, Dk)`` and a value block ``(cols, Dv)``."""
    return whole_lines(rows * head_dim) + whole_lines(cols * head_dim) + whole_lines(
        cols * value_dim)


@njit(inline="always")
def staging_buffers(staging_scratch, rows, cols, head_dim, value_dim):
    """The query, key and value conversion buffers carved from ``staging_scratch``
    (:func:`staging_size` entries, or empty for float inputs: then empty buffers)."""
    if staging_scratch.shape[0] == 0:
        return staging_scratch, staging_scratch, staging_scratch
    key_start = whole_lines(rows * head_dim)
    value_start = key_start + whole_lines(cols * head_dim)
    return (staging_scratch[:key_start], staging_scratch[key_start:value_start],
            staging_scratch[value_start:])


@njit(inline="always")
def aligned_count(count):
    """``count`` rounded up to a multiple of ``ALIGN`` (0 for ``count <= 0``)."""
    return -(-max(count, 0) // ALIGN) * ALIGN


@jit_helper
def merge_key_spans(split_out, split_lse, out, lse, half_format):
    """Merge per-span results: ``out = sum_s w_s out_s / sum_s w_s`` with
    ``w_s = exp2(lse_s - max_s lse_s)``, and ``lse = ln 2 * (max + log2 sum_s w_s)``.

    ``split_out`` ``(splits, N, Lq, Dv)`` holds each span's normalised output and
    ``split_lse`` ``(splits, N, Lq)`` its log2-sum-exp (``-inf`` for a span with no
    visible key); a row with no visible key in any span gets output 0, lse ``-inf``;
    a NaN lse in any span makes the row NaN. ``out`` may be 16-bit storage (each
    entry rounded once, from the float sum).
    """
    n_splits, n_batch, q_len, value_dim = split_out.shape
    weights = np.empty(n_splits, split_out.dtype)  # (splits,) each span's weight
    nan_entry = stored_value(np.nan, out, half_format)
    zero_entry = stored_value(0.0, out, half_format)
    for row_task in range(n_batch * q_len):
        b = row_task // q_len
        row = row_task - b * q_len
        top = -np.inf
        nan_lse = False
        for split in range(n_splits):
            span_lse = split_lse[split, b, row]
            if span_lse != span_lse:
                nan_lse = True
            elif span_lse > top:
                top = span_lse
        if nan_lse:
            out[b, row, :] = nan_entry
            lse[b, row] = np.nan
            continue
        if top == -np.inf:
            out[b, row, :] = zero_entry
            lse[b, row] = -np.inf
            continue
        total = 0.0
        for split in range(n_splits):
            weights[split] = exp2(split_lse[split, b, row] - top)  # 0 for an empty span
            total += weights[split]
        inverse_total = 1.0 / total
        for d in range(value_dim):
            merged = cast_like(0.0, split_out)
            for split in range(n_splits):
                merged += weights[split] * split_out[split, b, row, d]
            out[b, row, d] = stored_value(merged * inverse_total, out, half_format)
        lse[b, row] = (top + math.log2(total)) * LN2


def _forward_signature(dtype):
    return types.int64(*problem_types(dtype), TILING_TYPE, *forward_result_types(dtype))


def _exact_rows_signature(dtype):
    return types.void(*problem_types(dtype), TILING_TYPE, forward_result_types(dtype)[0],
                      array_type(np.int64, 2))


forward_kernel = kernel_per_dtype(_attention_forward, _forward_signature)
exact_rows_kernel = kernel_per_dtype(_exact_rows, _exact_rows_signature)
