"""The functions the tasks of a :mod:`fastattn.dask` graph run, on NumPy blocks.

A chunk-pair task (:func:`forward_pair`, :func:`backward_pair`) runs the local
:func:`fastattn.scaled_dot_product_attention` (or its backward) on the visible
sub-block of one (query chunk, key chunk) pair, under :func:`task_threads`. The
tree's tasks combine their results: :func:`merge_parts` merges the key chunks of one
query chunk with :func:`fastattn.merge_attention`, :func:`sum_shares` sums gradient
shares. :func:`unseen_rows` is the result of a query chunk that sees no key.

The graph (:mod:`fastattn.dask.graph`) binds each task's arguments with
:func:`functools.partial`; the functions are found by their module name on the
workers, which import :mod:`fastattn` (the kernels load on the first task).
"""

import contextlib
import multiprocessing
import threading

import numpy as np

import fastattn

__all__ = ["forward_pair", "backward_pair", "merge_parts", "unseen_rows", "sum_shares",
           "sum_arg_grads", "task_threads"]


# ------------------------------------------------------------------ forward

def forward_pair(query, key, value, *scores, span, options, compute_dtype, has_mask,
                 has_bias):
    """One chunk pair: local attention on its visible sub-block.

    Parameters
    ----------
    query : ndarray, shape ``(*b, m, Dk)``
        The query chunk's block.
    key, value : ndarray, shape ``(*b, n, Dk)`` and ``(*b, n, Dv)``
        The key chunk's blocks (kv heads as given, under GQA).
    *scores : ndarray
        The mask block (if ``has_mask``), then the bias block (if ``has_bias``).
    span : (int, int, int, int)
        ``(row_lo, row_hi, key_lo, key_hi)``: the visible sub-block, in the chunks'
        coordinates.
    options : dict
        The local call's keywords for the sub-block (causal, window, kv_lengths,
        scale, enable_gqa).
    compute_dtype : numpy.dtype
        Precision of the local call (float16 blocks are computed in float32).
    has_mask, has_bias : bool

    Returns
    -------
    out : ndarray, shape ``(*b, row_hi - row_lo, Dv)``
    lse : ndarray, shape ``(*b, row_hi - row_lo)``
    row_lo, row_hi : int
        The rows of the chunk that ``out`` and ``lse`` cover; the others are unseen.
    """
    row_lo, row_hi, key_lo, key_hi = span
    mask = score_block(scores[0] if has_mask else None, row_lo, row_hi, key_lo, key_hi)
    bias = score_block(scores[-1] if has_bias else None, row_lo, row_hi, key_lo, key_hi)
    query = query[..., row_lo:row_hi, :].astype(compute_dtype, copy=False)  # (*b, m, Dk)
    key = key[..., key_lo:key_hi, :].astype(compute_dtype, copy=False)  # (*b, n, Dk)
    value = value[..., key_lo:key_hi, :].astype(compute_dtype, copy=False)  # (*b, n, Dv)
    with task_threads():
        out, lse = fastattn.scaled_dot_product_attention(query, key, value, mask, bias=bias,
                                                         return_lse=True, **options)
    return out, lse, row_lo, row_hi


def score_block(array, row_lo, row_hi, key_lo, key_hi):
    """The sub-block ``[row_lo, row_hi) x [key_lo, key_hi)`` of a mask or bias block
    (an axis of size 1 broadcasts and is kept whole), or None."""
    if array is None:
        return None
    rows = slice(row_lo, row_hi) if array.shape[-2] != 1 else slice(None)
    cols = slice(key_lo, key_hi) if array.shape[-1] != 1 else slice(None)
    return array[..., rows, cols]


def merge_parts(*parts, out_dtype=None, lse_dtype=None, n_rows=None):
    """Merge chunk-pair results ``(out, lse, row_lo, row_hi)`` of one query chunk.

    Each part covers the rows ``[row_lo, row_hi)`` of the chunk; rows outside count as
    unseen by it (output 0, lse -inf). Without ``out_dtype`` the result is a part over
    the union of the rows, for the next level of the tree; with it, the whole chunk's
    ``(out, lse)`` of ``n_rows`` rows, cast to ``out_dtype`` and ``lse_dtype``.
    """
    row_lo = min(part[2] for part in parts)
    row_hi = max(part[3] for part in parts)
    outs, lses = [], []
    for out, lse, lo, hi in parts:
        out, lse = _pad_rows(out, lse, lo - row_lo, row_hi - hi)
        outs.append(out)  # (*b, row_hi - row_lo, Dv)
        lses.append(lse)  # (*b, row_hi - row_lo)
    out, lse = fastattn.merge_attention(outs, lses) if len(parts) > 1 else (outs[0], lses[0])
    if out_dtype is None:
        return out, lse, row_lo, row_hi
    out, lse = _pad_rows(out, lse, row_lo, n_rows - row_hi)  # (*b, m, Dv), (*b, m)
    return out.astype(out_dtype, copy=False), lse.astype(lse_dtype, copy=False)


def _pad_rows(out, lse, before, after):
    """Add ``before`` and ``after`` unseen rows (output 0, lse -inf)."""
    if before == 0 and after == 0:
        return out, lse
    width = [(0, 0)] * (lse.ndim - 1) + [(before, after)]
    out = np.pad(out, width + [(0, 0)])  # (*b, m, Dv)
    lse = np.pad(lse, width, constant_values=-np.inf)  # (*b, m)
    return out, lse


def unseen_rows(shape, value_dim, out_dtype, lse_dtype):
    """A query chunk of ``shape`` ``(*b, m)`` that sees no key: output 0, lse -inf."""
    return np.zeros(shape + (value_dim,), out_dtype), np.full(shape, -np.inf, lse_dtype)


# ------------------------------------------------------------------ backward

def backward_pair(grad_out, query, key, value, out, lse, *scores, span, options,
                  compute_dtype, has_mask, has_bias):
    """One chunk pair's shares of the gradients, shaped like the whole input blocks.

    The arguments are those of :func:`forward_pair`, with the blocks of ``grad_out``
    ``(*b, m, Dv)`` and of the forward's global ``out`` ``(*b, m, Dv)`` and ``lse``
    ``(*b, m)`` for the query chunk. Returns the shares of ``grad_query``,
    ``grad_key`` and ``grad_value``, shaped like the query, key and value blocks
    (zero outside the sub-block), and, when ``options`` has a
    ``score_mod_args_grad``, the chunk pair's share of the gradients of
    ``score_mod_args`` (a tuple of arrays shaped like them).
    """
    row_lo, row_hi, key_lo, key_hi = span
    mask = score_block(scores[0] if has_mask else None, row_lo, row_hi, key_lo, key_hi)
    bias = score_block(scores[-1] if has_bias else None, row_lo, row_hi, key_lo, key_hi)
    rows, keys = slice(row_lo, row_hi), slice(key_lo, key_hi)
    with task_threads():
        grads = fastattn.scaled_dot_product_attention_backward(
            grad_out[..., rows, :].astype(compute_dtype, copy=False),  # (*b, m, Dv)
            query[..., rows, :].astype(compute_dtype, copy=False),  # (*b, m, Dk)
            key[..., keys, :].astype(compute_dtype, copy=False),  # (*b, n, Dk)
            value[..., keys, :].astype(compute_dtype, copy=False),  # (*b, n, Dv)
            out[..., rows, :].astype(compute_dtype, copy=False),  # (*b, m, Dv) global out
            lse[..., rows].astype(compute_dtype, copy=False),  # (*b, m) global lse
            mask, bias=bias, **options)
    grad_query, grad_key, grad_value, *arg_grads = grads
    return (_pad_axis(grad_query, query.shape[-2], row_lo, row_hi),  # like the query block
            _pad_axis(grad_key, key.shape[-2], key_lo, key_hi),  # like the key block
            _pad_axis(grad_value, value.shape[-2], key_lo, key_hi),  # like the value block
            *arg_grads)  # (the tuple of score_mod_args' gradients, if asked for)


def _pad_axis(grad, length, lo, hi):
    """Zeros around ``grad`` along axis -2, from rows ``[lo, hi)`` to ``[0, length)``."""
    if lo == 0 and hi == length:
        return grad
    width = [(0, 0)] * (grad.ndim - 2) + [(lo, length - hi), (0, 0)]
    return np.pad(grad, width)


def sum_shares(*shares, out_dtype=None):
    """Sum gradient shares of one block, cast to ``out_dtype`` when given."""
    total = shares[0].copy() if len(shares) > 1 else shares[0]
    for share in shares[1:]:
        total += share
    return total if out_dtype is None else total.astype(out_dtype, copy=False)


def sum_arg_grads(*shares):
    """Sum chunk pairs' shares of the gradients of ``score_mod_args`` (each a tuple
    of arrays), in the order given."""
    return tuple(sum_shares(*arrays) for arrays in zip(*shares))


# ------------------------------------------------------------------ threads

@contextlib.contextmanager
def task_threads():
    """Run the kernels on one thread while a task runs on a Dask worker.

    A task runs on a worker when it is not on the main thread of the main process
    (threaded scheduler, processes scheduler, ``dask.distributed`` worker threads);
    Dask runs one task per worker thread or process, so one kernel thread per task
    keeps the kernels within the threads the user gave Dask. The synchronous
    scheduler runs tasks on the calling thread, which keeps its own setting.
    """
    on_worker = (threading.current_thread() is not threading.main_thread()
                 or multiprocessing.parent_process() is not None)
    if not on_worker:
        yield
        return
    previous = fastattn.get_num_threads()
    fastattn.set_num_threads(1)
    try:
        yield
    finally:
        fastattn.set_num_threads(previous)
