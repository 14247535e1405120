"""The thread-count functions of the BLAS that the kernels call through SciPy (private).

Used by :class:`fastattn._runtime.threads.single_threaded_blas` around kernel calls
and by :func:`fastattn._runtime.routes.measure`, both of which keep that BLAS at one
thread while they run.
"""

import ctypes
import functools
import os


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
def blas_thread_functions():
    """``(get, set)`` thread-count functions of the BLAS that the kernels call.

    The kernels' SciPy backend is ``scipy.linalg.cython_blas``; importing it loads that
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
