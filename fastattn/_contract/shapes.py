"""Shape rules of attention: matrix dims, batch broadcasting, grouped-query heads,
mask and bias shapes.

Shapes, as in ../shared/API.md::

    query (*batch, Lq, Dk)    key (*batch, Lk, Dk)    value (*batch, Lk, Dv)
    mask, bias broadcastable to (*batch, Lq, Lk)

The batch dims of query, key, value, mask and bias broadcast together by NumPy's
rules. Under grouped-query attention axis -3 is the head axis: query has ``Hq``
heads, key and value ``Hkv``, and query head ``h`` reads kv head ``h // (Hq // Hkv)``.
"""

import numpy as np


def matrix_dims(query, key, value):
    """Return ``(Lq, Lk, Dk, Dv)`` after checking the last two axes of the inputs."""
    for name, array in (("query", query), ("key", key), ("value", value)):
        if array.ndim < 2:
            raise ValueError(
                f"{name} must have at least 2 dims (..., L, D); got shape {array.shape}"
            )
    q_len, head_dim = query.shape[-2:]
    kv_len, key_dim = key.shape[-2:]
    value_len, value_dim = value.shape[-2:]
    if key_dim != head_dim:
        raise ValueError(
            f"query and key must share their last dim Dk; got query {query.shape} "
            f"(Dk={head_dim}) and key {key.shape} (Dk={key_dim})"
        )
    if value_len != kv_len:
        raise ValueError(
            f"key and value must share Lk (axis -2); got key {key.shape} (Lk={kv_len}) "
            f"and value {value.shape} (Lk={value_len})"
        )
    return q_len, kv_len, head_dim, value_dim


def check_score_operand(name, array, q_len, kv_len):
    """Check that a mask or bias has trailing dims broadcastable to ``(Lq, Lk)``.

    Returns the array with at least 2 dims (leading 1s added as NumPy would).
    """
    if array.ndim < 2:
        array = array.reshape((1,) * (2 - array.ndim) + array.shape)
    rows, cols = array.shape[-2:]
    if rows not in (1, q_len) or cols not in (1, kv_len):
        raise ValueError(
            f"{name} of shape {array.shape} does not broadcast to (*batch, Lq, Lk) with "
            f"Lq={q_len}, Lk={kv_len}: its last two dims must be 1 or {q_len}, and 1 or {kv_len}"
        )
    return array


def gqa_group_size(query, key, value, enable_gqa):
    """Return how many query heads share one kv head (1 without grouping)."""
    if not enable_gqa:
        return 1
    for name, array in (("query", query), ("key", key), ("value", value)):
        if array.ndim < 3:
            raise ValueError(
                f"enable_gqa=True needs a head axis (axis -3) on query, key and value; "
                f"got {name} of shape {array.shape}"
            )
    q_heads, key_heads, value_heads = query.shape[-3], key.shape[-3], value.shape[-3]
    if key_heads != value_heads:
        raise ValueError(
            f"under enable_gqa key and value must have the same number of heads (axis -3); "
            f"got key {key.shape} and value {value.shape}"
        )
    if key_heads == 0 or q_heads % key_heads:
        raise ValueError(
            f"under enable_gqa the query heads Hq={q_heads} must be a multiple of the kv "
            f"heads Hkv={key_heads}; got query {query.shape} and key {key.shape}"
        )
    return q_heads // key_heads


def kv_batch_as_query_heads(array, group):
    """Batch shape of a key or value as seen by the query heads under GQA.

    With ``group > 1`` the kv head axis ``Hkv`` stands for ``Hkv * group`` query
    heads; otherwise the batch shape is the array's own.
    """
    batch = array.shape[:-2]
    if group == 1:
        return batch
    return batch[:-1] + (batch[-1] * group,)


def broadcast_batch(query, key, value, mask, bias, group):
    """Broadcast the batch dims of every operand together, or raise ``ValueError``.

    Returns the batch shape ``(*batch)`` of the output.
    """
    operands = [
        ("query", query.shape[:-2]),
        ("key", kv_batch_as_query_heads(key, group)),
        ("value", kv_batch_as_query_heads(value, group)),
    ]
    if mask is not None:
        operands.append(("mask", mask.shape[:-2]))
    if bias is not None:
        operands.append(("bias", bias.shape[:-2]))
    if all(batch == operands[0][1] for _, batch in operands):  # the common case, cheaply
        return operands[0][1]
    try:
        return tuple(np.broadcast_shapes(*(batch for _, batch in operands)))
    except ValueError:
        listed = ", ".join(f"{name} {batch}" for name, batch in operands)
        raise ValueError(
            f"batch dims do not broadcast together (shapes without the last two axes"
            f"{', kv heads counted as query heads' if group > 1 else ''}): {listed}"
        ) from None


def sum_to_shape(grad, shape, group=1):
    """Sum a gradient of the broadcast shape back to an input's own ``shape``: the
    reverse of :func:`stack_operand`'s broadcasting.

    ``grad`` is ``(*batch, L, D)``. Under grouped-query attention (``group > 1``) the
    head axis (-3) holds ``Hkv * group`` query heads, and each kv head's group is
    summed first; then every batch axis the input broadcast along (missing or of
    size 1 in ``shape``) is summed.
    """
    if group > 1:
        heads = grad.shape[-3] // group
        grad = grad.reshape(grad.shape[:-3] + (heads, group) + grad.shape[-2:])  # (..., Hkv, g, L, D)
        grad = grad.sum(axis=-3)  # (..., Hkv, L, D)
    extra = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra))) if extra else grad  # drop leading batch axes
    ones = tuple(axis for axis, size in enumerate(shape) if size == 1 and grad.shape[axis] != 1)
    return grad.sum(axis=ones, keepdims=True) if ones else grad  # (*shape)
