"""``x W^T + b`` for the layers, on fastattn's thread pool (see
:mod:`fastattn.kernels.projection` for why not NumPy's ``@``)."""

import math

import numpy as np

from fastattn.blas import gemm_address
from fastattn._runtime.threads import get_num_threads, single_threaded_blas
from fastattn.kernels.projection import MERGE_INPUT, SPLIT_OUTPUT, linear_kernel
from fastattn._dispatch.layout import placeholder

# Rows per task: at least MIN_BLOCK_ROWS (so each BLAS product stays efficient), and
# few enough rows that a call offers up to MAX_TASKS tasks.
MIN_BLOCK_ROWS = 64
MAX_TASKS = 16
# Products smaller than this many multiply-adds go to NumPy directly: too small for
# any BLAS to start threads, and not worth a parallel launch.
SMALL_PRODUCT = 1 << 18


def linear(x, weight, bias=None, *, split_heads=None, merge_heads=False):
    r"""Dense layer :math:`y = x W^\top + b` in the dtype of ``x``.

    Parameters
    ----------
    x : ndarray, shape ``(..., in)``
        float32 or float64. ``(B, L, in)`` with ``split_heads``; head-major ``(B, H,
        L, in / H)`` with ``merge_heads``.
    weight : ndarray, shape ``(out, in)``
        PyTorch's ``nn.Linear`` layout; cast to ``x.dtype``.
    bias : ndarray, shape ``(out,)``, optional
    split_heads : int, optional
        The result split into this many heads of ``out / split_heads`` columns,
        head-major: what attention takes, with no transposing copy.
    merge_heads : bool, default False
        ``x`` is attention's head-major output; its rows ``(b, l)`` are the heads'
        rows side by side, read without a transposing copy.

    Returns
    -------
    ndarray, shape ``(..., out)``; ``(B, split_heads, L, out / split_heads)``,
    C-contiguous, with ``split_heads``; ``(B, L, out)`` with ``merge_heads``
    """
    dtype = x.dtype
    n_out, n_in = weight.shape
    weight = np.ascontiguousarray(weight, dtype)  # (out, in)
    heads, length, layout = 1, 1, SPLIT_OUTPUT
    if merge_heads:
        batch, heads, length = x.shape[:3]
        rows_shape = (batch, length)  # the result's rows: (B, L)
        layout = MERGE_INPUT
    else:
        rows_shape = x.shape[:-1]
    if split_heads is not None:
        batch, length = x.shape[:2]
        heads, shape = split_heads, (batch, split_heads, length, n_out // split_heads)
    else:
        shape = rows_shape + (n_out,)  # (..., out)
    n_rows = math.prod(rows_shape)
    if n_rows * n_in * n_out < SMALL_PRODUCT:
        if merge_heads:  # (B, H, L, d) -> (B, L, H * d)
            x = x.transpose(0, 2, 1, 3).reshape(rows_shape + (n_in,))
        out = x @ weight.T  # (..., out)
        if bias is not None:
            out += bias.astype(dtype, copy=False)
        if split_heads is not None:  # (B, L, H, d) -> (B, H, L, d)
            out = np.ascontiguousarray(out.reshape(batch, length, heads, shape[-1])
                                       .transpose(0, 2, 1, 3))
        return out
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (N, in) or (B * H * L, d)
    out = np.empty(n_rows * n_out, dtype)  # (N * out,): (N, out) or (B, H, L, d)
    has_bias = bias is not None
    bias = (np.ascontiguousarray(bias, dtype) if has_bias
            else placeholder(dtype, 1))  # (out,) or an unread (1,)
    block_rows = max(MIN_BLOCK_ROWS, -(-n_rows // MAX_TASKS))
    with single_threaded_blas():
        linear_kernel(dtype)(rows, weight, bias, has_bias, block_rows, gemm_address(dtype),
                             heads, length, layout, get_num_threads(), out)
    return out.reshape(shape)
