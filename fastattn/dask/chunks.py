"""Chunks of the operands of a :mod:`fastattn.dask` call, aligned for the tasks.

A task reads one block of each operand, so the operands must be chunked alike: along
each output batch axis like the output (one chunk where an operand broadcasts; under
grouped-query attention a kv head chunk holds the kv heads of a query head chunk),
along ``Lq`` like the query, along ``Lk`` like the key, and in one chunk along
``Dk`` and ``Dv``. The output's chunks are those of the first Dask operand that spans
an axis (:func:`batch_chunks`, :func:`length_chunks`); :func:`align` rechunks the
query, key and value to them (NumPy inputs become Dask arrays) and refuses a mask or
bias chunked otherwise, since rechunking an ``(Lq, Lk)`` operand moves more data
than the attention.
"""

import dask.array as da
import numpy as np

__all__ = ["lazy_or_array", "batch_chunks", "length_chunks", "operand_chunks",
           "score_chunks", "align"]


def lazy_or_array(array):
    """``array`` as it is if a Dask array, else as an ndarray."""
    return array if isinstance(array, da.Array) else np.asarray(array)


def batch_chunks(batch_shape, query, key, value, mask, bias, group):
    """Chunks of each output batch axis: those of the first Dask operand that spans it.

    The query is asked first, then key and value (whose head axis, under GQA, stands
    for ``group`` query heads per kv head), then mask and bias. An axis no Dask
    operand spans is one chunk.

    Returns
    -------
    tuple of tuple of int
        One tuple of chunk sizes per axis of ``batch_shape``.
    """
    chunks = []
    n_batch = len(batch_shape)
    for axis, size in enumerate(batch_shape):
        found = None
        for array, factor in ((query, 1), (key, group), (value, group), (mask, 1), (bias, 1)):
            if not isinstance(array, da.Array):
                continue
            own = array.ndim - 2
            own_axis = axis - (n_batch - own)
            if own_axis < 0 or array.shape[own_axis] == 1 and size != 1:
                continue
            factor = factor if own_axis == own - 1 else 1
            candidate = tuple(c * factor for c in array.chunks[own_axis])
            if group > 1 and array is query and axis == n_batch - 1 and any(
                    c % group for c in candidate):
                continue  # query head chunks must hold whole GQA groups
            found = candidate
            break
        chunks.append(found if found is not None else (size,))
    return tuple(chunks)


def length_chunks(length, *candidates):
    """Chunks of an ``Lq`` or ``Lk`` axis: those of the first Dask operand spanning it.

    ``candidates`` are ``(array, axis)`` pairs (arrays may be None or NumPy); an axis
    that no Dask candidate spans is one chunk.
    """
    for array, axis in candidates:
        if isinstance(array, da.Array) and array.shape[axis] == length:
            return tuple(array.chunks[axis])
    return (length,)


def operand_chunks(array, out_batch_chunks, along_length, along_last, group=1):
    """Chunks an operand must have: the output's ``out_batch_chunks`` along its batch
    axes (one chunk where it broadcasts; its head axis divided by ``group`` for a key
    or value under GQA), then ``along_length`` and ``along_last`` for its two last
    axes."""
    n_batch = len(out_batch_chunks)
    n_own = array.ndim - 2
    per_axis = []
    for axis in range(n_own):
        out_axis = axis + n_batch - n_own
        if array.shape[axis] == 1:
            per_axis.append((1,))
        else:
            divisor = group if axis == n_own - 1 else 1
            per_axis.append(tuple(c // divisor for c in out_batch_chunks[out_axis]))
    return tuple(per_axis) + (along_length, along_last)


def score_chunks(array, out_batch_chunks, q_chunks, kv_chunks):
    """Chunks a mask or bias (at least 2-D) must have: like the scores
    ``(*batch, Lq, Lk)``, one chunk along an axis of size 1."""
    rows, cols = array.shape[-2:]
    return operand_chunks(array, out_batch_chunks, (rows,) if rows == 1 else q_chunks,
                          (cols,) if cols == 1 else kv_chunks)


def align(name, array, chunks, strict):
    """``array`` as a Dask array with ``chunks``.

    A NumPy array is wrapped with them, a Dask array rechunked to them; a ``strict``
    operand (mask, bias) must already have them, else ``ValueError`` says how to
    rechunk it.
    """
    chunks = tuple(tuple(int(c) for c in axis) for axis in chunks)
    if not isinstance(array, da.Array):
        return da.from_array(array, chunks=chunks)
    if array.chunks == chunks:
        return array
    if strict:
        raise ValueError(
            f"{name} of shape {array.shape} is chunked {array.chunks}, unlike the scores "
            f"(*batch, Lq, Lk) it applies to: expected chunks {chunks} (the query's along "
            f"batch axes and Lq, the key's along Lk, one chunk along an axis of size 1); "
            f"rechunk it with {name}.rechunk({chunks})")
    return array.rechunk(chunks)
