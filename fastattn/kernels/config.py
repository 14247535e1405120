"""Compilation options shared by every fastattn kernel, kept in one place.

- ``FASTMATH_FLAGS``: LLVM fast-math flags that allow reassociation and
  contraction but keep ``nnan``/``ninf`` off, since masking relies on ``-inf`` and
  NaN inputs must stay NaN.
- :func:`jit_kernel` / :func:`kernel_per_dtype`: ``numba.njit`` with an explicit
  signature and the on-disk cache, falling back to in-memory compilation when no
  cache location is writable (a read-only install with ``NUMBA_CACHE_DIR`` unset).
- :func:`jit_helper`: the same options for the functions the kernels call.

- Cache keys: Numba invalidates a cached kernel only when the file defining it
  changes; fastattn's kernels inline helpers from other modules of this package,
  so before the first kernel is compiled or loaded their cache entries are keyed on
  every source file of :mod:`fastattn.kernels` (:func:`key_caches_on_sources`).
  The kernels import nothing outside this package (a test checks it), so that stamp
  covers everything compiled into them.

Importing this module changes nothing in the process; the process settings
(:mod:`fastattn._runtime.settings`) are applied by the front ends at the first
kernel call.
"""

import functools
import hashlib
import os
import warnings

import numba
import numpy as np

FASTMATH_FLAGS = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

_KERNEL_OPTIONS = dict(parallel=True, nogil=True, fastmath=set(FASTMATH_FLAGS),
                       error_model="numpy", boundscheck=False)
# the helpers the kernels call: the same options, run on the caller's thread
_HELPER_OPTIONS = {key: value for key, value in _KERNEL_OPTIONS.items() if key != "parallel"}


def kernel_per_dtype(function, signature):
    """A getter ``kernel(dtype)`` for ``function`` compiled for ``signature(dtype)``
    (float32 or float64), built on first use with that dtype.

    ``kernel(dtype)`` returns the compiled entry point, which skips Numba's
    per-call argument typing (about 6 us for the attention kernels' grouped
    arguments, a quarter of a tiny call): the callers build arguments of exactly
    the signature's types (:mod:`fastattn._dispatch.layout`; a test compares
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
            # under the key as given (a type such as np.uint16, or a dtype) and as a
            # dtype: a later call with either finds it without Numba's lookup
            entry_points[dtype] = entry_points[np.dtype(dtype)] = entry_point
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
    return numba.njit(**_HELPER_OPTIONS)(func)


def jit_inlined(func):
    """Decorator for the few small helpers of the kernels' innermost loops: the same
    options as :func:`jit_helper`, inlined into each caller by Numba
    (``inline="always"``), so their loops compile with the caller's attributes (full
    vector width). Called out of line, such a helper took 2.5x the time per (row, key)
    in the decode kernel."""
    return numba.njit(inline="always", **_HELPER_OPTIONS)(func)


def jit_kernel(signature):
    """Decorator: compile ``func`` for exactly ``signature`` with the project's options.

    One explicit signature per dtype keeps a single specialisation however the
    caller's arrays are laid out (the public functions pass C-contiguous arrays;
    readonly array types accept writeable ones too). Compiled code is cached on
    disk when Numba finds a writable cache location, else compiled in memory.
    """
    def decorate(func):
        _key_caches_once()
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


@functools.cache
def _key_caches_once():
    """Key the kernels' caches on the package's sources, once per process; a private
    Numba API that changed leaves Numba's default keys, with a warning."""
    try:
        return key_caches_on_sources()
    except Exception as error:  # a private Numba API changed: keep Numba's defaults
        warnings.warn(f"fastattn: could not key Numba's kernel cache on the kernels' sources "
                      f"({error!r}); Numba's default cache keys apply (clear NUMBA_CACHE_DIR "
                      f"after editing a kernel helper)", RuntimeWarning, stacklevel=3)
        return False


def kernels_folder():
    """Folder of :mod:`fastattn.kernels`, whose sources stamp the kernels' cache."""
    return os.path.dirname(os.path.abspath(__file__))


def kernel_sources_stamp():
    """(name, mtime, size) of every module of :mod:`fastattn.kernels` and of
    :mod:`fastattn._dispatch.layout` (the kernels' argument groups): the kernels' cache key."""
    folder = kernels_folder()
    paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))
             if name.endswith(".py")]
    stamp = []
    for path in paths:
        info = os.stat(path)
        stamp.append((os.path.basename(path), info.st_mtime, info.st_size))
    return tuple(stamp)


def key_caches_on_sources():
    """Make Numba's cache locators stamp fastattn kernels with the package's sources.

    Locators for functions outside fastattn are left as they are. Returns False
    (changing nothing) when Numba's private caching classes are not as expected, or,
    with a warning, when Numba is outside the releases this was tested with (the
    ``numba`` pin in pyproject.toml); patches once per process.
    """
    from numba.core import caching

    tested = ((0, 59), (0, 69))  # pyproject.toml: numba>=0.59,<0.69
    version = tuple(int(part) for part in numba.__version__.split(".")[:2])
    if not tested[0] <= version < tested[1]:
        warnings.warn(f"fastattn: Numba {numba.__version__} is outside the releases fastattn "
                      "was tested with (>=0.59,<0.69); the kernels' cache keeps Numba's "
                      "default keys (clear NUMBA_CACHE_DIR after editing a kernel helper)",
                      RuntimeWarning, stacklevel=3)
        return False

    def numba_class(name):  # public names since Numba 0.60-ish, underscored before
        return getattr(caching, name, None) or getattr(caching, "_" + name, None)

    names = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    bases = tuple(numba_class(name) for name in names)
    cache_impl = numba_class("CacheImpl")
    if (None in bases or not all(isinstance(base, type) for base in bases)
            or not isinstance(getattr(cache_impl, "_locator_classes", None), list)):
        return False
    locators = cache_impl._locator_classes
    if any(getattr(locator, "fastattn_stamp", False) for locator in locators):
        return True  # already patched in this process
    stamp = kernel_sources_stamp()
    digest = hashlib.sha1(repr(stamp).encode()).hexdigest()[:12]
    package = __name__.split(".")[0] + "."

    class PackageStamp:
        fastattn_stamp = True

        @classmethod
        def from_function(cls, py_func, py_file):
            if not getattr(py_func, "__module__", "").startswith(package):
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return stamp

        def get_disambiguator(self):
            # the stamp's digest in the index file's name: entries of other sources are
            # never even unpickled (their argument types may name classes since moved)
            return f"{super().get_disambiguator()}-{digest}"

    locators[:0] = [type(f"FastattnKernel{base.__name__}", (PackageStamp, base), {})
                    for base in bases]
    return True
