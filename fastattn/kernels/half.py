"""16-bit inputs: bfloat16 and float16 read as they are, converted block by block.

A 16-bit call (query, key and value of one 16-bit float dtype) runs the kernels'
one extra compiled variant, keyed ``uint16``: the stacks of
:class:`fastattn.kernels.groups.Inputs` (and the forward's ``out``, the backward's
``grad_out``) are the 16-bit storage viewed as ``uint16``, and the runtime flag
``Inputs.half_format`` says how to read it (:data:`BFLOAT16` or :data:`FLOAT16`),
so bfloat16 and float16 share the variant. Everything is computed in float32:

- bfloat16 -> float32 is exact: the float32 bits are the 16 bits shifted left by 16;
  float16 -> float32 is exact too (LLVM's ``fpext half``, one ``vcvtph2ps`` with F16C);
- float32 -> bfloat16 rounds to nearest, ties to even (NaN stays NaN, quiet);
  float32 -> float16 is LLVM's ``fptrunc`` (round to nearest even, overflow to inf).

The helpers below are generic over the storage: on float32/float64 arrays they
are the identity (:func:`rows_in` returns a view, :func:`staging` sizes no buffer),
so the float kernels compile to what they were, and the 16-bit variant converts
each block of keys, values or queries into the thread's scratch memory (in cache)
just before its float32 block products.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from fastattn.kernels.config import jit_helper
from fastattn.kernels.vector_math import block_view, full_width_vectors, has_nan

# Inputs.half_format: how a uint16 stack is read (ignored for float stacks)
BFLOAT16 = 0
FLOAT16 = 1


@intrinsic
def bfloat16_to_float32(typingctx, bits):
    """float32 of the bfloat16 ``bits`` (uint16): the bits shifted into the high half."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def float16_to_float32(typingctx, bits):
    """float32 of the float16 ``bits`` (uint16), exact (``fpext half``)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def float32_to_bfloat16(typingctx, value):
    """bfloat16 bits (uint16) of the float32 ``value``, rounded to nearest, ties to
    even; a NaN stays a (quiet) NaN of the same sign."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        int32 = ir.IntType(32)
        bits = builder.bitcast(args[0], int32)
        high = builder.lshr(bits, ir.Constant(int32, 16))
        odd = builder.and_(high, ir.Constant(int32, 1))
        rounded = builder.lshr(builder.add(builder.add(bits, ir.Constant(int32, 0x7FFF)), odd),
                               ir.Constant(int32, 16))
        quiet_nan = builder.or_(high, ir.Constant(int32, 0x40))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))
    return types.uint16(value), codegen


@intrinsic
def float32_to_float16(typingctx, value):
    """float16 bits (uint16) of the float32 ``value`` (``fptrunc``: nearest, ties to
    even; beyond 65504 infinity)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(value), codegen


def as_compute(value, half_format):
    """A stored scalar in the compute dtype: float32 of 16-bit bits, floats as they are."""
    return value


@overload(as_compute, inline="always")
def _as_compute_overload(value, half_format):
    if value == types.uint16:
        def from_bits(value, half_format):
            if half_format == BFLOAT16:
                return bfloat16_to_float32(value)
            return float16_to_float32(value)
        return from_bits
    if isinstance(value, types.Float):
        return lambda value, half_format: value


def stored_value(value, array, half_format):
    """``value`` as an entry of ``array``: its 16-bit bits for a uint16 array (rounded
    to nearest even), else cast to the array's float dtype."""
    return array.dtype.type(value)


@overload(stored_value, inline="always")
def _stored_value_overload(value, array, half_format):
    if array.dtype == types.uint16:
        def to_bits(value, array, half_format):
            single = np.float32(value)
            if half_format == BFLOAT16:
                return float32_to_bfloat16(single)
            return float32_to_float16(single)
        return to_bits
    if array.dtype == types.float32:
        return lambda value, array, half_format: np.float32(value)
    if array.dtype == types.float64:
        return lambda value, array, half_format: np.float64(value)


def staging(array, count):
    """Scratch entries a kernel needs to convert blocks of ``array``: ``count`` for
    16-bit storage, 0 for float storage (read in place)."""
    return count if array.dtype == np.uint16 else 0


@overload(staging, inline="always")
def _staging_overload(array, count):
    if array.dtype == types.uint16:
        return lambda array, count: count
    return lambda array, count: 0


def rows_in(source, first, stop, buffer, half_format):
    """Rows ``[first, stop)`` of the 2-D ``source`` in the compute dtype: a view of
    a float ``source``; for 16-bit storage, converted into the flat float32
    ``buffer`` (at least ``(stop - first) * cols`` entries) and returned as a
    C-contiguous ``(stop - first, cols)`` view of it."""
    return source[first:stop]


@overload(rows_in, inline="always")
def _rows_in_overload(source, first, stop, buffer, half_format):
    if source.dtype == types.uint16:
        def converted(source, first, stop, buffer, half_format):
            rows = block_view(buffer, stop - first, source.shape[1])  # (rows, cols)
            convert_rows(source[first:stop], rows, half_format)
            return rows
        return converted
    return lambda source, first, stop, buffer, half_format: source[first:stop]


@jit_helper
def convert_rows(source, target, half_format):
    """``target = float32(source)`` for a uint16 ``source`` ``(rows, cols)`` into a
    C-contiguous float32 ``target``; one loop per format (each vectorised: a shift,
    or ``vcvtph2ps``)."""
    full_width_vectors()
    rows, cols = source.shape
    if half_format == BFLOAT16:
        for r in range(rows):
            for c in range(cols):
                target[r, c] = bfloat16_to_float32(source[r, c])
    else:
        for r in range(rows):
            for c in range(cols):
                target[r, c] = float16_to_float32(source[r, c])


def holds_nan(block, half_format):
    """Whether the 2-D ``block`` (any storage) holds a NaN; 16-bit bits are tested as
    they are (exponent all ones, mantissa not zero), without converting them."""
    return bool(np.isnan(block).any())


@overload(holds_nan, inline="always")
def _holds_nan_overload(block, half_format):
    if block.dtype == types.uint16:
        def bits_hold_nan(block, half_format):
            infinity = 0x7F80 if half_format == BFLOAT16 else 0x7C00
            rows, cols = block.shape
            for r in range(rows):
                for c in range(cols):
                    if (block[r, c] & 0x7FFF) > infinity:
                        return True
            return False
        return bits_hold_nan
    return lambda block, half_format: has_nan(block)
