"""Decoding steps prepared once: the Python work of a decoding loop's attention call,
done once per shape instead of once per token.

A model decoding token by token calls attention with the same shapes every step but
one: the key length, which grows by one. :func:`fastattn.scaled_dot_product_attention`
checks every call, folds the query heads of each kv group into one block
(:func:`~fastattn._dispatch.layout.fold_query_groups`) and builds the kernel's argument
groups, about 30 us of Python on a Zen 3 CPU, more between a model's layers, where
the interpreter's caches are cold; the decode kernel itself needs 20-60 us at the
sizes of a small model. A :class:`DecodeStep` does that work for the first call of a
signature (full checks, on the real arrays) and keeps what does not depend on ``Lk``;
each later call only lays the arrays out, sets the key length's two numbers
(:func:`~fastattn._contract.problem.key_reach`, the diagonal offset) and runs the
kernel through the same :func:`~fastattn._dispatch.run.decode_into` as the general
path, so its results are bitwise those of
:func:`fastattn.scaled_dot_product_attention` for the same call.

:func:`decode_step` finds (or prepares) the step of a call; the Hugging Face adapter
(:mod:`fastattn.huggingface`) takes it for the decoding calls of a generation loop.
"""

import math

import numpy as np

from fastattn._contract.arguments import diagonal_offset
from fastattn._contract.options import options_from
from fastattn._contract.problem import check_attention, key_reach, stand_in_problem
from fastattn._dispatch.layout import (NO_HOOK, as_stored, fold_query_groups,
                                       plain_visibility, problem_arguments)
from fastattn._dispatch.run import decode_into, decode_supported
from fastattn._runtime import settings

__all__ = ["DecodeStep", "decode_step"]


class DecodeStep:
    """The attention of one decoding step, for every call of one signature: the
    shapes of ``query`` ``(*batch, Hq, Lq, Dk)``, ``key`` ``(*batch, Hkv, Lk, Dk)`` and
    ``value`` ``(*batch, Hkv, Lk, Dv)`` but ``Lk``, their dtypes, and the scalar
    options (:class:`~fastattn._contract.options.AttentionOptions` without arrays).

    Built from the checked problem of a first call that the decode kernel takes
    (:func:`~fastattn._dispatch.run.decode_supported`, after GQA folding) with no
    ``kv_lengths``; calling it with arrays of the same signature returns what
    :func:`fastattn.scaled_dot_product_attention` returns for them, ``out``
    ``(*batch, Hq, Lq, Dv)`` in the result dtype, bitwise the same.

    Attributes
    ----------
    signature : tuple
        What a call must match: ``(query shape, key shape without Lk, value shape
        without Lk, the three dtypes)``.
    """

    __slots__ = ("signature", "_kernel_dtype", "_inputs", "_options", "_out_shape",
                 "_out_dtype", "_lse_dtype", "_stacks", "_rule", "_q_len", "_rows",
                 "_visibility")

    def __init__(self, problem, signature):
        folded = fold_query_groups(problem) or problem  # GQA: a kv head's queries as rows
        self.signature = signature
        self._kernel_dtype = folded.kernel_dtype
        self._inputs, self._options = problem_arguments(folded, NO_HOOK)[:2]
        self._out_shape = problem.out_shape  # (*batch, Hq, Lq, Dv)
        self._out_dtype, self._lse_dtype = problem.out_dtype, folded.compute_dtype
        n_batch, n_kv = math.prod(folded.batch_shape), self._inputs.key.shape[0]
        # (N, rows, Dk) queries, (N_kv, Lk, Dk) keys and (N_kv, Lk, Dv) values
        self._stacks = ((n_batch, folded.q_len, folded.head_dim), (n_kv, folded.head_dim),
                        (n_kv, folded.value_dim))
        self._rule = folded.options  # causal, causal_alignment and window: who sees what
        self._q_len, self._rows = problem.q_len, folded.q_len  # per head, per block
        self._visibility = (-1, None)  # (Lk, its Visibility): a model's layers share it
        settings.apply()  # before the first kernel call, as the general path does

    def __call__(self, query, key, value):
        """``out`` ``(*batch, Hq, Lq, Dv)`` of ``query``, ``key`` and ``value``, ndarrays
        of this step's :attr:`signature` (the caller looks it up: :func:`decode_step`)."""
        kv_len = key.shape[-2]
        query_shape, key_shape, value_shape = self._stacks
        stored = self._kernel_dtype
        inputs = self._inputs._replace(
            query=as_stored(query, stored).reshape(query_shape),  # (N, rows, Dk)
            key=as_stored(key, stored).reshape((key_shape[0], kv_len,
                                                key_shape[1])),  # (N_kv, Lk, Dk)
            value=as_stored(value, stored).reshape((value_shape[0], kv_len,
                                                    value_shape[1])))  # (N_kv, Lk, Dv)
        seen_len, visibility = self._visibility
        if seen_len != kv_len:
            rule = self._rule
            visibility = plain_visibility(
                diagonal_offset(rule.causal_alignment, self._q_len, kv_len),
                *key_reach(rule.window, rule.causal, self._rows, kv_len))
            self._visibility = (kv_len, visibility)
        out = np.empty(query_shape[:2] + (value_shape[1],), stored)  # (N, rows, Dv)
        lse = np.empty(query_shape[:2], self._lse_dtype)  # (N, rows)
        decode_into(stored, inputs, self._options, visibility, out, lse)
        out = out.reshape(self._out_shape)  # (*batch, Hq, Lq, Dv)
        if stored == np.uint16:  # 16-bit results, written as their bits
            return out.view(self._out_dtype)
        return out if out.dtype == self._out_dtype else out.astype(self._out_dtype)


def decode_step(query, key, value, keywords):
    """The :class:`DecodeStep` for a call of ``query``, ``key`` and ``value`` (ndarrays)
    with the keyword options ``keywords`` (a dict of scalar options, as given to
    :func:`fastattn.scaled_dot_product_attention`), or None when the decode kernel
    does not take such a call (too many query rows, an option it does not implement,
    top-left causal, an array option such as ``kv_lengths``) or the arrays do not
    agree on ``Lk``.

    Steps are looked up by the shapes (``Lk`` left out), dtypes and keywords as
    given, hashed as they are (no options object is built once a signature is
    known). The checks run once per signature, on stand-ins of its shapes; a call
    they refuse is checked again on its own arrays, which raises its error.
    """
    if key.ndim < 2 or value.ndim < 2 or key.shape[-2] != value.shape[-2]:
        return None
    signature = (query.shape, key.shape[:-2] + key.shape[-1:],
                 value.shape[:-2] + value.shape[-1:], query.dtype, key.dtype, value.dtype)
    try:
        lookup = signature + tuple(keywords.items())
        step = _STEPS.get(lookup, _UNKNOWN)
    except TypeError:  # an unhashable option (an array): not a plain decoding step
        return None
    if step is _UNKNOWN:
        options = options_from(keywords)
        step = None if options.has_operands else _prepared(signature, options)
        if len(_STEPS) >= _MOST_STEPS:
            _STEPS.clear()
        _STEPS[lookup] = step
    if step is _REFUSED:
        check_attention(query, key, value, None, options_from(keywords))  # raises its error
        return None
    return step


# Steps by signature and keywords as given (None: not a decoding step; _REFUSED: the
# checks refuse the signature), at most _MOST_STEPS of them (the one cache of steps)
_STEPS = {}
_MOST_STEPS = 256
_UNKNOWN = object()
_REFUSED = object()


def _prepared(signature, options):
    """The :class:`DecodeStep` of a signature under ``options``, prepared from
    stand-ins of its shapes and dtypes (``Lk`` 1, no memory:
    :func:`~fastattn._contract.problem.stand_in_problem`); None where the decode kernel
    does not take the call, ``_REFUSED`` where the checks refuse it."""
    query_shape, key_shape, value_shape, *dtypes = signature
    shapes = (query_shape, key_shape[:-1] + (1,) + key_shape[-1:],
              value_shape[:-1] + (1,) + value_shape[-1:])
    try:
        problem = stand_in_problem(shapes, dtypes, options)
    except (TypeError, ValueError):
        return _REFUSED
    if options.causal and options.causal_alignment != "bottom_right":
        return None  # top-left: whether GQA heads fold depends on Lk
    folded = fold_query_groups(problem) or problem
    if not decode_supported(folded, False):
        return None
    return DecodeStep(problem, signature)
