"""Mask functions built from others: :func:`and_masks`, :func:`or_masks` and
:data:`noop_mask`, under FlexAttention's names.

A combination is itself a Numba-compiled ``mask_mod(b, h, i, j, *mask_mod_args)``:
it may be passed as ``mask_mod`` or to :func:`fastattn.create_block_mask`. Its
``mask_mod_args`` are its components' ``mask_mod_args`` concatenated in order (a
component taking two arrays takes the next two). Inside the kernels the components
are compiled into the combination's block hook, so a combination costs what the
same expression written by hand costs.

This module imports NumPy only; Numba loads when a combination is made.
"""

import inspect

__all__ = ["and_masks", "or_masks", "noop_mask"]


def and_masks(*mask_mods):
    r"""The mask function that lets query ``i`` see key ``j`` where every one of
    ``mask_mods`` does.

    .. math::

        \mathrm{and\_masks}(m_1, \dots, m_n)(b, h, i, j) = m_1(b, h, i, j) \wedge
        \dots \wedge m_n(b, h, i, j)

    Parameters
    ----------
    *mask_mods : numba-compiled functions ``(b, h, i, j, *mask_mod_args) -> bool``
        The components; with none, every key is visible.

    Returns
    -------
    numba dispatcher
        ``mask_mod(b, h, i, j, *mask_mod_args)``, its ``mask_mod_args`` those of
        the components concatenated in order.

    Raises
    ------
    TypeError
        Naming the component that is not a Numba-compiled function of at least
        ``(b, h, i, j)``.

    See Also
    --------
    or_masks, noop_mask, fastattn.create_block_mask

    Examples
    --------
    Causal attention within documents (``mask_mod_args``: the documents' ids):

    >>> import numba, numpy as np, fastattn
    >>> @numba.njit
    ... def causal(b, h, i, j):
    ...     return j <= i
    >>> @numba.njit
    ... def same_document(b, h, i, j, document_of):
    ...     return document_of[i] == document_of[j]
    >>> within_documents = fastattn.and_masks(causal, same_document)
    >>> document_of = np.repeat([0, 1], 64)               # two documents of 64 tokens
    >>> block_mask = fastattn.create_block_mask(within_documents, (1, 1), 128, 128,
    ...                                         block_size=32, mask_mod_args=(document_of,))
    >>> block_mask.sparsity()                             # 10 of 16 tiles are empty
    0.625
    """
    return _combined("and_masks", mask_mods, "&", "True")


def or_masks(*mask_mods):
    r"""The mask function that lets query ``i`` see key ``j`` where any one of
    ``mask_mods`` does.

    .. math::

        \mathrm{or\_masks}(m_1, \dots, m_n)(b, h, i, j) = m_1(b, h, i, j) \vee
        \dots \vee m_n(b, h, i, j)

    Parameters
    ----------
    *mask_mods : numba-compiled functions ``(b, h, i, j, *mask_mod_args) -> bool``
        The components; with none, no key is visible.

    Returns
    -------
    numba dispatcher
        ``mask_mod(b, h, i, j, *mask_mod_args)``, its ``mask_mod_args`` those of
        the components concatenated in order.

    Raises
    ------
    TypeError
        Naming the component that is not a Numba-compiled function of at least
        ``(b, h, i, j)``.

    See Also
    --------
    and_masks, noop_mask

    Examples
    --------
    A prefix-LM mask: the first 16 keys seen by every query, the rest causally.

    >>> import numba, numpy as np, fastattn
    >>> @numba.njit
    ... def causal(b, h, i, j):
    ...     return j <= i
    >>> @numba.njit
    ... def prefix(b, h, i, j, prefix_len):
    ...     return j < prefix_len[0]
    >>> prefix_lm = fastattn.or_masks(causal, prefix)
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 64, 8)) for _ in range(3))
    >>> out = fastattn.scaled_dot_product_attention(q, k, v, mask_mod=prefix_lm,
    ...                                             mask_mod_args=(np.array([16]),))
    >>> dense = (np.arange(64)[None, :] <= np.arange(64)[:, None]) | (np.arange(64) < 16)
    >>> bool(np.allclose(out, fastattn.scaled_dot_product_attention(q, k, v, dense)))
    True
    """
    return _combined("or_masks", mask_mods, "|", "False")


def _combined(name, mask_mods, operator, empty):
    """The Numba function ``operator``-ing ``mask_mods`` (``empty`` when there are
    none), each called with ``(b, h, i, j)`` and its share of the arguments.

    The function is written as source with one parameter per argument array, so
    that its arity is the one the checks and the kernels' hooks expect (they read
    its Python source and globals, where the components are found)."""
    from numba import njit
    from numba.extending import is_jitted

    counts = []
    for position, mask_mod in enumerate(mask_mods):
        if not is_jitted(mask_mod) or not hasattr(mask_mod, "py_func"):
            raise TypeError(f"{name}: argument {position} must be a Numba-compiled mask "
                            f"function (b, h, i, j, *mask_mod_args) -> bool (decorated with "
                            f"@numba.njit); got {mask_mod!r}")
        parameters = [p for p in inspect.signature(mask_mod.py_func).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(parameters) < 4:
            raise TypeError(f"{name}: argument {position} "
                            f"({mask_mod.py_func.__name__}) takes {len(parameters)} "
                            f"arguments; a mask function takes (b, h, i, j, "
                            f"*mask_mod_args)")
        counts.append(len(parameters) - 4)
    arguments = [f"arg{index}" for index in range(sum(counts))]
    calls, start = [], 0
    for position, count in enumerate(counts):
        passed = ", ".join(["b", "h", "i", "j"] + arguments[start:start + count])
        calls.append(f"mask{position}({passed})")
        start += count
    # bool operators without short-circuit: no branch in the hooks' loops
    body = f" {operator} ".join(f"bool({call})" for call in calls) if calls else empty
    function_name = f"{name[:-6]}_mask"  # and_mask, or_mask
    source = (f"def {function_name}({', '.join(['b', 'h', 'i', 'j'] + arguments)}):\n"
              f"    return {body}\n")
    names = {f"mask{position}": mask_mod for position, mask_mod in enumerate(mask_mods)}
    exec(compile(source, f"<fastattn.{name}>", "exec"), names)  # noqa: S102 - built above
    python_function = names[function_name]
    python_function.__qualname__ = function_name
    python_function.__doc__ = (f"{name}(" + ", ".join(
        getattr(mask_mod.py_func, "__name__", "?") for mask_mod in mask_mods) + ")")
    return njit(python_function)


def _every_key(b, h, i, j):
    """The mask function under which every key is visible: FlexAttention's
    ``noop_mask``, a Numba-compiled ``mask_mod(b, h, i, j) -> True``.

    A stand-in where a mask function is expected but nothing is hidden (a
    component of a combination, a default).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 16, 8)) for _ in range(3))
    >>> out = fastattn.scaled_dot_product_attention(q, k, v, mask_mod=fastattn.noop_mask)
    >>> bool(np.allclose(out, fastattn.scaled_dot_product_attention(q, k, v)))
    True
    >>> fastattn.noop_mask(0, 0, 3, 5)
    True
    """
    return True


_every_key.__name__ = _every_key.__qualname__ = "noop_mask"


def __getattr__(name):
    """``noop_mask``, compiled on first use (Numba loads then)."""
    if name == "noop_mask":
        from numba import njit

        globals()["noop_mask"] = njit(_every_key)
        return globals()["noop_mask"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
