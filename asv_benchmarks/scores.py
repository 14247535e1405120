"""Built-in score options: what a softcap or ALiBi slopes cost over plain attention.

fastattn only, float32 ``(B=1, H=8, L, D=64)``; the forward and the backward over
``L``. The goals (issue 11, interleaved runs): softcap <= 1.25 x plain and ALiBi
<= 1.15 x plain at ``L = 2048``.
"""

import numpy as np

from .common import attention_call, random_qkv

BATCH, HEADS, HEAD_DIM = 1, 8, 64
# Options per case; the ALiBi slopes are the usual geometric ones, 2**-(8 h / H).
CASES = {
    "plain": {},
    "softcap": dict(softcap=30.0),
    "alibi": dict(alibi_slopes=2.0 ** (-8.0 * np.arange(1, HEADS + 1) / HEADS)),
}


class TimeScoreOptions:
    """Forward and backward time of plain / softcap / alibi over sequence length."""

    params = [list(CASES), [512, 2048, 8192]]
    param_names = ["case", "length"]
    timeout = 600
    number = 1
    repeat = (1, 5, 30.0)

    def setup(self, case, length):
        import fastattn

        shape = (BATCH, HEADS, length, HEAD_DIM)
        self.query, self.key, self.value = random_qkv(shape, shape, "float32")
        self.options = CASES[case]
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
                      **self.options)
