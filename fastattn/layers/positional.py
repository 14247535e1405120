"""Sinusoidal positional encoding: how a Transformer tells "lion kills tiger" from
"tiger kills lion", since attention itself ignores word order."""

import numpy as np

from fastattn.layers.common import check_size


def sinusoidal_positional_encoding(length, d_model, *, base=10000.0, dtype=np.float32):
    r"""Positional encodings ``(length, d_model)`` to add to token embeddings.

    .. math::

        PE_{pos,\,2i} = \sin\!\left(pos / base^{2i/d}\right), \qquad
        PE_{pos,\,2i+1} = \cos\!\left(pos / base^{2i/d}\right)

    Parameters
    ----------
    length : int
        Number of positions (``>= 0``).
    d_model : int
        Embedding width (``>= 0``); an odd width ends with a sine column.
    base : float, default 10000.0
        Positive; larger bases give slower frequencies.
    dtype : dtype, default float32

    Returns
    -------
    ndarray, shape ``(length, d_model)``

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> encoding = fastattn.sinusoidal_positional_encoding(50, 8)
    >>> encoding.shape, encoding.dtype
    ((50, 8), dtype('float32'))
    >>> encoding[0]                                   # position 0: sin 0 = 0, cos 0 = 1
    array([0., 1., 0., 1., 0., 1., 0., 1.], dtype=float32)

    Every position gets its own code, so embeddings plus encodings tell word orders
    apart, which attention alone cannot:

    >>> len({tuple(row) for row in encoding})
    50
    """
    length, d_model = check_size("length", length, 0), check_size("d_model", d_model, 0)
    if not base > 0:
        raise ValueError(f"base must be positive; got {base!r}")
    positions = np.arange(length, dtype=np.float64)[:, None]  # (length, 1)
    pair_index = np.arange(0, d_model, 2, dtype=np.float64)  # (ceil(d/2),) the 2i of each pair
    angles = positions / base ** (pair_index / d_model)  # (length, ceil(d/2))
    encoding = np.empty((length, d_model), dtype=np.float64)  # (length, d_model)
    encoding[:, 0::2] = np.sin(angles)  # even columns
    encoding[:, 1::2] = np.cos(angles[:, : d_model // 2])  # odd columns
    return encoding.astype(dtype)
