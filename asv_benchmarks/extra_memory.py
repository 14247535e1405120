"""Extra memory of one attention call: peak resident memory during the call minus
the memory held before it (inputs included) and minus the output.

    python asv_benchmarks/extra_memory.py --batch 1 --heads 8 --length 16384 --dim 64

A background thread samples the process's resident set size (``/proc/self/statm``,
Linux) every millisecond while the call runs, so the figure is the call's own peak,
not the process's lifetime high-water mark (which compilation may have set).
"""

import argparse
import os
import threading
import time

import numpy as np


def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_during(function):
    """Run ``function()``; return its result and the peak resident bytes seen meanwhile."""
    peak = [resident_bytes()]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = function()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], resident_bytes())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["fastattn", "reference"], default="fastattn")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()

    if args.impl == "fastattn":
        from fastattn import scaled_dot_product_attention
    else:
        from reference import scaled_dot_product_attention
    dtype = np.dtype(args.dtype)
    shape = (args.batch, args.heads, args.length, args.dim)  # (B, H, L, D)
    scaled_dot_product_attention(*np.ones((3, 1, 1, 4, args.dim), dtype))  # compile / load

    rng = np.random.default_rng(0)
    query, key, value = (rng.standard_normal(shape, dtype=np.float32).astype(dtype)
                         for _ in range(3))
    before = resident_bytes()
    started = time.perf_counter()
    out, peak = peak_resident_during(
        lambda: scaled_dot_product_attention(query, key, value, causal=args.causal))
    seconds = time.perf_counter() - started
    mib = 2.0 ** 20
    extra = peak - before - out.nbytes
    print(f"{args.impl} B={args.batch} H={args.heads} L={args.length} D={args.dim} {dtype}"
          f"{' causal' if args.causal else ''}: inputs {3 * query.nbytes / mib:.1f} MiB, "
          f"output {out.nbytes / mib:.1f} MiB, peak during call {(peak - before) / mib:.1f} MiB "
          f"above the pre-call level, extra {extra / mib:.1f} MiB, {seconds:.2f} s")


if __name__ == "__main__":
    main()
