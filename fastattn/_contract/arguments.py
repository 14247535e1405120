"""Checks of the arrays and small arguments of attention against a call's shapes:
dtypes, ``kv_lengths``, ALiBi slopes, the default scale and the diagonal offset
(the scalar options are checked by :mod:`fastattn._contract.options`).

Both implementations (the Numba kernels in :mod:`fastattn` and the NumPy
oracle in :mod:`reference`) call these, so an argument is accepted or refused
the same way, with the same message, whichever path a user takes.
"""

import math
import numbers

import numpy as np

# dtype kinds: b bool, i signed int, u unsigned int, f float.
_REAL_KINDS = "biuf"
_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)
# 16-bit float formats read as stored by the kernels' 16-bit variant, and the value of
# its half_format flag for each (fastattn.kernels.half.BFLOAT16, FLOAT16)
HALF_FORMATS = {"bfloat16": 0, "float16": 1}
_UINT16 = np.dtype(np.uint16)


def is_bfloat16(dtype):
    """Whether ``dtype`` is bfloat16 (``ml_dtypes.bfloat16``, the dtype NumPy users and
    JAX hold bfloat16 in); told by its name, so ml_dtypes need not be installed."""
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def half_format(*dtypes):
    """The kernels' ``half_format`` flag when all ``dtypes`` are one native 16-bit
    float dtype (bfloat16 or float16), read as stored; else None (float32, float64 and
    mixed inputs are converted to the compute dtype)."""
    first = dtypes[0]
    if first.itemsize != 2 or not first.isnative:  # float32 and float64 leave here
        return None
    if any(dtype != first for dtype in dtypes[1:]):
        return None
    return HALF_FORMATS.get(first.name)


def kernel_dtype(compute_dtype, *dtypes):
    """The kernels' variant for inputs of ``dtypes``: ``uint16`` (16-bit storage,
    computed in float32) when :func:`half_format` finds one 16-bit format, else
    ``compute_dtype``."""
    if dtypes[0].itemsize != 2:  # the common case, quickly
        return compute_dtype
    return _UINT16 if half_format(*dtypes) is not None else compute_dtype


def as_real_array(name, array):
    """Return ``array`` as an ndarray of a real dtype, or raise ``TypeError``.

    bfloat16 (``ml_dtypes.bfloat16``) counts as real. Complex, object, string and
    other non-numeric inputs (other ml_dtypes formats, such as float8, included) are
    refused rather than silently cast, since attention of such values has no meaning
    here.
    """
    array = np.asarray(array)
    if array.dtype.kind not in _REAL_KINDS and not is_bfloat16(array.dtype):
        raise TypeError(
            f"{name} must hold real numbers (bool, int, float or bfloat16); got dtype "
            f"{array.dtype}"
        )
    return array


def as_mask_array(mask):
    """Return ``mask`` as a boolean ndarray (True = may attend), or raise ``TypeError``."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(
            f"mask must be boolean (True = may attend); got dtype {mask.dtype}. "
            "To add real-valued scores (for example -inf for masked keys) pass them as bias="
        )
    return mask


def result_dtypes(*operands):
    """Choose the compute dtype and the output dtype of an attention call.

    Rules of the contract: float32 and float64 are computed natively; float16 and
    bfloat16 are computed in float32 and returned in their own dtype; integer and
    bool inputs are promoted to float64; mixed inputs follow ``np.result_type``
    (with ml_dtypes' promotions: bfloat16 with float16 or float32 gives float32).

    Parameters
    ----------
    *operands : ndarray or numpy.dtype
        The arrays that meet in the computation (query, key and value; the layers
        add their weights' dtype), or their dtypes.

    Returns
    -------
    compute_dtype, out_dtype : numpy.dtype
    """
    dtypes = [np.dtype(getattr(operand, "dtype", operand)) for operand in operands]
    common = dtypes[0]
    if any(dtype != common for dtype in dtypes[1:]):
        common = np.result_type(*dtypes)
    if common.kind in "biu":
        return _FLOAT64, _FLOAT64
    if not common.isnative:  # big-endian data: computed and returned in native order
        common = common.newbyteorder("=")
    if (common.kind == "f" and common.itemsize == 2) or is_bfloat16(common):
        return _FLOAT32, common
    if common.kind == "f" and common.itemsize in (4, 8):
        return common, common
    raise TypeError(
        f"the inputs (query, key and value) combine to dtype {common}, which is not "
        "supported; use bfloat16, float16, float32 or float64"
    )


def default_scale(scale, head_dim):
    """The softmax scale of a call: ``scale`` (a checked float) or, when None,
    ``1 / sqrt(head_dim)``; for ``head_dim == 0`` every score is an empty dot
    product (zero), and the default scale is taken as 1.0."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return scale

def diagonal_offset(causal_alignment, q_len, kv_len):
    """The diagonal offset ``off`` of the causal and window rules for a checked
    ``causal_alignment``.

    Key ``j`` lies on or below the diagonal of query ``i`` when ``j <= i + off``:
    ``"top_left"`` gives ``off = 0``, ``"bottom_right"`` gives ``off = Lk - Lq``.
    """
    return kv_len - q_len if causal_alignment == "bottom_right" else 0

def check_kv_lengths(kv_lengths, batch_shape, kv_len):
    """Return ``kv_lengths`` as a 1-D int64 array, one entry per first batch index.

    With no batch axes (2-D inputs) it must hold exactly one entry.
    """
    if kv_lengths is None:
        return None
    kv_lengths = np.asarray(kv_lengths)
    if kv_lengths.dtype.kind not in "iu":
        raise TypeError(f"kv_lengths must hold integers; got dtype {kv_lengths.dtype}")
    expected = batch_shape[0] if batch_shape else 1
    if kv_lengths.shape != (expected,):
        raise ValueError(
            f"kv_lengths must have shape ({expected},), one entry per index of the first "
            f"batch axis of batch shape {batch_shape}; got shape {kv_lengths.shape}"
        )
    if kv_lengths.size and (kv_lengths.min() < 0 or kv_lengths.max() > kv_len):
        raise ValueError(
            f"kv_lengths must lie in [0, Lk] = [0, {kv_len}]; "
            f"got values from {kv_lengths.min()} to {kv_lengths.max()}"
        )
    return kv_lengths.astype(np.int64)
