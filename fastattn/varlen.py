"""Attention over packed sequences of different lengths (FlashAttention's varlen layout).

``varlen_attention`` and its backward take the sequences of a batch packed one after
another along the first axis, with their offsets ``cu_seqlens``, check the call into a
:class:`~fastattn._contract.packed_sequences.VarlenProblem` and hand it to
:mod:`fastattn._dispatch.packed_run`, which runs the same fused kernels as
:func:`fastattn.scaled_dot_product_attention` over each (sequence, head): no work on
padding, since there is none.
"""

from fastattn._contract.options import options_from, takes_options
from fastattn._contract.problem import check_score_mod_grad
from fastattn._contract.packed_sequences import check_varlen, check_varlen_backward_arrays
from fastattn._dispatch.packed_run import run_varlen_backward, run_varlen_forward

__all__ = ["varlen_attention", "varlen_attention_backward"]


@takes_options(after=("return_lse",))
def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, return_lse=False, **options):
    r"""Attention over packed sequences of different lengths, by the fused kernels.

    Sequence ``s`` holds query rows ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]`` of ``q``
    and key rows ``cu_seqlens_k[s]:cu_seqlens_k[s + 1]`` of ``k`` and ``v``; each
    sequence attends to its own keys only:

    .. math::

        \mathrm{out}_s = \mathrm{softmax}\!\left(\mathrm{scale}\cdot Q_s K_s^\top,
        \text{masked}\right) V_s

    the same result as :func:`fastattn.scaled_dot_product_attention` on each
    sequence alone, in one call and with no work on padding.

    {score_order}

    Parameters
    ----------
    q : array_like, shape ``(total_q, H, Dk)``
    k : array_like, shape ``(total_k, Hkv, Dk)``
    v : array_like, shape ``(total_k, Hkv, Dv)``
        ``H`` a multiple of ``Hkv``: grouped-query attention is implied by
        ``Hkv < H`` (query head ``h`` uses kv head ``h // (H // Hkv)``).
    cu_seqlens_q, cu_seqlens_k : array_like of int, shape ``(n_seq + 1,)``
        Each sequence's first row, then the row count: starting at 0,
        non-decreasing, ending at ``total_q`` (``total_k``). Empty sequences are
        allowed.
    {options}
    return_lse : bool, default False
        Also return the natural log-sum-exp of each row ``(H, total_q)``.

    Returns
    -------
    out : ndarray, shape ``(total_q, H, Dv)``
    lse : ndarray, shape ``(H, total_q)``, only if ``return_lse``

    Raises
    ------
    ValueError
        Offsets that do not start at 0, decrease, or do not end at the row count
        (naming ``cu_seqlens_q`` or ``cu_seqlens_k``), shapes that do not fit.
    NotImplementedError
        ``bias``, ``kv_lengths``, ``block_mask`` or ``chunk_of``: the packed layout
        has no padding and no dense operands.

    Notes
    -----
    Positions are counted within each sequence: the causal rule and the window use
    ``off = 0`` (``causal_alignment="top_left"``, the default) or ``off = Lk_s - Lq_s``
    (``"bottom_right"``: FlashAttention's causal rule, whose default it is) of each
    sequence; ``score_mod`` and ``mask_mod`` see ``b`` = the sequence, ``h`` the head,
    ``i`` and ``j`` the positions within the sequence; ALiBi slopes are ``(H,)`` or
    ``(n_seq, H)`` and add ``-slope * |i + off - j|`` (FlashAttention's causal ALiBi
    adds ``slope * j`` instead: the same softmax where ``j <= i + off``, since the
    two differ by a constant per row); dropout decisions are those of a padded
    ``(n_seq, H)`` batch. A row that sees no key gives output 0 and lse ``-inf``.
    The output is a view of the kernels' head-major result.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> lengths = [5, 0, 12, 3]                        # four sequences, one empty
    >>> cu_seqlens = np.concatenate([[0], np.cumsum(lengths)])
    >>> q, k, v = (rng.standard_normal((20, 4, 8)) for _ in range(3))  # (total, H, D)
    >>> out = fastattn.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, causal=True)
    >>> out.shape
    (20, 4, 8)

    The third sequence, alone:

    >>> rows = slice(5, 17)
    >>> alone = fastattn.scaled_dot_product_attention(
    ...     q[rows].transpose(1, 0, 2), k[rows].transpose(1, 0, 2),
    ...     v[rows].transpose(1, 0, 2), causal=True)   # (H, 12, D)
    >>> bool(np.allclose(out[rows], alone.transpose(1, 0, 2)))
    True
    """
    varlen = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,
                          options_from(options, "varlen_attention"))
    out, lse = run_varlen_forward(varlen)
    return (out, lse) if return_lse else out


@takes_options(after=("score_mod_grad", "score_mod_args_grad"))
def varlen_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *,
                              score_mod_grad=None, score_mod_args_grad=None, **options):
    r"""Gradients of :func:`fastattn.varlen_attention`, by the fused backward kernel.

    The vector-Jacobian product of the packed forward under the same options, from
    its ``out`` and ``lse`` (``return_lse=True``); for each sequence, with
    :math:`P = \exp(S - \mathrm{lse})` and :math:`D_i = \sum_d dO_{id} O_{id}`,

    .. math::

        dV = P^\top dO, \quad dS = P \odot (dO\, V^\top - D), \quad
        dQ = \mathrm{scale}\; dS\, K, \quad dK = \mathrm{scale}\; dS^\top Q.

    Parameters
    ----------
    grad_out : array_like, shape ``(total_q, H, Dv)``
        Gradient of the loss with respect to ``out``.
    q, k, v, cu_seqlens_q, cu_seqlens_k
        The forward's inputs.
    out : array_like, shape ``(total_q, H, Dv)``
    lse : array_like, shape ``(H, total_q)``
        The forward's results.
    {options}
    score_mod_grad, score_mod_args_grad : numba-compiled functions, optional
        As for :func:`fastattn.scaled_dot_product_attention_backward`.

    Returns
    -------
    grad_q, grad_k, grad_v : ndarray
        Shaped like ``q``, ``k`` and ``v``; each kv head gets the sum over its
        group of query heads; rows that saw no key, and keys no row saw, get zeros.
    grad_score_mod_args : tuple of ndarray, only with ``score_mod_args_grad``

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> cu_seqlens = np.array([0, 7, 7, 19])
    >>> q = rng.standard_normal((19, 4, 8))            # (total_q, H, D)
    >>> k, v = (rng.standard_normal((19, 2, 8)) for _ in range(2))  # Hkv = 2
    >>> out, lse = fastattn.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, causal=True,
    ...                                      return_lse=True)
    >>> grad_q, grad_k, grad_v = fastattn.varlen_attention_backward(
    ...     np.ones_like(out), q, k, v, out, lse, cu_seqlens, cu_seqlens, causal=True)
    >>> grad_q.shape, grad_k.shape
    ((19, 4, 8), (19, 2, 8))

    Each row's weights sum to 1, so ``dV`` of a sequence sums to its query count
    times the query heads per kv head:

    >>> bool(np.allclose(grad_v[7:].sum(axis=0), 12 * 2))
    True
    """
    options = options_from(options, "varlen_attention_backward")
    varlen = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, options)
    varlen.problem = check_score_mod_grad(varlen.problem, score_mod_grad, score_mod_args_grad)
    grad_out, out, lse = check_varlen_backward_arrays(varlen, grad_out, out, lse)
    return run_varlen_backward(varlen, grad_out, out, lse)
