"""Everything fastattn changes in the Python process it is imported into, in one place.

Two settings are applied once, at the first kernel call or thread-count call (not
when :mod:`fastattn` or its kernels are imported), each with its own switch:

1. **OpenMP spin count** (switch ``FASTATTN_SPINCOUNT=0``). Numba's threads are GNU
   OpenMP threads; after a kernel they spin 300000 times (about a millisecond)
   before sleeping, taking the cores from the NumPy and BLAS work that runs between
   calls. fastattn sets the environment variable ``GOMP_SPINCOUNT`` to
   :data:`OPENMP_SPIN_COUNT` unless it is already set: a multi-head attention layer
   (4 x 256 x 512, 8 heads) took 24 ms with libgomp's default and 19 ms with 10000
   spins, while back-to-back tiny calls, which need the threads awake, kept their
   speed. libgomp reads the variable once, when it is loaded, so it also applies to
   other libraries loading the same libgomp later in the process, and it does not
   reach a libgomp that was loaded before: importing PyTorch first loads PyTorch's
   ``libgomp.so.1``, which Numba's OpenMP layer then shares. fastattn notes which
   libgomp files were loaded before it set the variable
   (:func:`fastattn.show_config` says whether the spin count took effect).
2. **Numba's threading layer: OpenMP first** (switch ``FASTATTN_THREADING_LAYER=0``).
   Numba's default order is TBB, OpenMP, workqueue, so merely installing the ``tbb``
   package (the ``mkl`` wheel of the ``mkl`` extra depends on it) would move the
   kernels onto TBB, whose parallel launch is slower: a tiny call (B=1, H=1, L=16,
   D=8) took 29.8-32.8 us on TBB and 22.8-23.9 us on OpenMP here (processes
   alternating, three each). fastattn puts OpenMP first
   (:data:`THREADING_LAYER_PRIORITY`) unless ``NUMBA_THREADING_LAYER`` or
   ``NUMBA_THREADING_LAYER_PRIORITY`` is set; Numba reads the order when its first
   parallel function runs, so a process that ran one before fastattn's first call
   keeps the layer it got. The price is TBB's fork safety: GNU OpenMP is not
   fork-safe, so a child forked after the kernels' threads started (``multiprocessing``'s
   ``fork`` start method, the default on Linux before Python 3.14) cannot run the
   kernels: Numba stops it ("fork() called from a process already using GNU
   OpenMP"), where on TBB it would run. Use the ``spawn`` or ``forkserver`` start
   method, or switch this setting off (``FASTATTN_THREADING_LAYER=0``) to keep
   Numba's order.

Opting out: set ``GOMP_SPINCOUNT`` or Numba's threading variables yourself (they are
kept), switch a setting off with its variable (``0``, ``false``, ``no`` or ``off``),
or set ``FASTATTN_PROCESS_SETTINGS=0`` to apply none of them. The variables are read
at the first kernel call. :func:`report` says what was done.
"""

import functools
import os
import threading

OPENMP_SPIN_COUNT = "10000"
THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
OPT_OUT_VARIABLE = "FASTATTN_PROCESS_SETTINGS"
# setting name -> the environment variable that switches it off
SWITCHES = {
    "spin count": "FASTATTN_SPINCOUNT",
    "threading layer priority": "FASTATTN_THREADING_LAYER",
}
_OFF_VALUES = ("0", "false", "no", "off")

_lock = threading.Lock()
_outcomes = {}  # setting name -> what apply() did (str), filled by apply()
_libgomp_before = None  # libgomp files loaded before GOMP_SPINCOUNT was set (list)


def _switched_off(variable):
    return os.environ.get(variable, "1").strip().lower() in _OFF_VALUES


@functools.cache
def apply():
    """Apply the process settings (once; later calls do nothing). Returns the names
    of the settings applied."""
    with _lock:
        applied = []
        for name, variable in SWITCHES.items():
            if _switched_off(OPT_OUT_VARIABLE):
                _outcomes[name] = f"off ({OPT_OUT_VARIABLE}={os.environ[OPT_OUT_VARIABLE]})"
            elif _switched_off(variable):
                _outcomes[name] = f"off ({variable}={os.environ[variable]})"
            else:
                done, _outcomes[name] = _APPLY[name]()
                if done:
                    applied.append(name)
        return tuple(applied)


def _apply_spin_count():
    """``(applied, outcome)``: ``GOMP_SPINCOUNT`` set unless the user set it."""
    global _libgomp_before
    if "GOMP_SPINCOUNT" in os.environ:
        return False, f"kept the user's GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}"
    _libgomp_before = loaded_libgomp()
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
    outcome = f"GOMP_SPINCOUNT={OPENMP_SPIN_COUNT}"
    if _libgomp_before:
        outcome += (" set, but not read by " + ", ".join(_libgomp_before) + " (loaded "
                    "before fastattn set it: its threads keep the spin count it started with)")
    return True, outcome


def _apply_threading_layer():
    """``(applied, outcome)``: OpenMP first in Numba's order unless the user chose."""
    if prefer_openmp_threads():
        return True, "Numba's threading layer priority " + " ".join(THREADING_LAYER_PRIORITY)
    return False, "kept the user's Numba threading layer or priority"


_APPLY = {"spin count": _apply_spin_count,
          "threading layer priority": _apply_threading_layer}


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


def loaded_libgomp():
    """Paths of the GNU OpenMP libraries (``libgomp*``) loaded in this process."""
    return loaded_libraries("libgomp")


def loaded_libraries(prefix):
    """Paths of the shared libraries whose file name starts with ``prefix`` that are
    loaded in this process, from ``/proc/self/maps``; an empty list where that file
    does not exist (not Linux)."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # address, mode, offset, device, inode, path
                path = fields[5].strip() if len(fields) == 6 else ""
                if os.path.basename(path).startswith(prefix) and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    return paths


def report():
    """What the process settings did: ``{setting: outcome}`` for every setting
    (``"not applied yet (no kernel call yet)"`` before the first kernel call), plus
    ``"spin count took effect"``: True, False (a libgomp was loaded before fastattn
    set ``GOMP_SPINCOUNT``: it kept the spin count it started with), or None
    (fastattn did not set it), and ``"libgomp loaded before the spin count"``: those
    files."""
    with _lock:
        outcomes = {name: _outcomes.get(name, "not applied yet (no kernel call yet)")
                    for name in SWITCHES}
        before = None if _libgomp_before is None else list(_libgomp_before)
    outcomes["spin count took effect"] = None if before is None else not before
    outcomes["libgomp loaded before the spin count"] = before or []
    return outcomes
