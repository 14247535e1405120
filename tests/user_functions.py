"""User score functions shared by the tests (score_mod, mask_mod, score_mod_grad),
the option families built from them, and ill-formed functions with the errors they
must raise."""

import math

import numba
import numpy as np

MAX_LEN = 1100
# a learned relative-position bias: one row per head, one column per offset i - j
TABLE = np.random.default_rng(5).standard_normal((3, 2 * MAX_LEN - 1))  # (H, 2 L - 1)


@numba.njit
def relative_bias(s, b, h, i, j):
    return s + TABLE[h % 3, i - j + MAX_LEN - 1]


@numba.njit
def unit_grad(s, b, h, i, j):
    return 1.0


@numba.njit
def wobble(s, b, h, i, j):
    """A nonlinear score_mod that depends on every argument."""
    return s + 0.5 * math.sin(s) + 0.1 * b - 0.05 * h + 0.01 * (i - j)


@numba.njit
def wobble_grad(s, b, h, i, j):
    return 1.0 + 0.5 * math.cos(s)


CAP = 2.0


@numba.njit
def tanh_cap(s, b, h, i, j):
    return CAP * math.tanh(s / CAP)


@numba.njit
def tanh_cap_grad(s, b, h, i, j):
    t = math.tanh(s / CAP)
    return 1.0 - t * t


@numba.njit
def documents(b, h, i, j):
    """Packed sequences of 37 tokens, causal within each."""
    return i // 37 == j // 37 and j <= i


@numba.njit
def prefix_lm(b, h, i, j):
    """The first 20 keys are seen by everyone, the rest causally."""
    return j < 20 or j <= i


@numba.njit
def scattered(b, h, i, j):
    """Depends on b and h; hides every key of every fifth row."""
    return (i + 2 * j + b + 3 * h) % 4 != 0 and i % 5 != 0


@numba.njit
def sliding_window(b, h, i, j):
    return i - 40 <= j <= i


SCORE_MODS = {
    "relative-bias": dict(score_mod=relative_bias, score_mod_grad=unit_grad),
    "wobble": dict(score_mod=wobble, score_mod_grad=wobble_grad),
}
MASK_MODS = {"documents": documents, "prefix-lm": prefix_lm, "scattered": scattered,
             "sliding-window": sliding_window}
USER_OPTIONS = {
    **SCORE_MODS,
    **{name: dict(mask_mod=function) for name, function in MASK_MODS.items()},
    "wobble-documents": dict(score_mod=wobble, score_mod_grad=wobble_grad,
                             mask_mod=documents),
}


# ---------------------------------------------------------------- ill-formed

def not_compiled(s, b, h, i, j):
    return s


@numba.njit
def three_arguments(s, b, h):
    return s


@numba.njit
def mask_returning_float(b, h, i, j):
    return 1.0


@numba.njit
def score_returning_bool(s, b, h, i, j):
    return s > 0


@numba.njit
def score_returning_tuple(s, b, h, i, j):
    return s, s


@numba.njit
def wrong_types(s, b, h, i, j):
    return s.upper()


USER_ERRORS = {
    "score-not-compiled": (dict(score_mod=not_compiled), TypeError,
                           ["score_mod", "numba.njit", "(s, b, h, i, j)"]),
    "score-lambda": (dict(score_mod=lambda s, b, h, i, j: s), TypeError,
                     ["score_mod", "numba.njit"]),
    "score-arity": (dict(score_mod=three_arguments), TypeError,
                    ["score_mod", "3 arguments", "not 5"]),
    "score-bool": (dict(score_mod=score_returning_bool), TypeError,
                   ["score_mod", "returns bool", "real number"]),
    "score-tuple": (dict(score_mod=score_returning_tuple), TypeError,
                    ["score_mod", "returns", "Tuple"]),
    "score-untypable": (dict(score_mod=wrong_types), TypeError,
                        ["score_mod", "does not compile"]),
    "mask-not-compiled": (dict(mask_mod=lambda b, h, i, j: True), TypeError,
                          ["mask_mod", "numba.njit", "(b, h, i, j)"]),
    "mask-arity": (dict(mask_mod=wobble), TypeError, ["mask_mod", "5 arguments", "not 4"]),
    "mask-float": (dict(mask_mod=mask_returning_float), TypeError,
                   ["mask_mod", "returns float64", "bool"]),
    "block-mask-type": (dict(block_mask=np.ones((2, 3), bool)), TypeError,
                        ["block_mask", "create_block_mask"]),
}


# ---------------------------------------------------------------- functions of arrays
# (score_mod_args, mask_mod_args: arrays passed at every call)

@numba.njit
def table_bias(s, b, h, i, j, table, scales):
    """A learned relative-position table ``(H, 2 L - 1)`` (offset ``i - j`` at column
    ``i - j + L - 1``, L = (columns + 1) / 2) and per-head scales ``(H,)``."""
    return s * scales[h] + table[h, i - j + (table.shape[1] - 1) // 2]


@numba.njit
def table_bias_grad(s, b, h, i, j, table, scales):
    return scales[h]


@numba.njit
def table_bias_args_grad(g, s, b, h, i, j, grads, table, scales):
    grads[0][h, i - j + (table.shape[1] - 1) // 2] += g
    grads[1][h] += g * s


@numba.njit
def same_document(b, h, i, j, document_of):
    """Causal within the document of each token (``document_of`` ``(L,)``)."""
    return document_of[i] == document_of[j] and j <= i


def relative_table(rng, heads, length, dtype=np.float64):
    """A table ``(H, 2 L - 1)`` and per-head scales ``(H,)`` for :func:`table_bias`."""
    return (rng.standard_normal((heads, 2 * length - 1)).astype(dtype),
            (1.0 + 0.5 * rng.standard_normal(heads)).astype(dtype))


def document_ids(rng, length, documents=4):
    """Sorted document ids ``(L,)`` of ``documents`` documents of random lengths."""
    return np.sort(rng.integers(0, documents, length))
