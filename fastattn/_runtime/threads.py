"""Threads: how many fastattn's kernels use, and the BLAS they call kept at one.

The kernels run on Numba's thread pool. Its size is fixed when Numba starts, from
the environment variable ``NUMBA_NUM_THREADS`` (default: the number of cores);
:func:`set_num_threads` chooses how many of those a call may use. Results are
bitwise identical for every thread count: work is split by the shape of the
problem, never by the number of threads.

The kernels call BLAS (:mod:`fastattn.blas`) from inside their parallel loops; each
of those calls must use one thread, or the BLAS thread pool and Numba's threads
oversubscribe the cores. MKL is loaded with its sequential layer; SciPy's BLAS is
kept at one thread by :class:`single_threaded_blas`.
"""

import threading

from fastattn import blas
from fastattn._runtime import settings
from fastattn._runtime.blas_threads import blas_thread_functions


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
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= limit:
        raise ValueError(
            f"count must be an int in [1, NUMBA_NUM_THREADS={limit}]; got {count!r} "
            "(set the environment variable NUMBA_NUM_THREADS before starting Python for more)")
    settings.apply()  # before Numba's threads start
    numba.set_num_threads(count)


def get_num_threads():
    """Number of threads the next fastattn call from this Python thread will use."""
    import numba

    settings.apply()  # before Numba's threads start
    return numba.get_num_threads()


class single_threaded_blas:
    """Context manager: the kernels' BLAS at one thread inside, as it was after.

    The kernels call BLAS from their own threads; a multi-threaded BLAS would start
    threads of its own for every block and oversubscribe the cores.
    ``single_threaded_blas(False)`` does nothing, for calls whose products are too
    small for any BLAS to thread; so does every context while the kernels call MKL
    (:mod:`fastattn.blas`), which is sequential already.

    The BLAS thread count is process-wide, so calls running at once from several
    Python threads share one switch: the first to enter sets one thread, the last to
    leave restores the counts it found.
    """

    __slots__ = ("active",)
    _lock = threading.Lock()
    _users = 0  # active contexts, over every Python thread
    _saved = []  # (set function, count) to restore when the last one leaves

    def __init__(self, active=True):
        self.active = active and blas.current_name() == "scipy"

    def __enter__(self):
        if not self.active:
            return self
        shared = single_threaded_blas
        with shared._lock:
            if shared._users == 0:
                for get, set_ in blas_thread_functions():
                    count = get()
                    if count != 1:
                        set_(1)
                        shared._saved.append((set_, count))
            shared._users += 1
        return self

    def __exit__(self, *exc_info):
        if not self.active:
            return False
        shared = single_threaded_blas
        with shared._lock:
            shared._users -= 1
            if shared._users == 0:
                for set_, count in shared._saved:
                    set_(count)
                shared._saved.clear()
        return False


class at_most_threads:
    """Context manager: the kernels of this Python thread run on at most ``count``
    threads inside, on as many as before after.

    For calls too small to pay for waking a second thread
    (:func:`fastattn._dispatch.tiling.decode_threads` says which): the work runs on
    the calling thread, and Numba's other threads stay asleep. Results do not change:
    every tiling depends on the shape alone. The count is per Python thread, as in
    :func:`set_num_threads`.
    """

    __slots__ = ("count", "current", "saved")

    def __init__(self, count, current=None):
        self.count = count
        self.current = current  # the thread count in use, when the caller knows it
        self.saved = None

    def __enter__(self):
        import numba

        current = self.current if self.current is not None else numba.get_num_threads()
        if current > self.count:
            self.saved = current
            numba.set_num_threads(self.count)
        return self

    def __exit__(self, *exc_info):
        if self.saved is not None:
            import numba

            numba.set_num_threads(self.saved)
            self.saved = None
        return False
