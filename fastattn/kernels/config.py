"""Compilation options shared by every fastattn kernel, kept in one place.

- ``FASTMATH_FLAGS``: LLVM fast-math flags that allow reassociation and
  contraction but keep ``nnan``/``ninf`` off, since masking relies on ``-inf``.
- :func:`jit_kernel`: ``numba.njit`` with an explicit signature and the on-disk
  cache, falling back to in-memory compilation when no cache location is writable
  (a read-only install with ``NUMBA_CACHE_DIR`` unset).
- The cache is keyed on every source file of this package, not only the kernel's
  own file (Numba's default), so editing a shared helper recompiles the kernels.
- :class:`single_threaded_blas`: the kernels call BLAS (``np.dot``) from inside
  ``prange``; each of those calls must use one thread, or the BLAS thread pool and
  Numba's threads oversubscribe the cores.
- ``GOMP_SPINCOUNT``: how long Numba's idle OpenMP threads spin before sleeping
  (see :data:`OPENMP_SPIN_COUNT`).
"""

import ctypes
import functools
import os
import threading
import warnings

import numba
import numpy as np
from numba import types

FASTMATH_FLAGS = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

# After a kernel, GNU OpenMP's idle threads spin 300000 times (about a millisecond)
# before they sleep, taking cores from the NumPy and BLAS work that runs between
# calls: a multi-head attention layer (4 x 256 x 512, 8 heads) took 24 ms spinning
# and 19 ms with 10000 spins, while back-to-back tiny calls, which need the threads
# awake, kept their speed. libgomp reads this when Numba first starts its threads;
# a value the user has set is kept.
OPENMP_SPIN_COUNT = "10000"
os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)

_KERNEL_OPTIONS = dict(parallel=True, nogil=True, fastmath=set(FASTMATH_FLAGS),
                       error_model="numpy", boundscheck=False)


def _kernel_sources_stamp():
    """(name, mtime, size) of every module of this package: the kernels' cache key."""
    folder = os.path.dirname(os.path.abspath(__file__))
    stamp = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            info = os.stat(os.path.join(folder, name))
            stamp.append((name, info.st_mtime, info.st_size))
    return tuple(stamp)


def _key_kernel_caches_on_package_sources():
    """Make Numba's cache locators stamp fastattn kernels with the whole package.

    Numba invalidates a cached kernel only when the file defining it changes; a
    kernel that inlines helpers from another module would otherwise keep stale code.
    Locators for functions outside this package are left as they are. If Numba's
    private caching classes ever change shape, the default behaviour stays.
    """
    from numba.core import caching

    def numba_class(name):  # public names since Numba 0.60-ish, underscored before
        return getattr(caching, name, None) or getattr(caching, "_" + name, None)

    names = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    bases = tuple(numba_class(name) for name in names)
    cache_impl = numba_class("CacheImpl")
    if None in bases or not isinstance(getattr(cache_impl, "_locator_classes", None), list):
        return
    locators = cache_impl._locator_classes
    stamp = _kernel_sources_stamp()

    class PackageStamp:
        @classmethod
        def from_function(cls, py_func, py_file):
            if not getattr(py_func, "__module__", "").startswith(__package__ + "."):
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return stamp

    locators[:0] = [type(f"FastattnKernel{base.__name__}", (PackageStamp, base), {})
                    for base in bases]


_key_kernel_caches_on_package_sources()


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


def problem_argument_types(dtype):
    """Numba types of the leading kernel arguments built by
    :func:`fastattn.layout.kernel_inputs`, for data of ``dtype``."""
    data3 = array_type(dtype, 3)
    index = array_type(np.int64, 1)
    return (
        data3, data3, data3, index, index, index,  # query, key, value and their indices
        array_type(np.bool_, 3), index, types.int64, types.int64, types.boolean,  # mask
        data3, index, types.int64, types.int64, types.boolean,  # bias
        index, types.boolean, types.int64, types.int64, types.int64,  # visibility rules
        types.float64,  # scale
    )


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


def _openblas_thread_functions(controller):
    """ctypes ``(get, set)`` thread-count functions of an OpenBLAS, or None."""
    if controller.internal_api != "openblas":
        return None
    for prefix in ("", "scipy_"):  # SciPy's wheels rename OpenBLAS's symbols
        for suffix in ("", "64_"):
            get = getattr(controller.dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
            set_ = getattr(controller.dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, set_
    return None


@functools.cache
def _kernel_blas_thread_functions():
    """``(get, set)`` thread-count functions of the BLAS that the kernels call.

    Numba's ``np.dot`` calls ``scipy.linalg.cython_blas``; importing it loads that
    BLAS, which threadpoolctl can only see once it is loaded. SciPy's own copy is
    picked out by its folder (``scipy.libs``); if none is recognised, every BLAS in
    the process is handled. OpenBLAS is driven through ctypes directly (about a
    microsecond), other libraries through threadpoolctl.
    """
    import scipy.linalg.cython_blas  # noqa: F401
    from threadpoolctl import ThreadpoolController

    controllers = ThreadpoolController().select(user_api="blas").lib_controllers
    scipy_owned = [controller for controller in controllers
                   if os.path.basename(os.path.dirname(controller.filepath)).startswith("scipy")]
    functions = []
    for controller in scipy_owned or controllers:
        functions.append(_openblas_thread_functions(controller) or (
            lambda controller=controller: controller.num_threads, controller.set_num_threads))
    return tuple(functions)


class single_threaded_blas:
    """Context manager: the kernels' BLAS at one thread inside, as it was after.

    The kernels call BLAS (``np.dot``) from their own threads; a multi-threaded
    BLAS would start threads of its own for every block and oversubscribe the cores.
    ``single_threaded_blas(False)`` does nothing, for calls whose products are too
    small for any BLAS to thread.

    The BLAS thread count is process-wide, so calls running at once from several
    Python threads share one switch: the first to enter sets one thread, the last to
    leave restores the counts it found.
    """

    __slots__ = ("active",)
    _lock = threading.Lock()
    _users = 0  # active contexts, over every Python thread
    _saved = []  # (set function, count) to restore when the last one leaves

    def __init__(self, active=True):
        self.active = active

    def __enter__(self):
        if not self.active:
            return self
        shared = single_threaded_blas
        with shared._lock:
            if shared._users == 0:
                for get, set_ in _kernel_blas_thread_functions():
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
