"""fastattn.show_config: what fastattn runs with on this machine, in this process."""

import os
import platform

MODES = ("stdout", "dicts")
CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile")
# How 16-bit inputs (bfloat16, float16) reach the block products (fastattn.kernels.half)
SIXTEEN_BIT_ROUTE = ("converted to float32 block by block in cache, then the float32 "
                     "gemm in use; bfloat16 dot-product instructions (avx512_bf16, "
                     "amx) are not used yet")


def show_config(mode="stdout"):
    """Show the libraries, routes and settings fastattn runs with.

    Like :func:`numpy.show_config`: the version; every BLAS route for the kernels'
    block products with its measured speed, the one in use and why it was chosen
    (measured here, forced by ``FASTATTN_BLAS`` or forced by
    :func:`fastattn.blas.use`); the CPU and the instruction-set features the routes
    can use; environment variables that limit a route (``OPENBLAS_CORETYPE``,
    ``MKL_*``: fastattn never sets them); Numba's version, its threading layer (once
    its threads have started: this function starts none) and thread count; where
    compiled kernels and the routes' figures are kept; and every process setting
    (:mod:`fastattn._runtime.settings`) with what it did.

    The BLAS route is chosen first if no call has chosen it yet (at most about
    0.1-0.3 s once per machine, to time the routes).

    Parameters
    ----------
    mode : {"stdout", "dicts"}, optional
        ``"stdout"`` (the default) prints the report; ``"dicts"`` returns it.

    Returns
    -------
    dict or None
        With ``mode="dicts"``: ``{"fastattn": ..., "blas": ..., "cpu": ...,
        "environment": ..., "numba": ..., "cache": ..., "process settings": ...}``
        (nested dicts of strings, numbers, booleans and None). None otherwise.

    Raises
    ------
    ValueError
        If ``mode`` is neither ``"stdout"`` nor ``"dicts"``.

    Examples
    --------
    >>> import fastattn
    >>> config = fastattn.show_config(mode="dicts")
    >>> config["blas"]["in use"] in ("mkl", "scipy")
    True
    >>> sorted(config["process settings"])  # doctest: +NORMALIZE_WHITESPACE
    ['libgomp loaded before the spin count', 'spin count', 'spin count took effect',
     'switches', 'threading layer priority']
    >>> fastattn.show_config()  # doctest: +SKIP
    fastattn:
      version: 0.1.0
    blas:
      in use: scipy
      reason: fastest measured on this machine (stored figures)
    ...
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'stdout' or 'dicts'; got {mode!r}")
    config = _collect()
    if mode == "dicts":
        return config
    print(_format(config))
    return None


def _collect():
    import fastattn

    return {
        "fastattn": {"version": fastattn.__version__, "location": os.path.dirname(
            os.path.abspath(fastattn.__file__))},
        "blas": _blas_routes(),
        "cpu": _cpu(),
        "environment": _route_environment(),
        "numba": _numba(),
        "cache": _cache_locations(),
        "process settings": _process_settings(),
    }


def _blas_routes():
    from fastattn import blas

    in_use = blas.current()  # chooses, measuring once per machine, if nothing has yet
    measurement = blas._measurement or _stored_figures()
    routes = {}
    for name, why_not in blas.available().items():
        route = {"usable": why_not is None}
        if why_not is None:
            route["library"] = blas._loaded[name].library
            route.update(_library_details(name, route["library"]))
        else:
            route["why not"] = why_not
        if measurement is not None and name in measurement["gflops"]:
            route["GFLOP/s"] = dict(measurement["gflops"][name])
        routes[name] = route
    report = {"in use": in_use["name"], "library": in_use["library"], "reason": blas._reason,
              "routes": routes}
    if measurement is not None:
        report["measurement"] = {
            "source": measurement["source"],
            "seconds": measurement.get("seconds"),
            "cache file": measurement.get("cache_file"),
            "one thread, shapes": "attention's block products, float32 and float64",
        }
    return report


def _stored_figures():
    """The figures stored for this machine and configuration (a route forced by name
    is not measured), or None; measures nothing."""
    from fastattn import blas
    from fastattn._runtime import routes

    libraries = {name: path for name, path in blas._route_libraries().items() if path}
    key = routes.machine_key(libraries)
    path = routes.cache_file(key)
    stored = routes.read_cached(path, key, libraries)
    return None if stored is None else dict(stored, source="cache file", cache_file=path)


def _library_details(route, library):
    """The version (and, for OpenBLAS, the CPU kernels it picked) of a loaded route's
    library; empty where it cannot be read."""
    import ctypes

    if route == "mkl":
        try:
            buffer = ctypes.create_string_buffer(256)
            ctypes.CDLL(library).MKL_Get_Version_String(buffer, len(buffer))
            return {"version": buffer.value.decode(errors="replace").strip()}
        except (OSError, AttributeError):
            return {}
    from threadpoolctl import ThreadpoolController

    for controller in ThreadpoolController().select(user_api="blas").lib_controllers:
        if os.path.basename(os.path.dirname(controller.filepath)).startswith("scipy"):
            details = {"version": f"{controller.internal_api} {controller.version}"}
            architecture = getattr(controller, "architecture", None)
            if architecture:
                details["CPU kernels"] = architecture
            return details
    return {}


def _cpu():
    from fastattn._runtime.routes import cpu_description, cpu_model

    flags = cpu_description().get("flags")
    if flags is None:
        features = {feature: "unknown" for feature in CPU_FEATURES}
    else:
        present = set(flags.split())
        features = {feature: feature in present for feature in CPU_FEATURES}
    return {"model": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(),
            "features": features, "16-bit inputs": SIXTEEN_BIT_ROUTE}


def _route_environment():
    """The environment variables set now that choose, change or limit a BLAS route
    (``FASTATTN_BLAS``, ``OPENBLAS_*``, ``MKL_*``; fastattn sets none of them), or
    ``{"none set": ...}``."""
    names = sorted(name for name in os.environ
                   if name == "FASTATTN_BLAS" or name.startswith(("MKL_", "OPENBLAS_")))
    if not names:
        return {"none set": "FASTATTN_BLAS, OPENBLAS_*, MKL_*"}
    return {name: os.environ[name] for name in names}


def _numba():
    import numba
    from numba.np.ufunc import parallel

    started = bool(parallel._is_initialized)
    report = {"version": numba.__version__, "threads started": started,
              "NUMBA_NUM_THREADS": numba.config.NUMBA_NUM_THREADS}
    report["threading layer"] = numba.threading_layer() if started else \
        "not started yet (chosen at the first kernel call)"
    report["threads per call"] = numba.get_num_threads() if started else \
        numba.config.NUMBA_NUM_THREADS
    return report


def _cache_locations():
    from fastattn._runtime.routes import cache_folder
    from fastattn.kernels.config import kernels_folder

    numba_cache = os.environ.get("NUMBA_CACHE_DIR")
    return {
        "compiled kernels": numba_cache or (
            os.path.join(kernels_folder(), "__pycache__")
            + " (or Numba's user-wide cache folder where that is not writable)"),
        "route figures": cache_folder(),
    }


def _process_settings():
    from fastattn._runtime import settings

    report = settings.report()
    report["switches"] = dict(settings.SWITCHES, all=settings.OPT_OUT_VARIABLE)
    return report


def _format(config, indent=0):
    lines = []
    for name, value in config.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{name}:")
            lines.append(_format(value, indent + 2))
        else:
            lines.append(" " * indent + f"{name}: {value}")
    return "\n".join(line for line in lines if line)
