"""Gradients of attention in plain NumPy, from the softmax Jacobian: the oracle of
:func:`fastattn.scaled_dot_product_attention_backward`."""

import numpy as np

from fastattn._contract.options import options_from, takes_options
from fastattn._contract.problem import (check_attention, check_backward_arrays,
                                       check_bias_grad_request, check_score_mod_grad)
from fastattn._contract.shapes import sum_to_shape
from reference.dropout import dropout_factors
from reference.attention import (broadcast_inputs, call_over_grid, grid_indices,
                                 masked_scores, masked_softmax, named_index_errors,
                                 scores_before_mod, softcap_derivative)


@takes_options(after=("score_mod_grad", "score_mod_args_grad", "return_bias_grad"))
def scaled_dot_product_attention_backward(grad_out, query, key, value, out, lse, mask=None, *,
                                          score_mod_grad=None, score_mod_args_grad=None,
                                          return_bias_grad=False, **options):
    r"""Vector-Jacobian product of attention, in float64, written to be read.

    With :math:`S = \mathrm{cap}(\mathrm{scale}\, QK^\top) - A + B` (hidden keys at
    :math:`-\infty`; :math:`\mathrm{cap}` the softcap, :math:`A` the ALiBi term),
    :math:`P = \mathrm{softmax}(S)` row by row and :math:`O = PV`, the gradients of a
    loss with :math:`\partial L / \partial O = dO` are

    .. math::

        dV = P^\top dO, \quad dP = dO\, V^\top, \quad
        dS_i = J_i\, dP_i = P_i \odot (dP_i - P_i \cdot dP_i), \quad
        dQ = \mathrm{scale}\; dS\, K, \quad dK = \mathrm{scale}\; dS^\top Q,

    where :math:`J_i = \mathrm{diag}(P_i) - P_i P_i^\top` is the softmax Jacobian of
    row :math:`i`; with a softcap :math:`c`, :math:`dS` is then multiplied by
    :math:`\mathrm{cap}' = 1 - \tanh^2(\mathrm{scale}\, q.k / c)`, and with a
    ``score_mod`` first by ``score_mod_grad`` at the score before ``score_mod``
    (the ALiBi term, the bias and ``mask_mod`` get no gradient). This version recomputes :math:`P` from the inputs; ``out`` and
    ``lse`` are only checked for shape (the fused kernel uses them).

    Parameters
    ----------
    grad_out : array_like, shape ``(*batch, Lq, Dv)``
        Gradient of the loss with respect to the forward's output.
    query, key, value, mask
        Exactly as given to the forward.
    {options}
    score_mod_grad : numba-compiled function ``(s, b, h, i, j, *score_mod_args) -> float``
        ``d score_mod / d s``, required with a ``score_mod``.
    score_mod_args_grad : numba-compiled function ``(g, s, b, h, i, j, grads, *score_mod_args)``, optional
        Adds ``g * d score_mod / d arg`` into ``grads``; called from Python on every
        score with ``g != 0``, in C order.
    out : array_like, shape ``(*batch, Lq, Dv)``
    lse : array_like, shape ``(*batch, Lq)``
        The forward's output and log-sum-exp.

    Returns
    -------
    grad_query, grad_key, grad_value : ndarray
        Shaped like ``query``, ``key`` and ``value``: broadcast batch dims summed back,
        and under grouped-query attention each kv head's group summed.
    grad_bias : ndarray, only if ``return_bias_grad``
    grad_score_mod_args : tuple of ndarray, only with ``score_mod_args_grad``
        In the compute dtype (accumulated in float64).
    """
    options = options_from(options, "scaled_dot_product_attention_backward")
    problem = check_score_mod_grad(check_attention(query, key, value, mask, options),
                                   score_mod_grad, score_mod_args_grad)
    check_bias_grad_request(problem, return_bias_grad)
    grad_out = check_backward_arrays(problem, grad_out, out, lse)[0]
    q, k, v = broadcast_inputs(problem)  # (*batch, Lq, Dk), (*batch, Lk, Dk), (*batch, Lk, Dv)
    grad_out = np.broadcast_to(grad_out.astype(np.float64), problem.out_shape)  # (*batch, Lq, Dv)

    scores = masked_scores(problem, q, k)  # (*batch, Lq, Lk), -inf where hidden
    visible = scores != -np.inf  # (*batch, Lq, Lk)
    weights, _ = masked_softmax(scores)  # (*batch, Lq, Lk) P, zero rows where nothing is visible

    factors = dropout_factors(problem)  # (*batch, Lq, Lk) 0 or 1/(1-p); 1.0 without dropout
    grad_value = (weights * factors).swapaxes(-1, -2) @ grad_out  # (*batch, Lk, Dv) P_drop^T dO
    # dP = (dO V^T) * factors, kept only where a key is visible: a NaN value must not
    # reach the rows that cannot see it through a hidden key's exact 0
    grad_weights = np.where(visible, (grad_out @ v.swapaxes(-1, -2)) * factors,
                            0.0)  # (*batch, Lq, Lk)
    # softmax Jacobian applied row by row: dS = P * (dP - sum_j P_j dP_j)
    row_dot = (weights * grad_weights).sum(axis=-1, keepdims=True)  # (*batch, Lq, 1)
    grad_scores = np.where(visible, weights * (grad_weights - row_dot), 0.0)  # (*batch, Lq, Lk)
    arg_grads = None
    if problem.score_mod is not None:  # chain rule through score_mod
        before_mod = scores_before_mod(problem, q, k)[0]  # (*batch, Lq, Lk)
        if problem.score_mod_args_grad is not None:  # dS here is d loss / d score_mod(s)
            arg_grads = score_mod_args_grads(problem, grad_scores, before_mod)
        before_mod = np.where(before_mod == -np.inf, 0.0, before_mod)  # (*batch, Lq, Lk)
        mod_grad = call_over_grid(problem.score_mod_grad, problem, before_mod,
                                  problem.score_mod_args, "score_mod_grad")  # (*batch, Lq, Lk)
        grad_scores = np.where(visible, grad_scores * mod_grad, 0.0)  # (*batch, Lq, Lk)
    # the bias is added after the softcap and before score_mod: dbias = dS here, summed
    # over the axes it broadcasts along
    grad_bias = grad_scores  # (*batch, Lq, Lk)
    if problem.softcap is not None:  # chain rule through s = c * tanh(raw / c)
        grad_scores = np.where(visible, grad_scores * softcap_derivative(problem, q, k),
                               0.0)  # (*batch, Lq, Lk)
    # dQ = scale dS K and dK = scale dS^T Q; a NaN in Q or K already made dS NaN
    # wherever it is seen, so it enters these products as 0 (else 0 * NaN spreads it)
    grad_query = problem.scale * grad_scores @ np.where(np.isnan(k), 0.0, k)  # (*batch, Lq, Dk)
    grad_key = (problem.scale * grad_scores.swapaxes(-1, -2)
                @ np.where(np.isnan(q), 0.0, q))  # (*batch, Lk, Dk)

    group, dtype = problem.gqa_group, problem.out_dtype
    grads = (sum_to_shape(grad_query, problem.query.shape).astype(dtype),
             sum_to_shape(grad_key, problem.key.shape, group).astype(dtype),
             sum_to_shape(grad_value, problem.value.shape, group).astype(dtype))
    if return_bias_grad:  # in the bias's own shape and the compute dtype
        grad_bias = sum_to_shape(grad_bias, problem.bias.shape)  # (*bias.shape)
        grads += (grad_bias.reshape(np.shape(options.bias)).astype(problem.compute_dtype),)
    if arg_grads is not None:
        grads += (tuple(grad.astype(problem.compute_dtype) for grad in arg_grads),)
    return grads


def score_mod_args_grads(problem, grad_scores, before_mod):
    """The gradients of ``score_mod_args``: ``score_mod_args_grad(g, s, b, h, i, j,
    grads, *score_mod_args)`` called from Python, in C order, on every score that is
    not ``-inf`` before ``score_mod`` and whose loss gradient ``g`` (from
    ``grad_scores`` ``(*batch, Lq, Lk)``, with respect to ``score_mod``'s result) is
    not 0; ``s`` from ``before_mod`` ``(*batch, Lq, Lk)``. Returns float64 arrays
    shaped like the args."""
    args = problem.score_mod_args
    grads = tuple(np.zeros(arg.shape) for arg in args)  # float64, shaped like the args
    python_function = problem.score_mod_args_grad.py_func
    b, h, i, j = (np.broadcast_to(index, grad_scores.shape)
                  for index in grid_indices(problem))  # (*batch, Lq, Lk) each
    with named_index_errors("score_mod_args_grad", python_function):
        for point in zip(*np.nonzero((grad_scores != 0) & (before_mod != -np.inf))):
            python_function(grad_scores[point], before_mod[point], int(b[point]),
                            int(h[point]), int(i[point]), int(j[point]), grads, *args)
    return grads
