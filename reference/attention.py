"""Scaled dot-product attention in plain NumPy: the oracle the kernels are tested against.

Written to be read, not to be fast: it builds the full ``(Lq, Lk)`` score matrix,
computes in float64 and casts back to the contract's output dtype.
"""

import numpy as np

from fastattn._contract.options import options_from, takes_options
from fastattn._contract.problem import check_attention
from reference.dropout import dropout_factors


@takes_options(after=("return_weights", "return_lse"))
def scaled_dot_product_attention(query, key, value, mask=None, *, return_weights=False,
                                 return_lse=False, **options):
    r"""Attention by the textbook formula, in float64.

    .. math::

        \mathrm{out} = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d_k}} + B,
        \text{masked}\right) V

    Same arguments, results and errors as :func:`fastattn.scaled_dot_product_attention`
    (the contract: ``docs/contract.rst``); this version materialises every
    intermediate.

    Parameters
    ----------
    query, key, value, mask
        As for :func:`fastattn.scaled_dot_product_attention`.
    {options}
    return_weights, return_lse : bool, default False
        Also return the weights, the log-sum-exp.

    Returns
    -------
    out : ndarray, shape ``(*batch, Lq, Dv)``
    weights : ndarray, shape ``(*batch, Lq, Lk)``, if ``return_weights``
    lse : ndarray, shape ``(*batch, Lq)``, if ``return_lse``
    """
    problem = check_attention(query, key, value, mask,
                              options_from(options, "scaled_dot_product_attention"))
    q, k, v = broadcast_inputs(problem)  # (*batch, Lq, Dk), (*batch, Lk, Dk), (*batch, Lk, Dv)

    scores = masked_scores(problem, q, k)  # (*batch, Lq, Lk), -inf where hidden
    weights, lse = masked_softmax(scores)  # (*batch, Lq, Lk), (*batch, Lq)
    dropped = weights * dropout_factors(problem)  # (*batch, Lq, Lk) after dropout
    out = visible_sum(dropped, scores != -np.inf, v)  # (*batch, Lq, Dv)

    results = (out.astype(problem.out_dtype),)
    if return_weights:
        results += (weights.astype(problem.out_dtype),)
    if return_lse:
        results += (lse.astype(problem.lse_dtype),)
    return results[0] if len(results) == 1 else results


def broadcast_inputs(problem):
    """Query, key and value in float64, broadcast to the full batch shape.

    Under grouped-query attention each kv head is repeated for the query heads of
    its group, so query head ``h`` meets kv head ``h // group``.
    """
    batch = problem.batch_shape
    key, value = problem.key, problem.value
    if problem.gqa_group > 1:
        key = np.repeat(key, problem.gqa_group, axis=-3)  # (..., Hq, Lk, Dk)
        value = np.repeat(value, problem.gqa_group, axis=-3)  # (..., Hq, Lk, Dv)
    q = np.broadcast_to(problem.query.astype(np.float64), batch + problem.query.shape[-2:])
    k = np.broadcast_to(key.astype(np.float64), batch + key.shape[-2:])
    v = np.broadcast_to(value.astype(np.float64), batch + value.shape[-2:])
    return q, k, v


def masked_scores(problem, q, k):
    """Scores ``(*batch, Lq, Lk)``, ``-inf`` where a key is hidden, built in the
    contract's order:

    1. ``s = scale * q.k``;
    2. softcap: ``s = softcap * tanh(s / softcap)``;
    3. ALiBi: ``s -= slope[b] * |i + off - j|``;
    4. ``s += bias``;
    5. ``s = score_mod(s, b, h, i, j, *score_mod_args)`` (a ``-inf`` score is left
       alone).

    A hidden key (by the visibility rules, the mask, ``mask_mod``, or a ``-inf``
    bias) is ``-inf`` whatever its score was, so a NaN score is never taken for a
    hidden key.
    """
    scores, hidden = scores_before_mod(problem, q, k)  # (*batch, Lq, Lk) each
    if problem.score_mod is not None:  # (a -inf score is not even passed to it)
        finite = np.where(scores == -np.inf, 0.0, scores)  # (*batch, Lq, Lk)
        modified = call_over_grid(problem.score_mod, problem, finite,
                                  problem.score_mod_args)  # (*batch, Lq, Lk)
        scores = np.where(scores == -np.inf, -np.inf, modified)  # (*batch, Lq, Lk)
    return np.where(hidden, -np.inf, scores)  # (*batch, Lq, Lk)


def scores_before_mod(problem, q, k):
    """Steps 1-4 of :func:`masked_scores`: the scores ``(*batch, Lq, Lk)`` before
    ``score_mod`` (not yet masked), and where keys are hidden ``(*batch, Lq, Lk)``."""
    scores = q @ k.swapaxes(-1, -2) * problem.scale  # (*batch, Lq, Lk)
    if problem.softcap is not None:
        scores = problem.softcap * np.tanh(scores / problem.softcap)  # (*batch, Lq, Lk)
    if problem.alibi_slopes is not None:
        i = np.arange(problem.q_len)[:, None]  # (Lq, 1) query positions
        j = np.arange(problem.kv_len)[None, :]  # (1, Lk) key positions
        distance = np.abs(i + problem.diag_offset - j)  # (Lq, Lk)
        slopes = problem.alibi_slopes[..., None, None]  # (*batch, 1, 1)
        scores = scores - slopes * distance  # (*batch, Lq, Lk)
    hidden = ~visible_keys(problem)  # (*batch, Lq, Lk)
    if problem.bias is not None:
        bias = problem.bias.astype(np.float64)  # (..., Lq or 1, Lk or 1)
        scores = scores + bias  # (*batch, Lq, Lk)
        hidden = hidden | (bias == -np.inf)  # (*batch, Lq, Lk)
    return scores, hidden


def call_over_grid(function, problem, scores=None, args=(), role=None):
    """A user function called from Python on every ``(b, h, i, j)`` of the problem:
    ``function(s, b, h, i, j, *args)`` with ``s`` from ``scores`` ``(*batch, Lq,
    Lk)``, or ``function(b, h, i, j, *args)`` without scores. Returns ``(*batch, Lq,
    Lk)``, float64 or bool.

    ``b`` and ``h`` follow the contract: with two or more batch axes ``h`` indexes
    the last one and ``b`` the others, flattened in C order; with one, ``b``
    indexes it and ``h = 0``; with none both are 0 (:func:`grid_indices`: those of
    a larger call with ``chunk_of``, and for ``mask_mod`` those of a broadcast
    block mask's own batch shape). An ``IndexError`` inside the
    function is raised again naming it (``role``: ``"score_mod"`` by default with
    scores, else ``"mask_mod"``).
    """
    role = role or ("mask_mod" if scores is None else "score_mod")
    b, h, i, j = grid_indices(problem, role)  # (*batch, 1, 1) each, (Lq, 1), (1, Lk)
    python_function = function.py_func  # the user's code, run by Python
    with named_index_errors(role, python_function):
        if scores is None:
            return np.vectorize(lambda *indices: python_function(*indices, *args),
                                otypes=[bool])(b, h, i, j)  # (*batch, Lq, Lk)
        return np.vectorize(lambda *point: python_function(*point, *args),
                            otypes=[np.float64])(scores, b, h, i, j)  # (*batch, Lq, Lk)


def grid_indices(problem, role="score_mod"):
    """``b``, ``h`` ``(*batch, 1, 1)``, ``i`` ``(Lq, 1)`` and ``j`` ``(1, Lk)``: the
    indices the user function of ``role`` sees at every score of the problem
    (:meth:`~fastattn._contract.problem.AttentionProblem.user_function_positions`:
    ``mask_mod`` has its own ``b`` and ``h``)."""
    batch = problem.batch_shape
    b, h, mask_b, mask_h, row_offset, key_offset = problem.user_function_positions()
    if role == "mask_mod":
        b, h = mask_b, mask_h  # (N,) each
    i = row_offset + np.arange(problem.q_len)[:, None]  # (Lq, 1) query positions
    j = key_offset + np.arange(problem.kv_len)[None, :]  # (1, Lk) key positions
    return b.reshape(batch + (1, 1)), h.reshape(batch + (1, 1)), i, j


class named_index_errors:
    """Context: an ``IndexError`` raised inside the user function ``python_function``
    is raised again naming it and its ``role``, as fastattn's kernels do."""

    def __init__(self, role, python_function):
        self.role, self.name = role, python_function.__name__

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is not None and issubclass(kind, IndexError):
            raise IndexError(f"{self.role} {self.name!r} raised: {error}") from error
        return False


def visible_sum(weights, visible, values):
    """``weights @ values`` summed over visible keys only: ``(*batch, Lq, Dv)``.

    Equal to the product where every value is a number. A NaN value reaches exactly
    the output entries whose row sees its key (a hidden key's weight is an exact 0,
    and 0 * NaN would spread it to every row).
    """
    nan_values = np.isnan(values)  # (*batch, Lk, Dv)
    out = weights @ np.where(nan_values, 0.0, values)  # (*batch, Lq, Dv)
    reached = visible.astype(np.float64) @ nan_values  # (*batch, Lq, Dv) visible NaN count
    return np.where(reached > 0, np.nan, out)  # (*batch, Lq, Dv)


def visible_keys(problem):
    """Boolean ``(*batch, Lq, Lk)``: True where query ``i`` may attend to key ``j``.

    The AND of the causal rule, the window, the padding given by ``kv_lengths``,
    the user's mask and the user's ``mask_mod`` (or the block mask's).
    """
    batch, off = problem.batch_shape, problem.diag_offset
    i = np.arange(problem.q_len)[:, None]  # (Lq, 1) query positions
    j = np.arange(problem.kv_len)[None, :]  # (1, Lk) key positions

    visible = np.ones((problem.q_len, problem.kv_len), dtype=bool)  # (Lq, Lk)
    if problem.causal:
        visible &= j <= i + off  # (Lq, Lk)
    if problem.window is not None:
        left, right = problem.window
        visible &= (i + off - left <= j) & (j <= i + off + right)  # (Lq, Lk)
    visible = np.broadcast_to(visible, batch + visible.shape)  # (*batch, Lq, Lk)
    if problem.kv_lengths is not None:
        # one length per index of the first batch axis: shape (B, 1, ..., 1, 1, 1)
        lengths = problem.kv_lengths.reshape(batch[:1] + (1,) * (len(batch) - 1) + (1, 1))
        visible = visible & (j < lengths)  # (*batch, Lq, Lk)
    if problem.mask is not None:
        visible = visible & problem.mask  # (*batch, Lq, Lk)
    if problem.effective_mask_mod is not None:
        visible = visible & call_over_grid(problem.effective_mask_mod, problem, None,
                                           problem.effective_mask_mod_args)  # (*batch, Lq, Lk)
    return visible


def masked_softmax(scores):
    """Softmax over the last axis of scores where hidden keys hold ``-inf``.

    The row maximum is subtracted before ``exp`` so large scores cannot overflow.
    A row whose scores are all ``-inf`` (no visible key) gets weights 0 and
    log-sum-exp ``-inf``, never NaN. A row with a NaN score gets NaN weights on its
    visible keys (0 on hidden ones) and a NaN log-sum-exp.

    Returns
    -------
    weights : ndarray, shape ``(..., Lq, Lk)``
    lse : ndarray, shape ``(..., Lq)``, the natural log of ``sum(exp(scores))``
    """
    nan_rows = np.isnan(scores).any(axis=-1, keepdims=True)  # (..., Lq, 1)
    row_max = np.max(np.where(nan_rows, -np.inf, scores), axis=-1, keepdims=True,
                     initial=-np.inf)  # (..., Lq, 1) NaN rows set aside
    shift = np.where(row_max == -np.inf, 0.0, row_max)  # (..., Lq, 1) 0 for empty rows
    exp_scores = np.exp(scores - shift)  # (..., Lq, Lk) 0 where hidden
    row_sum = exp_scores.sum(axis=-1, keepdims=True)  # (..., Lq, 1)
    weights = np.divide(exp_scores, row_sum, out=np.zeros_like(exp_scores),
                        where=row_sum > 0)  # (..., Lq, Lk)
    weights = np.where(nan_rows & (scores != -np.inf), np.nan, weights)  # (..., Lq, Lk)
    with np.errstate(divide="ignore"):
        lse = (shift + np.log(row_sum))[..., 0]  # (..., Lq) -inf for empty rows
    return weights, np.where(nan_rows[..., 0], np.nan, lse)


def softcap_derivative(problem, q, k):
    """``d capped / d s = 1 - tanh(s / softcap)**2`` at ``s = scale * q.k``,
    ``(*batch, Lq, Lk)``; all ones without a softcap."""
    scores = q @ k.swapaxes(-1, -2) * problem.scale  # (*batch, Lq, Lk)
    if problem.softcap is None:
        return np.ones_like(scores)
    return 1.0 - np.tanh(scores / problem.softcap) ** 2  # (*batch, Lq, Lk)
