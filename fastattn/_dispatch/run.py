"""Run a validated attention problem through the kernels, and shape their results.

The front ends (:mod:`fastattn.attention`, the layers, the integrations) check a
call into an :class:`~fastattn._contract.problem.AttentionProblem`; the functions
here lay it out (:mod:`fastattn._dispatch.layout`), tile it
(:mod:`fastattn._dispatch.tiling`), apply the process settings before the first
kernel call (:mod:`fastattn._runtime.settings`), run the kernels with the BLAS kept
at one thread, and fold the results back to the problem's shapes.
"""

import dataclasses
import math

import numpy as np
from numba import get_num_threads  # each call applies the process settings first

from fastattn._contract.shapes import sum_to_shape
from fastattn._dispatch import tiling
from fastattn._dispatch.layout import (NO_HOOK, NO_SEGMENTS, as_stored, fold_query_groups,
                                       identity_index, placeholder, problem_arguments,
                                       problem_hook)
from fastattn._runtime import settings
from fastattn._runtime.threads import at_most_threads, single_threaded_blas
from fastattn.kernels.backward import backward_kernel
from fastattn.kernels.decode import decode_kernel
from fastattn.kernels.forward import exact_rows_kernel, forward_kernel
from fastattn.kernels.groups import BackwardInputs, ForwardOutputs, Gradients, KeySpans, Tiling


def run_forward(problem, return_weights):
    """Lay a validated :class:`~fastattn._contract.problem.AttentionProblem` out for the kernel,
    run it, and shape the results: ``(out, weights, lse)`` (``weights`` a placeholder
    unless ``return_weights``)."""
    folded = fold_query_groups(problem)
    if folded is not None:  # GQA decoding: one pass over each kv head
        out, weights, lse = run_forward(folded, return_weights)
        if return_weights:
            weights = weights.reshape(problem.weights_shape)  # (*batch, Hq, 1, Lk)
        return out.reshape(problem.out_shape), weights, lse.reshape(problem.lse_shape)
    if decode_supported(problem, return_weights):
        return run_decode(problem)
    dtype = problem.compute_dtype
    n_batch = math.prod(problem.batch_shape)
    out, lse = result_buffers(problem, n_batch)  # (N, Lq, Dv), (N, Lq)
    if return_weights:
        weights = np.zeros((n_batch, problem.q_len, problem.kv_len), dtype)  # (N, Lq, Lk)
    else:
        weights = placeholder(dtype, 3, writeable=True)  # never written

    block_mask = problem.options.block_mask
    block_size = block_mask.block_size if block_mask is not None else None
    (block_q, block_k), split_len, n_splits, blas_threads = tiling.forward_plan(
        n_batch, problem.q_len, problem.kv_len, problem.head_dim, problem.value_dim,
        bool(return_weights), block_size)
    spans = key_spans(problem, n_batch, split_len, n_splits)
    if n_batch and problem.q_len:
        settings.apply()
        hook = problem_hook(problem)
        arguments = problem_arguments(problem, hook)
        outputs = ForwardOutputs(out, lse, weights, bool(return_weights))
        blocks = Tiling(block_q, block_k, get_num_threads())  # a slot per thread
        with single_threaded_blas(blas_threads):
            marked = forward_kernel(problem.kernel_dtype)(*arguments, blocks, outputs, spans,
                                                          NO_SEGMENTS)
            if marked:  # rows where a NaN met the block products (their lse is NaN):
                # again, summing visible keys only, so that a hidden NaN stays out
                rows = np.ascontiguousarray(np.argwhere(np.isnan(lse)), np.int64)  # (K, 2)
                exact_rows(problem, arguments, blocks, outputs, rows)
        hook.raise_error(problem)

    out, lse = shaped_results(problem, out, lse)
    out_dtype = problem.out_dtype
    if return_weights:
        weights = weights.reshape(problem.weights_shape).astype(out_dtype, copy=False)
    return out, weights, lse


def exact_rows(problem, arguments, blocks, outputs, rows):
    """Compute the forward's ``rows`` ``(K, 2)`` of ``(entry, query)`` again with
    :data:`~fastattn.kernels.forward.exact_rows_kernel`. 16-bit inputs (a NaN met
    their block products: a rare path, compiled for float32 only) are converted to
    float32 for it, and the rows' results rounded into the 16-bit ``out``."""
    if problem.kernel_dtype == problem.compute_dtype:
        exact_rows_kernel(problem.compute_dtype)(*arguments, blocks, outputs, rows, NO_SEGMENTS)
        return
    dtype = problem.compute_dtype
    widened = dataclasses.replace(problem, query=problem.query.astype(dtype),
                                  key=problem.key.astype(dtype),
                                  value=problem.value.astype(dtype))
    out = np.empty(outputs.out.shape, dtype)  # (N, Lq, Dv); only the rows are written
    exact_rows_kernel(dtype)(*problem_arguments(widened, problem_hook(widened)), blocks,
                             outputs._replace(out=out), rows, NO_SEGMENTS)
    entries, queries = rows[:, 0], rows[:, 1]
    outputs.out.view(problem.out_dtype)[entries, queries] = out[entries, queries]


def decode_supported(problem, return_weights):
    """Whether the streaming decode kernel (:mod:`fastattn.kernels.decode`) takes
    ``problem``: at most :data:`~fastattn._dispatch.tiling.DECODE_MAX_ROWS` query rows
    per batch entry (after :func:`fold_query_groups`), and no option it does not
    implements (:data:`DECODE_OPTIONS`: scale, softcap, causal in either alignment,
    window, ``kv_lengths``, GQA); no weights asked for and no mask. Everything else
    (bias, ALiBi slopes, user functions, block masks, dropout, any option added later)
    goes to the forward kernel."""
    return (0 < problem.q_len <= tiling.DECODE_MAX_ROWS and not return_weights
            and problem.mask is None
            and DECODE_OPTIONS.issuperset(problem.options.set_names))


# The options the decode kernel implements (any other one set sends a call elsewhere).
DECODE_OPTIONS = frozenset({"scale", "softcap", "causal", "causal_alignment", "window",
                            "kv_lengths", "enable_gqa"})


def run_decode(problem):
    """Run a ``problem`` that :func:`decode_supported` accepts through the decode
    kernel; returns ``(out, weights placeholder, lse)`` shaped like
    :func:`run_forward`'s."""
    n_batch = math.prod(problem.batch_shape)
    out, lse = result_buffers(problem, n_batch)  # (N, Lq, Dv), (N, Lq)
    if n_batch:
        settings.apply()
        inputs, options, _, _, visibility = problem_arguments(problem, NO_HOOK)
        decode_into(problem.kernel_dtype, inputs, options, visibility, out, lse)
    out, lse = shaped_results(problem, out, lse)
    return out, placeholder(problem.out_dtype, 3, writeable=True), lse


def decode_into(kernel_dtype, inputs, options, visibility, out, lse):
    """Run the decode kernel of ``kernel_dtype`` on its argument groups ``inputs``,
    ``options`` and ``visibility`` (:func:`problem_arguments`), writing ``out``
    ``(N, Lq, Dv)`` and ``lse`` ``(N, Lq)``: tiled by
    :func:`~fastattn._dispatch.tiling.decode_plan`, on the threads
    :func:`~fastattn._dispatch.tiling.decode_threads` gives (small calls run on the
    calling thread). Shared by :func:`run_decode` and the prepared decoding steps of
    :mod:`fastattn._dispatch.decode_steps`."""
    n_batch, q_len, value_dim = out.shape
    kv_len = inputs.key.shape[1]
    dtype = lse.dtype
    block_k, span_len, n_spans = tiling.decode_plan(n_batch, kv_len)
    spans = span_buffers(dtype, n_batch, q_len, value_dim, span_len, n_spans)
    available = get_num_threads()
    threads = tiling.decode_threads(inputs.key.nbytes + inputs.value.nbytes, available)
    with at_most_threads(threads, available):  # small calls: the calling thread alone
        decode_kernel(kernel_dtype)(
            inputs, options, visibility,
            Tiling(block_q=q_len, block_k=block_k, slots=threads),  # a slot per thread
            ForwardOutputs(out, lse, placeholder(dtype, 3, writeable=True), False), spans)


def result_buffers(problem, n_batch):
    """The forward's ``out (N, Lq, Dv)``, in the kernels' storage (16-bit results as
    ``uint16``, written by the kernels directly), and ``lse (N, Lq)`` in the compute
    dtype; uninitialised."""
    return (np.empty((n_batch, problem.q_len, problem.value_dim),
                     problem.kernel_dtype),  # (N, Lq, Dv)
            np.empty((n_batch, problem.q_len), problem.compute_dtype))  # (N, Lq)


def key_spans(problem, n_batch, span_len, n_spans):
    """The :class:`KeySpans` of a call whose keys are cut into ``n_spans`` spans of
    ``span_len`` (:func:`span_buffers` for the problem's sizes)."""
    return span_buffers(problem.compute_dtype, n_batch, problem.q_len, problem.value_dim,
                        span_len, n_spans)


def span_buffers(dtype, n_batch, q_len, value_dim, span_len, n_spans):
    """The :class:`KeySpans` of ``n_spans`` spans of ``span_len`` keys: each span's
    ``out (spans, N, Lq, Dv)`` and ``lse (spans, N, Lq)`` in ``dtype``, or
    placeholders the kernels never write when there is one span."""
    if n_spans > 1:
        return KeySpans(span_len, np.empty((n_spans, n_batch, q_len, value_dim),
                                           dtype),  # (spans, N, Lq, Dv)
                        np.empty((n_spans, n_batch, q_len), dtype))  # (spans, N, Lq)
    return KeySpans(span_len, placeholder(dtype, 4, writeable=True),
                    placeholder(dtype, 3, writeable=True))


def shaped_results(problem, out, lse):
    """``out`` and ``lse`` of the flattened batch in the problem's shapes
    ``(*batch, Lq, Dv)`` and ``(*batch, Lq)``: ``out`` in its result dtype (16-bit
    results viewed from their bits; other 16-bit inputs computed in float32 are
    rounded here), ``lse`` in the compute dtype (float32 for 16-bit inputs)."""
    out = out.reshape(problem.out_shape)  # (*batch, Lq, Dv)
    lse = lse.reshape(problem.lse_shape)  # (*batch, Lq)
    if problem.kernel_dtype == np.uint16:
        out = out.view(problem.out_dtype)
    elif problem.out_dtype != problem.compute_dtype:
        out = out.astype(problem.out_dtype)
    return out, lse


def run_backward(problem, grad_out, out, lse, return_bias_grad=False):
    """The gradients ``(grad_query, grad_key, grad_value)`` of a validated backward
    ``problem`` (with its ``score_mod_grad``) from the checked ``grad_out``, ``out``
    and ``lse`` of the forward, shaped like the problem's inputs; with
    ``return_bias_grad``, also the bias gradient, shaped like the checked bias (at
    least 2-D) in the compute dtype; with the problem's ``score_mod_args_grad``, then
    the tuple of the gradients of ``score_mod_args`` (their shapes, the compute
    dtype)."""
    dtype, batch = problem.compute_dtype, problem.batch_shape
    n_batch, q_len, kv_len = math.prod(batch), problem.q_len, problem.kv_len

    grad_out = grad_out.reshape(n_batch, q_len, problem.value_dim)  # (N, Lq, Dv)
    out = np.asarray(out).reshape(n_batch, q_len, problem.value_dim)  # (N, Lq, Dv)
    lse = np.ascontiguousarray(lse, dtype).reshape(n_batch, q_len)
    delta = row_dots(grad_out, out, dtype)  # (N, Lq) D_i = rowsum(dO * O)
    # grad_out as the kernels read it: 16-bit as stored (another dtype rounded to the
    # inputs' one), else in the compute dtype
    if problem.kernel_dtype == np.uint16 and grad_out.dtype != problem.query.dtype:
        grad_out = grad_out.astype(problem.query.dtype)
    grad_out = as_stored(grad_out, problem.kernel_dtype)  # (N, Lq, Dv)
    gradients, arg_parts = _run_backward(problem, grad_out, lse, delta,
                                         return_bias_grad)
    if gradients.nan_met.any():  # a NaN query or key: again, with those NaNs entering as 0
        gradients, arg_parts = _run_backward(
            dataclasses.replace(problem, query=without_nan(problem.query),
                                key=without_nan(problem.key)),
            grad_out, lse, delta, return_bias_grad)
    query_grad_parts = gradients.query_parts  # (G, N, Lq, Dk)
    grad_query = query_grad_parts[0]  # (N, Lq, Dk)
    for part in query_grad_parts[1:]:  # a fixed order, whatever the thread count
        grad_query += part
    grad_query *= problem.scale

    group, out_dtype = problem.gqa_group, problem.out_dtype
    grad_query = grad_query.reshape(batch + (q_len, problem.head_dim))  # (*batch, Lq, Dk)
    grad_key = gradients.key.reshape(batch + (kv_len, problem.head_dim))  # (*batch, Lk, Dk)
    grad_value = gradients.value.reshape(batch + (kv_len, problem.value_dim))  # (*batch, Lk, Dv)
    grads = (sum_to_shape(grad_query, problem.query.shape).astype(out_dtype, copy=False),
             sum_to_shape(grad_key, problem.key.shape, group).astype(out_dtype, copy=False),
             sum_to_shape(grad_value, problem.value.shape, group).astype(out_dtype, copy=False))
    if return_bias_grad:
        grads += (gradients.bias.reshape(problem.bias.shape),)  # the bias's own shape
    if problem.score_mod_args_grad is not None:
        grads += (tuple(summed_parts(parts) for parts in arg_parts),)
    return grads


def summed_parts(parts):
    """``parts`` ``(P, *shape)`` summed over the first axis in a fixed order: the same
    bits for every thread count."""
    total = parts[0].copy()  # (*shape)
    for part in parts[1:]:
        total += part
    return total


def _run_backward(problem, grad_out, lse, delta, return_bias_grad):
    """Run the backward kernel on ``problem``; returns its :class:`Gradients` and the
    partitions ``(P, *arg.shape)`` of the gradients of ``score_mod_args`` (empty
    without ``score_mod_args_grad``)."""
    dtype = problem.compute_dtype
    n_batch, q_len, kv_len = math.prod(problem.batch_shape), problem.q_len, problem.kv_len
    if problem.options.block_mask is not None:  # the kernel works in the mask's tiles
        block_q, block_k = problem.options.block_mask.block_size
    else:
        block_q, block_k = tiling.BACKWARD_BLOCK_Q, tiling.BACKWARD_BLOCK_K
    arg_parts = ()
    n_parts = 0
    if problem.score_mod_args_grad is not None:
        n_parts = argument_grad_parts(problem, n_batch, kv_len, block_k)
        arg_parts = tuple(np.zeros((n_parts,) + arg.shape, dtype)  # (P, *arg.shape)
                          for arg in problem.score_mod_args)
    hook = problem_hook(problem, arg_parts)
    arguments = problem_arguments(problem, hook)
    bias = arguments[3]  # the bias ScoreOperand
    if return_bias_grad:
        # one task writes each bias entry: the entries sharing it run in it, in order
        entry_order = np.argsort(bias.index, kind="stable").astype(np.int64)  # (N,)
        entry_starts = np.flatnonzero(np.diff(bias.index[entry_order], prepend=-1,
                                              append=-2)).astype(np.int64)  # (E + 1,)
        bias_grad = np.zeros(bias.stack.shape, dtype)  # (n_own, 1 or Lq, 1 or Lk)
        # a bias broadcast over the keys is written by every key group: only one then
        n_groups = 1 if bias.col_step == 0 else tiling.choose_key_groups(n_batch, kv_len,
                                                                         block_k)
    else:
        entry_order = identity_index(n_batch)  # (N,) one entry per task
        entry_starts = identity_index(n_batch + 1)  # (N + 1,)
        bias_grad = placeholder(dtype, 3, writeable=True)
        n_groups = tiling.choose_key_groups(n_batch, kv_len, block_k)
    extra = BackwardInputs(grad_out=grad_out, lse=lse, delta=delta, entry_order=entry_order,
                           entry_starts=entry_starts)
    gradients = Gradients(
        query_parts=np.zeros((n_groups, n_batch, q_len, problem.head_dim),
                             dtype),  # (G, N, Lq, Dk) shares of dQ / scale
        key=np.zeros((n_batch, kv_len, problem.head_dim), dtype),  # (N, Lk, Dk)
        value=np.zeros((n_batch, kv_len, problem.value_dim), dtype),  # (N, Lk, Dv)
        nan_met=np.zeros(n_batch * n_groups, np.bool_),  # (N * G,)
        bias=bias_grad, has_bias=bool(return_bias_grad), arg_grad_parts=n_parts)
    if n_batch and q_len and kv_len:
        settings.apply()
        with single_threaded_blas():
            backward_kernel(problem.kernel_dtype)(
                *arguments, Tiling(block_q=block_q, block_k=block_k, slots=get_num_threads()),
                extra, gradients, NO_SEGMENTS)  # a slot per thread
        hook.raise_error(problem)
    return gradients, arg_parts


# most partitions of the arguments' gradients (more tasks than threads, to balance
# them; the count depends on the problem only, see argument_grad_parts)
MAX_ARG_GRAD_PARTS = 64
# memory the partitions of the arguments' gradients may take (bytes)
ARG_GRAD_PARTS_BYTES = 256 * 2 ** 20


def argument_grad_parts(problem, n_batch, kv_len, block_k):
    """How many partitions the backward's tasks are cut into when the gradients of
    ``score_mod_args`` are wanted: each adds into its own copy of them. At most
    :data:`MAX_ARG_GRAD_PARTS` and the task count, and copies within
    :data:`ARG_GRAD_PARTS_BYTES`; a function of the problem alone, never of the
    thread count, so the summed gradients are the same for every thread count."""
    n_tasks = n_batch * tiling.choose_key_groups(n_batch, kv_len, block_k)
    arg_bytes = sum(arg.size for arg in problem.score_mod_args) * problem.compute_dtype.itemsize
    within_memory = ARG_GRAD_PARTS_BYTES // max(arg_bytes, 1)
    return max(1, min(n_tasks, MAX_ARG_GRAD_PARTS, within_memory))


def row_dots(grad_out, out, dtype, rows_per_chunk=65536):
    """``rowsum(grad_out * out)`` ``(N, Lq)`` in ``dtype``, C-contiguous, from
    ``(N, Lq, Dv)`` arrays; arrays of another dtype (16-bit ones) are converted a
    chunk of ``rows_per_chunk`` rows at a time, never whole."""
    if grad_out.dtype == dtype and out.dtype == dtype:
        return np.ascontiguousarray(np.einsum("nqd,nqd->nq", grad_out, out))
    flat_grad = grad_out.reshape(-1, grad_out.shape[-1])  # (N * Lq, Dv)
    flat_out = out.reshape(-1, out.shape[-1])  # (N * Lq, Dv)
    delta = np.empty(flat_grad.shape[0], dtype)  # (N * Lq,)
    for start in range(0, flat_grad.shape[0], rows_per_chunk):
        chunk = slice(start, start + rows_per_chunk)
        delta[chunk] = np.einsum("rd,rd->r", flat_grad[chunk].astype(dtype),
                                 flat_out[chunk].astype(dtype))
    return delta.reshape(grad_out.shape[:2])


def without_nan(array):
    """``array`` with NaN replaced by 0 (a copy)."""
    return np.where(np.isnan(array), 0, array).astype(array.dtype, copy=False)
