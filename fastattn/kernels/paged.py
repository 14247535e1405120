"""Attention over a paged KV cache, read in place: the decode kernel's loops over pages.

A paged cache keeps the keys and values of many sequences in one pool of pages,
``key_pages`` ``(n_pages, page_size, Hkv, Dk)`` (values likewise); row ``t`` of a
sequence's ``block_table`` maps its logical page ``p`` (tokens ``p * page_size``
to ``(p + 1) * page_size - 1``) to a physical page. Batch entry ``e`` (one query
head, or under grouped-query decoding the query heads of one kv head folded into
rows) reads the table row ``table_row[e]`` and the kv head ``kv_head[e]`` of each
page, and holds ``seq_lens[table_row[e]]`` tokens, the ``Lq`` new ones included,
so its query ``i`` sits at position ``seq_lens - Lq + i`` (bottom-right). For a row
``i`` and the keys ``j`` it sees (:mod:`fastattn.kernels.masking`, with the entry's
diagonal offset ``seq_lens + diag_offset``), in log2 units (softcapped as in
:mod:`fastattn.kernels.decode`),

.. math::

    s_{ij} = \\log_2(e)\\, \\mathrm{scale}\\; q_i \\cdot k_j,\\qquad
    \\mathrm{out}_i = \\frac{\\sum_j 2^{s_{ij} - m_i} v_j}{\\sum_j 2^{s_{ij} - m_i}},
    \\qquad \\mathrm{lse}_i = \\ln 2\\, \\big(m_i + \\log_2 \\sum_j 2^{s_{ij} - m_i}\\big).

Work: one task per sequence (its entries), block of at most ``tiling.block_q`` query
rows and key span (:func:`fastattn._dispatch.tiling.decode_plan`); each thread runs an equal
contiguous share of the tasks and spans are merged in span order
(:func:`fastattn.kernels.forward.merge_key_spans`), so results are bitwise identical
for every thread count. A task walks its keys in blocks of ``tiling.block_k`` that
may span several pages (each key row found through the block table), with the
decode kernel's online softmax (:func:`fastattn.kernels.decode.decode_row_softmax`)
but its own score and value loops: a page row holds every kv head's key
``(Hkv, D)``, one contiguous run, so the loops take each row once, in the order it
lies in memory, for every entry of the task (every kv head) in turn, four key rows
at a time as in the decode kernel (one load of each query element and of each
accumulator element for the four; rows found one by one, so four may span a page
boundary). The CPU's prefetchers stop at every 4 KiB memory page and a page of the
cache lies anywhere in the pool, so each loop asks, :data:`PREFETCH_AHEAD` tokens
ahead, for the first two lines of every 4 KiB of the rows it will read
(:func:`prefetch_row_starts`): the hardware streams the rest. (Whole rows asked for
measured slower than none; two lines per 4 KiB, 16 tokens ahead, took paged decoding
from about 1.14 to 1.01-1.07 x the contiguous kernel on an AMD EPYC Zen 4.) A pass per
head would read one head's ``D`` entries of each row, ``Hkv * D`` apart, which the
CPU's prefetchers do not follow (they stop at every 4 KiB memory page); this way
memory is read as in the contiguous decode kernel. No page is gathered or copied.
16-bit pages are read as stored (``uint16`` variant, ``half_format``); queries come
in the compute dtype.
"""

from numba import prange, types

from fastattn.kernels.config import jit_helper, jit_inlined, kernel_per_dtype
from fastattn.kernels.decode import (add_four, add_one, decode_row_softmax, decode_start,
                                     decode_write, dot_four, dot_one)
from fastattn.kernels.forward import merge_key_spans
from fastattn.kernels.groups import (TILING_TYPE, PagedInputs, ScoreOptions, Visibility,
                                     forward_result_types, group_type)
from fastattn.kernels.half import BFLOAT16, FLOAT16, as_compute
from fastattn.kernels.masking import KeyRule, row_block_keys, visible_columns
from fastattn.kernels.scores import apply_softcap
from fastattn.kernels.vector_math import (LOG2E, cast_like, full_width_vectors,
                                          line_aligned_rows, prefetch_line, whole_lines)

PREFETCH_AHEAD = 16
"""How many tokens ahead of the rows being read the score and value loops ask for the
first lines of each 4 KiB of the rows (:func:`prefetch_row_starts`)."""


def _paged_forward(paged, options, visibility, tiling, outputs, spans):
    """Attention of every entry ``e`` of ``paged.query`` ``(N, Lq, Dk)`` over its
    pages: writes ``outputs.out[e]`` ``(Lq, Dv)`` (in the pages' storage) and
    ``outputs.lse[e]`` ``(Lq,)`` (natural log); ``outputs.weights`` is never written.

    The entries come in groups of ``N // rows of the block table``, a group per
    table row (its sequence's kv heads, or query heads), and a task takes a whole
    group: each page's rows are read for every head while they are in cache, and
    the memory is read in the order it lies. ``visibility`` gives the reach left and
    right of the diagonal and ``diag_offset``, added to each sequence's length
    (``-Lq``: bottom-right); ``options`` the scale and softcap. Keys are cut into
    spans of ``spans.span_len`` (a multiple of ``tiling.block_k``); with more than one
    span each task writes its span's share to ``spans``, merged afterwards.
    ``tiling.slots`` threads each run an equal contiguous share of the ``groups * row
    blocks * spans`` tasks, with scratch memory of their own.
    """
    n_entries, q_len, value_dim = outputs.out.shape
    n_groups = paged.block_table.shape[0]
    group_size = n_entries // max(n_groups, 1)
    block_q = tiling.block_q
    n_row_blocks = -(-q_len // block_q)
    n_spans = spans.out.shape[0]  # 1 for the placeholder: no split
    n_tasks, slots = n_groups * n_row_blocks * n_spans, tiling.slots
    scratch = line_aligned_rows(slots, paged_scratch_size(
        group_size, min(block_q, q_len), paged.query.shape[2], value_dim, tiling.block_k),
        outputs.lse)  # (slots, entries) in the compute dtype
    for slot in prange(slots):
        for task in range(slot * n_tasks // slots, (slot + 1) * n_tasks // slots):
            span = task % n_spans
            group = task // (n_row_blocks * n_spans)
            row_start = (task // n_spans - group * n_row_blocks) * block_q
            paged_task(group * group_size, group_size, row_start,
                       min(row_start + block_q, q_len), span, n_spans, tiling.block_k, paged,
                       options, visibility, outputs, spans, scratch[slot])
    if n_spans > 1:
        merge_key_spans(spans.out, spans.lse, outputs.out, outputs.lse, paged.half_format)


@jit_helper
def paged_task(first_entry, group_size, row_start, row_stop, span, n_spans, block_k, paged,
               options, visibility, outputs, spans, scratch):
    """One task of :func:`_paged_forward`: query rows ``[row_start, row_stop)`` of the
    ``group_size`` entries from ``first_entry`` (one sequence) over key span ``span``
    of ``n_spans``, in blocks of at most ``block_k`` keys (across pages), each block's
    rows walked once in memory order for every entry (:func:`paged_block`); the
    entries' buffers carved from the thread's ``scratch``."""
    key_pages, value_pages = paged.key_pages, paged.value_pages
    head_dim, value_dim = key_pages.shape[3], value_pages.shape[3]
    rows = row_stop - row_start
    table = paged.block_table[paged.table_row[first_entry]]  # (max_pages,) physical pages
    seq_len = paged.seq_lens[paged.table_row[first_entry]]
    heads = paged.kv_head[first_entry:first_entry + group_size]  # (entries,) kv head of each
    # rows r of the task are queries row_start + r, at seq_len + diag_offset + row_start + r
    rule = KeyRule(seq_len, seq_len + visibility.diag_offset + row_start,
                   visibility.reach_left, visibility.reach_right)
    q_scaled, scores, acc, row_max, row_sum = paged_buffers(scratch, group_size, rows,
                                                            head_dim, value_dim, block_k)
    for e in range(group_size):
        decode_start(paged.query[first_entry + e, row_start:row_stop], options.scale,
                     paged.half_format, q_scaled[e], acc[e], row_max[e], row_sum[e])

    span_first = span * spans.span_len
    first_key, last_key = row_block_keys(0, rows, rule)[:2]  # keys some row may see
    first_key = max(first_key, span_first)
    last_key = min(last_key, span_first + spans.span_len)
    for key_start in range(first_key, last_key, block_k):  # blocks across pages
        cols = min(block_k, last_key - key_start)
        paged_block(q_scaled, key_pages, value_pages, table, heads, key_start, cols, rule,
                    options, scores, row_max, row_sum, acc, paged.half_format)
    for e in range(group_size):
        decode_write(first_entry + e, row_start, span, n_spans, outputs, spans, row_max[e],
                     row_sum[e], acc[e], paged.half_format)


@jit_helper
def paged_buffers(scratch, entries, rows, head_dim, value_dim, block_k):
    """A paged task's buffers carved from a thread's ``scratch``
    (:func:`paged_scratch_size` entries), each on whole 64-byte lines:
    ``(q_scaled (entries, rows, Dk), scores (entries, rows, block_k), acc (entries,
    rows, Dv), row_max (entries, rows), row_sum (entries, rows))``."""
    taken = 0
    q_scaled = scratch[:entries * rows * head_dim].reshape((entries, rows, head_dim))
    taken += whole_lines(entries * rows * head_dim)
    scores = scratch[taken:taken + entries * rows * block_k].reshape((entries, rows, block_k))
    taken += whole_lines(entries * rows * block_k)
    acc = scratch[taken:taken + entries * rows * value_dim].reshape((entries, rows, value_dim))
    taken += whole_lines(entries * rows * value_dim)
    row_max = scratch[taken:taken + entries * rows].reshape((entries, rows))
    taken += whole_lines(entries * rows)
    row_sum = scratch[taken:taken + entries * rows].reshape((entries, rows))
    return q_scaled, scores, acc, row_max, row_sum


@jit_helper
def paged_scratch_size(entries, rows, head_dim, value_dim, block_k):
    """Scratch entries of a paged task (:func:`paged_buffers`)."""
    return (whole_lines(entries * rows * head_dim) + whole_lines(entries * rows * block_k)
            + whole_lines(entries * rows * value_dim) + 2 * whole_lines(entries * rows))


@jit_helper
def paged_block(q_scaled, key_pages, value_pages, table, heads, key_start, cols, rule,
                options, scores, row_max, row_sum, acc, half_format):
    """Fold ``cols`` keys from ``key_start`` into every entry's running softmax: entry
    ``e`` reads kv head ``heads[e]`` of the key and value rows of tokens ``key_start``
    to ``key_start + cols - 1``, found in ``key_pages`` ``(n_pages, page_size, Hkv,
    Dk)`` and ``value_pages`` through the sequence's ``table`` ``(max_pages,)``; its
    rows' visibility by ``rule`` (the same for every entry); ``scores`` ``(entries, rows, block_k)``, ``row_max``, ``row_sum``
    ``(entries, rows)`` and ``acc`` ``(entries, rows, Dv)`` as in
    :func:`fastattn.kernels.decode.decode_block`, one per entry."""
    paged_block_scores(q_scaled, key_pages, table, heads, key_start, scores, cols,
                       rule.kv_stop, half_format)
    entries, rows = row_max.shape
    for e in range(entries):
        if options.has_softcap:  # the whole buffer: columns past cols are never read
            apply_softcap(scores[e], cast_like(options.softcap * LOG2E, scores), scores[e],
                          False)
        for r in range(rows):
            first, stop = visible_columns(r, key_start, cols, rule)
            decode_row_softmax(scores[e, r], first, stop, r, row_max[e], row_sum[e], acc[e])
    paged_block_values(scores, value_pages, table, heads, key_start, rule, acc, cols,
                       half_format)


@jit_helper
def paged_block_scores(q_scaled, key_pages, table, heads, key_start, scores, cols, kv_stop,
                       half_format):
    """``scores[e, r, c] = q_scaled[e, r] . keys[c, heads[e]]`` for ``c < cols``: four
    key rows at a time (found through ``table``, a page apart or not), every entry in
    turn, each row taking its four dot products in one pass over ``Dk``
    (:func:`fastattn.kernels.decode.dot_four`); the block's memory read once, in the
    order it lies (``heads`` ascending), the rows :data:`PREFETCH_AHEAD` tokens on
    (below ``kv_stop``, the sequence's length) asked for meanwhile."""
    full_width_vectors()
    entries, rows = scores.shape[:2]
    page_size = key_pages.shape[1]
    zero = cast_like(0.0, scores)
    quads = cols - cols % 4
    for quad in range(quads // 4):
        c = 4 * quad
        keys0, keys1, keys2, keys3 = four_page_rows(key_pages, table, key_start + c,
                                                    page_size)  # (Hkv, Dk) each
        prefetch_row_starts(key_pages, table, key_start + c + PREFETCH_AHEAD, kv_stop)
        for e in range(entries):
            head = heads[e]
            for r in range(rows):
                t0, t1, t2, t3 = dot_four(q_scaled[e, r], keys0[head], keys1[head],
                                          keys2[head], keys3[head], half_format, zero)
                scores[e, r, c] = t0
                scores[e, r, c + 1] = t1
                scores[e, r, c + 2] = t2
                scores[e, r, c + 3] = t3
    for c in range(quads, cols):
        keys = page_row(key_pages, table, key_start + c, page_size)  # (Hkv, Dk)
        for e in range(entries):
            for r in range(rows):
                scores[e, r, c] = dot_one(q_scaled[e, r], keys[heads[e]], half_format, zero)


@jit_helper
def paged_block_values(probabilities, value_pages, table, heads, key_start, rule, acc, cols,
                       half_format):
    """``acc[e, r] += sum_c probabilities[e, r, c] * values[c, heads[e]]`` over the
    columns ``c < cols`` row ``r`` sees, every entry in turn (memory order); where
    every row sees the whole block, four value rows at a time
    (:func:`fastattn.kernels.decode.add_four`), asking for the rows
    :data:`PREFETCH_AHEAD` tokens on. A hidden key's value is never multiplied."""
    full_width_vectors()
    entries, rows = acc.shape[:2]
    every_row_sees_all = True  # the usual decode block: no per-key visibility test
    for r in range(rows):
        first, stop = visible_columns(r, key_start, cols, rule)
        every_row_sees_all = every_row_sees_all and first == 0 and stop == cols
    page_size = value_pages.shape[1]
    quads = cols - cols % 4 if every_row_sees_all else 0
    for quad in range(quads // 4):
        c = 4 * quad
        values0, values1, values2, values3 = four_page_rows(value_pages, table,
                                                            key_start + c,
                                                            page_size)  # (Hkv, Dv) each
        prefetch_row_starts(value_pages, table, key_start + c + PREFETCH_AHEAD, rule.kv_stop)
        for e in range(entries):
            head = heads[e]
            for r in range(rows):
                add_four(acc[e, r], probabilities[e, r, c], probabilities[e, r, c + 1],
                         probabilities[e, r, c + 2], probabilities[e, r, c + 3],
                         values0[head], values1[head], values2[head], values3[head],
                         half_format)
    for c in range(quads, cols):
        values = page_row(value_pages, table, key_start + c, page_size)  # (Hkv, Dv)
        for e in range(entries):
            for r in range(rows):
                if every_row_sees_all:
                    first, stop = 0, cols
                else:
                    first, stop = visible_columns(r, key_start, cols, rule)
                if first <= c < stop:
                    add_one(acc[e, r], probabilities[e, r, c], values[heads[e]], half_format)


@jit_inlined
def prefetch_row_starts(pages, table, token, kv_stop):
    """Ask for the first two 64-byte lines of every 4 KiB of the rows of tokens
    ``token`` to ``token + 3`` below ``kv_stop`` in ``pages`` ``(n_pages, page_size,
    Hkv, D)`` (found through ``table``): the CPU's prefetchers then stream the rest,
    but they do not start on their own where a new 4 KiB memory page begins. Changes
    no value."""
    page_size = pages.shape[1]
    row_bytes = pages.shape[2] * pages.shape[3] * pages.itemsize
    for t in range(token, min(token + 4, kv_stop)):
        page, row = divmod(t, page_size)
        start = (table[page] * page_size + row) * row_bytes  # the row's first byte
        for offset in range(0, row_bytes, 4096):
            prefetch_line(pages, start + offset)
            prefetch_line(pages, start + offset + 64)


@jit_inlined
def four_page_rows(pages, table, token, page_size):
    """The rows ``(Hkv, D)`` of tokens ``token`` to ``token + 3`` (:func:`page_row`)."""
    return (page_row(pages, table, token, page_size),
            page_row(pages, table, token + 1, page_size),
            page_row(pages, table, token + 2, page_size),
            page_row(pages, table, token + 3, page_size))


@jit_inlined
def page_row(pages, table, token, page_size):
    """Token ``token``'s row ``(Hkv, D)`` of a sequence's ``pages`` ``(n_pages,
    page_size, Hkv, D)``, found through its ``table`` ``(max_pages,)``."""
    page, row = divmod(token, page_size)
    return pages[table[page], row]


def _paged_signature(dtype):
    return types.void(group_type(PagedInputs, dtype), group_type(ScoreOptions, dtype),
                      group_type(Visibility, dtype), TILING_TYPE,
                      *forward_result_types(dtype))


paged_kernel = kernel_per_dtype(_paged_forward, _paged_signature)
