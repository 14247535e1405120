"""The chunk pairs of a :mod:`fastattn.dask` call and what each one sees.

For an output batch block, a query chunk of rows ``[q0, q0 + m)`` and a key chunk of
keys ``[k0, k0 + n)``, :func:`chunk_pairs` works out the sub-block that holds every
visible (query, key) pair under the causal, window and ``kv_lengths`` rules of the
plan (:attr:`~fastattn.dask.plan.ChunkPlan.reach` about the diagonal offset of the
problem), and the local call's options that apply those rules to the sub-block
alone: a top-left window of ``(left - d, right + d)``, ``d`` being the diagonal
offset in the sub-block's own coordinates, and ``kv_lengths`` shifted to its first
key. A pair with no visible (query, key) pair has no sub-block and makes no task.

Pure Python and NumPy: nothing here builds a graph.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from fastattn.block_mask import EMPTY

__all__ = ["VisibleBlock", "ChunkPair", "chunk_pairs"]


@dataclass(frozen=True)
class VisibleBlock:
    """The sub-block of a chunk pair that holds every visible (query, key) pair.

    Attributes
    ----------
    row_lo, row_hi : int
        Its rows ``[row_lo, row_hi)``, counted from the query chunk's first row.
    key_lo, key_hi : int
        Its keys ``[key_lo, key_hi)``, counted from the key chunk's first key.
    causal : bool
    window : (int, int) or None
        The local call's ``causal`` and ``window`` for the sub-block (top-left
        alignment): the global rules in the sub-block's coordinates.
    """

    row_lo: int
    row_hi: int
    key_lo: int
    key_hi: int
    causal: bool
    window: tuple[int, int] | None

    @property
    def span(self):
        """``(row_lo, row_hi, key_lo, key_hi)``."""
        return self.row_lo, self.row_hi, self.key_lo, self.key_hi


class ChunkPair(NamedTuple):
    """One (output batch block, query chunk, key chunk) of the graph.

    Attributes
    ----------
    batch_index : tuple of int
        The output batch block's index (one entry per batch axis).
    batch_shape : tuple of int
        Its shape.
    q_index, kv_index : int
        Indices of the query chunk and of the key chunk.
    block : VisibleBlock or None
        The visible sub-block, None when no query of the chunk sees a key of it.
    kv_lengths : ndarray of int64 or None
        The batch block's ``kv_lengths`` in the sub-block's keys (clipped to
        ``[0, key_hi - key_lo]``), None when they cut no key of it.
    """

    batch_index: tuple
    batch_shape: tuple
    q_index: int
    kv_index: int
    block: VisibleBlock | None
    kv_lengths: np.ndarray | None


def chunk_pairs(plan):
    """Every :class:`ChunkPair` of a :class:`~fastattn.dask.plan.ChunkPlan`: output
    batch blocks, then query chunks, then key chunks, in C order."""
    problem = plan.problem
    kv_lengths = problem.options.kv_lengths
    q_starts, kv_starts = _starts(plan.q_chunks), _starts(plan.kv_chunks)
    batch_starts = [_starts(chunks) for chunks in plan.batch_chunks]
    for batch_index, batch_shape, (first_lo, first_hi) in _batch_blocks(plan.batch_chunks):
        tiles = _block_mask_tiles(problem, tuple(
            starts[index] for starts, index in zip(batch_starts, batch_index)), batch_shape)
        lengths = None
        key_stop = problem.kv_len
        if kv_lengths is not None:
            lengths = kv_lengths[first_lo:first_hi]
            key_stop = int(lengths.max()) if lengths.size else 0
        for q_index, (q_start, q_size) in enumerate(zip(q_starts, plan.q_chunks)):
            for kv_index, (k_start, k_size) in enumerate(zip(kv_starts, plan.kv_chunks)):
                block = None
                if math.prod(batch_shape) > 0 and q_size > 0:
                    block = _visible_block(problem.diag_offset, plan.reach, q_start, q_size,
                                           k_start, k_size, key_stop)
                if block is not None and tiles is not None and _all_empty(
                        tiles, problem.options.block_mask.block_size, q_start + block.row_lo,
                        q_start + block.row_hi, k_start + block.key_lo, k_start + block.key_hi):
                    block = None
                local_lengths = None
                if block is not None and lengths is not None:
                    width = block.key_hi - block.key_lo
                    local_lengths = np.clip(lengths - (k_start + block.key_lo), 0, width)
                    if (local_lengths == width).all():
                        local_lengths = None
                yield ChunkPair(batch_index, batch_shape, q_index, kv_index, block,
                                local_lengths)


def _block_mask_tiles(problem, batch_start, batch_shape):
    """The tile states ``(..., q tiles, key tiles)`` of the call's block mask that
    the batch block at ``batch_start`` of ``batch_shape`` reads (an axis the mask
    broadcasts along read whole), or None without a block mask."""
    block_mask = problem.options.block_mask
    if block_mask is None:
        return None
    own = (1,) * (len(problem.batch_shape) - len(block_mask.batch_shape)) + \
        block_mask.batch_shape
    states = block_mask.states.reshape(own + block_mask.states.shape[1:])
    return states[tuple(slice(None) if size == 1 else slice(start, start + extent)
                        for size, start, extent in zip(own, batch_start, batch_shape))]


def _all_empty(tiles, block_size, row_lo, row_hi, key_lo, key_hi):
    """Whether every tile of ``tiles`` ``(..., q tiles, key tiles)`` that meets the
    global rows ``[row_lo, row_hi)`` and keys ``[key_lo, key_hi)`` is empty."""
    block_q, block_k = block_size
    seen = tiles[..., row_lo // block_q:-(-row_hi // block_q),
                 key_lo // block_k:-(-key_hi // block_k)]
    return bool((seen == EMPTY).all())


def _starts(chunks):
    """First index of each chunk."""
    return np.concatenate(([0], np.cumsum(chunks, dtype=np.int64)))[:-1].tolist()


def _batch_blocks(batch_chunks):
    """Each output batch block: its block index, its shape, and its range along the
    first batch axis (``(0, 1)`` without batch axes, the one entry of kv_lengths)."""
    starts = [_starts(chunks) for chunks in batch_chunks]
    for index in np.ndindex(*(len(chunks) for chunks in batch_chunks)):
        shape = tuple(batch_chunks[axis][i] for axis, i in enumerate(index))
        first = (starts[0][index[0]], starts[0][index[0]] + shape[0]) if index else (0, 1)
        yield index, shape, first


def _visible_block(off, reach, q_start, q_size, k_start, k_size, key_stop):
    """The :class:`VisibleBlock` of the queries ``[q_start, q_start + q_size)`` and the
    keys ``[k_start, k_start + k_size)`` (global positions) under the diagonal offset
    ``off``, the ``reach`` ``(left, right)`` and keys cut at ``key_stop``, or None
    when no query sees any key."""
    left, right = reach
    key_end = min(k_start + k_size, key_stop)  # global keys [k_start, key_end)
    if key_end <= k_start:
        return None
    row_lo = max(q_start, k_start - off - right)
    row_hi = min(q_start + q_size, key_end - 1 - off + left + 1)
    if row_lo >= row_hi:
        return None
    key_lo = max(k_start, row_lo + off - left)
    key_hi = min(key_end, row_hi - 1 + off + right + 1)
    if key_lo >= key_hi:
        return None
    shift = off + row_lo - key_lo  # diagonal offset inside the sub-block
    local_left, local_right = left - shift, right + shift
    n_rows, n_keys = row_hi - row_lo, key_hi - key_lo
    left_all = local_left >= n_rows - 1  # every row reaches the sub-block's first key
    right_all = local_right >= n_keys - 1  # every row reaches its last key
    if left_all and right_all:
        causal, window = False, None
    elif left_all and local_right == 0:
        causal, window = True, None
    else:
        cap = n_rows + n_keys
        causal, window = False, (min(local_left, cap), min(local_right, cap))
    return VisibleBlock(row_lo - q_start, row_hi - q_start, key_lo - k_start, key_hi - k_start,
                        causal, window)
