"""Streaming decode kernel: a few query rows against a long key/value cache.

Decoding attends 1 to 8 query rows per head (one token; a grouped-query group's
heads folded into rows by :func:`fastattn._dispatch.layout.fold_query_groups`;
speculative decoding's draft tokens) to ``Lk`` keys. The forward kernel's block
products go through the BLAS, which packs every key block before multiplying it:
an extra pass over the very bytes a decode exists to read once. This kernel reads
each key and value row once, straight from the cache, with loops that LLVM
vectorises at the CPU's full width, and keeps everything else in the L1 cache.

For the rows ``i`` of a batch entry and the keys ``j`` each row may see (the
structural rule of :mod:`fastattn.kernels.masking`: causal, its alignment, a
window, ``kv_lengths``), in log2 units

.. math::

    s_{ij} = c \\tanh\\Big(\\frac{\\log_2(e)\\, \\mathrm{scale}\\; q_i \\cdot k_j}{c}\\Big)
    \\quad (\\text{or } \\log_2(e)\\, \\mathrm{scale}\\; q_i \\cdot k_j
    \\text{ without a softcap}; c = \\log_2(e)\\,\\mathrm{softcap}),

    \\mathrm{out}_i = \\frac{\\sum_j 2^{s_{ij} - m_i} v_j}{\\sum_j 2^{s_{ij} - m_i}},
    \\qquad \\mathrm{lse}_i = \\ln 2 \\,\\big(m_i + \\log_2 \\sum_j 2^{s_{ij} - m_i}\\big),

with ``m_i`` the row's largest score, kept as a running maximum over key blocks of
:data:`DECODE_BLOCK_K` (online softmax: the running sum and accumulator are
rescaled by ``2^{m_old - m_new}`` when a block raises it).

Work: one task per batch entry and key span (spans of whole blocks, cut by
:func:`fastattn._dispatch.tiling.decode_plan` from the shape alone); each thread
runs an equal contiguous share of the tasks, and the spans of an entry are merged
by their log-sum-exp in span order (:func:`fastattn.kernels.forward.merge_key_spans`),
so results are bitwise identical for every thread count.

Per task and block: the scores of every row (each key row is read from memory once
and stays in L1 while every query row takes its dot product), the softmax of each
row over the keys it sees, then the weighted values (each value row read once and
added into every row that sees it). Only visible keys are ever added: a hidden
key's score is never used and its value never multiplied, so a NaN behind it cannot
leak; a NaN score a row sees makes that row's output and lse NaN, a NaN value makes
the output columns it meets NaN. Rows with no visible key get output 0 and lse
``-inf``.

Options honoured: ``scale``, ``softcap``, ``causal`` (both alignments), ``window``,
``kv_lengths``. Calls with a mask, a bias, ALiBi slopes, user score functions, a
block mask, or ``return_weights`` go to the forward kernel
(:func:`fastattn._dispatch.run.decode_supported` decides).
"""

import math

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastattn.kernels.config import jit_helper, kernel_per_dtype
from fastattn.kernels.forward import merge_key_spans
from fastattn.kernels.groups import (TILING_TYPE, Inputs, ScoreOptions, Visibility,
                                      forward_result_types, group_type)
from fastattn.kernels.masking import entry_rule, row_block_keys, visible_columns
from fastattn.kernels.scores import apply_softcap
from fastattn.kernels.vector_math import (LN2, LOG2E, block_view, cast_like,
                                          full_width_vectors, line_aligned_rows, softmax_exp2,
                                          whole_lines)

# Keys per block: the scores of a block are one small (rows, 64) buffer, and a
# block of keys (64 x D entries) stays in L1 while the rows take their products.
DECODE_BLOCK_K = 64


def _decode_forward(inputs, options, visibility, tiling, outputs, spans):
    """Attention of the few rows of every batch entry ``b`` of the flattened batch.

    Entry ``b`` reads ``inputs.query[inputs.query_index[b]]`` ``(Lq, Dk)``, the key
    ``(Lk, Dk)`` and value ``(Lk, Dv)`` stacks likewise, under the rule of
    ``visibility`` (no block mask), with ``options``' scale and softcap; it writes
    ``outputs.out[b]`` ``(Lq, Dv)`` and ``outputs.lse[b]`` ``(Lq,)`` (natural log).
    ``outputs.weights`` is never written (weights go to the forward kernel).

    Keys are cut into spans of ``spans.span_len`` keys (a multiple of
    ``tiling.block_k``); with more than one span (``spans.out.shape[0]``) each task
    writes its span's normalised output to ``spans.out[s, b]`` ``(Lq, Dv)`` and its
    log2-sum-exp to ``spans.lse[s, b]`` ``(Lq,)``, merged in span order afterwards.
    ``tiling.slots`` threads each run an equal contiguous share of the
    ``N * spans`` tasks, with scratch memory of their own.
    """
    n_batch, q_len, value_dim = outputs.out.shape
    head_dim = inputs.query.shape[2]
    n_spans = spans.out.shape[0]  # 1 for the placeholder: no split
    n_tasks, slots = n_batch * n_spans, tiling.slots
    block_k = min(tiling.block_k, max(inputs.key.shape[1], 1))
    scratch = line_aligned_rows(slots, decode_scratch_size(q_len, head_dim, value_dim, block_k),
                                outputs.out)  # (slots, entries)
    for slot in prange(slots):
        for task in range(slot * n_tasks // slots, (slot + 1) * n_tasks // slots):
            b = task // n_spans
            decode_task(b, task - b * n_spans, n_spans, block_k, inputs, options, visibility,
                        outputs, spans, scratch[slot])
    if n_spans > 1:
        merge_key_spans(spans.out, spans.lse, outputs.out, outputs.lse)


@jit_helper
def decode_task(b, span, n_spans, block_k, inputs, options, visibility, outputs, spans,
                scratch):
    """One task of :func:`_decode_forward`: every query row of batch entry ``b`` over
    key span ``span`` of ``n_spans``, in blocks of ``block_k`` keys, its buffers
    carved from the thread's ``scratch`` (:func:`decode_scratch_size`)."""
    query, key, value = inputs.query, inputs.key, inputs.value
    rows, head_dim = query.shape[1], query.shape[2]
    kv_len, value_dim = key.shape[1], value.shape[2]
    rule = entry_rule(visibility, b, kv_len)
    keys = key[inputs.key_index[b]]  # (Lk, Dk)
    values = value[inputs.value_index[b]]  # (Lk, Dv)
    query_rows = query[inputs.query_index[b]]  # (rows, Dk)

    taken = 0
    q_scaled = block_view(scratch, rows, head_dim)  # (rows, Dk) log2(e) * scale * q
    taken += whole_lines(rows * head_dim)
    scores = block_view(scratch[taken:], rows, block_k)  # (rows, block_k) log2 units
    taken += whole_lines(rows * block_k)
    acc = block_view(scratch[taken:], rows, value_dim)  # (rows, Dv) unnormalised output
    taken += whole_lines(rows * value_dim)
    row_max = scratch[taken:taken + rows]  # (rows,) running max, log2 units
    row_sum = scratch[taken + rows:taken + 2 * rows]  # (rows,) running sum of 2**(s - max)

    score_scale = cast_like(options.scale * LOG2E, scratch)
    for r in range(rows):
        for d in range(head_dim):
            q_scaled[r, d] = query_rows[r, d] * score_scale
        for d in range(value_dim):
            acc[r, d] = 0.0
        row_max[r] = -np.inf
        row_sum[r] = 0.0

    span_first = span * spans.span_len
    span_last = min(kv_len, span_first + spans.span_len)
    first_key, last_key = row_block_keys(0, rows, rule)[:2]  # keys some row may see
    first_key, last_key = max(first_key, span_first), min(last_key, span_last)
    cap = cast_like(options.softcap * LOG2E, scratch)
    for key_start in range(first_key, last_key, block_k):
        cols = min(block_k, last_key - key_start)
        # the next block's keys and values start on their way to L2 now
        next_stop = min(key_start + 2 * block_k, last_key)
        prefetch_rows(keys, key_start + block_k, next_stop)
        prefetch_rows(values, key_start + block_k, next_stop)
        key_block = keys[key_start:key_start + cols]  # (cols, Dk)
        value_block = values[key_start:key_start + cols]  # (cols, Dv)
        # Rows in pairs: each key and value row loaded is used by both rows, over the
        # columns both see; the columns only one of them sees (the causal diagonal),
        # and a last odd row, row by row.
        for r in range(0, rows, 2):
            first0, stop0, first1, stop1, both_first, both_stop = pair_columns(
                r, rows, key_start, cols, rule)
            pair_block_scores(q_scaled[r], q_scaled[min(r + 1, rows - 1)], key_block,
                              both_first, both_stop, scores[r],
                              scores[min(r + 1, rows - 1)])
            row_block_scores(q_scaled[r], key_block, first0, min(stop0, both_first), scores[r])
            row_block_scores(q_scaled[r], key_block, max(first0, both_stop), stop0, scores[r])
            if r + 1 < rows:
                row_block_scores(q_scaled[r + 1], key_block, first1, min(stop1, both_first),
                                 scores[r + 1])
                row_block_scores(q_scaled[r + 1], key_block, max(first1, both_stop), stop1,
                                 scores[r + 1])
        if options.has_softcap:  # the whole buffer: columns no row sees are never read
            apply_softcap(scores, cap, scores, False)
        for r in range(rows):
            first, stop = visible_columns(r, key_start, cols, rule)
            row_block_softmax(scores[r], first, stop, r, row_max, row_sum, acc)
        for r in range(0, rows, 2):
            first0, stop0, first1, stop1, both_first, both_stop = pair_columns(
                r, rows, key_start, cols, rule)
            pair_block_values(scores[r], scores[min(r + 1, rows - 1)], value_block, both_first,
                              both_stop, acc[r], acc[min(r + 1, rows - 1)])
            row_block_values(scores[r], value_block, first0, min(stop0, both_first), acc[r])
            row_block_values(scores[r], value_block, max(first0, both_stop), stop0, acc[r])
            if r + 1 < rows:
                row_block_values(scores[r + 1], value_block, first1, min(stop1, both_first),
                                 acc[r + 1])
                row_block_values(scores[r + 1], value_block, max(first1, both_stop), stop1,
                                 acc[r + 1])

    if n_spans == 1:
        out_rows = outputs.out[b]  # (rows, Dv)
        lse_rows = outputs.lse[b]  # (rows,) natural log
        lse_unit = LN2
    else:
        out_rows = spans.out[span, b]  # (rows, Dv) this span's share
        lse_rows = spans.lse[span, b]  # (rows,) log2 units, merged afterwards
        lse_unit = 1.0
    for r in range(rows):
        if row_sum[r] > 0.0 or row_sum[r] != row_sum[r]:  # a visible key (or a NaN)
            inverse_sum = 1.0 / row_sum[r]
            for d in range(value_dim):
                out_rows[r, d] = acc[r, d] * inverse_sum
            lse_rows[r] = (row_max[r] + math.log2(row_sum[r])) * lse_unit
        else:  # no visible key: output 0, lse -inf
            out_rows[r, :] = 0.0
            lse_rows[r] = -np.inf


@jit_helper
def row_block_scores(q_row, keys, first, stop, scores):
    """``scores[c] = q_row . keys[c]`` for ``c`` in ``[first, stop)``: ``q_row``
    ``(Dk,)``, ``keys`` ``(cols, Dk)``, ``scores`` ``(block_k,)``. Four keys at a time
    share each load of the query: four dot products (reductions LLVM vectorises at
    full width) in one loop over ``Dk``."""
    full_width_vectors()
    head_dim = q_row.shape[0]
    c = first
    while c + 4 <= stop:
        key0, key1, key2, key3 = keys[c], keys[c + 1], keys[c + 2], keys[c + 3]  # (Dk,)
        total0 = total1 = total2 = total3 = cast_like(0.0, scores)
        for d in range(head_dim):
            q = q_row[d]
            total0 += q * key0[d]
            total1 += q * key1[d]
            total2 += q * key2[d]
            total3 += q * key3[d]
        scores[c], scores[c + 1], scores[c + 2], scores[c + 3] = total0, total1, total2, total3
        c += 4
    while c < stop:
        key0 = keys[c]  # (Dk,)
        total0 = cast_like(0.0, scores)
        for d in range(head_dim):
            total0 += q_row[d] * key0[d]
        scores[c] = total0
        c += 1


@jit_helper
def pair_columns(r, rows, key_start, cols, rule):
    """Columns of a block of ``cols`` keys from ``key_start`` that rows ``r`` and
    ``r + 1`` see: ``(first0, stop0, first1, stop1, both_first, both_stop)``, the
    second row's range empty when ``r + 1 == rows``; ``[both_first, both_stop)``,
    the columns both see, is ``[cols, cols)`` when they share none (or ``r`` is the
    last row), so that each row's own columns outside it are
    ``[first, min(stop, both_first))`` and ``[max(first, both_stop), stop)``."""
    first0, stop0 = visible_columns(r, key_start, cols, rule)
    if r + 1 == rows:
        return first0, stop0, 0, 0, cols, cols
    first1, stop1 = visible_columns(r + 1, key_start, cols, rule)
    both_first, both_stop = max(first0, first1), min(stop0, stop1)
    if both_stop <= both_first:
        both_first = both_stop = cols
    return first0, stop0, first1, stop1, both_first, both_stop


@jit_helper
def pair_block_scores(q_row0, q_row1, keys, first, stop, scores0, scores1):
    """The scores of two rows, ``scoresN[c] = q_rowN . keys[c]`` for ``c`` in ``[first,
    stop)``: each key row loaded once for both, four keys at a time (eight dot
    products in one loop over ``Dk``: six loads to eight multiply-adds)."""
    full_width_vectors()
    head_dim = q_row0.shape[0]
    c = first
    while c + 4 <= stop:
        key0, key1, key2, key3 = keys[c], keys[c + 1], keys[c + 2], keys[c + 3]  # (Dk,)
        total00 = total01 = total02 = total03 = cast_like(0.0, scores0)
        total10 = total11 = total12 = total13 = cast_like(0.0, scores0)
        for d in range(head_dim):
            q0, q1 = q_row0[d], q_row1[d]
            k0, k1, k2, k3 = key0[d], key1[d], key2[d], key3[d]
            total00 += q0 * k0
            total01 += q0 * k1
            total02 += q0 * k2
            total03 += q0 * k3
            total10 += q1 * k0
            total11 += q1 * k1
            total12 += q1 * k2
            total13 += q1 * k3
        scores0[c], scores0[c + 1], scores0[c + 2], scores0[c + 3] = (total00, total01,
                                                                      total02, total03)
        scores1[c], scores1[c + 1], scores1[c + 2], scores1[c + 3] = (total10, total11,
                                                                      total12, total13)
        c += 4
    while c < stop:
        key0 = keys[c]  # (Dk,)
        total00 = total10 = cast_like(0.0, scores0)
        for d in range(head_dim):
            total00 += q_row0[d] * key0[d]
            total10 += q_row1[d] * key0[d]
        scores0[c], scores1[c] = total00, total10
        c += 1


@jit_helper
def row_block_softmax(scores, first, stop, r, row_max, row_sum, acc):
    """Fold columns ``[first, stop)`` of row ``r``'s block ``scores`` ``(block_k,)``
    (log2 units) into its running maximum ``row_max[r]``, sum ``row_sum[r]`` and
    accumulator ``acc[r]`` ``(Dv,)``; overwrite them with ``2**(s - max)``. A larger
    maximum rescales the sum and accumulator by ``2**(old - new)``. NaN scores are
    skipped by the maximum and make the sum NaN."""
    full_width_vectors()
    top = row_max[r]
    for c in range(first, stop):
        score = scores[c]
        top = score if score > top else top  # NaN never wins
    if top == -np.inf:  # nothing seen yet but -inf or NaN scores
        for c in range(first, stop):
            if scores[c] != scores[c]:
                row_sum[r] = np.nan  # a NaN score the row sees: the row is NaN
            scores[c] = 0.0
        return
    reference = row_max[r]
    if top > reference:  # a new maximum: rescale what the row holds
        correction = softmax_exp2(reference - top)  # 0 when the reference was -inf
        row_sum[r] *= correction
        if reference != -np.inf:  # before, acc holds only 0 (or NaN)
            for d in range(acc.shape[1]):
                acc[r, d] *= correction
        row_max[r] = top
    total = row_sum[r] - row_sum[r]  # 0 of the dtype (or NaN)
    for c in range(first, stop):
        p = softmax_exp2(scores[c] - top)  # in [0, 1], NaN stays
        scores[c] = p
        total += p
    row_sum[r] += total


@jit_helper
def row_block_values(probabilities, values, first, stop, acc_row):
    """``acc_row += sum_c probabilities[c] * values[c]`` over ``c`` in ``[first,
    stop)``, the keys the row sees: ``probabilities`` ``(block_k,)``, ``values``
    ``(cols, Dv)``, ``acc_row`` ``(Dv,)``. Four value rows at a time per pass over
    ``acc_row``; a hidden key's value is never multiplied, so its NaN cannot reach
    the row."""
    full_width_vectors()
    value_dim = acc_row.shape[0]
    c = first
    while c + 4 <= stop:
        p0, p1, p2, p3 = (probabilities[c], probabilities[c + 1], probabilities[c + 2],
                          probabilities[c + 3])
        value0, value1, value2, value3 = values[c], values[c + 1], values[c + 2], values[c + 3]
        for d in range(value_dim):
            acc_row[d] += p0 * value0[d] + p1 * value1[d] + p2 * value2[d] + p3 * value3[d]
        c += 4
    while c < stop:
        p0, value0 = probabilities[c], values[c]  # (Dv,)
        for d in range(value_dim):
            acc_row[d] += p0 * value0[d]
        c += 1


@jit_helper
def pair_block_values(probabilities0, probabilities1, values, first, stop, acc_row0, acc_row1):
    """``acc_rowN += sum_c probabilitiesN[c] * values[c]`` for two rows over ``c`` in
    ``[first, stop)``, columns both rows see: each value row loaded once for both,
    two at a time (two loads of values to four multiply-adds per vector)."""
    full_width_vectors()
    value_dim = acc_row0.shape[0]
    c = first
    while c + 2 <= stop:
        p00, p01 = probabilities0[c], probabilities0[c + 1]
        p10, p11 = probabilities1[c], probabilities1[c + 1]
        value0, value1 = values[c], values[c + 1]  # (Dv,)
        for d in range(value_dim):
            v0, v1 = value0[d], value1[d]
            acc_row0[d] += p00 * v0 + p01 * v1
            acc_row1[d] += p10 * v0 + p11 * v1
        c += 2
    while c < stop:
        p00, p10, value0 = probabilities0[c], probabilities1[c], values[c]
        for d in range(value_dim):
            acc_row0[d] += p00 * value0[d]
            acc_row1[d] += p10 * value0[d]
        c += 1


@jit_helper
def decode_scratch_size(rows, head_dim, value_dim, block_k):
    """Scratch entries of a decode task: the scaled queries, the score block, the
    accumulator, the running maxima and sums, each whole 64-byte lines."""
    return (whole_lines(rows * head_dim) + whole_lines(rows * block_k)
            + whole_lines(rows * value_dim) + whole_lines(2 * rows))


@intrinsic
def prefetch_rows(typingctx, rows, first, stop):
    """Ask the CPU to bring rows ``[first, stop)`` of a 2-D C-contiguous array into
    the L2 cache (``llvm.prefetch``, read, locality 2: x86's ``prefetcht1``), one
    request per 64-byte line; computes nothing, and nothing for an empty range."""
    if not (isinstance(rows, types.Array) and rows.ndim == 2 and rows.layout == "C"
            and isinstance(first, types.Integer) and isinstance(stop, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        intp = context.get_value_type(types.intp)
        first_row = context.cast(builder, args[1], signature.args[1], types.intp)
        stop_row = context.cast(builder, args[2], signature.args[2], types.intp)
        int8_pointer, int32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [int8_pointer, int32, int32, int32]),
            "llvm.prefetch.p0")
        row_bytes = builder.extract_value(array.strides, 0)
        start = builder.mul(first_row, row_bytes)  # bytes
        end = builder.mul(stop_row, row_bytes)
        line = ir.Constant(intp, 64)
        n_lines = builder.sdiv(builder.add(builder.sub(end, start), ir.Constant(intp, 63)), line)
        data = builder.bitcast(array.data, int8_pointer)
        with cgutils.for_range(builder, n_lines, intp=intp) as loop:  # none when n_lines <= 0
            offset = builder.add(start, builder.mul(loop.index, line))
            builder.call(prefetch, [builder.gep(data, [offset]), ir.Constant(int32, 0),
                                    ir.Constant(int32, 2), ir.Constant(int32, 1)])
        return context.get_dummy_value()
    return types.none(rows, first, stop), codegen


def _decode_signature(dtype):
    return types.void(group_type(Inputs, dtype), group_type(ScoreOptions, dtype),
                      group_type(Visibility, dtype), TILING_TYPE,
                      *forward_result_types(dtype))


decode_kernel = kernel_per_dtype(_decode_forward, _decode_signature)
