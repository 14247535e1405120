"""The public attention functions: each validates its call, then runs the fused kernels.

``scaled_dot_product_attention`` and its backward take the arrays of a call and its
keyword options (:class:`~fastattn._contract.options.AttentionOptions`, one object
for every front end), check them into an
:class:`~fastattn._contract.problem.AttentionProblem`
(:mod:`fastattn._contract`), and hand that to :mod:`fastattn._dispatch`, which lays
it out for the kernels (:mod:`fastattn.kernels`) and shapes their results.
"""

from fastattn._contract.options import options_from, takes_options
import numpy as np

from fastattn._contract.problem import (check_attention, check_backward_arrays,
                                       check_bias_grad_request, check_score_mod_grad)
from fastattn._dispatch.run import run_backward, run_forward

__all__ = ["scaled_dot_product_attention", "scaled_dot_product_attention_backward"]


@takes_options(after=("return_weights", "return_lse"))
def scaled_dot_product_attention(query, key, value, mask=None, *, return_weights=False,
                                 return_lse=False, **options):
    r"""Scaled dot-product attention computed by a fused Numba kernel.

    .. math::

        \mathrm{out} = \mathrm{softmax}\!\left(\mathrm{scale}\cdot QK^\top + B,
        \text{masked}\right) V, \qquad \mathrm{scale} = 1/\sqrt{d_k}\ \text{by default}

    {score_order}

    This function checks and broadcasts the arguments, then calls a kernel that
    computes the masked softmax and the weighted sum in one tiled pass (online
    softmax), without building the ``(Lq, Lk)`` score matrix.

    Parameters
    ----------
    query : array_like, shape ``(*batch, Lq, Dk)``
        Queries; a 2-D ``(Lq, Dk)`` array is a single sequence.
    key : array_like, shape ``(*batch, Lk, Dk)``
    value : array_like, shape ``(*batch, Lk, Dv)``
        ``Dv`` may differ from ``Dk``.
    mask : array_like of bool, optional
        Broadcastable to ``(*batch, Lq, Lk)``; **True = may attend**.
    {options}
    return_weights : bool, default False
        Also return the attention weights ``(*batch, Lq, Lk)`` (O(Lq*Lk) memory).
    return_lse : bool, default False
        Also return the natural log-sum-exp of each row's scores ``(*batch, Lq)``.

    Returns
    -------
    out : ndarray, shape ``(*batch, Lq, Dv)``
    weights : ndarray, shape ``(*batch, Lq, Lk)``, only if ``return_weights``
    lse : ndarray, shape ``(*batch, Lq)``, only if ``return_lse``

    Notes
    -----
    A row with no visible key gives output 0, weights 0 and lse ``-inf``, never NaN.
    float32 and float64 are computed natively, float16 in float32 (returned as
    float16), integer and bool inputs in float64; the bias does not change the
    dtype. Inputs are never modified; any memory layout is accepted.

    See Also
    --------
    reference.scaled_dot_product_attention : the plain NumPy oracle.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 16, 8))      # (batch, heads, Lq, Dk)
    >>> k = rng.standard_normal((2, 4, 32, 8))      # (batch, heads, Lk, Dk)
    >>> v = rng.standard_normal((2, 4, 32, 6))      # (batch, heads, Lk, Dv)
    >>> out = fastattn.scaled_dot_product_attention(q, k, v)
    >>> out.shape
    (2, 4, 16, 6)

    The same attention written out in NumPy:

    >>> scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(8)
    >>> weights = np.exp(scores - scores.max(-1, keepdims=True))
    >>> weights /= weights.sum(-1, keepdims=True)
    >>> bool(np.allclose(out, weights @ v))
    True

    Decoding the last 4 queries against all 32 keys: bottom-right alignment puts
    them at the end of the sequence, so the last query sees every key.

    >>> out, weights, lse = fastattn.scaled_dot_product_attention(
    ...     q[:, :, :4], k, v, causal=True, causal_alignment="bottom_right",
    ...     return_weights=True, return_lse=True)
    >>> (weights[0, 0] > 0).sum(axis=-1)
    array([29, 30, 31, 32])
    >>> lse.shape
    (2, 4, 4)
    """
    problem = check_attention(query, key, value, mask,
                              options_from(options, "scaled_dot_product_attention"))
    out, weights, lse = run_forward(problem, return_weights)
    return selected_results(out, weights, lse, return_weights, return_lse)


@takes_options(after=("score_mod_grad", "score_mod_args_grad", "return_bias_grad"))
def scaled_dot_product_attention_backward(grad_out, query, key, value, out, lse, mask=None, *,
                                          score_mod_grad=None, score_mod_args_grad=None,
                                          return_bias_grad=False, **options):
    r"""Gradients of :func:`fastattn.scaled_dot_product_attention`, by a fused kernel.

    The vector-Jacobian product of the forward under the same options, given the
    forward's ``out`` and ``lse`` (``return_lse=True``), so that nothing of size
    ``Lq*Lk`` is kept between the two. With :math:`P = \exp(S - \mathrm{lse})`
    recomputed block by block and :math:`D_i = \sum_d dO_{id} O_{id}`,

    .. math::

        dV = P^\top dO, \quad dS = P \odot (dO\, V^\top - D), \quad
        dQ = \mathrm{scale}\; dS\, K, \quad dK = \mathrm{scale}\; dS^\top Q.

    With a ``softcap`` :math:`c`, :math:`dS` is multiplied by the cap's derivative
    :math:`1 - \tanh^2(s / c)` at the score :math:`s` before the cap, and with a
    ``score_mod`` by ``score_mod_grad`` at the score before ``score_mod``;
    the ALiBi term, the bias and ``mask_mod`` get no gradient.

    Parameters
    ----------
    grad_out : array_like, shape ``(*batch, Lq, Dv)``
        Gradient of the loss with respect to ``out``.
    query, key, value, mask
        The forward's inputs.
    out : array_like, shape ``(*batch, Lq, Dv)``
    lse : array_like, shape ``(*batch, Lq)``
        The forward's results.
    {options}
    score_mod_grad : numba-compiled function ``(s, b, h, i, j, *score_mod_args) -> float``
        ``d score_mod(s, b, h, i, j, *score_mod_args) / d s``; required with a
        ``score_mod``.
    score_mod_args_grad : numba-compiled function ``(g, s, b, h, i, j, grads, *score_mod_args)``, optional
        Asks for the gradients of ``score_mod_args``: it adds ``g * d score_mod / d
        arg`` into the arrays of the tuple ``grads`` (zeroed, shaped like the args,
        of the compute dtype), where ``g`` is the loss gradient of ``score_mod``'s
        result and ``s`` its input score; called for every score with ``g != 0``.
        Each thread adds into arrays of its own, summed in a fixed order: the result
        is the same for every thread count.
    return_bias_grad : bool, default False
        Also return the gradient of ``bias`` (learned relative-position biases,
        ALiBi-style tables). Needs a ``bias``; not with both ``softcap`` and
        ``score_mod``.

    Returns
    -------
    grad_query, grad_key, grad_value : ndarray
        Shaped like ``query``, ``key`` and ``value``: batch dims an input was broadcast
        along are summed back, and under grouped-query attention each kv head gets the
        sum over its group of query heads. Rows that saw no key give zero gradients.
        dtypes follow the forward's rules (float16 computed in float32, integers in
        float64).
    grad_bias : ndarray, only if ``return_bias_grad``
        ``d loss / d bias`` in the bias's own shape and the compute dtype: ``dS`` at
        the score the bias is added to, summed over the axes the bias broadcasts
        along; 0 where the bias is ``-inf`` or the key is hidden.
    grad_score_mod_args : tuple of ndarray, only with ``score_mod_args_grad``
        ``d loss / d arg`` for each array of ``score_mod_args``, in its shape and the
        compute dtype.

    See Also
    --------
    reference.scaled_dot_product_attention_backward : the plain NumPy oracle.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 16, 8)) for _ in range(3))   # (batch, L, D)
    >>> out, lse = fastattn.scaled_dot_product_attention(q, k, v, causal=True, return_lse=True)
    >>> grad_out = np.ones_like(out)                  # the gradient of loss = out.sum()
    >>> grad_q, grad_k, grad_v = fastattn.scaled_dot_product_attention_backward(
    ...     grad_out, q, k, v, out, lse, causal=True)
    >>> grad_q.shape, grad_k.shape, grad_v.shape
    ((2, 16, 8), (2, 16, 8), (2, 16, 8))

    Each query's weights sum to 1, so ``dV`` sums, over the keys, to the number of
    queries:

    >>> bool(np.allclose(grad_v.sum(axis=1), 16))
    True
    """
    options = options_from(options, "scaled_dot_product_attention_backward")
    problem = check_score_mod_grad(check_attention(query, key, value, mask, options),
                                   score_mod_grad, score_mod_args_grad)
    check_bias_grad_request(problem, return_bias_grad)
    grad_out, out, lse = check_backward_arrays(problem, grad_out, out, lse)
    grads = run_backward(problem, grad_out, out, lse, return_bias_grad)
    if return_bias_grad:  # the bias as the caller gave it (before any added leading 1s)
        grads = grads[:3] + (grads[3].reshape(np.shape(options.bias)),) + grads[4:]
    return grads


def selected_results(out, weights, lse, return_weights, return_lse):
    """``out``, or the tuple of ``out`` and the extra results asked for, in the
    contract's order ``(out, weights, lse)`` (shared with :mod:`fastattn.torch`)."""
    results = (out,)
    if return_weights:
        results += (weights,)
    if return_lse:
        results += (lse,)
    return results[0] if len(results) == 1 else results
