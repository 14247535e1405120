"""Checks shared by the layers: state_dict entries, sizes and inputs.

Dtype and mask rules come from :mod:`fastattn.checks`, so a layer accepts or refuses
an array the same way the kernel does.
"""

import numbers

from fastattn.checks.arguments import as_real_array


def check_state(owner, state, expected, prefix=""):
    """Validate the state_dict ``state`` against ``expected`` (name -> shape).

    ``state`` must hold exactly the names of ``expected``, each a real array of that
    shape. Nothing is assigned here, so a layer that loads only after every check
    has passed is left unchanged by a bad state_dict.

    Parameters
    ----------
    owner : str
        The layer's name, first in every message.
    state : mapping of str to array_like
    expected : dict of str to tuple of int
    prefix : str, optional
        Prepended to the names in messages (the part's prefix in an enclosing layer's
        state_dict, e.g. ``"self_attn."``).

    Returns
    -------
    dict of str to ndarray
        The arrays as given (``np.asarray``), not yet cast.

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
        arrays[name] = array
    return arrays


def check_size(name, size, minimum=1):
    """Return ``size`` as an int, or raise if it is not an int ``>= minimum``."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < minimum:
        kind = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be an int {kind}; got {size!r}")
    return int(size)
