"""fastattn.dask on a LocalCluster against the local call on the same cores, interleaved.

    python asv_benchmarks/dask_comparison.py                  # L=16384, H=8, D=64, 4 x 4 chunks
    python asv_benchmarks/dask_comparison.py --length 4096 --rounds 3   # a quick look

Two persistent processes take turns, one sample each per round (local, dask, local,
dask, ... with the order flipped every round), so a ratio is taken between
neighbouring samples and machine drift cancels:

- ``local``: ``fastattn.scaled_dot_product_attention`` on ``--threads`` threads (2);
- ``dask``: ``fastattn.dask.scaled_dot_product_attention`` on a LocalCluster of
  ``--workers`` worker processes x ``--threads-per-worker`` threads (2 x 1), with q,
  k and v persisted on the workers in ``--chunks`` chunks along Lq and Lk each (4);
  a sample is ``out.compute()``, the result gathered to the client included.

Per case it prints both medians, the median of the per-round ratios dask/local with
its min-max, then the causal/non-causal ratio of the dask path (per round) and the
chunk-pair tasks in the causal graph. Run it alone on the machine (the workers of
the idle side only wait on their sockets).

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which makes glibc
hand freed heap memory back at once, so buffers allocated inside the kernels
page-fault afresh (with the forward's former per-block buffers, one 4096 x 4096 x
8-head chunk pair took 0.57 s instead of 0.39 s on one thread; its buffers are now
per task). ``--malloc-top-pad 64`` adds ``MALLOC_TOP_PAD_=64 MiB`` to the workers'
environment, which keeps that much at the top of each heap.
"""

import argparse
import sys

try:  # imported by asv as part of the asv_benchmarks package
    from .common import WorkerProcess
except ImportError:  # run as a script: python asv_benchmarks/dask_comparison.py
    from common import WorkerProcess

WORKER = r'''
import json, sys, time
import numpy as np
side, threads, workers, per_worker, chunks, dtype, top_pad = sys.argv[1:8]
threads, workers, per_worker, chunks = int(threads), int(workers), int(per_worker), int(chunks)
import fastattn
calls = {}
if side == "dask":
    import warnings
    warnings.filterwarnings("ignore", "Sending large graph")  # q, k, v sent once, then persisted
    import dask.array as da
    import distributed
    import fastattn.dask
    import dask
    if int(top_pad):  # glibc keeps this much at the top of each heap when trimming
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TOP_PAD_": top_pad})
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=per_worker,
                                       processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
else:
    fastattn.set_num_threads(threads)

def make(case):
    batch, heads, length, dim, causal = case
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((batch, heads, length, dim), dtype=np.float32).astype(dtype)
               for _ in range(3))
    if side == "local":
        return lambda: fastattn.scaled_dot_product_attention(q, k, v, causal=causal), None
    size = -(-length // chunks)
    q, k, v = client.persist([da.from_array(x, chunks=(batch, heads, size, dim)) for x in (q, k, v)])
    distributed.wait([q, k, v])
    out = fastattn.dask.scaled_dot_product_attention(q, k, v, causal=causal)
    pairs = sum(1 for key in dict(out.__dask_graph__())
                if isinstance(key, tuple) and str(key[0]).startswith("fastattn-attention-pair"))
    return (lambda: client.compute(out, sync=True)), pairs

for line in sys.stdin:
    case = tuple(json.loads(line))
    if case not in calls:
        call, pairs = calls[case] = make(case)
        call()  # warm-up: compiles or loads the kernels in every process
        call()
        if pairs is not None:
            print(json.dumps({"pairs": pairs}), flush=True)
            continue
        print(json.dumps({"pairs": None}), flush=True)
        continue
    call = calls[case][0]
    started = time.perf_counter()
    call()
    print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
if side == "dask":
    client.close()
    cluster.close()
'''


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--malloc-top-pad", type=int, default=0, metavar="MIB",
                        help="set MALLOC_TOP_PAD_ in the workers (default: Dask's environment)")
    args = parser.parse_args()
    sides = ("local", "dask")
    processes = {
        side: WorkerProcess(side, [sys.executable, "-c", WORKER, side, str(args.threads),
                                   str(args.workers), str(args.threads_per_worker),
                                   str(args.chunks), args.dtype,
                                   str(args.malloc_top_pad * 2 ** 20)])
        for side in sides}

    def ask(side, case):
        return processes[side].ask(case)

    cases = [(1, args.heads, args.length, args.dim, causal) for causal in (False, True)]
    print(f"dask: LocalCluster {args.workers} workers x {args.threads_per_worker} thread(s), "
          f"q and k in {args.chunks} chunks each; local: {args.threads} threads; {args.dtype}; "
          f"worker MALLOC_TOP_PAD_: {args.malloc_top_pad or 'unset'} MiB")
    print(f"{'case (B, H, L, D, causal)':32s}{'local s':>10s}{'dask s':>10s}"
          f"   dask/local median [min max]   pair tasks")
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    pairs = {case: {side: ask(side, case)["pairs"] for side in sides}["dask"] for case in cases}
    per_round = {case: {side: [] for side in sides} for case in cases}
    for round_index in range(args.rounds):  # every case and side once per round
        order = sides if round_index % 2 == 0 else sides[::-1]
        for case in cases:
            for side in order:
                per_round[case][side].append(ask(side, case)["seconds"])
    for case in cases:
        times = per_round[case]
        ratios = [d / l for l, d in zip(times["local"], times["dask"])]
        print(f"{str(case):32s}{median(times['local']):10.3f}{median(times['dask']):10.3f}"
              f"   {median(ratios):.2f} [{min(ratios):.2f} {max(ratios):.2f}]"
              f"{'':16s}{pairs[case]} of {args.chunks ** 2}", flush=True)
    plain, causal = cases
    ratios = [c / p for p, c in zip(per_round[plain]["dask"], per_round[causal]["dask"])]
    print(f"dask causal / non-causal: {median(ratios):.2f} [{min(ratios):.2f} {max(ratios):.2f}]"
          f" (per round, {args.rounds} rounds)")
    ratios = [c / p for p, c in zip(per_round[plain]["local"], per_round[causal]["local"])]
    print(f"local causal / non-causal: {median(ratios):.2f} [{min(ratios):.2f} {max(ratios):.2f}]")
    for process in processes.values():
        process.close()


if __name__ == "__main__":
    main()
