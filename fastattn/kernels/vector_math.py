"""Vectorisable scalar math for the softmax loops: ``exp2`` and ``tanh``; the row
maximum as an explicit 512-bit vector loop; per-function full vector width.

Scalar ``math.exp`` is a library call that LLVM cannot vectorise (about 5 ns each);
this version is a few multiply-adds and integer operations, so loops over it become
SIMD.

Method: round ``x`` to the nearest integer ``n`` by adding ``1.5 * 2**23 + 127``
(float64: ``1.5 * 2**52 + 1023``), whose sum has ``n`` plus the exponent bias in its
lowest bits; ``f = x - n`` lies in ``[-1/2, 1/2]``; ``2**f`` is a polynomial, and
``2**n`` is those low bits moved into the float's exponent field. The polynomials
(degree 5 in float32, 11 in float64, constant term 1) are within about one rounding
step of ``2**f``: relative error 1.7e-7 in float32, 2.2e-16 in float64. Inputs are
clipped to ``[-127, 127]`` (float64 ``[-1023, 1023]``); ``n = -127`` (``-1023``) has
exponent bits 0, so inputs below about the smallest normal exponent give exactly 0,
which is what a hidden key (``-inf``) must contribute. The softmax only ever passes
inputs ``<= 0``.

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

# Polynomials for 2**f on [-1/2, 1/2], highest degree first, constant term exactly 1
# (so exp2(0) == 1 and a softmax correction factor of 1 stays 1). float32: degree 5,
# relative error 9.2e-8 (1.7e-7 evaluated in float32), fitted for the least maximum
# relative error with the constant fixed (Lawson's iteratively reweighted least
# squares); degree 6 Taylor, one multiply-add more, was 1.2e-7 (2.4e-7).
# float64: degree 11, Chebyshev interpolation (mpmath.chebyfit), error 3.2e-18, below
# float64's rounding; degree 12 Taylor was 1.6e-16.
_FLOAT32_COEFFICIENTS = (0.001326470879115414, 0.009671511471170138, 0.05550733776475653,
                         0.2402224210397889, 0.6931469775940111, 1.0)
_FLOAT64_COEFFICIENTS = (4.4558179083360645e-10, 7.074194297288521e-09,
                         1.0178057087733941e-07, 1.3215432535912375e-06,
                         1.5252733841556773e-05, 0.00015403530463724353,
                         0.001333355814640647, 0.009618129107587256, 0.055504108664821625,
                         0.24022650695910158, 0.6931471805599453, 1.0)


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
        bits = builder.shl(builder.bitcast(args[0], int_type),
                           ir.Constant(int_type, mantissa_bits))
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
        c5, c4, c3, c2, c1, c0 = (np.float32(c) for c in _FLOAT32_COEFFICIENTS)

        def exp2_in_range_float32(x):
            shifted = x + rounder  # n + rounder, n the integer nearest x
            f = x - _whole_part(shifted)  # [-1/2, 1/2]
            poly = c0 + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * c5))))
            return poly * _exponent_scale(shifted)  # poly * 2**n
        return exp2_in_range_float32

    if x == types.float64:
        (c11, c10, c9, c8, c7, c6, c5, c4, c3, c2, c1, c0) = _FLOAT64_COEFFICIENTS

        def exp2_in_range_float64(x):
            shifted = x + rounder
            f = x - _whole_part(shifted)
            poly = c0 + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * (c5 + f * (c6 + f * (
                c7 + f * (c8 + f * (c9 + f * (c10 + f * c11))))))))))
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


@njit(inline="always")
def exp(x):
    """``e**x``, vectorisable (``exp2(x * log2(e))``); 0 far below ``-87`` (float32)
    or ``-709`` (float64)."""
    return exp2(x * LOG2E)


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
# exp2's input range: the lower end gives exactly 0, see _exponent_scale.
_EXPONENT_RANGE = {types.float32: (np.float32(-127.0), np.float32(127.0)),
                   types.float64: (np.float64(-1023.0), np.float64(1023.0))}


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
        lowest, highest = _EXPONENT_RANGE[x]

        def probability_exp2_any(x):
            return _exp2_in_range(min(select(x < cutoff, lowest, x), highest))  # NaN stays
        return probability_exp2_any


def softmax_exp2(x):
    """:func:`probability_exp2` for ``x`` below exp2's upper clip (127 in float32) or
    NaN only, such as a score minus a reference a little under the largest score of
    its row (pure-Python fallback)."""
    return probability_exp2(x)


@overload(softmax_exp2, inline="always")
def _softmax_exp2_overload(x):
    # probability_exp2 without the upper clip, which the forward's softmax inputs
    # (at most RESCALE_STEP above 0) never reach: one instruction less in its loop.
    if x in _PROBABILITY_CUTOFF:
        cutoff = _PROBABILITY_CUTOFF[x]
        lowest = _EXPONENT_RANGE[x][0]

        def softmax_exp2_any(x):
            return _exp2_in_range(select(x < cutoff, lowest, x))  # NaN stays
        return softmax_exp2_any


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
softmax_exp2_check = elementwise_check(softmax_exp2)


@njit
def row_maximum_check(row, start):
    """:func:`row_maximum` compiled on its own (for tests)."""
    return row_maximum(row, start)


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


LINE_BYTES = 64  # a cache line, and the alignment MKL asks of its operands


@njit(inline="always")
def whole_lines(count):
    """``count`` entries rounded up to a multiple of 16: whole 64-byte lines in
    float32 and in float64. Buffers carved from line-aligned scratch at offsets of
    whole lines start on a line too."""
    return -(-count // 16) * 16


@jit_helper
def line_aligned_rows(rows, cols, like):
    """An uninitialised C-contiguous ``(rows, cols)`` array of ``like``'s dtype whose
    first entry starts a 64-byte line; when ``cols`` entries are whole lines, so does
    every row. For per-thread scratch memory: a block's alignment then does not
    depend on which thread's scratch holds it (MKL's results can depend on it)."""
    line = LINE_BYTES // like.itemsize  # entries per line
    flat = np.empty(rows * cols + line, dtype=like.dtype)
    skip = (-(flat.ctypes.data // like.itemsize)) % line  # entries before the next line
    return flat[skip:skip + rows * cols].reshape((rows, cols))


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


# Lanes of the explicit vector loops: 512 bits.
_VECTOR_LANES = {types.float32: 16, types.float64: 8}


@intrinsic
def row_maximum(typingctx, row, start):
    """``max(start, row[0], row[1], ...)`` for a 1-D C-contiguous float array, NaN
    entries skipped, as an explicit loop over 512-bit vectors.

    Each lane keeps ``value if value > best else best`` (so a NaN never wins), which
    the CPU does in one instruction, where ``maxnum`` also needs a NaN check and a
    blend per vector (LLVM vectorises only ``maxnum`` reductions without ``nnan``).
    On CPUs with narrower vectors LLVM splits each 512-bit operation.
    ``start`` must not be NaN. Four accumulators hide the instruction's latency; the
    last entries that fill no vector are taken one by one.
    """
    if not (isinstance(row, types.Array) and row.ndim == 1 and row.layout == "C"
            and row.dtype == start and start in _VECTOR_LANES):
        return None
    lanes = _VECTOR_LANES[start]
    element_bytes = 4 if start == types.float32 else 8
    accumulators = 4

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        row_type, _ = signature.args
        array = context.make_array(row_type)(context, builder, args[0])
        start_value = args[1]
        float_type = start_value.type
        vector_type = ir.VectorType(float_type, lanes)
        intp = context.get_value_type(types.intp)
        count = builder.extract_value(array.shape, 0)
        data = array.data

        def take_larger(best, value):
            return builder.select(builder.fcmp_ordered(">", value, best), value, best)

        splat = cgutils.alloca_once_value(builder, ir.Constant(vector_type, ir.Undefined))
        vector = builder.load(splat)
        for lane in range(lanes):
            vector = builder.insert_element(vector, start_value, ir.Constant(ir.IntType(32), lane))
        bests = [cgutils.alloca_once_value(builder, vector) for _ in range(accumulators)]
        step = lanes * accumulators
        n_steps = builder.udiv(count, ir.Constant(intp, step))
        with cgutils.for_range(builder, n_steps, intp=intp) as loop:
            base = builder.mul(loop.index, ir.Constant(intp, step))
            for k, best in enumerate(bests):
                offset = builder.add(base, ir.Constant(intp, k * lanes))
                pointer = builder.bitcast(builder.gep(data, [offset]), vector_type.as_pointer())
                value = builder.load(pointer, align=element_bytes)
                builder.store(take_larger(builder.load(best), value), best)
        combined = builder.load(bests[0])
        for best in bests[1:]:
            combined = take_larger(combined, builder.load(best))
        result = cgutils.alloca_once_value(builder, start_value)
        for lane in range(lanes):
            element = builder.extract_element(combined, ir.Constant(ir.IntType(32), lane))
            builder.store(take_larger(builder.load(result), element), result)
        done = builder.mul(n_steps, ir.Constant(intp, step))
        with cgutils.for_range(builder, builder.sub(count, done), intp=intp) as loop:
            value = builder.load(builder.gep(data, [builder.add(done, loop.index)]))
            builder.store(take_larger(builder.load(result), value), result)
        return builder.load(result)
    return start(row, start), codegen


@intrinsic
def prefetch_line(typingctx, array, byte_offset):
    """Ask the CPU to bring the 64-byte line ``byte_offset`` bytes into ``array``'s data
    into its caches (``llvm.prefetch``: a read, kept close); it computes nothing and
    never faults, whatever the offset."""
    if not (isinstance(array, types.Array) and isinstance(byte_offset, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [args[1]])
        int32 = ir.IntType(32)
        function = builder.module.declare_intrinsic(
            "llvm.prefetch", [address.type],
            ir.FunctionType(ir.VoidType(), [address.type, int32, int32, int32]))
        builder.call(function, [address, ir.Constant(int32, 0), ir.Constant(int32, 3),
                                ir.Constant(int32, 1)])
        return context.get_dummy_value()
    return types.void(array, byte_offset), codegen
