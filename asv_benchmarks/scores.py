"""Score options and user score functions: what each costs over plain attention.

fastattn only, float32 ``(B=1, H=8, L, D=64)``; the forward and the backward over
``L``, for plain attention, the built-in softcap and ALiBi slopes, a
relative-position bias through ``score_mod`` and a block-sparse document mask (8
packed documents of ``L / 8`` tokens, ``mask_mod`` + ``create_block_mask``). The
goals (issue 11) are checked from interleaved runs by ``score_ratios.py``.
"""

import numpy as np

from . import score_functions
from .common import attention_call, random_qkv

BATCH, HEADS, HEAD_DIM = 1, 8, 64
# Options per case; the ALiBi slopes are the usual geometric ones, 2**-(8 h / H).
CASES = {
    "plain": {},
    "softcap": dict(softcap=30.0),
    "alibi": dict(alibi_slopes=2.0 ** (-8.0 * np.arange(1, HEADS + 1) / HEADS)),
    "score_mod": None,  # built per length in setup
    "block_sparse": None,
}


def user_options(case, length):
    """Options of the user-function cases, which depend on the length: forward
    options, and the backward's extra ones."""
    import fastattn

    if case == "score_mod":
        table = np.random.default_rng(1).standard_normal((HEADS, 2 * length - 1)) * 0.1
        score_mod = score_functions.relative_position_bias(table)
        return dict(score_mod=score_mod), dict(score_mod_grad=unit_grad())
    mask_mod = score_functions.documents(length // 8)
    return dict(block_mask=fastattn.create_block_mask(mask_mod, (BATCH, HEADS), length,
                                                      length)), {}


def unit_grad():
    """``d (s + bias) / d s = 1``, compiled once."""
    import numba

    global _UNIT_GRAD
    if _UNIT_GRAD is None:
        _UNIT_GRAD = numba.njit(lambda s, b, h, i, j: 1.0)
    return _UNIT_GRAD


_UNIT_GRAD = None


class TimeScoreOptions:
    """Forward and backward time of each case over sequence length."""

    params = [list(CASES), [512, 2048, 8192]]
    param_names = ["case", "length"]
    timeout = 600
    number = 1
    repeat = (1, 5, 30.0)

    def setup(self, case, length):
        import fastattn

        shape = (BATCH, HEADS, length, HEAD_DIM)
        self.query, self.key, self.value = random_qkv(shape, shape, "float32")
        self.options, backward_options = CASES[case], {}
        if self.options is None:
            self.options, backward_options = user_options(case, length)
        self.backward_options = dict(self.options, **backward_options)
        self.forward = attention_call("fastattn", self.query, self.key, self.value,
                                      **self.options)
        self.out, self.lse = fastattn.scaled_dot_product_attention(
            self.query, self.key, self.value, return_lse=True, **self.options)
        self.backward = fastattn.scaled_dot_product_attention_backward
        self.time_backward(case, length)  # compile or load the backward kernel

    def time_forward(self, case, length):
        self.forward()

    def time_backward(self, case, length):
        self.backward(self.out, self.query, self.key, self.value, self.out, self.lse,
                      **self.backward_options)
