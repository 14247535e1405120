"""KV caches for decoding (issue 23): paged decoding against the same data contiguous,
and filling a KVCache one token at a time against all at once.

usage: python asv_benchmarks/paged.py [--rounds 11] [--threads 2]

Goals (float32, 2 threads; ratios from interleaved rounds, not from the absolute
figures asv records):

- paged decode ``B=8, H=32, Hkv=8, D=128``, 2048 tokens in pages of 16 (a shuffled
  block table) at most 1.15x the contiguous decode of the same keys and values;
- ``KVCache.append`` one token at a time up to 4096 tokens at most 2x appending the
  4096 at once (capacity given up front, contiguous and paged).

The script times each pair in interleaved rounds in this process (one sample of each
in turn, the order flipping every round) and prints the median of the per-round ratios
with their min and max; run it alone on the machine (``flock -x`` where the CPU is
shared).
"""

import numpy as np

try:  # imported by asv as part of the asv_benchmarks package
    from .common import interleaved_rounds, ratio_line, runner_arguments
except ImportError:  # run as a script: python asv_benchmarks/paged.py
    from common import interleaved_rounds, ratio_line, runner_arguments

B, H, KV_HEADS, D, LENGTH, PAGE = 8, 32, 8, 128, 2048, 16


class TimePagedDecode:
    """One decoding step over ``LENGTH`` tokens per sequence: ``paged`` (pages of
    ``PAGE`` tokens, shuffled), ``contiguous`` (``scaled_dot_product_attention`` on
    ``(B, Hkv, L, D)``) and ``cache`` (a contiguous :class:`fastattn.KVCache`)."""

    params = [["paged", "contiguous", "cache"]]
    param_names = ["layout"]
    timeout = 300

    def setup(self, layout):
        import fastattn

        rng = np.random.default_rng(0)
        query = rng.standard_normal((B, H, 1, D), dtype=np.float32)  # (B, H, 1, D)
        if layout == "paged":
            n_pages = B * LENGTH // PAGE
            key_pages, value_pages = rng.standard_normal(
                (2, n_pages, PAGE, KV_HEADS, D), dtype=np.float32)  # (n_pages, PAGE, Hkv, D)
            table = rng.permutation(n_pages).astype(np.int32).reshape(B, -1)  # (B, pages)
            lengths = np.full(B, LENGTH)
            self.call = lambda: fastattn.paged_attention(query, key_pages, value_pages, table,
                                                         lengths)
        elif layout == "contiguous":
            key, value = rng.standard_normal((2, B, KV_HEADS, LENGTH, D),
                                             dtype=np.float32)  # (B, Hkv, L, D)
            self.call = lambda: fastattn.scaled_dot_product_attention(query, key, value,
                                                                      enable_gqa=True)
        else:
            cache = fastattn.KVCache(B, KV_HEADS, D, capacity=LENGTH)
            cache.append(*rng.standard_normal((2, B, KV_HEADS, LENGTH, D), dtype=np.float32))
            self.call = lambda: cache.attend(query)
        self.call()

    def time_decode(self, layout):
        self.call()


class TimeKVCacheAppend:
    """Filling a cache of capacity 4096 (``B=8, Hkv=8, D=128``): 4096 appends of one
    token, or one append of 4096; contiguous (page size 0) or pages of 16."""

    params = [["one token at a time", "all at once"], [0, 16]]
    param_names = ["appends", "page_size"]
    number = 1
    repeat = (1, 5, 60.0)
    timeout = 600
    TOKENS = 4096

    def setup(self, appends, page_size):
        import fastattn

        rng = np.random.default_rng(0)
        keys, values = rng.standard_normal((2, B, KV_HEADS, self.TOKENS, D),
                                           dtype=np.float32)  # (B, Hkv, T, D)
        steps = [(keys[:, :, t:t + 1].copy(), values[:, :, t:t + 1].copy())
                 for t in range(self.TOKENS)]

        def fill():
            cache = fastattn.KVCache(B, KV_HEADS, D, capacity=self.TOKENS,
                                     page_size=page_size or None)
            if appends == "all at once":
                cache.append(keys, values)
            else:
                for key, value in steps:
                    cache.append(key, value)
            return cache
        self.fill = fill
        fill()

    def time_fill(self, appends, page_size):
        self.fill()


def pairs():
    """``{case: (first, second, goal)}``: the calls whose time ratio each goal bounds."""
    decode = {layout: TimePagedDecode() for layout in ("paged", "contiguous")}
    for layout, case in decode.items():
        case.setup(layout)
    fills = {}
    for page_size in (0, 16):
        for appends in ("one token at a time", "all at once"):
            case = fills[appends, page_size] = TimeKVCacheAppend()
            case.setup(appends, page_size)
    return {
        "paged decode / contiguous": (decode["paged"].call, decode["contiguous"].call, 1.15),
        "append 1 at a time / all, contiguous": (fills["one token at a time", 0].fill,
                                                 fills["all at once", 0].fill, 2.0),
        "append 1 at a time / all, pages of 16": (fills["one token at a time", 16].fill,
                                                  fills["all at once", 16].fill, 2.0),
    }


def main():
    arguments = runner_arguments(__doc__.splitlines()[0], rounds=11)
    import fastattn

    fastattn.set_num_threads(arguments.threads)
    print(f"B={B}, H={H}, Hkv={KV_HEADS}, D={D}, {LENGTH} tokens (decode), pages of {PAGE}, "
          f"float32, {arguments.threads} threads, {arguments.rounds} rounds")
    print(f"{'case':<40}{'first ms':>11}{'second ms':>11}  ratio med [min max]   goal")
    for name, (first, second, goal) in pairs().items():
        print(ratio_line(name, *interleaved_rounds(first, second, arguments.rounds), goal, 40),
              flush=True)

if __name__ == "__main__":
    main()
