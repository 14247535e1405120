"""Fused backward attention kernel: FlashAttention-2 style recomputation.

Nothing of size ``Lq*Lk`` is kept from the forward; the probabilities are recomputed
block by block from the forward's log-sum-exp, ``P = exp(S - lse)``, with ``S`` from
the forward's score function (:func:`fastattn.kernels.scores.block_scores`). With
``D_i = rowsum(dO_i * O_i)`` precomputed:

    dV += P^T dO,   dP = dO V^T,   dS = P * (dP - D),
    dQ += scale * dS K,   dK += scale * dS^T Q.

With a softcap, ``dS`` is multiplied by the cap's derivative
``1 - tanh(s / softcap)**2``, and with a ``score_mod`` by ``score_mod_grad`` at
the score before it; the score function writes their product alongside the scores.
With a block mask, the rows of each key block go by the mask's tiles, and empty
tiles are skipped.

One parallel pass computes all five products once per block. Its tasks are
(batch entry, key group): group ``g`` of ``G`` takes key blocks ``g, g + G, ...``,
owns their ``dK`` and ``dV`` outright, and adds its share of ``dQ`` into a buffer of
its own; the ``G`` shares are summed afterwards in a fixed order. No two tasks write
the same memory, and ``G`` depends on the problem's shape only, so the result is the
same for every thread count. Extra memory: ``G`` copies of ``dQ``, O(L*D).

The bias gradient ``dbias = dS`` (summed over the axes the bias broadcasts over) is
added into the bias's own shape: a task then runs, one after another in a fixed
order, every batch entry that shares the bias entry it writes (and ``G = 1`` when the
bias broadcasts over keys), so again no two tasks write the same memory.

NaN: ``P`` and ``dS`` are exactly 0 at hidden keys, so a NaN value (through ``dP``)
reaches exactly the gradients that depend on it. A NaN query or key would still
spread through the ``dK`` and ``dQ`` products (0 * NaN), so the kernel reports the
tasks that met one in ``gradients.nan_met``; the caller then runs it again with
those NaNs as 0, since they already reach ``P`` and ``dS`` through the forward's
NaN ``lse`` wherever they are seen.
"""

import numpy as np
from numba import njit, prange, types

from fastattn.kernels.tile_states import EMPTY, PARTIAL
from fastattn.kernels.config import jit_helper, kernel_per_dtype
from fastattn.kernels.dropout import drop_in_place
from fastattn.kernels.masking import entry_rule, key_block_rows
from fastattn.kernels.groups import TILING_TYPE, backward_types, problem_types
from fastattn.kernels.half import holds_nan, rows_in, staging
from fastattn.kernels.hooks import ARGS_GRADS, call_hook
from fastattn.kernels.scores import block_scores
from fastattn.kernels.products import product, product_add
from fastattn.kernels.vector_math import (LOG2E, block_view, cast_like, full_width_vectors,
                                          has_nan, line_aligned_rows, probability_exp2,
                                          whole_lines)


@jit_helper
def probabilities_and_score_grads(scores, grad_probs, row_start, row_lse, row_delta,
                                  values_have_nan, chain, has_chain):
    """In place: ``scores`` (log2 units, ``-inf`` where hidden) becomes ``P``,
    ``grad_probs`` (``dP``) becomes ``dS``.

    ``P = exp(score - lse)`` and ``dS = P * (dP - D)``, both 0 where a key is hidden
    or a row sees no key (``lse = -inf``); with ``has_chain`` ``dS`` is also
    multiplied by ``chain`` (same shape: ``d score / d (scale q.k)``, the softcap's
    derivative times ``score_mod_grad``), in the same loop. ``row_lse`` and ``row_delta`` are indexed by absolute query position. Rows
    with a NaN lse or ``D``, and every row when ``values_have_nan`` (``dP`` then holds
    NaN in hidden columns too), take a loop that sets hidden entries to 0 explicitly
    instead of multiplying by 0. Everything is computed in the dtype of ``scores``,
    at the CPU's full vector width (:func:`~fastattn.kernels.vector_math.full_width_vectors`).
    """
    full_width_vectors()
    rows, cols = scores.shape
    for r in range(rows):
        lse = row_lse[row_start + r]
        if lse == -np.inf:  # the row saw no key: no probability, no gradient
            scores[r, :] = 0.0
            grad_probs[r, :] = 0.0
            continue
        lse2 = cast_like(lse * LOG2E, scores)
        delta = row_delta[row_start + r]
        if values_have_nan or lse != lse or delta != delta:
            for c in range(cols):
                if scores[r, c] == -np.inf:
                    scores[r, c] = 0.0
                    grad_probs[r, c] = 0.0
                else:
                    p = probability_exp2(scores[r, c] - lse2)
                    scores[r, c] = p
                    grad = p * (grad_probs[r, c] - delta)
                    grad_probs[r, c] = grad * chain[r, c] if has_chain else grad
        elif has_chain:
            for c in range(cols):
                p = probability_exp2(scores[r, c] - lse2)
                scores[r, c] = p
                grad_probs[r, c] = p * (grad_probs[r, c] - delta) * chain[r, c]
        else:
            for c in range(cols):
                p = probability_exp2(scores[r, c] - lse2)
                scores[r, c] = p
                grad_probs[r, c] = p * (grad_probs[r, c] - delta)


def _attention_backward(inputs, options, mask, bias, visibility, tiling, extra, gradients):
    """Gradients for every entry ``b`` of the flattened batch (see the module docstring).

    ``extra`` (:class:`fastattn._dispatch.layout.BackwardInputs`) holds ``grad_out``
    ``(N, Lq, Dv)``, the forward's ``lse`` and ``delta`` ``(N, Lq)``. Writes
    ``gradients.key`` ``(N, Lk, Dk)``, ``gradients.value`` ``(N, Lk, Dv)`` and, for
    each of the ``G`` key groups, ``gradients.query_parts[g]`` ``(N, Lq, Dk)``: that
    group's share of ``dQ / scale``, which the caller sums over ``g`` and scales. All
    must be zeroed: keys no query sees, and rows that see no key, are never written.
    Sets ``gradients.nan_met[task]`` ``(N * G,)`` when a query or key block holding a
    NaN entered the task's products.
    """
    n_groups = gradients.query_parts.shape[0]
    n_entry_groups = extra.entry_starts.shape[0] - 1
    n_tasks, slots = n_entry_groups * n_groups, tiling.slots
    # Scratch memory of each slot (thread), allocated once per call: buffers
    # allocated per task become fresh, page-faulting mmaps when the allocator is told
    # to trim (MALLOC_TRIM_THRESHOLD_, as in Dask's workers). Slot s takes an equal
    # contiguous share of the tasks (their costs are alike: key groups stride).
    # With gradients of the user's arguments, the tasks are cut into a number of
    # partitions that depends on the problem only; each partition's tasks run in order
    # on one slot, adding into the partition's own gradients, summed afterwards in a
    # fixed order: the same result for every thread count. Else a task per partition.
    n_parts = gradients.arg_grad_parts if options.has_args_grad else n_tasks
    scratch = line_aligned_rows(slots, task_scratch_size(
        tiling.block_q, tiling.block_k, inputs.key.shape[2], inputs.value.shape[2],
        options.has_softcap or options.has_score_mod, options.has_args_grad)
        + staging(inputs.key, staging_size(tiling.block_q, tiling.block_k, inputs.key.shape[2],
                                           inputs.value.shape[2])),
        gradients.key)
    for slot in prange(slots):
        for part in range(slot * n_parts // slots, (slot + 1) * n_parts // slots):
            for task in range(part * n_tasks // n_parts, (part + 1) * n_tasks // n_parts):
                entry_group = task // n_groups
                group = task - entry_group * n_groups
                for position in range(extra.entry_starts[entry_group],
                                      extra.entry_starts[entry_group + 1]):
                    b = extra.entry_order[position]
                    backward_task(b * n_groups + group, b, group, part, inputs, options, mask,
                                  bias, visibility, tiling, extra, gradients, scratch[slot])


@jit_helper
def backward_task(task, b, group, part, inputs, options, mask, bias, visibility, tiling,
                  extra, gradients, scratch):
    """Task ``task`` of :func:`_attention_backward`: key group ``group`` of batch entry
    ``b``, its buffers carved from the thread's ``scratch`` (:func:`task_scratch_size`),
    adding the gradients of the user's arguments into partition ``part``."""
    query_grad_parts, grad_key, grad_value = gradients.query_parts, gradients.key, gradients.value
    nan_met = gradients.nan_met
    grad_out, lse, delta = extra.grad_out, extra.lse, extra.delta
    n_groups, _, q_len, _ = query_grad_parts.shape
    kv_len = grad_key.shape[1]
    block_q, block_k = tiling.block_q, tiling.block_k
    scale = options.scale
    n_k_blocks = (kv_len + block_k - 1) // block_k
    head_dim, value_dim = inputs.key.shape[2], inputs.value.shape[2]
    rule = entry_rule(visibility, b, kv_len)
    queries = inputs.query[inputs.query_index[b]]  # (Lq, Dk)
    grads = grad_out[b]  # (Lq, Dv)
    keys_all = inputs.key[inputs.key_index[b]]  # (Lk, Dk)
    values_all = inputs.value[inputs.value_index[b]]  # (Lk, Dv)
    query_grads = query_grad_parts[group, b]  # (Lq, Dk) this group's share of dQ / scale
    # Buffers for every block of this task, each starting on a 64-byte line (see
    # task_scratch_size); chain: d score / d (scale q.k), from the softcap and
    # score_mod_grad, only with either.
    has_chain = options.has_softcap or options.has_score_mod
    has_args_grad = options.has_args_grad
    (probs_buffer, score_grads_buffer, chain_buffer, before_buffer, key_grad_buffer,
     value_grad_buffer) = task_buffers(scratch, block_q, block_k, head_dim, value_dim,
                                       has_chain, has_args_grad)
    # 16-bit inputs: each query, output-gradient, key and value block converted to
    # the compute dtype as it is used (no buffers for float inputs, read in place)
    half_format = inputs.half_format
    query_buffer, grad_buffer, key_buffer, value_buffer = staging_buffers(
        scratch[task_scratch_size(block_q, block_k, head_dim, value_dim, has_chain,
                                  has_args_grad):],
        block_q, block_k, head_dim, value_dim, staging(queries, 1) > 0)
    # A NaN query among the rows this task's key blocks see, checked once (the rows
    # enter the products unscaled: the scale is the score product's alpha). Rows
    # between those blocks' ranges are checked too: at worst a NaN query that sees
    # no key at all asks for the NaN-free second pass, which gives the same results.
    rows_first, rows_last = q_len, 0
    for k_block in range(group, n_k_blocks, n_groups):
        key_start = k_block * block_k
        key_stop = min(key_start + block_k, rule.kv_stop)
        if key_start < key_stop:
            row_first, row_last = key_block_rows(key_start, key_stop, rule, q_len)
            if row_last > row_first:
                rows_first, rows_last = min(rows_first, row_first), max(rows_last, row_last)
    if rows_last > rows_first:
        nan_met[task] |= holds_nan(queries[rows_first:rows_last], half_format)
    # Key blocks group, group + G, group + 2G, ...: under a causal mask early key
    # blocks are seen by more rows, so striding spreads the work evenly.
    for k_block in range(group, n_k_blocks, n_groups):
        key_start = k_block * block_k
        key_stop = min(key_start + block_k, rule.kv_stop)
        if key_start >= key_stop:
            break
        cols = key_stop - key_start
        keys = rows_in(keys_all, key_start, key_stop, key_buffer, half_format)  # (cols, Dk)
        values = rows_in(values_all, key_start, key_stop, value_buffer,
                         half_format)  # (cols, Dv)
        values_have_nan = has_nan(values)
        nan_met[task] |= has_nan(keys)
        row_first, row_last = key_block_rows(key_start, key_stop, rule, q_len)
        key_grad = block_view(key_grad_buffer, cols, head_dim)  # (cols, Dk) dK / scale
        value_grad = block_view(value_grad_buffer, cols, value_dim)  # (cols, Dv)
        key_grad[:, :] = 0.0
        value_grad[:, :] = 0.0
        # with a block mask, rows go by the mask's tiles, and empty tiles are skipped
        tiles_start = row_first - row_first % block_q if visibility.has_block_mask else row_first
        for block_start in range(tiles_start, row_last, block_q):
            row_start = max(block_start, row_first)
            row_stop = min(block_start + block_q, row_last)
            rows = row_stop - row_start
            check_mask_mod = options.has_mask_mod
            if visibility.has_block_mask:
                state = visibility.block_states[visibility.block_states_index[b],
                                                block_start // block_q, k_block]
                if state == EMPTY:
                    continue
                check_mask_mod = state == PARTIAL
            q_rows = rows_in(queries, row_start, row_stop, query_buffer,
                             half_format)  # (rows, Dk)
            grad_rows = rows_in(grads, row_start, row_stop, grad_buffer,
                                half_format)  # (rows, Dv)
            probs = block_view(probs_buffer, rows, cols)  # (rows, cols)
            score_grads = block_view(score_grads_buffer, rows, cols)  # (rows, cols)
            chain = block_view(chain_buffer, rows if has_chain else 0,
                               cols)  # (rows, cols) d score / d (scale q.k)
            before_mod = block_view(before_buffer, rows if has_args_grad else 0,
                                    cols)  # (rows, cols) scores before score_mod
            block_scores(probs, q_rows, keys, row_start, key_start, b, rule, options, mask,
                         bias, chain, has_chain, check_mask_mod, before_mod)
            product(options.gemm, grad_rows, values.T, score_grads)  # dP, then dS
            if options.has_dropout:  # the gradient of the kept, rescaled probabilities
                drop_in_place(score_grads, row_start, key_start, b, options)
            # P, and dS with respect to scale * q.k, before the softcap and score_mod;
            # for the bias gradient (the score after score_mod's chain, before the
            # softcap's) the softcap's factor comes after (softcap with score_mod and a
            # bias gradient is refused by the front end)
            # for the arguments' gradients, dS with respect to score_mod's result
            chain_first = has_chain and not (gradients.has_bias and options.has_softcap)
            chain_now = chain_first and not has_args_grad
            probabilities_and_score_grads(probs, score_grads, row_start, lse[b], delta[b],
                                          values_have_nan, chain, chain_now)
            if has_args_grad:
                call_hook(options, before_mod, score_grads, row_start, key_start, b,
                          ARGS_GRADS, part)
                if chain_first:
                    multiply_in_place(score_grads, chain)
            if gradients.has_bias:
                add_bias_grads(score_grads, gradients.bias[bias.index[b]], bias, row_start,
                               key_start)
                if has_chain and not chain_first:
                    multiply_in_place(score_grads, chain)
            if options.has_dropout:  # dV takes the probabilities the forward used
                drop_in_place(probs, row_start, key_start, b, options)
            # accumulating products (gemm with beta = 1: no product buffer to zero and add)
            product_add(options.gemm, probs.T, grad_rows, value_grad)  # dV += P^T dO
            product_add(options.gemm, score_grads.T, q_rows, key_grad)  # dK / scale += dS^T Q
            product_add(options.gemm, score_grads, keys,
                        query_grads[row_start:row_stop])  # dQ / scale += dS K
        for c in range(cols):
            for d in range(head_dim):
                grad_key[b, key_start + c, d] = key_grad[c, d] * scale
        for c in range(cols):
            for d in range(value_dim):
                grad_value[b, key_start + c, d] = value_grad[c, d]


@jit_helper
def add_bias_grads(score_grads, bias_grad, bias, row_start, key_start):
    """Add ``score_grads`` ``(rows, cols)`` (``dS`` of queries ``row_start + r``, keys
    ``key_start + c``) into the bias gradient ``bias_grad`` ``(1 or Lq, 1 or Lk)`` of
    the entry's bias, summed along the axes the bias broadcasts over (its steps)."""
    rows, cols = score_grads.shape
    for r in range(rows):
        row = (row_start + r) * bias.row_step
        for c in range(cols):
            bias_grad[row, (key_start + c) * bias.col_step] += score_grads[r, c]


@jit_helper
def multiply_in_place(block, factors):
    """``block *= factors``, both ``(rows, cols)``."""
    full_width_vectors()
    rows, cols = block.shape
    for r in range(rows):
        for c in range(cols):
            block[r, c] *= factors[r, c]


@njit(inline="always")
def task_scratch_size(block_q, block_k, head_dim, value_dim, has_chain, has_args_grad):
    """Scratch entries of a backward task (see :func:`task_buffers`)."""
    block = whole_lines(block_q * block_k)
    return (block * (2 + has_chain + has_args_grad) + whole_lines(block_k * head_dim)
            + whole_lines(block_k * value_dim))


@njit(inline="always")
def task_buffers(scratch, block_q, block_k, head_dim, value_dim, has_chain, has_args_grad):
    """A backward task's flat buffers carved from ``scratch``, each starting on a
    64-byte line (:func:`whole_lines`; the slot's scratch starts on one), so the BLAS
    sees every block at the same alignment whichever slot runs the task:
    probabilities and score gradients ``(block_q * block_k,)`` each, the chain factor
    (as large with ``has_chain``, else empty), the scores before ``score_mod`` (as
    large with ``has_args_grad``, else empty), key and value gradient blocks
    ``(block_k * Dk,)``, ``(block_k * Dv,)``."""
    block = block_q * block_k
    chain_size = block if has_chain else 0
    before_size = block if has_args_grad else 0
    grads_start = whole_lines(block)
    chain_start = grads_start + whole_lines(block)
    before_start = chain_start + whole_lines(chain_size)
    key_start = before_start + whole_lines(before_size)
    value_start = key_start + whole_lines(block_k * head_dim)
    return (scratch[:block], scratch[grads_start:grads_start + block],
            scratch[chain_start:chain_start + chain_size],
            scratch[before_start:before_start + before_size],
            scratch[key_start:key_start + block_k * head_dim],
            scratch[value_start:value_start + block_k * value_dim])


@njit(inline="always")
def staging_size(block_q, block_k, head_dim, value_dim):
    """Scratch entries a 16-bit task converts its blocks into (:func:`staging_buffers`)."""
    return (whole_lines(block_q * head_dim) + whole_lines(block_q * value_dim)
            + whole_lines(block_k * head_dim) + whole_lines(block_k * value_dim))


@njit(inline="always")
def staging_buffers(scratch, block_q, block_k, head_dim, value_dim, converts):
    """The query, output-gradient, key and value conversion buffers of a 16-bit task,
    carved from the end of its ``scratch`` (:func:`staging_size` entries); empty when
    not ``converts`` (float inputs are read in place)."""
    if not converts:
        empty = scratch[:0]
        return empty, empty, empty, empty
    grad_start = whole_lines(block_q * head_dim)
    key_start = grad_start + whole_lines(block_q * value_dim)
    value_start = key_start + whole_lines(block_k * head_dim)
    return (scratch[:grad_start], scratch[grad_start:key_start],
            scratch[key_start:value_start], scratch[value_start:])


def _backward_signature(dtype):
    return types.void(*problem_types(dtype), TILING_TYPE, *backward_types(dtype))


backward_kernel = kernel_per_dtype(_attention_backward, _backward_signature)
