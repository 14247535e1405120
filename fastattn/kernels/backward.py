"""Fused backward attention kernel: FlashAttention-2 style recomputation.

Nothing of size ``Lq*Lk`` is kept from the forward; the probabilities are recomputed
block by block from the forward's log-sum-exp, ``P = exp(S - lse)``. With
``D_i = rowsum(dO_i * O_i)`` precomputed:

    dV += P^T dO,   dP = dO V^T,   dS = P * (dP - D),
    dQ += scale * dS K,   dK += scale * dS^T Q.

One parallel pass computes all five products once per block. Its tasks are
(batch entry, key group): group ``g`` of ``G`` takes key blocks ``g, g + G, ...``,
owns their ``dK`` and ``dV`` outright, and adds its share of ``dQ`` into a buffer of
its own; the ``G`` shares are summed afterwards in a fixed order. No two tasks write
the same memory, and ``G`` depends on the problem's shape only, so the result is the
same for every thread count. Extra memory: ``G`` copies of ``dQ``, O(L*D).
"""

import numpy as np
from numba import prange, types

from fastattn.kernels.config import (array_type, jit_helper, kernel_per_dtype,
                                     problem_argument_types)
from fastattn.kernels.masking import mask_scores
from fastattn.kernels.vector_math import LOG2E, exp2


@jit_helper
def probabilities_and_score_grads(scores, grad_probs, row_start, key_start, row_lse,
                                  row_delta, kv_stop, diag_offset, reach_left,
                                  reach_right, mask, mask_entry, mask_row_step, mask_col_step,
                                  has_mask, bias, bias_entry, bias_row_step, bias_col_step,
                                  has_bias):
    """In place: ``scores`` (``log2(e) * scale * q.k``) becomes ``P``, ``grad_probs``
    (``dP``) becomes ``dS``.

    ``P = exp(scale * q.k + bias - lse)``, 0 where a key is hidden or a row sees no
    key (``lse = -inf``); ``dS = P * (dP - D)``. ``row_lse`` and ``row_delta`` are
    indexed by absolute query position.
    """
    rows, cols = scores.shape
    mask_scores(scores, row_start, key_start, kv_stop, diag_offset, reach_left, reach_right,
                mask, mask_entry, mask_row_step, mask_col_step, has_mask, bias, bias_entry,
                bias_row_step, bias_col_step, has_bias, LOG2E)
    for r in range(rows):
        lse = row_lse[row_start + r]
        if lse == -np.inf:  # the row saw no key: no probability, no gradient
            scores[r, :] = 0.0
            grad_probs[r, :] = 0.0
            continue
        lse2 = lse * LOG2E
        delta = row_delta[row_start + r]
        for c in range(cols):
            p = exp2(scores[r, c] - lse2)
            scores[r, c] = p
            grad_probs[r, c] = p * (grad_probs[r, c] - delta)


def _attention_backward(query, key, value, query_index, key_index, value_index,
                        mask, mask_index, mask_row_step, mask_col_step, has_mask,
                        bias, bias_index, bias_row_step, bias_col_step, has_bias,
                        kv_lengths, has_kv_lengths, diag_offset, reach_left, reach_right,
                        scale, block_q, block_k, grad_out, lse, delta,
                        query_grad_parts, grad_key, grad_value):
    """Gradients for every entry ``b`` of the flattened batch (see the module docstring).

    ``grad_out`` ``(N, Lq, Dv)``, ``lse`` and ``delta`` ``(N, Lq)`` are per entry.
    Writes ``grad_key`` ``(N, Lk, Dk)``, ``grad_value`` ``(N, Lk, Dv)`` and, for each of
    the ``G`` key groups, ``query_grad_parts[g]`` ``(N, Lq, Dk)``: that group's share of
    ``dQ / scale``, which the caller sums over ``g`` and scales. All must be zeroed:
    keys no query sees, and rows that see no key, are never written.
    """
    n_groups, n_batch, q_len, _ = query_grad_parts.shape
    kv_len = grad_key.shape[1]
    log2_scale = scale * LOG2E
    n_k_blocks = (kv_len + block_k - 1) // block_k

    head_dim, value_dim = key.shape[2], value.shape[2]
    for task in prange(n_batch * n_groups):
        b = task // n_groups
        group = task - b * n_groups
        kv_stop = kv_lengths[b] if has_kv_lengths else kv_len
        mask_entry = mask_index[b] if has_mask else 0
        bias_entry = bias_index[b] if has_bias else 0
        queries = query[query_index[b]]  # (Lq, Dk)
        grads = grad_out[b]  # (Lq, Dv)
        keys_all = key[key_index[b]]  # (Lk, Dk)
        values_all = value[value_index[b]]  # (Lk, Dv)
        query_grads = query_grad_parts[group, b]  # (Lq, Dk) this group's share of dQ / scale
        # Buffers for every block of this task: allocating per block would cost a
        # page-faulting mmap for each large product.
        scaled_rows_buffer = np.empty(block_q * head_dim, dtype=grad_key.dtype)
        probs_buffer = np.empty(block_q * block_k, dtype=grad_key.dtype)
        score_grads_buffer = np.empty(block_q * block_k, dtype=grad_key.dtype)
        product_buffer = np.empty(max(block_q, block_k) * max(head_dim, value_dim),
                                  dtype=grad_key.dtype)
        key_grad_buffer = np.empty(block_k * head_dim, dtype=grad_key.dtype)
        value_grad_buffer = np.empty(block_k * value_dim, dtype=grad_key.dtype)
        # Key blocks group, group + G, group + 2G, ...: under a causal mask early key
        # blocks are seen by more rows, so striding spreads the work evenly.
        for k_block in range(group, n_k_blocks, n_groups):
            key_start = k_block * block_k
            key_stop = min(key_start + block_k, kv_stop)
            if key_start >= key_stop:
                break
            cols = key_stop - key_start
            keys = keys_all[key_start:key_stop]  # (cols, Dk)
            values = values_all[key_start:key_stop]  # (cols, Dv)
            # query rows that may see a key of [key_start, key_stop): lo(i) < key_stop,
            # hi(i) > key_start
            row_first = min(max(key_start - diag_offset - reach_right, 0), q_len)
            row_last = max(min(key_stop - 1 - diag_offset + reach_left + 1, q_len), row_first)
            key_grad = block_view(key_grad_buffer, cols, head_dim)  # (cols, Dk) dK / scale
            value_grad = block_view(value_grad_buffer, cols, value_dim)  # (cols, Dv)
            key_grad[:] = 0.0
            value_grad[:] = 0.0
            for row_start in range(row_first, row_last, block_q):
                row_stop = min(row_start + block_q, row_last)
                rows = row_stop - row_start
                q_rows = queries[row_start:row_stop]  # (rows, Dk)
                grad_rows = grads[row_start:row_stop]  # (rows, Dv)
                scaled_rows = block_view(scaled_rows_buffer, rows, head_dim)  # (rows, Dk)
                for r in range(rows):
                    for d in range(head_dim):
                        scaled_rows[r, d] = q_rows[r, d] * log2_scale
                probs = block_view(probs_buffer, rows, cols)  # (rows, cols)
                score_grads = block_view(score_grads_buffer, rows, cols)  # (rows, cols)
                np.dot(scaled_rows, keys.T, probs)  # scores in log2 units, then P
                np.dot(grad_rows, values.T, score_grads)  # dP, then dS
                probabilities_and_score_grads(
                    probs, score_grads, row_start, key_start, lse[b], delta[b],
                    kv_stop, diag_offset, reach_left, reach_right, mask, mask_entry,
                    mask_row_step, mask_col_step, has_mask, bias, bias_entry, bias_row_step,
                    bias_col_step, has_bias)
                product = block_view(product_buffer, cols, value_dim)  # (cols, Dv)
                np.dot(probs.T, grad_rows, product)  # P^T dO
                value_grad += product
                product = block_view(product_buffer, cols, head_dim)  # (cols, Dk)
                np.dot(score_grads.T, q_rows, product)  # dS^T Q
                key_grad += product
                product = block_view(product_buffer, rows, head_dim)  # (rows, Dk)
                np.dot(score_grads, keys, product)  # dS K
                query_grads[row_start:row_stop] += product
            for c in range(cols):
                for d in range(head_dim):
                    grad_key[b, key_start + c, d] = key_grad[c, d] * scale
            grad_value[b, key_start:key_stop] = value_grad


@jit_helper
def block_view(buffer, rows, cols):
    """The first ``rows * cols`` entries of a flat buffer as a C-contiguous
    ``(rows, cols)`` array (a slice of a 2-D buffer would not be contiguous)."""
    return buffer[:rows * cols].reshape((rows, cols))


def _backward_signature(dtype):
    writable3 = array_type(dtype, 3, readonly=False)
    return types.void(
        *problem_argument_types(dtype),
        types.int64, types.int64,  # block_q, block_k
        array_type(dtype, 3), array_type(dtype, 2), array_type(dtype, 2),  # dO, lse, delta
        array_type(dtype, 4, readonly=False),  # query_grad_parts
        writable3, writable3,  # grad_key, grad_value
    )


backward_kernel = kernel_per_dtype(_attention_backward, _backward_signature)
