"""Everything fastattn changes in the Python process it is imported into, in one place.

Three settings are applied once, when the kernels or the thread functions are first
loaded (not when :mod:`fastattn` itself is imported):

1. **OpenMP spin count.** Numba's threads are GNU OpenMP threads; after a kernel they
   spin 300000 times (about a millisecond) before sleeping, taking the cores from the
   NumPy and BLAS work that runs between calls. fastattn sets the environment
   variable ``GOMP_SPINCOUNT`` to :data:`OPENMP_SPIN_COUNT` unless it is already set:
   a multi-head attention layer (4 x 256 x 512, 8 heads) took 24 ms with libgomp's
   default and 19 ms with 10000 spins, while back-to-back tiny calls, which need the
   threads awake, kept their speed. libgomp reads the variable once, when it starts,
   so it also applies to other libraries using the same libgomp later in the process.
2. **Numba cache keys.** Numba invalidates a cached kernel only when the file defining
   it changes; fastattn's kernels inline helpers from other modules of
   :mod:`fastattn.kernels`, so their cache entries are keyed on every source file of
   that package. This patches Numba's cache locator list (a private part of Numba)
   for fastattn's own functions only; if those classes change shape in a future
   Numba, the patch is skipped with a warning and Numba's default keys apply (a
   stale cache then needs ``NUMBA_CACHE_DIR`` cleared after editing a helper).
3. **Numba's threading layer: OpenMP first.** Numba's default order is TBB, OpenMP,
   workqueue, so merely installing the ``tbb`` package (the ``mkl`` wheel of the
   ``mkl`` extra depends on it) would move the kernels onto TBB, whose parallel launch
   is slower: a tiny call (B=1, H=1, L=16, D=8) took 29.8-32.8 us on TBB and 22.8-23.9
   us on OpenMP here (processes alternating, three each). fastattn puts OpenMP first (:data:`THREADING_LAYER_PRIORITY`) unless
   ``NUMBA_THREADING_LAYER`` or ``NUMBA_THREADING_LAYER_PRIORITY`` is set; Numba reads
   the order when its first parallel function runs, so a process that ran one before
   fastattn's first call keeps the layer it got.

Opting out: set ``GOMP_SPINCOUNT`` or Numba's threading variables yourself (they are
kept), or set ``FASTATTN_PROCESS_SETTINGS=0`` before importing fastattn to apply none
of the settings.
"""

import functools
import os
import warnings

OPENMP_SPIN_COUNT = "10000"
THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
OPT_OUT_VARIABLE = "FASTATTN_PROCESS_SETTINGS"


@functools.cache
def apply():
    """Apply the process settings (once; later calls do nothing). Returns the names
    of the settings applied."""
    if os.environ.get(OPT_OUT_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return ()
    applied = []
    if "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
        applied.append("GOMP_SPINCOUNT")
    if prefer_openmp_threads():
        applied.append("threading layer priority")
    try:
        if key_kernel_caches_on_package_sources():
            applied.append("numba cache keys")
    except Exception as error:  # a private Numba API changed: keep Numba's defaults
        warnings.warn(f"fastattn: could not key Numba's kernel cache on the package's sources "
                      f"({error!r}); Numba's default cache keys apply", RuntimeWarning,
                      stacklevel=2)
    return tuple(applied)


def prefer_openmp_threads():
    """Put OpenMP first in Numba's threading layer order, unless the user chose a
    layer or an order (environment variables or ``numba.config``). Returns whether
    the order was set."""
    import numba

    if ("NUMBA_THREADING_LAYER" in os.environ or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ
            or numba.config.THREADING_LAYER != "default"):
        return False
    numba.config.THREADING_LAYER_PRIORITY = list(THREADING_LAYER_PRIORITY)
    return True


def kernels_folder():
    """Folder of :mod:`fastattn.kernels`, whose sources stamp the kernels' cache."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")


def kernel_sources_stamp():
    """(name, mtime, size) of every module of :mod:`fastattn.kernels` and of
    :mod:`fastattn.layout` (the kernels' argument groups): the kernels' cache key."""
    folder = kernels_folder()
    paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))
             if name.endswith(".py")]
    paths.append(os.path.join(os.path.dirname(folder), "layout.py"))
    stamp = []
    for path in paths:
        info = os.stat(path)
        stamp.append((os.path.basename(path), info.st_mtime, info.st_size))
    return tuple(stamp)


def key_kernel_caches_on_package_sources():
    """Make Numba's cache locators stamp fastattn kernels with the package's sources.

    Locators for functions outside fastattn are left as they are. Returns False
    (changing nothing) when Numba's private caching classes are not as expected;
    patches once per process.
    """
    from numba.core import caching

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
    package = __name__.rpartition(".")[0] + "."

    class PackageStamp:
        fastattn_stamp = True

        @classmethod
        def from_function(cls, py_func, py_file):
            if not getattr(py_func, "__module__", "").startswith(package):
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return stamp

    locators[:0] = [type(f"FastattnKernel{base.__name__}", (PackageStamp, base), {})
                    for base in bases]
    return True
