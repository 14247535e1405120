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
for every thread count. A task walks its keys in blocks that never cross a page
(at most ``tiling.block_k`` keys), each a view of the page's rows ``(cols, Hkv, D)``
of which the task reads its kv head's, through the decode kernel's block step
(:func:`fastattn.kernels.decode.decode_block`): no page is gathered or copied.
16-bit pages are read as stored (``uint16`` variant, ``half_format``); queries come
in the compute dtype.
"""

from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from fastattn.kernels.config import jit_helper, kernel_per_dtype
from fastattn.kernels.decode import (decode_block, decode_buffers, decode_scratch_size,
                                     decode_start, decode_write)
from fastattn.kernels.forward import merge_key_spans
from fastattn.kernels.groups import (TILING_TYPE, PagedInputs, ScoreOptions, Visibility,
                                     forward_result_types, group_type)
from fastattn.kernels.masking import KeyRule, row_block_keys
from fastattn.kernels.vector_math import line_aligned_rows


@intrinsic
def prefetch_line(typingctx, array, byte_offset):
    """Ask the CPU to bring the 64-byte line ``byte_offset`` bytes into ``array``'s data
    into its caches (``llvm.prefetch``: a read, kept close); no effect on results, and
    never a fault, whatever the offset."""
    if not (isinstance(array, types.Array) and isinstance(byte_offset, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [args[1]])
        int32 = ir.IntType(32)
        function = builder.module.declare_intrinsic(
            "llvm.prefetch", [address.type],
            ir.FunctionType(ir.VoidType(), [address.type, int32, int32, int32]))
        builder.call(function, [address, ir.Constant(int32, 0), ir.Constant(int32, 3),
                                ir.Constant(int32, 1)])
        return context.get_dummy_value()
    return types.void(array, byte_offset), codegen


@jit_helper
def prefetch_rows(pages, page, first, cols):
    """Prefetch rows ``first`` to ``first + cols - 1`` of page ``page`` of ``pages``
    ``(n_pages, page_size, Hkv, D)`` (every kv head: one contiguous range), line by
    line."""
    row_bytes = pages.shape[2] * pages.shape[3] * pages.itemsize
    start = (page * pages.shape[1] + first) * row_bytes
    for line in range(0, cols * row_bytes, 64):
        prefetch_line(pages, start + line)


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
    scratch = line_aligned_rows(slots, group_size * decode_scratch_size(
        min(block_q, q_len), paged.query.shape[2], value_dim, tiling.block_k),
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
    of ``n_spans``, in blocks of at most ``block_k`` keys within a page, each block
    taken by every entry in turn; each entry's buffers carved from its share of the
    thread's ``scratch``."""
    key_pages, value_pages = paged.key_pages, paged.value_pages
    page_size, kv_heads = key_pages.shape[1], key_pages.shape[2]
    head_dim, value_dim = key_pages.shape[3], value_pages.shape[3]
    rows = row_stop - row_start
    table = paged.block_table[paged.table_row[first_entry]]  # (max_pages,) physical pages
    seq_len = paged.seq_lens[paged.table_row[first_entry]]
    # rows r of the task are queries row_start + r, at seq_len + diag_offset + row_start + r
    rule = KeyRule(seq_len, seq_len + visibility.diag_offset + row_start,
                   visibility.reach_left, visibility.reach_right)
    share = decode_scratch_size(rows, head_dim, value_dim, block_k)  # entries per entry
    for e in range(group_size):
        q_scaled, _, acc, row_max, row_sum = decode_buffers(
            scratch[e * share:(e + 1) * share], rows, head_dim, value_dim, block_k)
        decode_start(paged.query[first_entry + e, row_start:row_stop], options.scale,
                     paged.half_format, q_scaled, acc, row_max, row_sum)

    span_first = span * spans.span_len
    first_key, last_key = row_block_keys(0, rows, rule)[:2]  # keys some row may see
    key_start = max(first_key, span_first)
    last_key = min(last_key, span_first + spans.span_len)
    page = table[key_start // page_size] if key_start < last_key else 0
    while key_start < last_key:  # blocks within one page each
        first = key_start % page_size  # the block's first row in its page
        cols = min(block_k, page_size - first, last_key - key_start)
        next_start = key_start + cols
        next_page = table[next_start // page_size] if next_start < last_key else page
        if next_start < last_key and (next_page != page or kv_heads > 1):
            # the next block's rows, while this one is computed: the CPU's own
            # prefetchers stop at each 4 KiB memory page (a page jump; a kv head's
            # rows lie a row of every head apart)
            next_first = next_start % page_size
            next_cols = min(block_k, page_size - next_first, last_key - next_start)
            prefetch_rows(key_pages, next_page, next_first, next_cols)
            prefetch_rows(value_pages, next_page, next_first, next_cols)
        for e in range(group_size):
            q_scaled, scores, acc, row_max, row_sum = decode_buffers(
                scratch[e * share:(e + 1) * share], rows, head_dim, value_dim, block_k)
            decode_block(q_scaled, key_pages[page, first:first + cols],
                         value_pages[page, first:first + cols], paged.kv_head[first_entry + e],
                         key_start, cols, rule, options, scores, row_max, row_sum, acc,
                         paged.half_format)
        key_start, page = next_start, next_page
    for e in range(group_size):
        acc, row_max, row_sum = decode_buffers(scratch[e * share:(e + 1) * share], rows,
                                               head_dim, value_dim, block_k)[2:]
        decode_write(first_entry + e, row_start, span, n_spans, outputs, spans, row_max,
                     row_sum, acc, paged.half_format)


def _paged_signature(dtype):
    return types.void(group_type(PagedInputs, dtype), group_type(ScoreOptions, dtype),
                      group_type(Visibility, dtype), TILING_TYPE,
                      *forward_result_types(dtype))


paged_kernel = kernel_per_dtype(_paged_forward, _paged_signature)
