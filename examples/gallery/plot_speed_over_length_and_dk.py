"""
Speed over sequence length and d_k
==================================

How a forward call's time grows with the sequence length ``L`` and the head
dimension ``d_k``. When the checkout holds asv results of
``forward.TimeForward.time_forward`` (recorded with ``asv run --python=same
--set-commit-hash HEAD --bench TimeForward``, see :doc:`/guide/performance`), this
example plots the newest of them. Otherwise it measures a small sweep itself, on
whatever machine builds the page, so the numbers in the figure are that machine's.

Attention does ``4 * L**2 * d_k`` floating-point operations per head, so at large
``L`` doubling the length should take about four times as long, and the achieved
GFLOP/s should level off at what the block products reach on the machine.
"""

import itertools
import json
import pathlib
import timeit

import matplotlib.pyplot as plt
import numpy as np

import fastattn
import reference

BENCHMARK = "forward.TimeForward.time_forward"
try:
    ROOT = pathlib.Path(__file__).resolve().parents[2]
except NameError:  # run interactively: from the repository root
    ROOT = pathlib.Path.cwd()


def newest_asv_results(results_dir=ROOT / ".asv" / "results"):
    """``{(impl, length, d_k): seconds}`` of the newest asv run of BENCHMARK (float32,
    not causal), and a label saying where it came from; ``({}, None)`` if none."""
    newest = None
    for path in results_dir.glob("*/*.json"):
        if path.name == "machine.json":
            continue
        saved = json.loads(path.read_text())
        if BENCHMARK in saved.get("results", {}) and (
                newest is None or saved["date"] > newest["date"]):
            newest = saved
    if newest is None:
        return {}, None
    entry = dict(zip(newest["result_columns"], newest["results"][BENCHMARK]))
    times = {}
    for (impl, length, d_k, causal, dtype), seconds in zip(
            itertools.product(*entry["params"]), entry["result"] or []):
        if seconds is not None and not np.isnan(seconds) and causal == "False" \
                and dtype == "'float32'":
            times[(impl.strip("'"), int(length), int(d_k))] = seconds
    machine = newest["params"]
    label = (f"asv results: machine {machine.get('machine')} ({machine.get('cpu')}), "
             f"commit {newest['commit_hash'][:8]}")
    return times, label


def measure_sweep(lengths=(64, 128, 256, 512, 1024), head_dims=(16, 64, 128), heads=8):
    """Time a small sweep here, as asv's benchmark does: float32 ``(1, heads, L, d_k)``,
    best of three calls; the reference at ``d_k = 64`` only."""
    rng = np.random.default_rng(0)
    times = {}
    for length, head_dim in itertools.product(lengths, head_dims):
        q, k, v = rng.standard_normal((3, 1, heads, length, head_dim)).astype(np.float32)
        implementations = {"fastattn": fastattn.scaled_dot_product_attention}
        if head_dim == 64:
            implementations["reference"] = reference.scaled_dot_product_attention
        for name, function in implementations.items():
            function(q, k, v)  # compile or warm up outside the timing
            repeats = timeit.repeat(lambda: function(q, k, v), number=1, repeat=3)
            times[(name, length, head_dim)] = min(repeats)
    return times, f"measured while this page was built: (1, {heads}, L, d_k), float32"


times, source = newest_asv_results()
if not times:
    times, source = measure_sweep()
print(source)

# %%
# Time per call (for 8 heads) over ``L``, one line per ``d_k``; the reference at
# ``d_k = 64`` dashed. On log-log axes a slope of 2 is quadratic growth.

head_dims = sorted({d_k for (_, _, d_k) in times})
figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
for d_k in head_dims:
    for impl, style in (("fastattn", "-o"), ("reference", "--s")):
        points = sorted((length, seconds) for (name, length, dim), seconds in times.items()
                        if name == impl and dim == d_k)
        if not points:
            continue
        lengths, seconds = np.array(points).T
        left.plot(lengths, seconds * 1e3, style, label=f"{impl}, d_k = {d_k}")
        flops = 4 * 8 * lengths ** 2 * d_k
        right.plot(lengths, flops / seconds / 1e9, style, label=f"{impl}, d_k = {d_k}")
left.set_xscale("log", base=2)
left.set_yscale("log")
left.set_xlabel("sequence length L")
left.set_ylabel("ms per call")
left.set_title("Forward time")
left.legend(fontsize="small")
right.set_xscale("log", base=2)
right.set_xlabel("sequence length L")
right.set_ylabel("GFLOP/s (4 L^2 d_k per head)")
right.set_title("Achieved throughput")
figure.suptitle(source, fontsize="small")
plt.show()
