"""The BLAS behind the kernels' block products: the fastest route measured here.

Nearly all of attention's arithmetic is its block products (``q k^T`` and ``P v`` in
the forward, five products in the backward), each one ``gemm`` call on one of the
kernels' threads. Which library's ``gemm`` they call is a run-time argument (its
address, :mod:`fastattn.kernels.products`), so one compiled kernel serves every
route:

``"mkl"``
    Intel oneAPI MKL's single dynamic library (``libmkl_rt``, from the ``mkl``
    wheel: ``pip install "fastattn[mkl]"``; looked for in the environment's ``lib``
    folder, then by the dynamic loader), switched to its sequential threading layer
    and LP64 interface. On an AVX-512 Intel CPU its kernels run the forward's
    block shapes 1.1-1.45x faster than OpenBLAS (``(256, 64) @ (64, 512)``: about
    150 against 105 GFLOP/s on one core).
``"scipy"``
    ``scipy.linalg.cython_blas``, the BLAS Numba's ``np.dot`` calls (OpenBLAS in
    SciPy's wheels); always available.

The environment variable ``FASTATTN_BLAS`` (``auto``, the default, ``mkl`` or
``scipy``) chooses at the first call; :func:`use` changes the choice at run time.
``auto`` takes the route that was fastest on this machine: at first use each route
that loads is timed on attention's own block products (float32 and float64, one
thread, through the address as the kernels call it; about 0.1 s) and the figures
are kept in a small JSON file next to Numba's compile cache (``NUMBA_CACHE_DIR``, else
the user's cache folder), keyed by the CPU model, the libraries' versions and the
environment variables that change their code paths (``OPENBLAS_CORETYPE``,
``MKL_ENABLE_INSTRUCTIONS``, ...; fastattn never sets them), so later processes read
the choice instead of measuring (:mod:`fastattn._runtime.routes`). SciPy's BLAS
is kept unless another route is at least 3% faster. :func:`fastattn.show_config`
shows the figures and why the route in use was chosen.

Every route is checked once per process before its first use: a small product
through its ``gemm`` address against NumPy. A route that fails (a 64-bit-integer
build, say) is skipped by ``auto`` with a :class:`RuntimeWarning`, and refused when
asked for by name.

Switching MKL to its sequential layer is process-wide: another library in the same
process that calls the same ``libmkl_rt`` (a NumPy built against it, say) then runs
single-threaded too; without a stored measurement ``auto`` loads MKL to time it,
whichever route wins. ``auto`` leaves alone an MKL that some other library already
loaded (on Linux, where ``/proc/self/maps`` tells), and no request takes an MKL
already initialised with another threading layer (the switch would be refused); set
``FASTATTN_BLAS=scipy`` to leave MKL alone entirely.

Results differ between the routes by rounding only (each is within the accuracy
contract); with any one route, results are bitwise identical for every thread count.
"""

import ctypes
import ctypes.util
import glob
import os
import sys
import threading
import warnings

import numpy as np

BACKENDS = ("mkl", "scipy")
ENVIRONMENT_VARIABLE = "FASTATTN_BLAS"

_MKL_THREADING_SEQUENTIAL = 1  # MKL_Set_Threading_Layer's code for "sequential"
_MKL_INTERFACE_LP64 = 0  # MKL_Set_Interface_Layer's code for 32-bit integers
_ROUTINES = {np.dtype(np.float32): "sgemm", np.dtype(np.float64): "dgemm"}

_lock = threading.RLock()  # _current holds it while _choose loads
_chosen = None  # the backend in use: a _Backend, set on first use
_reason = None  # why _chosen was chosen (str), for show_config
_measurement = None  # the routes' figures behind an "auto" choice (dict), or None
_loaded = {}  # name -> _Backend or the reason it could not load (str)
_failed_self_test = set()  # names of routes that loaded but failed their self-test
_opened_mkl = set()  # real paths of the libmkl_rt files fastattn loaded


class _Backend:
    """A loaded BLAS: its name, library file and gemm addresses by dtype."""

    __slots__ = ("name", "library", "addresses")

    def __init__(self, name, library, addresses):
        self.name, self.library, self.addresses = name, library, addresses


def gemm_address(dtype):
    """Address of the chosen BLAS's ``sgemm`` (float32) or ``dgemm`` (float64), as an
    int, for the kernels (:func:`fastattn.kernels.products.call_gemm`)."""
    return _current().addresses[np.dtype(dtype)]


def current():
    """The BLAS the kernels call: ``{"name": "mkl" or "scipy", "library": path}``;
    chooses it first if no call has yet (see the module docstring).

    Examples
    --------
    >>> import fastattn.blas
    >>> fastattn.blas.current()["name"] in ("mkl", "scipy")
    True
    """
    backend = _current()
    return {"name": backend.name, "library": backend.library}


def current_name():
    """``current()["name"]``, without building the dict (for every kernel call)."""
    return _current().name


def available():
    """``{name: None if it loads, else why not}`` for every backend (loading each).

    Examples
    --------
    >>> import fastattn.blas
    >>> why_not = fastattn.blas.available()
    >>> sorted(why_not)
    ['mkl', 'scipy']
    >>> why_not["scipy"] is None                     # SciPy's BLAS always loads
    True
    """
    return {name: _why_not(_load(name)) for name in BACKENDS}


def use(name):
    """Make the kernels call BLAS ``name`` (``"mkl"``, ``"scipy"`` or ``"auto"``) from
    the next call on, in every thread; returns the name of the previous choice.

    Raises
    ------
    ValueError
        If ``name`` is none of those.
    RuntimeError
        If a route asked for by name cannot be used (the message says why).

    Examples
    --------
    Run the next calls on SciPy's BLAS, then go back to the previous choice:

    >>> import numpy as np, fastattn, fastattn.blas
    >>> previous = fastattn.blas.use("scipy")
    >>> fastattn.blas.current()["name"]
    'scipy'
    >>> x = np.random.default_rng(0).standard_normal((8, 4))
    >>> on_scipy = fastattn.scaled_dot_product_attention(x, x, x)
    >>> _ = fastattn.blas.use(previous or "auto")
    >>> bool(np.allclose(on_scipy, fastattn.scaled_dot_product_attention(x, x, x)))
    True
    """
    global _chosen, _reason, _measurement
    choice = _choose(name, f"fastattn.blas.use({name!r})")
    with _lock:
        previous = _chosen
        _chosen, _reason, _measurement = choice
    return None if previous is None else previous.name


def _current():
    global _chosen, _reason, _measurement
    backend = _chosen
    if backend is None:
        with _lock:
            if _chosen is None:
                requested = os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower()
                _chosen, _reason, _measurement = _choose(
                    requested or "auto", f"{ENVIRONMENT_VARIABLE}={requested or 'auto'}")
            backend = _chosen
    return backend


def _choose(name, source):
    """``(backend, reason, measurement)`` for the request ``name`` made by ``source``
    (the environment variable or :func:`use`)."""
    if name not in BACKENDS + ("auto",):
        argument = ENVIRONMENT_VARIABLE if source.startswith(ENVIRONMENT_VARIABLE) else "name"
        raise ValueError(f"{argument} must be one of 'auto', 'mkl', 'scipy'; got {name!r}")
    if name == "auto":
        with _lock:
            return _choose_measured()
    backend = _load(name)
    if not isinstance(backend, _Backend):
        raise RuntimeError(f"fastattn cannot use BLAS {name!r} ({source}): {backend}")
    return backend, f"forced by {source}", None


def _choose_measured():
    """``auto``: the fastest route that loads and passes its self-test, from the
    stored figures of this machine or measured now (:mod:`fastattn._runtime.routes`)."""
    from fastattn._runtime import routes

    libraries = {name: path for name, path in _route_libraries().items() if path}
    if len(libraries) > 1:
        ranked, record = routes.measured_ranking(libraries, _usable_addresses)
    else:
        ranked, record = list(libraries), None
    chosen, passed_over = None, {}
    for name in ranked + [name for name in BACKENDS if name not in ranked]:
        backend = _load_unless_loaded_elsewhere(name)
        if isinstance(backend, _Backend):
            chosen = backend
            break
        passed_over[name] = backend
    # routes left out of the measurement, or that would have been, are passed over too
    for name in libraries:
        why = None if chosen is not None and name == chosen.name else _why_auto_skips(name)
        if why is not None and name not in passed_over:
            passed_over[name] = why
    for name in passed_over.keys() & _failed_self_test:
        warnings.warn(f"fastattn: BLAS route {name!r} failed its self-test "
                      f"({passed_over[name]}); the kernels use the next route",
                      RuntimeWarning, stacklevel=2)
    details = "; ".join(f"{name}: {why}" for name, why in passed_over.items())
    if chosen is None:
        raise RuntimeError("fastattn: no BLAS route can be used: " + details)
    if record is None:
        reason = "the only route that loads here"
    elif record["source"] == "measured":
        reason = "fastest measured on this machine"
    else:
        reason = "fastest measured on this machine (stored figures)"
    if passed_over:
        reason += "; passed over " + details
    return chosen, reason, record


def _usable_addresses():
    """``{route: {dtype: gemm address}}`` of the routes that load and pass their
    self-test (loading each)."""
    loaded = {name: _load_unless_loaded_elsewhere(name) for name in BACKENDS}
    return {name: backend.addresses for name, backend in loaded.items()
            if isinstance(backend, _Backend)}


def _why_auto_skips(name):
    """Why ``auto`` cannot use route ``name`` as things stand (loading nothing), or
    None if it can or that is not known without loading it."""
    if name in _loaded:
        return _why_not(_loaded[name])
    return _mkl_loaded_elsewhere() if name == "mkl" else None


def _mkl_loaded_elsewhere():
    """Why ``auto`` leaves MKL alone if another library of the process loaded a
    ``libmkl_rt`` (from ``/proc/self/maps``: Linux only), else None."""
    from fastattn._runtime.settings import loaded_libraries

    elsewhere = [path for path in loaded_libraries("libmkl_rt")
                 if os.path.realpath(path) not in _opened_mkl]
    if elsewhere:
        return (f"{elsewhere[0]} was loaded by another library in this process; auto "
                f"leaves it as it is ({ENVIRONMENT_VARIABLE}=mkl takes it)")
    return None


def _load_unless_loaded_elsewhere(name):
    """:func:`_load` for ``auto``, which leaves alone an MKL that another library of
    the process loaded (switching it to its sequential layer would make that library
    single-threaded too); asking for ``"mkl"`` by name still takes it."""
    if name == "mkl" and name not in _loaded:
        why_not = _mkl_loaded_elsewhere()
        if why_not is not None:
            return why_not
    return _load(name)


def _route_libraries():
    """``{route: library file or None}``: what each route would load, found without
    loading it (the stored figures' key)."""
    candidates = _mkl_candidates()
    return {"mkl": candidates[0] if candidates else None, "scipy": _scipy_blas_file()}


def _scipy_blas_file():
    import importlib.util

    spec = importlib.util.find_spec("scipy.linalg.cython_blas")
    return spec.origin if spec is not None else None


def _why_not(backend):
    return None if isinstance(backend, _Backend) else backend


def _load(name):
    """The backend ``name``, loaded and self-tested once per process, or why it
    cannot be used (str)."""
    with _lock:
        if name not in _loaded:
            backend = _load_mkl() if name == "mkl" else _load_scipy()
            if isinstance(backend, _Backend):
                failure = _self_test(backend)
                if failure is not None:
                    _failed_self_test.add(name)
                    backend = f"{backend.library} failed its self-test: {failure}"
            _loaded[name] = backend
        return _loaded[name]


def _self_test(backend):
    """None if the backend's gemm computes a small product right in every dtype,
    else what went wrong (:func:`fastattn._runtime.routes.self_test`)."""
    from fastattn._runtime.routes import self_test

    for dtype, address in backend.addresses.items():
        failure = self_test(address, dtype)
        if failure is not None:
            return failure
    return None


def _load_scipy():
    from scipy.linalg import cython_blas

    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object,
                                                                  ctypes.c_char_p]
    addresses = {}
    for dtype, routine in _ROUTINES.items():
        capsule = cython_blas.__pyx_capi__[routine]
        addresses[dtype] = get_pointer(capsule, get_name(capsule))
    return _Backend("scipy", cython_blas.__file__, addresses)


def _mkl_candidates():
    """Paths of ``libmkl_rt`` to try: the ``mkl`` wheel's, in this environment's
    ``lib``, then whatever the dynamic loader finds."""
    found = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True)
    name = ctypes.util.find_library("mkl_rt")
    return found + ([name] if name else [])


def _load_mkl():
    candidates = _mkl_candidates()
    if not candidates:
        return "libmkl_rt not found (pip install mkl, or fastattn[mkl])"
    errors = []
    for path in candidates:
        try:
            library = ctypes.CDLL(path)
        except OSError as error:
            errors.append(f"{path}: {error}")
            continue
        from fastattn._runtime.settings import loaded_libraries

        _opened_mkl.update(os.path.realpath(loaded) for loaded in loaded_libraries("libmkl_rt"))
        set_threading = library.MKL_Set_Threading_Layer
        set_interface = library.MKL_Set_Interface_Layer
        set_threading.restype = set_interface.restype = ctypes.c_int
        set_threading.argtypes = set_interface.argtypes = [ctypes.c_int]
        interface = set_interface(_MKL_INTERFACE_LP64)
        threading_layer = set_threading(_MKL_THREADING_SEQUENTIAL)
        if interface != _MKL_INTERFACE_LP64 or threading_layer != _MKL_THREADING_SEQUENTIAL:
            return (f"{path} was already set up by another library in this process "
                    f"(interface layer {interface}, threading layer {threading_layer}; "
                    "fastattn needs LP64 and sequential)")
        addresses = {dtype: ctypes.cast(getattr(library, routine + "_"), ctypes.c_void_p).value
                     for dtype, routine in _ROUTINES.items()}
        return _Backend("mkl", path, addresses)
    return "; ".join(errors)
