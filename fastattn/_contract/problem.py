"""The attention problem: what one call computes, validated, before any layout.

:func:`check_attention` turns the arrays of a call and its
:class:`~fastattn._contract.options.AttentionOptions` into an
:class:`AttentionProblem`: validated arrays, shapes, dtypes and the rules that
depend on them (default scale, diagonal offset, broadcast of the bias, ``kv_lengths``
and ALiBi slopes, the user functions' compiled forms). The fused kernels
(:mod:`fastattn._dispatch`) and the NumPy oracle (:mod:`reference`) both start
from it, so the two can only differ in arithmetic, never in what they accept.

This module imports NumPy only, never Numba.
"""

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from fastattn._contract.arguments import (as_mask_array, as_real_array, default_scale,
                                          diagonal_offset, half_format, kernel_dtype,
                                          result_dtypes)
from fastattn._contract.functions import check_function_args, check_score_function
from fastattn._contract.options import DEFAULT_OPTIONS, AttentionOptions
from fastattn._contract.shapes import (broadcast_batch, check_score_operand, gqa_group_size,
                                       matrix_dims)

__all__ = ["AttentionProblem", "check_attention", "check_backward_arrays",
           "check_bias_grad_request", "check_score_mod_grad", "checked_problem",
           "stand_in_problem"]


@dataclass(slots=True)
class AttentionProblem:
    """A validated attention call: what to compute, not how.

    The call's options are held as its checked :class:`AttentionOptions`
    (``options``: arrays converted, broadcast and checked against the shapes below;
    ``mask_mod`` None when a ``block_mask`` carries it), and each option is also
    readable as an attribute of the problem (``problem.causal``,
    ``problem.window``): a new option needs no change here.

    Attributes
    ----------
    query, key, value : ndarray
        The inputs as given (converted with ``np.asarray``, dtype unchanged).
    mask : ndarray of bool or None
        At least 2-D, trailing dims 1 or ``(Lq, Lk)``; True = may attend.
    options : AttentionOptions
        Checked: ``bias`` at least 2-D with trailing dims 1 or ``(Lq, Lk)`` (not yet
        cast); the arrays of :meth:`AttentionOptions.checked_arrays`; user functions
        checked (:mod:`fastattn._contract.functions`).
    batch_shape : tuple of int
        Broadcast batch shape of every operand; the output is ``(*batch_shape, Lq, Dv)``.
    q_len, kv_len, head_dim, value_dim : int
        ``Lq``, ``Lk``, ``Dk``, ``Dv``.
    gqa_group : int
        Query heads per kv head (1 without grouped-query attention).
    compute_dtype, out_dtype : numpy.dtype
        Precision of the arithmetic (float32 or float64) and of the results (the lse
        is in the compute dtype: :attr:`lse_dtype`).
    scale : float
        Multiplier of ``query @ key^T`` (the option, or its default ``1/sqrt(Dk)``).
    diag_offset : int
        ``off`` of the causal and window rules (0 top-left, ``Lk - Lq`` bottom-right).
    score_mod_grad : numba dispatcher or None
        Only in a backward call with a ``score_mod``.
    score_mod_args_grad : numba dispatcher or None
        Only in a backward call that asks for the gradients of ``score_mod_args``.
    """

    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    mask: object
    options: AttentionOptions
    batch_shape: tuple
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    gqa_group: int
    compute_dtype: np.dtype
    out_dtype: np.dtype
    scale: float
    diag_offset: int
    score_mod_grad: object = None
    score_mod_args_grad: object = None

    def __getattr__(self, name):
        """The options, as attributes of the problem (only names not found above)."""
        if name == "options":  # not yet set (copying): no recursion
            raise AttributeError(name)
        return getattr(self.options, name)

    def with_options(self, **changes):
        """The problem with these options replaced (already checked values)."""
        return dataclasses.replace(self, options=self.options.replace(**changes))

    @property
    def heads(self):
        """Size of the batch axis that the user functions' ``h`` indexes: the last
        of two or more batch axes, else 1 (``b, h = divmod(entry, heads)``)."""
        return batch_heads(self.batch_shape)

    @property
    def effective_mask_mod(self):
        """The ``mask_mod`` the call applies: its own, or its block mask's."""
        block_mask = self.options.block_mask
        return block_mask.mask_mod if block_mask is not None else self.options.mask_mod

    def user_function_positions(self):
        """Where the user functions are evaluated, for every entry of the flattened
        batch: ``(b, h, mask_b, mask_h, row_offset, key_offset)``, the int64 ``(N,)``
        ``b`` and ``h`` that ``score_mod`` (and its gradients) see, those that
        ``mask_mod`` sees, and the offsets added to ``i`` and ``j``.

        The call's own ``divmod(entry, heads)`` and no offsets, or, with
        ``chunk_of``, the larger call's. ``mask_mod`` sees the ``(b, h)`` of the
        batch shape it was made for (:attr:`mask_batch_shape`): along an axis of
        size 1 that broadcasts, index 0.
        """
        batch, chunk_of = self.batch_shape, self.options.chunk_of
        b, h, row_offset, key_offset = self.options.entry_positions(batch, self.heads)
        mask_batch = self.mask_batch_shape
        if mask_batch is None:
            return b, h, b, h, row_offset, key_offset
        whole_batch = chunk_of[0] if chunk_of is not None else batch
        whole_entries = b * batch_heads(whole_batch) + h  # (N,) in the whole batch
        mask_entries = broadcast_entries(mask_batch, whole_batch)[whole_entries]  # (N,)
        mask_heads = batch_heads(mask_batch)
        return b, h, mask_entries // mask_heads, mask_entries % mask_heads, row_offset, \
            key_offset

    @property
    def mask_batch_shape(self):
        """The batch shape whose ``(b, h)`` ``mask_mod`` sees when it is not the
        call's: a block mask's own (made for a shape that broadcasts to the call's),
        or the one ``chunk_of`` names; None otherwise."""
        block_mask, chunk_of = self.options.block_mask, self.options.chunk_of
        if block_mask is not None and block_mask.batch_shape != self.batch_shape:
            return block_mask.batch_shape
        if chunk_of is not None and chunk_of[4] is not None and chunk_of[4] != chunk_of[0]:
            return chunk_of[4]
        return None

    def block_states_index(self):
        """Which entry of the block mask's tile states each entry of the flattened
        batch reads, int64 ``(N,)`` (broadcast axes read entry 0), or None when the
        mask was made for the call's batch shape (entry ``n`` reads ``n``)."""
        block_mask = self.options.block_mask
        if block_mask is None or block_mask.batch_shape == self.batch_shape:
            return None
        return broadcast_entries(block_mask.batch_shape, self.batch_shape)

    @property
    def kernel_dtype(self):
        """The kernels' compiled variant: ``uint16`` when query, key and value share one
        16-bit float dtype (read as stored, computed in float32:
        :mod:`fastattn.kernels.half`), else the compute dtype."""
        return kernel_dtype(self.compute_dtype, self.query.dtype, self.key.dtype,
                            self.value.dtype)

    @property
    def half_format(self):
        """How the 16-bit variant reads the inputs (0 bfloat16, 1 float16; 0 when the
        inputs are not 16-bit)."""
        return half_format(self.query.dtype, self.key.dtype, self.value.dtype) or 0

    @property
    def lse_dtype(self):
        """dtype of the lse: the compute dtype (float32 for 16-bit inputs: an lse in
        16 bits would lose about three digits of every row's normaliser)."""
        return self.compute_dtype

    @property
    def effective_mask_mod_args(self):
        """The arrays passed to :attr:`effective_mask_mod` (a tuple, maybe empty)."""
        block_mask = self.options.block_mask
        args = block_mask.mask_mod_args if block_mask is not None else self.options.mask_mod_args
        return args or ()

    @property
    def score_mod_args(self):
        """The arrays passed to ``score_mod`` (a tuple, maybe empty)."""
        return self.options.score_mod_args or ()

    def user_functions(self):
        """Each user function of the call by its role (for error messages)."""
        return {"score_mod": self.options.score_mod, "mask_mod": self.effective_mask_mod,
                "score_mod_grad": self.score_mod_grad,
                "score_mod_args_grad": self.score_mod_args_grad}

    @property
    def out_shape(self):
        """Shape of the attention output ``(*batch, Lq, Dv)``."""
        return self.batch_shape + (self.q_len, self.value_dim)

    @property
    def lse_shape(self):
        """Shape of the log-sum-exp output ``(*batch, Lq)``."""
        return self.batch_shape + (self.q_len,)

    @property
    def weights_shape(self):
        """Shape of the attention weights ``(*batch, Lq, Lk)``."""
        return self.batch_shape + (self.q_len, self.kv_len)

    def key_reach(self):
        """Return ``(left, right)``: how far from the diagonal a query may look.

        Key ``j`` is visible to query ``i`` (before mask, bias and kv_lengths) iff
        ``i + off - left <= j <= i + off + right``. Causal sets ``right`` to at most
        0; an unbounded side is returned as ``Lq + Lk``, which reaches every key.
        """
        return key_reach(self.options.window, self.options.causal, self.q_len, self.kv_len)


def batch_heads(batch_shape):
    """Size of the batch axis that the user functions' ``h`` indexes in a batch of
    ``batch_shape``: the last of two or more axes, else 1."""
    return batch_shape[-1] if len(batch_shape) >= 2 else 1


def broadcast_entries(own_shape, batch_shape):
    """For each entry of the flattened ``batch_shape``, the entry of the flattened
    ``own_shape`` (which broadcasts to it) that it reads: int64 ``(prod(batch_shape),)``."""
    own = np.arange(int(np.prod(own_shape, dtype=np.int64)), dtype=np.int64)
    return np.ascontiguousarray(np.broadcast_to(own.reshape(own_shape), batch_shape).ravel())


def key_reach(window, causal, q_len, kv_len):
    """``(left, right)`` of :meth:`AttentionProblem.key_reach` for a ``window`` (or
    None), the ``causal`` flag and ``Lq``, ``Lk``: the one rule of how far a query
    reaches, shared with :mod:`fastattn.dask`'s chunk planner."""
    unbounded = q_len + kv_len
    left, right = window if window is not None else (unbounded, unbounded)
    if causal:
        right = min(right, 0)
    return min(left, unbounded), min(right, unbounded)


def check_attention(query, key, value, mask=None, options=DEFAULT_OPTIONS):
    """Validate the arrays of an attention call against its ``options``.

    Parameters
    ----------
    query, key, value, mask
        As given to :func:`fastattn.scaled_dot_product_attention`.
    options : AttentionOptions
        The call's keyword options (scalars already checked).

    Returns
    -------
    AttentionProblem

    Raises
    ------
    TypeError
        For inputs of a non-real dtype, a non-boolean mask, non-integer kv_lengths,
        ALiBi slopes that are not real, a ``score_mod`` or ``mask_mod`` that is not
        a Numba-compiled function of the right arity and return type, or a
        ``block_mask`` that is not a :class:`~fastattn.block_mask.BlockMask`.
    ValueError
        For shapes that do not fit together, a bias holding ``+inf``, kv_lengths of
        the wrong length or out of range, ALiBi slopes not finite or not
        broadcastable to the batch shape, a ``block_mask`` made for another shape,
        or a ``mask_mod`` other than the ``block_mask``'s; the message names the
        argument and shapes.
    """
    if (mask is None and not options.has_operands and type(query) is np.ndarray
            and type(key) is np.ndarray and type(value) is np.ndarray):
        # Plain ndarrays and no per-call operands: the checks depend on the shapes,
        # dtypes and the scalar options only, so their outcome is looked up (tiny
        # calls and decoding loops repeat shapes; see _plain_problem_fields).
        return _plain_problem(query, key, value, options)
    return _checked_attention(query, key, value, mask, options)


def _checked_attention(query, key, value, mask, options):
    """Every check of :func:`check_attention`, in full."""
    query = as_real_array("query", query)
    key = as_real_array("key", key)
    value = as_real_array("value", value)
    compute_dtype, out_dtype = result_dtypes(query, key, value)
    q_len, kv_len, head_dim, value_dim = matrix_dims(query, key, value)

    if mask is not None:
        mask = check_score_operand("mask", as_mask_array(mask), q_len, kv_len)
    bias = options.bias
    if bias is not None:
        bias = check_score_operand("bias", as_real_array("bias", bias), q_len, kv_len)
        if bias.dtype.kind == "f" and np.isposinf(bias).any():
            raise ValueError("bias must not hold +inf (it would make the softmax NaN); "
                             "-inf is allowed and hides a key")

    group = gqa_group_size(query, key, value, options.enable_gqa)
    batch_shape = broadcast_batch(query, key, value, mask, bias, group)
    diag_offset = diagonal_offset(options.causal_alignment, q_len, kv_len)
    checked = dict(options.checked_arrays(batch_shape, kv_len), bias=bias)
    if options.has_score_functions:
        checked.update(check_user_functions(options, batch_shape, q_len, kv_len,
                                            compute_dtype))
    if options.has_operands or mask is not None:
        options = options.replace(**checked)

    return AttentionProblem(
        query=query, key=key, value=value, mask=mask, options=options,
        batch_shape=batch_shape, q_len=q_len, kv_len=kv_len,
        head_dim=head_dim, value_dim=value_dim, gqa_group=group,
        compute_dtype=compute_dtype, out_dtype=out_dtype,
        scale=default_scale(options.scale, head_dim), diag_offset=diag_offset)


def check_user_functions(options, batch_shape, q_len, kv_len, dtype):
    """Check the user's score functions, the arrays passed to them and the block mask
    of ``options`` for a call of this batch shape, ``Lq``, ``Lk`` and compute
    ``dtype``; returns the checked ``score_mod``, ``mask_mod``, ``block_mask``,
    ``score_mod_args`` and ``mask_mod_args`` as a dict (``mask_mod`` and its args
    None when the block mask carries them)."""
    from fastattn.block_mask import check_block_mask

    score_args = check_function_args("score_mod_args", options.score_mod_args, "score_mod")
    mask_args = check_function_args("mask_mod_args", options.mask_mod_args, "mask_mod")
    for name, args, function in (("score_mod_args", score_args, options.score_mod),
                                 ("mask_mod_args", mask_args,
                                  options.mask_mod or options.block_mask)):
        if args and function is None:
            raise ValueError(f"{name} was given without a {name[:-5]}: they are the "
                             f"trailing arguments of that function")
    score_mod = check_score_function("score_mod", options.score_mod, dtype, score_args)
    mask_mod = check_score_function("mask_mod", options.mask_mod, dtype, mask_args)
    block_mask = check_block_mask(options.block_mask, batch_shape, q_len, kv_len)
    if block_mask is not None and options.chunk_of is not None:
        raise ValueError("chunk_of cannot be combined with a block_mask (its tiles are "
                         "this call's): pass the block mask's mask_mod and mask_mod_args "
                         "instead")
    checked = dict(score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask,
                   score_mod_args=score_args or None, mask_mod_args=mask_args or None)
    if block_mask is None:
        return checked
    if mask_mod not in (None, block_mask.mask_mod):
        raise ValueError("pass either mask_mod or a block_mask made from it, not both: "
                         "block_mask carries its own mask_mod")
    if mask_args and not _same_arrays(mask_args, block_mask.mask_mod_args or ()):
        raise ValueError("pass either mask_mod_args or a block_mask made with them, not "
                         "both: block_mask carries its own mask_mod_args")
    check_score_function("mask_mod", block_mask.mask_mod, dtype, block_mask.mask_mod_args or ())
    return dict(checked, mask_mod=None, mask_mod_args=None)


def _same_arrays(arrays, others):
    """Whether two tuples of arrays hold the same arrays (the same memory)."""
    return len(arrays) == len(others) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.ctypes.data == b.ctypes.data
        for a, b in zip(arrays, others))


# fields of AttentionProblem after query, key, value, mask and options
_SHAPE_FIELDS = ("batch_shape", "q_len", "kv_len", "head_dim", "value_dim", "gqa_group",
                 "compute_dtype", "out_dtype", "scale", "diag_offset")


def _plain_problem(query, key, value, options):
    """The :class:`AttentionProblem` of plain ndarrays under scalar ``options``, its
    fields looked up by :func:`_plain_problem_fields`.

    A decoding loop grows ``Lk`` by one every step, so the lookup is keyed on the
    shapes with ``Lk`` left out when key and value agree on it (no check of scalar
    options depends on ``Lk`` otherwise): the fields that do depend on it,
    ``kv_len`` and ``diag_offset``, are set from this call's ``Lk``. A call the
    checks refuse is checked again with its real shapes, whose message it raises.
    """
    key_shape, value_shape = key.shape, value.shape
    if len(key_shape) < 2 or len(value_shape) < 2 or key_shape[-2] != value_shape[-2]:
        return AttentionProblem(query, key, value, None, options, *_plain_problem_fields(
            query.shape, key_shape, value_shape, query.dtype, key.dtype, value.dtype, options))
    kv_len = key_shape[-2]
    try:
        fields = _plain_problem_fields(
            query.shape, key_shape[:-2] + (_ANY_KV_LEN,) + key_shape[-1:],
            value_shape[:-2] + (_ANY_KV_LEN,) + value_shape[-1:], query.dtype, key.dtype,
            value.dtype, options)
    except (TypeError, ValueError):  # the same checks on the real shapes: their message
        return AttentionProblem(query, key, value, None, options, *_plain_problem_fields(
            query.shape, key_shape, value_shape, query.dtype, key.dtype, value.dtype, options))
    shape_fields = dict(zip(_SHAPE_FIELDS, fields))
    shape_fields.update(kv_len=kv_len, diag_offset=diagonal_offset(
        options.causal_alignment, shape_fields["q_len"], kv_len))
    return AttentionProblem(query, key, value, None, options, **shape_fields)


# The Lk of the stand-ins that check plain calls whose key and value agree on Lk.
_ANY_KV_LEN = 1


@functools.lru_cache(maxsize=256)
def _plain_problem_fields(q_shape, k_shape, v_shape, q_dtype, k_dtype, v_dtype, options):
    """The :data:`_SHAPE_FIELDS` of a call with only query, key, value and scalar
    ``options`` (shared objects, see :func:`~fastattn._contract.options.options_from`).

    Runs the full :func:`check_attention` on stand-ins of the same shapes and dtypes
    (zero-strided views of one element, no memory), so a bad combination raises
    exactly what it raises for real arrays (and an exception is never cached).
    """
    problem = stand_in_problem((q_shape, k_shape, v_shape), (q_dtype, k_dtype, v_dtype),
                               options)
    return tuple(getattr(problem, name) for name in _SHAPE_FIELDS)


def stand_in_problem(shapes, dtypes, options):
    """The :class:`AttentionProblem` of stand-ins for query, key and value of these
    ``shapes`` and ``dtypes`` under scalar ``options``: zero-strided views of one
    element (no memory), checked in full, so a bad combination raises exactly what
    real arrays of those shapes raise."""
    query, key, value = (np.broadcast_to(np.zeros((), dtype), shape)
                         for shape, dtype in zip(shapes, dtypes))
    return _checked_attention(query, key, value, None, options)


def checked_problem(query, key, value, *, mask=None, kv_lengths=None, causal=False,
                    gqa_group=1, dropout_p=0.0, dropout_seed=None):
    """An :class:`AttentionProblem` from operands a caller has already checked.

    For the layers, which check their inputs, mask and ``kv_lengths`` (with messages
    in their own terms) before the projections: the problem is built once, with no
    second pass over the same checks. ``query`` ``(B, H, Lq, d)``, ``key`` and
    ``value`` ``(B, Hkv, Lk, d)`` share one float dtype; ``mask`` broadcasts to
    ``(B, H, Lq, Lk)``; ``kv_lengths`` is int64 ``(B,)``; the scale is the default
    and the causal rule top-left; ``dropout_p`` and ``dropout_seed`` as the options.
    """
    dtype = query.dtype
    q_len, kv_len, head_dim, value_dim = matrix_dims(query, key, value)
    options = AttentionOptions(causal=causal, kv_lengths=kv_lengths, dropout_p=dropout_p,
                               dropout_seed=dropout_seed)
    return AttentionProblem(
        query=query, key=key, value=value, mask=mask, options=options,
        batch_shape=query.shape[:-2], q_len=q_len, kv_len=kv_len, head_dim=head_dim,
        value_dim=value_dim, gqa_group=gqa_group, compute_dtype=dtype, out_dtype=dtype,
        scale=default_scale(None, head_dim), diag_offset=0)


def check_score_mod_grad(problem, score_mod_grad, score_mod_args_grad=None):
    """The backward's ``problem`` with its checked ``score_mod_grad``, which a
    ``score_mod`` needs (a ValueError naming it when missing), and
    ``score_mod_args_grad``, which needs ``score_mod_args``."""
    if problem.score_mod is None:
        for name, function in (("score_mod_grad", score_mod_grad),
                               ("score_mod_args_grad", score_mod_args_grad)):
            if function is not None:
                raise ValueError(f"{name} was given without a score_mod")
        return problem
    if score_mod_grad is None:
        raise ValueError(
            "the backward of a score_mod needs score_mod_grad(s, b, h, i, j, "
            "*score_mod_args) = d score_mod / d s, a Numba-compiled function; pass it as "
            "score_mod_grad=")
    args = problem.score_mod_args
    grad = check_score_function("score_mod_grad", score_mod_grad, problem.compute_dtype, args)
    if score_mod_args_grad is not None and not args:
        raise ValueError("score_mod_args_grad was given without score_mod_args: it gives "
                         "the gradients of those arrays")
    args_grad = check_score_function("score_mod_args_grad", score_mod_args_grad,
                                     problem.compute_dtype, args)
    return dataclasses.replace(problem, score_mod_grad=grad, score_mod_args_grad=args_grad)


def check_bias_grad_request(problem, return_bias_grad):
    """Refuse a bias gradient the backward cannot give: without a bias, or with both a
    softcap and a ``score_mod`` (the bias sits between them in the score's order)."""
    if not return_bias_grad:
        return
    if problem.bias is None:
        raise ValueError("return_bias_grad=True needs the bias= the forward was given; "
                         "this call has no bias")
    if problem.softcap is not None and problem.score_mod is not None:
        raise ValueError(
            "return_bias_grad=True is not supported with both softcap= and score_mod=: "
            "apply the cap inside score_mod (fastattn.score_math.tanh) instead")


def check_backward_arrays(problem, grad_out, out, lse):
    """Validate the extra arrays of the backward against the forward's problem.

    ``grad_out`` and ``out`` must have the forward output's shape ``(*batch, Lq, Dv)``
    and ``lse`` the shape ``(*batch, Lq)``; all must be real.

    Returns
    -------
    grad_out, out, lse : ndarray
    """
    checked = []
    for name, array, shape, meaning in (
            ("grad_out", grad_out, problem.out_shape, "(*batch, Lq, Dv)"),
            ("out", out, problem.out_shape, "(*batch, Lq, Dv)"),
            ("lse", lse, problem.lse_shape, "(*batch, Lq)")):
        array = as_real_array(name, array)
        if array.shape != shape:
            raise ValueError(f"{name} must have the forward's shape {meaning} = {shape}; "
                             f"got {array.shape}")
        checked.append(array)
    return tuple(checked)
