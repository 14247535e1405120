"""Between a padded batch and the packed layout of the packed-sequence kernels, in one
threaded pass each way (:mod:`fastattn.kernels.packing`).

For the integrations that hold a padded batch token-major, ``(B * L, H, D)``, and run
its real tokens through :func:`fastattn.varlen_attention` (the Hugging Face backend's
encoder path): :func:`packed_rows` makes the head-major ``(H, total, D)`` stack the
kernels read (no second copy in :func:`fastattn.varlen_attention`, whose inputs are
then head-major already), :func:`padded_rows` writes a packed result back with zeros
on the padding.
"""

import numpy as np
from numba import get_num_threads

from fastattn._runtime import settings
from fastattn._runtime.threads import at_most_threads
from fastattn.kernels.packing import gather_kernel, scatter_kernel

# Bytes a move gives each thread at least: below twice this it runs on the calling
# thread (waking a second thread costs about as much as copying this much).
BYTES_PER_THREAD = 256 * 1024


def packed_rows(tokens, rows):
    """The rows ``rows`` of ``tokens`` ``(R, H, D)`` as a head-major stack.

    Parameters
    ----------
    tokens : numpy.ndarray, shape ``(R, H, D)``
        Any dtype and layout (a copy only when it is not C-contiguous).
    rows : numpy.ndarray of int64, shape ``(total,)``
        Rows of ``tokens``, each in ``[0, R)`` (the caller's own positions; not checked).

    Returns
    -------
    numpy.ndarray, shape ``(total, H, D)``
        A transposed view of a C-contiguous ``(H, total, D)`` array of ``tokens``'
        dtype: ``out[t] = tokens[rows[t]]``.
    """
    tokens = np.ascontiguousarray(tokens)  # (R, H, D)
    heads, width = tokens.shape[1:]
    packed = np.empty((heads, rows.shape[0], width), tokens.dtype)  # (H, total, D)
    _move(gather_kernel, tokens, np.ascontiguousarray(rows, np.int64), packed, packed.nbytes)
    return packed.transpose(1, 0, 2)  # (total, H, D)


def padded_rows(packed, source_of):
    """A packed ``(total, H, D)`` array written back at the padded rows.

    Parameters
    ----------
    packed : numpy.ndarray, shape ``(total, H, D)``
        Any dtype and layout (a copy only when its head-major transpose is not
        C-contiguous).
    source_of : numpy.ndarray of int64, shape ``(R,)``
        For each padded row, the packed row it takes, or -1 for padding.

    Returns
    -------
    numpy.ndarray, shape ``(R, H, D)``
        C-contiguous, ``packed``'s dtype: ``out[p] = packed[source_of[p]]``, zeros
        where ``source_of[p] < 0``.
    """
    head_major = np.ascontiguousarray(packed.transpose(1, 0, 2))  # (H, total, D)
    heads, _, width = head_major.shape
    tokens = np.empty((source_of.shape[0], heads, width), packed.dtype)  # (R, H, D)
    _move(scatter_kernel, head_major, np.ascontiguousarray(source_of, np.int64), tokens,
          tokens.nbytes)
    return tokens


def _move(kernel, source, row_map, destination, nbytes):
    """Run ``kernel`` over the arrays seen as unsigned integers of their item size,
    on as many threads as :data:`BYTES_PER_THREAD` allows."""
    if destination.size == 0:
        return
    settings.apply()
    bits = np.dtype(f"u{source.dtype.itemsize}")  # uint16, uint32 or uint64
    available = get_num_threads()
    threads = max(1, min(available, nbytes // BYTES_PER_THREAD))
    with at_most_threads(threads, available):
        kernel(bits)(source.view(bits), row_map, threads, destination.view(bits))
