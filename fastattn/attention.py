"""Public scaled dot-product attention: validates and lays out, then calls the fused kernel."""

import functools
import math

import numpy as np

from fastattn.problem import check_attention
from fastattn.threads import get_num_threads, single_threaded_blas
from fastattn.kernels.forward import exact_rows_kernel, forward_kernel
from fastattn.kernels.score_functions import problem_hook
from fastattn.layout import (ForwardOutputs, KeySpans, Tiling, fold_query_groups, placeholder,
                             problem_arguments)

# Keys per inner block, and the most query rows per prange task. Large blocks keep
# the two BLAS products per block efficient; see choose_block_q for smaller ones.
BLOCK_K = 512
BLOCK_Q = 256
# Fewest prange tasks a call should offer before query blocks are made smaller.
MIN_TASKS = 16
# Below this many multiply-adds per matrix product no BLAS starts threads of its own
# (OpenBLAS's threshold is 4x larger), so tiny calls skip the BLAS thread switch.
SERIAL_BLAS_WORK = 65536


def scaled_dot_product_attention(query, key, value, mask=None, *, bias=None, causal=False,
                                 causal_alignment="top_left", window=None, kv_lengths=None,
                                 scale=None, enable_gqa=False, return_weights=False,
                                 return_lse=False, softcap=None, alibi_slopes=None,
                                 score_mod=None, mask_mod=None, block_mask=None):
    r"""Scaled dot-product attention computed by a fused Numba kernel.

    .. math::

        \mathrm{out} = \mathrm{softmax}\!\left(\mathrm{scale}\cdot QK^\top + B,
        \text{masked}\right) V, \qquad \mathrm{scale} = 1/\sqrt{d_k}\ \text{by default}

    A score is built in this order: ``s = scale * q.k``; with ``softcap``,
    ``s = softcap * tanh(s / softcap)``; with ``alibi_slopes``,
    ``s -= slope * |i + off - j|``; then the bias is added; then
    ``s = score_mod(s, b, h, i, j)``; finally keys hidden by the mask, the
    structural rules or ``mask_mod`` become ``-inf``.

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
    bias : array_like, optional
        Real, broadcastable to ``(*batch, Lq, Lk)``, added to the scaled scores.
        ``-inf`` hides a key; ``+inf`` is refused. Cast to the compute dtype.
    causal : bool, default False
        Key ``j`` is visible to query ``i`` only if ``j <= i + off``.
    causal_alignment : {"top_left", "bottom_right"}, default "top_left"
        ``off = 0`` (PyTorch ``is_causal``) or ``off = Lk - Lq`` (KV-cache decoding).
        Also places the window.
    window : (int, int), optional
        ``(left, right)``: key ``j`` visible iff ``i + off - left <= j <= i + off + right``.
    kv_lengths : array_like of int, optional
        One per index of the first batch axis (one entry for 2-D inputs): keys
        ``j >= kv_lengths[b]`` are padding.
    scale : float, optional
        Finite; default ``1 / sqrt(Dk)`` (1.0 when ``Dk == 0``).
    enable_gqa : bool, default False
        Grouped-query attention: axis -3 is heads, query head ``h`` uses kv head
        ``h // (Hq // Hkv)``.
    return_weights : bool, default False
        Also return the attention weights ``(*batch, Lq, Lk)`` (O(Lq*Lk) memory).
    return_lse : bool, default False
        Also return the natural log-sum-exp of each row's scores ``(*batch, Lq)``.
    softcap : float, optional
        Positive and finite: caps the scores smoothly, ``s = softcap * tanh(s /
        softcap)`` (Gemma 2, Grok; FlashAttention's ``softcap``).
    alibi_slopes : array_like, optional
        Real and finite, broadcastable to the batch shape (``(H,)`` for
        ``(B, H, L, D)`` inputs): ``s -= slope * |i + off - j|``, ``off`` as in
        ``causal_alignment`` (ALiBi; FlashAttention's ``alibi_slopes``).
    score_mod : numba-compiled function ``(s, b, h, i, j) -> float``, optional
        Called on each score ``s`` of query ``i`` and key ``j`` inside the kernels
        (no ``(Lq, Lk)`` array is built); its result is the new score. ``b`` and
        ``h``: with two or more batch axes ``h`` indexes the last one (heads) and
        ``b`` the others, flattened in C order; with one, ``b`` indexes it and
        ``h = 0``; with none both are 0. A ``-inf`` score (a key hidden by a ``-inf``
        bias) is left alone.
    mask_mod : numba-compiled function ``(b, h, i, j) -> bool``, optional
        True where query ``i`` may attend to key ``j``; combined with the other
        visibility rules by AND. Evaluated on every score; for masks with whole
        empty tiles, a ``block_mask`` skips them.
    block_mask : BlockMask, optional
        From :func:`fastattn.create_block_mask` for this batch shape, ``Lq`` and
        ``Lk``; it carries its ``mask_mod``. Empty tiles are skipped and full ones
        need no ``mask_mod`` calls; the kernels then work in the mask's tiles.

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
    """
    problem = check_attention(query, key, value, mask, bias=bias, causal=causal,
                              causal_alignment=causal_alignment, window=window,
                              kv_lengths=kv_lengths, scale=scale, enable_gqa=enable_gqa,
                              softcap=softcap, alibi_slopes=alibi_slopes,
                              score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask)
    out, weights, lse = run_forward(problem, return_weights)
    return selected_results(out, weights, lse, return_weights, return_lse)


def selected_results(out, weights, lse, return_weights, return_lse):
    """``out``, or the tuple of ``out`` and the extra results asked for, in the
    contract's order ``(out, weights, lse)`` (shared with :mod:`fastattn.torch`)."""
    results = (out,)
    if return_weights:
        results += (weights,)
    if return_lse:
        results += (lse,)
    return results[0] if len(results) == 1 else results


def run_forward(problem, return_weights):
    """Lay a validated :class:`~fastattn.problem.AttentionProblem` out for the kernel,
    run it, and shape the results: ``(out, weights, lse)`` (``weights`` a placeholder
    unless ``return_weights``)."""
    folded = fold_query_groups(problem)
    if folded is not None:  # GQA decoding: one pass over each kv head
        out, weights, lse = run_forward(folded, return_weights)
        if return_weights:
            weights = weights.reshape(problem.weights_shape)  # (*batch, Hq, 1, Lk)
        return out.reshape(problem.out_shape), weights, lse.reshape(problem.lse_shape)
    dtype = problem.compute_dtype
    n_batch = math.prod(problem.batch_shape)
    out = np.empty((n_batch, problem.q_len, problem.value_dim), dtype)  # (N, Lq, Dv)
    lse = np.empty((n_batch, problem.q_len), dtype)  # (N, Lq)
    if return_weights:
        weights = np.zeros((n_batch, problem.q_len, problem.kv_len), dtype)  # (N, Lq, Lk)
    else:
        weights = placeholder(dtype, 3, writeable=True)  # never written

    block_size = problem.block_mask.block_size if problem.block_mask is not None else None
    (block_q, block_k), split_len, n_splits, blas_threads = forward_plan(
        n_batch, problem.q_len, problem.kv_len, problem.head_dim, problem.value_dim,
        bool(return_weights), block_size)
    if n_splits > 1:
        split_out = np.empty((n_splits, n_batch, problem.q_len, problem.value_dim),
                             dtype)  # (splits, N, Lq, Dv)
        split_lse = np.empty((n_splits, n_batch, problem.q_len), dtype)  # (splits, N, Lq)
    else:
        split_out = placeholder(dtype, 4, writeable=True)  # never written
        split_lse = placeholder(dtype, 3, writeable=True)
    if n_batch and problem.q_len:
        arguments = problem_arguments(problem, problem_hook(problem))
        outputs = ForwardOutputs(out, lse, weights, bool(return_weights))
        tiling = Tiling(block_q, block_k, get_num_threads())  # a slot per thread
        with single_threaded_blas(blas_threads):
            marked = forward_kernel(dtype)(*arguments, tiling, outputs,
                                           KeySpans(split_len, split_out, split_lse))
            if marked:  # rows where a NaN met the block products (their lse is NaN):
                # again, summing visible keys only, so that a hidden NaN stays out
                rows = np.ascontiguousarray(np.argwhere(np.isnan(lse)), np.int64)  # (K, 2)
                exact_rows_kernel(dtype)(*arguments, tiling, outputs, rows)

    out_dtype = problem.out_dtype
    out = out.reshape(problem.out_shape)  # (*batch, Lq, Dv)
    lse = lse.reshape(problem.lse_shape)  # (*batch, Lq)
    if out_dtype != dtype:  # float16 inputs: computed in float32
        out, lse = out.astype(out_dtype), lse.astype(out_dtype)
    if return_weights:
        weights = weights.reshape(problem.weights_shape).astype(out_dtype, copy=False)
    return out, weights, lse


@functools.lru_cache(maxsize=256)
def forward_plan(n_batch, q_len, kv_len, head_dim, value_dim, return_weights, block_size=None):
    """How the forward kernel tiles a call, from its shape alone (cached, so repeated
    shapes skip it): ``((block_q, block_k), split_len, n_splits, blas_threads)``.

    ``block_size`` is a block mask's ``(block_q, block_k)`` (the kernels then work in
    its tiles), else None: ``choose_block_q`` and ``BLOCK_K``. Keys are split into
    spans of ``split_len`` (:func:`choose_split_len`), unless the weights are returned
    (they need each row's whole softmax in one task). ``blas_threads``: whether a
    block product is large enough for BLAS to thread (see :data:`SERIAL_BLAS_WORK`).
    """
    block_q, block_k = block_size or (choose_block_q(n_batch, q_len), BLOCK_K)
    split_len = kv_len
    if not return_weights:
        split_len = choose_split_len(n_batch * -(-q_len // block_q), kv_len, block_k)
    split_len = max(split_len, 1)  # keys per span; the kernel reads the count off split_out
    n_splits = max(1, -(-kv_len // split_len))
    largest_product = block_q * min(kv_len, block_k) * max(head_dim, value_dim)
    return ((block_q, block_k), split_len, n_splits,
            largest_product > SERIAL_BLAS_WORK)


def choose_split_len(n_tasks, kv_len, block_k=BLOCK_K):
    """Keys per span when a call's ``n_tasks`` query blocks are fewer than
    ``MIN_TASKS``: the keys are cut into spans of whole ``block_k`` blocks so that
    query blocks x spans reaches ``MIN_TASKS`` (decoding one token against a long
    cache, say), and the spans' results are merged by their log-sum-exp. Returns
    ``kv_len`` (no split) when the call has enough tasks or too few keys. Depends on
    the shape only, so results are bitwise identical for every thread count."""
    n_key_blocks = -(-kv_len // block_k)
    if n_tasks >= MIN_TASKS or n_key_blocks < 2:
        return kv_len
    wanted_splits = -(-MIN_TASKS // max(n_tasks, 1))
    return max(1, n_key_blocks // wanted_splits) * block_k


def choose_block_q(n_batch, q_len):
    """Query rows per task: ``BLOCK_Q``, halved (down to 16) until the call has
    ``MIN_TASKS`` tasks. Depends on the shape only, never on the thread count, so
    results are bitwise identical however many threads run."""
    block_q = BLOCK_Q
    while block_q > 16 and n_batch * -(-q_len // block_q) < MIN_TASKS:
        block_q //= 2
    return block_q
