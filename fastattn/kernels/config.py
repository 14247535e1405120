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
    """A getter ``kernel(dtype)`` for ``function`` compiled for ``signature(dtype)``
    (float32 or float64), built on first use with that dtype.

    ``kernel(dtype)`` returns the compiled entry point, which skips Numba's
    per-call argument typing (about 6 us for the attention kernels' grouped
    arguments, a quarter of a tiny call): the callers build arguments of exactly
    the signature's types (:mod:`fastattn.layout`; a test compares
    ``numba.typeof`` of every argument with the signature).
    ``kernel.dispatcher(dtype)`` is the type-checked Numba dispatcher.
    """
    dispatchers, entry_points = {}, {}

    def dispatcher(dtype):
        dtype = np.dtype(dtype)
        compiled = dispatchers.get(dtype)
        if compiled is None:
            compiled = dispatchers[dtype] = jit_kernel(signature(dtype))(function)
        return compiled

    def kernel(dtype):
        entry_point = entry_points.get(dtype)
        if entry_point is None:
            compiled = dispatcher(dtype)
            entry_point = compiled.overloads[compiled.signatures[0]].entry_point
            entry_points[np.dtype(dtype)] = entry_point
        return entry_point

    kernel.dispatcher = dispatcher
    kernel.signature = signature
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
