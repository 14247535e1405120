"""Block products through the BLAS ``gemm`` that :mod:`fastattn.blas` chose.

``product(gemm, a, b, out)`` writes ``out = a @ b``, ``scaled_product`` writes
``out = alpha * (a @ b)`` (the scale is gemm's ``alpha``: no pass over either
operand) and ``product_add`` adds ``out += a @ b`` (``gemm`` with ``beta = 1``: no
product buffer to zero and add).
``gemm`` is the address of a Fortran-convention ``sgemm`` / ``dgemm`` for the
operands' dtype (every argument by pointer, 32-bit integers: SciPy's
``cython_blas`` and MKL's LP64 interface alike), passed to the kernels at run time
in :class:`fastattn._dispatch.layout.ScoreOptions`, so one compiled kernel serves every BLAS.
The call runs on the calling thread; the BLAS must not start threads of its own
(:mod:`fastattn.blas` sets MKL to its sequential layer;
:class:`fastattn._runtime.threads.single_threaded_blas` keeps SciPy's at one thread).
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from fastattn.kernels.config import jit_helper

_FLOAT_TYPES = (types.float32, types.float64)


@intrinsic
def call_gemm(typingctx, gemm, a, b, out, accumulate, alpha):
    """``out = alpha * (a @ b)`` (``out += ...`` when ``accumulate``) through the gemm
    at address ``gemm`` (int64), ``alpha`` a float cast to the operands' dtype, for
    2-D arrays ``a`` ``(m, k)``, ``b`` ``(k, n)`` and ``out`` ``(m, n)`` of one float
    dtype; ``a`` and ``b`` C- or F-contiguous (a transposed C block is F), ``out``
    C-contiguous and writeable. Shapes are the caller's to match (not checked); with
    ``m``, ``n`` or ``k`` 0 nothing is done."""
    arrays = (a, b, out)
    if not (isinstance(gemm, types.Integer) and isinstance(accumulate, types.Boolean)
            and isinstance(alpha, types.Float)
            and all(isinstance(t, types.Array) and t.ndim == 2 and t.layout in "CF"
                    for t in arrays) and out.layout == "C" and out.mutable
            and a.dtype == b.dtype == out.dtype and out.dtype in _FLOAT_TYPES):
        return None

    def codegen(context, builder, signature, args):
        address, a_value, b_value, out_value, accumulate_value, alpha_value = args
        a_array, b_array, out_array = (context.make_array(t)(context, builder, value)
                                       for t, value in zip(signature.args[1:4],
                                                           (a_value, b_value, out_value)))
        int32, char = ir.IntType(32), ir.IntType(8)
        float_type = context.get_value_type(out.dtype)
        float_pointer = float_type.as_pointer()
        gemm_type = ir.FunctionType(ir.VoidType(), [
            char.as_pointer(), char.as_pointer(), int32.as_pointer(), int32.as_pointer(),
            int32.as_pointer(), float_pointer, float_pointer, int32.as_pointer(), float_pointer,
            int32.as_pointer(), float_pointer, float_pointer, int32.as_pointer()])

        def by_pointer(value):
            return cgutils.alloca_once_value(builder, value)

        def as_int32(value):
            return by_pointer(builder.trunc(value, int32))

        m, k = cgutils.unpack_tuple(builder, a_array.shape, 2)
        n = cgutils.unpack_tuple(builder, b_array.shape, 2)[1]
        one = ir.Constant(m.type, 1)

        def operand(array_type, array):
            # Column-major BLAS computes out.T = b.T @ a.T; a C array is its own
            # transpose in column-major order, an F array needs 't'.
            rows, cols = cgutils.unpack_tuple(builder, array.shape, 2)
            is_c = array_type.layout == "C"
            leading = cols if is_c else rows
            leading = builder.select(builder.icmp_signed("<", leading, one), one, leading)
            return (by_pointer(ir.Constant(char, ord("n" if is_c else "t"))), as_int32(leading),
                    builder.bitcast(array.data, float_pointer))

        trans_b, ld_b, data_b = operand(b, b_array)
        trans_a, ld_a, data_a = operand(a, a_array)
        beta = builder.select(accumulate_value, ir.Constant(float_type, 1.0),
                              ir.Constant(float_type, 0.0))
        zero = ir.Constant(m.type, 0)
        empty = builder.or_(builder.or_(builder.icmp_signed("==", m, zero),
                                        builder.icmp_signed("==", n, zero)),
                            builder.icmp_signed("==", k, zero))
        with builder.if_then(builder.not_(empty), likely=True):
            function = builder.inttoptr(address, gemm_type.as_pointer())
            builder.call(function, (trans_b, trans_a, as_int32(n), as_int32(m), as_int32(k),
                                    by_pointer(context.cast(builder, alpha_value,
                                                            signature.args[5], out.dtype)),
                                    data_b, ld_b,
                                    data_a, ld_a, by_pointer(beta),
                                    builder.bitcast(out_array.data, float_pointer),
                                    as_int32(builder.select(builder.icmp_signed("<", n, one),
                                                            one, n))))
        return context.get_dummy_value()
    return types.void(gemm, a, b, out, accumulate, alpha), codegen


@jit_helper
def product(gemm, a, b, out):
    """``out = a @ b`` (see :func:`call_gemm`); zeros when ``a`` has no columns."""
    scaled_product(gemm, 1.0, a, b, out)


@jit_helper
def scaled_product(gemm, alpha, a, b, out):
    """``out = alpha * (a @ b)`` (see :func:`call_gemm`); zeros when ``a`` has no
    columns."""
    if a.shape[1] == 0:
        out[:, :] = 0.0
        return
    call_gemm(gemm, a, b, out, False, alpha)


@jit_helper
def product_add(gemm, a, b, out):
    """``out += a @ b`` (see :func:`call_gemm`)."""
    call_gemm(gemm, a, b, out, True, 1.0)
