"""Vectorisable scalar math for the softmax loops: ``exp2``, ``tanh`` and ``maximum``.

``maximum`` is LLVM's ``maxnum``, which (unlike a compare-and-select) vectorises as
a reduction without the ``nnan`` fast-math flag; a NaN operand yields the other one.

Scalar ``math.exp`` is a library call that LLVM cannot vectorise (about 5 ns each);
this version is a few multiply-adds and a bit cast, so loops over it become SIMD.

Method: round ``x`` to the nearest integer ``n``, so ``f = x - n`` lies in
``[-1/2, 1/2]``; ``2**f = exp(f ln 2)`` is its Taylor series (``|f ln 2| <= 0.35``),
and ``2**n`` is built directly in the float's exponent bits. Degree 6 in float32
(truncation error 1.2e-7, about one float32 rounding step) and degree 12 in
float64 (1.6e-16). Inputs are clipped to ``[-127, 127]`` (float64 ``[-1023, 1023]``);
``n = -127`` (``-1023``) has exponent bits 0, so inputs below about the smallest
normal exponent give exactly 0, which is what a hidden key (``-inf``) must
contribute. The softmax only ever passes inputs ``<= 0``.

``tanh`` (for the softcap) is built on ``exp2`` the same way, about 5x cheaper than
the ``libm`` call of ``math.tanh``: for ``|x| >= 1/8``,
``tanh |x| = (1 - e) / (1 + e)`` with ``e = exp(-2 |x|)`` (``e <= 0.78``, so the
subtraction loses at most a factor 4.5 of precision; ``e`` is 0 far out, giving
exactly 1); below, the odd Taylor series (through ``x**9`` in float32, ``x**17`` in
float64; each term is below ``(x / (pi / 2))**2 <= 0.0064`` times the previous one).
Both branches are computed and one is selected, so loops over it stay SIMD. NaN
stays NaN.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from fastattn.kernels.config import jit_helper

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2

# Taylor coefficients of exp(f ln 2): (ln 2)**k / k!, highest degree first.
_FLOAT32_COEFFICIENTS = tuple(LN2 ** k / math.factorial(k) for k in range(6, -1, -1))
_FLOAT64_COEFFICIENTS = tuple(LN2 ** k / math.factorial(k) for k in range(12, -1, -1))


def _unary_float_intrinsic(name):
    """An LLVM float intrinsic of one argument (``llvm.arithmetic.fence`` ...) callable
    from Numba."""
    @intrinsic
    def call(typingctx, a):
        if not isinstance(a, types.Float):
            return None

        def codegen(context, builder, signature, args):
            value_type = args[0].type
            function = builder.module.declare_intrinsic(
                name, [value_type], ir.FunctionType(value_type, [value_type]))
            return builder.call(function, args)
        return a(a), codegen
    return call


# Adding these rounds x in [-127, 127] ([-1023, 1023] in float64) to the nearest integer
# n: the sum lies in [2**23, 2**24) ([2**52, 2**53)) where floats are the integers, and
# its lowest 9 (12) bits hold n + 127 (n + 1023), the biased exponent of 2**n.
_ROUNDER = {types.float32: np.float32(1.5 * 2 ** 23 + 127),
            types.float64: np.float64(1.5 * 2 ** 52 + 1023)}


@intrinsic
def _exponent_scale(typingctx, shifted):
    """``2**n`` from ``shifted = n + _ROUNDER``: the bits of ``shifted`` moved up by the
    mantissa width, so the low bits holding ``n + bias`` become the exponent field
    (0, giving exactly 0, for ``n`` = -127 or -1023)."""
    if shifted == types.float32:
        int_type, mantissa_bits = ir.IntType(32), 23
    elif shifted == types.float64:
        int_type, mantissa_bits = ir.IntType(64), 52
    else:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.shl(builder.bitcast(args[0], int_type), ir.Constant(int_type, mantissa_bits))
        return builder.bitcast(bits, args[0].type)
    return shifted(shifted), codegen


@intrinsic
def _whole_part(typingctx, shifted):
    """The integer ``n`` of ``shifted = n + _ROUNDER`` as a float, through the bits
    (the float subtraction ``shifted - _ROUNDER`` would be cancelled against the
    addition by fast-math reassociation, and ``llvm.arithmetic.fence`` stops the loops
    from vectorising)."""
    if shifted not in _ROUNDER:
        return None
    int_type = ir.IntType(32 if shifted == types.float32 else 64)
    rounder_bits = int(np.array(_ROUNDER[shifted]).view(f"int{int_type.width}"))

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], int_type)
        whole = builder.sub(bits, ir.Constant(int_type, rounder_bits))
        return builder.sitofp(whole, args[0].type)
    return shifted(shifted), codegen


# Taylor coefficients of tanh(x) / x in powers of x**2: 1, -1/3, 2/15, ...
_TANH_COEFFICIENTS = (1.0, -1.0 / 3.0, 2.0 / 15.0, -17.0 / 315.0, 62.0 / 2835.0,
                      -1382.0 / 155925.0, 21844.0 / 6081075.0, -929569.0 / 638512875.0,
                      6404582.0 / 10854718875.0)
# Below this |x| tanh uses its Taylor series, above it exp.
_TANH_SERIES_LIMIT = 0.125


@intrinsic
def maximum(typingctx, a, b):
    """The larger of two floats of one type, as LLVM's ``maxnum`` intrinsic."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        value_type = args[0].type
        function = builder.module.declare_intrinsic(
            "llvm.maxnum", [value_type], ir.FunctionType(value_type, [value_type, value_type]))
        return builder.call(function, args)
    return a(a, a), codegen


@intrinsic
def select(typingctx, condition, a, b):
    """``a if condition else b`` for floats of one type, as one LLVM ``select`` (a
    conditional expression inlined by Numba would become a branch)."""
    if not (isinstance(condition, types.Boolean) and isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])
    return a(condition, a, a), codegen


def _exp2_in_range(x):
    """``2**x`` for ``x`` in the clipped range (pure-Python fallback)."""
    return 2.0 ** x if x > -127.0 else 0.0


@overload(_exp2_in_range, inline="always")
def _exp2_in_range_overload(x):
    # Round x to n by adding _ROUNDER, take n back through the sum's bits, the
    # polynomial of the remainder f in [-1/2, 1/2], and 2**n from the sum's low bits:
    # an add, an integer subtract, a conversion, a subtract and a shift besides the
    # polynomial (floor, conversion and exponent add before).
    rounder = _ROUNDER.get(x)
    if x == types.float32:
        c6, c5, c4, c3, c2, c1, c0 = (np.float32(c) for c in _FLOAT32_COEFFICIENTS)

        def exp2_in_range_float32(x):
            shifted = x + rounder  # n + rounder, n the integer nearest x
            f = x - _whole_part(shifted)  # [-1/2, 1/2]
            poly = c0 + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * (c5 + f * c6)))))
            return poly * _exponent_scale(shifted)  # poly * 2**n
        return exp2_in_range_float32

    if x == types.float64:
        (c12, c11, c10, c9, c8, c7, c6, c5, c4, c3, c2, c1, c0) = _FLOAT64_COEFFICIENTS

        def exp2_in_range_float64(x):
            shifted = x + rounder
            f = x - _whole_part(shifted)
            poly = c0 + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * (c5 + f * (c6 + f * (
                c7 + f * (c8 + f * (c9 + f * (c10 + f * (c11 + f * c12)))))))))))
            return poly * _exponent_scale(shifted)
        return exp2_in_range_float64


def exp2(x):
    """``2**x`` (pure-Python fallback when the JIT is disabled)."""
    return 2.0 ** x if x > -1022.0 else 0.0


@overload(exp2, inline="always")
def _exp2_overload(x):
    if x == types.float32:
        def exp2_float32(x):
            # n = -127 gives exponent bits 0, so 2**n = 0: everything below 2**-126.5
            # (a hidden key's -inf included) comes out as exactly 0
            return _exp2_in_range(min(max(x, np.float32(-127.0)), np.float32(127.0)))
        return exp2_float32

    if x == types.float64:
        def exp2_float64(x):
            return _exp2_in_range(min(max(x, -1023.0), 1023.0))  # n = -1023: 0, as above
        return exp2_float64


def tanh(x):
    """``tanh(x)`` (pure-Python fallback when the JIT is disabled)."""
    return math.tanh(x)


@overload(tanh, inline="always")
def _tanh_overload(x):
    if x == types.float32:
        t1, t3, t5, t7, t9 = (np.float32(c) for c in _TANH_COEFFICIENTS[:5])
        limit, minus_two_log2e = np.float32(_TANH_SERIES_LIMIT), np.float32(-2.0 * LOG2E)
        one = np.float32(1.0)

        def tanh_float32(x):
            x2 = x * x
            series = x * (t1 + x2 * (t3 + x2 * (t5 + x2 * (t7 + x2 * t9))))
            e = exp2(abs(x) * minus_two_log2e)  # exp(-2|x|), 0 far out
            magnitude = (one - e) / (one + e)
            result = select(abs(x) < limit, series, select(x > 0, magnitude, -magnitude))
            return select(x == x, result, x)  # NaN stays NaN
        return tanh_float32

    if x == types.float64:
        t1, t3, t5, t7, t9, t11, t13, t15, t17 = _TANH_COEFFICIENTS
        limit, minus_two_log2e = _TANH_SERIES_LIMIT, -2.0 * LOG2E

        def tanh_float64(x):
            x2 = x * x
            series = x * (t1 + x2 * (t3 + x2 * (t5 + x2 * (t7 + x2 * (t9 + x2 * (
                t11 + x2 * (t13 + x2 * (t15 + x2 * t17))))))))
            e = exp2(abs(x) * minus_two_log2e)
            magnitude = (1.0 - e) / (1.0 + e)
            result = select(abs(x) < limit, series, select(x > 0, magnitude, -magnitude))
            return select(x == x, result, x)  # NaN stays NaN
        return tanh_float64


def cast_like(value, array):
    """``value`` as a scalar of ``array``'s dtype (pure-Python fallback)."""
    return array.dtype.type(value)


@overload(cast_like, inline="always")
def _cast_like_overload(value, array):
    if array.dtype == types.float32:
        return lambda value, array: np.float32(value)
    if array.dtype == types.float64:
        return lambda value, array: np.float64(value)


# Below these exponents a softmax probability (relative to the row's largest, 1) is
# taken as exactly 0: the keys dropped weigh at most Lk * 2**-64 (float32) or
# Lk * 2**-600 (float64) of the row's sum, far below a rounding step, and the
# probabilities kept times any value of magnitude above 2**-62 (2**-422) stay
# normal numbers. Subnormal products make the block products several times slower
# (ALiBi at L = 2048 spent a third of its time on them).
_PROBABILITY_CUTOFF = {types.float32: np.float32(-64.0), types.float64: np.float64(-600.0)}


def probability_exp2(x):
    """``2**x`` for a softmax probability, 0 below a cutoff (pure-Python fallback)."""
    return exp2(x) if x >= -64.0 else 0.0


@overload(probability_exp2, inline="always")
def _probability_exp2_overload(x):
    # exp2 with its lower clip replaced by a select: below the cutoff the input becomes
    # the exponent giving exactly 0, at the cost of exp2's own clip (one compare and
    # blend), so the softmax loop pays nothing for the cutoff.
    if x in _PROBABILITY_CUTOFF:
        cutoff = _PROBABILITY_CUTOFF[x]
        lowest, highest = ((np.float32(-127.0), np.float32(127.0)) if x == types.float32
                           else (np.float64(-1023.0), np.float64(1023.0)))

        def probability_exp2_any(x):
            return _exp2_in_range(min(select(x < cutoff, lowest, x), highest))  # NaN stays
        return probability_exp2_any


def elementwise_check(function):
    """``function`` applied to every entry of a 1-D array, compiled (for tests of the
    scalar functions as the kernels compile them)."""
    @njit
    def check(x):
        out = np.empty_like(x)
        for index in range(x.size):
            out[index] = function(x[index])
        return out
    return check


exp2_check = elementwise_check(exp2)
tanh_check = elementwise_check(tanh)
probability_exp2_check = elementwise_check(probability_exp2)


@njit(error_model="numpy", boundscheck=False)
def has_nan(block):
    """Whether a 2-D array holds a NaN (``x != x``; kept, since ``nnan`` is off)."""
    found = False
    rows, cols = block.shape
    for r in range(rows):
        for c in range(cols):
            found |= block[r, c] != block[r, c]
    return found


@njit(inline="always")
def block_view(buffer, rows, cols):
    """The first ``rows * cols`` entries of a flat buffer as a C-contiguous
    ``(rows, cols)`` array (a slice of a 2-D buffer would not be contiguous)."""
    return buffer[:rows * cols].reshape((rows, cols))


@jit_helper
def add_into(target, block):
    """``target += block`` for 2-D arrays of one shape, as a plain loop (an array
    expression would compile NumPy's broadcasting machinery at every use)."""
    rows, cols = block.shape
    for r in range(rows):
        for c in range(cols):
            target[r, c] += block[r, c]


@intrinsic
def full_width_vectors(typingctx):
    """Mark the calling function to be compiled with the CPU's full vector width.

    LLVM's tuning for some CPUs with 512-bit vectors (Intel's since Skylake-X, AMD's
    Zen 4) prefers 256-bit ones, for the whole process when set through Numba's
    ``NUMBA_CPU_FEATURES``. This sets LLVM's per-function attributes instead
    (``"prefer-vector-width"="512"``, ``"min-legal-vector-width"="512"``) and keeps the
    function out of line (``noinline``), since inlining it would hand its loops to the
    caller's attributes. Call it first in a helper whose loops should use them; it
    computes nothing.
    """
    def codegen(context, builder, signature, args):
        attributes = builder.function.attributes
        # llvmlite's attribute set accepts only its known flags; string attributes are
        # written into the IR as given
        set.add(attributes, '"prefer-vector-width"="512"')
        set.add(attributes, '"min-legal-vector-width"="512"')
        attributes.add("noinline")
        return context.get_dummy_value()
    return types.none(), codegen
