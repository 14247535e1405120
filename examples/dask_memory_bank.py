"""Queries attending to a memory bank of 2^20 keys that lives on Dask workers.

The bank's keys and values, ``(H, N, D)`` float32 (1 GiB each at N = 2^20, H = 4,
D = 64), are made on the workers chunk by chunk (a seeded generator per chunk,
never on the client), in chunks of 2^16 keys. 64 queries per head attend to all of
them through :func:`fastattn.dask.scaled_dot_product_attention`: one task per key
chunk runs the local kernel, and the chunks' results are merged by their
log-sum-exp in a tree.

The script prints the answer's agreement with a local fastattn call on a slice of
the bank (the first key chunks, gathered to the client), each worker's peak memory
(``VmHWM``, reset before the run) next to the most bytes of chunks it held at once,
and the bytes moved between workers and to the client.

    python examples/dask_memory_bank.py                    # 2^20 keys, LocalCluster 2 x 1
    python examples/dask_memory_bank.py --log2-keys 16 --log2-chunk 12 --no-progress
    python examples/dask_memory_bank.py --scheduler tcp://scheduler:8786   # a real cluster
"""

import argparse
import threading
import time

import numpy as np

import dask
import dask.array as da
import distributed

import fastattn
import fastattn.dask

MIB = 2 ** 20


def bank_chunk(seed, dtype, block_info=None):
    """Keys and values of one chunk of the bank, made where the task runs, from the
    chunk's own seed."""
    location = block_info[None]["chunk-location"]
    shape = block_info[None]["chunk-shape"]
    rng = np.random.default_rng([seed, *location])
    return rng.standard_normal(shape, dtype=dtype)  # (2, H, chunk, D)


def memory_bank(n_keys, chunk, heads, dim, seed):
    """Keys and values ``(H, N, D)`` float32 as lazy Dask arrays, chunked along N.

    Each chunk's keys and values come from one task, so they start on the same
    worker and the attention task that needs both runs there without a transfer.
    """
    lengths = (chunk,) * (n_keys // chunk) + ((n_keys % chunk,) if n_keys % chunk else ())
    bank = da.map_blocks(bank_chunk, seed, np.float32,
                         chunks=((2,), (heads,), lengths, (dim,)), dtype=np.float32,
                         meta=np.empty((0, 0, 0, 0), np.float32))  # (2, H, N, D)
    return bank[0], bank[1]


class WorkerSampler:
    """Samples each worker's managed bytes (chunks in its memory) while a graph runs."""

    def __init__(self, client, every=0.05):
        self.client, self.every = client, every
        self.most_held = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            for worker, held in self.client.run(_managed_bytes).items():
                self.most_held[worker] = max(self.most_held.get(worker, 0), held)
            time.sleep(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _managed_bytes(dask_worker):
    return dask_worker.state.nbytes


def _reset_peak_memory():
    with open("/proc/self/clear_refs", "w") as clear_refs:  # resets VmHWM (Linux)
        clear_refs.write("5")


def _peak_memory():
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


def _bytes_sent(dask_worker):
    return dask_worker.transfer_outgoing_bytes_total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-keys", type=int, default=20)
    parser.add_argument("--log2-chunk", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--check-chunks", type=int, default=2,
                        help="key chunks in the slice checked against a local call")
    parser.add_argument("--scheduler", help="address of a running scheduler (default: a "
                        "LocalCluster of --workers processes)")
    parser.add_argument("--malloc-top-pad", type=int, default=0, metavar="MIB",
                        help="MALLOC_TOP_PAD_ of the LocalCluster's workers (see docs/guide/dask.rst)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    n_keys, chunk = 2 ** args.log2_keys, 2 ** args.log2_chunk
    heads, dim = args.heads, args.dim
    if args.scheduler:
        cluster, client = None, distributed.Client(args.scheduler)
    else:
        if args.malloc_top_pad:
            dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TOP_PAD_":
                             str(args.malloc_top_pad * MIB)})
        cluster = distributed.LocalCluster(n_workers=args.workers,
                                           threads_per_worker=args.threads_per_worker,
                                           processes=True, dashboard_address=None)
        client = distributed.Client(cluster)
    try:
        rng = np.random.default_rng(0)
        query = rng.standard_normal((heads, args.queries, dim), dtype=np.float32)  # (H, Lq, D)
        keys, values = memory_bank(n_keys, chunk, heads, dim, seed=1)  # (H, N, D) each
        chunk_bytes = heads * chunk * dim * 4
        print(f"memory bank: {n_keys} keys x {heads} heads x {dim} dims, float32: "
              f"{keys.nbytes / MIB:.0f} MiB each of keys and values, in "
              f"{keys.numblocks[1]} chunks of {chunk} keys ({chunk_bytes / MIB:.1f} MiB); "
              f"{len(client.scheduler_info()['workers'])} workers")

        out, lse = fastattn.dask.scaled_dot_product_attention(query, keys, values,
                                                              return_lse=True)
        client.run(_reset_peak_memory)
        sent_before = sum(client.run(_bytes_sent).values())
        started = time.perf_counter()
        with WorkerSampler(client) as sampler:
            futures = client.compute([out, lse])
            if not args.no_progress:
                distributed.progress(futures)
            out_value, lse_value = client.gather(futures)
        seconds = time.perf_counter() - started
        between_workers = sum(client.run(_bytes_sent).values()) - sent_before
        peaks = client.run(_peak_memory)
        print(f"\nbank made on the workers and {args.queries} queries per head attended to "
              f"its {n_keys} keys: {seconds:.2f} s, out {out_value.shape}, lse "
              f"{lse_value.shape}")
        print(f"bytes moved: {between_workers / MIB:.2f} MiB between workers, "
              f"{(out_value.nbytes + lse_value.nbytes) / MIB:.3f} MiB of results to the "
              f"client, {query.nbytes / MIB:.3f} MiB of queries from it "
              f"(the bank is {2 * keys.nbytes / MIB:.0f} MiB)")
        pair_bytes = 2 * chunk_bytes  # the key chunk and value chunk a task holds
        goal = 3 * pair_bytes + 300 * MIB
        print(f"memory goal per worker: 3 x {pair_bytes / MIB:.0f} MiB (a key and a value "
              f"chunk) + 300 MiB = {goal / MIB:.0f} MiB")
        for worker, (peak, _) in sorted(peaks.items()):
            held = sampler.most_held.get(worker, 0)
            print(f"worker {worker}: peak RSS {peak / MIB:.0f} MiB "
                  f"({'met' if peak <= goal else 'NOT met'}); most managed bytes sampled "
                  f"{held / MIB:.0f} MiB (Dask counts a chunk's key and value views and "
                  f"the block they share)")

        # Agreement with the local call on a slice of the bank: the first check_chunks
        # key chunks, gathered to the client.
        stop = min(args.check_chunks * chunk, n_keys)
        slice_out, slice_lse = fastattn.dask.scaled_dot_product_attention(
            query, keys[:, :stop], values[:, :stop], return_lse=True)
        slice_out, slice_lse, slice_keys, slice_values = client.compute(
            [slice_out, slice_lse, keys[:, :stop], values[:, :stop]], sync=True)
        local_out, local_lse = fastattn.scaled_dot_product_attention(
            query, slice_keys, slice_values, return_lse=True)
        difference = max(float(np.abs(slice_out - local_out).max()),
                         float(np.abs(slice_lse - local_lse).max()))
        print(f"agreement with the local call on the first {stop} keys: max |difference| "
              f"{difference:.2e}, within float32 tolerance: {difference <= 2e-5}")
        print(f"full answer: no NaN: {not np.isnan(out_value).any()}, lse range "
              f"[{lse_value.min():.2f}, {lse_value.max():.2f}]")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":
    main()
