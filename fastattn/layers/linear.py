"""``x W^T + b`` for the layers, on fastattn's thread pool (see
:mod:`fastattn.kernels.linear` for why not NumPy's ``@``)."""

import math

import numpy as np

from fastattn.blas import gemm_address
from fastattn.threads import get_num_threads, single_threaded_blas
from fastattn.kernels.linear import linear_kernel
from fastattn.layout import placeholder

# Rows per task: at least MIN_BLOCK_ROWS (so each BLAS product stays efficient), and
# few enough rows that a call offers up to MAX_TASKS tasks.
MIN_BLOCK_ROWS = 64
MAX_TASKS = 16
# Products smaller than this many multiply-adds go to NumPy directly: too small for
# any BLAS to start threads, and not worth a parallel launch.
SMALL_PRODUCT = 1 << 18


def linear(x, weight, bias=None, heads=None):
    r"""Dense layer :math:`y = x W^\top + b` in the dtype of ``x``.

    Parameters
    ----------
    x : ndarray, shape ``(..., in)``; ``(B, L, in)`` with ``heads``
        float32 or float64.
    weight : ndarray, shape ``(out, in)``
        PyTorch's ``nn.Linear`` layout; cast to ``x.dtype``.
    bias : ndarray, shape ``(out,)``, optional
    heads : int, optional
        The result split into this many heads of ``out / heads`` columns (``heads``
        divides ``out``), head-major: what attention takes, with no transposing copy.

    Returns
    -------
    ndarray, shape ``(..., out)``; ``(B, heads, L, out / heads)``, C-contiguous, with
    ``heads``
    """
    dtype = x.dtype
    n_out, n_in = weight.shape
    n_rows = math.prod(x.shape[:-1])
    weight = np.ascontiguousarray(weight, dtype)  # (out, in)
    if heads is not None:
        batch, length = x.shape[:2]
        shape = (batch, heads, length, n_out // heads)  # (B, H, L, d)
    else:
        heads, length, shape = 1, 1, x.shape[:-1] + (n_out,)  # (..., out)
    if n_rows * n_in * n_out < SMALL_PRODUCT:
        out = x @ weight.T  # (..., out)
        if bias is not None:
            out += bias.astype(dtype, copy=False)
        if len(shape) == 4:  # (B, L, H, d) -> (B, H, L, d)
            out = np.ascontiguousarray(out.reshape(batch, length, heads, shape[-1])
                                       .transpose(0, 2, 1, 3))
        return out
    rows = np.ascontiguousarray(x.reshape(n_rows, n_in))  # (N, in)
    out = np.empty(n_rows * n_out, dtype)  # (N * out,): (N, out) or (B, H, L, d)
    has_bias = bias is not None
    bias = (np.ascontiguousarray(bias, dtype) if has_bias
            else placeholder(dtype, 1))  # (out,) or an unread (1,)
    block_rows = max(MIN_BLOCK_ROWS, -(-n_rows // MAX_TASKS))
    with single_threaded_blas():
        linear_kernel(dtype)(rows, weight, bias, has_bias, block_rows, gemm_address(dtype),
                             heads, length, get_num_threads(), out)
    return out.reshape(shape)
