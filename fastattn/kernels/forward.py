"""Fused forward attention kernel: scaled, masked online softmax and weighted sum.

FlashAttention-2 loop order: query blocks outside (one ``prange`` task per batch
entry and query block), key/value blocks inside. Each task keeps a running row
maximum, a running row sum and a rescaled output accumulator, so no ``(Lq, Lk)``
matrix is ever built; extra memory is one ``(block_q, block_k)`` score block and one
``(block_q, Dv)`` accumulator per task.

Visibility (causal, window, kv_lengths, mask) is applied block by block by
:mod:`fastattn.kernels.masking`; key blocks that no query of a block can see are
never visited.
"""

import math

import numpy as np
from numba import prange, types

from fastattn.kernels.config import array_type, jit_kernel
from fastattn.kernels.masking import mask_scores, visible_range


def _attention_forward(query, key, value, query_index, key_index, value_index,
                       mask, mask_index, mask_row_step, mask_col_step, has_mask,
                       bias, bias_index, bias_row_step, bias_col_step, has_bias,
                       kv_lengths, diag_offset, reach_left, reach_right, scale,
                       block_q, block_k, out, lse, weights, return_weights):
    """Compute attention for every batch entry ``b`` of the flattened batch.

    Entry ``b`` reads ``query[query_index[b]]`` ``(Lq, Dk)``, ``key[key_index[b]]``
    ``(Lk, Dk)``, ``value[value_index[b]]`` ``(Lk, Dv)``, ``mask[mask_index[b]]`` and
    ``bias[bias_index[b]]``, and writes ``out[b]`` ``(Lq, Dv)``, ``lse[b]`` ``(Lq,)``
    and, if ``return_weights``, ``weights[b]`` ``(Lq, Lk)`` (which must be zeroed).
    """
    n_batch, q_len, value_dim = out.shape
    n_q_blocks = (q_len + block_q - 1) // block_q
    for task in prange(n_batch * n_q_blocks):
        b = task // n_q_blocks
        q_start = (task - b * n_q_blocks) * block_q
        q_stop = min(q_start + block_q, q_len)
        rows = q_stop - q_start
        kv_stop = kv_lengths[b]
        # Slicing with [i, a:b] (no trailing ':') keeps Numba's 'C' layout, so np.dot
        # reads the blocks in place instead of copying them.
        q_block = query[query_index[b], q_start:q_stop]  # (rows, Dk)
        keys = key[key_index[b]]  # (Lk, Dk)
        values = value[value_index[b]]  # (Lk, Dv)
        first_key = visible_range(q_start, kv_stop, diag_offset, reach_left, reach_right)[0]
        last_key = visible_range(q_stop - 1, kv_stop, diag_offset, reach_left, reach_right)[1]

        row_max = np.full(rows, -np.inf)  # (rows,) running max of the scores
        row_sum = np.zeros(rows)  # (rows,) running sum of exp(score - row_max)
        acc = np.zeros((rows, value_dim), dtype=out.dtype)  # (rows, Dv) unnormalised output
        for key_start in range(first_key, last_key, block_k):
            key_stop = min(key_start + block_k, last_key)
            scores = np.dot(q_block, keys[key_start:key_stop].T)  # (rows, cols)
            mask_scores(scores, q_start, key_start, kv_stop, scale, diag_offset,
                         reach_left, reach_right, mask, mask_index[b], mask_row_step,
                         mask_col_step, has_mask, bias, bias_index[b], bias_row_step,
                         bias_col_step, has_bias)
            for r in range(rows):
                new_max = row_max[r]
                for c in range(scores.shape[1]):
                    new_max = max(new_max, scores[r, c])
                if new_max == -np.inf:  # nothing visible to this row yet
                    scores[r, :] = 0.0
                    continue
                correction = math.exp(row_max[r] - new_max)  # 0 when row_max was -inf
                block_sum = 0.0
                for c in range(scores.shape[1]):
                    p = math.exp(scores[r, c] - new_max)
                    scores[r, c] = p
                    block_sum += p
                row_sum[r] = row_sum[r] * correction + block_sum
                row_max[r] = new_max
                if correction != 1.0:
                    acc[r, :] *= correction
            acc += np.dot(scores, values[key_start:key_stop])  # (rows, Dv)

        for r in range(rows):
            row = q_start + r
            if row_sum[r] > 0.0:
                out[b, row, :] = acc[r, :] * (1.0 / row_sum[r])
                lse[b, row] = row_max[r] + math.log(row_sum[r])
            else:  # no visible key: output 0, lse -inf
                out[b, row, :] = 0.0
                lse[b, row] = -np.inf

        if return_weights:
            for key_start in range(first_key, last_key, block_k):
                key_stop = min(key_start + block_k, last_key)
                scores = np.dot(q_block, keys[key_start:key_stop].T)  # (rows, cols)
                mask_scores(scores, q_start, key_start, kv_stop, scale, diag_offset,
                             reach_left, reach_right, mask, mask_index[b], mask_row_step,
                             mask_col_step, has_mask, bias, bias_index[b], bias_row_step,
                             bias_col_step, has_bias)
                for r in range(rows):
                    row_lse = lse[b, q_start + r]
                    if row_lse == -np.inf:
                        continue
                    for c in range(scores.shape[1]):
                        weights[b, q_start + r, key_start + c] = math.exp(scores[r, c] - row_lse)


def _forward_signature(dtype):
    data3 = array_type(dtype, 3)
    index = array_type(np.int64, 1)
    return types.void(
        data3, data3, data3, index, index, index,  # query, key, value and their indices
        array_type(np.bool_, 3), index, types.int64, types.int64, types.boolean,  # mask
        data3, index, types.int64, types.int64, types.boolean,  # bias
        index, types.int64, types.int64, types.int64, types.float64,  # rules, scale
        types.int64, types.int64,  # block_q, block_k
        array_type(dtype, 3, readonly=False), array_type(dtype, 2, readonly=False),
        array_type(dtype, 3, readonly=False), types.boolean,  # out, lse, weights
    )


_compiled = {}


def forward_kernel(dtype):
    """The forward kernel compiled for ``dtype`` (float32 or float64), built on first use."""
    dtype = np.dtype(dtype)
    kernel = _compiled.get(dtype)
    if kernel is None:
        kernel = _compiled[dtype] = jit_kernel(_forward_signature(dtype))(_attention_forward)
    return kernel
