"""The Dask graphs of a :mod:`fastattn.dask` call, built from its plan.

:func:`forward_graph` makes one task per visible chunk pair (:mod:`fastattn.dask.pairs`),
running :func:`~fastattn.dask.tasks.forward_pair`, and merges the key chunks of each
query chunk in a tree of ``split_every`` parts per task
(:func:`~fastattn.dask.tasks.merge_parts`); a query chunk that sees no key gets
:func:`~fastattn.dask.tasks.unseen_rows`. :func:`backward_graph` makes one
:func:`~fastattn.dask.tasks.backward_pair` task per visible chunk pair and sums each
input block's gradient shares in a tree (:func:`~fastattn.dask.tasks.sum_shares`);
a block no pair touches gets zeros.

The graphs are :class:`~dask.highlevelgraph.HighLevelGraph` objects of materialized
layers over the operands' own graphs; layer names carry the plan's token, so the
same call builds the same keys.
"""

import functools
import operator

import dask.array as da
import dask.base
import numpy as np
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from fastattn.dask.pairs import chunk_pairs
from fastattn.dask.tasks import (backward_pair, forward_pair, merge_parts, sum_arg_grads,
                                 sum_shares, unseen_rows)

__all__ = ["forward_graph", "backward_graph"]


# ------------------------------------------------------------------ forward

def forward_graph(plan, split_every):
    """The forward's ``(out, lse)`` as Dask arrays, for a
    :class:`~fastattn.dask.plan.ChunkPlan` and the merge tree's ``split_every``."""
    problem = plan.problem
    token = dask.base.tokenize(plan.token, split_every)
    pair_name = f"fastattn-attention-pair-{token}"
    merge_name = f"fastattn-attention-merge-{token}"
    out_name = f"fastattn-attention-out-{token}"
    lse_name = f"fastattn-attention-lse-{token}"
    n_batch = len(problem.batch_shape)
    pair_tasks, merge_tasks, out_tasks, lse_tasks = {}, {}, {}, {}
    parts = {}  # (batch index, query chunk, batch shape) -> keys of its pairs' results
    for pair in chunk_pairs(plan):
        chunk = (pair.batch_index, pair.q_index, pair.batch_shape)
        parts.setdefault(chunk, [])
        if pair.block is None:
            continue
        pair_key = (pair_name,) + pair.batch_index + (pair.q_index, pair.kv_index)
        arguments = [_block_key(plan.query, pair.batch_index, n_batch, pair.q_index, 0),
                     _block_key(plan.key, pair.batch_index, n_batch, pair.kv_index, 0),
                     _block_key(plan.value, pair.batch_index, n_batch, pair.kv_index, 0)]
        pair_tasks[pair_key] = (_pair_function(forward_pair, plan, pair),
                                *arguments, *_score_keys(plan, pair, n_batch))
        parts[chunk].append(pair_key)

    for (batch_index, q_index, batch_shape), keys in parts.items():
        merged_key = (merge_name,) + batch_index + (q_index,)
        n_rows = plan.q_chunks[q_index]
        if keys:
            finish = functools.partial(merge_parts, out_dtype=problem.out_dtype,
                                       lse_dtype=problem.lse_dtype, n_rows=n_rows)
            merge_tasks[merged_key] = _tree(merge_tasks, (merge_name + "-tree",) + batch_index
                                            + (q_index,), keys, split_every, merge_parts, finish)
        else:  # no key chunk visible to this query chunk
            merge_tasks[merged_key] = (functools.partial(
                unseen_rows, shape=batch_shape + (n_rows,), value_dim=problem.value_dim,
                out_dtype=problem.out_dtype, lse_dtype=problem.lse_dtype),)
        out_tasks[(out_name,) + batch_index + (q_index, 0)] = (operator.getitem, merged_key, 0)
        lse_tasks[(lse_name,) + batch_index + (q_index,)] = (operator.getitem, merged_key, 1)

    inputs = [plan.query, plan.key, plan.value, plan.mask, plan.bias]
    layers = [(pair_name, pair_tasks), (merge_name, merge_tasks)]
    out = da.Array(_graph(layers + [(out_name, out_tasks)], inputs), out_name, plan.out_chunks,
                   meta=np.empty((0,) * (n_batch + 2), problem.out_dtype))
    lse = da.Array(_graph(layers + [(lse_name, lse_tasks)], inputs), lse_name, plan.lse_chunks,
                   meta=np.empty((0,) * (n_batch + 1), problem.lse_dtype))
    return out, lse


# ------------------------------------------------------------------ backward

def backward_graph(plan, grad_out, out, lse, split_every, score_mod_grad=None,
                   score_mod_args_grad=None):
    """The gradients ``(grad_query, grad_key, grad_value)`` as Dask arrays chunked like
    the plan's query, key and value, for ``grad_out``, ``out`` and ``lse`` already
    checked and chunked like the forward's results
    (:func:`~fastattn.dask.plan.checked_backward_arrays`), with the user's
    ``score_mod_grad``; with ``score_mod_args_grad``, also the tuple of the
    gradients of ``score_mod_args`` (one-chunk Dask arrays shaped like them, the
    chunk pairs' shares summed in a tree, in the pairs' C order)."""
    problem = plan.problem
    functions = dict(score_mod_grad=score_mod_grad, score_mod_args_grad=score_mod_args_grad)
    token = dask.base.tokenize(plan.token, grad_out, out, lse, split_every,
                               *[(function.py_func.__qualname__, id(function))
                                 for function in functions.values() if function is not None])
    pair_name = f"fastattn-attention-grad-pair-{token}"
    share_name = f"fastattn-attention-grad-share-{token}"
    sum_name = f"fastattn-attention-grad-sum-{token}"
    names = [f"fastattn-attention-grad-{operand}-{token}"
             for operand in ("query", "key", "value")]
    n_batch = len(problem.batch_shape)
    pair_tasks, share_tasks, sum_tasks = {}, {}, {}
    targets = [plan.query, plan.key, plan.value]
    shares = [{}, {}, {}]  # per target: its block's key -> keys of its shares
    arg_shares = []  # keys of the pairs' shares of the score_mod_args gradients
    for pair in chunk_pairs(plan):
        if pair.block is None:
            continue
        batch_index, q_index, kv_index = pair.batch_index, pair.q_index, pair.kv_index
        pair_key = (pair_name,) + batch_index + (q_index, kv_index)
        arguments = [_block_key(grad_out, batch_index, n_batch, q_index, 0),
                     _block_key(plan.query, batch_index, n_batch, q_index, 0),
                     _block_key(plan.key, batch_index, n_batch, kv_index, 0),
                     _block_key(plan.value, batch_index, n_batch, kv_index, 0),
                     _block_key(out, batch_index, n_batch, q_index, 0),
                     _block_key(lse, batch_index, n_batch, q_index)]
        pair_tasks[pair_key] = (_pair_function(backward_pair, plan, pair, **functions),
                                *arguments, *_score_keys(plan, pair, n_batch))
        if score_mod_args_grad is not None:
            arg_shares.append((share_name,) + batch_index + (q_index, kv_index, 3))
            share_tasks[arg_shares[-1]] = (operator.getitem, pair_key, 3)
        for which, (target, length_index) in enumerate(((plan.query, q_index),
                                                        (plan.key, kv_index),
                                                        (plan.value, kv_index))):
            share_key = (share_name,) + batch_index + (q_index, kv_index, which)
            share_tasks[share_key] = (operator.getitem, pair_key, which)
            target_key = _block_key(target, batch_index, n_batch, length_index, 0)
            shares[which].setdefault(target_key, []).append(share_key)

    grad_tasks = [{}, {}, {}]
    finish = functools.partial(sum_shares, out_dtype=problem.out_dtype)
    for which, (target, name) in enumerate(zip(targets, names)):
        for block_index in np.ndindex(*target.numblocks):
            keys = shares[which].get((target.name,) + block_index, [])
            if keys:
                task = _tree(sum_tasks, (sum_name, which) + block_index, keys, split_every,
                             sum_shares, finish)
            else:  # no query sees these keys, or these queries see no key
                shape = tuple(target.chunks[axis][i] for axis, i in enumerate(block_index))
                task = (functools.partial(np.zeros, shape, problem.out_dtype),)
            grad_tasks[which][(name,) + block_index] = task

    inputs = [grad_out, plan.query, plan.key, plan.value, out, lse, plan.mask, plan.bias]
    layers = [(pair_name, pair_tasks), (share_name, share_tasks), (sum_name, sum_tasks)]
    grads = tuple(da.Array(_graph(layers + [(name, tasks)], inputs), name, target.chunks,
                           meta=np.empty((0,) * target.ndim, problem.out_dtype))
                  for target, name, tasks in zip(targets, names, grad_tasks))
    if score_mod_args_grad is None:
        return grads
    return grads + (_arg_grads_arrays(problem, token, arg_shares, split_every, layers,
                                      inputs),)


def _arg_grads_arrays(problem, token, shares, split_every, layers, inputs):
    """The gradients of ``score_mod_args``: the pairs' ``shares`` (keys of tuples of
    arrays) summed in a tree (zeros without a pair), as one-chunk Dask arrays of the
    compute dtype shaped like the arguments."""
    total_name = f"fastattn-attention-grad-args-{token}"
    args = problem.score_mod_args
    tasks = {}
    if shares:
        tasks[(total_name,)] = _tree(tasks, (total_name + "-tree",), shares, split_every,
                                     sum_arg_grads, sum_arg_grads)
    else:  # no chunk pair: nothing added
        tasks[(total_name,)] = (functools.partial(
            tuple, [np.zeros(arg.shape, problem.compute_dtype) for arg in args]),)
    arrays = []
    for position, arg in enumerate(args):
        name = f"fastattn-attention-grad-arg{position}-{token}"
        block = (operator.getitem, (total_name,), position)
        graph = _graph(layers + [(total_name, tasks), (name, {(name,) + (0,) * arg.ndim:
                                                              block})], inputs)
        arrays.append(da.Array(graph, name, tuple((size,) for size in arg.shape),
                               meta=np.empty((0,) * arg.ndim, problem.compute_dtype)))
    return tuple(arrays)


# ------------------------------------------------------------------ pieces

def _pair_function(task_function, plan, pair, **backward_functions):
    """``task_function`` (:func:`~fastattn.dask.tasks.forward_pair` or
    :func:`~fastattn.dask.tasks.backward_pair`) bound to one chunk pair's sub-block
    and the local call's options for it: what its task calls. The user functions
    (a block mask's as ``mask_mod``) see the whole call's positions through
    ``chunk_of``; ``backward_functions``: the backward's ``score_mod_grad`` and
    ``score_mod_args_grad``."""
    problem = plan.problem
    checked = problem.options
    local_options = dict(causal=pair.block.causal, window=pair.block.window,
                         kv_lengths=pair.kv_lengths, scale=checked.scale,
                         enable_gqa=checked.enable_gqa)
    if checked.dropout_p > 0.0:
        local_options.update(dropout_p=checked.dropout_p, dropout_seed=checked.dropout_seed)
    if checked.has_score_functions:  # a block mask's function (its tiles are the call's)
        local_options.update(score_mod=checked.score_mod,
                             score_mod_args=problem.score_mod_args or None,
                             mask_mod=problem.effective_mask_mod,
                             mask_mod_args=problem.effective_mask_mod_args or None,
                             **backward_functions)
    if checked.dropout_p > 0.0 or checked.has_score_functions:
        # the dropout decisions and the user functions at the whole call's (b, h, i, j)
        row_lo, _, key_lo, _ = pair.block.span
        batch_start = tuple(sum(chunks[:index]) for chunks, index
                            in zip(plan.batch_chunks, pair.batch_index))
        local_options.update(chunk_of=(
            problem.batch_shape, batch_start, sum(plan.q_chunks[:pair.q_index]) + row_lo,
            sum(plan.kv_chunks[:pair.kv_index]) + key_lo, problem.mask_batch_shape))
    return functools.partial(
        task_function, span=pair.block.span, options=local_options,
        compute_dtype=plan.problem.compute_dtype, has_mask=plan.mask is not None,
        has_bias=plan.bias is not None)


def _block_key(array, batch_index, n_batch, *trailing):
    """Key of ``array``'s block for an output batch block and trailing block indices
    (block 0 along a batch axis the array has one block of)."""
    own = array.ndim - len(trailing)
    index = tuple(0 if array.numblocks[axis] == 1 else batch_index[axis + n_batch - own]
                  for axis in range(own))
    return (array.name,) + index + trailing


def _score_keys(plan, pair, n_batch):
    """Keys of the mask's and the bias's blocks for a chunk pair (those present)."""
    keys = []
    for array in (plan.mask, plan.bias):
        if array is not None:
            rows, cols = array.numblocks[-2:]
            keys.append(_block_key(array, pair.batch_index, n_batch,
                                   pair.q_index if rows > 1 else 0,
                                   pair.kv_index if cols > 1 else 0))
    return keys


def _tree(tasks, prefix, parts, split_every, combine, final):
    """Combine ``parts`` (keys) in a tree of ``split_every`` per task.

    While more than ``split_every`` parts remain, groups of them are combined by
    ``combine`` in tasks added to ``tasks`` under the keys ``prefix + (level, index)``.
    Returns the last task, ``final`` over the remaining parts, for the caller to place
    under its own key.
    """
    level = 0
    while len(parts) > split_every:
        grouped = []
        for start in range(0, len(parts), split_every):
            group = parts[start:start + split_every]
            if len(group) == 1:
                grouped.append(group[0])
                continue
            key = prefix + (level, start // split_every)
            tasks[key] = (combine,) + tuple(group)
            grouped.append(key)
        parts, level = grouped, level + 1
    return (final,) + tuple(parts)


def _graph(name_layers, inputs):
    """A HighLevelGraph of new layers (``(name, tasks)`` in dependency order) over the
    input arrays (None entries skipped)."""
    layers, dependencies = {}, {}
    inputs = [array for array in inputs if array is not None]
    for array in inputs:
        layers.update(array.dask.layers)
        dependencies.update(array.dask.dependencies)
    previous = {layer for array in inputs for layer in array.__dask_layers__()}
    for name, tasks in name_layers:
        layers[name] = MaterializedLayer(tasks)
        dependencies[name] = set(previous)
        previous = previous | {name}
    return HighLevelGraph(layers, dependencies)
