"""Dense layer kernel, ``out = x W^T + b``, on the same thread pool as attention.

The layers' projections and feed-forward products could go to NumPy's ``@``, which
runs on NumPy's own BLAS threads; those spin for a long while after each product and
take the cores from the attention kernel's threads that run next. Here every product
is a block of rows on one of Numba's threads, each calling single-threaded BLAS (the
kernels' own, :mod:`fastattn.blas`), so one pool of threads does all of a layer's work.
"""

import numpy as np
from numba import prange, types

from fastattn.kernels.config import kernel_per_dtype
from fastattn.kernels.operands import array_type
from fastattn.kernels.products import product


def _linear_rows(x, weight, bias, has_bias, block_rows, gemm, out):
    """``out[r] = x[r] @ weight.T (+ bias)`` for every row ``r``, in blocks of rows.

    ``x`` ``(N, in)``, ``weight`` ``(out, in)`` (PyTorch's ``nn.Linear`` layout),
    ``bias`` ``(out,)`` (read only when ``has_bias``), ``out`` ``(N, out)``; ``gemm``
    the address of the BLAS gemm (:mod:`fastattn.kernels.products`).
    """
    n_rows, n_out = out.shape
    n_blocks = (n_rows + block_rows - 1) // block_rows
    for task in prange(n_blocks):
        start = task * block_rows
        stop = min(start + block_rows, n_rows)
        rows_out = out[start:stop]  # (rows, out), C-contiguous
        product(gemm, x[start:stop], weight.T, rows_out)  # (rows, in) @ (in, out)
        if has_bias:
            for r in range(stop - start):
                for c in range(n_out):
                    rows_out[r, c] += bias[c]


def _linear_signature(dtype):
    return types.void(array_type(dtype, 2), array_type(dtype, 2), array_type(dtype, 1),
                      types.boolean, types.int64, types.int64,
                      array_type(dtype, 2, readonly=False))


linear_kernel = kernel_per_dtype(_linear_rows, _linear_signature)
