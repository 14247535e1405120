"""Decoding against the machine's read bandwidth, in interleaved rounds.

    python -m asv_benchmarks.decode_bandwidth              # from the repository root
    python -m asv_benchmarks.decode_bandwidth --rounds 31 --threads 2

A decode call exists to read its keys and values once, so its rate is the bytes of K
and V over its time. Each round times, back to back on the same arrays, a plain read
of K and V (two Python threads, one over each, ``np.dot(x, x)`` and ``np.max`` each
tried, the better kept, the BLAS held to one thread per caller, as
``read_bandwidth.py`` reads) and one fastattn call over them; the table quotes the
median per round of decode rate / read rate, with its min and max, so the drift of a
shared machine cancels. Float32, no mask; run it alone on the machine (``flock -x``).
"""

import argparse
import threading
import time

import numpy as np
import threadpoolctl

import fastattn

# name: (query shape, key/value shape), (B, H, L, D); fewer kv heads: grouped queries
CASES = {
    "decode-B1-H32-L4096": ((1, 32, 1, 128), (1, 32, 4096, 128)),
    "decode-gqa-B8-H32-KV8-L2048": ((8, 32, 1, 128), (8, 8, 2048, 128)),
    "spec-Lq4-H32-L4096": ((1, 32, 4, 128), (1, 32, 4096, 128)),
}


def read_rate(key, value, read):
    """GB/s of ``read`` over ``key`` and ``value`` at once, one thread each."""
    workers = [threading.Thread(target=read, args=(array.ravel(),)) for array in (key, value)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return (key.nbytes + value.nbytes) / (time.perf_counter() - start) / 1e9


def measure(name, rounds):
    """``(decode GB/s, read GB/s, ratios)`` of case ``name``, one entry per round."""
    q_shape, kv_shape = CASES[name]
    rng = np.random.default_rng(0)
    query = rng.standard_normal(q_shape, dtype=np.float32)  # (B, H, Lq, D)
    key = rng.standard_normal(kv_shape, dtype=np.float32)  # (B, Hkv, Lk, D)
    value = rng.standard_normal(kv_shape, dtype=np.float32)  # (B, Hkv, Lk, D)
    grouped = q_shape[1] != kv_shape[1]

    def call():
        return fastattn.scaled_dot_product_attention(query, key, value, enable_gqa=grouped)
    call()
    call()
    decode_rates, read_rates = [], []
    with threadpoolctl.threadpool_limits(1):
        for _ in range(rounds):
            read_rates.append(max(read_rate(key, value, lambda part: np.dot(part, part)),
                                  read_rate(key, value, np.max)))
            start = time.perf_counter()
            call()
            decode_rates.append((key.nbytes + value.nbytes) / (time.perf_counter() - start)
                                / 1e9)
    return decode_rates, read_rates, [d / r for d, r in zip(decode_rates, read_rates)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    fastattn.set_num_threads(args.threads)
    print(f"fastattn from {fastattn.__file__}, {args.threads} threads, {args.rounds} rounds")
    print(f"{'case':30s} {'K+V MiB':>8s} {'decode GB/s':>12s} {'read GB/s':>10s}"
          "   decode/read med [min max]")
    for name in args.cases:
        decode_rates, read_rates, ratios = measure(name, args.rounds)
        q_shape, kv_shape = CASES[name]
        mib = 2 * np.prod(kv_shape) * 4 / 2 ** 20
        print(f"{name:30s} {mib:8.0f} {np.median(decode_rates):12.1f} "
              f"{np.median(read_rates):10.1f}   {np.median(ratios):.2f} "
              f"[{min(ratios):.2f} {max(ratios):.2f}]", flush=True)


if __name__ == "__main__":
    main()
