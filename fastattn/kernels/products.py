"""Block products that accumulate: ``out += a @ b`` in one BLAS call.

``np.dot(a, b, out)`` followed by ``out += product`` costs OpenBLAS's zeroing of the
product (it scales ``out`` by ``beta = 0`` with a memset before accumulating into
it) and a pass adding the product; ``gemm`` with ``beta = 1`` adds into ``out``
directly. :func:`dot_add` calls the same BLAS ``gemm`` as Numba's ``np.dot`` (through
Numba's ``numba_xxgemm`` helper, scipy's BLAS), with ``beta = 1``.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.linalg import ensure_blas

_BLAS_KIND = {types.float32: "s", types.float64: "d"}


@intrinsic
def dot_add(typingctx, a, b, out):
    """``out += a @ b`` for 2-D arrays ``a`` ``(m, k)``, ``b`` ``(k, n)`` and ``out``
    ``(m, n)`` of one float dtype; ``a`` and ``b`` C- or F-contiguous (a transposed
    C block is F), ``out`` C-contiguous and writeable. Shapes are the caller's to
    match (not checked); with ``m``, ``n`` or ``k`` 0 nothing is done."""
    arrays = (a, b, out)
    if not (all(isinstance(t, types.Array) and t.ndim == 2 and t.layout in "CF"
                for t in arrays) and out.layout == "C" and out.mutable
            and a.dtype == b.dtype == out.dtype and out.dtype in _BLAS_KIND):
        return None
    ensure_blas()
    kind = _BLAS_KIND[out.dtype]

    def codegen(context, builder, signature, args):
        a_array, b_array, out_array = (context.make_array(t)(context, builder, value)
                                       for t, value in zip(signature.args, args))
        intp = context.get_value_type(types.intp)
        char, void_pointer = ir.IntType(8), ir.IntType(8).as_pointer()
        gemm_type = ir.FunctionType(ir.IntType(32), [
            char, char, char, intp, intp, intp, void_pointer, void_pointer, intp,
            void_pointer, intp, void_pointer, void_pointer, intp])
        gemm = cgutils.get_or_insert_function(builder.module, gemm_type, "numba_xxgemm")
        m, k = cgutils.unpack_tuple(builder, a_array.shape, 2)
        n = cgutils.unpack_tuple(builder, b_array.shape, 2)[1]
        float_type = context.get_value_type(out.dtype)
        one = cgutils.alloca_once_value(builder, ir.Constant(float_type, 1.0))

        def operand(array_type, array):
            # Column-major BLAS computes out.T = b.T @ a.T; a C array is its own
            # transpose in column-major order, an F array needs 't'.
            rows, cols = cgutils.unpack_tuple(builder, array.shape, 2)
            if array_type.layout == "C":
                return ir.Constant(char, ord("n")), cols, builder.bitcast(array.data,
                                                                           void_pointer)
            return ir.Constant(char, ord("t")), rows, builder.bitcast(array.data, void_pointer)

        trans_b, ld_b, data_b = operand(b, b_array)
        trans_a, ld_a, data_a = operand(a, a_array)
        zero = ir.Constant(intp, 0)
        empty = builder.or_(builder.or_(builder.icmp_signed("==", m, zero),
                                        builder.icmp_signed("==", n, zero)),
                            builder.icmp_signed("==", k, zero))
        with builder.if_then(builder.not_(empty), likely=True):
            builder.call(gemm, (ir.Constant(char, ord(kind)), trans_b, trans_a, n, m, k,
                                builder.bitcast(one, void_pointer), data_b, ld_b, data_a, ld_a,
                                builder.bitcast(one, void_pointer),
                                builder.bitcast(out_array.data, void_pointer), n))
        return context.get_dummy_value()
    return types.void(a, b, out), codegen
