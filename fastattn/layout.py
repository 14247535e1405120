"""Lay a validated :class:`~fastattn.problem.AttentionProblem` out for the kernels,
and fold the kernels' gradients back to the inputs' shapes.

The kernels see every operand as a C-contiguous stack ``(n_own, rows, cols)`` of
its own batch entries plus an int64 index ``(N,)`` over the flattened broadcast batch
``N = prod(batch)``: entry ``b`` reads ``stack[index[b]]``. Broadcast batch dims are
never materialised, and grouped-query heads are an index, not a copy.

The kernels take their operands in a few named groups, built here by
:func:`problem_arguments` and typed in :mod:`fastattn.kernels.operands`:

- :class:`Inputs`: the query, key and value stacks and their indices;
- :class:`ScoreOptions` (scale, softcap, ALiBi slopes) and one :class:`ScoreOperand` each for the mask
  and the bias: everything that shapes a score. A new score option is one more
  field of :class:`ScoreOptions` (or one more operand) and one more step in
  :func:`fastattn.kernels.scores.block_scores`;
- :class:`Visibility`: the structural rule (``kv_lengths``, diagonal offset, reach);
- :class:`Tiling`: the block sizes;
- the results (:class:`ForwardOutputs`, :class:`KeySpans`, :class:`Gradients`) and
  the backward's extra inputs (:class:`BackwardInputs`).

The kernels' signatures type the input arrays read-only (so a kernel cannot write
them); they are called through their compiled entry points
(:func:`fastattn.kernels.config.kernel_per_dtype`), which take writeable arrays as
they are. Groups are not nested: Numba's parallel loops cannot take a tuple holding a
tuple of arrays.

This module imports NumPy only, never Numba, so the reference can use
:func:`sum_to_shape`.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import numpy as np

from fastattn.blas import gemm_address


class Inputs(NamedTuple):
    """Query, key and value stacks ``(n_own, L, D)`` and their int64 ``(N,)`` indices."""

    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    query_index: np.ndarray
    key_index: np.ndarray
    value_index: np.ndarray


class ScoreOperand(NamedTuple):
    """A mask or bias: its stack ``(n_own, 1 or Lq, 1 or Lk)`` and index ``(N,)``; the
    ``row_step`` and ``col_step`` positions are multiplied by (0 along a broadcast
    axis); ``present`` is False for a placeholder the kernels never read."""

    stack: np.ndarray
    index: np.ndarray
    row_step: int
    col_step: int
    present: bool


class ScoreOptions(NamedTuple):
    """The options that turn ``q.k`` into a score, besides the mask and bias operands:
    the ``scale``; the ``softcap`` (read only when ``has_softcap``); the ALiBi slope
    of every entry of the flattened batch, float64 ``alibi_slopes (N,)`` (a ``(1,)``
    placeholder unless ``has_alibi``); the address of the block ``hook`` applying the user's
    ``score_mod`` (``has_score_mod``) and ``mask_mod`` (``has_mask_mod``)
    (:mod:`fastattn.kernels.score_functions`); ``heads``, the size of the batch
    axis that the user functions' ``h`` indexes (``b, h = divmod(entry, heads)``); and
    the address of the BLAS ``gemm`` that forms the block products
    (:mod:`fastattn.blas`, :mod:`fastattn.kernels.products`)."""

    scale: float
    softcap: float
    has_softcap: bool
    alibi_slopes: np.ndarray
    has_alibi: bool
    hook: int
    has_score_mod: bool
    has_mask_mod: bool
    heads: int
    gemm: int


class Visibility(NamedTuple):
    """The structural visibility rule (see :mod:`fastattn.kernels.masking`):
    ``kv_lengths`` ``(N,)`` when ``has_kv_lengths``, the diagonal offset and how far
    left and right of the diagonal a query reaches; with ``has_block_mask``, the
    block mask's int8 ``block_states (N, q tiles, key tiles)``
    (:data:`fastattn.block_mask.EMPTY`, ``PARTIAL`` or ``FULL``; the kernels' tiling
    is then the mask's)."""

    kv_lengths: np.ndarray
    has_kv_lengths: bool
    diag_offset: int
    reach_left: int
    reach_right: int
    block_states: np.ndarray
    has_block_mask: bool


class Tiling(NamedTuple):
    """Query rows and keys per block of a kernel's loops, and the forward's and
    backward's parallel ``slots`` (the thread count): each slot runs an equal
    contiguous share of the tasks one after another, with scratch memory of its own
    (1 for the other kernels)."""

    block_q: int
    block_k: int
    slots: int = 1


class ForwardOutputs(NamedTuple):
    """The forward's results: ``out (N, Lq, Dv)``, ``lse (N, Lq)`` and, when
    ``return_weights``, ``weights (N, Lq, Lk)`` (zeroed; else a placeholder)."""

    out: np.ndarray
    lse: np.ndarray
    weights: np.ndarray
    return_weights: bool


class KeySpans(NamedTuple):
    """Split keys: spans of ``span_len`` keys, each span's normalised output
    ``out (spans, N, Lq, Dv)`` and log2-sum-exp ``lse (spans, N, Lq)``. The span
    count is ``out.shape[0]``: 1 (a placeholder, never written) when not split."""

    span_len: int
    out: np.ndarray
    lse: np.ndarray


class BackwardInputs(NamedTuple):
    """What the backward needs besides the problem: ``grad_out (N, Lq, Dv)``, the
    forward's ``lse (N, Lq)`` and ``delta = rowsum(grad_out * out)`` ``(N, Lq)``."""

    grad_out: np.ndarray
    lse: np.ndarray
    delta: np.ndarray


class Gradients(NamedTuple):
    """The backward's results: ``query_parts (G, N, Lq, Dk)``, one share of
    ``dQ / scale`` per key group, ``key (N, Lk, Dk)``, ``value (N, Lk, Dv)``, and
    ``nan_met (N * G,)``: which tasks met a NaN query or key."""

    query_parts: np.ndarray
    key: np.ndarray
    value: np.ndarray
    nan_met: np.ndarray


def problem_arguments(problem, hook):
    """The kernels' leading argument groups for ``problem``:
    ``(Inputs, ScoreOptions, mask ScoreOperand, bias ScoreOperand, Visibility)``;
    ``hook`` is the address of the block hook of its user functions
    (:func:`fastattn.kernels.score_functions.problem_hook`)."""
    dtype, batch, group = problem.compute_dtype, problem.batch_shape, problem.gqa_group
    query, query_index = stack_operand(problem.query, batch, dtype)
    key, key_index = stack_operand(problem.key, batch, dtype, group)
    value, value_index = stack_operand(problem.value, batch, dtype, group)
    inputs = Inputs(query, key, value, query_index, key_index, value_index)
    if (problem.mask is None and problem.bias is None and problem.kv_lengths is None
            and problem.softcap is None and problem.alibi_slopes is None
            and not problem.has_score_functions):
        # no per-call operand: the other groups depend on scalars only (tiny calls
        # and decoding loops repeat them)
        return (inputs,) + plain_groups(dtype, problem.scale, problem.heads,
                                        problem.diag_offset, problem.key_reach(),
                                        gemm_address(dtype))
    options = score_options(problem, hook)
    mask = score_operand(problem.mask, batch, np.bool_)
    bias = score_operand(problem.bias, batch, dtype)
    if problem.block_mask is not None:
        block_states = problem.block_mask.states  # (N, q tiles, key tiles)
    else:
        block_states = placeholder(np.int8)
    visibility = Visibility(flat_kv_lengths(problem), problem.kv_lengths is not None,
                            problem.diag_offset, *problem.key_reach(), block_states,
                            problem.block_mask is not None)
    return inputs, options, mask, bias, visibility


@functools.lru_cache(maxsize=256)
def plain_groups(dtype, scale, heads, diag_offset, reach, gemm):
    """``(ScoreOptions, mask, bias, Visibility)`` of a call without mask, bias,
    kv_lengths, score options or user functions, shared between such calls: the
    ``scale``, the batch axis ``heads``, the diagonal offset, the ``(left, right)``
    reach of :meth:`~fastattn.problem.AttentionProblem.key_reach` and the BLAS
    ``gemm`` address are all they hold."""
    options = ScoreOptions(float(scale), 0.0, False, placeholder(np.float64, 1), False, 0,
                           False, False, heads, gemm)
    visibility = Visibility(identity_index(1), False, diag_offset, *reach, placeholder(np.int8),
                            False)
    return (options, absent_operand(np.dtype(np.bool_)), absent_operand(np.dtype(dtype)),
            visibility)


def score_options(problem, hook):
    """The :class:`ScoreOptions` of ``problem``, with its block ``hook``."""
    has_softcap, has_alibi = problem.softcap is not None, problem.alibi_slopes is not None
    if has_alibi:
        slopes = np.ascontiguousarray(problem.alibi_slopes.ravel(), np.float64)  # (N,)
    else:
        slopes = placeholder(np.float64, 1)
    return ScoreOptions(float(problem.scale), float(problem.softcap) if has_softcap else 0.0,
                        has_softcap, slopes, has_alibi, hook, problem.score_mod is not None,
                        problem.effective_mask_mod is not None, problem.heads,
                        gemm_address(problem.compute_dtype))


def stack_operand(array, batch_shape, dtype, group=1):
    """Flatten an operand's own batch dims and map the broadcast batch onto them.

    Returns
    -------
    stack : ndarray, shape ``(n_own, *array.shape[-2:])``, C-contiguous, ``dtype``
        The operand without copies of broadcast dims (a copy only to change dtype
        or layout).
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
    index = np.ascontiguousarray(np.broadcast_to(own_index, batch_shape).ravel(),
                                 dtype=np.int64)  # (N,)
    return stack, index


def score_operand(array, batch_shape, dtype):
    """A mask or bias ``(..., 1 or Lq, 1 or Lk)`` as a :class:`ScoreOperand`: the stack
    and index of :func:`stack_operand` and the steps along rows and columns (0 along
    a broadcast axis). A missing operand becomes a ``(1, 1, 1)`` placeholder that the
    kernel never reads."""
    if array is None:
        return absent_operand(np.dtype(dtype))
    stack, index = stack_operand(array, batch_shape, dtype)
    return ScoreOperand(stack, index, int(array.shape[-2] != 1), int(array.shape[-1] != 1), True)


@functools.cache
def absent_operand(dtype):
    """The :class:`ScoreOperand` of a missing mask or bias of ``dtype``, shared
    between calls: a ``(1, 1, 1)`` placeholder the kernels never read."""
    return ScoreOperand(placeholder(dtype), identity_index(1), 0, 0, False)


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


def sum_to_shape(grad, shape, group=1):
    """Sum a gradient of the broadcast shape back to an input's own ``shape``: the
    reverse of :func:`stack_operand`'s broadcasting.

    ``grad`` is ``(*batch, L, D)``. Under grouped-query attention (``group > 1``) the
    head axis (-3) holds ``Hkv * group`` query heads, and each kv head's group is
    summed first; then every batch axis the input broadcast along (missing or of
    size 1 in ``shape``) is summed.
    """
    if group > 1:
        heads = grad.shape[-3] // group
        grad = grad.reshape(grad.shape[:-3] + (heads, group) + grad.shape[-2:])  # (..., Hkv, g, L, D)
        grad = grad.sum(axis=-3)  # (..., Hkv, L, D)
    extra = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra))) if extra else grad  # drop leading batch axes
    ones = tuple(axis for axis, size in enumerate(shape) if size == 1 and grad.shape[axis] != 1)
    return grad.sum(axis=ones, keepdims=True) if ones else grad  # (*shape)


def fold_query_groups(problem):
    """Decoding under grouped-query attention: the query heads of each kv group as
    the rows of one query block, so each kv head's keys and values are read once,
    not once per query head. Returns the folded problem, or None where folding
    would change the result.

    With one query per head (``Lq == 1``) every head of a group has the same
    position, so the rows may share a block as long as neither visibility nor the
    scores depend on the row: no mask or bias (they may differ per head), no ALiBi
    slopes (per head, and the bias they give depends on the row position), no user
    score functions (they see ``h`` and ``i``), no window, no top-left causal rule (row ``r`` would see ``r + 1`` keys), and
    ``kv_lengths`` indexed by a batch axis other than the heads. A softcap depends on
    the score alone and folds. ``(*batch, Hq, 1, D)`` queries become
    ``(*batch, Hkv, group, D)``; the results reshape back, since query head
    ``h = kv * group + g``.
    """
    group = problem.gqa_group
    if (group == 1 or problem.q_len != 1 or problem.mask is not None
            or problem.bias is not None or problem.alibi_slopes is not None
            or problem.has_score_functions
            or problem.window is not None
            or (problem.causal and problem.diag_offset < problem.kv_len - 1)
            or (problem.kv_lengths is not None and len(problem.batch_shape) < 2)):
        return None
    query = problem.query
    kv_heads = query.shape[-3] // group
    query = query.reshape(query.shape[:-3] + (kv_heads, group, problem.head_dim))
    return dataclasses.replace(
        problem, query=query, gqa_group=1, q_len=group,
        batch_shape=problem.batch_shape[:-1] + (kv_heads,))
