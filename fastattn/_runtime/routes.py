"""Which BLAS ``gemm`` the kernels call, chosen by measurement (private).

:mod:`fastattn.blas` loads the routes (Intel MKL, SciPy's OpenBLAS); this module

- checks a loaded route once per process (:func:`self_test`): a small product
  through its ``gemm`` address, called exactly as the kernels call it (Fortran
  convention, 32-bit integers by pointer), compared with NumPy. An ILP64 build
  (64-bit integers) or an address of the wrong routine fails it instead of the
  kernels computing garbage;
- times the routes on attention's own block products (:data:`CASES`, float32 and
  float64, one thread, through the address as the kernels call it), rounds
  interleaved, within :data:`MEASUREMENT_BUDGET_S` (:func:`measure`);
- keeps the figures in a small JSON file per machine and configuration
  (:func:`cache_file`), keyed by the CPU model, the libraries' versions and the
  environment variables that change a library's code path (:func:`machine_key`),
  so the measurement runs once per machine. Where no cache folder is writable the
  routes are measured again in each process, silently.
"""

import ctypes
import hashlib
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

# The block products of the kernels' main loops (fastattn._dispatch.tiling: blocks of
# 256 queries and 512 keys in the forward, head dimension 64): name -> (m, k, n,
# b transposed). "q k^T" multiplies a C block by a transposed C block (an F array),
# "P v" two C blocks.
CASES = {
    "(256,64)@(64,512)": (256, 64, 512, True),
    "(256,512)@(512,64)": (256, 512, 64, False),
}
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
MEASUREMENT_BUDGET_S = 0.3  # time spent timing, at most (loading the routes aside)
MAX_ROUNDS = 15  # rounds of every route on every case; the best time of each is kept
# A route other than SciPy's (which changes nothing in the process) is taken only if
# it is faster by at least this factor (geometric mean over the cases): within it,
# the order of two routes is measurement noise.
REQUIRED_SPEEDUP = 1.03
# Environment variables that change a library's code path (part of the cache key,
# and reported by fastattn.show_config).
ROUTE_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_VERBOSE",
                   "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "MKL_DEBUG_CPU_TYPE",
                   "MKL_INTERFACE_LAYER", "MKL_THREADING_LAYER")
CACHE_FORMAT = 1

_POINTER = ctypes.c_void_p


def case_label(dtype, case):
    """``"float32 (256,64)@(64,512)"``: a measured case's name in reports and the cache."""
    return f"{np.dtype(dtype).name} {case}"


def flop_count(case):
    """Floating-point operations of one product of ``case`` (a :data:`CASES` key)."""
    m, k, n, _ = CASES[case]
    return 2 * m * k * n


# ---------------------------------------------------------------- calling gemm

def gemm_function(address):
    """The Fortran ``?gemm`` at ``address`` as a ctypes function of 13 pointers."""
    return ctypes.CFUNCTYPE(None, *[_POINTER] * 13)(address)


def _integers(values, pad):
    """Pointers to 32-bit ``values``, each in an 8-byte slot whose other half is
    ``pad``: with ``pad=-1`` a gemm that reads 64-bit integers sees negative sizes
    and refuses the call (leaving the output as it was) instead of reading past the
    arrays. Returns ``(keep-alive array, pointers)``."""
    slots = np.full((len(values), 2), pad, np.int32)
    low = 0 if sys.byteorder == "little" else 1
    slots[:, low] = values
    return slots, [_POINTER(slots.ctypes.data + 8 * index) for index in range(len(values))]


def gemm_arguments(a, b, out, alpha=1.0, beta=0.0, pad=0):
    """Arguments of ``out = alpha * (a @ b) + beta * out`` for a Fortran ``?gemm``,
    as :func:`fastattn.kernels.products.call_gemm` passes them: column-major BLAS
    computes ``out.T = b.T @ a.T``; a C array is its own transpose, an F array
    needs ``'t'``. Returns ``(keep-alive objects, argument tuple)``."""
    m, k = a.shape
    n = b.shape[1]

    def operand(array):
        transposed = not array.flags.c_contiguous
        rows, columns = array.shape
        return b"t" if transposed else b"n", max(1, rows if transposed else columns)

    trans_a, lead_a = operand(a)
    trans_b, lead_b = operand(b)
    scalars = np.array([alpha, beta], out.dtype)
    keep, (n_, m_, k_, ld_b, ld_a, ld_out) = _integers([n, m, k, lead_b, lead_a, max(1, n)], pad)
    flags = ctypes.create_string_buffer(trans_b + trans_a)
    flag_b, flag_a = _POINTER(ctypes.addressof(flags)), _POINTER(ctypes.addressof(flags) + 1)
    arguments = (flag_b, flag_a, n_, m_, k_, _POINTER(scalars.ctypes.data),
                 _POINTER(b.ctypes.data), ld_b, _POINTER(a.ctypes.data), ld_a,
                 _POINTER(scalars.ctypes.data + scalars.itemsize), _POINTER(out.ctypes.data),
                 ld_out)
    return (keep, flags, scalars, a, b, out), arguments


def self_test(address, dtype):
    """Check the ``gemm`` at ``address`` for ``dtype`` on a small product against
    NumPy. Returns None if it is right, else what went wrong (str).

    The operands hold small integers, so every correct BLAS gives the exact result.
    ``b`` is used both as a C and as an F (transposed) array, and the second call
    accumulates (``beta = 1``), as the kernels' calls do. Integers are passed in
    8-byte slots whose upper half is negative (:func:`_integers`): an ILP64 build
    rejects the call instead of reading past the arrays.
    """
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(7)
    a = rng.integers(-4, 5, (7, 5)).astype(dtype)  # (m, k)
    b_c = rng.integers(-4, 5, (5, 3)).astype(dtype)  # (k, n) C
    b_f = np.asfortranarray(b_c)  # (k, n) F: passed as 't'
    function = gemm_function(address)
    product = a.astype(np.float64) @ b_c.astype(np.float64)  # (7, 3), exact
    for b in (b_c, b_f):
        out = np.full((7, 3), np.nan, dtype)
        for alpha, beta, expected in ((1.0, 0.0, product), (2.0, 1.0, 3 * product)):
            keep, arguments = gemm_arguments(a, b, out, alpha, beta, pad=-1)
            function(*arguments)
            del keep
            if not np.array_equal(out.astype(np.float64), expected):
                return (f"its {dtype.name} gemm gave a wrong (7, 5) @ (5, 3) product "
                        f"({'F' if b is b_f else 'C'} right operand, beta {beta:g}): a "
                        "64-bit-integer (ILP64) build, or not a gemm of this dtype")
    return None


# ---------------------------------------------------------------- measuring

def _operands(dtype, case, rng):
    m, k, n, transposed = CASES[case]
    a = rng.standard_normal((m, k)).astype(dtype)  # (m, k) C
    b = rng.standard_normal((n, k)).astype(dtype).T if transposed else \
        rng.standard_normal((k, n)).astype(dtype)  # (k, n): F (a transposed C block) or C
    return a, b, np.empty((m, n), dtype)  # out (m, n) C


def measure(addresses, budget_s=MEASUREMENT_BUDGET_S, max_rounds=MAX_ROUNDS):
    """GFLOP/s of each route on each case: ``{route: {case label: GFLOP/s}}``.

    ``addresses`` maps a route's name to ``{dtype: gemm address}``. Every call runs
    on one thread (SciPy's BLAS is held at one thread meanwhile; MKL is sequential),
    through the address as the kernels call it. Rounds alternate the routes' order
    and stop after ``max_rounds`` or once ``budget_s`` seconds were spent; each
    case's best time counts.
    """
    from fastattn._runtime.blas_threads import blas_thread_functions

    rng = np.random.default_rng(0)
    calls = []  # (route, label, flops, function, arguments)
    keep = []
    for dtype in DTYPES:
        for case in CASES:
            a, b, out = _operands(dtype, case, rng)
            for route, by_dtype in addresses.items():
                alive, arguments = gemm_arguments(a, b, out)
                keep.append(alive)
                calls.append((route, case_label(dtype, case), flop_count(case),
                              gemm_function(by_dtype[dtype]), arguments))
    best = {}
    saved = []
    try:
        for get, set_ in blas_thread_functions():
            count = get()
            if count != 1:
                set_(1)
                saved.append((set_, count))
        for _, _, _, function, arguments in calls:  # warm up: loads MKL's CPU kernels
            function(*arguments)
        started = time.perf_counter()
        for round_index in range(max_rounds):
            for route, label, _, function, arguments in (calls if round_index % 2 == 0
                                                         else calls[::-1]):
                begin = time.perf_counter()
                function(*arguments)
                elapsed = time.perf_counter() - begin
                key = (route, label)
                best[key] = min(best.get(key, elapsed), elapsed)
            if time.perf_counter() - started > budget_s:
                break
    finally:
        for set_, count in saved:
            set_(count)
    gflops = {route: {} for route in addresses}
    for route, label, flops, _, _ in calls:
        gflops[route][label] = round(flops / max(best[route, label], 1e-9) / 1e9, 2)
    return gflops


def ranking(gflops, preferred="scipy"):
    """Routes of ``gflops`` (:func:`measure`'s result), fastest first by the geometric
    mean of their speeds over the cases; ``preferred`` comes first unless another is
    faster by :data:`REQUIRED_SPEEDUP` or more."""
    def mean_speed(route):
        speeds = list(gflops[route].values())
        return float(np.exp(np.mean(np.log(np.maximum(speeds, 1e-9))))) if speeds else 0.0

    ordered = sorted(gflops, key=mean_speed, reverse=True)
    if preferred in ordered and ordered[0] != preferred and \
            mean_speed(ordered[0]) < REQUIRED_SPEEDUP * mean_speed(preferred):
        ordered.remove(preferred)
        ordered.insert(0, preferred)
    return ordered


# ---------------------------------------------------------------- the cache file

def cpu_description():
    """The first CPU's entry of ``/proc/cpuinfo`` (Linux) as ``{field: value}``;
    empty where there is none."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    if fields:
                        break
                    continue
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model():
    """The CPU's model name, with its family and model numbers where Linux gives them
    (virtual machines often name different generations alike: ``AMD EPYC``), else
    what the platform module says, else ``"unknown"``."""
    fields = cpu_description()
    name = fields.get("model name") or fields.get("Model") or fields.get("cpu model")
    if not name:
        return platform.processor() or platform.machine() or "unknown"
    numbers = [f"{field} {fields[field]}" for field in ("cpu family", "model", "stepping")
               if field in fields]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def _distribution_version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_key(route_libraries):
    """What the measured figures depend on: the CPU model and architecture, the
    versions of fastattn, SciPy and the ``mkl`` wheel, the routes' library files
    (``route_libraries``: ``{route: path}``) and the environment variables that
    change a library's code path (:data:`ROUTE_VARIABLES`)."""
    import fastattn

    flags = cpu_description().get("flags", "")
    return {
        "cpu": cpu_model(),
        "cpu flags": hashlib.sha1(flags.encode()).hexdigest()[:12] if flags else None,
        "machine": platform.machine(),
        "fastattn": fastattn.__version__,
        "scipy": _distribution_version("scipy"),
        "mkl": _distribution_version("mkl"),
        "libraries": {route: os.path.basename(path) for route, path in
                      sorted(route_libraries.items())},
        "environment": {name: os.environ[name] for name in ROUTE_VARIABLES
                        if name in os.environ},
    }


def cache_folder():
    """Where the measured figures are kept: ``NUMBA_CACHE_DIR`` if set (next to the
    kernels' compile cache), else the user's cache folder (``$XDG_CACHE_HOME/fastattn``
    or ``~/.cache/fastattn`` on Linux, ``~/Library/Caches/fastattn`` on macOS,
    ``%LOCALAPPDATA%\\fastattn`` on Windows)."""
    numba_cache = os.environ.get("NUMBA_CACHE_DIR")
    if numba_cache:
        return numba_cache
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "fastattn")


def cache_file(key):
    """The JSON file of the figures measured under ``key`` (:func:`machine_key`)."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_folder(), f"fastattn-blas-routes-{digest}.json")


def read_cached(path, key, routes):
    """The figures stored at ``path`` if they were measured under ``key`` for every
    one of ``routes``, else None (no file, unreadable, another format)."""
    try:
        with open(path) as file:
            stored = json.load(file)
        gflops = stored["gflops"]
        if (stored.get("format") != CACHE_FORMAT or stored.get("key") != key
                or set(gflops) != set(routes)):
            return None
        for figures in gflops.values():
            if not all(isinstance(value, (int, float)) for value in figures.values()):
                return None
        return stored
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_cached(path, record):
    """Store ``record`` at ``path`` (atomically: a temporary file renamed); returns
    whether it could (an unwritable folder is no error)."""
    try:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".fastattn-", suffix=".json")
        try:
            with os.fdopen(handle, "w") as file:
                json.dump(record, file, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        return True
    except OSError:
        return False


def measured_ranking(route_libraries, usable_addresses):
    """The routes fastest first, from the cache file or measured now (then stored).

    ``route_libraries`` maps each route with a library here to its file (found
    without loading it); ``usable_addresses()`` loads them and returns
    ``{route: {dtype: gemm address}}`` for those that load and pass their self-test,
    and is called only when there is something to measure. Returns
    ``(ranking, record)``: ``record`` holds ``gflops``, ``seconds`` (the
    measurement's duration), ``key``, ``cache_file`` (None if it could not be
    written) and ``source`` (``"measured"`` or ``"cache file"``); it is None when
    fewer than two routes can be used (nothing to measure).
    """
    key = machine_key(route_libraries)
    path = cache_file(key)
    stored = read_cached(path, key, route_libraries)
    if stored is not None:
        return ranking(stored["gflops"]), dict(stored, source="cache file", cache_file=path)
    addresses = usable_addresses()
    if len(addresses) < 2:
        return list(addresses), None
    started = time.perf_counter()
    gflops = measure(addresses)
    seconds = round(time.perf_counter() - started, 4)
    record = {"format": CACHE_FORMAT, "key": key, "gflops": gflops, "seconds": seconds}
    # figures of every route with a library here, or none (a route that could not be
    # loaded in this process is measured again in the next)
    stored = set(addresses) == set(route_libraries) and write_cached(path, record)
    return ranking(gflops), dict(record, source="measured", cache_file=path if stored else None)
