"""User score functions of the benchmarks (issue 11's goal cases), built by small
factories so each case compiles its own: a learned relative-position bias, a softcap
written as a ``score_mod``, a sliding window, packed documents."""

import math

import numba
import numpy as np


def relative_position_bias(table):
    """``score_mod`` adding ``table[h, i - j + L - 1]``: a learned bias per head and
    offset, ``table`` ``(H, 2 L - 1)`` (T5, ALiBi-like learned variants).

    Numba freezes ``table`` into the compiled function (a later change to the array
    is not seen); build a new one for new values.
    """
    center = (table.shape[1] - 1) // 2

    @numba.njit
    def score_mod(s, b, h, i, j):
        return s + table[h, i - j + center]

    return score_mod


def softcap_score_mod(cap, tanh=math.tanh):
    """``score_mod`` ``cap * tanh(s / cap)`` (the built-in ``softcap``, as a user
    function) and its ``score_mod_grad``, with ``tanh`` from ``math`` (a C library
    call per score) or :mod:`fastattn.score_math` (vectorised)."""

    @numba.njit
    def score_mod(s, b, h, i, j):
        return cap * tanh(s / cap)

    @numba.njit
    def score_mod_grad(s, b, h, i, j):
        t = tanh(s / cap)
        return 1.0 - t * t

    return score_mod, score_mod_grad


def sliding_window(width):
    """``mask_mod``: query ``i`` sees keys ``i - width .. i``."""

    @numba.njit
    def mask_mod(b, h, i, j):
        return i - width <= j <= i

    return mask_mod


def documents(length):
    """``mask_mod`` of packed sequences of ``length`` tokens each: a token sees the
    tokens of its own document only."""

    @numba.njit
    def mask_mod(b, h, i, j):
        return i // length == j // length

    return mask_mod


def dense_mask(mask_mod, q_len, kv_len):
    """The boolean ``(Lq, Lk)`` array of a ``mask_mod`` that ignores ``b`` and ``h``
    (what a caller without ``mask_mod`` would pass as ``mask``)."""
    mask = np.empty((q_len, kv_len), np.bool_)  # (Lq, Lk)
    _fill_mask(mask_mod, mask)
    return mask


@numba.njit
def _fill_mask(mask_mod, mask):
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            mask[i, j] = mask_mod(0, 0, i, j)
