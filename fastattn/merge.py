r"""Merge attention results computed over disjoint key sets of the same queries.

Attention splits exactly along the keys: if the keys are cut into sets
:math:`K_1, \dots, K_n` and each part gives its output :math:`O_s` and log-sum-exp
:math:`\ell_s` (``return_lse=True``), the attention over all the keys is

.. math::

    \ell = \log \sum_s e^{\ell_s}, \qquad O = \sum_s e^{\ell_s - \ell}\, O_s .

This is how split-KV decoding, ring attention and :mod:`fastattn.dask` combine
partial results. The module needs NumPy only.
"""

import numpy as np

__all__ = ["merge_attention"]


def merge_attention(outs, lses):
    r"""Combine attention results over disjoint key sets into the result over all keys.

    .. math::

        \mathrm{lse} = \log \sum_s \exp(\mathrm{lse}_s), \qquad
        \mathrm{out} = \sum_s \exp(\mathrm{lse}_s - \mathrm{lse})\, \mathrm{out}_s

    computed as :math:`m = \max_s \mathrm{lse}_s`, :math:`w_s = e^{\mathrm{lse}_s - m}`,
    :math:`\mathrm{out} = \sum_s w_s \mathrm{out}_s / \sum_s w_s`,
    :math:`\mathrm{lse} = m + \log \sum_s w_s`, so no exponential overflows.

    Parameters
    ----------
    outs : sequence of array_like, each of shape ``(*batch, Lq, Dv)``
        Outputs of :func:`fastattn.scaled_dot_product_attention` for the same
        queries, each over its own set of keys. All parts have the same shape.
    lses : sequence of array_like, each of shape ``(*batch, Lq)``
        The matching log-sum-exps (``return_lse=True``), one per part.

    Returns
    -------
    out : ndarray, shape ``(*batch, Lq, Dv)``
    lse : ndarray, shape ``(*batch, Lq)``

    Raises
    ------
    TypeError
        If a part is not of a real dtype (complex, object, string).
    ValueError
        If ``outs`` and ``lses`` are empty or differ in length, if the parts' shapes
        differ or an lse is not ``out.shape[:-1]``, or if an lse holds ``+inf``
        (no attention row has an infinite log-sum-exp).

    Notes
    -----
    A part whose lse is ``-inf`` for a row (it saw no key there) weighs nothing for
    that row, whatever its output holds; a row that no part sees gives output 0 and
    lse ``-inf``, never NaN. A NaN lse gives NaN in its row. The dtype rules are the
    attention kernel's, applied to all the parts together: float32 and float64 are
    computed natively, float16 in float32 and returned as float16, integer and bool
    inputs in float64, mixed inputs follow ``np.result_type``. Inputs are never
    modified. The extra memory is two arrays of the output's size.

    See Also
    --------
    fastattn.scaled_dot_product_attention : gives the parts, with ``return_lse=True``.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 8, 16)) for _ in range(3))
    >>> parts = [fastattn.scaled_dot_product_attention(q, k[:, :5], v[:, :5], return_lse=True),
    ...          fastattn.scaled_dot_product_attention(q, k[:, 5:], v[:, 5:], return_lse=True)]
    >>> out, lse = fastattn.merge_attention(*zip(*parts))
    >>> bool(np.allclose(out, fastattn.scaled_dot_product_attention(q, k, v)))
    True
    """
    outs, lses = _check_parts(outs, lses)
    compute_dtype, out_dtype = _merge_dtypes(outs + lses)

    row_max = np.full(lses[0].shape, -np.inf, compute_dtype)  # (*batch, Lq) m
    for lse in lses:
        np.maximum(row_max, lse, out=row_max, casting="unsafe")
    seen = row_max != -np.inf  # (*batch, Lq) rows some part sees (NaN rows count as seen)
    shift = np.where(seen, row_max, 0)  # (*batch, Lq) m, or 0 where every lse is -inf

    weight_sum = np.zeros(lses[0].shape, compute_dtype)  # (*batch, Lq) sum_s w_s
    out = np.zeros(outs[0].shape, compute_dtype)  # (*batch, Lq, Dv) sum_s w_s out_s
    for part_out, lse in zip(outs, lses):
        weight = np.exp(lse.astype(compute_dtype, copy=False) - shift)  # (*batch, Lq) w_s
        sees = lse != -np.inf  # (*batch, Lq); a NaN lse stays in, as NaN
        weight_sum += np.where(sees, weight, 0)
        part = np.where(sees[..., None], part_out, 0)  # (*batch, Lq, Dv) -inf rows weigh nothing
        out += weight[..., None] * part
    with np.errstate(divide="ignore", invalid="ignore"):
        out /= np.where(seen, weight_sum, 1)[..., None]
        lse = np.where(seen, shift + np.log(weight_sum), -np.inf)  # (*batch, Lq)
    return out.astype(out_dtype, copy=False), lse.astype(out_dtype, copy=False)


def _check_parts(outs, lses):
    """Return the parts as two lists of ndarrays after checking kinds and shapes."""
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(
            "outs and lses must be non-empty sequences of the same length, one (out, lse) "
            f"pair per key set; got {len(outs)} outs and {len(lses)} lses")
    outs = [_as_real("outs", index, part) for index, part in enumerate(outs)]
    lses = [_as_real("lses", index, part) for index, part in enumerate(lses)]
    shape = outs[0].shape
    if len(shape) < 2:
        raise ValueError(f"outs[0] must have at least 2 dims (*batch, Lq, Dv); got shape {shape}")
    for index, (out, lse) in enumerate(zip(outs, lses)):
        if out.shape != shape:
            raise ValueError(f"every out must have the shape of outs[0] {shape} (*batch, Lq, Dv); "
                             f"got outs[{index}] of shape {out.shape}")
        if lse.shape != shape[:-1]:
            raise ValueError(f"lses[{index}] must have shape {shape[:-1]} (*batch, Lq), the "
                             f"shape of outs without its last axis; got {lse.shape}")
        if lse.dtype.kind == "f" and np.isposinf(lse).any():
            raise ValueError(f"lses[{index}] holds +inf; a log-sum-exp of attention scores is "
                             "finite, or -inf for a row that sees no key")
    return outs, lses


def _as_real(name, index, array):
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name}[{index}] must hold real numbers (bool, int or float); "
                        f"got dtype {array.dtype}")
    return array


def _merge_dtypes(arrays):
    """``(compute_dtype, out_dtype)`` of the parts, by the attention kernel's rules."""
    common = np.result_type(*(array.dtype for array in arrays))
    if common.kind in "biu":
        return np.dtype(np.float64), np.dtype(np.float64)
    if common.itemsize == 2:
        return np.dtype(np.float32), common
    if common.itemsize in (4, 8):
        common = common.newbyteorder("=")
        return common, common
    raise TypeError(f"the parts combine to dtype {common}, which is not supported; use "
                    "float16, float32 or float64")
