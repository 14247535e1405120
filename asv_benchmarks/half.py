"""16-bit inputs (bfloat16, float16) against float32: forward, backward, decode, memory.

The goals of 16-bit inputs (issue 24), one benchmark each, with the dtype a
parameter: a bfloat16 forward and backward at ``(1, 8, 4096, 128)`` against float32
(and PyTorch's own 16-bit SDPA), a decode with 16-bit K/V (``Lq = 1``, ``Lk = 8192``,
32 heads, D = 128: reading half the bytes, the goal is 0.6x float32's time on any
CPU), the forward's GFLOP/s, and the extra memory of a bfloat16 forward at
``(1, 8, 8192, 128)`` as a share of q + k + v (goal: under 25%; a widened float32
copy alone would be 200%). Ratios quoted in the notes come from interleaved rounds in
separate processes, not from these absolute figures.
"""

from .backward import backward_call
from .common import (attention_call, attention_flops, best_seconds, extra_memory_bytes,
                     random_qkv)

SHAPE = (1, 8, 4096, 128)  # (B, H, L, D) of the forward and backward


class HalfCase:
    """The parameters every benchmark here shares: implementation and dtype."""

    params = [["fastattn", "torch"], ["float32", "bfloat16", "float16"]]
    param_names = ["impl", "dtype"]
    timeout = 600


class TimeHalfForward(HalfCase):
    """Forward ``(1, 8, 4096, 128)``, not causal."""

    number = 1
    repeat = (1, 5, 30.0)

    def setup(self, impl, dtype):
        self.call = attention_call(impl, *random_qkv(SHAPE, SHAPE, dtype))

    def time_forward(self, impl, dtype):
        self.call()

    def track_gflops(self, impl, dtype):
        """Achieved GFLOP/s (``4*B*H*L*L*D``), best of three: the route's throughput."""
        return attention_flops(1, 8, 4096, 4096, 128) / best_seconds(self.call) / 1e9

    track_gflops.unit = "GFLOP/s"


class TimeHalfBackward(HalfCase):
    """Backward ``(1, 8, 4096, 128)``, not causal."""

    number = 1
    repeat = (1, 5, 30.0)

    def setup(self, impl, dtype):
        self.call = backward_call(impl, *random_qkv(SHAPE, SHAPE, dtype), False)

    def time_backward(self, impl, dtype):
        self.call()


class TimeHalfDecode(HalfCase):
    """Decoding one token: ``Lq = 1`` against ``Lk = 8192``, 32 heads, D = 128."""

    def setup(self, impl, dtype):
        self.call = attention_call(impl, *random_qkv((1, 32, 1, 128), (1, 32, 8192, 128),
                                                     dtype))

    def time_decode(self, impl, dtype):
        self.call()


class TrackHalfExtraMemory(HalfCase):
    """Extra resident memory of a forward ``(1, 8, 8192, 128)`` beyond its inputs and
    output, in percent of the bytes of q + k + v; the warm-up (compilation) runs on a
    small input of the same dtype and layout."""

    params = [["fastattn"], HalfCase.params[1]]
    unit = "% of q+k+v"

    def setup(self, impl, dtype):
        shape = (1, 8, 8192, 128)
        self.inputs = random_qkv(shape, shape, dtype)
        attention_call(impl, *random_qkv((1, 8, 16, 128), (1, 8, 16, 128), dtype))
        self.call = lambda: attention_call(impl, *self.inputs, warm_up=False)()

    def track_extra_percent(self, impl, dtype):
        inputs_bytes = sum(array.nbytes for array in self.inputs)
        return 100.0 * extra_memory_bytes(self.call) / inputs_bytes
