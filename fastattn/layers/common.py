"""Checks shared by the layers: state_dict entries, sizes and inputs.

Dtype and mask rules come from :mod:`fastattn.checks`, so a layer accepts or refuses
an array the same way the kernel does.
"""

import numbers

import numpy as np

from fastattn._contract.arguments import as_real_array, result_dtypes


def check_state(owner, state, expected, dtype, prefix=""):
    """Validate the state_dict ``state`` against ``expected`` (name -> shape) and
    return its arrays cast to the layer's ``dtype``.

    ``state`` must hold exactly the names of ``expected``, each a real array of that
    shape. Nothing is assigned here, so a layer that loads only after every check
    has passed is left unchanged by a bad state_dict.

    Parameters
    ----------
    owner : str
        The layer's name, first in every message.
    state : mapping of str to array_like
    expected : dict of str to tuple of int
    dtype : numpy.dtype
        The layer's parameter dtype.
    prefix : str, optional
        Prepended to the names in messages (the part's prefix in an enclosing layer's
        state_dict, e.g. ``"self_attn."``).

    Returns
    -------
    dict of str to ndarray
        New arrays of ``dtype``, not yet assigned to the layer.

    Raises
    ------
    ValueError
        For missing or unexpected names, or an array of the wrong shape; the message
        names the key.
    TypeError
        For an array that does not hold real numbers (complex, object, string).
    """
    missing = sorted(prefix + name for name in set(expected) - set(state))
    extra = sorted(prefix + name for name in set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{owner}: state_dict keys do not match; missing {missing}, "
                         f"unexpected {extra}")
    arrays = {}
    for name, shape in expected.items():
        array = as_real_array(f"{owner}: state_dict[{prefix + name!r}]", state[name])
        if array.shape != shape:
            raise ValueError(f"{owner}: state_dict[{prefix + name!r}] must have shape {shape}; "
                             f"got {array.shape}")
        arrays[name] = array.astype(dtype)  # always a copy: the layer owns its weights
    return arrays


def check_size(name, size, minimum=1):
    """Return ``size`` as an int, or raise if it is not an int ``>= minimum``."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}; got {size!r}")
    return int(size)


def check_dtype(dtype):
    """Return ``dtype`` as a NumPy dtype, float32 or float64, or raise ``TypeError``."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64; got {dtype}")
    return dtype


def layer_input(owner, name, array, width, weights_dtype):
    """Return an input ``(..., width)`` as an ndarray in the layer's compute dtype.

    The compute dtype follows the kernel's dtype rules with the weights as one more
    operand: ``np.result_type`` of the weights and the input, so a float64 input to a
    float32 layer is computed in float64, an integer one in float64 (its own dtype
    with float32 weights), a float16 or bool one in the weights' dtype.

    Raises
    ------
    TypeError
        For an input that does not hold real numbers (complex, object, string).
    ValueError
        For an input whose last dim is not ``width``.
    """
    array = as_real_array(name, array)
    if array.shape[-1:] != (width,):
        raise ValueError(f"{owner} expects a last dim of {width}; got {name} of shape "
                         f"{array.shape}")
    return array.astype(result_dtypes(weights_dtype, array)[0], copy=False)
