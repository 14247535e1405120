"""The score function shared by every kernel: a query block and a key block in,
scaled, biased, masked scores in log2 units out.

For query ``i`` and key ``j`` of batch entry ``b`` the score is built in this order:

1. ``s = scale * q_i . k_j``: the caller passes query rows already multiplied by
   ``log2(e) * scale``, so the product is the score in log2 units;
2. ``s += log2(e) * bias[b, i, j]`` (a ``-inf`` bias hides the key, even where
   ``s`` is NaN);
3. keys hidden by the visibility rule (:mod:`fastattn.kernels.masking`) or by the
   mask become ``-inf``, whatever ``s`` was, so a NaN is never taken for a hidden key.

A new score option is one more step here and one more field of
:class:`fastattn.layout.ScoreOptions` (or one more operand).
"""

import numpy as np

from fastattn.kernels.config import jit_helper
from fastattn.kernels.masking import block_fully_visible, visible_columns
from fastattn.kernels.vector_math import LOG2E


@jit_helper
def block_scores(scores, q_rows, keys, row_start, key_start, entry, rule, options, mask, bias):
    """Write the scores of ``q_rows`` against ``keys`` into ``scores``.

    Parameters
    ----------
    scores : array, shape ``(rows, cols)``, C-contiguous
        Output; overwritten.
    q_rows : array, shape ``(rows, Dk)``
        Queries ``row_start + r`` times ``log2(e) * scale``.
    keys : array, shape ``(cols, Dk)``
        Keys ``key_start + c``.
    entry : int
        Batch entry (indexes the mask and bias).
    rule : KeyRule
        The entry's visibility rule.
    options : ScoreOptions
        The scalar score options (the scale is already in ``q_rows``).
    mask, bias : ScoreOperand
        The mask and bias operands (read only when ``present``).
    """
    np.dot(q_rows, keys.T, scores)  # (rows, cols) log2(e) * scale * q.k
    rows, cols = scores.shape
    if not (mask.present or bias.present) and block_fully_visible(
            row_start, row_start + rows, key_start, key_start + cols, rule):
        return
    bias_rows = bias.stack[bias.index[entry] if bias.present else 0]  # (1 or Lq, 1 or Lk)
    mask_rows = mask.stack[mask.index[entry] if mask.present else 0]  # (1 or Lq, 1 or Lk)
    for r in range(rows):
        row = row_start + r
        first, stop = visible_columns(row, key_start, cols, rule)
        if bias.present:
            for c in range(first, stop):
                value = bias_rows[row * bias.row_step, (key_start + c) * bias.col_step]
                scores[r, c] = -np.inf if value == -np.inf else scores[r, c] + LOG2E * value
        if mask.present:
            for c in range(first, stop):
                if not mask_rows[row * mask.row_step, (key_start + c) * mask.col_step]:
                    scores[r, c] = -np.inf
        scores[r, :first] = -np.inf
        scores[r, stop:] = -np.inf
