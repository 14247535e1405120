"""Checks of the user score functions ``score_mod``, ``mask_mod`` and
``score_mod_grad``: Numba-compiled, of the right arity, returning the right kind
of value.

Numba is imported only when a function is given, so that :mod:`fastattn._contract.problem`
(and the reference) import NumPy only in calls without user functions.
"""

import functools
import inspect

import numpy as np

# name -> (the call it must accept, what it must return, an example)
_FUNCTIONS = {
    "score_mod": ("(s, b, h, i, j)", "a real number (the new score)",
                  "@numba.njit\ndef score_mod(s, b, h, i, j):\n    return s - 0.1 * abs(i - j)"),
    "score_mod_grad": ("(s, b, h, i, j)", "a real number (d score_mod / d s)",
                       "@numba.njit\ndef score_mod_grad(s, b, h, i, j):\n    return 1.0"),
    "mask_mod": ("(b, h, i, j)", "a bool (True = may attend)",
                 "@numba.njit\ndef mask_mod(b, h, i, j):\n    return j <= i"),
}


def check_score_function(name, function, dtype):
    """Check the user function ``name`` (``score_mod``, ``score_mod_grad`` or
    ``mask_mod``) for scores of ``dtype``; returns it, or None for None.

    It must be a Numba-compiled function (``numba.njit``) taking ``(s, b, h, i, j)``
    (``(b, h, i, j)`` for ``mask_mod``) and returning a real number (a bool for
    ``mask_mod``) when ``s`` has the compute dtype and the indices are int64. It is
    compiled for those types here, once per function and dtype.

    Raises
    ------
    TypeError
        Naming the argument and showing how to write such a function.
    """
    if function is None:
        return None
    return _checked(name, function, np.dtype(dtype))


@functools.lru_cache(maxsize=256)
def _checked(name, function, dtype):
    from numba import types
    from numba.core.errors import TypingError
    from numba.extending import is_jitted

    call, returns, example = _FUNCTIONS[name]

    def refuse(problem):
        return TypeError(f"{name} must be a Numba-compiled function {call} returning "
                         f"{returns}; {problem}. For example:\n\n{example}\n")

    if not is_jitted(function) or not hasattr(function, "py_func"):
        raise refuse(f"got {function!r}, which is not decorated with @numba.njit")
    parameters = inspect.signature(function.py_func).parameters.values()
    arity = call.count(",") + 1
    if len([p for p in parameters
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) != arity:
        raise refuse(f"{function.py_func.__name__} takes {len(parameters)} arguments, "
                     f"not {arity}")
    score = types.float32 if dtype == np.float32 else types.float64
    argument_types = (types.int64,) * 4 if name == "mask_mod" else (score,) + (types.int64,) * 4
    try:
        function.compile(argument_types)
    except TypingError as error:
        raise refuse(f"it does not compile for {argument_types}:\n{error}") from None
    returned = function.overloads[argument_types].signature.return_type
    wanted = types.Boolean if name == "mask_mod" else (types.Float, types.Integer)
    if not isinstance(returned, wanted) or (name != "mask_mod"
                                            and isinstance(returned, types.Boolean)):
        raise refuse(f"it returns {returned}")
    return function
