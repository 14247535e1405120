"""Validation of a :mod:`fastattn.dask` call, and its plan: what the graph is built from.

The arguments are checked by the local call's own rules, with nothing computed and
no kernel run: :func:`~fastattn._contract.problem.check_attention` (and, for the
backward, :func:`~fastattn._contract.problem.check_backward_arrays`) checks the
NumPy operands as they are and each Dask operand through a stand-in of its shape and
dtype that holds no data (a zero-strided view of one zero; a Dask bias's last two
dims, once they fit ``(Lq, Lk)``, cut to 1 so that the check for ``+inf`` builds no
``(*batch, Lq, Lk)`` array). A bad call therefore raises what
:func:`fastattn.scaled_dot_product_attention` raises for the same arguments, with
its message, when the graph is built; only what lies in the data of a Dask operand
(a ``+inf`` in a Dask ``bias``) is left to the task that reads it. A Dask
``kv_lengths`` is computed here, since it decides which tasks exist.

The checked problem (:class:`~fastattn._contract.problem.AttentionProblem`) gives
the sizes, dtypes, diagonal offset and key reach; :mod:`fastattn.dask.chunks`
chunks the operands alike; both are held by the call's :class:`ChunkPlan`.
"""

import dataclasses

import dask.array as da
import dask.base
import numpy as np

from fastattn._contract.options import AttentionOptions
from fastattn._contract.problem import AttentionProblem, check_attention, check_backward_arrays
from fastattn._contract.shapes import check_score_operand
from fastattn.dask.chunks import (align, batch_chunks, lazy_or_array, length_chunks,
                                  operand_chunks, score_chunks)

__all__ = ["ChunkPlan", "SPLIT_EVERY", "check_split_every", "checked_backward_arrays",
           "plan_attention", "refuse_score_options"]

# Parts merged (or shares summed) per task of a tree, unless the call says otherwise.
SPLIT_EVERY = 8


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkPlan:
    """A checked :mod:`fastattn.dask` call: its problem and its operands, chunked alike.

    Attributes
    ----------
    problem : AttentionProblem
        The call as checked by the local call's rules, on stand-ins of its Dask
        operands (so ``problem.query``, ``problem.mask`` and ``problem.options.bias``
        may be stand-ins that hold no data; use the arrays below). It gives the batch shape, ``Lq``, ``Lk``, ``Dk``, ``Dv``, the GQA
        group, the compute and result dtypes, the diagonal offset ``diag_offset``
        and the checked options (``options.kv_lengths``: int64, one entry per index
        of the first batch axis, or None).
    query : dask.array.Array, shape ``(*batch_q, Lq, Dk)``
        Chunked like the output along its batch axes (one chunk along an axis it
        broadcasts along), ``q_chunks`` along ``Lq``, one chunk along ``Dk``.
    key, value : dask.array.Array, shapes ``(*batch_kv, Lk, Dk)``, ``(*batch_kv, Lk, Dv)``
        Chunked like the output along their batch axes (under GQA a kv head chunk
        holds the kv heads of a query head chunk), ``kv_chunks`` along ``Lk``, one
        chunk along ``Dk`` or ``Dv``.
    mask, bias : dask.array.Array or None
        At least 2-D, chunked like the scores ``(*batch, Lq, Lk)`` (one chunk along
        an axis of size 1).
    batch_chunks : tuple of tuple of int
        The output's chunks along each batch axis of ``problem.batch_shape``.
    q_chunks, kv_chunks : tuple of int
        Chunks of ``Lq`` and of ``Lk``: a task sees one of each.
    reach : (int, int)
        ``(left, right)`` of :func:`~fastattn._contract.problem.key_reach`: key ``j``
        is visible to query ``i`` (before mask, bias and kv_lengths) iff
        ``i + diag_offset - left <= j <= i + diag_offset + right``.
    token : str
        Dask's token of the operands and options, which names the graph's layers.
    """

    problem: AttentionProblem
    query: da.Array
    key: da.Array
    value: da.Array
    mask: da.Array | None
    bias: da.Array | None
    batch_chunks: tuple[tuple[int, ...], ...]
    q_chunks: tuple[int, ...]
    kv_chunks: tuple[int, ...]
    reach: tuple[int, int]
    token: str

    @property
    def out_chunks(self):
        """Chunks of the output ``(*batch, Lq, Dv)``."""
        return self.batch_chunks + (self.q_chunks, (self.problem.value_dim,))

    @property
    def lse_chunks(self):
        """Chunks of the log-sum-exp ``(*batch, Lq)``."""
        return self.batch_chunks + (self.q_chunks,)


# The options a chunked call carries to its chunks; any other option set is refused,
# so that an option added to the local call is never dropped silently here.
CHUNKED_OPTIONS = frozenset({"bias", "causal", "causal_alignment", "window", "kv_lengths",
                             "scale", "enable_gqa", "dropout_p", "dropout_seed",
                             "score_mod", "mask_mod", "block_mask", "score_mod_args",
                             "mask_mod_args"})


def refuse_score_options(options):
    """Raise ``NotImplementedError`` for an option set in ``options`` that the chunks
    are not given (:data:`CHUNKED_OPTIONS`).

    The softcap and the ALiBi slopes are not carried to the chunks yet (ALiBi needs
    the chunk's positions shifted, as the user functions get them through
    ``chunk_of``); ``chunk_of`` is the chunks' own.
    """
    refused = {name: value for name, value in options.as_keywords().items()
               if name not in CHUNKED_OPTIONS}
    for name in refused:
        raise NotImplementedError(
            f"fastattn.dask does not support {name} yet; call "
            f"fastattn.scaled_dot_product_attention on NumPy arrays for it")


def check_split_every(split_every):
    """``split_every`` (parts per task of a tree) as an int >= 2; None gives
    :data:`SPLIT_EVERY`."""
    if split_every is None:
        return SPLIT_EVERY
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every must be an int >= 2; got {split_every!r}")
    return split_every


def plan_attention(query, key, value, mask, options: AttentionOptions) -> ChunkPlan:
    """Check a call by the local call's rules and chunk its operands for the tasks.

    Parameters
    ----------
    query, key, value, mask : dask.array.Array or array_like
        As given to :func:`fastattn.dask.scaled_dot_product_attention`.
    options : AttentionOptions
        The call's options (score options already refused); ``bias`` and
        ``kv_lengths`` may be Dask arrays.

    Returns
    -------
    ChunkPlan

    Raises
    ------
    TypeError, ValueError
        What the local call raises for the same arguments, and a ``ValueError`` for
        a Dask mask or bias chunked unlike the scores.
    """
    query, key, value = (lazy_or_array(array) for array in (query, key, value))
    mask = None if mask is None else lazy_or_array(mask)
    bias = None if options.bias is None else lazy_or_array(options.bias)
    kv_lengths = options.kv_lengths
    if isinstance(kv_lengths, da.Array):
        kv_lengths = kv_lengths.compute()  # it decides which tasks exist
    checked_options = options
    if bias is not None or kv_lengths is not options.kv_lengths:
        checked_options = options.replace(bias=_bias_stand_in(bias, query, key),
                                          kv_lengths=kv_lengths)
    problem = check_attention(_stand_in(query), _stand_in(key), _stand_in(value),
                              _stand_in(mask), checked_options)
    q_len, kv_len = problem.q_len, problem.kv_len
    if mask is not None:
        mask = check_score_operand("mask", mask, q_len, kv_len)  # at least 2-D
    if bias is not None:
        bias = check_score_operand("bias", bias, q_len, kv_len)  # at least 2-D

    group = problem.gqa_group
    out_batch_chunks = batch_chunks(problem.batch_shape, query, key, value, mask, bias, group)
    q_chunks = length_chunks(q_len, (query, -2), (mask, -2), (bias, -2))
    kv_chunks = length_chunks(kv_len, (key, -2), (value, -2), (mask, -1), (bias, -1))
    head_dim, value_dim = (problem.head_dim,), (problem.value_dim,)
    query = align("query", query, operand_chunks(query, out_batch_chunks, q_chunks, head_dim),
                  strict=False)
    key = align("key", key, operand_chunks(key, out_batch_chunks, kv_chunks, head_dim, group),
                strict=False)
    value = align("value", value,
                  operand_chunks(value, out_batch_chunks, kv_chunks, value_dim, group),
                  strict=False)
    if mask is not None:
        mask = align("mask", mask, score_chunks(mask, out_batch_chunks, q_chunks, kv_chunks),
                     strict=True)
    if bias is not None:
        bias = align("bias", bias, score_chunks(bias, out_batch_chunks, q_chunks, kv_chunks),
                     strict=True)

    checked = problem.options
    token = dask.base.tokenize(query, key, value, mask, bias, checked.kv_lengths,
                               checked.causal, checked.causal_alignment, checked.window,
                               checked.scale, checked.enable_gqa, checked.dropout_p,
                               checked.dropout_seed, *user_function_tokens(problem))
    return ChunkPlan(problem=problem, query=query, key=key, value=value, mask=mask, bias=bias,
                     batch_chunks=out_batch_chunks, q_chunks=q_chunks, kv_chunks=kv_chunks,
                     reach=problem.key_reach(), token=token)


def user_function_tokens(problem):
    """What names the graph for a call's user functions: each function, by its name
    and its identity in this process (functions are compared as objects, as the
    kernels' hooks compare them), and the arrays passed to them, by value."""
    functions = [problem.options.score_mod, problem.effective_mask_mod]
    names = [None if function is None else
             (function.py_func.__module__, function.py_func.__qualname__, id(function))
             for function in functions]
    block_mask = problem.options.block_mask
    mask_batch = None if block_mask is None else (block_mask.batch_shape,
                                                  block_mask.block_size)
    return names + [problem.score_mod_args, problem.effective_mask_mod_args, mask_batch]


def checked_backward_arrays(plan, grad_out, out, lse):
    """The backward's ``grad_out``, ``out`` and ``lse``, checked by the local
    backward's rules (dtypes, the forward's shapes) and chunked like the forward's
    output and lse.

    Returns
    -------
    grad_out, out : dask.array.Array, shape ``(*batch, Lq, Dv)``
    lse : dask.array.Array, shape ``(*batch, Lq)``
    """
    arrays = [lazy_or_array(array) for array in (grad_out, out, lse)]
    check_backward_arrays(plan.problem, *(_stand_in(array) for array in arrays))
    return tuple(align(name, array, chunks, strict=False) for name, array, chunks in zip(
        ("grad_out", "out", "lse"), arrays, (plan.out_chunks, plan.out_chunks,
                                             plan.lse_chunks)))


def _stand_in(array):
    """What the local checks see of an operand: a NumPy operand as it is, a Dask one as
    a zero-strided array of its shape and dtype (one zero, no data read)."""
    if isinstance(array, da.Array):
        return np.broadcast_to(np.zeros((), array.dtype), array.shape)
    return array


def _bias_stand_in(bias, query, key):
    """:func:`_stand_in` of a bias; a Dask bias whose last two dims fit ``(Lq, Lk)``
    is seen with them cut to at most 1 (they broadcast alike), so that the check for
    ``+inf`` reads no ``(*batch, Lq, Lk)`` array of zeros."""
    stand_in = _stand_in(bias)
    if not isinstance(bias, da.Array) or min(bias.ndim, query.ndim, key.ndim) < 2:
        return stand_in
    if bias.shape[-2] in (1, query.shape[-2]) and bias.shape[-1] in (1, key.shape[-2]):
        return stand_in[..., :1, :1]
    return stand_in
