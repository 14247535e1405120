"""Run a packed call (:class:`~fastattn._contract.packed_sequences.VarlenProblem`) through the
forward and backward kernels, with no work on padding.

The kernels see the packed arrays as head-major stacks ``(H, total, D)`` (the one
copy of the inputs, and none when the caller's arrays are head-major already) and
the :class:`~fastattn.kernels.groups.Segments` group: where each sequence lies, and a
list of work items, each one ``(sequence, head, block of rows)`` of the forward or
``(sequence, head, key group)`` of the backward, with its estimated cost, by which
the threads share them (:mod:`fastattn.kernels.segments`). Batch entry ``e`` is head
``e % H`` of sequence ``e // H``: the ALiBi slopes, the dropout decisions and the
user functions' ``b`` and ``h`` follow from it as for a padded ``(n_seq, H)`` batch.
"""

import numpy as np
from numba import get_num_threads

from fastattn._dispatch import run, tiling
from fastattn._dispatch.layout import (absent_operand, as_stored, identity_index, placeholder,
                                       problem_hook, score_options)
from fastattn._runtime import settings
from fastattn._runtime.threads import single_threaded_blas
from fastattn.kernels.groups import (BackwardInputs, ForwardOutputs, Gradients, Inputs,
                                     KeySpans, Segments, Tiling, Visibility)

# Cost of a work item besides its scores (in scores): its start, and each row's
# softmax and output (the forward) or each row's share of the gradients (the backward).
ITEM_COST = 4096
ROW_COST = 64


def varlen_arguments(varlen, hook):
    """The kernels' leading argument groups of a packed call
    ``(Inputs, ScoreOptions, mask, bias, Visibility)``: head-major stacks indexed by
    each entry's head (kv head ``h // group``), no mask, bias or ``kv_lengths``, the
    call's reach about each sequence's diagonal (offsets in :func:`segments_group`)."""
    problem = varlen.problem
    stored, dtype = problem.kernel_dtype, problem.compute_dtype
    n_entries = varlen.n_seq * varlen.heads
    head = identity_index(n_entries) % varlen.heads  # (N,) the head of entry e
    kv_head = head // problem.gqa_group  # (N,)
    inputs = Inputs(query=as_stored(problem.query, stored),  # (H, total_q, Dk)
                    key=as_stored(problem.key, stored),  # (Hkv, total_k, Dk)
                    value=as_stored(problem.value, stored),  # (Hkv, total_k, Dv)
                    query_index=head, key_index=kv_head, value_index=kv_head,
                    half_format=problem.half_format)
    reach_left, reach_right = problem.key_reach()
    visibility = Visibility(kv_lengths=identity_index(1), has_kv_lengths=False, diag_offset=0,
                            reach_left=reach_left, reach_right=reach_right,
                            block_states=placeholder(np.int8), has_block_mask=False,
                            block_states_index=identity_index(1))
    return (inputs, score_options(problem, hook), absent_operand(np.dtype(np.bool_)),
            absent_operand(dtype), visibility)


def visible_counts(varlen, row_positions, kv_lens, diag_offsets):
    """How many keys each query row sees under the call's causal and window rules:
    int64, shaped like ``row_positions`` (positions within their sequences, whose key
    counts and diagonal offsets are ``kv_lens`` and ``diag_offsets``, same shape)."""
    left, right = varlen.problem.key_reach()
    lowest = np.maximum(row_positions + diag_offsets - left, 0)
    highest = np.minimum(row_positions + diag_offsets + right + 1, kv_lens)
    return np.maximum(highest - lowest, 0)


def segments_group(varlen, work, work_cost):
    """The :class:`Segments` of a packed call with these work items ``(n_items, 3)``
    and their costs ``(n_items,)``."""
    cumulative = np.zeros(work_cost.shape[0] + 1, np.int64)  # (n_items + 1,)
    np.cumsum(work_cost, out=cumulative[1:])
    return Segments(query_starts=varlen.query_starts, key_starts=varlen.key_starts,
                    diag_offsets=varlen.diag_offsets, heads=varlen.heads,
                    work=np.ascontiguousarray(work, np.int64), work_cost=cumulative,
                    present=True)


def forward_work(varlen, block_q):
    """The forward's work items ``(n_items, 3)`` ``(entry, first row, stop row)``, one
    per block of ``block_q`` rows of each (sequence, head), rows counted within the
    sequence, and their costs ``(n_items,)``: the scores their rows see (the mean of
    the first and last row's, times the rows), plus :data:`ITEM_COST` and
    :data:`ROW_COST` per row."""
    heads, q_lens = varlen.heads, varlen.q_lens
    blocks = -(-q_lens // block_q)  # (n_seq,) row blocks per head
    per_entry = np.repeat(blocks, heads)  # (N,)
    entries = np.repeat(np.arange(per_entry.shape[0]), per_entry)  # (n_items,)
    first_item = np.repeat(np.cumsum(per_entry) - per_entry, per_entry)  # (n_items,)
    first_row = (np.arange(entries.shape[0]) - first_item) * block_q  # (n_items,)
    sequence = entries // heads  # (n_items,)
    stop_row = np.minimum(first_row + block_q, q_lens[sequence])  # (n_items,)
    kv_lens, offsets = varlen.kv_lens[sequence], varlen.diag_offsets[sequence]
    seen = (visible_counts(varlen, first_row, kv_lens, offsets)
            + visible_counts(varlen, stop_row - 1, kv_lens, offsets))  # (n_items,) doubled
    rows = stop_row - first_row  # (n_items,)
    cost = rows * seen // 2 + rows * ROW_COST + ITEM_COST  # (n_items,)
    return np.stack([entries, first_row, stop_row], axis=1), cost


def forward_block_q(varlen):
    """Rows per forward work item: ``FORWARD_BLOCK_Q``, halved (down to 16) until the
    call has ``FORWARD_MIN_TASKS`` items; a function of the shape alone."""
    block_q = tiling.FORWARD_BLOCK_Q
    while block_q > 16 and varlen.heads * int(
            (-(-varlen.q_lens // block_q)).sum()) < tiling.FORWARD_MIN_TASKS:
        block_q //= 2
    return block_q


def run_varlen_forward(varlen):
    """Lay a packed call out for the forward kernel, run it, and return ``(out, lse)``:
    ``out`` ``(total_q, H, Dv)`` (a view of the kernel's head-major result) in the
    result dtype, ``lse`` ``(H, total_q)`` in the compute dtype."""
    problem = varlen.problem
    dtype, heads, total_q = problem.compute_dtype, varlen.heads, problem.q_len
    out = np.empty((heads, total_q, problem.value_dim), problem.kernel_dtype)  # (H, total_q, Dv)
    lse = np.empty((heads, total_q), dtype)  # (H, total_q)
    if varlen.n_seq and total_q:
        settings.apply()
        block_q = forward_block_q(varlen)
        block_k = tiling.FORWARD_BLOCK_K
        work, cost = forward_work(varlen, block_q)
        segments = segments_group(varlen, work, cost)
        hook = problem_hook(problem)
        arguments = varlen_arguments(varlen, hook)
        outputs = ForwardOutputs(out, lse, placeholder(dtype, 3, writeable=True), False)
        spans = KeySpans(max(problem.kv_len, 1), placeholder(dtype, 4, writeable=True),
                         placeholder(dtype, 3, writeable=True))  # never split
        blocks = Tiling(block_q, block_k, get_num_threads())  # a slot per thread
        longest_keys = int(varlen.kv_lens.max(initial=0))
        largest_product = block_q * min(longest_keys, block_k) * max(problem.head_dim,
                                                                     problem.value_dim)
        with single_threaded_blas(largest_product > tiling.SERIAL_BLAS_WORK):
            marked = run.forward_kernel(problem.kernel_dtype)(*arguments, blocks, outputs,
                                                              spans, segments)
            if marked:  # rows a NaN met: again, summing visible keys only
                exact_rows(varlen, arguments, blocks, outputs, segments)
        hook.raise_error(problem)
    if problem.kernel_dtype == np.uint16:
        out = out.view(problem.out_dtype)
    elif problem.out_dtype != problem.compute_dtype:
        out = out.astype(problem.out_dtype)
    return out.transpose(1, 0, 2), lse  # (total_q, H, Dv), (H, total_q)


def exact_rows(varlen, arguments, blocks, outputs, segments):
    """The rows whose lse the forward marked NaN, computed again by
    :data:`~fastattn.kernels.forward.exact_rows_kernel` (16-bit inputs widened to
    float32 for it, as :func:`fastattn._dispatch.run.exact_rows` does)."""
    heads_rows = np.argwhere(np.isnan(outputs.lse))  # (K, 2) (head, packed row)
    sequence = np.searchsorted(varlen.query_starts, heads_rows[:, 1], side="right") - 1  # (K,)
    rows = np.ascontiguousarray(np.stack(
        [sequence * varlen.heads + heads_rows[:, 0],
         heads_rows[:, 1] - varlen.query_starts[sequence]], axis=1), np.int64)  # (K, 2)
    problem = varlen.problem
    if problem.kernel_dtype == problem.compute_dtype:
        run.exact_rows_kernel(problem.compute_dtype)(*arguments, blocks, outputs, rows, segments)
        return
    dtype = problem.compute_dtype
    widened = varlen.replace_inputs(query=problem.query.astype(dtype),
                                    key=problem.key.astype(dtype),
                                    value=problem.value.astype(dtype))
    out = np.empty(outputs.out.shape, dtype)  # (H, total_q, Dv); only the rows are written
    run.exact_rows_kernel(dtype)(*varlen_arguments(widened, problem_hook(widened.problem)),
                                 blocks, outputs._replace(out=out), rows, segments)
    heads, packed_rows = heads_rows[:, 0], heads_rows[:, 1]
    outputs.out.view(problem.out_dtype)[heads, packed_rows] = out[heads, packed_rows]


def backward_work(varlen, n_groups, block_k):
    """The backward's work items ``(n_items, 3)`` ``(entry, key group, 0)``: the key
    groups of each (sequence, head) that hold a key block (at most ``n_groups``;
    none for a sequence without queries or keys), and their costs ``(n_items,)``: the
    sequence's visible scores shared evenly among its groups, plus
    :data:`ITEM_COST` and :data:`ROW_COST` per query row."""
    heads, q_lens, kv_lens = varlen.heads, varlen.q_lens, varlen.kv_lens
    groups = np.where(q_lens > 0, np.minimum(-(-kv_lens // block_k), n_groups), 0)  # (n_seq,)
    rows = np.arange(varlen.problem.q_len)  # (total_q,) packed rows
    row_sequence = np.searchsorted(varlen.query_starts, rows, side="right") - 1  # (total_q,)
    seen = visible_counts(varlen, rows - varlen.query_starts[row_sequence],
                          kv_lens[row_sequence], varlen.diag_offsets[row_sequence])
    seen_before = np.concatenate([[0], np.cumsum(seen)])  # (total_q + 1,)
    scores = seen_before[varlen.query_starts[1:]] - seen_before[varlen.query_starts[:-1]]
    per_entry = np.repeat(groups, heads)  # (N,)
    entries = np.repeat(np.arange(per_entry.shape[0]), per_entry)  # (n_items,)
    first_item = np.repeat(np.cumsum(per_entry) - per_entry, per_entry)  # (n_items,)
    group = np.arange(entries.shape[0]) - first_item  # (n_items,)
    sequence = entries // heads  # (n_items,)
    cost = ((scores[sequence] + q_lens[sequence] * ROW_COST) // np.maximum(groups[sequence], 1)
            + ITEM_COST)  # (n_items,)
    return np.stack([entries, group, np.zeros_like(group)], axis=1), cost


def run_varlen_backward(varlen, grad_out, out, lse):
    """The gradients ``(dq, dk, dv)`` of a packed call, shaped like ``q``, ``k`` and
    ``v`` (views of head-major arrays) in the result dtype, from the checked
    ``grad_out``, ``out`` ``(total_q, H, Dv)`` and ``lse`` ``(H, total_q)``; with the
    problem's ``score_mod_args_grad``, also the tuple of the gradients of
    ``score_mod_args``."""
    problem = varlen.problem
    dtype = problem.compute_dtype
    grad_heads = grad_out.transpose(1, 0, 2)  # (H, total_q, Dv)
    delta = run.row_dots(grad_heads, out.transpose(1, 0, 2), dtype)  # (H, total_q)
    if problem.kernel_dtype == np.uint16 and grad_heads.dtype != problem.query.dtype:
        grad_heads = grad_heads.astype(problem.query.dtype)
    grad_heads = as_stored(grad_heads, problem.kernel_dtype)  # (H, total_q, Dv)
    lse = np.ascontiguousarray(lse, dtype)  # (H, total_q)
    gradients, arg_parts = _run_varlen_backward(varlen, grad_heads, lse, delta)
    if gradients.nan_met.any():  # a NaN query or key: again, with those NaNs entering as 0
        gradients, arg_parts = _run_varlen_backward(
            varlen.replace_inputs(query=run.without_nan(problem.query),
                                  key=run.without_nan(problem.key)),
            grad_heads, lse, delta)
    grad_query = run.summed_parts(gradients.query_parts)  # (H, total_q, Dk)
    grad_query *= problem.scale
    kv_heads, group = varlen.heads // problem.gqa_group, problem.gqa_group
    grad_key = gradients.key  # (H, total_k, Dk) per query head
    grad_value = gradients.value  # (H, total_k, Dv)
    if group > 1:  # each kv head: the sum over its query heads, in order
        grad_key = grad_key.reshape((kv_heads, group) + grad_key.shape[1:]).sum(axis=1)
        grad_value = grad_value.reshape((kv_heads, group) + grad_value.shape[1:]).sum(axis=1)
    out_dtype = problem.out_dtype
    grads = tuple(grad.astype(out_dtype, copy=False).transpose(1, 0, 2)
                  for grad in (grad_query, grad_key, grad_value))  # (total, heads, D) each
    if problem.score_mod_args_grad is not None:
        grads += (tuple(run.summed_parts(parts) for parts in arg_parts),)
    return grads


def _run_varlen_backward(varlen, grad_heads, lse, delta):
    """Run the backward kernel on a packed call; returns its :class:`Gradients`
    (head-major, per query head) and the partitions of the gradients of
    ``score_mod_args`` (empty without ``score_mod_args_grad``)."""
    problem = varlen.problem
    dtype, heads = problem.compute_dtype, varlen.heads
    n_entries = varlen.n_seq * heads
    block_q, block_k = tiling.BACKWARD_BLOCK_Q, tiling.BACKWARD_BLOCK_K
    n_groups = tiling.choose_key_groups(n_entries, int(varlen.kv_lens.max(initial=0)), block_k)
    work, cost = backward_work(varlen, n_groups, block_k)
    arg_parts = ()
    n_parts = 0
    if problem.score_mod_args_grad is not None:
        arg_bytes = sum(arg.size for arg in problem.score_mod_args) * dtype.itemsize
        n_parts = max(1, min(work.shape[0], run.MAX_ARG_GRAD_PARTS,
                             run.ARG_GRAD_PARTS_BYTES // max(arg_bytes, 1)))
        arg_parts = tuple(np.zeros((n_parts,) + arg.shape, dtype)  # (P, *arg.shape)
                          for arg in problem.score_mod_args)
    hook = problem_hook(problem, arg_parts)
    arguments = varlen_arguments(varlen, hook)
    unused = identity_index(1)  # (1,) the entry groups of a padded call: not read
    extra = BackwardInputs(grad_out=grad_heads, lse=lse, delta=delta, entry_order=unused,
                           entry_starts=unused)
    gradients = Gradients(
        query_parts=np.zeros((n_groups, heads, problem.q_len, problem.head_dim),
                             dtype),  # (G, H, total_q, Dk) shares of dQ / scale
        key=np.zeros((heads, problem.kv_len, problem.head_dim), dtype),  # (H, total_k, Dk)
        value=np.zeros((heads, problem.kv_len, problem.value_dim), dtype),  # (H, total_k, Dv)
        nan_met=np.zeros(n_entries * n_groups, np.bool_),  # (N * G,)
        bias=placeholder(dtype, 3, writeable=True), has_bias=False, arg_grad_parts=n_parts)
    if work.shape[0]:
        settings.apply()
        with single_threaded_blas():
            run.backward_kernel(problem.kernel_dtype)(
                *arguments, Tiling(block_q=block_q, block_k=block_k, slots=get_num_threads()),
                extra, gradients, segments_group(varlen, work, cost))  # a slot per thread
        hook.raise_error(problem)
    return gradients, arg_parts

