"""Checks of the user score functions ``score_mod``, ``mask_mod``, ``score_mod_grad``
and ``score_mod_args_grad``: Numba-compiled, of the right arity for the arrays passed
to them (``score_mod_args``, ``mask_mod_args``), returning the right kind of value;
and checks of those arrays.

Numba is imported only when a function is given, so that :mod:`fastattn._contract.problem`
(and the reference) import NumPy only in calls without user functions.
"""

import functools
import inspect

import numpy as np

# name -> (the call it must accept, what it must return, an example)
_FUNCTIONS = {
    "score_mod": ("(s, b, h, i, j, *score_mod_args)", "a real number (the new score)",
                  "@numba.njit\ndef score_mod(s, b, h, i, j):\n    return s - 0.1 * abs(i - j)"),
    "score_mod_grad": ("(s, b, h, i, j, *score_mod_args)",
                       "a real number (d score_mod / d s)",
                       "@numba.njit\ndef score_mod_grad(s, b, h, i, j):\n    return 1.0"),
    "mask_mod": ("(b, h, i, j, *mask_mod_args)", "a bool (True = may attend)",
                 "@numba.njit\ndef mask_mod(b, h, i, j):\n    return j <= i"),
    "score_mod_args_grad": (
        "(g, s, b, h, i, j, grads, *score_mod_args)",
        "nothing (it adds g * d score_mod / d arg into the arrays of grads)",
        "@numba.njit\ndef score_mod_args_grad(g, s, b, h, i, j, grads, table):\n"
        "    grads[0][h, i - j + table.shape[1] // 2] += g"),
}
# the parameters before the user's arrays
_LEADING = {"score_mod": 5, "score_mod_grad": 5, "mask_mod": 4, "score_mod_args_grad": 7}


def check_function_args(name, args, function_name):
    """The arrays ``args`` passed to the user function ``function_name`` as the
    option ``name`` (``score_mod_args``, ``mask_mod_args``): a tuple of C-contiguous
    NumPy arrays of bool, integer or float32/float64 (a copy only for another
    layout), or ``()`` for None.

    Raises
    ------
    TypeError
        Naming ``name``: not a tuple or list, or an array of another dtype.
    """
    if args is None:
        return ()
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of NumPy arrays (the trailing parameters "
                        f"of {function_name}); got {type(args).__name__}. For one array "
                        f"pass {name}=(array,)")
    arrays = []
    for position, array in enumerate(args):
        array = np.asarray(array)
        if array.dtype.kind not in "biuf" or array.dtype == np.float16:
            raise TypeError(f"{name}[{position}] must hold bool, integer, float32 or float64 "
                            f"values; got dtype {array.dtype}")
        arrays.append(array if array.flags.c_contiguous else array.copy(order="C"))
    return tuple(arrays)


def check_score_function(name, function, dtype, args=()):
    """Check the user function ``name`` (``score_mod``, ``score_mod_grad``,
    ``mask_mod`` or ``score_mod_args_grad``) for scores of ``dtype`` and the arrays
    ``args`` passed after its own parameters; returns it, or None for None.

    It must be a Numba-compiled function (``numba.njit``) taking ``(s, b, h, i, j,
    *args)`` (``(b, h, i, j, *args)`` for ``mask_mod``, ``(g, s, b, h, i, j, grads,
    *args)`` for ``score_mod_args_grad``, ``grads`` a tuple of arrays shaped like
    ``args``) and returning a real number (a bool for ``mask_mod``, nothing for
    ``score_mod_args_grad``) when ``s`` has the compute dtype and the indices are
    int64. It is compiled for those types here, once per function, dtype and the
    arrays' dtypes and dimensions.

    Raises
    ------
    TypeError
        Naming the argument and showing how to write such a function.
    """
    if function is None:
        return None
    kinds = tuple((array.dtype, array.ndim) for array in args)
    return _checked(name, function, np.dtype(dtype), kinds)


@functools.lru_cache(maxsize=256)
def _checked(name, function, dtype, kinds):
    from numba import from_dtype, types
    from numba.core.errors import TypingError
    from numba.extending import is_jitted

    call, returns, example = _FUNCTIONS[name]

    def refuse(problem):
        return TypeError(f"{name} must be a Numba-compiled function {call} returning "
                         f"{returns}; {problem}. For example:\n\n{example}\n")

    if not is_jitted(function) or not hasattr(function, "py_func"):
        raise refuse(f"got {function!r}, which is not decorated with @numba.njit")
    parameters = inspect.signature(function.py_func).parameters.values()
    arity = _LEADING[name] + len(kinds)
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != arity:
        passed = f" ({len(kinds)} from the arrays passed to it)" if kinds else ""
        raise refuse(f"{function.py_func.__name__} takes {len(positional)} arguments, "
                     f"not {arity}{passed}")
    score = types.float32 if dtype == np.float32 else types.float64
    arrays = tuple(types.Array(from_dtype(array_dtype), ndim, "C") for array_dtype, ndim in kinds)
    if name == "mask_mod":
        argument_types = (types.int64,) * 4 + arrays
    elif name == "score_mod_args_grad":
        grads = types.BaseTuple.from_types(tuple(types.Array(score, ndim, "C")
                                                 for _, ndim in kinds))
        argument_types = (score, score) + (types.int64,) * 4 + (grads,) + arrays
    else:
        argument_types = (score,) + (types.int64,) * 4 + arrays
    compiled = function
    if function.py_func.__kwdefaults__:  # as the kernels compile it (Numba cannot call
        from numba import njit  # keyword-only parameters)

        from fastattn.kernels.hooks import keywords_as_positional

        positional = keywords_as_positional(function.py_func)
        compiled = njit(positional)
        omitted = positional.__code__.co_argcount - len(argument_types)  # the defaults
        if 0 < omitted <= len(positional.__defaults__ or ()):
            argument_types += tuple(types.Omitted(default)
                                    for default in positional.__defaults__[-omitted:])
    try:
        compiled.compile(argument_types)
    except TypingError as error:
        raise refuse(f"it does not compile for {argument_types}:\n{error}") from None
    if name == "score_mod_args_grad":
        return function
    returned = compiled.overloads[argument_types].signature.return_type
    wanted = types.Boolean if name == "mask_mod" else (types.Float, types.Integer)
    if not isinstance(returned, wanted) or (name != "mask_mod"
                                            and isinstance(returned, types.Boolean)):
        raise refuse(f"it returns {returned}")
    return function
