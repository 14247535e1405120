"""Visibility rules applied inside the kernels' tile loops.

Key ``j`` is visible to query ``i`` of batch entry ``b`` iff

    lo(i) <= j < hi(i),  lo(i) = i + off - reach_left,
                         hi(i) = min(i + off + reach_right + 1, kv_lengths[b])

and the user's mask allows it (see :meth:`fastattn.checks.AttentionProblem.key_reach`).
Because ``lo`` and ``hi`` grow with ``i``, the keys a block of queries can see form
one interval, so key blocks outside it are never visited.
"""

import numpy as np
from numba import njit

from fastattn.kernels.config import jit_helper


@njit(inline="always")
def visible_range(row, kv_stop, diag_offset, reach_left, reach_right):
    """Half-open interval ``[lo, hi)`` of keys that query ``row`` may see structurally."""
    lo = max(row + diag_offset - reach_left, 0)
    hi = min(row + diag_offset + reach_right + 1, kv_stop)
    return lo, hi


@jit_helper
def mask_scores(scores, q_start, key_start, kv_stop, diag_offset, reach_left, reach_right,
                mask, mask_entry, mask_row_step, mask_col_step, has_mask,
                bias, bias_entry, bias_row_step, bias_col_step, has_bias, bias_factor):
    """In place: add ``bias_factor * bias`` to the scores and set hidden keys to ``-inf``.

    ``scores`` is the ``(rows, cols)`` block of queries ``q_start + r`` against keys
    ``key_start + c``, already scaled. Mask and bias are read through row and column
    steps of 0 or 1, so a mask of shape ``(1, Lk)`` is never expanded to ``(Lq, Lk)``.
    """
    rows, cols = scores.shape
    for r in range(rows):
        row = q_start + r
        lo, hi = visible_range(row, kv_stop, diag_offset, reach_left, reach_right)
        first = min(max(lo - key_start, 0), cols)  # columns [first, stop) may be visible
        stop = max(min(hi - key_start, cols), first)
        if has_bias:
            for c in range(first, stop):
                scores[r, c] += bias_factor * bias[bias_entry, row * bias_row_step,
                                                   (key_start + c) * bias_col_step]
        if has_mask:
            for c in range(first, stop):
                if not mask[mask_entry, row * mask_row_step, (key_start + c) * mask_col_step]:
                    scores[r, c] = -np.inf
        scores[r, :first] = -np.inf
        scores[r, stop:] = -np.inf
