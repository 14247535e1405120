"""Block masks: a ``mask_mod`` evaluated once, summarised per tile of the kernels'
loops, so that calls skip the tiles nobody may see.

:func:`create_block_mask` evaluates ``mask_mod(b, h, i, j)`` over every batch entry,
query and key, and records for each tile of ``block_size`` queries by
``block_size`` keys whether it is :data:`EMPTY` (no key visible: skipped),
:data:`FULL` (every key visible: no per-element calls) or :data:`PARTIAL` (the
kernel calls ``mask_mod`` on its elements). The kernels then use the mask's tiles
as their blocks. FlexAttention's ``create_block_mask`` and ``BlockMask`` do the same
on the GPU.

This module imports NumPy only; the evaluation kernel loads on first use.
"""

import math
import operator
from dataclasses import dataclass

import numpy as np

from fastattn._contract.functions import check_function_args, check_score_function
from fastattn.kernels.tile_states import EMPTY, FULL, PARTIAL

__all__ = ["BlockMask", "create_block_mask", "EMPTY", "PARTIAL", "FULL"]

DEFAULT_BLOCK_SIZE = 128


@dataclass(frozen=True, eq=False)
class BlockMask:
    """A ``mask_mod`` with its tile summary, from :func:`create_block_mask`.

    Attributes
    ----------
    mask_mod : numba dispatcher
        ``mask_mod(b, h, i, j) -> bool``, True = may attend.
    batch_shape : tuple of int
        The batch shape it was made for: it serves the calls whose batch shape this
        one broadcasts to.
    q_len, kv_len : int
        ``Lq`` and ``Lk`` of those calls.
    block_size : (int, int)
        Queries and keys per tile.
    states : ndarray of int8, shape ``(prod(batch_shape), q tiles, key tiles)``
        :data:`EMPTY`, :data:`PARTIAL` or :data:`FULL` for each tile (read-only).
    mask_mod_args : tuple of ndarray
        The arrays passed to ``mask_mod`` after ``(b, h, i, j)`` (empty if none),
        read in place by the calls it serves: the states describe them as they were
        when the mask was made.

    Examples
    --------
    >>> import numba, fastattn
    >>> @numba.njit
    ... def causal(b, h, i, j):
    ...     return j <= i
    >>> block_mask = fastattn.create_block_mask(causal, (1, 2), 512, 512)
    >>> block_mask.states.shape                     # (entries, query tiles, key tiles)
    (2, 4, 4)
    >>> block_mask.sparsity()                       # tiles above the diagonal are skipped
    0.375
    """

    mask_mod: object
    batch_shape: tuple
    q_len: int
    kv_len: int
    block_size: tuple
    states: np.ndarray
    mask_mod_args: tuple = ()

    def sparsity(self):
        """Fraction of tiles that are empty (skipped), in ``[0, 1]``."""
        return float(np.mean(self.states == EMPTY)) if self.states.size else 0.0

    def __repr__(self):
        counts = np.bincount(self.states.ravel(), minlength=3)
        return (f"BlockMask(batch_shape={self.batch_shape}, q_len={self.q_len}, "
                f"kv_len={self.kv_len}, block_size={self.block_size}, tiles: "
                f"{counts[EMPTY]} empty, {counts[PARTIAL]} partial, {counts[FULL]} full)")


def create_block_mask(mask_mod, batch_shape, q_len, kv_len, *, block_size=DEFAULT_BLOCK_SIZE,
                      mask_mod_args=None):
    """Evaluate ``mask_mod`` over a whole problem and summarise it per tile.

    Parameters
    ----------
    mask_mod : numba-compiled function ``(b, h, i, j) -> bool``
        True where query ``i`` may attend to key ``j`` of batch entry ``(b, h)``
        (the convention of ``score_mod``: with two or more batch axes ``h`` indexes
        the last one and ``b`` the others, flattened in C order; with one, ``b``
        indexes it and ``h = 0``; with none both are 0).
    batch_shape : tuple of int
        The broadcast batch shape of the calls (``(B, H)`` for ``(B, H, L, D)``
        inputs), or a shape that broadcasts to it: an axis of size 1 (``(1, 1)``,
        FlexAttention's ``B=None, H=None``) serves every index of the calls' axis,
        with ``mask_mod`` evaluated and the tiles stored once for it; ``mask_mod``
        then sees the mask's own ``(b, h)``, 0 along such an axis.
    q_len, kv_len : int
        ``Lq`` and ``Lk``.
    block_size : int or (int, int), default 128
        Queries and keys per tile: the kernels' blocks in calls with this mask.
        Smaller tiles skip more of a ragged mask; larger ones make faster block
        products.
    mask_mod_args : tuple of arrays, optional
        Arrays passed to ``mask_mod`` after ``(b, h, i, j)`` (document ids, say), as
        the ``mask_mod_args`` option: new values compile nothing. The block mask
        carries them to the calls it serves.

    Returns
    -------
    BlockMask
        Pass it as ``block_mask=`` (it carries its ``mask_mod``) to
        :func:`fastattn.scaled_dot_product_attention` and its backward, for any call
        of ``Lq`` and ``Lk`` whose batch shape ``batch_shape`` broadcasts to.

    Notes
    -----
    ``mask_mod`` is evaluated ``prod(batch_shape) * Lq * Lk`` times, in parallel
    (about 1 ns each for simple functions), a few rows of a tile at a time (a tile
    found partial is not evaluated further); the result holds one byte per tile. A
    mask made for ``(1, 1)`` costs ``1 / (B * H)`` of the one made for ``(B, H)``.

    Examples
    --------
    A sliding window of 64 keys, causal, for 4 heads of 512 tokens:

    >>> import numba, numpy as np, fastattn
    >>> @numba.njit
    ... def sliding_window(b, h, i, j):
    ...     return i - 64 < j <= i
    >>> window = fastattn.create_block_mask(sliding_window, (1, 4), 512, 512)
    >>> window
    BlockMask(batch_shape=(1, 4), q_len=512, kv_len=512, block_size=(128, 128), tiles: 36 empty, 28 partial, 0 full)
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 4, 512, 16)) for _ in range(3))
    >>> out = fastattn.scaled_dot_product_attention(q, k, v, block_mask=window)
    >>> same = fastattn.scaled_dot_product_attention(q, k, v, causal=True, window=(63, 0))
    >>> bool(np.allclose(out, same))
    True
    """
    mask_mod_args = check_function_args("mask_mod_args", mask_mod_args, "mask_mod")
    mask_mod = check_score_function("mask_mod", mask_mod, np.float64, mask_mod_args)
    batch_shape = _check_sizes("batch_shape", batch_shape)
    q_len, kv_len = _check_sizes("q_len", (q_len,))[0], _check_sizes("kv_len", (kv_len,))[0]
    block_size = (block_size,) * 2 if np.ndim(block_size) == 0 else tuple(block_size)
    sizes = _check_sizes("block_size", block_size)
    if len(sizes) != 2 or min(sizes) < 1:
        raise ValueError(f"block_size must be a positive int or a pair of them; "
                         f"got {block_size!r}")
    block_q, block_k = sizes
    from fastattn.kernels.block_states import evaluate_block_states

    n_batch = math.prod(batch_shape)
    heads = batch_shape[-1] if len(batch_shape) >= 2 else 1
    states = np.zeros((n_batch, -(-q_len // block_q), -(-kv_len // block_k)),
                      np.int8)  # (N, q tiles, key tiles)
    evaluate_block_states(mask_mod, heads, q_len, kv_len, block_q, block_k, states,
                          mask_mod_args)
    states.flags.writeable = False
    return BlockMask(mask_mod, batch_shape, q_len, kv_len, (block_q, block_k), states,
                     mask_mod_args)


def _check_sizes(name, values):
    """``values`` as a tuple of non-negative Python ints, or an error naming ``name``."""
    try:
        sizes = tuple(operator.index(value) for value in values)
    except TypeError:
        raise TypeError(f"{name} must hold integers; got {values!r}") from None
    if any(size < 0 for size in sizes):
        raise ValueError(f"{name} must not be negative; got {values!r}")
    return sizes


def check_block_mask(block_mask, batch_shape, q_len, kv_len):
    """Check that ``block_mask`` was made for this call's batch shape, ``Lq`` and
    ``Lk``; returns it (or None)."""
    if block_mask is None:
        return None
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a fastattn BlockMask from "
                        f"fastattn.create_block_mask; got {type(block_mask).__name__}")
    batch_shape = tuple(batch_shape)
    if (block_mask.q_len, block_mask.kv_len) != (q_len, kv_len) or not broadcasts(
            block_mask.batch_shape, batch_shape):
        raise ValueError(
            f"block_mask was made for batch shape {block_mask.batch_shape}, Lq = "
            f"{block_mask.q_len}, Lk = {block_mask.kv_len}; this call has batch shape "
            f"{batch_shape}, Lq = {q_len}, Lk = {kv_len} (a block mask's batch shape must "
            f"broadcast to the call's: axes of size 1 serve every index). Make one with "
            f"fastattn.create_block_mask(mask_mod, {batch_shape}, {q_len}, {kv_len})")
    return block_mask


def broadcasts(shape, batch_shape):
    """Whether ``shape`` broadcasts to ``batch_shape`` by NumPy's rules (it is no
    longer, and each of its axes is 1 or ``batch_shape``'s)."""
    return len(shape) <= len(batch_shape) and all(
        size in (1, whole) for size, whole in zip(shape[::-1], batch_shape[::-1]))
