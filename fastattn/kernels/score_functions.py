"""User score functions inside the kernels: ``score_mod``, ``mask_mod`` and
``score_mod_grad`` applied to a whole score block by one compiled *block hook*.

The kernels are compiled once per dtype, with an argument of the first-class
function type :func:`hook_type`, never specialised on a user's function (Numba
would then recompile the parallel kernels in every new process). For each
combination of user functions :func:`block_hook` builds a small C callback
(``numba.cfunc``) that loops over a score block with the user's functions inlined;
a kernel calls it once per block (an indirect call per element would double the
softmax pass). Building it compiles only that loop (about 0.1-0.2 s); it is kept
for the process, so a second call with the same functions compiles nothing.

A hook is called as ``hook(scores, grads, rows, cols, row_start, key_start, b, h,
mode)`` on a C-contiguous ``(rows, cols)`` block of scores in log2 units (the
kernels' unit, ``log2(e) * s``) for queries ``row_start + r`` and keys
``key_start + c`` of batch entry ``(b, h)``:

- with a ``score_mod``: ``s = score_mod(s, b, h, i, j)`` (in natural units) where
  ``s`` is not ``-inf`` (a key hidden by a ``-inf`` bias stays hidden);
- with ``mode & APPLY_MASK`` and a ``mask_mod``: ``s = -inf`` where
  ``mask_mod(b, h, i, j)`` is False;
- with ``mode & WRITE_GRADS`` (``MULTIPLY_GRADS``): ``grads`` ``(rows, cols)`` is
  set to (multiplied by) ``score_mod_grad(s, b, h, i, j)`` at the score before
  ``score_mod``, 0 where that score is ``-inf``.
"""

import functools

import numpy as np
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from fastattn.kernels.config import jit_helper
from fastattn.kernels.vector_math import LN2, LOG2E

# bits of a hook's ``mode``
APPLY_MASK = 1
WRITE_GRADS = 2
MULTIPLY_GRADS = 4


def hook_signature(dtype):
    """C signature of the block hooks for scores of ``dtype``."""
    pointer = types.CPointer(types.float32 if np.dtype(dtype) == np.float32 else types.float64)
    return types.void(pointer, pointer, *(types.int64,) * 7)


def hook_type(dtype):
    """Numba type of a block hook argument (a first-class function)."""
    return types.FunctionType(hook_signature(dtype))


@intrinsic
def data_pointer(typingctx, array):
    """The pointer to ``array``'s first element, typed for a hook's C signature."""
    def codegen(context, builder, signature, args):
        return context.make_array(signature.args[0])(context, builder, args[0]).data
    return types.CPointer(array.dtype)(array), codegen


@jit_helper
def call_hook(options, scores, grads, row_start, key_start, entry, mode):
    """Call ``options.hook`` on the block ``scores`` ``(rows, cols)`` (and ``grads``,
    of the same shape when ``mode`` asks for gradients) of batch entry ``entry``,
    which is ``(b, h) = divmod(entry, options.heads)``."""
    rows, cols = scores.shape
    grads_at = data_pointer(grads) if mode & (WRITE_GRADS | MULTIPLY_GRADS) else data_pointer(
        scores)
    options.hook(data_pointer(scores), grads_at, rows, cols, row_start, key_start,
                 entry // options.heads, entry % options.heads, mode)


def _no_hook(scores, grads, rows, cols, row_start, key_start, b, h, mode):
    """The hook of calls without user functions; the kernels never call it."""


@functools.cache
def no_hook(dtype):
    """The placeholder hook of ``dtype`` (compiled once, cached on disk)."""
    return cfunc(hook_signature(dtype), cache=True)(_no_hook)


@functools.cache
def block_hook(score_mod, mask_mod, score_mod_grad, dtype):
    """The block hook applying these user functions (each may be None) to scores of
    ``dtype``; built once per process for each combination.

    The functions must already be checked (:mod:`fastattn.checks.functions`).
    """
    cast = np.float32 if np.dtype(dtype) == np.float32 else np.float64
    has_score_mod, has_mask_mod, has_grad = (score_mod is not None, mask_mod is not None,
                                             score_mod_grad is not None)
    # Numba compiles the branches below away for the missing functions; these
    # stand-ins are never called.
    score_mod = score_mod if has_score_mod else _unused_score
    mask_mod = mask_mod if has_mask_mod else _unused_mask
    score_mod_grad = score_mod_grad if has_grad else _unused_score

    def hook(scores_at, grads_at, rows, cols, row_start, key_start, b, h, mode):
        scores = carray(scores_at, (rows, cols))
        if has_grad and mode & (WRITE_GRADS | MULTIPLY_GRADS):
            grads = carray(grads_at, (rows, cols))
            multiply = mode & MULTIPLY_GRADS != 0
            for r in range(rows):
                for c in range(cols):
                    score = scores[r, c] * LN2  # natural units
                    grad = cast(score_mod_grad(score, b, h, row_start + r, key_start + c))
                    grad = cast(0.0) if scores[r, c] == -np.inf else grad
                    grads[r, c] = grads[r, c] * grad if multiply else grad
        if has_score_mod:
            for r in range(rows):
                for c in range(cols):
                    score = scores[r, c]
                    changed = cast(score_mod(score * LN2, b, h, row_start + r,
                                             key_start + c) * LOG2E)
                    scores[r, c] = score if score == -np.inf else changed
        if has_mask_mod and mode & APPLY_MASK:
            for r in range(rows):
                for c in range(cols):
                    if not mask_mod(b, h, row_start + r, key_start + c):
                        scores[r, c] = -np.inf

    return cfunc(hook_signature(dtype))(hook)


@njit
def _unused_score(score, b, h, i, j):
    return score


@njit
def _unused_mask(b, h, i, j):
    return True


def problem_hook(problem):
    """The block hook of an :class:`~fastattn.problem.AttentionProblem`: its
    ``score_mod``, the ``mask_mod`` it applies (its own or its block mask's) and,
    in a backward problem, its ``score_mod_grad``; the placeholder without any."""
    dtype = problem.compute_dtype
    mask_mod = problem.effective_mask_mod
    if problem.score_mod is None and mask_mod is None:
        return no_hook(dtype)
    return block_hook(problem.score_mod, mask_mod, problem.score_mod_grad, dtype)
