"""Run a validated paged attention call through :mod:`fastattn.kernels.paged`.

:func:`run_paged` lays a :class:`~fastattn._contract.paged_checks.PagedProblem` out as
the kernel's :class:`~fastattn.kernels.groups.PagedInputs` (the page pools as they
are: no gather), tiles it by its shape alone (:func:`fastattn._dispatch.tiling.decode_plan`)
and shapes the results ``(B, H, Lq, Dv)`` and ``(B, H, Lq)``.

Grouped-query decoding (``Lq == 1``, no window) folds the query heads of each kv head
into the rows of one entry, so each kv head's pages are read once, not once per query
head (as :func:`fastattn._dispatch.layout.fold_query_groups` does for the decode
kernel: every folded row sits at the sequence's last position and sees every key).

Small calls run on the calling thread: a kernel call whose pages hold fewer than
:data:`SERIAL_KEYS` keys in all (a short prompt, the first steps of a decoding loop)
costs less than waking the thread team (this module's rule; tiling does not depend
on it, so the results are the same bits).
"""

from typing import NamedTuple

import numpy as np
from numba import get_num_threads, set_num_threads

from fastattn._contract.problem import key_reach
from fastattn._dispatch import tiling
from fastattn._dispatch.layout import (as_stored, placeholder, plain_score_groups,
                                       plain_visibility)
from fastattn._dispatch.run import key_spans, result_buffers
from fastattn._runtime import settings
from fastattn.kernels.groups import ForwardOutputs, PagedInputs, Tiling
from fastattn.kernels.paged import paged_kernel

# Query rows per task of a prefill (Lq > 1): the decode kernel's most rows
PAGED_BLOCK_Q = tiling.DECODE_MAX_ROWS
# Calls whose entries hold fewer keys than this in all run on one thread (see above)
SERIAL_KEYS = 16384


class PagedLayout(NamedTuple):
    """The sizes :func:`fastattn._dispatch.run.result_buffers` and ``key_spans`` read:
    rows per entry ``q_len`` (the folded heads, or ``Lq``), ``value_dim`` and the
    dtypes."""

    q_len: int
    value_dim: int
    compute_dtype: np.dtype
    kernel_dtype: np.dtype


def run_paged(problem):
    """``(out (B, H, Lq, Dv), lse (B, H, Lq))`` of a validated paged ``problem``:
    ``out`` in the result dtype, ``lse`` in the compute dtype."""
    query = problem.query
    batch, heads, q_len, head_dim = query.shape
    group, kv_heads = problem.gqa_group, heads // problem.gqa_group
    window = problem.options.window
    if q_len == 1 and group > 1 and window is None:  # one entry per (sequence, kv head)
        rows, table_row = group, np.repeat(np.arange(batch), kv_heads)  # (B * Hkv,)
        kv_head = np.tile(np.arange(kv_heads), batch)  # (B * Hkv,)
    else:  # one entry per (sequence, query head)
        rows, table_row = q_len, np.repeat(np.arange(batch), heads)  # (B * H,)
        kv_head = np.tile(np.arange(heads) // group, batch)  # (B * H,)
    n_entries = table_row.shape[0]
    layout = PagedLayout(rows, problem.value_dim, problem.compute_dtype, problem.kernel_dtype)
    out, lse = result_buffers(layout, n_entries)  # (N, rows, Dv), (N, rows)
    max_len = problem.max_len
    if n_entries and rows and max_len:
        block_q = min(rows, PAGED_BLOCK_Q)
        # tasks: one per sequence (all its entries), row block and key span; key
        # blocks span pages
        block_k, span_len, n_spans = tiling.decode_plan(batch * -(-rows // block_q), max_len)
        spans = key_spans(layout, n_entries, span_len, n_spans)
        paged = PagedInputs(
            query=np.ascontiguousarray(query, problem.compute_dtype).reshape(
                n_entries, rows, head_dim),  # (N, rows, Dk)
            key_pages=as_stored(problem.key_pages, problem.kernel_dtype),
            value_pages=as_stored(problem.value_pages, problem.kernel_dtype),
            block_table=problem.block_table, seq_lens=problem.seq_lens,
            table_row=table_row.astype(np.int64), kv_head=kv_head.astype(np.int64),
            half_format=problem.half_format)
        options = plain_score_groups(problem.compute_dtype, problem.scale, 1, 0,
                                     problem.options.softcap)[0]
        visibility = plain_visibility(
            -q_len, *key_reach(window, problem.options.causal, rows, max_len))
        settings.apply()
        threads = get_num_threads()
        serial = threads > 1 and n_entries * max_len < SERIAL_KEYS
        if serial:
            set_num_threads(1)
        try:
            paged_kernel(problem.kernel_dtype)(
                paged, options, visibility,
                Tiling(block_q=block_q, block_k=block_k,
                       slots=1 if serial else threads),
                ForwardOutputs(out, lse, placeholder(problem.compute_dtype, 3, writeable=True),
                               False),
                spans)
        finally:
            if serial:
                set_num_threads(threads)
    if problem.kernel_dtype == np.uint16:
        out = out.view(problem.key_pages.dtype)
    out = out.astype(problem.out_dtype, copy=False).reshape(batch, heads, q_len,
                                                            problem.value_dim)
    return out, lse.reshape(batch, heads, q_len)
