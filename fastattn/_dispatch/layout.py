"""Lay a validated :class:`~fastattn._contract.problem.AttentionProblem` out for the kernels.

The kernels see every operand as a C-contiguous stack ``(n_own, rows, cols)`` of
its own batch entries plus an int64 index ``(N,)`` over the flattened broadcast batch
``N = prod(batch)``: entry ``b`` reads ``stack[index[b]]``. Broadcast batch dims are
never materialised, and grouped-query heads are an index, not a copy.

:func:`problem_arguments` builds the kernels' leading argument groups (declared, with
their Numba types, in :mod:`fastattn.kernels.groups`) by field name:

- ``Inputs``: the query, key and value stacks and their indices;
- ``ScoreOptions`` (scale, softcap, ALiBi slopes, the user functions' hook, the gemm
  address) and one ``ScoreOperand`` each for the mask and the bias: everything that
  shapes a score. A new score option is one more field of ``ScoreOptions`` (or one
  more operand), filled here, and one more step in
  :func:`fastattn.kernels.scores.block_scores`;
- ``Visibility``: the structural rule (``kv_lengths``, diagonal offset, reach, block
  mask tiles).

The kernels' signatures type the input arrays read-only (so a kernel cannot write
them); they are called through their compiled entry points
(:func:`fastattn.kernels.config.kernel_per_dtype`), which take writeable arrays as
they are.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import numpy as np

from fastattn._contract.arguments import half_format
from fastattn.blas import gemm_address
from fastattn.kernels.dropout import dropout_threshold
from fastattn.kernels.groups import Inputs, ScoreOperand, ScoreOptions, Segments, Visibility
from fastattn.kernels.hooks import argument_kinds, block_hook, hook_table, raise_hook_error


class HookCall(NamedTuple):
    """The block hook of a call (a ``numba.cfunc``, held while the kernels run so
    that its address stays valid; None without user functions), the call's int64
    hook ``table`` (:func:`fastattn.kernels.hooks.hook_table`) and the arrays of
    positions whose addresses the table holds (kept alive with it)."""

    hook: object
    table: np.ndarray
    positions: tuple = ()

    @property
    def address(self):
        return 0 if self.hook is None else self.hook.address

    def raise_error(self, problem):
        """Raise the error a user function met in the kernels (nothing if none)."""
        raise_hook_error(self.table, problem.user_functions())


def problem_hook(problem, grad_parts=()):
    """The :class:`HookCall` of an
    :class:`~fastattn._contract.problem.AttentionProblem`: the block hook of its
    ``score_mod``, the ``mask_mod`` it applies (its own or its block mask's) and, in a
    backward problem, its ``score_mod_grad`` and ``score_mod_args_grad``
    (:mod:`fastattn.kernels.hooks`), compiled for the dtypes and dimensions of the
    arrays passed to them; and the table of this call's arrays and of the
    ``grad_parts`` ``(parts, *arg.shape)`` the arguments' gradients are added into.
    The placeholder without user functions."""
    options = problem.options
    if not options.has_score_functions:
        return NO_HOOK
    score_args, mask_args = problem.score_mod_args, problem.effective_mask_mod_args
    hook = block_hook(options.score_mod, problem.effective_mask_mod, problem.score_mod_grad,
                      problem.compute_dtype, argument_kinds(score_args),
                      argument_kinds(mask_args), problem.score_mod_args_grad)
    positions = hook_positions(problem)
    return HookCall(hook, hook_table(score_args, mask_args, grad_parts, positions),
                    positions or ())


def hook_positions(problem):
    """The positions of a call's hook table (:func:`fastattn.kernels.hooks.hook_table`)
    from :meth:`~fastattn._contract.problem.AttentionProblem.user_function_positions`:
    ``(row_offset, key_offset, heads, score_entries, mask_entries)``, the entries
    int64 ``(N, 2)`` arrays of ``(b, h)`` (None where the user functions see the
    kernels' own ``divmod(entry, heads)``), or None when all see the kernels' own
    positions."""
    if problem.options.chunk_of is None and problem.mask_batch_shape is None:
        return None
    b, h, mask_b, mask_h, row_offset, key_offset = problem.user_function_positions()
    score_entries = None
    if problem.options.chunk_of is not None:
        score_entries = np.stack([b, h], axis=1)  # (N, 2)
    mask_entries = np.stack([mask_b, mask_h], axis=1)  # (N, 2)
    return row_offset, key_offset, problem.heads, score_entries, mask_entries


def _unset_table():
    table = np.zeros(1, np.int64)  # (1,) never written: no hook is called
    table.flags.writeable = False
    return table


# the hook of calls without user functions: never called
NO_HOOK = HookCall(None, _unset_table())


def problem_arguments(problem, hook):
    """The kernels' leading argument groups for ``problem``:
    ``(Inputs, ScoreOptions, mask ScoreOperand, bias ScoreOperand, Visibility)``;
    ``hook`` is the :class:`HookCall` of its user functions (:func:`problem_hook`)."""
    dtype, batch, group = problem.compute_dtype, problem.batch_shape, problem.gqa_group
    stored = problem.kernel_dtype  # uint16 for 16-bit inputs, read as they are
    query, query_index = stack_operand(problem.query, batch, stored)
    key, key_index = stack_operand(problem.key, batch, stored, group)
    value, value_index = stack_operand(problem.value, batch, stored, group)
    inputs = Inputs(query=query, key=key, value=value, query_index=query_index,
                    key_index=key_index, value_index=value_index,
                    half_format=problem.half_format)
    options = problem.options
    if problem.mask is None and not options.has_operands:
        # no per-call operand: the other groups depend on scalars only (tiny calls
        # and decoding loops repeat them)
        return (inputs,) + plain_score_groups(dtype, problem.scale, problem.heads,
                                              gemm_address(dtype), options.softcap) + (
            plain_visibility(problem.diag_offset, *problem.key_reach()),)
    block_mask = options.block_mask
    states_index = problem.block_states_index()  # (N,) or None: entry n reads n
    reach_left, reach_right = problem.key_reach()
    visibility = Visibility(
        kv_lengths=flat_kv_lengths(problem), has_kv_lengths=options.kv_lengths is not None,
        diag_offset=problem.diag_offset, reach_left=reach_left, reach_right=reach_right,
        block_states=block_mask.states if block_mask is not None else placeholder(np.int8),
        has_block_mask=block_mask is not None,  # states: (M, q tiles, key tiles)
        block_states_index=states_index if states_index is not None
        else identity_index(math.prod(batch) if block_mask is not None else 1))  # (N,)
    return (inputs, score_options(problem, hook), score_operand(problem.mask, batch, np.bool_),
            score_operand(options.bias, batch, dtype), visibility)


@functools.lru_cache(maxsize=256)
def plain_score_groups(dtype, scale, heads, gemm, softcap=None):
    """``(ScoreOptions, mask, bias)`` of a call without mask, bias, kv_lengths, ALiBi
    slopes, dropout or user functions, shared between such calls: the ``scale``, the
    batch axis ``heads``, the BLAS ``gemm`` address and the ``softcap`` (None: none)
    are all they hold (none depends on ``Lk``, which a decoding loop grows)."""
    capped = dict(softcap=softcap, has_softcap=True) if softcap is not None else {}
    options = ScoreOptions(**dict(UNSET_SCORE_OPTIONS, scale=float(scale), heads=heads,
                                  gemm=gemm, alibi_slopes=placeholder(np.float64, 1),
                                  dropout_entries=UNSET_DROPOUT_ENTRIES, **capped))
    return options, absent_operand(np.dtype(np.bool_)), absent_operand(np.dtype(dtype))


def plain_visibility(diag_offset, reach_left, reach_right):
    """The :class:`Visibility` of a call without kv_lengths or block mask: the
    diagonal offset and the ``(left, right)`` reach of
    :meth:`~fastattn._contract.problem.AttentionProblem.key_reach` (a window included)."""
    return Visibility(kv_lengths=identity_index(1), has_kv_lengths=False,
                      diag_offset=diag_offset, reach_left=reach_left, reach_right=reach_right,
                      block_states=placeholder(np.int8), has_block_mask=False,
                      block_states_index=identity_index(1))


# ScoreOptions' (b, h) of each entry when there is no dropout: a placeholder never read
UNSET_DROPOUT_ENTRIES = np.zeros((1, 2), np.int64)
UNSET_DROPOUT_ENTRIES.flags.writeable = False

# ScoreOptions fields of a call that sets no score option (scale, heads and gemm vary)
UNSET_SCORE_OPTIONS = dict(softcap=0.0, has_softcap=False, alibi_slopes=None, has_alibi=False,
                           hook=0, hook_table=NO_HOOK.table, has_score_mod=False,
                           has_mask_mod=False, has_args_grad=False,
                           has_dropout=False, dropout_threshold=0, dropout_keep_scale=1.0,
                           dropout_seed_low=0, dropout_seed_high=0, dropout_row_offset=0,
                           dropout_key_offset=0)


def score_options(problem, hook):
    """The :class:`ScoreOptions` of ``problem``, with its :class:`HookCall` ``hook``."""
    options = problem.options
    fields = dict(UNSET_SCORE_OPTIONS, scale=float(problem.scale), heads=problem.heads,
                  gemm=gemm_address(problem.compute_dtype), hook=hook.address,
                  hook_table=hook.table, has_score_mod=options.score_mod is not None,
                  has_mask_mod=problem.effective_mask_mod is not None,
                  has_args_grad=problem.score_mod_args_grad is not None)
    if options.softcap is not None:
        fields.update(softcap=options.softcap, has_softcap=True)
    if options.alibi_slopes is not None:
        fields.update(alibi_slopes=np.ascontiguousarray(options.alibi_slopes.ravel(),
                                                        np.float64),  # (N,)
                      has_alibi=True)
    fields.update(dropout_entries=UNSET_DROPOUT_ENTRIES)
    if options.dropout_p > 0.0:
        batch, head, row_offset, key_offset = options.dropout_positions(problem.batch_shape,
                                                                        problem.heads)
        fields.update(has_dropout=True, dropout_threshold=dropout_threshold(options.dropout_p),
                      dropout_keep_scale=1.0 / (1.0 - options.dropout_p),
                      dropout_seed_low=options.dropout_seed & 0xFFFFFFFF,
                      dropout_seed_high=options.dropout_seed >> 32,
                      dropout_entries=np.stack([batch, head], axis=1),  # (N, 2)
                      dropout_row_offset=row_offset, dropout_key_offset=key_offset)
    if fields["alibi_slopes"] is None:
        fields["alibi_slopes"] = placeholder(np.float64, 1)
    return ScoreOptions(**fields)


def stack_operand(array, batch_shape, dtype, group=1):
    """Flatten an operand's own batch dims and map the broadcast batch onto them.

    Returns
    -------
    stack : ndarray, shape ``(n_own, *array.shape[-2:])``, C-contiguous, ``dtype``
        The operand without copies of broadcast dims (a copy only to change dtype
        or layout). ``dtype`` uint16 views 16-bit float data as its bits.
    index : ndarray of int64, shape ``(prod(batch_shape),)``
        Entry ``b`` of the flattened broadcast batch reads ``stack[index[b]]``. Under
        grouped-query attention (``group > 1``) the last batch axis is the head axis
        and query head ``h`` reads kv head ``h // group``.
    """
    own_batch = array.shape[:-2]
    stack = as_stored(array, dtype)
    stack = stack.reshape((math.prod(own_batch),) + array.shape[-2:])  # (n_own, rows, cols)
    if own_batch == batch_shape and group == 1:  # nothing broadcast: entry b is stack[b]
        return stack, identity_index(stack.shape[0])
    own_index = np.arange(stack.shape[0]).reshape(own_batch)  # (*own_batch)
    if group > 1:
        own_index = np.repeat(own_index, group, axis=-1)  # (..., Hkv * group)
    index = np.ascontiguousarray(np.broadcast_to(own_index, batch_shape).ravel(),
                                 dtype=np.int64)  # (N,)
    return stack, index


def as_stored(array, dtype):
    """``array`` C-contiguous as the kernels read it: ``dtype`` uint16 views 16-bit
    float data as its bits (a copy only to change the layout); any other ``dtype``
    converts (a copy only to change dtype or layout)."""
    if dtype == np.uint16:
        if half_format(array.dtype) is None:
            raise TypeError(f"16-bit storage needs bfloat16 or float16 data; got {array.dtype}")
        return np.ascontiguousarray(array).view(np.uint16)
    return np.ascontiguousarray(array, dtype=dtype)


def score_operand(array, batch_shape, dtype):
    """A mask or bias ``(..., 1 or Lq, 1 or Lk)`` as a :class:`ScoreOperand`: the stack
    and index of :func:`stack_operand` and the steps along rows and columns (0 along
    a broadcast axis). A missing operand becomes a ``(1, 1, 1)`` placeholder that the
    kernel never reads."""
    if array is None:
        return absent_operand(np.dtype(dtype))
    stack, index = stack_operand(array, batch_shape, dtype)
    return ScoreOperand(stack=stack, index=index, row_step=int(array.shape[-2] != 1),
                        col_step=int(array.shape[-1] != 1), present=True)


@functools.cache
def absent_operand(dtype):
    """The :class:`ScoreOperand` of a missing mask or bias of ``dtype``, shared
    between calls: a ``(1, 1, 1)`` placeholder the kernels never read."""
    return ScoreOperand(stack=placeholder(dtype), index=identity_index(1), row_step=0,
                        col_step=0, present=False)


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


# Options under which the query heads of a group may share one block when decoding
# (any other option set, or added later, keeps them apart: see fold_query_groups).
FOLDABLE_OPTIONS = frozenset({"causal", "causal_alignment", "kv_lengths", "scale",
                              "enable_gqa", "softcap"})


def fold_query_groups(problem):
    """Decoding under grouped-query attention: the query heads of each kv group as
    the rows of one query block, so each kv head's keys and values are read once,
    not once per query head. Returns the folded problem, or None where folding
    would change the result.

    With one query per head (``Lq == 1``) every head of a group has the same
    position, so the rows may share a block as long as neither visibility nor the
    scores depend on the row: no mask or bias (they may differ per head), no ALiBi
    slopes (per head, and the bias they give depends on the row position), no user
    score functions (they see ``h`` and ``i``), no window, no dropout (its decisions
    depend on ``h`` and ``i``), no top-left causal rule (row ``r`` would see ``r + 1``
    keys), and ``kv_lengths`` indexed by a batch axis other than the heads: only the
    options of :data:`FOLDABLE_OPTIONS`. A softcap depends on the score alone and folds. ``(*batch, Hq, 1, D)`` queries become
    ``(*batch, Hkv, group, D)``; the results reshape back, since query head
    ``h = kv * group + g``.
    """
    group = problem.gqa_group
    if group == 1 or problem.q_len != 1 or problem.mask is not None:
        return None
    options = problem.options
    if (not FOLDABLE_OPTIONS.issuperset(options.set_names)
            or (options.causal and problem.diag_offset < problem.kv_len - 1)
            or (options.kv_lengths is not None and len(problem.batch_shape) < 2)):
        return None
    query = problem.query
    kv_heads = query.shape[-3] // group
    query = query.reshape(query.shape[:-3] + (kv_heads, group, problem.head_dim))
    return dataclasses.replace(
        problem, query=query, gqa_group=1, q_len=group,
        batch_shape=problem.batch_shape[:-1] + (kv_heads,))


def _absent_segments():
    """The :class:`Segments` of a call that is not packed: placeholders never read."""
    index = identity_index(1)  # (1,)
    return Segments(query_starts=index, key_starts=index, diag_offsets=index, heads=1,
                    work=placeholder(np.int64, 2), work_cost=index, present=False)


# the Segments group of every call but packed sequences' (fastattn._dispatch.packed_run)
NO_SEGMENTS = _absent_segments()
