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

Work: one task per entry, block of at most ``tiling.block_q`` query rows and key
span (:func:`fastattn._dispatch.tiling.decode_plan`); each thread runs an equal
contiguous share of the tasks and spans are merged in span order
(:func:`fastattn.kernels.forward.merge_key_spans`), so results are bitwise identical
for every thread count. A task walks its keys in blocks that never cross a page
(at most ``tiling.block_k`` keys), each a view of the page's rows ``(cols, Hkv, D)``
of which the task reads its kv head's, through the decode kernel's block step
(:func:`fastattn.kernels.decode.decode_block`): no page is gathered or copied.
16-bit pages are read as stored (``uint16`` variant, ``half_format``); queries come
in the compute dtype.
"""

from numba import prange, types

from fastattn.kernels.config import jit_helper, kernel_per_dtype
from fastattn.kernels.decode import (decode_block, decode_buffers, decode_scratch_size,
                                     decode_start, decode_write)
from fastattn.kernels.forward import merge_key_spans
from fastattn.kernels.groups import (TILING_TYPE, PagedInputs, ScoreOptions, Visibility,
                                     forward_result_types, group_type)
from fastattn.kernels.masking import KeyRule, row_block_keys
from fastattn.kernels.vector_math import line_aligned_rows


def _paged_forward(paged, options, visibility, tiling, outputs, spans):
    """Attention of every entry ``e`` of ``paged.query`` ``(N, Lq, Dk)`` over its
    pages: writes ``outputs.out[e]`` ``(Lq, Dv)`` (in the pages' storage) and
    ``outputs.lse[e]`` ``(Lq,)`` (natural log); ``outputs.weights`` is never written.

    ``visibility`` gives the reach left and right of the diagonal and
    ``diag_offset``, added to each entry's length (``-Lq``: bottom-right);
    ``options`` the scale and softcap. Keys are cut into spans of ``spans.span_len``
    (a multiple of ``tiling.block_k``); with more than one span each task writes its
    span's share to ``spans``, merged afterwards. ``tiling.slots`` threads each run
    an equal contiguous share of the ``N * row blocks * spans`` tasks, with scratch
    memory of their own.
    """
    n_entries, q_len, value_dim = outputs.out.shape
    block_q = tiling.block_q
    n_row_blocks = -(-q_len // block_q)
    n_spans = spans.out.shape[0]  # 1 for the placeholder: no split
    n_tasks, slots = n_entries * n_row_blocks * n_spans, tiling.slots
    scratch = line_aligned_rows(slots, decode_scratch_size(
        min(block_q, q_len), paged.query.shape[2], value_dim, tiling.block_k),
        outputs.lse)  # (slots, entries) in the compute dtype
    for slot in prange(slots):
        for task in range(slot * n_tasks // slots, (slot + 1) * n_tasks // slots):
            span = task % n_spans
            entry = task // (n_row_blocks * n_spans)
            row_start = (task // n_spans - entry * n_row_blocks) * block_q
            paged_task(entry, row_start, min(row_start + block_q, q_len), span, n_spans,
                       tiling.block_k, paged, options, visibility, outputs, spans,
                       scratch[slot])
    if n_spans > 1:
        merge_key_spans(spans.out, spans.lse, outputs.out, outputs.lse, paged.half_format)


@jit_helper
def paged_task(entry, row_start, row_stop, span, n_spans, block_k, paged, options, visibility,
               outputs, spans, scratch):
    """One task of :func:`_paged_forward`: query rows ``[row_start, row_stop)`` of
    ``entry`` over key span ``span`` of ``n_spans``, in blocks of at most ``block_k``
    keys within a page, its buffers carved from the thread's ``scratch``."""
    key_pages, value_pages = paged.key_pages, paged.value_pages
    page_size, head_dim = key_pages.shape[1], key_pages.shape[3]
    value_dim = value_pages.shape[3]
    rows = row_stop - row_start
    table = paged.block_table[paged.table_row[entry]]  # (max_pages,) physical pages
    head = paged.kv_head[entry]
    seq_len = paged.seq_lens[paged.table_row[entry]]
    # rows r of the task are queries row_start + r, at seq_len + diag_offset + row_start + r
    rule = KeyRule(seq_len, seq_len + visibility.diag_offset + row_start,
                   visibility.reach_left, visibility.reach_right)

    q_scaled, scores, acc, row_max, row_sum = decode_buffers(scratch, rows, head_dim,
                                                             value_dim, block_k)
    decode_start(paged.query[entry, row_start:row_stop], options.scale, paged.half_format,
                 q_scaled, acc, row_max, row_sum)

    span_first = span * spans.span_len
    first_key, last_key = row_block_keys(0, rows, rule)[:2]  # keys some row may see
    key_start = max(first_key, span_first)
    last_key = min(last_key, span_first + spans.span_len)
    while key_start < last_key:  # blocks within one page each
        page = table[key_start // page_size]
        first = key_start % page_size  # the block's first row in its page
        cols = min(block_k, page_size - first, last_key - key_start)
        decode_block(q_scaled, key_pages[page, first:first + cols],
                     value_pages[page, first:first + cols], head, key_start, cols, rule,
                     options, scores, row_max, row_sum, acc, paged.half_format)
        key_start += cols
    decode_write(entry, row_start, span, n_spans, outputs, spans, row_max, row_sum, acc,
                 paged.half_format)


def _paged_signature(dtype):
    return types.void(group_type(PagedInputs, dtype), group_type(ScoreOptions, dtype),
                      group_type(Visibility, dtype), TILING_TYPE,
                      *forward_result_types(dtype))


paged_kernel = kernel_per_dtype(_paged_forward, _paged_signature)
