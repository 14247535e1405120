"""Compilation options shared by every fastattn kernel, kept in one place.

- ``FASTMATH_FLAGS``: LLVM fast-math flags that allow reassociation and
  contraction but keep ``nnan``/``ninf`` off, since masking relies on ``-inf`` and
  NaN inputs must stay NaN.
- :func:`jit_kernel` / :func:`kernel_per_dtype`: ``numba.njit`` with an explicit
  signature and the on-disk cache, falling back to in-memory compilation when no
  cache location is writable (a read-only install with ``NUMBA_CACHE_DIR`` unset).
- :func:`jit_helper`: the same options for the functions the kernels call.

Importing this module applies :mod:`fastattn.process_settings` (the OpenMP spin
count and the kernels' cache keys) before any kernel is compiled or loaded.
"""

import functools
import warnings

import numba
import numpy as np

from fastattn import process_settings

process_settings.apply()

FASTMATH_FLAGS = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

_KERNEL_OPTIONS = dict(parallel=True, nogil=True, fastmath=set(FASTMATH_FLAGS),
                       error_model="numpy", boundscheck=False)


def kernel_per_dtype(function, signature):
    """A getter ``kernel(dtype)`` that compiles ``function`` for ``signature(dtype)``
    (float32 or float64) on its first use with that dtype, then returns the same
    dispatcher every time."""
    compiled = {}

    def kernel(dtype):
        dtype = np.dtype(dtype)
        dispatcher = compiled.get(dtype)
        if dispatcher is None:
            dispatcher = compiled[dtype] = jit_kernel(signature(dtype))(function)
        return dispatcher

    kernel.__doc__ = f"``{function.__name__}`` compiled for ``dtype``, built on first use."
    return kernel


def jit_helper(func):
    """Decorator for functions the kernels call: same fast-math and error model.

    Helpers are compiled as functions of their own and inlined by LLVM, not copied
    into each caller by Numba (``inline="always"``), which halves compile time.
    """
    options = {key: value for key, value in _KERNEL_OPTIONS.items() if key != "parallel"}
    return numba.njit(**options)(func)


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
            _warn_no_cache()
            return numba.njit(signature, cache=False, **_KERNEL_OPTIONS)(func)
    return decorate


@functools.cache
def _warn_no_cache():
    """Say once per process that the kernels cannot be cached."""
    warnings.warn(
        "fastattn: no writable Numba cache location (set NUMBA_CACHE_DIR to one); "
        "kernels are compiled in memory for this process only",
        RuntimeWarning, stacklevel=4)
