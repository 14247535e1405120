"""Everything fastattn changes in the Python process it is imported into, in one place.

Two settings are applied once, at the first kernel call or thread-count call (not
when :mod:`fastattn` or its kernels are imported):

1. **OpenMP spin count.** Numba's threads are GNU OpenMP threads; after a kernel they
   spin 300000 times (about a millisecond) before sleeping, taking the cores from the
   NumPy and BLAS work that runs between calls. fastattn sets the environment
   variable ``GOMP_SPINCOUNT`` to :data:`OPENMP_SPIN_COUNT` unless it is already set:
   a multi-head attention layer (4 x 256 x 512, 8 heads) took 24 ms with libgomp's
   default and 19 ms with 10000 spins, while back-to-back tiny calls, which need the
   threads awake, kept their speed. libgomp reads the variable once, when it starts,
   so it also applies to other libraries using the same libgomp later in the process.
2. **Numba's threading layer: OpenMP first.** Numba's default order is TBB, OpenMP,
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
