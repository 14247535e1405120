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

with ``m_i`` the row's largest score, kept as a running maximum over blocks of
``block_k`` keys (:data:`fastattn._dispatch.tiling.DECODE_BLOCK_K`; online softmax:
the running sum and accumulator are rescaled by ``2^{m_old - m_new}`` when a block
raises it).

Work: one task per batch entry and key span (spans of whole blocks, cut by
:func:`fastattn._dispatch.tiling.decode_plan` from the shape alone); each thread
runs an equal contiguous share of the tasks, and the spans of an entry are merged
by their log-sum-exp in span order (:func:`fastattn.kernels.forward.merge_key_spans`),
so results are bitwise identical for every thread count.

Per task and block: the scores of every row, key by key (each key row read from
memory once, in order, and dotted with every query row while it is in L1); the
softmax of each row over the keys it sees; then the weighted values, value row by
value row (each read once and added into every row that sees it). Only visible
keys are ever added: a hidden key's score is never used and its value never
multiplied, so a NaN behind it cannot leak; a NaN score a row sees makes that
row's output and lse NaN, a NaN value makes the output columns it meets NaN. Rows
with no visible key get output 0 and lse ``-inf``. Scores and values take four keys
per pass over ``Dk`` / ``Dv`` (one load of each query element, one load and store
of each accumulator element for the four): on a Zen 3 CPU, with the block in cache,
23-29% less time per (row, key) than a key per pass at 4 rows and ``D = 64``, and
less at 1 and 8 rows and ``D = 128`` too. (Loops sharing each load between two rows,
or blocks of 32-128 keys, measured slower.)

Options honoured: ``scale``, ``softcap``, ``causal`` (both alignments), ``window``,
``kv_lengths``. Calls with a mask, a bias, ALiBi slopes, user score functions, a
block mask, or ``return_weights`` go to the forward kernel
(:func:`fastattn._dispatch.run.decode_supported` decides).
"""

import math

import numpy as np
from numba import prange, types

from fastattn.kernels.config import jit_helper, jit_inlined, kernel_per_dtype
from fastattn.kernels.forward import merge_key_spans
from fastattn.kernels.half import BFLOAT16, FLOAT16, as_compute, stored_value
from fastattn.kernels.groups import (TILING_TYPE, Inputs, ScoreOptions, Visibility,
                                      forward_result_types, group_type)
from fastattn.kernels.masking import entry_rule, row_block_keys, visible_columns
from fastattn.kernels.scores import apply_softcap
from fastattn.kernels.vector_math import (LN2, LOG2E, block_view, cast_like,
                                          full_width_vectors, line_aligned_rows, row_maximum,
                                          softmax_exp2, whole_lines)

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
                                outputs.lse)  # (slots, entries) in the compute dtype
    for slot in prange(slots):
        for task in range(slot * n_tasks // slots, (slot + 1) * n_tasks // slots):
            b = task // n_spans
            decode_task(b, task - b * n_spans, n_spans, block_k, inputs, options, visibility,
                        outputs, spans, scratch[slot])
    if n_spans > 1:
        merge_key_spans(spans.out, spans.lse, outputs.out, outputs.lse, inputs.half_format)


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
    keys = key[inputs.key_index[b]].reshape((kv_len, 1, head_dim))  # (Lk, 1, Dk)
    values = value[inputs.value_index[b]].reshape((kv_len, 1, value_dim))  # (Lk, 1, Dv)
    query_rows = query[inputs.query_index[b]]  # (rows, Dk)
    half_format = inputs.half_format  # how 16-bit inputs are read

    q_scaled, scores, acc, row_max, row_sum = decode_buffers(scratch, rows, head_dim,
                                                             value_dim, block_k)
    decode_start(query_rows, options.scale, half_format, q_scaled, acc, row_max, row_sum)

    span_first = span * spans.span_len
    span_last = min(kv_len, span_first + spans.span_len)
    first_key, last_key = row_block_keys(0, rows, rule)[:2]  # keys some row may see
    first_key, last_key = max(first_key, span_first), min(last_key, span_last)
    for key_start in range(first_key, last_key, block_k):
        cols = min(block_k, last_key - key_start)
        decode_block(q_scaled, keys[key_start:key_start + cols],
                     values[key_start:key_start + cols], 0, key_start, cols, rule, options,
                     scores, row_max, row_sum, acc, half_format)
    decode_write(b, 0, span, n_spans, outputs, spans, row_max, row_sum, acc, half_format)


@jit_helper
def decode_buffers(scratch, rows, head_dim, value_dim, block_k):
    """A decode task's buffers carved from a thread's ``scratch``
    (:func:`decode_scratch_size` entries), each on whole 64-byte lines:
    ``(q_scaled (rows, Dk), scores (rows, block_k), acc (rows, Dv), row_max (rows,),
    row_sum (rows,))``."""
    taken = 0
    q_scaled = block_view(scratch, rows, head_dim)  # (rows, Dk) log2(e) * scale * q
    taken += whole_lines(rows * head_dim)
    scores = block_view(scratch[taken:], rows, block_k)  # (rows, block_k) log2 units
    taken += whole_lines(rows * block_k)
    acc = block_view(scratch[taken:], rows, value_dim)  # (rows, Dv) unnormalised output
    taken += whole_lines(rows * value_dim)
    row_max = scratch[taken:taken + rows]  # (rows,) running max, log2 units
    row_sum = scratch[taken + rows:taken + 2 * rows]  # (rows,) running sum of 2**(s - max)
    return q_scaled, scores, acc, row_max, row_sum


@jit_helper
def decode_start(query_rows, scale, half_format, q_scaled, acc, row_max, row_sum):
    """Start a decode task: ``q_scaled = log2(e) * scale * query_rows`` ``(rows, Dk)``
    (any storage, converted as read), ``acc`` ``(rows, Dv)`` and ``row_sum`` zero,
    ``row_max`` ``-inf``."""
    score_scale = cast_like(scale * LOG2E, q_scaled)
    rows, head_dim = q_scaled.shape
    for r in range(rows):
        for d in range(head_dim):
            q_scaled[r, d] = as_compute(query_rows[r, d], half_format) * score_scale
        for d in range(acc.shape[1]):
            acc[r, d] = 0.0
        row_max[r] = -np.inf
        row_sum[r] = 0.0


@jit_helper
def decode_block(q_scaled, keys, values, head, key_start, cols, rule, options, scores,
                 row_max, row_sum, acc, half_format):
    """Fold ``cols`` keys from ``key_start`` into a task's running softmax: head
    ``head`` of ``keys`` ``(cols, heads, Dk)`` and ``values`` ``(cols, heads, Dv)``
    (any storage; a page of a paged cache, or ``heads`` 1), the rows' visibility by
    ``rule``, ``options``' softcap;
    ``scores`` ``(rows, block_k)`` is the block buffer, ``row_max``, ``row_sum``
    ``(rows,)`` and ``acc`` ``(rows, Dv)`` the running state."""
    decode_block_scores(q_scaled, keys, head, scores, cols, half_format)
    if options.has_softcap:  # the whole buffer: columns past cols are never read
        apply_softcap(scores, cast_like(options.softcap * LOG2E, scores), scores, False)
    for r in range(q_scaled.shape[0]):
        first, stop = visible_columns(r, key_start, cols, rule)
        decode_row_softmax(scores[r], first, stop, r, row_max, row_sum, acc)
    decode_block_values(scores, values, head, key_start, rule, acc, cols, half_format)


@jit_helper
def decode_write(b, row_start, span, n_spans, outputs, spans, row_max, row_sum, acc,
                 half_format):
    """Write a task's rows ``row_start + r`` of entry ``b``: to ``outputs`` (output in
    the inputs' storage, natural-log lse) when the keys are not split, else its span's
    share to ``spans.out[span, b]`` and log2 lse to ``spans.lse[span, b]``, merged
    afterwards (:func:`decode_finish`)."""
    row_stop = row_start + acc.shape[0]
    if n_spans == 1:  # (rows, Dv) in the inputs' storage, (rows,) natural log
        decode_finish(outputs.out[b, row_start:row_stop], outputs.lse[b, row_start:row_stop],
                      LN2, row_max, row_sum, acc, half_format)
    else:  # this span's share (rows, Dv), its lse (rows,) in log2 units, merged afterwards
        decode_finish(spans.out[span, b, row_start:row_stop],
                      spans.lse[span, b, row_start:row_stop], 1.0, row_max, row_sum, acc,
                      half_format)


@jit_helper
def decode_finish(out_rows, lse_rows, lse_unit, row_max, row_sum, acc, half_format):
    """Write each row's output ``out_rows`` ``(rows, Dv)`` (any storage; 16-bit rounded
    to nearest even) and lse ``lse_rows`` ``(rows,)`` (log2 sum-exp times
    ``lse_unit``) from its running ``row_max``, ``row_sum`` and ``acc``; a row with no
    visible key gets output 0 and lse ``-inf``."""
    rows, value_dim = acc.shape
    for r in range(rows):
        if row_sum[r] > 0.0 or row_sum[r] != row_sum[r]:  # a visible key (or a NaN)
            inverse_sum = 1.0 / row_sum[r]
            for d in range(value_dim):
                out_rows[r, d] = stored_value(acc[r, d] * inverse_sum, out_rows, half_format)
            lse_rows[r] = (row_max[r] + math.log2(row_sum[r])) * lse_unit
        else:  # no visible key: output 0, lse -inf
            out_rows[r, :] = stored_value(0.0, out_rows, half_format)
            lse_rows[r] = -np.inf


@jit_helper
def decode_block_scores(q_scaled, keys, head, scores, cols, half_format):
    """``scores[r, c] = q_scaled[r] . keys[c, head]`` for ``c < cols``: ``q_scaled``
    ``(rows, Dk)``, ``keys`` ``(cols, heads, Dk)`` (any storage: 16-bit keys are
    converted as they are read), ``scores`` ``(rows, block_k)``. Four key rows at a
    time are read from memory once and stay in L1 while every row takes its four dot
    products in one pass over ``Dk`` (each query element loaded once for the four),
    reductions LLVM vectorises at full width."""
    full_width_vectors()
    rows, head_dim = q_scaled.shape
    quads = cols - cols % 4
    for c in range(0, quads, 4):
        for r in range(rows):
            t0, t1, t2, t3 = dot_four(q_scaled[r], keys[c, head], keys[c + 1, head],
                                      keys[c + 2, head], keys[c + 3, head], half_format,
                                      cast_like(0.0, scores))
            scores[r, c] = t0
            scores[r, c + 1] = t1
            scores[r, c + 2] = t2
            scores[r, c + 3] = t3
    for c in range(quads, cols):
        for r in range(rows):
            scores[r, c] = dot_one(q_scaled[r], keys[c, head], half_format,
                                   cast_like(0.0, scores))


@jit_helper
def decode_row_softmax(scores, first, stop, r, row_max, row_sum, acc):
    """Fold columns ``[first, stop)`` of row ``r``'s block ``scores`` ``(cols,)`` (log2
    units) into its running maximum ``row_max[r]``, sum ``row_sum[r]`` and
    accumulator ``acc[r]`` ``(Dv,)``; overwrite them with ``2**(s - max)``. A larger
    maximum rescales the sum and accumulator by ``2**(old - new)``. NaN scores are
    skipped by the maximum and make the sum NaN.

    The loops run over the slice of seen columns from index 0 (an index that could
    be negative keeps Numba's wraparound test in the loop, which LLVM then does not
    vectorise): the maximum is :func:`~fastattn.kernels.vector_math.row_maximum`'s
    explicit vector loop, the probabilities and their sum SIMD at full width."""
    full_width_vectors()
    seen = scores[first:stop]  # (stop - first,) the columns the row sees
    top = row_maximum(seen, row_max[r])  # NaN never wins
    if top == -np.inf:  # nothing seen yet but -inf or NaN scores
        for c in range(seen.shape[0]):
            if seen[c] != seen[c]:
                row_sum[r] = np.nan  # a NaN score the row sees: the row is NaN
            seen[c] = 0.0
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
    for c in range(seen.shape[0]):
        p = softmax_exp2(seen[c] - top)  # in [0, 1], NaN stays
        seen[c] = p
        total += p
    row_sum[r] += total


@jit_helper
def decode_block_values(probabilities, values, head, key_start, rule, acc, cols, half_format):
    """``acc[r] += sum_c probabilities[r, c] * values[c, head]`` over the columns
    ``c < cols`` row ``r`` sees (keys ``key_start + c``): ``probabilities`` ``(rows,
    block_k)``, ``values`` ``(cols, heads, Dv)`` (any storage, converted as read),
    ``acc`` ``(rows, Dv)``.
    Each value row is read from memory once and added into every row that sees it;
    where every row sees the whole block, four value rows at a time (one load and
    store of ``acc`` for the four). A hidden key's value is never multiplied, so its
    NaN cannot reach a row."""
    full_width_vectors()
    rows, value_dim = acc.shape
    every_row_sees_all = True  # the usual decode block: no per-key visibility test
    for r in range(rows):
        first, stop = visible_columns(r, key_start, cols, rule)
        every_row_sees_all = every_row_sees_all and first == 0 and stop == cols
    quads = cols - cols % 4 if every_row_sees_all else 0
    for quad in range(quads // 4):
        c = 4 * quad
        v0, v1 = values[c, head], values[c + 1, head]  # (Dv,) each: four value rows
        v2, v3 = values[c + 2, head], values[c + 3, head]
        for r in range(rows):
            p0, p1 = probabilities[r, c], probabilities[r, c + 1]
            p2, p3 = probabilities[r, c + 2], probabilities[r, c + 3]
            add_four(acc[r], p0, p1, p2, p3, v0, v1, v2, v3, half_format)
    for c in range(quads, cols):
        for r in range(rows):
            if every_row_sees_all:
                first, stop = 0, cols
            else:
                first, stop = visible_columns(r, key_start, cols, rule)
            if first <= c < stop:
                add_one(acc[r], probabilities[r, c], values[c, head], half_format)


@jit_inlined
def dot_four(q_row, k0, k1, k2, k3, half_format, zero):
    """``(q_row . k0, q_row . k1, q_row . k2, q_row . k3)`` for a query row ``(Dk,)``
    and four key rows ``(Dk,)`` (any storage, converted as read), starting from
    ``zero`` (of the compute dtype): one pass over ``Dk``, each query element loaded
    once for the four; reductions LLVM vectorises at the caller's full width (inlined)."""
    t0 = t1 = t2 = t3 = zero
    if half_format == BFLOAT16:  # a loop per format, each with its conversion
        for d in range(q_row.shape[0]):
            q_d = q_row[d]
            t0 += q_d * as_compute(k0[d], BFLOAT16)
            t1 += q_d * as_compute(k1[d], BFLOAT16)
            t2 += q_d * as_compute(k2[d], BFLOAT16)
            t3 += q_d * as_compute(k3[d], BFLOAT16)
    else:
        for d in range(q_row.shape[0]):
            q_d = q_row[d]
            t0 += q_d * as_compute(k0[d], FLOAT16)
            t1 += q_d * as_compute(k1[d], FLOAT16)
            t2 += q_d * as_compute(k2[d], FLOAT16)
            t3 += q_d * as_compute(k3[d], FLOAT16)
    return t0, t1, t2, t3


@jit_inlined
def add_four(acc_row, p0, p1, p2, p3, v0, v1, v2, v3, half_format):
    """``acc_row += p0 v0 + p1 v1 + p2 v2 + p3 v3`` for an accumulator row ``(Dv,)``
    and four value rows ``(Dv,)`` (any storage, converted as read): one load and
    store of each accumulator element for the four (this helper is inlined)."""
    if half_format == BFLOAT16:  # a loop per format, each with its conversion
        for d in range(acc_row.shape[0]):
            acc_row[d] += ((p0 * as_compute(v0[d], BFLOAT16) + p1 * as_compute(v1[d], BFLOAT16))
                           + (p2 * as_compute(v2[d], BFLOAT16)
                              + p3 * as_compute(v3[d], BFLOAT16)))
    else:
        for d in range(acc_row.shape[0]):
            acc_row[d] += ((p0 * as_compute(v0[d], FLOAT16) + p1 * as_compute(v1[d], FLOAT16))
                           + (p2 * as_compute(v2[d], FLOAT16) + p3 * as_compute(v3[d], FLOAT16)))


@jit_inlined
def dot_one(q_row, key, half_format, zero):
    """``q_row . key`` for a query row and a key row ``(Dk,)`` (any storage, converted
    as read), starting from ``zero``; inlined, as :func:`dot_four`."""
    total = zero
    if half_format == BFLOAT16:
        for d in range(q_row.shape[0]):
            total += q_row[d] * as_compute(key[d], BFLOAT16)
    else:
        for d in range(q_row.shape[0]):
            total += q_row[d] * as_compute(key[d], FLOAT16)
    return total


@jit_inlined
def add_one(acc_row, p, value, half_format):
    """``acc_row += p value`` for an accumulator row and a value row ``(Dv,)`` (any
    storage, converted as read); inlined, as :func:`add_four`."""
    if half_format == BFLOAT16:
        for d in range(acc_row.shape[0]):
            acc_row[d] += p * as_compute(value[d], BFLOAT16)
    else:
        for d in range(acc_row.shape[0]):
            acc_row[d] += p * as_compute(value[d], FLOAT16)


@jit_helper
def decode_scratch_size(rows, head_dim, value_dim, block_k):
    """Scratch entries of a decode task: the scaled queries, the score block, the
    accumulator, the running maxima and sums, each whole 64-byte lines."""
    return (whole_lines(rows * head_dim) + whole_lines(rows * block_k)
            + whole_lines(rows * value_dim) + whole_lines(2 * rows))


def _decode_signature(dtype):
    return types.void(group_type(Inputs, dtype), group_type(ScoreOptions, dtype),
                      group_type(Visibility, dtype), TILING_TYPE,
                      *forward_result_types(dtype))


decode_kernel = kernel_per_dtype(_decode_forward, _decode_signature)
