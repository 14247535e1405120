"""Do fastattn's OpenMP threads and PyTorch's slow each other down in one process?

    python asv_benchmarks/torch_threads.py [--rounds 15] [--threads 2]

Three persistent worker processes time one loop each in turn (A B C A B C ...):

- ``torch``: a loop of one PyTorch matrix product (what a model's projections do),
- ``fastattn``: a loop of one ``fastattn.torch`` attention call,
- ``both``: a loop of the product followed by the attention call,
- ``gap``: a loop of a 5 ms busy wait on the main thread followed by the attention
  call: what a pause alone, without PyTorch's threads, does to the next call.

Without interference ``both`` takes ``torch + fastattn``; the script prints the
per-round ratio ``both / (torch + fastattn)`` (median, min and max), and, inside the
``both`` worker, how long each half took compared with its worker alone.
PyTorch and fastattn each use ``--threads`` threads.
"""

import argparse
import sys

try:  # imported by asv as part of the asv_benchmarks package
    from .common import WorkerProcess
except ImportError:  # run as a script: python asv_benchmarks/torch_threads.py
    from common import WorkerProcess

WORKER = r'''
import json, sys, time
variant, threads, torch_threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import torch
torch.set_num_threads(torch_threads)
import fastattn, fastattn.torch
fastattn.set_num_threads(threads)
generator = torch.Generator().manual_seed(0)
left = torch.randn(1024, 512, generator=generator)  # (tokens, hidden)
right = torch.randn(512, 1536, generator=generator)  # (hidden, 3 * hidden)
query, key, value = (torch.randn(1, 8, 512, 64, generator=generator) for _ in range(3))

def product():
    torch.matmul(left, right)

def attention():
    fastattn.torch.scaled_dot_product_attention(query, key, value, causal=True)

def busy_wait():  # a gap as long as the product, on the main thread alone, no PyTorch
    start = time.perf_counter()
    while time.perf_counter() - start < 0.005:
        pass

steps = {"torch": [product], "fastattn": [attention], "both": [product, attention],
         "gap": [busy_wait, attention]}[variant]
for _ in range(3):
    for step in steps:
        step()
for line in sys.stdin:
    parts = [0.0] * len(steps)
    iterations = 40
    start = time.perf_counter()
    for _ in range(iterations):
        for index, step in enumerate(steps):
            begin = time.perf_counter()
            step()
            parts[index] += time.perf_counter() - begin
    total = (time.perf_counter() - start) / iterations
    print(json.dumps([total] + [part / iterations for part in parts]), flush=True)
'''


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch's threads (default: --threads)")
    arguments = parser.parse_args()
    variants = ("torch", "fastattn", "both", "gap")
    workers = {variant: WorkerProcess(variant, [
        sys.executable, "-c", WORKER, variant, str(arguments.threads),
        str(arguments.torch_threads or arguments.threads)]) for variant in variants}

    def sample(variant):
        return workers[variant].ask("go")

    ratios, product_ratios, attention_ratios, gap_ratios = [], [], [], []
    times = {v: [] for v in variants}
    for round_index in range(arguments.rounds):
        order = variants if round_index % 2 == 0 else variants[::-1]
        got = {variant: sample(variant) for variant in order}
        for variant in variants:
            times[variant].append(got[variant][0])
        ratios.append(got["both"][0] / (got["torch"][0] + got["fastattn"][0]))
        product_ratios.append(got["both"][1] / got["torch"][0])
        attention_ratios.append(got["both"][2] / got["fastattn"][0])
        gap_ratios.append(got["gap"][2] / got["fastattn"][0])
    for worker in workers.values():
        worker.close()

    def median(values):
        return sorted(values)[len(values) // 2]

    def spread(values):
        return f"{median(values):.3f} [{min(values):.3f} {max(values):.3f}]"

    print(f"threads={arguments.threads}, torch threads="
          f"{arguments.torch_threads or arguments.threads}, rounds={arguments.rounds}; "
          "ms per loop iteration (median): "
          + ", ".join(f"{v} {1e3 * median(times[v]):.3f}" for v in variants))
    print(f"both / (torch + fastattn): {spread(ratios)}")
    print(f"  matmul inside both / torch alone:       {spread(product_ratios)}")
    print(f"  attention inside both / fastattn alone: {spread(attention_ratios)}")
    print(f"  attention after a 5 ms busy wait (no PyTorch work) / fastattn alone: "
          f"{spread(gap_ratios)}")


if __name__ == "__main__":
    main()
