"""Dense layer kernel, ``out = x W^T + b``, on the same thread pool as attention.

The layers' projections and feed-forward products could go to NumPy's ``@``, which
runs on NumPy's own BLAS threads; those spin for a long while after each product and
take the cores from the attention kernel's threads that run next. Here every product
is a block of rows on one of Numba's threads, each calling single-threaded BLAS (the
kernels' own, :mod:`fastattn.blas`), so one pool of threads does all of a layer's work.

The attention projections want their result split into heads, ``(B, H, L, d)``
rather than ``(B, L, H * d)``: with ``heads > 1`` each block's product goes to the
thread's scratch and is scattered to that layout while it is in cache, instead of a
transposing copy of the whole result afterwards.
"""

from numba import prange, types

from fastattn.kernels.config import kernel_per_dtype
from fastattn.kernels.operands import array_type
from fastattn.kernels.products import product
from fastattn.kernels.vector_math import block_view, line_aligned_rows


def _linear_rows(x, weight, bias, has_bias, block_rows, gemm, heads, length, slots, out):
    """``out[r] = x[r] @ weight.T (+ bias)`` for every row ``r``, in blocks of rows.

    ``x`` ``(N, in)``, ``weight`` ``(out, in)`` (PyTorch's ``nn.Linear`` layout),
    ``bias`` ``(out,)`` (read only when ``has_bias``); ``gemm`` the address of the
    BLAS gemm (:mod:`fastattn.kernels.products`). ``out`` is flat, ``(N * out,)``:
    with ``heads == 1`` row-major ``(N, out)``; with ``heads > 1`` the rows are
    ``N = B * length`` and ``out`` is ``(B, heads, length, out / heads)``, C order.
    ``slots`` parallel slots (threads) take equal contiguous shares of the blocks.
    """
    n_rows, n_in = x.shape
    n_out = weight.shape[0]
    head_dim = n_out // heads
    n_blocks = (n_rows + block_rows - 1) // block_rows
    scratch = line_aligned_rows(slots, block_rows * n_out if heads > 1 else 0, x)
    for slot in prange(slots):
        for task in range(slot * n_blocks // slots, (slot + 1) * n_blocks // slots):
            start = task * block_rows
            stop = min(start + block_rows, n_rows)
            rows = stop - start
            if heads == 1:
                rows_out = block_view(out[start * n_out:], rows, n_out)  # (rows, out)
            else:
                rows_out = block_view(scratch[slot], rows, n_out)  # (rows, out)
            product(gemm, x[start:stop], weight.T, rows_out)  # (rows, in) @ (in, out)
            if has_bias:
                for r in range(rows):
                    for c in range(n_out):
                        rows_out[r, c] += bias[c]
            if heads > 1:  # row start + r is (b, l); its head h goes to out[b, h, l]
                for r in range(rows):
                    b, position = divmod(start + r, length)
                    for h in range(heads):
                        at = ((b * heads + h) * length + position) * head_dim
                        for c in range(head_dim):
                            out[at + c] = rows_out[r, h * head_dim + c]


def _linear_signature(dtype):
    return types.void(array_type(dtype, 2), array_type(dtype, 2), array_type(dtype, 1),
                      types.boolean, types.int64, types.int64, types.int64, types.int64,
                      types.int64, array_type(dtype, 1, readonly=False))


linear_kernel = kernel_per_dtype(_linear_rows, _linear_signature)
