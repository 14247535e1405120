"""Public attention backward: validates and lays out, then calls the fused kernel."""

import dataclasses
import math

import numpy as np

from fastattn.problem import check_attention, check_backward_arrays, check_score_mod_grad
from fastattn.layout import sum_to_shape
from fastattn.kernels.backward import backward_kernel
from fastattn.kernels.score_functions import problem_hook
from fastattn.threads import get_num_threads, single_threaded_blas
from fastattn.layout import BackwardInputs, Gradients, Tiling, problem_arguments

# Rows and keys per block of the backward pass.
BLOCK_Q = 256
BLOCK_K = 256
# Fewest parallel tasks a call should offer; the keys are cut into up to this many
# groups, each adding its share of dQ into a buffer of its own, to reach it. Each
# extra group costs one more dQ-sized buffer, fresh memory on every call, so this
# is kept lower than the forward's (B=1, H=8, L=512: 16 -> 8 took a backward call
# from about 16 to 9 ms here, most of the difference spent in page faults).
MIN_TASKS = 8


def scaled_dot_product_attention_backward(grad_out, query, key, value, out, lse, mask=None, *,
                                          bias=None, causal=False, causal_alignment="top_left",
                                          window=None, kv_lengths=None, scale=None,
                                          enable_gqa=False, softcap=None, alibi_slopes=None,
                                          score_mod=None, mask_mod=None, block_mask=None,
                                          score_mod_grad=None):
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
    ``alibi_slopes``, ``bias`` and ``mask_mod`` get no gradient.

    Parameters
    ----------
    grad_out : array_like, shape ``(*batch, Lq, Dv)``
        Gradient of the loss with respect to ``out``.
    query, key, value, mask
        The forward's inputs.
    out : array_like, shape ``(*batch, Lq, Dv)``
    lse : array_like, shape ``(*batch, Lq)``
        The forward's results.
    bias, causal, causal_alignment, window, kv_lengths, scale, enable_gqa, softcap, \
alibi_slopes, score_mod, mask_mod, block_mask
        Exactly as given to the forward.
    score_mod_grad : numba-compiled function ``(s, b, h, i, j) -> float``
        ``d score_mod(s, b, h, i, j) / d s``; required with a ``score_mod``.

    Returns
    -------
    grad_query, grad_key, grad_value : ndarray
        Shaped like ``query``, ``key`` and ``value``: batch dims an input was broadcast
        along are summed back, and under grouped-query attention each kv head gets the
        sum over its group of query heads. Rows that saw no key give zero gradients.
        dtypes follow the forward's rules (float16 computed in float32, integers in
        float64). No gradient is returned for ``bias``.

    See Also
    --------
    reference.scaled_dot_product_attention_backward : the plain NumPy oracle.
    """
    problem = check_attention(query, key, value, mask, bias=bias, causal=causal,
                              causal_alignment=causal_alignment, window=window,
                              kv_lengths=kv_lengths, scale=scale, enable_gqa=enable_gqa,
                              softcap=softcap, alibi_slopes=alibi_slopes,
                              score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask)
    problem = check_score_mod_grad(problem, score_mod_grad)
    grad_out, out, lse = check_backward_arrays(problem, grad_out, out, lse)
    dtype, batch = problem.compute_dtype, problem.batch_shape
    n_batch, q_len, kv_len = math.prod(batch), problem.q_len, problem.kv_len

    grad_out = np.ascontiguousarray(grad_out, dtype).reshape(n_batch, q_len, problem.value_dim)
    out = np.asarray(out, dtype).reshape(n_batch, q_len, problem.value_dim)
    lse = np.ascontiguousarray(lse, dtype).reshape(n_batch, q_len)
    delta = np.einsum("nqd,nqd->nq", grad_out, out)  # (N, Lq) D_i = rowsum(dO * O)
    extra = BackwardInputs(grad_out, lse, np.ascontiguousarray(delta))
    query_grad_parts, grad_key, grad_value, nan_met = _run_backward(problem, extra)
    if nan_met.any():  # a NaN query or key: again, with those NaNs entering as 0
        query_grad_parts, grad_key, grad_value, _ = _run_backward(
            dataclasses.replace(problem, query=without_nan(problem.query),
                                key=without_nan(problem.key)), extra)
    grad_query = query_grad_parts[0]  # (N, Lq, Dk)
    for part in query_grad_parts[1:]:  # a fixed order, whatever the thread count
        grad_query += part
    grad_query *= problem.scale

    group, out_dtype = problem.gqa_group, problem.out_dtype
    grad_query = grad_query.reshape(batch + (q_len, problem.head_dim))  # (*batch, Lq, Dk)
    grad_key = grad_key.reshape(batch + (kv_len, problem.head_dim))  # (*batch, Lk, Dk)
    grad_value = grad_value.reshape(batch + (kv_len, problem.value_dim))  # (*batch, Lk, Dv)
    return (sum_to_shape(grad_query, problem.query.shape).astype(out_dtype, copy=False),
            sum_to_shape(grad_key, problem.key.shape, group).astype(out_dtype, copy=False),
            sum_to_shape(grad_value, problem.value.shape, group).astype(out_dtype, copy=False))


def _run_backward(problem, extra):
    """Run the backward kernel on ``problem``; returns its :class:`Gradients`."""
    dtype = problem.compute_dtype
    n_batch, q_len, kv_len = math.prod(problem.batch_shape), problem.q_len, problem.kv_len
    if problem.block_mask is not None:  # the kernel works in the mask's tiles
        block_q, block_k = problem.block_mask.block_size
    else:
        block_q, block_k = BLOCK_Q, BLOCK_K
    n_groups = choose_key_groups(n_batch, kv_len, block_k)
    gradients = Gradients(
        np.zeros((n_groups, n_batch, q_len, problem.head_dim),
                 dtype),  # (G, N, Lq, Dk) shares of dQ / scale
        np.zeros((n_batch, kv_len, problem.head_dim), dtype),  # (N, Lk, Dk)
        np.zeros((n_batch, kv_len, problem.value_dim), dtype),  # (N, Lk, Dv)
        np.zeros(n_batch * n_groups, np.bool_))  # (N * G,)
    if n_batch and q_len and kv_len:
        with single_threaded_blas():
            backward_kernel(dtype)(*problem_arguments(problem, problem_hook(problem)),
                                   Tiling(block_q, block_k, get_num_threads()), extra,
                                   gradients)  # a slot per thread
    return gradients


def without_nan(array):
    """``array`` with NaN replaced by 0 (a copy)."""
    return np.where(np.isnan(array), 0, array).astype(array.dtype, copy=False)


def choose_key_groups(n_batch, kv_len, block_k=BLOCK_K):
    """Key groups per batch entry: enough for ``MIN_TASKS`` tasks, at most one per key
    block of ``block_k``. Depends on the shape only, never on the thread count."""
    n_key_blocks = -(-kv_len // block_k)
    return max(1, min(-(-MIN_TASKS // max(n_batch, 1)), n_key_blocks))
