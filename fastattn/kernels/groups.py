"""The kernels' argument groups: each a named tuple, and its Numba type, from one table.

The kernels take their operands in a few named groups (built from a validated
problem by :mod:`fastattn._dispatch.layout`) and read their fields by name
(``inputs.key``, ``bias.present``). Each group is declared once below, as a list of
``(field, kind)`` pairs; the named-tuple class and its Numba type for a dtype are
both derived from that list, so the two cannot drift apart. A new field of a group
is one line here, the code that fills it and the code that reads it.

Arrays are typed C-contiguous and read-only unless marked ``writable`` (results), so
one compiled kernel per dtype serves every call. Groups are not nested: Numba's
parallel loops cannot take a tuple holding a tuple of arrays.
"""

from typing import NamedTuple

import numba
import numpy as np
from numba import types

__all__ = ["Inputs", "ScoreOperand", "ScoreOptions", "Visibility", "Tiling", "ForwardOutputs",
           "KeySpans", "BackwardInputs", "Gradients", "array_type", "group_type",
           "problem_types", "forward_result_types", "backward_types", "TILING_TYPE",
           "Segments", "SEGMENTS_TYPE",
           "PagedInputs"]


def array_type(dtype, ndim, readonly=True):
    """Numba type of a C-contiguous array of ``dtype``."""
    return types.Array(numba.from_dtype(np.dtype(dtype)), ndim, "C", readonly=readonly)


def compute_dtype(dtype):
    """The dtype a kernel variant computes in: float32 for the 16-bit variant
    (``uint16``: bfloat16 or float16 storage, :mod:`fastattn.kernels.half`), else the
    variant's own dtype."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.uint16 else dtype


# Kinds of field. Each is a function of the variant's dtype to a Numba type.
def data(ndim, writable=False):
    """An array of the compute dtype (float32 or float64)."""
    return lambda dtype: array_type(compute_dtype(dtype), ndim, readonly=not writable)


def stored(ndim, writable=False):
    """An array in the storage of the variant's dtype: float32, float64, or uint16
    holding 16-bit floats (read through :mod:`fastattn.kernels.half`)."""
    return lambda dtype: array_type(dtype, ndim, readonly=not writable)


def fixed(array_dtype, ndim, writable=False):
    """An array of a fixed dtype (an index, a flag per task)."""
    return lambda dtype: array_type(array_dtype, ndim, readonly=not writable)


INT = lambda dtype: types.int64  # noqa: E731  (a size, an offset, an address)
FLOAT = lambda dtype: types.float64  # noqa: E731  (a scalar option)
FLAG = lambda dtype: types.boolean  # noqa: E731
INDEX = fixed(np.int64, 1)  # int64 (N,): entry b of the flattened batch reads stack[index[b]]


def declare(name, doc, fields):
    """The named-tuple class of a group from its ``(field, kind)`` table; the table
    stays on the class (``_kinds``) for :func:`group_type`."""
    group = NamedTuple(name, [(field, object) for field, _ in fields])
    group.__doc__ = doc
    group.__module__ = __name__
    group._kinds = tuple(kind for _, kind in fields)
    return group


def group_type(group, dtype):
    """Numba type of ``group`` for data of ``dtype``, as :func:`numba.typeof` gives it
    for an instance built by the layout (homogeneous fields make a ``NamedUniTuple``)."""
    return types.BaseTuple.from_types(tuple(kind(dtype) for kind in group._kinds), group)


Inputs = declare("Inputs", """Query, key and value stacks ``(n_own, L, D)``, their
int64 ``(N,)`` indices, and ``half_format``: how 16-bit stacks (``uint16``) are read,
:data:`fastattn.kernels.half.BFLOAT16` or ``FLOAT16`` (ignored for float stacks;
default bfloat16).""", [
    ("query", stored(3)), ("key", stored(3)), ("value", stored(3)),
    ("query_index", INDEX), ("key_index", INDEX), ("value_index", INDEX),
    ("half_format", INT),
])
Inputs.__new__.__defaults__ = (0,)

ScoreOperand = declare("ScoreOperand", """A mask or bias: its ``stack (n_own, 1 or Lq,
1 or Lk)`` and ``index (N,)``; positions are multiplied by ``row_step`` and
``col_step`` (0 along a broadcast axis); ``present`` is False for a placeholder the
kernels never read. Its data dtype is bool for a mask.""", [
    ("stack", data(3)), ("index", INDEX), ("row_step", INT), ("col_step", INT),
    ("present", FLAG),
])

ScoreOptions = declare("ScoreOptions", """The options that turn ``q.k`` into a score,
besides the mask and bias operands: the ``scale``; the ``softcap`` (read only when
``has_softcap``); the ALiBi slope of every entry of the flattened batch, float64
``alibi_slopes (N,)`` (a ``(1,)`` placeholder unless ``has_alibi``); the address of
the block ``hook`` applying the user's ``score_mod`` (``has_score_mod``) and
``mask_mod`` (``has_mask_mod``) (:mod:`fastattn.kernels.hooks`), and the call's int64
``hook_table`` it reads the user's argument arrays from and reports errors into
(``has_args_grad``: the backward also wants the gradients of ``score_mod_args``);
``heads``, the size
of the batch axis that the user functions' ``h`` indexes (``b, h = divmod(entry,
heads)``); the address of the BLAS ``gemm`` that forms the block products
(:mod:`fastattn.kernels.products`); and, with ``has_dropout``, the dropout
decisions' 16-bit ``dropout_threshold``, ``dropout_keep_scale`` (``1 / (1 - p)``),
the seed's 32-bit halves, and where decisions are taken: entry ``n``'s ``(b, h)`` =
``dropout_entries[n]`` (int64 ``(N, 2)``), query and key positions shifted by
``dropout_row_offset`` and ``dropout_key_offset``
(:mod:`fastattn.kernels.dropout`).""", [
    ("scale", FLOAT), ("softcap", FLOAT), ("has_softcap", FLAG),
    ("alibi_slopes", fixed(np.float64, 1)), ("has_alibi", FLAG),
    ("hook", INT), ("has_score_mod", FLAG), ("has_mask_mod", FLAG),
    ("hook_table", fixed(np.int64, 1, writable=True)), ("has_args_grad", FLAG),
    ("heads", INT), ("gemm", INT),
    ("has_dropout", FLAG), ("dropout_threshold", INT), ("dropout_keep_scale", FLOAT),
    ("dropout_seed_low", INT), ("dropout_seed_high", INT),
    ("dropout_entries", fixed(np.int64, 2)),
    ("dropout_row_offset", INT), ("dropout_key_offset", INT),
])

Visibility = declare("Visibility", """The structural visibility rule (see
:mod:`fastattn.kernels.masking`): ``kv_lengths (N,)`` when ``has_kv_lengths``, the
diagonal offset and how far left and right of the diagonal a query reaches; with
``has_block_mask``, the block mask's int8 ``block_states (M, q tiles, key tiles)``
(:mod:`fastattn.kernels.tile_states`; the kernels' tiling is then the mask's), entry
``n`` of the flattened batch reading ``block_states[block_states_index[n]]`` (a mask
made for a broadcast batch shape stores its tiles once).""", [
    ("kv_lengths", INDEX), ("has_kv_lengths", FLAG), ("diag_offset", INT),
    ("reach_left", INT), ("reach_right", INT),
    ("block_states", fixed(np.int8, 3)), ("has_block_mask", FLAG),
    ("block_states_index", INDEX),
])

Tiling = declare("Tiling", """Query rows and keys per block of a kernel's loops, and the
forward's and backward's parallel ``slots`` (the thread count): each slot runs an
equal contiguous share of the tasks one after another, with scratch memory of its
own.""", [("block_q", INT), ("block_k", INT), ("slots", INT)])

ForwardOutputs = declare("ForwardOutputs", """The forward's results: ``out (N, Lq, Dv)``
(in the inputs' storage: 16-bit results written directly), ``lse (N, Lq)`` and, when
``return_weights``, ``weights (N, Lq, Lk)`` (zeroed; else a placeholder).""", [
    ("out", stored(3, writable=True)), ("lse", data(2, writable=True)),
    ("weights", data(3, writable=True)), ("return_weights", FLAG),
])

KeySpans = declare("KeySpans", """Split keys: spans of ``span_len`` keys, each span's
normalised output ``out (spans, N, Lq, Dv)`` and log2-sum-exp ``lse (spans, N, Lq)``.
The span count is ``out.shape[0]``: 1 (a placeholder, never written) when not
split.""", [
    ("span_len", INT), ("out", data(4, writable=True)), ("lse", data(3, writable=True)),
])

BackwardInputs = declare("BackwardInputs", """What the backward needs besides the
problem: ``grad_out (N, Lq, Dv)`` (in the inputs' storage), the forward's ``lse (N,
Lq)`` and ``delta = rowsum(grad_out * out)`` ``(N, Lq)``; and how batch entries are
grouped into tasks: entries ``entry_order[entry_starts[e]:entry_starts[e + 1]]``
(int64) run one after another in one task per key group (one entry per group, unless
a bias gradient is wanted: then the entries sharing a bias entry, so that one task
writes it).""", [
    ("grad_out", stored(3)), ("lse", data(2)), ("delta", data(2)),
    ("entry_order", INDEX), ("entry_starts", INDEX),
])

Gradients = declare("Gradients", """The backward's results: ``query_parts (G, N, Lq,
Dk)``, one share of ``dQ / scale`` per key group, ``key (N, Lk, Dk)``, ``value (N,
Lk, Dv)``, ``nan_met (N * G,)``: which (entry, key group) met a NaN query or key;
and, with ``has_bias``, the bias gradient ``bias`` in the bias operand's stack shape
``(n_own, 1 or Lq, 1 or Lk)`` (a placeholder otherwise). With
``ScoreOptions.has_args_grad``, the gradients of ``score_mod_args`` are added into
``arg_grad_parts`` partitions (their addresses are in the hook table): the tasks are
cut into that many contiguous runs, each adding into its own partition.""", [
    ("query_parts", data(4, writable=True)), ("key", data(3, writable=True)),
    ("value", data(3, writable=True)), ("nan_met", fixed(np.bool_, 1, writable=True)),
    ("bias", data(3, writable=True)), ("has_bias", FLAG), ("arg_grad_parts", INT),
])

PagedInputs = declare("PagedInputs", """A paged KV cache and the queries attending to it
(:mod:`fastattn.kernels.paged`): ``query (N, Lq, Dk)`` in the compute dtype; the page
pools ``key_pages (n_pages, page_size, Hkv, Dk)`` and ``value_pages (n_pages,
page_size, Hkv, Dv)`` in the variant's storage, read in place; int32 ``block_table
(rows, max_pages)`` of physical pages and int64 ``seq_lens (rows,)`` (tokens held,
the ``Lq`` new ones included) per table row; entry ``e`` reads table row
``table_row[e]`` and kv head ``kv_head[e]`` (int64 ``(N,)``); ``half_format`` as in
:class:`Inputs`.""", [
    ("query", data(3)), ("key_pages", stored(4)), ("value_pages", stored(4)),
    ("block_table", fixed(np.int32, 2)), ("seq_lens", INDEX), ("table_row", INDEX),
    ("kv_head", INDEX), ("half_format", INT),
])


def problem_types(dtype):
    """Types of the leading groups ``(Inputs, ScoreOptions, mask, bias, Visibility)``
    for data of ``dtype``."""
    return (group_type(Inputs, dtype), group_type(ScoreOptions, dtype),
            group_type(ScoreOperand, np.bool_), group_type(ScoreOperand, dtype),
            group_type(Visibility, dtype))


TILING_TYPE = group_type(Tiling, np.float64)


def forward_result_types(dtype):
    """Types of ``(ForwardOutputs, KeySpans)`` for data of ``dtype``."""
    return group_type(ForwardOutputs, dtype), group_type(KeySpans, dtype)


def backward_types(dtype):
    """Types of ``(BackwardInputs, Gradients)`` for data of ``dtype``."""
    return group_type(BackwardInputs, dtype), group_type(Gradients, dtype)


Segments = declare("Segments", """Packed sequences of different lengths
(FlashAttention's varlen layout), when ``present``: the query, key and value stacks
are ``(heads, total, D)``, sequence ``s`` holding rows ``query_starts[s]:
query_starts[s + 1]`` of the queries and ``key_starts[s]:key_starts[s + 1]`` of the
keys and values (int64 ``(n_seq + 1,)``); batch entry ``e`` is head ``e % heads`` of
sequence ``e // heads``, seen with positions ``i``, ``j`` within its sequence and the
diagonal offset ``diag_offsets[s]`` (int64 ``(n_seq,)``); results are written in the
same ``(heads, total, D)`` layout. The kernels' tasks are the rows of ``work`` (int64
``(n_items, 3)``: the forward's ``(entry, first row, stop row)``, the backward's
``(entry, key group, 0)``), shared among the threads by their cumulative cost
``work_cost`` (int64 ``(n_items + 1,)``). Absent (a placeholder never read) for the
other calls.""", [
    ("query_starts", INDEX), ("key_starts", INDEX), ("diag_offsets", INDEX), ("heads", INT),
    ("work", fixed(np.int64, 2)), ("work_cost", INDEX), ("present", FLAG),
])

SEGMENTS_TYPE = group_type(Segments, np.float64)
