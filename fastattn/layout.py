"""Lay a validated :class:`~fastattn.checks.AttentionProblem` out for the kernels.

The kernels see every operand as a C-contiguous stack ``(n_own, rows, cols)`` of
its own batch entries plus an int64 index ``(N,)`` over the flattened broadcast batch
``N = prod(batch)``: entry ``b`` reads ``stack[index[b]]``. Broadcast batch dims are
never materialised, and grouped-query heads are an index, not a copy.
"""

import dataclasses
import functools
import math

import numpy as np


def kernel_inputs(problem):
    """The leading arguments every kernel takes, in this order:

    ``query, key, value`` stacks and their ``query_index, key_index, value_index``;
    ``mask, mask_index, mask_row_step, mask_col_step, has_mask``;
    ``bias, bias_index, bias_row_step, bias_col_step, has_bias``;
    ``kv_lengths, has_kv_lengths, diag_offset, reach_left, reach_right, scale``.
    See :data:`fastattn.kernels.config.problem_argument_types` for their types.
    """
    dtype, batch, group = problem.compute_dtype, problem.batch_shape, problem.gqa_group
    query, query_index = stack_operand(problem.query, batch, dtype)
    key, key_index = stack_operand(problem.key, batch, dtype, group)
    value, value_index = stack_operand(problem.value, batch, dtype, group)
    mask, mask_index, mask_steps = score_operand(problem.mask, batch, np.bool_)
    bias, bias_index, bias_steps = score_operand(problem.bias, batch, dtype)
    return (query, key, value, query_index, key_index, value_index,
            mask, mask_index, *mask_steps, problem.mask is not None,
            bias, bias_index, *bias_steps, problem.bias is not None,
            flat_kv_lengths(problem), problem.kv_lengths is not None, problem.diag_offset,
            *problem.key_reach(), problem.scale)


def stack_operand(array, batch_shape, dtype, group=1):
    """Flatten an operand's own batch dims and map the broadcast batch onto them.

    Returns
    -------
    stack : ndarray, shape ``(n_own, *array.shape[-2:])``, C-contiguous, ``dtype``
        The operand without copies of broadcast dims (a copy only to change dtype or
        layout).
    index : ndarray of int64, shape ``(prod(batch_shape),)``
        Entry ``b`` of the flattened broadcast batch reads ``stack[index[b]]``. Under
        grouped-query attention (``group > 1``) the last batch axis is the head axis
        and query head ``h`` reads kv head ``h // group``.
    """
    own_batch = array.shape[:-2]
    stack = np.ascontiguousarray(array, dtype=dtype)
    stack = stack.reshape((math.prod(own_batch),) + array.shape[-2:])  # (n_own, rows, cols)
    if own_batch == batch_shape and group == 1:  # nothing broadcast: entry b is stack[b]
        return stack, identity_index(stack.shape[0])
    own_index = np.arange(stack.shape[0]).reshape(own_batch)  # (*own_batch)
    if group > 1:
        own_index = np.repeat(own_index, group, axis=-1)  # (..., Hkv * group)
    index = np.broadcast_to(own_index, batch_shape).ravel()  # (N,)
    return stack, np.ascontiguousarray(index, dtype=np.int64)


def score_operand(array, batch_shape, dtype):
    """Lay out a mask or bias ``(..., 1 or Lq, 1 or Lk)`` for the kernel.

    Returns the stack and index of :func:`stack_operand` and the ``(row_step,
    col_step)`` the kernel multiplies positions by (0 along a broadcast axis). A
    missing operand becomes a ``(1, 1, 1)`` placeholder that the kernel never reads.
    """
    if array is None:  # the kernel reads neither stack nor index when the flag is off
        return placeholder(dtype), identity_index(1), (0, 0)
    stack, index = stack_operand(array, batch_shape, dtype)
    steps = (int(array.shape[-2] != 1), int(array.shape[-1] != 1))
    return stack, index, steps


def flat_kv_lengths(problem):
    """Valid key count of every entry of the flattened batch, int64 ``(N,)``.

    Without ``kv_lengths`` a ``(1,)`` placeholder that the kernel never reads.
    """
    batch = problem.batch_shape
    if problem.kv_lengths is None:
        return identity_index(1)
    per_first_axis = problem.kv_lengths.reshape(batch[:1] + (1,) * (len(batch) - 1))
    return np.ascontiguousarray(np.broadcast_to(per_first_axis, batch).ravel(), np.int64)


@functools.lru_cache(maxsize=16)
def identity_index(size):
    """Read-only int64 ``[0, 1, ..., size - 1]``, shared between calls."""
    index = np.arange(size, dtype=np.int64)
    index.flags.writeable = False
    return index


@functools.cache
def placeholder(dtype, ndim=3, writeable=False):
    """``(1,) * ndim`` zeros standing in for an operand the kernel will not touch
    (a missing mask or bias; an output that was not asked for), shared between
    calls. Read-only unless the kernel's signature wants a writable array, which it
    then never writes."""
    array = np.zeros((1,) * ndim, np.dtype(dtype))
    array.flags.writeable = writeable
    return array


def fold_query_groups(problem):
    """Decoding under grouped-query attention: the query heads of each kv group as
    the rows of one query block, so each kv head's keys and values are read once,
    not once per query head. Returns the folded problem, or None where folding
    would change the result.

    With one query per head (``Lq == 1``) every head of a group has the same
    position, so the rows may share a block as long as visibility does not depend on
    the row: no mask or bias (they may differ per head), no window, no top-left
    causal rule (row ``r`` would see ``r + 1`` keys), and ``kv_lengths`` indexed by a
    batch axis other than the heads. ``(*batch, Hq, 1, D)`` queries become
    ``(*batch, Hkv, group, D)``; the results reshape back, since query head
    ``h = kv * group + g``.
    """
    group = problem.gqa_group
    if (group == 1 or problem.q_len != 1 or problem.mask is not None
            or problem.bias is not None or problem.window is not None
            or (problem.causal and problem.diag_offset < problem.kv_len - 1)
            or (problem.kv_lengths is not None and len(problem.batch_shape) < 2)):
        return None
    query = problem.query
    kv_heads = query.shape[-3] // group
    query = query.reshape(query.shape[:-3] + (kv_heads, group, problem.head_dim))
    return dataclasses.replace(
        problem, query=query, gqa_group=1, q_len=group,
        batch_shape=problem.batch_shape[:-1] + (kv_heads,))
