"""User score functions inside the kernels: ``score_mod``, ``mask_mod`` and
``score_mod_grad`` applied to a whole score block by one compiled *block hook*.

The kernels are compiled once per dtype and never specialised on a user's
function (Numba would then recompile the parallel kernels in every new process).
For each combination of user functions :func:`block_hook` builds a small C callback
(``numba.cfunc``) that loops over a score block with the user's functions inlined;
the kernels receive its address as an int64 (``ScoreOptions.hook``) and call it
once per block through :func:`call_hook` (an indirect call per element would double
the softmax pass; a first-class function argument would cost a few microseconds of
unboxing in every call). The user's functions are compiled again for the hook
with the kernels' options (:func:`in_kernel`), so the loop over a block stays SIMD.
Building a hook takes about 0.15 s (up to about 1 s for functions that use the
vectorised ``tanh``); it is kept for the process, so a second call with the same
functions compiles nothing, and its address stays valid.

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
import math
import types as pytypes

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from fastattn.kernels.config import FASTMATH_FLAGS, jit_helper
from fastattn.kernels import vector_math
from fastattn.kernels.vector_math import LN2, LOG2E, full_width_vectors

# bits of a hook's ``mode``
APPLY_MASK = 1
WRITE_GRADS = 2
MULTIPLY_GRADS = 4


def hook_signature(dtype):
    """C signature of the block hooks for scores of ``dtype``."""
    pointer = types.CPointer(types.float32 if np.dtype(dtype) == np.float32 else types.float64)
    return types.void(pointer, pointer, *(types.int64,) * 7)


@intrinsic
def data_pointer(typingctx, array):
    """The pointer to ``array``'s first element, typed for a hook's C signature."""
    def codegen(context, builder, signature, args):
        return context.make_array(signature.args[0])(context, builder, args[0]).data
    return types.CPointer(array.dtype)(array), codegen


@intrinsic
def call_hook_at(typingctx, address, scores, grads, rows, cols, row_start, key_start, b, h,
                 mode):
    """Call the block hook at ``address`` (int64) with the pointers ``scores`` and
    ``grads`` and the seven int64 arguments of its C signature."""
    signature = types.void(types.int64, scores, grads, *(types.int64,) * 7)

    def codegen(context, builder, signature, args):
        argument_types = [context.get_value_type(argument) for argument in signature.args[1:]]
        function_type = ir.FunctionType(ir.VoidType(), argument_types)
        function = builder.inttoptr(args[0], function_type.as_pointer())
        builder.call(function, args[1:])
        return context.get_dummy_value()
    return signature, codegen


@jit_helper
def call_hook(options, scores, grads, row_start, key_start, entry, mode):
    """Call the hook at ``options.hook`` on the block ``scores`` ``(rows, cols)`` (and
    ``grads``, of the same shape when ``mode`` asks for gradients) of batch entry
    ``entry``, which is ``(b, h) = divmod(entry, options.heads)``."""
    rows, cols = scores.shape
    grads_at = data_pointer(grads) if mode & (WRITE_GRADS | MULTIPLY_GRADS) else data_pointer(
        scores)
    call_hook_at(options.hook, data_pointer(scores), grads_at, rows, cols, row_start,
                 key_start, entry // options.heads, entry % options.heads, mode)


def _no_hook(scores, grads, rows, cols, row_start, key_start, b, h, mode):
    """The hook of calls without user functions; the kernels never call it."""


@functools.cache
def no_hook(dtype):
    """The address of the placeholder hook of ``dtype`` (compiled once, cached on
    disk)."""
    return _keep(cfunc(hook_signature(dtype), cache=True)(_no_hook))


@functools.cache
def block_hook(score_mod, mask_mod, score_mod_grad, dtype):
    """The address of the block hook applying these user functions (each may be
    None) to scores of ``dtype``; built once per process for each combination.

    The functions must already be checked (:mod:`fastattn._contract.functions`).
    """
    cast = np.float32 if np.dtype(dtype) == np.float32 else np.float64
    has_score_mod, has_mask_mod, has_grad = (score_mod is not None, mask_mod is not None,
                                             score_mod_grad is not None)
    # Numba compiles the branches below away for the missing functions; these
    # stand-ins are never called.
    score_mod = in_kernel(score_mod) if has_score_mod else _unused_score
    mask_mod = in_kernel(mask_mod) if has_mask_mod else _unused_mask
    score_mod_grad = in_kernel(score_mod_grad) if has_grad else _unused_score

    def hook(scores_at, grads_at, rows, cols, row_start, key_start, b, h, mode):
        full_width_vectors()  # 512-bit vectors where the CPU has them
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

    return _keep(cfunc(hook_signature(dtype))(hook))


_HOOKS = []  # every hook built, so that the addresses handed out stay valid


def _keep(hook):
    _HOOKS.append(hook)
    return hook.address


def in_kernel(function):
    """The user's ``function`` compiled again from its Python source with the
    kernels' options, for its hook: the NumPy error model (no exception checks,
    which would keep the block loop scalar), the kernels' fast-math flags
    (reassociation, no NaN or infinity assumptions), and ``math.tanh`` and
    ``math.exp`` taken from :mod:`fastattn.score_math` (vectorisable, within a
    few rounding steps of the C library's, which costs about 12 ns per score)."""
    python_function = function.py_func
    names = {name: _vector_math_stand_in(value)
             for name, value in python_function.__globals__.items()}
    cells = python_function.__closure__
    if cells is not None:  # variables captured from an enclosing function
        cells = tuple(_stand_in_cell(cell) for cell in cells)
    rebuilt = pytypes.FunctionType(python_function.__code__, names, python_function.__name__,
                                   python_function.__defaults__, cells)
    return njit(error_model="numpy", fastmath=set(FASTMATH_FLAGS))(rebuilt)


def _stand_in_cell(cell):
    """A closure cell holding the stand-in of ``cell``'s value (``cell`` if empty)."""
    try:
        return pytypes.CellType(_vector_math_stand_in(cell.cell_contents))
    except ValueError:  # a cell not yet filled
        return cell


def _vector_math_stand_in(value):
    """``value``, or its stand-in if it is the ``math`` module or one of the
    functions :func:`in_kernel` replaces."""
    if value is math:
        return _VECTOR_MATH_MODULE
    for name, replacement in _VECTOR_MATH.items():
        if value is getattr(math, name):
            return replacement
    return value


def _vector_math_module():
    """A stand-in for the ``math`` module: ``math``'s names, with ``tanh`` and
    ``exp`` from :mod:`fastattn.score_math`."""
    module = pytypes.ModuleType("math")
    module.__dict__.update(vars(math))
    module.tanh, module.exp = vector_math.tanh, vector_math.exp
    return module, {"tanh": vector_math.tanh, "exp": vector_math.exp}


_VECTOR_MATH_MODULE, _VECTOR_MATH = _vector_math_module()


@njit
def _unused_score(score, b, h, i, j):
    return score


@njit
def _unused_mask(b, h, i, j):
    return True
