r"""Attention on Dask arrays: the local fastattn kernels, one task per pair of chunks.

Attention splits exactly along the batch axes and the queries, and along the keys
through the log-sum-exp (:func:`fastattn.merge_attention`). The functions here build
a Dask graph in which each task runs :func:`fastattn.scaled_dot_product_attention`
(or its backward) on one query chunk and one key chunk, with the positions of the
causal, window and ``kv_lengths`` rules shifted to the chunk, and in which the key
chunks' results are merged in a tree. Any Dask scheduler runs the graph, a
``dask.distributed`` cluster included.

What a task does
----------------
For a query chunk of rows ``[q0, q0 + m)`` and a key chunk of keys ``[k0, k0 + n)``,
key ``j`` is visible to query ``i`` (before ``mask``, ``bias`` and ``kv_lengths``)
iff ``i + off - left <= j <= i + off + right``, ``off`` being the global diagonal
offset of ``causal_alignment`` and ``(left, right)`` the window (causal caps
``right`` at 0). At graph build time the plan keeps only the rows of the chunk that
see some key of it and the keys some of those rows see; a pair with none makes no
task. The task runs the local kernel on that sub-block with a top-left window of
``(left - d, right + d)``, where ``d = off + r0 - c0`` is the diagonal offset in the
sub-block's own coordinates (``r0``, ``c0`` its first row and key), so no
``(Lq, Lk)`` mask is ever built; ``kv_lengths[b]`` becomes
``clip(kv_lengths[b] - c0, 0, n)``. Rows of the chunk outside the sub-block get
output 0 and lse ``-inf``, which weigh nothing in the merge.

The backward needs the global ``out`` and ``lse``: with them, the local backward on
one chunk pair recomputes ``P = exp(S - lse)`` and ``D_i = rowsum(dO * O)`` exactly
as the whole call would, so each task gives its exact share of ``dQ`` (summed over
key chunks) and of ``dK``, ``dV`` (summed over query chunks).

Threads
-------
Dask runs one task per worker thread (or process), so a task that runs on a worker,
whether a ``dask.distributed`` worker, a thread of the threaded scheduler or a
process of the processes scheduler, runs the kernels on one thread
(:func:`fastattn.set_num_threads` is per calling thread): ``n_workers x
threads_per_worker`` kernel threads at most, never more than the cluster was given.
Under the synchronous scheduler the tasks run on the calling thread with its own
setting.
"""

import contextlib
import functools
import math
import multiprocessing
import operator
import threading

import numpy as np

try:
    import dask
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise ImportError(
        'fastattn.dask needs Dask: install the extra with pip install "fastattn[dask]" '
        "(dask[array] and distributed)"
    ) from error

import fastattn
from fastattn._contract.arguments import check_kv_lengths
from fastattn._contract.options import options_from, takes_options
from fastattn._contract.shapes import (broadcast_batch, check_score_operand, gqa_group_size,
                                    matrix_dims)

__all__ = ["scaled_dot_product_attention", "scaled_dot_product_attention_backward"]

# Parts merged per task of the tree that combines the key chunks' results.
SPLIT_EVERY = 8


@takes_options(after=("return_weights", "return_lse", "split_every"))
def scaled_dot_product_attention(query, key, value, mask=None, *, return_weights=False,
                                 return_lse=False, split_every=None, **options):
    r"""Scaled dot-product attention of Dask arrays, one task per (query, key) chunk pair.

    .. math::

        \mathrm{out} = \mathrm{softmax}\!\left(\mathrm{scale}\cdot QK^\top + B,
        \text{masked}\right) V

    The arguments and results are those of :func:`fastattn.scaled_dot_product_attention`,
    as lazy :class:`dask.array.Array` objects. Each task runs the local kernel on one
    query chunk and one key chunk, with the causal, window and ``kv_lengths`` rules
    shifted to the chunk's positions; the key chunks' results are combined with
    :func:`fastattn.merge_attention` in a tree of ``split_every`` parts per task.
    A key chunk that no query of a query chunk can see (causal, window, kv_lengths)
    makes no task.

    Parameters
    ----------
    query : dask.array.Array or array_like, shape ``(*batch, Lq, Dk)``
    key : dask.array.Array or array_like, shape ``(*batch, Lk, Dk)``
    value : dask.array.Array or array_like, shape ``(*batch, Lk, Dv)``
        Chunked along any batch axis, ``Lq`` (query) and ``Lk`` (key and value).
        ``Dk`` and ``Dv`` are rechunked to one chunk. Batch axes broadcast by NumPy
        rules; where query, key and value are chunked differently along an axis they
        share, key and value follow the query (and value follows the key along
        ``Lk``). NumPy inputs are chunked like the Dask inputs they meet, or as one
        chunk.
    mask, bias : dask.array.Array or array_like, optional
        As in the local call (boolean, True = may attend; real, added to the scores),
        broadcastable to ``(*batch, Lq, Lk)``. A Dask mask or bias must be chunked
        like the scores ``(*batch, Lq, Lk)`` (the query's chunks along batch axes and
        ``Lq``, the key's along ``Lk``; one chunk along a broadcast axis of size 1),
        since rechunking an ``(Lq, Lk)`` operand moves more data than the attention.
    causal, causal_alignment, window, kv_lengths, scale, enable_gqa
        As in :func:`fastattn.scaled_dot_product_attention`. ``kv_lengths`` may be a
        Dask array; it is computed when the graph is built (it decides which tasks
        exist).
    return_weights : bool, default False
        Must be False: the weights are ``(*batch, Lq, Lk)`` and would need every key
        chunk of a row in one place. Use the local call on a slice for them.
    return_lse : bool, default False
        Also return the log-sum-exp of each row, ``(*batch, Lq)``.
    split_every : int, optional
        Parts merged per task of the merge tree (at least 2; default 8).
    softcap, alibi_slopes, score_mod, mask_mod, block_mask
        Not supported yet: anything but None raises ``NotImplementedError``.

    Returns
    -------
    out : dask.array.Array, shape ``(*batch, Lq, Dv)``
        Chunked like the query along batch axes and ``Lq``, one chunk along ``Dv``.
    lse : dask.array.Array, shape ``(*batch, Lq)``, only if ``return_lse``

    Raises
    ------
    ValueError, TypeError
        When the graph is built, for the arguments the local call refuses (with its
        messages), for ``return_weights=True``, and for a Dask mask or bias chunked
        unlike the scores. A ``+inf`` in a Dask ``bias`` is only seen by the task
        that reads it.

    Notes
    -----
    Results equal the local call's within the contract's tolerances (float32 2e-5,
    float64 1e-10). float16 inputs are computed and merged in float32 and returned as
    float16. Each task runs the kernels on one thread when it runs on a Dask worker
    (see the module's notes).

    See Also
    --------
    fastattn.scaled_dot_product_attention : the local call each task makes.
    fastattn.merge_attention : how key chunks are combined.
    scaled_dot_product_attention_backward : the gradients, on Dask arrays.
    """
    options = options_from(options, "fastattn.dask.scaled_dot_product_attention")
    _refuse_score_options(options)
    if return_weights:
        raise ValueError(
            "return_weights=True is not supported by fastattn.dask: the weights "
            "(*batch, Lq, Lk) need all the keys of a row in one task; call "
            "fastattn.scaled_dot_product_attention on the rows you need instead")
    split_every = _check_split_every(split_every)
    plan = _plan(query, key, value, mask, options)
    out, lse = _forward_graph(plan, split_every)
    return (out, lse) if return_lse else out


@takes_options(after=("split_every", "score_mod_grad"))
def scaled_dot_product_attention_backward(grad_out, query, key, value, out, lse, mask=None, *,
                                          split_every=None, score_mod_grad=None, **options):
    r"""Gradients of :func:`scaled_dot_product_attention` on Dask arrays.

    With the forward's global ``out`` and ``lse``, each (query chunk, key chunk) task
    runs :func:`fastattn.scaled_dot_product_attention_backward` on its chunks: it
    recomputes :math:`P = \exp(S - \mathrm{lse})` and :math:`D_i = \sum_d dO_{id}
    O_{id}` exactly as the whole call would, and gives

    .. math::

        dV_c = P^\top dO, \quad dS = P \odot (dO\, V_c^\top - D), \quad
        dQ \mathrel{+}= \mathrm{scale}\; dS\, K_c, \quad dK_c = \mathrm{scale}\; dS^\top Q

    for its key chunk ``c``: shares of ``dQ`` are summed over key chunks, of ``dK`` and
    ``dV`` over query chunks (and over batch chunks an input was broadcast along), each
    in a tree of ``split_every`` parts per task.

    Parameters
    ----------
    grad_out : dask.array.Array or array_like, shape ``(*batch, Lq, Dv)``
    query, key, value, mask
        The forward's inputs, chunked as for the forward.
    out : dask.array.Array or array_like, shape ``(*batch, Lq, Dv)``
    lse : dask.array.Array or array_like, shape ``(*batch, Lq)``
        The forward's results (``return_lse=True``). ``grad_out``, ``out`` and
        ``lse`` are rechunked like the forward's output where they differ.
    bias, causal, causal_alignment, window, kv_lengths, scale, enable_gqa
        Exactly as given to the forward.
    split_every : int, optional
        Shares summed per task (at least 2; default 8).
    softcap, alibi_slopes, score_mod, mask_mod, block_mask, score_mod_grad
        Not supported yet: anything but None raises ``NotImplementedError``.

    Returns
    -------
    grad_query, grad_key, grad_value : dask.array.Array
        Shaped and chunked like ``query``, ``key`` and ``value`` (one chunk along
        ``Dk`` and ``Dv``), with the local call's dtypes.

    See Also
    --------
    fastattn.scaled_dot_product_attention_backward : the local call each task makes.
    """
    options = options_from(options, "fastattn.dask.scaled_dot_product_attention_backward")
    _refuse_score_options(options, score_mod_grad=score_mod_grad)
    split_every = _check_split_every(split_every)
    plan = _plan(query, key, value, mask, options)
    grads = _backward_graph(plan, grad_out, out, lse, split_every)
    return grads


def _refuse_score_options(options, **extra):
    """The score options are not carried to the chunks yet: ALiBi and the user's
    score functions need each chunk's batch entries and positions shifted to the
    chunk (the local call sees chunk-local ``b``, ``h``, ``i`` and ``j``)."""
    refused = dict(softcap=options.softcap, alibi_slopes=options.alibi_slopes,
                   score_mod=options.score_mod, mask_mod=options.mask_mod,
                   block_mask=options.block_mask, **extra)
    for name, value in refused.items():
        if value is not None:
            raise NotImplementedError(
                f"fastattn.dask does not support {name} yet; call "
                f"fastattn.scaled_dot_product_attention on NumPy arrays for it")


# ------------------------------------------------------------------ planning

class _Plan:
    """A validated call: the operands as aligned Dask arrays, and the rules."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    @property
    def out_chunks(self):
        return self.batch_chunks + (self.q_chunks, (self.value_dim,))

    @property
    def lse_chunks(self):
        return self.batch_chunks + (self.q_chunks,)


def _check_split_every(split_every):
    if split_every is None:
        return SPLIT_EVERY
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every must be an int >= 2; got {split_every!r}")
    return split_every


def _plan(query, key, value, mask, options):
    """Validate the arguments at graph build time and align the operands' chunks."""
    bias, kv_lengths, scale = options.bias, options.kv_lengths, options.scale
    causal, causal_alignment, window = options.causal, options.causal_alignment, options.window
    enable_gqa = options.enable_gqa
    query, key, value = (_as_lazy_or_array(array) for array in (query, key, value))
    mask = None if mask is None else _as_lazy_or_array(mask)
    bias = None if bias is None else _as_lazy_or_array(bias)
    if isinstance(kv_lengths, da.Array):
        kv_lengths = kv_lengths.compute()
    out_dtype = _check_options_locally(query, key, value, mask, bias, causal,
                                       causal_alignment, window, kv_lengths, scale)
    compute_dtype = np.dtype(np.float32) if out_dtype.itemsize == 2 else out_dtype

    q_len, kv_len, head_dim, value_dim = matrix_dims(query, key, value)
    if mask is not None:
        mask = check_score_operand("mask", mask, q_len, kv_len)
    if bias is not None:
        bias = check_score_operand("bias", bias, q_len, kv_len)
        if not isinstance(bias, da.Array) and bias.dtype.kind == "f" and np.isposinf(bias).any():
            _raise_like_local_bias()
    group = gqa_group_size(query, key, value, enable_gqa)
    batch = broadcast_batch(query, key, value, mask, bias, group)
    kv_lengths = check_kv_lengths(kv_lengths, batch, kv_len)

    diag_offset = kv_len - q_len if causal_alignment == "bottom_right" else 0
    unbounded = q_len + kv_len + 1
    left, right = window if window is not None else (unbounded, unbounded)
    left, right = min(int(left), unbounded), min(int(right), unbounded)
    if causal:
        right = min(right, 0)

    batch_chunks = _batch_chunks(batch, query, key, value, mask, bias, group)
    q_chunks = _first_chunks(q_len, (query, -2), (mask, -2), (bias, -2))
    kv_chunks = _first_chunks(kv_len, (key, -2), (value, -2), (mask, -1), (bias, -1))

    def chunks_of(array, length_chunks, last, factor=1):
        """Chunks of an operand: the output's along its batch axes (one chunk where it
        broadcasts; kv heads under GQA divided by the group), then ``Lq`` or ``Lk``."""
        n_own = array.ndim - 2
        per_axis = []
        for axis in range(n_own):
            out_axis = axis + len(batch) - n_own
            if array.shape[axis] == 1:
                per_axis.append((1,))
            else:
                divisor = factor if axis == n_own - 1 else 1
                per_axis.append(tuple(c // divisor for c in batch_chunks[out_axis]))
        return tuple(per_axis) + (length_chunks, last)

    def score_chunks(array):
        rows, cols = array.shape[-2:]
        return chunks_of(array, (rows,) if rows == 1 else q_chunks,
                         (cols,) if cols == 1 else kv_chunks)

    query = _align("query", query, chunks_of(query, q_chunks, (head_dim,)), strict=False)
    key = _align("key", key, chunks_of(key, kv_chunks, (head_dim,), group), strict=False)
    value = _align("value", value, chunks_of(value, kv_chunks, (value_dim,), group),
                   strict=False)
    if mask is not None:
        mask = _align("mask", mask, score_chunks(mask), strict=True)
    if bias is not None:
        bias = _align("bias", bias, score_chunks(bias), strict=True)

    return _Plan(
        query=query, key=key, value=value, mask=mask, bias=bias, kv_lengths=kv_lengths,
        batch=batch, batch_chunks=batch_chunks, q_chunks=q_chunks, kv_chunks=kv_chunks,
        q_len=q_len, kv_len=kv_len, head_dim=head_dim, value_dim=value_dim,
        diag_offset=diag_offset, left=left, right=right, scale=scale,
        enable_gqa=bool(enable_gqa), compute_dtype=compute_dtype, out_dtype=out_dtype,
        token=dask.base.tokenize(query, key, value, mask, bias, kv_lengths, causal,
                                 causal_alignment, window, scale, enable_gqa),
    )


def _as_lazy_or_array(array):
    return array if isinstance(array, da.Array) else np.asarray(array)


def _check_options_locally(query, key, value, mask, bias, causal, causal_alignment, window,
                           kv_lengths, scale):
    """Run the local call's checks of dtypes and scalar options on a tiny problem.

    The problem has no query rows, so the local call checks everything and computes
    nothing; its errors (dtype, mask dtype, window, scale, alignment, kv_lengths
    dtype) reach the user with the local API's own messages. Returns the result
    dtype.
    """
    head_dim = query.shape[-1] if query.ndim >= 1 else 1  # the default scale needs it
    tiny_query = np.zeros((0, head_dim), query.dtype)  # (Lq=0, Dk)
    tiny_key = np.zeros((1, head_dim), key.dtype)  # (1, Dk)
    tiny_value = np.zeros((1, 1), value.dtype)  # (1, 1)
    tiny_mask = None if mask is None else np.ones((1, 1), mask.dtype)  # (1, 1)
    tiny_bias = None if bias is None else np.zeros((1, 1), bias.dtype)  # (1, 1)
    tiny_lengths = None if kv_lengths is None else np.ones(1, np.asarray(kv_lengths).dtype)
    out = fastattn.scaled_dot_product_attention(
        tiny_query, tiny_key, tiny_value, tiny_mask, bias=tiny_bias, causal=causal,
        causal_alignment=causal_alignment, window=window, kv_lengths=tiny_lengths,
        scale=scale)  # (0, 1)
    return out.dtype


def _raise_like_local_bias():
    """Raise the local call's error for a bias holding +inf."""
    fastattn.scaled_dot_product_attention(np.zeros((0, 1)), np.zeros((1, 1)), np.zeros((1, 1)),
                                          bias=np.full((1, 1), np.inf))
    raise AssertionError("the local call accepted a bias of +inf")  # pragma: no cover


def _batch_chunks(batch, query, key, value, mask, bias, group):
    """Chunks of each output batch axis: those of the first Dask operand that spans it.

    The query is asked first, then key and value (whose head axis, under GQA, stands
    for ``group`` query heads per kv head), then mask and bias. An axis no Dask
    operand spans is one chunk.
    """
    chunks = []
    n_batch = len(batch)
    for axis, size in enumerate(batch):
        found = None
        for array, factor in ((query, 1), (key, group), (value, group), (mask, 1), (bias, 1)):
            if not isinstance(array, da.Array):
                continue
            own = array.ndim - 2
            own_axis = axis - (n_batch - own)
            if own_axis < 0 or array.shape[own_axis] == 1 and size != 1:
                continue
            factor = factor if own_axis == own - 1 else 1
            candidate = tuple(c * factor for c in array.chunks[own_axis])
            if group > 1 and array is query and axis == n_batch - 1 and any(
                    c % group for c in candidate):
                continue  # query head chunks must hold whole GQA groups
            found = candidate
            break
        chunks.append(found if found is not None else (size,))
    return tuple(chunks)


def _first_chunks(length, *candidates):
    """Chunks of an ``Lq`` or ``Lk`` axis: those of the first Dask operand spanning it."""
    for array, axis in candidates:
        if isinstance(array, da.Array) and array.shape[axis] == length:
            return tuple(array.chunks[axis])
    return (length,)


def _align(name, array, chunks, strict):
    """``array`` as a Dask array with ``chunks``; a strict operand must already have them."""
    chunks = tuple(tuple(int(c) for c in axis) for axis in chunks)
    if not isinstance(array, da.Array):
        return da.from_array(array, chunks=chunks)
    if array.chunks == chunks:
        return array
    if strict:
        raise ValueError(
            f"{name} of shape {array.shape} is chunked {array.chunks}, unlike the scores "
            f"(*batch, Lq, Lk) it applies to: expected chunks {chunks} (the query's along "
            f"batch axes and Lq, the key's along Lk, one chunk along an axis of size 1); "
            f"rechunk it with {name}.rechunk({chunks})")
    return array.rechunk(chunks)


# ------------------------------------------------------------------ chunk pairs

def _starts(chunks):
    return np.concatenate(([0], np.cumsum(chunks, dtype=np.int64)))[:-1].tolist()


def _batch_blocks(plan):
    """Each output batch block: its block index, its shape, and its range along the
    first batch axis (``(0, 1)`` without batch axes, the one entry of kv_lengths)."""
    starts = [_starts(chunks) for chunks in plan.batch_chunks]
    for index in np.ndindex(*(len(chunks) for chunks in plan.batch_chunks)):
        shape = tuple(plan.batch_chunks[axis][i] for axis, i in enumerate(index))
        first = (starts[0][index[0]], starts[0][index[0]] + shape[0]) if index else (0, 1)
        yield index, shape, first


def _visible_span(plan, q_start, q_size, k_start, k_size, key_stop):
    """The sub-block of a chunk pair that holds every visible (query, key) pair.

    Returns ``(row_lo, row_hi, key_lo, key_hi, options)`` in chunk coordinates, or
    None when no query of the chunk sees any key of it. ``options`` are the local
    call's causal/window keywords for the sub-block (top-left alignment).
    """
    off, left, right = plan.diag_offset, plan.left, plan.right
    key_end = min(k_start + k_size, key_stop)  # global keys [k_start, key_end)
    if key_end <= k_start:
        return None
    row_lo = max(q_start, k_start - off - right)
    row_hi = min(q_start + q_size, key_end - 1 - off + left + 1)
    if row_lo >= row_hi:
        return None
    key_lo = max(k_start, row_lo + off - left)
    key_hi = min(key_end, row_hi - 1 + off + right + 1)
    if key_lo >= key_hi:
        return None
    shift = off + row_lo - key_lo  # diagonal offset inside the sub-block
    local_left, local_right = left - shift, right + shift
    n_rows, n_keys = row_hi - row_lo, key_hi - key_lo
    left_all = local_left >= n_rows - 1  # every row reaches the sub-block's first key
    right_all = local_right >= n_keys - 1  # every row reaches its last key
    if left_all and right_all:
        options = {"causal": False, "window": None}
    elif left_all and local_right == 0:
        options = {"causal": True, "window": None}
    else:
        cap = n_rows + n_keys
        options = {"causal": False, "window": (min(local_left, cap), min(local_right, cap))}
    return (row_lo - q_start, row_hi - q_start, key_lo - k_start, key_hi - k_start, options)


def _chunk_pairs(plan):
    """Yield ``(batch_index, batch_shape, qi, kj, span, local_kv_lengths)`` for every
    (output batch block, query chunk, key chunk); ``span`` (see :func:`_visible_span`)
    is None for a pair in which no query sees a key, and ``local_kv_lengths`` holds the
    batch block's kv_lengths shifted to the sub-block (None when they cut nothing)."""
    q_starts, kv_starts = _starts(plan.q_chunks), _starts(plan.kv_chunks)
    for batch_index, batch_shape, (first_lo, first_hi) in _batch_blocks(plan):
        lengths = None
        key_stop = plan.kv_len
        if plan.kv_lengths is not None:
            lengths = plan.kv_lengths[first_lo:first_hi]
            key_stop = int(lengths.max()) if lengths.size else 0
        for qi, (q_start, q_size) in enumerate(zip(q_starts, plan.q_chunks)):
            for kj, (k_start, k_size) in enumerate(zip(kv_starts, plan.kv_chunks)):
                if math.prod(batch_shape) == 0 or q_size == 0:
                    span = None
                else:
                    span = _visible_span(plan, q_start, q_size, k_start, k_size, key_stop)
                if span is None:
                    yield batch_index, batch_shape, qi, kj, None, None
                    continue
                local_lengths = None
                if lengths is not None:
                    width = span[3] - span[2]
                    local_lengths = np.clip(lengths - (k_start + span[2]), 0, width)
                    if (local_lengths == width).all():
                        local_lengths = None
                yield batch_index, batch_shape, qi, kj, span, local_lengths


def _block_key(array, batch_index, n_batch, *trailing):
    """Key of ``array``'s block for an output batch block and trailing block indices."""
    own = array.ndim - len(trailing)
    index = tuple(0 if array.numblocks[axis] == 1 else batch_index[axis + n_batch - own]
                  for axis in range(own))
    return (array.name,) + index + trailing


def _score_key(array, batch_index, n_batch, qi, kj):
    if array is None:
        return None
    rows, cols = array.numblocks[-2:]
    return _block_key(array, batch_index, n_batch, qi if rows > 1 else 0, kj if cols > 1 else 0)


def _pair_function(pair_function, plan, span, local_lengths):
    """``pair_function`` (:func:`_forward_pair` or :func:`_backward_pair`) bound to one
    chunk pair's ``span`` and local options: what its task calls."""
    return functools.partial(
        pair_function, span=span[:4], options=_local_options(plan, span, local_lengths),
        compute_dtype=plan.compute_dtype, has_mask=plan.mask is not None,
        has_bias=plan.bias is not None)


def _local_options(plan, span, local_lengths):
    options = dict(span[4])
    options.update(kv_lengths=local_lengths, scale=plan.scale, enable_gqa=plan.enable_gqa)
    return options


def _graph(name_layers, inputs):
    """A HighLevelGraph of new layers (in dependency order) over the input arrays."""
    layers, dependencies = {}, {}
    for array in inputs:
        if array is None:
            continue
        layers.update(array.dask.layers)
        dependencies.update(array.dask.dependencies)
    input_layers = {layer for array in inputs if array is not None
                    for layer in array.__dask_layers__()}
    previous = set(input_layers)
    for name, tasks in name_layers:
        layers[name] = MaterializedLayer(tasks)
        dependencies[name] = set(previous)
        previous = previous | {name}
    return HighLevelGraph(layers, dependencies)


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
            key_ = prefix + (level, start // split_every)
            tasks[key_] = (combine,) + tuple(group)
            grouped.append(key_)
        parts, level = grouped, level + 1
    return (final,) + tuple(parts)


# ------------------------------------------------------------------ forward graph

def _forward_graph(plan, split_every):
    token = dask.base.tokenize(plan.token, split_every)
    pair_name = f"fastattn-attention-pair-{token}"
    merge_name = f"fastattn-attention-merge-{token}"
    out_name = f"fastattn-attention-out-{token}"
    lse_name = f"fastattn-attention-lse-{token}"
    n_batch = len(plan.batch)
    pair_tasks, merge_tasks, out_tasks, lse_tasks = {}, {}, {}, {}
    parts = {}
    for batch_index, batch_shape, qi, kj, span, local_lengths in _chunk_pairs(plan):
        parts.setdefault((batch_index, qi, batch_shape), [])
        if span is None:
            continue
        pair_key = (pair_name,) + batch_index + (qi, kj)
        task_function = _pair_function(_forward_pair, plan, span, local_lengths)
        arguments = [_block_key(plan.query, batch_index, n_batch, qi, 0),
                     _block_key(plan.key, batch_index, n_batch, kj, 0),
                     _block_key(plan.value, batch_index, n_batch, kj, 0)]
        arguments += [key_ for key_ in (_score_key(plan.mask, batch_index, n_batch, qi, kj),
                                        _score_key(plan.bias, batch_index, n_batch, qi, kj))
                      if key_ is not None]
        pair_tasks[pair_key] = (task_function,) + tuple(arguments)
        parts[(batch_index, qi, batch_shape)].append(pair_key)

    for (batch_index, qi, batch_shape), keys in parts.items():
        merged_key = (merge_name,) + batch_index + (qi,)
        if keys:
            finish = functools.partial(_merge_parts, out_dtype=plan.out_dtype,
                                       n_rows=plan.q_chunks[qi])
            merge_tasks[merged_key] = _tree(merge_tasks, (merge_name + "-tree",) + batch_index
                                            + (qi,), keys, split_every, _merge_parts, finish)
        else:  # no key chunk visible to this query chunk
            merge_tasks[merged_key] = (functools.partial(
                _unseen_rows, shape=batch_shape + (plan.q_chunks[qi],),
                value_dim=plan.value_dim, out_dtype=plan.out_dtype),)
        out_tasks[(out_name,) + batch_index + (qi, 0)] = (operator.getitem, merged_key, 0)
        lse_tasks[(lse_name,) + batch_index + (qi,)] = (operator.getitem, merged_key, 1)

    inputs = [plan.query, plan.key, plan.value, plan.mask, plan.bias]
    layers = [(pair_name, pair_tasks), (merge_name, merge_tasks)]
    out_graph = _graph(layers + [(out_name, out_tasks)], inputs)
    lse_graph = _graph(layers + [(lse_name, lse_tasks)], inputs)
    out = da.Array(out_graph, out_name, plan.out_chunks,
                   meta=np.empty((0,) * (n_batch + 2), plan.out_dtype))
    lse = da.Array(lse_graph, lse_name, plan.lse_chunks,
                   meta=np.empty((0,) * (n_batch + 1), plan.out_dtype))
    return out, lse


def _forward_pair(query, key, value, *scores, span, options, compute_dtype, has_mask,
                  has_bias):
    """One chunk pair: local attention on the visible sub-block, rows outside it unseen."""
    row_lo, row_hi, key_lo, key_hi = span
    mask = scores[0] if has_mask else None
    bias = scores[-1] if has_bias else None
    query = query[..., row_lo:row_hi, :].astype(compute_dtype, copy=False)  # (*b, m, Dk)
    key = key[..., key_lo:key_hi, :].astype(compute_dtype, copy=False)  # (*b, n, Dk)
    value = value[..., key_lo:key_hi, :].astype(compute_dtype, copy=False)  # (*b, n, Dv)
    mask = _score_block(mask, row_lo, row_hi, key_lo, key_hi)
    bias = _score_block(bias, row_lo, row_hi, key_lo, key_hi)
    with _task_threads():
        out, lse = fastattn.scaled_dot_product_attention(query, key, value, mask, bias=bias,
                                                         return_lse=True, **options)
    return out, lse, row_lo, row_hi


def _score_block(array, row_lo, row_hi, key_lo, key_hi):
    if array is None:
        return None
    rows = slice(row_lo, row_hi) if array.shape[-2] != 1 else slice(None)
    cols = slice(key_lo, key_hi) if array.shape[-1] != 1 else slice(None)
    return array[..., rows, cols]


def _merge_parts(*parts, out_dtype=None, n_rows=None):
    """Merge chunk-pair results ``(out, lse, row_lo, row_hi)`` of one query chunk.

    Each part covers the rows ``[row_lo, row_hi)`` of the chunk; rows outside count as
    unseen by it (output 0, lse -inf). Without ``out_dtype`` the result is a part over
    the union of the rows, for the next level of the tree; with it, the whole chunk's
    ``(out, lse)`` of ``n_rows`` rows, cast to ``out_dtype``.
    """
    row_lo = min(part[2] for part in parts)
    row_hi = max(part[3] for part in parts)
    outs, lses = [], []
    for out, lse, lo, hi in parts:
        out, lse = _pad_rows(out, lse, lo - row_lo, row_hi - hi)
        outs.append(out)  # (*b, row_hi - row_lo, Dv)
        lses.append(lse)  # (*b, row_hi - row_lo)
    out, lse = fastattn.merge_attention(outs, lses) if len(parts) > 1 else (outs[0], lses[0])
    if out_dtype is None:
        return out, lse, row_lo, row_hi
    out, lse = _pad_rows(out, lse, row_lo, n_rows - row_hi)  # (*b, m, Dv), (*b, m)
    return out.astype(out_dtype, copy=False), lse.astype(out_dtype, copy=False)


def _pad_rows(out, lse, before, after):
    """Add ``before`` and ``after`` unseen rows (output 0, lse -inf)."""
    if before == 0 and after == 0:
        return out, lse
    width = [(0, 0)] * (lse.ndim - 1) + [(before, after)]
    out = np.pad(out, width + [(0, 0)])  # (*b, m, Dv)
    lse = np.pad(lse, width, constant_values=-np.inf)  # (*b, m)
    return out, lse


def _unseen_rows(shape, value_dim, out_dtype):
    """A query chunk that sees no key: output 0, lse -inf."""
    return np.zeros(shape + (value_dim,), out_dtype), np.full(shape, -np.inf, out_dtype)


# ------------------------------------------------------------------ backward graph

def _backward_graph(plan, grad_out, out, lse, split_every):
    grad_out, out, lse = _check_backward_arrays(plan, grad_out, out, lse)
    token = dask.base.tokenize(plan.token, grad_out, out, lse, split_every)
    pair_name = f"fastattn-attention-grad-pair-{token}"
    share_name = f"fastattn-attention-grad-share-{token}"
    sum_name = f"fastattn-attention-grad-sum-{token}"
    names = [f"fastattn-attention-grad-{operand}-{token}" for operand in ("query", "key",
                                                                             "value")]
    n_batch = len(plan.batch)
    pair_tasks, share_tasks, sum_tasks = {}, {}, {}
    targets = [plan.query, plan.key, plan.value]
    shares = [{}, {}, {}]  # target block key -> keys of its shares
    for batch_index, batch_shape, qi, kj, span, local_lengths in _chunk_pairs(plan):
        if span is None:
            continue
        pair_key = (pair_name,) + batch_index + (qi, kj)
        task_function = _pair_function(_backward_pair, plan, span, local_lengths)
        arguments = [_block_key(grad_out, batch_index, n_batch, qi, 0),
                     _block_key(plan.query, batch_index, n_batch, qi, 0),
                     _block_key(plan.key, batch_index, n_batch, kj, 0),
                     _block_key(plan.value, batch_index, n_batch, kj, 0),
                     _block_key(out, batch_index, n_batch, qi, 0),
                     _block_key(lse, batch_index, n_batch, qi)]
        arguments += [key_ for key_ in (_score_key(plan.mask, batch_index, n_batch, qi, kj),
                                        _score_key(plan.bias, batch_index, n_batch, qi, kj))
                      if key_ is not None]
        pair_tasks[pair_key] = (task_function,) + tuple(arguments)
        for which, (target, length_index) in enumerate(((plan.query, qi), (plan.key, kj),
                                                        (plan.value, kj))):
            share_key = (share_name,) + batch_index + (qi, kj, which)
            share_tasks[share_key] = (operator.getitem, pair_key, which)
            target_key = _block_key(target, batch_index, n_batch, length_index, 0)
            shares[which].setdefault(target_key, []).append(share_key)

    grad_tasks = [{}, {}, {}]
    for which, (target, name) in enumerate(zip(targets, names)):
        for block_index in np.ndindex(*target.numblocks):
            target_key = (target.name,) + block_index
            keys = shares[which].get(target_key, [])
            finish = functools.partial(_sum_shares, out_dtype=plan.out_dtype)
            if keys:
                task = _tree(sum_tasks, (sum_name, which) + block_index, keys, split_every,
                             _sum_shares, finish)
            else:  # no query sees these keys, or these queries see no key
                shape = tuple(target.chunks[axis][i] for axis, i in enumerate(block_index))
                task = (functools.partial(np.zeros, shape, plan.out_dtype),)
            grad_tasks[which][(name,) + block_index] = task

    inputs = [grad_out, plan.query, plan.key, plan.value, out, lse, plan.mask, plan.bias]
    layers = [(pair_name, pair_tasks), (share_name, share_tasks), (sum_name, sum_tasks)]
    grads = []
    for target, name, tasks in zip(targets, names, grad_tasks):
        graph = _graph(layers + [(name, tasks)], inputs)
        grads.append(da.Array(graph, name, target.chunks,
                              meta=np.empty((0,) * target.ndim, plan.out_dtype)))
    return tuple(grads)


def _check_backward_arrays(plan, grad_out, out, lse):
    """``grad_out``, ``out``, ``lse`` checked like the local call's and chunked like
    the forward's output."""
    arrays = [_as_lazy_or_array(array) for array in (grad_out, out, lse)]
    fastattn.scaled_dot_product_attention_backward(  # the local dtype checks, nothing computed
        np.zeros((0, 1), arrays[0].dtype), np.zeros((0, 1)), np.zeros((1, 1)),
        np.zeros((1, 1)), np.zeros((0, 1), arrays[1].dtype), np.zeros((0,), arrays[2].dtype))
    out_shape = plan.batch + (plan.q_len, plan.value_dim)
    checked = []
    for name, array, shape, meaning, chunks in (
            ("grad_out", arrays[0], out_shape, "(*batch, Lq, Dv)", plan.out_chunks),
            ("out", arrays[1], out_shape, "(*batch, Lq, Dv)", plan.out_chunks),
            ("lse", arrays[2], out_shape[:-1], "(*batch, Lq)", plan.lse_chunks)):
        if tuple(array.shape) != shape:
            raise ValueError(f"{name} must have the forward's shape {meaning} = {shape}; "
                             f"got {tuple(array.shape)}")
        checked.append(_align(name, array, chunks, strict=False))
    return tuple(checked)


def _backward_pair(grad_out, query, key, value, out, lse, *scores, span, options,
                   compute_dtype, has_mask, has_bias):
    """One chunk pair's shares of the gradients, shaped like the whole input blocks."""
    row_lo, row_hi, key_lo, key_hi = span
    mask = _score_block(scores[0] if has_mask else None, row_lo, row_hi, key_lo, key_hi)
    bias = _score_block(scores[-1] if has_bias else None, row_lo, row_hi, key_lo, key_hi)
    rows, keys = slice(row_lo, row_hi), slice(key_lo, key_hi)
    with _task_threads():
        grad_query, grad_key, grad_value = fastattn.scaled_dot_product_attention_backward(
            grad_out[..., rows, :].astype(compute_dtype, copy=False),  # (*b, m, Dv)
            query[..., rows, :].astype(compute_dtype, copy=False),  # (*b, m, Dk)
            key[..., keys, :].astype(compute_dtype, copy=False),  # (*b, n, Dk)
            value[..., keys, :].astype(compute_dtype, copy=False),  # (*b, n, Dv)
            out[..., rows, :].astype(compute_dtype, copy=False),  # (*b, m, Dv) global out
            lse[..., rows].astype(compute_dtype, copy=False),  # (*b, m) global lse
            mask, bias=bias, **options)
    return (_pad_axis(grad_query, query.shape[-2], row_lo, row_hi),  # like the query block
            _pad_axis(grad_key, key.shape[-2], key_lo, key_hi),  # like the key block
            _pad_axis(grad_value, value.shape[-2], key_lo, key_hi))  # like the value block


def _pad_axis(grad, length, lo, hi):
    """Zeros around ``grad`` along axis -2, from rows ``[lo, hi)`` to ``[0, length)``."""
    if lo == 0 and hi == length:
        return grad
    width = [(0, 0)] * (grad.ndim - 2) + [(lo, length - hi), (0, 0)]
    return np.pad(grad, width)


def _sum_shares(*shares, out_dtype=None):
    """Sum gradient shares of one block, cast to ``out_dtype`` when given."""
    total = shares[0].copy() if len(shares) > 1 else shares[0]
    for share in shares[1:]:
        total += share
    return total if out_dtype is None else total.astype(out_dtype, copy=False)


# ------------------------------------------------------------------ threads

@contextlib.contextmanager
def _task_threads():
    """Run the kernels on one thread while a task runs on a Dask worker.

    A task runs on a worker when it is not on the main thread of the main process
    (threaded scheduler, processes scheduler, ``dask.distributed`` worker threads);
    Dask runs one task per worker thread or process, so one kernel thread per task
    keeps the kernels within the threads the user gave Dask. The synchronous
    scheduler runs tasks on the calling thread, which keeps its own setting.
    """
    on_worker = (threading.current_thread() is not threading.main_thread()
                 or multiprocessing.parent_process() is not None)
    if not on_worker:
        yield
        return
    previous = fastattn.get_num_threads()
    fastattn.set_num_threads(1)
    try:
        yield
    finally:
        fastattn.set_num_threads(previous)
