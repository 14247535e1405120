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

Modules
-------
The front ends here check and prepare a call; the package's modules compute, each
importing only those after it:

- :mod:`fastattn.dask.plan`: the checks (the local call's own rules, nothing
  computed) and the call's :class:`~fastattn.dask.plan.ChunkPlan`;
- :mod:`fastattn.dask.chunks`: the operands' chunks, aligned for the tasks;
- :mod:`fastattn.dask.graph`: the graphs, with their merge and sum trees;
- :mod:`fastattn.dask.pairs`: the chunk pairs and the sub-block each one sees;
- :mod:`fastattn.dask.tasks`: the functions the tasks run.
"""

try:
    import dask.array  # noqa: F401 - the extra is installed (the modules below use it)
    import dask.highlevelgraph  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise ImportError(
        'fastattn.dask needs Dask: install the extra with pip install "fastattn[dask]" '
        "(dask[array] and distributed)"
    ) from error

from fastattn._contract.options import options_from, takes_options
from fastattn._contract.problem import check_score_mod_grad
from fastattn.dask.graph import backward_graph, forward_graph
from fastattn.dask.plan import (check_split_every, checked_backward_arrays, plan_attention,
                                refuse_score_options)

__all__ = ["scaled_dot_product_attention", "scaled_dot_product_attention_backward"]


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
    dropout_p, dropout_seed
        As in the local call, with its decisions: each chunk takes them at the global
        ``(b, h, i, j)`` of its entries.
    score_mod, mask_mod, score_mod_args, mask_mod_args, block_mask
        As in the local call: each chunk calls the user functions at the global
        ``(b, h, i, j)`` of its scores (through the local call's ``chunk_of``), with
        the arrays given (NumPy arrays, sent to every task). A block mask is made for
        the whole call; each chunk applies its ``mask_mod`` (with the mask's own
        ``(b, h)`` where its batch shape broadcasts), and chunk pairs whose tiles
        are all empty make no task.
    return_weights : bool, default False
        Must be False: the weights are ``(*batch, Lq, Lk)`` and would need every key
        chunk of a row in one place. Use the local call on a slice for them.
    return_lse : bool, default False
        Also return the log-sum-exp of each row, ``(*batch, Lq)``.
    split_every : int, optional
        Parts merged per task of the merge tree (at least 2; default 8).
    other options
        The softcap and the ALiBi slopes are not supported yet: setting one raises
        ``NotImplementedError`` naming it.

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
    refuse_score_options(options)
    if return_weights:
        raise ValueError(
            "return_weights=True is not supported by fastattn.dask: the weights "
            "(*batch, Lq, Lk) need all the keys of a row in one task; call "
            "fastattn.scaled_dot_product_attention on the rows you need instead")
    split_every = check_split_every(split_every)
    plan = plan_attention(query, key, value, mask, options)
    out, lse = forward_graph(plan, split_every)
    return (out, lse) if return_lse else out


@takes_options(after=("split_every", "score_mod_grad", "score_mod_args_grad"))
def scaled_dot_product_attention_backward(grad_out, query, key, value, out, lse, mask=None, *,
                                          split_every=None, score_mod_grad=None,
                                          score_mod_args_grad=None, **options):
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
    dropout_p, dropout_seed
        Exactly as given to the forward: the same decisions.
    score_mod, mask_mod, score_mod_args, mask_mod_args, block_mask
        Exactly as given to the forward.
    split_every : int, optional
        Shares summed per task (at least 2; default 8).
    score_mod_grad, score_mod_args_grad : numba-compiled functions, optional
        As in :func:`fastattn.scaled_dot_product_attention_backward`, called at the
        global ``(b, h, i, j)``. Each chunk pair adds into gradients of its own;
        they are summed in a tree, in the pairs' order (a fixed order).
    other options
        As for the forward, the softcap and the ALiBi slopes raise
        ``NotImplementedError``.

    Returns
    -------
    grad_query, grad_key, grad_value : dask.array.Array
        Shaped and chunked like ``query``, ``key`` and ``value`` (one chunk along
        ``Dk`` and ``Dv``), with the local call's dtypes.
    grad_score_mod_args : tuple of dask.array.Array, only with ``score_mod_args_grad``
        Shaped like ``score_mod_args`` (one chunk each), in the compute dtype.

    See Also
    --------
    fastattn.scaled_dot_product_attention_backward : the local call each task makes.
    """
    options = options_from(options, "fastattn.dask.scaled_dot_product_attention_backward")
    refuse_score_options(options)
    split_every = check_split_every(split_every)
    plan = plan_attention(query, key, value, mask, options)
    check_score_mod_grad(plan.problem, score_mod_grad, score_mod_args_grad)  # the local rules
    grad_out, out, lse = checked_backward_arrays(plan, grad_out, out, lse)
    return backward_graph(plan, grad_out, out, lse, split_every, score_mod_grad,
                          score_mod_args_grad)
