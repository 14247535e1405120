"""Attention over packed sequences (FlashAttention's varlen layout) in plain NumPy:
one reference call per sequence, written to be read.

Sequence ``s`` is computed by :func:`reference.scaled_dot_product_attention` as entry
``s`` of a batch of ``s + 1`` entries that all hold it (broadcast views, no copies),
so that the user functions see ``b = s`` and dropout draws at ``(s, h, i, j)``, as
the packed call's contract says; the other entries are computed and dropped.
"""

import numpy as np

from fastattn._contract.options import options_from, takes_options
from fastattn._contract.packed_sequences import check_varlen, check_varlen_backward_arrays
from reference.attention import scaled_dot_product_attention
from reference.gradients import scaled_dot_product_attention_backward

__all__ = ["varlen_attention", "varlen_attention_backward"]


@takes_options(after=("return_lse",))
def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, return_lse=False, **options):
    """Packed attention as one reference call per sequence, in float64.

    Same arguments, results and errors as :func:`fastattn.varlen_attention`.

    Parameters
    ----------
    q, k, v, cu_seqlens_q, cu_seqlens_k
        As for :func:`fastattn.varlen_attention`.
    {options}
    return_lse : bool, default False
        Also return the log-sum-exp ``(H, total_q)``.

    Returns
    -------
    out : ndarray, shape ``(total_q, H, Dv)``
    lse : ndarray, shape ``(H, total_q)``, if ``return_lse``
    """
    varlen = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,
                          options_from(options, "varlen_attention"))
    problem = varlen.problem
    out = np.zeros((problem.q_len, varlen.heads, problem.value_dim),
                   problem.out_dtype)  # (total_q, H, Dv)
    lse = np.zeros((varlen.heads, problem.q_len), problem.lse_dtype)  # (H, total_q)
    for sequence, (rows, keys) in enumerate(sequence_rows(varlen)):
        q_s, k_s, v_s = sequence_inputs(varlen, sequence, rows, keys)
        out_s, lse_s = scaled_dot_product_attention(
            q_s, k_s, v_s, return_lse=True,
            **sequence_options(varlen, sequence))  # (s + 1, H, Lq_s, Dv), (s + 1, H, Lq_s)
        out[rows] = out_s[sequence].transpose(1, 0, 2)  # (Lq_s, H, Dv)
        lse[:, rows] = lse_s[sequence]  # (H, Lq_s)
    return (out, lse) if return_lse else out


@takes_options(after=("score_mod_grad", "score_mod_args_grad"))
def varlen_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *,
                              score_mod_grad=None, score_mod_args_grad=None, **options):
    """Gradients of :func:`varlen_attention`, one reference backward per sequence.

    Same arguments and results as :func:`fastattn.varlen_attention_backward`. The
    other entries of each sequence's batch get a zero ``grad_out``, so they add
    nothing to the gradients.

    Parameters
    ----------
    grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k
        As for :func:`fastattn.varlen_attention_backward`.
    {options}
    score_mod_grad, score_mod_args_grad : numba-compiled functions, optional

    Returns
    -------
    grad_q, grad_k, grad_v : ndarray
        Shaped like ``q``, ``k`` and ``v``.
    grad_score_mod_args : tuple of ndarray, only with ``score_mod_args_grad``
    """
    varlen = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,
                          options_from(options, "varlen_attention_backward"))
    grad_out, out, lse = check_varlen_backward_arrays(varlen, grad_out, out, lse)
    problem = varlen.problem
    grad_q = np.zeros((problem.q_len, varlen.heads, problem.head_dim))  # (total_q, H, Dk)
    kv_heads = varlen.heads // problem.gqa_group
    grad_k = np.zeros((problem.kv_len, kv_heads, problem.head_dim))  # (total_k, Hkv, Dk)
    grad_v = np.zeros((problem.kv_len, kv_heads, problem.value_dim))  # (total_k, Hkv, Dv)
    arg_grads = None
    for sequence, (rows, keys) in enumerate(sequence_rows(varlen)):
        q_s, k_s, v_s = sequence_inputs(varlen, sequence, rows, keys)
        batch = sequence + 1
        grad_out_s = np.zeros((batch,) + grad_out[rows].transpose(1, 0, 2).shape)
        grad_out_s[sequence] = grad_out[rows].transpose(1, 0, 2)  # (H, Lq_s, Dv), others 0
        out_s = np.broadcast_to(out[rows].transpose(1, 0, 2), grad_out_s.shape)
        lse_s = np.broadcast_to(lse[:, rows], grad_out_s.shape[:-1])  # (s + 1, H, Lq_s)
        results = scaled_dot_product_attention_backward(
            grad_out_s, q_s, k_s, v_s, out_s, lse_s, score_mod_grad=score_mod_grad,
            score_mod_args_grad=score_mod_args_grad, **sequence_options(varlen, sequence))
        grad_q[rows] = results[0][sequence].transpose(1, 0, 2)  # (Lq_s, H, Dk)
        grad_k[keys] = results[1][sequence].transpose(1, 0, 2)  # (Lk_s, Hkv, Dk)
        grad_v[keys] = results[2][sequence].transpose(1, 0, 2)  # (Lk_s, Hkv, Dv)
        if score_mod_args_grad is not None:
            arg_grads = results[3] if arg_grads is None else tuple(
                total + part for total, part in zip(arg_grads, results[3]))
    out_dtype = problem.out_dtype
    grads = tuple(grad.astype(out_dtype) for grad in (grad_q, grad_k, grad_v))
    if score_mod_args_grad is not None:
        grads += (arg_grads if arg_grads is not None else tuple(
            np.zeros(arg.shape, problem.compute_dtype) for arg in problem.score_mod_args),)
    return grads


def sequence_rows(varlen):
    """``(query rows, key rows)`` slices of each sequence."""
    starts_q, starts_k = varlen.query_starts, varlen.key_starts
    return [(slice(starts_q[s], starts_q[s + 1]), slice(starts_k[s], starts_k[s + 1]))
            for s in range(varlen.n_seq)]


def sequence_inputs(varlen, sequence, rows, keys):
    """Sequence ``sequence``'s query, key and value as a batch of ``sequence + 1``
    identical entries: ``(s + 1, H, Lq_s, Dk)``, ``(s + 1, Hkv, Lk_s, Dk)``,
    ``(s + 1, Hkv, Lk_s, Dv)`` broadcast views."""
    problem = varlen.problem  # head-major (heads, total, D) views
    return tuple(np.broadcast_to(array[:, span], (sequence + 1,) + array[:, span].shape)
                 for array, span in ((problem.query, rows), (problem.key, keys),
                                     (problem.value, keys)))


def sequence_options(varlen, sequence):
    """The keyword options of sequence ``sequence``'s reference call: the packed
    call's, with grouped-query attention when ``Hkv < H`` and the ALiBi slopes of the
    batch's first ``sequence + 1`` entries."""
    options = varlen.problem.options.as_keywords()
    options["enable_gqa"] = varlen.problem.gqa_group > 1
    if options.get("alibi_slopes") is not None:  # broadcast to (n_seq, H) when checked
        options["alibi_slopes"] = np.asarray(options["alibi_slopes"])[:sequence + 1]
    return options
