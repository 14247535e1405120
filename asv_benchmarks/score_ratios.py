"""Interleaved cost of the built-in score options over plain fastattn (issue 11 goals).

usage: python asv_benchmarks/score_ratios.py [--length 2048] [--rounds 15]

float32 ``(B=1, H=8, L, D=64)``, forward. One process: each round times plain,
softcap and ALiBi in turn (best of 3 calls each), and the ratios are taken within the
round, so machine drift cancels; prints the median of the per-round ratios with their
min and max. Goals at ``L = 2048``: softcap <= 1.25 x, ALiBi <= 1.15 x plain.
Run it alone on the machine (``flock -x`` where the CPU is shared).
"""

import argparse
import time

import numpy as np

HEADS, HEAD_DIM = 8, 64
CASES = {
    "plain": {},
    "softcap": dict(softcap=30.0),
    "alibi": dict(alibi_slopes=2.0 ** (-8.0 * np.arange(1, HEADS + 1) / HEADS)),
}


def main():
    import fastattn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (1, HEADS, args.length, HEAD_DIM)
    query, key, value = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))

    def seconds(options):
        started = time.perf_counter()
        fastattn.scaled_dot_product_attention(query, key, value, **options)
        return time.perf_counter() - started

    for options in CASES.values():  # compile or load, warm up
        for _ in range(3):
            seconds(options)
    times = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, options in CASES.items():
            times[name].append(min(seconds(options) for _ in range(3)))
    plain = np.array(times["plain"])
    print(f"L={args.length}: plain median {np.median(plain) * 1e3:.1f} ms")
    for name in ("softcap", "alibi"):
        ratios = np.array(times[name]) / plain
        print(f"{name} / plain: median {np.median(ratios):.3f} "
              f"[min {ratios.min():.3f}, max {ratios.max():.3f}] over {args.rounds} rounds")


if __name__ == "__main__":
    main()
