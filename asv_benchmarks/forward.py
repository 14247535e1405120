"""Forward attention: how time, throughput and memory change with sequence length and d_k.

Inputs are 4-D ``(B=1, H=8, L, D)`` standard-normal arrays, so PyTorch takes its
fused CPU kernel rather than its slow 3-D fallback. fastattn and PyTorch use every
core (Numba's and PyTorch's defaults); ``setup`` runs the call once so compilation
never lands in a timed region (compile cost has its own ``timeraw_*`` benchmarks).
"""

from .common import (IMPLEMENTATIONS, attention_call, attention_flops, best_seconds,
                     extra_memory_bytes, random_qkv, skip_unsupported)

BATCH, HEADS = 1, 8


class TimeForward:
    """Forward time over sequence length x d_k, causal or not, float32 and float64."""

    params = [IMPLEMENTATIONS, [128, 512, 2048, 8192], [16, 32, 64, 128], [False, True],
              ["float32", "float64"]]
    param_names = ["impl", "length", "d_k", "causal", "dtype"]
    timeout = 600
    number = 1
    repeat = (1, 5, 30.0)

    def setup(self, impl, length, d_k, causal, dtype):
        shape = (BATCH, HEADS, length, d_k)
        self.call = attention_call(impl, *random_qkv(shape, shape, dtype), causal=causal)

    def time_forward(self, impl, length, d_k, causal, dtype):
        self.call()


class TrackForwardThroughput:
    """Achieved GFLOP/s (``4*B*H*L*L*D``, halved for causal), to read against the
    machine's matrix-multiply limit; best of three calls."""

    params = [IMPLEMENTATIONS, [512, 2048, 8192], [64, 128], [False, True]]
    param_names = ["impl", "length", "d_k", "causal"]
    unit = "GFLOP/s"
    timeout = 600

    def setup(self, impl, length, d_k, causal):
        shape = (BATCH, HEADS, length, d_k)
        self.call = attention_call(impl, *random_qkv(shape, shape, "float32"), causal=causal)
        self.flops = attention_flops(BATCH, HEADS, length, length, d_k, causal)

    def track_gflops(self, impl, length, d_k, causal):
        return self.flops / best_seconds(self.call) / 1e9


class TimeCrossAttention:
    """Cross attention, ``Lq != Lk``: short queries over long keys and the reverse."""

    params = [IMPLEMENTATIONS, [(128, 2048), (2048, 128), (512, 8192)], [64]]
    param_names = ["impl", "q_len, kv_len", "d_k"]
    timeout = 300

    def setup(self, impl, lengths, d_k):
        q_len, kv_len = lengths
        self.call = attention_call(impl, *random_qkv((BATCH, HEADS, q_len, d_k),
                                                     (BATCH, HEADS, kv_len, d_k), "float32"))

    def time_cross_attention(self, impl, lengths, d_k):
        self.call()


class TimeDecode:
    """Decoding one token against a long KV cache: ``Lq = 1``, 32 query heads, D = 128,
    with 32 kv heads or grouped-query attention over 8."""

    params = [IMPLEMENTATIONS, [4096, 16384], [32, 8]]
    param_names = ["impl", "kv_len", "kv_heads"]
    timeout = 300

    def setup(self, impl, kv_len, kv_heads):
        query, key, value = random_qkv((1, 32, 1, 128), (1, 32, kv_len, 128), "float32",
                                       kv_heads=kv_heads)
        self.call = attention_call(impl, query, key, value, enable_gqa=kv_heads != 32)

    def time_decode(self, impl, kv_len, kv_heads):
        self.call()


class TimeDecodeFewHeads:
    """Decoding with fewer heads than threads (``Lq = 1``, D = 128, long cache): the
    keys are split into spans across threads and merged by log-sum-exp."""

    params = [IMPLEMENTATIONS, [1, 2], [32768]]
    param_names = ["impl", "heads", "kv_len"]
    timeout = 300

    def setup(self, impl, heads, kv_len):
        query, key, value = random_qkv((1, heads, 1, 128), (1, heads, kv_len, 128), "float32")
        self.call = attention_call(impl, query, key, value)

    def time_decode_few_heads(self, impl, heads, kv_len):
        self.call()


class TimeDecodeRows:
    """Decoding with a few query rows per head (speculative decoding's draft tokens,
    ``Lq`` of 1 to 8; the streaming decode kernel takes up to 8) and grouped-query
    decoding over a batch (B = 8, 32 query heads on 8 kv heads: four rows per kv
    head once folded), D = 128, no mask (PyTorch's causal rule is top-left only)."""

    params = [IMPLEMENTATIONS, ["B1-H32-Lq1-L4096", "B1-H32-Lq4-L4096", "B1-H32-Lq8-L4096",
                                "B8-H32-KV8-Lq1-L2048"]]
    param_names = ["impl", "case"]
    timeout = 300
    CASES = {"B1-H32-Lq1-L4096": (1, 32, 32, 1, 4096), "B1-H32-Lq4-L4096": (1, 32, 32, 4, 4096),
             "B1-H32-Lq8-L4096": (1, 32, 32, 8, 4096),
             "B8-H32-KV8-Lq1-L2048": (8, 32, 8, 1, 2048)}

    def setup(self, impl, case):
        batch, heads, kv_heads, q_len, kv_len = self.CASES[case]
        query, key, value = random_qkv((batch, heads, q_len, 128), (batch, heads, kv_len, 128),
                                       "float32", kv_heads=kv_heads)
        self.call = attention_call(impl, query, key, value, enable_gqa=kv_heads != heads)

    def time_decode_rows(self, impl, case):
        self.call()


class MemoryForward:
    """Memory over sequence length (H = 1, D = 64, float32): fastattn's extra memory
    grows like O(L*D), the reference's like O(L^2).

    ``peakmem_forward`` is the process's peak (imports, inputs and compilation
    included, as asv measures it); ``track_extra_mib`` is the call's own: the peak
    resident memory sampled during the first full-size call, minus the memory held
    before it and minus the output. The warm-up (compilation) uses a small input of
    the same dtype and layout, so no freed full-size buffers are resident beforehand.
    """

    params = [IMPLEMENTATIONS, [512, 2048, 8192, 32768]]
    param_names = ["impl", "length"]
    unit = "MiB"
    timeout = 600

    def setup(self, impl, length):
        skip_unsupported(impl, length)  # in setup: asv skips only what setup refuses
        shape = (1, 1, length, 64)
        self.inputs = random_qkv(shape, shape, "float32")
        attention_call(impl, *random_qkv((1, 1, 8, 64), (1, 1, 8, 64), "float32"))
        self.call = lambda: attention_call(impl, *self.inputs, warm_up=False)()

    def peakmem_forward(self, impl, length):
        self.call()

    def track_extra_mib(self, impl, length):
        return extra_memory_bytes(self.call) / 2.0 ** 20
