"""Dense layer kernel, ``out = x W^T + b``, on the same thread pool as attention.

The layers' projections and feed-forward products could go to NumPy's ``@``, which
runs on NumPy's own BLAS threads; those spin for a long while after each product and
take the cores from the attention kernel's threads that run next. Here every product
is a block of rows on one of Numba's threads, each calling single-threaded BLAS (the
kernels' own, :mod:`fastattn.blas`), so one pool of threads does all of a layer's work.

Attention works on heads, ``(B, H, L, d)``, where the projections' rows are
``(B, L, H * d)``: with ``heads > 1`` the query, key and value projections scatter
each block's product from the thread's scratch into the head-major layout
(``SPLIT_OUTPUT``), and the output projection gathers each block's rows from it
(``MERGE_INPUT``), while they are in cache, instead of a transposing copy of the
whole array before or after attention.
"""

from numba import prange, types

from fastattn.kernels.config import jit_helper, kernel_per_dtype
from fastattn.kernels.groups import array_type
from fastattn.kernels.products import product
from fastattn.kernels.vector_math import block_view, line_aligned_rows

# Where the heads are, with heads > 1: in the output, or in the input.
SPLIT_OUTPUT, MERGE_INPUT = 0, 1


def _linear_rows(x, weight, bias, has_bias, block_rows, gemm, heads, length, layout, slots,
                 out):
    """``out[r] = x[r] @ weight.T (+ bias)`` for every row ``r``, in blocks of rows.

    ``weight`` ``(out, in)`` (PyTorch's ``nn.Linear`` layout), ``bias`` ``(out,)``
    (read only when ``has_bias``); ``gemm`` the address of the BLAS gemm
    (:mod:`fastattn.kernels.products`). ``out`` is flat. With ``heads == 1``, ``x`` is
    ``(N, in)`` and ``out`` row-major ``(N, out)``. With ``heads > 1`` the ``N = B *
    length`` rows are head-major on one side: ``SPLIT_OUTPUT``, ``x`` ``(N, in)`` and
    ``out`` ``(B, heads, length, out / heads)`` in C order; ``MERGE_INPUT``, ``x`` the
    ``(B * heads * length, in / heads)`` rows of ``(B, heads, length, in / heads)``
    and ``out`` ``(N, out)``. ``slots`` parallel slots (threads) take equal contiguous
    shares of the blocks.
    """
    n_out, n_in = weight.shape
    n_rows = out.shape[0] // n_out
    scratch_width = (n_out if layout == SPLIT_OUTPUT else n_in) if heads > 1 else 0
    scratch = line_aligned_rows(slots, block_rows * scratch_width, x)
    n_blocks = (n_rows + block_rows - 1) // block_rows
    for slot in prange(slots):
        for task in range(slot * n_blocks // slots, (slot + 1) * n_blocks // slots):
            start = task * block_rows
            stop = min(start + block_rows, n_rows)
            rows = stop - start
            if heads > 1 and layout == MERGE_INPUT:
                rows_in = block_view(scratch[slot], rows, n_in)  # (rows, in)
                gather_heads(x, rows_in, start, heads, length)
            else:
                rows_in = x[start:stop]  # (rows, in)
            if heads > 1 and layout == SPLIT_OUTPUT:
                rows_out = block_view(scratch[slot], rows, n_out)  # (rows, out)
            else:
                rows_out = block_view(out[start * n_out:], rows, n_out)  # (rows, out)
            product(gemm, rows_in, weight.T, rows_out)  # (rows, in) @ (in, out)
            if has_bias:
                for r in range(rows):
                    for c in range(n_out):
                        rows_out[r, c] += bias[c]
            if heads > 1 and layout == SPLIT_OUTPUT:
                scatter_heads(rows_out, out.reshape((-1, n_out // heads)), start, heads, length)


@jit_helper
def head_row(row, heads, length, h):
    """Row of head ``h`` of row ``row = b * length + l`` in the head-major rows
    ``(B * heads * length, d)``: ``(b * heads + h) * length + l``."""
    b, position = divmod(row, length)
    return (b * heads + h) * length + position


@jit_helper
def scatter_heads(block, head_rows, start, heads, length):
    """Rows ``start + r`` of ``block`` ``(rows, heads * d)`` into the head-major
    ``head_rows`` ``(B * heads * length, d)`` (:func:`head_row`)."""
    head_dim = head_rows.shape[1]
    for r in range(block.shape[0]):
        for h in range(heads):
            row = head_row(start + r, heads, length, h)
            for c in range(head_dim):
                head_rows[row, c] = block[r, h * head_dim + c]


@jit_helper
def gather_heads(head_rows, block, start, heads, length):
    """The reverse of :func:`scatter_heads`: rows ``start + r`` of ``block`` from
    ``head_rows``."""
    head_dim = head_rows.shape[1]
    for r in range(block.shape[0]):
        for h in range(heads):
            row = head_row(start + r, heads, length, h)
            for c in range(head_dim):
                block[r, h * head_dim + c] = head_rows[row, c]


def _linear_signature(dtype):
    return types.void(array_type(dtype, 2), array_type(dtype, 2), array_type(dtype, 1),
                      types.boolean, types.int64, types.int64, types.int64, types.int64,
                      types.int64, types.int64, array_type(dtype, 1, readonly=False))


linear_kernel = kernel_per_dtype(_linear_rows, _linear_signature)
