"""User score functions inside the kernels: ``score_mod``, ``mask_mod``,
``score_mod_grad`` and ``score_mod_args_grad`` applied to a whole score block by one
compiled *block hook*.

The kernels are compiled once per dtype and never specialised on a user's
function (Numba would then recompile the parallel kernels in every new process).
For each combination of user functions, and of the dtypes and dimensions of the
arrays passed to them (``score_mod_args``, ``mask_mod_args``), :func:`block_hook`
compiles a small function that loops over a score block with the user's functions
inlined; the kernels receive the address of its native code as an int64
(``ScoreOptions.hook``) and call it once per block through :func:`call_hook` with
Numba's calling convention (an indirect call per element would double the softmax
pass; a first-class function argument would cost a few microseconds of unboxing in
every call). The user's functions are compiled again for the hook with the kernels'
options (:func:`in_kernel`), so the loop over a block stays SIMD. Building a hook
takes about 0.3 s (up to about 1 s for functions that use the vectorised ``tanh``);
the last :data:`HOOK_CACHE_SIZE` hooks are kept, so a second call with the same
functions and argument kinds compiles nothing, whatever the arrays hold.

A hook is called as ``hook(scores, grads, rows, cols, row_start, key_start, b, h,
mode, table, part, running)`` on a C-contiguous ``(rows, cols)`` block of scores in
log2 units (the kernels' unit, ``log2(e) * s``) for queries ``row_start + r`` and
keys ``key_start + c`` of batch entry ``(b, h)``:

- with a ``score_mod``: ``s = score_mod(s, b, h, i, j, *score_mod_args)`` (in
  natural units) where ``s`` is not ``-inf`` (a key hidden by a ``-inf`` bias stays
  hidden);
- with ``mode & APPLY_MASK`` and a ``mask_mod``: ``s = -inf`` where
  ``mask_mod(b, h, i, j, *mask_mod_args)`` is False;
- with ``mode & WRITE_GRADS`` (``MULTIPLY_GRADS``): ``grads`` ``(rows, cols)`` is
  set to (multiplied by) ``score_mod_grad(s, b, h, i, j, *score_mod_args)`` at the
  score before ``score_mod``, 0 where that score is ``-inf``;
- with ``mode == ARGS_GRADS`` only: ``scores`` holds the scores before
  ``score_mod`` and ``grads`` the loss gradient ``g`` of its results; for every
  score that is not ``-inf`` with ``g != 0``, ``score_mod_args_grad(g, s, b, h, i, j,
  arg_grads, *score_mod_args)`` adds into the gradient arrays of partition ``part``.

``table`` points to the call's int64 *hook table* (:func:`hook_table`): a status
word; the call's *positions* (:data:`POSITIONS_SIZE` words: the offsets added to
``i`` and ``j``, the ``heads`` of the kernels' ``(b, h)``, and the addresses of two
int64 ``(N, 2)`` arrays giving, for each entry ``b * heads + h``, the ``(b, h)`` that
the score functions and that ``mask_mod`` see, 0 where they see the kernels' own);
then each argument array as its address and shape, then the address of each
argument's gradient partitions. The positions let a call compute a piece of a
larger one (:mod:`fastattn.dask`: global ``b``, ``h``, ``i``, ``j``) and a block
mask made for a broadcast batch shape show ``mask_mod`` its own ``(b, h)``. The
arrays are read in place, so what is compiled depends on the functions and on the
arguments' dtypes and dimensions only. An
exception inside a user function (an index out of bounds: Numba's bounds checks are
on in the hooks) stops the hook and comes back to the kernel as Numba's error
status; the hook keeps in ``running`` which function it was running, and
:func:`call_hook` writes that into the status word (:data:`STATUS_FUNCTIONS`), which
the front end raises (:func:`raise_hook_error`).
"""

import functools
import inspect
import math
import types as pytypes

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, is_jitted, overload
from numba.np.unsafe.ndarray import to_fixed_tuple

from fastattn.kernels.config import FASTMATH_FLAGS, jit_helper
from fastattn.kernels import vector_math
from fastattn.kernels.vector_math import LN2, LOG2E, full_width_vectors

# bits of a hook's ``mode``
APPLY_MASK = 1
WRITE_GRADS = 2
MULTIPLY_GRADS = 4
ARGS_GRADS = 8

# the status word of a hook table: 0, or which user function raised
STATUS_FUNCTIONS = {1: "score_mod", 2: "mask_mod", 3: "score_mod_grad",
                    4: "score_mod_args_grad"}
# the hook table's words: the status word, the positions (row offset, key offset,
# heads, address of the score functions' (b, h) per entry, address of mask_mod's),
# then the arguments
POSITIONS_AT = 1
POSITIONS_SIZE = 5
ARGUMENTS_AT = POSITIONS_AT + POSITIONS_SIZE
# how many hooks are kept (each holds its compiled code and the user's functions
# compiled again)
HOOK_CACHE_SIZE = 64
# Numba's bounds checks in the user's functions (an index out of range raises
# IndexError instead of reading past an array); a switch for measuring their cost
BOUNDS_CHECKS = True


def hook_signature(dtype):
    """Signature of the block hooks for scores of ``dtype``."""
    pointer = types.CPointer(types.float32 if np.dtype(dtype) == np.float32 else types.float64)
    return types.none(pointer, pointer, *(types.int64,) * 7, types.CPointer(types.int64),
                      types.int64, types.CPointer(types.int64))


class BlockHook:
    """A compiled block hook: its Numba dispatcher (which keeps the machine code
    alive) and the ``address`` of its native function, which the kernels call with
    Numba's calling convention (:func:`call_hook_at`), so that an exception inside
    it comes back as an error status."""

    def __init__(self, dispatcher, signature):
        compiled = dispatcher.overloads[signature.args]
        self.dispatcher = dispatcher
        self.address = compiled.library.get_pointer_to_function(compiled.fndesc.llvm_func_name)


@intrinsic
def data_pointer(typingctx, array):
    """The pointer to ``array``'s first element, typed for a hook's C signature."""
    def codegen(context, builder, signature, args):
        return context.make_array(signature.args[0])(context, builder, args[0]).data
    return types.CPointer(array.dtype)(array), codegen


@intrinsic
def pointer_to(typingctx, address, kind):
    """The int64 ``address`` as a pointer to elements of the scalar class ``kind``
    (``np.float32``, ``np.int64``, ...)."""
    signature = types.CPointer(kind.instance_type)(address, kind)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return signature, codegen


@intrinsic
def call_hook_at(typingctx, address, scores, grads, rows, cols, row_start, key_start, b, h,
                 mode, table, part):
    """Call the block hook at ``address`` (int64, see :class:`BlockHook`) with the
    pointers ``scores`` and ``grads``, the seven int64 arguments of its signature, the
    pointer ``table`` to the hook table and the gradient partition ``part``. Returns
    0, or, when a user function raised, the number of the function
    (:data:`STATUS_FUNCTIONS`) that the hook was running."""
    argument_types = (scores, grads, *(types.int64,) * 7, table, types.int64,
                      types.CPointer(types.int64))
    signature = types.int64(types.int64, scores, grads, *(types.int64,) * 7, table,
                            types.int64)

    def codegen(context, builder, signature, args):
        convention = context.call_conv
        function_type = convention.get_function_type(types.none, argument_types)
        function = builder.inttoptr(args[0], function_type.as_pointer())
        zero = ir.Constant(ir.IntType(64), 0)
        running = cgutils.alloca_once_value(builder, zero)  # which function runs
        returned_type = convention.get_return_type(types.none).pointee
        returned = cgutils.alloca_once(builder, returned_type)
        builder.store(cgutils.get_null_value(returned_type), returned)
        exception = cgutils.alloca_once(builder, function_type.args[1].pointee)
        packed = convention._get_arg_packer(argument_types).as_arguments(
            builder, list(args[1:]) + [running])
        code = builder.call(function, [returned, exception] + list(packed))
        status = convention._get_return_status(builder, code, builder.load(exception))
        return builder.select(status.is_error, builder.load(running), zero)
    return signature, codegen


@jit_helper
def call_hook(options, scores, grads, row_start, key_start, entry, mode, part=0):
    """Call the hook at ``options.hook`` on the block ``scores`` ``(rows, cols)`` (and
    ``grads``, of the same shape when ``mode`` asks for gradients) of batch entry
    ``entry``, which is ``(b, h) = divmod(entry, options.heads)``, with the call's
    hook table ``options.hook_table`` (whose status word gets the number of a user
    function that raised); ``part``: the gradient partition written with
    ``ARGS_GRADS``."""
    rows, cols = scores.shape
    grads_at = data_pointer(grads) if mode & (WRITE_GRADS | MULTIPLY_GRADS | ARGS_GRADS) \
        else data_pointer(scores)
    raised = call_hook_at(options.hook, data_pointer(scores), grads_at, rows, cols, row_start,
                          key_start, entry // options.heads, entry % options.heads, mode,
                          data_pointer(options.hook_table), part)
    if raised:
        options.hook_table[0] = raised


# ---------------------------------------------------------------- hook tables

def argument_kinds(arrays):
    """The ``(dtype, ndim)`` of each array: what a hook is compiled for."""
    return tuple((array.dtype, array.ndim) for array in arrays)


def hook_table(score_args=(), mask_args=(), grad_parts=(), positions=None):
    """The int64 hook table of a call (see the module docstring): ``[status,
    *positions, (address, *shape) of each of score_args then mask_args, address of
    each of grad_parts]``. The arrays must be C-contiguous and stay alive while the
    kernels run; ``grad_parts`` are ``(parts, *shape)`` arrays of the compute dtype,
    one per score argument (or none). ``positions``: ``(row_offset, key_offset,
    heads, score_entries, mask_entries)``, the entries int64 ``(N, 2)`` arrays of
    ``(b, h)`` or None (the kernels' own); None: no offsets, the kernels' own
    ``(b, h)`` everywhere."""
    row_offset, key_offset, heads, score_entries, mask_entries = positions or (0, 0, 1,
                                                                                None, None)
    entries = [0, row_offset, key_offset, heads]
    entries += [0 if array is None else array.ctypes.data for array in (score_entries,
                                                                        mask_entries)]
    for array in tuple(score_args) + tuple(mask_args):
        entries += [array.ctypes.data, *array.shape]
    entries += [parts.ctypes.data for parts in grad_parts]
    return np.array(entries, np.int64)


def raise_hook_error(table, functions):
    """Raise the error a hook reported in ``table``'s status word (nothing if none);
    ``functions`` maps each user function's role (``"score_mod"``, ...) to the
    function."""
    status = int(table[0])
    if status == 0:
        return
    role = STATUS_FUNCTIONS[status]
    function = functions.get(role)
    name = getattr(getattr(function, "py_func", function), "__name__", "?")
    raise IndexError(
        f"{role} {name!r} raised inside the kernels: most likely an index out of range of "
        f"an array it reads (one of its arguments or an array it captured). Call "
        f"reference.scaled_dot_product_attention with the same arguments to see the index")


def _array_reader(kind, ndim):
    """A compiled ``read(table, at)``: the ``ndim``-dimensional C-contiguous array of
    elements ``kind`` whose address and shape are ``table[at:at + 1 + ndim]``."""
    @njit(inline="always")
    def read(table, at):
        return carray(pointer_to(table[at], kind),
                      to_fixed_tuple(table[at + 1:at + 1 + ndim], ndim))
    return read


def _gradient_reader(kind, ndim, pointer_at):
    """A compiled ``read(table, at, part)``: partition ``part`` of the ``(parts,
    *shape)`` gradient array of elements ``kind`` whose address is
    ``table[pointer_at]``, for the argument whose shape is described at ``at``."""
    itemsize = np.dtype(kind).itemsize

    @njit(inline="always")
    def read(table, at, part):
        shape = to_fixed_tuple(table[at + 1:at + 1 + ndim], ndim)
        size = 1
        for extent in shape:
            size *= extent
        return carray(pointer_to(table[pointer_at] + part * size * itemsize, kind), shape)
    return read


def arguments_reader(kinds, grads_kind=None, pointer_at=0):
    """A compiled ``read(table, at, part)``: the tuple of the arrays described in the
    hook table from ``table[at]`` on (``kinds``: their ``(dtype, ndim)``); with
    ``grads_kind``, their gradient arrays (elements ``grads_kind``) of partition
    ``part`` instead, at the addresses ``table[pointer_at:]``."""
    if not kinds:
        @njit(inline="always")
        def read_nothing(table, at, part):
            return ()
        return read_nothing
    (dtype, ndim), size = kinds[0], 1 + kinds[0][1]
    others = arguments_reader(kinds[1:], grads_kind, pointer_at + 1)
    if grads_kind is None:
        first = _array_reader(np.dtype(dtype).type, ndim)

        @njit(inline="always")
        def read(table, at, part):
            return (first(table, at),) + others(table, at + size, part)
    else:
        first_grad = _gradient_reader(grads_kind, ndim, pointer_at)

        @njit(inline="always")
        def read(table, at, part):
            return (first_grad(table, at, part),) + others(table, at + size, part)
    return read


@njit(inline="always")
def entry_indices(address, entry, b, h):
    """``(b, h)`` of ``entry`` from the int64 ``(N, 2)`` array at ``address``, or the
    given ``b`` and ``h`` where ``address`` is 0."""
    if address == 0:
        return b, h
    indices = carray(pointer_to(address + 16 * entry, np.int64), (2,))
    return indices[0], indices[1]


@njit(inline="always")
def _apply(function, arguments):
    """``function(*arguments)``."""
    return function(*arguments)


# ---------------------------------------------------------------- the hooks

@functools.lru_cache(maxsize=HOOK_CACHE_SIZE)
def block_hook(score_mod, mask_mod, score_mod_grad, dtype, score_kinds=(), mask_kinds=(),
               score_mod_args_grad=None):
    """The :class:`BlockHook` (its ``address`` goes to the kernels) applying
    these user functions (each may be None) to scores of ``dtype``, for arguments of
    the ``(dtype, ndim)`` ``score_kinds`` and ``mask_kinds``.

    The last :data:`HOOK_CACHE_SIZE` combinations are kept; a caller holds the hook
    while the kernels run (its address is valid while it lives). The functions must
    already be checked (:mod:`fastattn._contract.functions`).
    """
    cast = np.float32 if np.dtype(dtype) == np.float32 else np.float64
    has_score_mod, has_mask_mod, has_grad, has_args_grad = (
        score_mod is not None, mask_mod is not None, score_mod_grad is not None,
        score_mod_args_grad is not None)
    # Numba compiles the branches below away for the missing functions; these
    # stand-ins are never called.
    score_mod = in_kernel(score_mod) if has_score_mod else _unused
    mask_mod = in_kernel(mask_mod) if has_mask_mod else _unused
    score_mod_grad = in_kernel(score_mod_grad) if has_grad else _unused
    args_grad = in_kernel(score_mod_args_grad) if has_args_grad else _unused
    mask_at = ARGUMENTS_AT + sum(1 + ndim for _, ndim in score_kinds)
    pointers_at = mask_at + sum(1 + ndim for _, ndim in mask_kinds)
    table_size = pointers_at + len(score_kinds)
    read_score_args = arguments_reader(score_kinds)
    read_mask_args = arguments_reader(mask_kinds)
    read_arg_grads = arguments_reader(score_kinds, cast, pointers_at)

    def hook(scores_at, grads_at, rows, cols, row_start, key_start, b, h, mode, table_at,
             part, running_at):
        full_width_vectors()  # 512-bit vectors where the CPU has them
        scores = carray(scores_at, (rows, cols))
        table = carray(table_at, (table_size,))
        running = carray(running_at, (1,))  # which function runs, read if one raises
        score_args = read_score_args(table, ARGUMENTS_AT, 0)
        row_start += table[POSITIONS_AT]  # the positions the user functions see
        key_start += table[POSITIONS_AT + 1]
        entry = b * table[POSITIONS_AT + 2] + h
        mask_b, mask_h = entry_indices(table[POSITIONS_AT + 4], entry, b, h)
        b, h = entry_indices(table[POSITIONS_AT + 3], entry, b, h)
        if has_args_grad and mode == ARGS_GRADS:
            grads = carray(grads_at, (rows, cols))
            arg_grads = read_arg_grads(table, ARGUMENTS_AT, part)
            running[0] = 4
            for r in range(rows):
                for c in range(cols):
                    score, grad = scores[r, c], grads[r, c]
                    if score != -np.inf and grad != 0:
                        _apply(args_grad, (grad, score * LN2, b, h, row_start + r,
                                           key_start + c, arg_grads) + score_args)
            return
        if has_grad and mode & (WRITE_GRADS | MULTIPLY_GRADS):
            grads = carray(grads_at, (rows, cols))
            multiply = mode & MULTIPLY_GRADS != 0
            running[0] = 3
            for r in range(rows):
                for c in range(cols):
                    score = scores[r, c] * LN2  # natural units
                    grad = cast(_apply(score_mod_grad, (score, b, h, row_start + r,
                                                        key_start + c) + score_args))
                    grad = cast(0.0) if scores[r, c] == -np.inf else grad
                    grads[r, c] = grads[r, c] * grad if multiply else grad
        if has_score_mod:
            running[0] = 1
            for r in range(rows):
                for c in range(cols):
                    score = scores[r, c]
                    changed = cast(_apply(score_mod, (score * LN2, b, h, row_start + r,
                                                      key_start + c) + score_args) * LOG2E)
                    scores[r, c] = score if score == -np.inf else changed
        if has_mask_mod and mode & APPLY_MASK:
            mask_args = read_mask_args(table, mask_at, 0)
            running[0] = 2
            for r in range(rows):
                for c in range(cols):
                    if not _apply(mask_mod, (mask_b, mask_h, row_start + r, key_start + c)
                                  + mask_args):
                        scores[r, c] = -np.inf

    signature = hook_signature(dtype)
    return BlockHook(njit(signature, error_model="numpy", fastmath=set(FASTMATH_FLAGS),
                          boundscheck=BOUNDS_CHECKS)(hook), signature)


@functools.lru_cache(maxsize=HOOK_CACHE_SIZE)
def in_kernel(function):
    """The user's ``function`` compiled again from its Python source with the
    kernels' options, for its hook: the NumPy error model (no exception checks,
    which would keep the block loop scalar), the kernels' fast-math flags
    (reassociation, no NaN or infinity assumptions), Numba's bounds checks (an index
    out of range raises, and the hook reports it), and ``math.tanh``,
    ``math.exp``, ``np.tanh`` and ``np.exp`` on scalars taken from
    :mod:`fastattn.score_math` (vectorisable, within a few rounding steps of the C
    library's, which costs about 12 ns per score). The Numba functions it calls are
    compiled again the same way. Keyword-only defaults are kept; the values of
    captured globals and closure variables are those at this moment (frozen)."""
    python_function = function.py_func
    if python_function in _BEING_REBUILT:  # a recursive function: leave the inner call
        return function
    _BEING_REBUILT.add(python_function)
    try:
        used = _global_names(python_function.__code__)
        names = dict(python_function.__globals__)
        names.update((name, _stand_in(value)) for name, value in names.items()
                     if name in used)
        cells = python_function.__closure__
        if cells is not None:  # variables captured from an enclosing function
            cells = tuple(_stand_in_cell(cell) for cell in cells)
        rebuilt = pytypes.FunctionType(python_function.__code__, names,
                                       python_function.__name__,
                                       python_function.__defaults__, cells)
        rebuilt.__kwdefaults__ = python_function.__kwdefaults__
        return njit(error_model="numpy", fastmath=set(FASTMATH_FLAGS),
                    boundscheck=BOUNDS_CHECKS)(keywords_as_positional(rebuilt))
    finally:
        _BEING_REBUILT.discard(python_function)


_BEING_REBUILT = set()


def keywords_as_positional(python_function):
    """``python_function`` with its keyword-only parameters made trailing positional
    ones with the same defaults (a new function; the same one when it has none, or
    one without a default, or ``*args``). Numba cannot call a function with
    keyword-only parameters; the kernels pass positional arguments only, so the
    defaults apply."""
    code = python_function.__code__
    defaults = python_function.__kwdefaults__ or {}
    start, count = code.co_argcount, code.co_kwonlyargcount
    names = code.co_varnames[start:start + count]
    if not count or code.co_flags & inspect.CO_VARARGS or not set(names) <= set(defaults):
        return python_function
    rebuilt = pytypes.FunctionType(
        code.replace(co_argcount=start + count, co_kwonlyargcount=0),
        python_function.__globals__, python_function.__name__,
        (python_function.__defaults__ or ()) + tuple(defaults[name] for name in names),
        python_function.__closure__)
    return rebuilt


def _global_names(code):
    """The names ``code`` (and the functions defined in it) may look up as globals."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, pytypes.CodeType):
            names |= _global_names(constant)
    return names


def _stand_in_cell(cell):
    """A closure cell holding the stand-in of ``cell``'s value (``cell`` if empty)."""
    try:
        return pytypes.CellType(_stand_in(cell.cell_contents))
    except ValueError:  # a cell not yet filled
        return cell


def _stand_in(value):
    """What :func:`in_kernel` puts in place of a value the function reads: the
    ``math`` and ``numpy`` modules and their ``tanh`` and ``exp`` become their
    vectorisable stand-ins, Numba functions are compiled again (:func:`in_kernel`),
    anything else is kept."""
    if value is math:
        return _VECTOR_MATH_MODULE
    if value is np:
        return _VECTOR_NUMPY_MODULE
    for module, replacements in ((math, _VECTOR_MATH), (np, _VECTOR_NUMPY)):
        for name, replacement in replacements.items():
            if value is getattr(module, name):
                return replacement
    if is_jitted(value) and hasattr(value, "py_func"):
        return in_kernel(value)
    return value


def _scalar_stand_in(vector_function, ufunc):
    """``ufunc`` (``np.tanh``, ``np.exp``) for Numba: ``vector_function`` on a float
    scalar, the ufunc itself on anything else."""
    def stand_in(x):
        return ufunc(x)

    @overload(stand_in, inline="always")
    def _stand_in_overload(x):
        if isinstance(x, types.Float):
            return lambda x: vector_function(x)
        return lambda x: ufunc(x)
    return stand_in


def _module_stand_in(module, replacements):
    """A stand-in for ``module``: its names, with ``replacements``."""
    stand_in = pytypes.ModuleType(module.__name__)
    stand_in.__dict__.update(vars(module))
    stand_in.__dict__.update(replacements)
    return stand_in


_VECTOR_MATH = {"tanh": vector_math.tanh, "exp": vector_math.exp}
_VECTOR_NUMPY = {"tanh": _scalar_stand_in(vector_math.tanh, np.tanh),
                 "exp": _scalar_stand_in(vector_math.exp, np.exp)}
_VECTOR_MATH_MODULE = _module_stand_in(math, _VECTOR_MATH)
_VECTOR_NUMPY_MODULE = _module_stand_in(np, _VECTOR_NUMPY)


@njit
def _unused(*arguments):
    return True
