"""The BLAS behind the kernels' block products: Intel MKL when installed, else SciPy's.

Nearly all of attention's arithmetic is its block products (``q k^T`` and ``P v`` in
the forward, five products in the backward), each one ``gemm`` call on one of the
kernels' threads. Which library's ``gemm`` they call is a run-time argument (its
address, :mod:`fastattn.kernels.products`), so one compiled kernel serves both:

``"mkl"``
    Intel oneAPI MKL's single dynamic library (``libmkl_rt``, from the ``mkl``
    wheel: ``pip install "fastattn[mkl]"``; looked for in the environment's ``lib``
    folder, then by the dynamic loader), switched to its sequential threading layer
    and LP64 interface. On an AVX-512 Intel CPU its kernels run the forward's
    block shapes 1.1-1.45x faster than OpenBLAS (``(256, 64) @ (64, 512)``: about
    150 against 105 GFLOP/s on one core), the difference that puts fastattn ahead of
    PyTorch (whose CPU wheels link MKL too).
``"scipy"``
    ``scipy.linalg.cython_blas``, the BLAS Numba's ``np.dot`` calls (OpenBLAS in
    SciPy's wheels); always available.

The environment variable ``FASTATTN_BLAS`` (``auto``, the default, ``mkl`` or
``scipy``) chooses at the first call; :func:`use` changes the choice at run time.
``auto`` takes MKL on Intel CPUs when it loads and accepts the sequential layer, else
SciPy's. On other CPUs MKL is known to take generic code paths, and its speed there
was never measured for fastattn, so ``auto`` keeps SciPy's; ``FASTATTN_BLAS=mkl``
still asks for MKL anywhere.

Switching MKL to its sequential layer is process-wide: another library in the same
process that calls the same ``libmkl_rt`` (a NumPy built against it, say) then runs
single-threaded too. ``auto`` does not take an MKL that some other library already
initialised with another threading layer (the switch would be refused); set
``FASTATTN_BLAS=scipy`` to leave MKL alone entirely.

Results differ between the two libraries by rounding only (each is within the
accuracy contract); with either, results are bitwise identical for every thread
count.
"""

import ctypes
import ctypes.util
import glob
import os
import sys
import threading

import numpy as np

BACKENDS = ("mkl", "scipy")
ENVIRONMENT_VARIABLE = "FASTATTN_BLAS"

_MKL_THREADING_SEQUENTIAL = 1  # MKL_Set_Threading_Layer's code for "sequential"
_MKL_INTERFACE_LP64 = 0  # MKL_Set_Interface_Layer's code for 32-bit integers
_ROUTINES = {np.dtype(np.float32): "sgemm", np.dtype(np.float64): "dgemm"}

_lock = threading.RLock()  # _current holds it while _choose loads
_chosen = None  # the backend in use: a _Backend, set on first use
_loaded = {}  # name -> _Backend or the reason it could not load (str)


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
        If ``"mkl"`` was asked for and cannot be used (the message says why).

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
    global _chosen
    backend = _choose(name, "name")
    with _lock:
        previous, _chosen = _chosen, backend
    return None if previous is None else previous.name


def _current():
    global _chosen
    backend = _chosen
    if backend is None:
        with _lock:
            if _chosen is None:
                _chosen = _choose(os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower()
                                  or "auto", ENVIRONMENT_VARIABLE)
            backend = _chosen
    return backend


def _choose(name, source):
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{source} must be one of 'auto', 'mkl', 'scipy'; got {name!r}")
    if name == "auto":
        mkl = _load("mkl") if _cpu_vendor() == "GenuineIntel" else None
        return mkl if isinstance(mkl, _Backend) else _load("scipy")
    backend = _load(name)
    if not isinstance(backend, _Backend):
        raise RuntimeError(f"fastattn cannot use BLAS {name!r} ({source}): {backend}")
    return backend


def _cpu_vendor():
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), or "" where
    it cannot be read (non-Linux systems: MKL only on request there)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _why_not(backend):
    return None if isinstance(backend, _Backend) else backend


def _load(name):
    """The backend ``name``, loaded once per process, or why it cannot load (str)."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _load_mkl() if name == "mkl" else _load_scipy()
        return _loaded[name]


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
