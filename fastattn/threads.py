"""How many threads fastattn's kernels use.

The kernels run on Numba's thread pool. Its size is fixed when Numba starts, from
the environment variable ``NUMBA_NUM_THREADS`` (default: the number of cores);
:func:`set_num_threads` chooses how many of those a call may use. Results are
bitwise identical for every thread count: work is split by the shape of the
problem, never by the number of threads.
"""

import numba

import fastattn.kernels.config  # noqa: F401  (OpenMP settings, before Numba's threads start)


def set_num_threads(count):
    """Use ``count`` threads in later fastattn calls made from this Python thread.

    Parameters
    ----------
    count : int
        ``1 <= count <= NUMBA_NUM_THREADS``. The setting is per calling thread, as
        in Numba (:func:`numba.set_num_threads`), which this wraps.

    Raises
    ------
    ValueError
        If ``count`` is outside ``[1, NUMBA_NUM_THREADS]``.
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= limit:
        raise ValueError(
            f"count must be an int in [1, NUMBA_NUM_THREADS={limit}]; got {count!r} "
            "(set the environment variable NUMBA_NUM_THREADS before starting Python for more)")
    numba.set_num_threads(count)


def get_num_threads():
    """Number of threads the next fastattn call from this Python thread will use."""
    return numba.get_num_threads()
