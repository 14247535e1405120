"""The score function shared by every kernel: a query block and a key block in,
scaled, biased, masked scores in log2 units out.

For query ``i`` and key ``j`` of batch entry ``b`` the score is built in this order:

1. ``s = scale * q_i . k_j``: the block product is scaled by ``log2(e) * scale``
   (its gemm's ``alpha``: no pass over the queries), so it is the score in log2
   units;
2. softcap: ``s = softcap * tanh(s / softcap)``; in log2 units the cap is
   ``c = log2(e) * softcap`` and the step is ``s = c * tanh(s / c)``;
3. ALiBi: ``s -= log2(e) * slope[b] * |i + off - j|`` (``off`` the diagonal offset
   of ``causal_alignment``);
4. ``s += log2(e) * bias[b, i, j]`` (a ``-inf`` bias hides the key, even where
   ``s`` is NaN);
5. the user's ``score_mod`` and ``mask_mod``, through the block hook of
   :mod:`fastattn.kernels.hooks` (``score_mod`` leaves ``-inf`` alone);
6. keys hidden by the visibility rule (:mod:`fastattn.kernels.masking`) or by the
   mask become ``-inf``, whatever ``s`` was, so a NaN is never taken for a hidden key.

A new score option is one more step here and one more field of
:class:`fastattn._dispatch.layout.ScoreOptions` (or one more operand).
"""

import numpy as np

from fastattn.kernels.config import jit_helper
from fastattn.kernels.masking import block_fully_visible, visible_columns
from fastattn.kernels.products import scaled_product
from fastattn.kernels.hooks import (APPLY_MASK, MULTIPLY_GRADS, WRITE_GRADS,
                                              call_hook)
from fastattn.kernels.vector_math import LOG2E, cast_like, full_width_vectors, tanh


@jit_helper
def block_scores(scores, q_rows, keys, row_start, key_start, entry, rule, options, mask, bias,
                 score_grads, want_score_grads, check_mask_mod, before_mod):
    """Write the scores of ``q_rows`` against ``keys`` into ``scores``.

    Steps 2, 3 and 5 (softcap, ALiBi, the user's functions) run over the whole
    block when their option is set, and cost nothing otherwise.

    Parameters
    ----------
    scores : array, shape ``(rows, cols)``, C-contiguous
        Output; overwritten.
    q_rows : array, shape ``(rows, Dk)``
        Queries ``row_start + r``, as given (the product scales them).
    keys : array, shape ``(cols, Dk)``
        Keys ``key_start + c``.
    entry : int
        Batch entry (indexes the mask and bias).
    rule : KeyRule
        The entry's visibility rule.
    options : ScoreOptions
        The scalar score options (``log2(e) * scale`` is the score product's
        ``alpha``), the block hook of the user's functions and the BLAS gemm.
    mask, bias : ScoreOperand
        The mask and bias operands (read only when ``present``).
    score_grads : array, shape ``(rows, cols)``, C-contiguous
        With ``want_score_grads``, overwritten with ``d score / d s`` at
        ``s = scale * q.k``: the softcap's derivative ``1 - tanh(s / softcap)**2``
        times ``score_mod_grad`` at the score before ``score_mod`` (the backward's
        chain rule factor); else never touched. Needs a softcap or a score_mod.
    check_mask_mod : bool
        Whether to apply the user's ``mask_mod`` (if any) to this block; False on
        a block a block mask knows to be full.
    before_mod : array, shape ``(rows, cols)``, C-contiguous
        With ``want_score_grads`` and ``options.has_args_grad``, overwritten with the
        scores before ``score_mod`` (log2 units; the backward's ``score_mod_args_grad``
        reads them); else never touched.
    """
    scaled_product(options.gemm, options.scale * LOG2E, q_rows, keys.T,
                   scores)  # (rows, cols) log2(e) * scale * q.k
    rows, cols = scores.shape
    if options.has_softcap:
        apply_softcap(scores, cast_like(options.softcap * LOG2E, scores), score_grads,
                      want_score_grads)
    if options.has_alibi:
        slope = cast_like(options.alibi_slopes[entry] * LOG2E, scores)
        one = cast_like(1.0, scores)
        for r in range(rows):
            # i + off - j for key j = key_start + c, counted down in floats (exact up
            # to 2**24 in float32) so the loop needs no integer conversion
            offset = cast_like(row_start + r + rule.diag_offset - key_start, scores)
            for c in range(cols):
                scores[r, c] -= slope * abs(offset)
                offset -= one
    if bias.present:
        bias_rows = bias.stack[bias.index[entry]]  # (1 or Lq, 1 or Lk)
        for r in range(rows):
            first, stop = visible_columns(row_start + r, key_start, cols, rule)
            add_bias(scores[r], bias_rows, bias, row_start + r, key_start, first, stop)
    hook_mode = APPLY_MASK if options.has_mask_mod and check_mask_mod else 0
    if want_score_grads and options.has_score_mod:
        hook_mode |= MULTIPLY_GRADS if options.has_softcap else WRITE_GRADS
    if want_score_grads and options.has_args_grad:
        before_mod[:, :] = scores
    if options.has_score_mod or hook_mode:  # the user's functions see the biased score
        call_hook(options, scores, score_grads, row_start, key_start, entry, hook_mode)
    if not mask.present and block_fully_visible(row_start, row_start + rows, key_start,
                                                key_start + cols, rule):
        return
    mask_rows = mask.stack[mask.index[entry] if mask.present else 0]  # (1 or Lq, 1 or Lk)
    for r in range(rows):
        row = row_start + r
        first, stop = visible_columns(row, key_start, cols, rule)
        if mask.present:
            for c in range(first, stop):
                if not mask_rows[row * mask.row_step, (key_start + c) * mask.col_step]:
                    scores[r, c] = -np.inf
        scores[r, :first] = -np.inf
        scores[r, stop:] = -np.inf


@jit_helper
def add_bias(score_row, bias_rows, bias, row, key_start, first, stop):
    """Add the bias of query ``row`` to columns ``[first, stop)`` of ``score_row``
    ``(cols,)`` (log2 units); a ``-inf`` bias hides the key, even where the score is
    NaN."""
    for c in range(first, stop):
        value = bias_rows[row * bias.row_step, (key_start + c) * bias.col_step]
        score_row[c] = -np.inf if value == -np.inf else score_row[c] + LOG2E * value


@jit_helper
def apply_softcap(scores, cap, cap_grads, want_cap_grads):
    """In place: ``scores = cap * tanh(scores / cap)`` ``(rows, cols)``; with
    ``want_cap_grads`` also ``cap_grads = 1 - tanh(scores / cap)**2``, from the capped
    scores (one tanh loop only: a second would double its compile time)."""
    full_width_vectors()  # tanh is arithmetic-bound: 512-bit vectors where the CPU has them
    rows, cols = scores.shape
    one = cast_like(1.0, scores)
    inverse_cap = one / cap
    for r in range(rows):
        for c in range(cols):
            scores[r, c] = cap * tanh(scores[r, c] * inverse_cap)
    if want_cap_grads:
        for r in range(rows):
            for c in range(cols):
                t = scores[r, c] * inverse_cap  # tanh(s / cap), within a rounding step
                cap_grads[r, c] = one - t * t
