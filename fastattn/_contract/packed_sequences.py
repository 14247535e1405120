"""Packed sequences of different lengths (FlashAttention's varlen layout), validated.

:func:`check_varlen` turns the arrays of a packed call (``q (total_q, H, Dk)``,
``k (total_k, Hkv, Dk)``, ``v (total_k, Hkv, Dv)``, the offsets ``cu_seqlens_q`` and
``cu_seqlens_k``) and its :class:`~fastattn._contract.options.AttentionOptions` into a
:class:`VarlenProblem`: an :class:`~fastattn._contract.problem.AttentionProblem`
whose batch is ``(n_seq, H)`` (so that ALiBi slopes broadcast, the user functions see
``b`` = the sequence and ``h`` = the head, and dropout draws at ``(b, h, i, j)`` as
for a padded call) and whose ``query``, ``key`` and ``value`` are the head-major
views ``(H, total, D)`` of the packed arrays, plus where each sequence lies.

This module imports NumPy only.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np

from fastattn._contract.arguments import (as_real_array, default_scale, diagonal_offset,
                                          result_dtypes)
from fastattn._contract.problem import AttentionProblem, check_user_functions

__all__ = ["VarlenProblem", "check_varlen", "check_varlen_backward_arrays", "VARLEN_OPTIONS"]

# The options a packed call takes; any other one set is refused by name (a bias, a
# mask or kv_lengths have no place in the packed layout, a block mask is made for one
# padded shape), so that an option added later is never dropped silently here.
VARLEN_OPTIONS = frozenset({"causal", "causal_alignment", "window", "scale", "enable_gqa",
                            "softcap", "alibi_slopes", "score_mod", "mask_mod",
                            "score_mod_args", "mask_mod_args", "dropout_p", "dropout_seed"})


@dataclass(slots=True)
class VarlenProblem:
    """A validated packed call.

    Attributes
    ----------
    problem : AttentionProblem
        Batch shape ``(n_seq, H)``; ``query`` ``(H, total_q, Dk)``, ``key``
        ``(Hkv, total_k, Dk)`` and ``value`` ``(Hkv, total_k, Dv)`` head-major views of
        the packed arrays; ``q_len`` and ``kv_len`` the totals; ``gqa_group = H //
        Hkv``; ``diag_offset`` 0 (each sequence has its own, below).
    query_starts, key_starts : ndarray of int64, shape ``(n_seq + 1,)``
        ``cu_seqlens_q`` and ``cu_seqlens_k``.
    diag_offsets : ndarray of int64, shape ``(n_seq,)``
        Each sequence's ``off`` of the causal and window rules: 0 top-left,
        ``Lk_s - Lq_s`` bottom-right.
    """

    problem: AttentionProblem
    query_starts: np.ndarray
    key_starts: np.ndarray
    diag_offsets: np.ndarray

    @property
    def n_seq(self):
        return self.query_starts.shape[0] - 1

    @property
    def heads(self):
        return self.problem.batch_shape[1]

    @property
    def q_lens(self):
        """Query count of each sequence, int64 ``(n_seq,)``."""
        return np.diff(self.query_starts)

    @property
    def kv_lens(self):
        """Key count of each sequence, int64 ``(n_seq,)``."""
        return np.diff(self.key_starts)

    def replace_inputs(self, **arrays):
        """The problem with head-major ``query``, ``key`` or ``value`` replaced."""
        return dataclasses.replace(self, problem=dataclasses.replace(self.problem, **arrays))


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, options):
    """Validate a packed call (see :func:`fastattn.varlen_attention`).

    Returns
    -------
    VarlenProblem

    Raises
    ------
    ValueError
        Arrays that are not 3-D, head counts that do not divide, mismatched ``Dk`` or
        key counts, offsets that are not 1-D, do not start at 0, decrease, do not end
        at the row count or differ in length between queries and keys (naming
        ``cu_seqlens_q`` or ``cu_seqlens_k``), ALiBi slopes that are neither ``(H,)``
        nor ``(n_seq, H)``.
    TypeError
        Inputs of a non-real dtype, offsets that are not integers, user functions as
        :func:`fastattn.scaled_dot_product_attention` refuses them.
    NotImplementedError
        An option the packed layout does not take (``bias``, ``kv_lengths``,
        ``block_mask``, ``chunk_of``).
    """
    for name in options.as_keywords():
        if name not in VARLEN_OPTIONS:
            raise NotImplementedError(
                f"varlen_attention does not take {name}=: the packed layout has no padding "
                f"and no dense operands; pass per-sequence calls to "
                f"fastattn.scaled_dot_product_attention for it")
    q, k, v = (as_real_array(name, array) for name, array in (("q", q), ("k", k), ("v", v)))
    for name, array, meaning in (("q", q, "(total_q, H, Dk)"), ("k", k, "(total_k, Hkv, Dk)"),
                                 ("v", v, "(total_k, Hkv, Dv)")):
        if array.ndim != 3:
            raise ValueError(f"{name} must be 3-D {meaning}; got shape {array.shape}")
    total_q, heads, head_dim = q.shape
    total_k, kv_heads, value_dim = k.shape[0], k.shape[1], v.shape[2]
    if k.shape[2] != head_dim:
        raise ValueError(f"q and k must have the same last dim Dk; got q {q.shape} and "
                         f"k {k.shape}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k and v must have the same (total_k, Hkv); got k {k.shape} and "
                         f"v {v.shape}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"the query heads H must be a multiple of the kv heads Hkv "
                         f"(grouped-query attention); got q {q.shape} and k {k.shape}")
    query_starts = check_offsets("cu_seqlens_q", cu_seqlens_q, total_q, "q")
    key_starts = check_offsets("cu_seqlens_k", cu_seqlens_k, total_k, "k")
    if query_starts.shape != key_starts.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one entry per sequence "
                         f"plus one, the same count; got {query_starts.shape[0]} and "
                         f"{key_starts.shape[0]}")
    n_seq = query_starts.shape[0] - 1
    compute_dtype, out_dtype = result_dtypes(q, k, v)
    batch_shape = (n_seq, heads)
    checked = options.checked_arrays(batch_shape, total_k)
    if options.has_score_functions:
        checked.update(check_user_functions(options, batch_shape, total_q, total_k,
                                            compute_dtype))
    if options.has_operands:
        options = options.replace(**checked)
    problem = AttentionProblem(
        query=q.transpose(1, 0, 2), key=k.transpose(1, 0, 2), value=v.transpose(1, 0, 2),
        mask=None, options=options, batch_shape=batch_shape, q_len=total_q, kv_len=total_k,
        head_dim=head_dim, value_dim=value_dim, gqa_group=heads // kv_heads,
        compute_dtype=compute_dtype, out_dtype=out_dtype,
        scale=default_scale(options.scale, head_dim), diag_offset=0)
    q_lens, kv_lens = np.diff(query_starts), np.diff(key_starts)
    diag_offsets = np.array([diagonal_offset(options.causal_alignment, int(q_len), int(kv_len))
                             for q_len, kv_len in zip(q_lens, kv_lens)],
                            np.int64).reshape(n_seq)  # (n_seq,)
    return VarlenProblem(problem, query_starts, key_starts, diag_offsets)


def check_offsets(name, offsets, total, array_name):
    """``cu_seqlens_q`` or ``cu_seqlens_k`` as int64 ``(n_seq + 1,)``: 1-D integers
    starting at 0, non-decreasing, ending at ``total`` (the rows of ``array_name``)."""
    offsets = np.asarray(offsets)
    if offsets.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers (int32 or int64); got dtype "
                        f"{offsets.dtype}")
    if offsets.ndim != 1 or offsets.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D (n_seq + 1,), the sequences' first rows and "
                         f"the row count; got shape {offsets.shape}")
    offsets = np.ascontiguousarray(offsets, np.int64)
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0; got {name}[0] = {offsets[0]}")
    steps = np.diff(offsets)
    if (steps < 0).any():
        where = int(np.flatnonzero(steps < 0)[0])
        raise ValueError(f"{name} must not decrease; got {name}[{where}] = {offsets[where]} "
                         f"> {name}[{where + 1}] = {offsets[where + 1]}")
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at the row count of {array_name}, {total}; got "
                         f"{name}[-1] = {offsets[-1]}")
    return offsets


def check_varlen_backward_arrays(varlen, grad_out, out, lse):
    """``grad_out`` and ``out`` ``(total_q, H, Dv)`` and ``lse`` ``(H, total_q)`` of a
    packed backward, checked against the forward's :class:`VarlenProblem`."""
    problem = varlen.problem
    out_shape = (problem.q_len, varlen.heads, problem.value_dim)
    checked = []
    for name, array, shape, meaning in (
            ("grad_out", grad_out, out_shape, "(total_q, H, Dv)"),
            ("out", out, out_shape, "(total_q, H, Dv)"),
            ("lse", lse, (varlen.heads, problem.q_len), "(H, total_q)")):
        array = as_real_array(name, array)
        if array.shape != shape:
            raise ValueError(f"{name} must have the forward's shape {meaning} = {shape}; "
                             f"got {array.shape}")
        checked.append(array)
    return tuple(checked)
