"""Compilation options shared by every fastattn kernel, kept in one place.

- ``FASTMATH_FLAGS``: LLVM fast-math flags that allow reassociation and
  contraction but keep ``nnan``/``ninf`` off, since masking relies on ``-inf``.
- :func:`jit_kernel`: ``numba.njit`` with an explicit signature and the on-disk
  cache, falling back to in-memory compilation when no cache location is writable
  (a read-only install with ``NUMBA_CACHE_DIR`` unset).
- :func:`single_threaded_blas`: the kernels call BLAS (``np.dot``) from inside
  ``prange``; each of those calls must use one thread, or the BLAS thread pool and
  Numba's threads oversubscribe the cores.
"""

import contextlib
import functools
import warnings

import numba
import numpy as np
from numba import types

FASTMATH_FLAGS = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

_KERNEL_OPTIONS = dict(parallel=True, nogil=True, fastmath=set(FASTMATH_FLAGS),
                       error_model="numpy", boundscheck=False)


def array_type(dtype, ndim, readonly=True):
    """Numba type of a C-contiguous array; readonly types also accept writeable arrays."""
    return types.Array(numba.from_dtype(np.dtype(dtype)), ndim, "C", readonly=readonly)


def jit_kernel(signature):
    """Decorator: compile ``func`` for exactly ``signature`` with the project's options.

    One explicit signature per dtype keeps a single specialisation however the
    caller's arrays are laid out (the public functions pass C-contiguous arrays;
    readonly array types accept writeable ones too). Compiled code is cached on
    disk when Numba finds a writable cache location, else compiled in memory.
    """
    def decorate(func):
        try:
            return numba.njit(signature, cache=True, **_KERNEL_OPTIONS)(func)
        except RuntimeError as error:  # "cannot cache function ...: no locator available"
            if "cache" not in str(error):
                raise
            warnings.warn(
                "fastattn: no writable Numba cache location (set NUMBA_CACHE_DIR to one); "
                "kernels are compiled in memory for this process only",
                RuntimeWarning, stacklevel=2)
            return numba.njit(signature, cache=False, **_KERNEL_OPTIONS)(func)
    return decorate


@functools.cache
def _blas_controllers():
    """threadpoolctl handles of the BLAS libraries loaded in this process.

    ``scipy.linalg.cython_blas`` is imported first: it loads the BLAS that Numba's
    ``np.dot`` calls, which threadpoolctl can only see once it is loaded.
    """
    import scipy.linalg.cython_blas  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextlib.contextmanager
def single_threaded_blas():
    """Run the body with every BLAS library at one thread, then restore the counts."""
    controllers = _blas_controllers()
    saved = [controller.num_threads for controller in controllers]
    for controller, count in zip(controllers, saved):
        if count != 1:
            controller.set_num_threads(1)
    try:
        yield
    finally:
        for controller, count in zip(controllers, saved):
            if count != 1:
                controller.set_num_threads(count)
