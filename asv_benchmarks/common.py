"""Shared pieces of the asv suite: the implementations, inputs, FLOP counts.

Implementations are a benchmark parameter (as SciPy's fft suite does with its
backends): ``"fastattn"`` (the fused Numba kernels), ``"reference"`` (the plain
NumPy oracle) and ``"torch"`` (``torch.nn.functional.scaled_dot_product_attention``
on 4-D tensors, skipped when PyTorch is absent). asv runs every parameter
combination in a process of its own, so Numba's and PyTorch's thread pools never
share a process. Modules are imported in ``setup``, never at import time.
"""

import ctypes
import gc
import json
import os
import subprocess
import threading
import time

import numpy as np

IMPLEMENTATIONS = ["fastattn", "reference", "torch"]


class WorkerProcess:
    """A persistent worker process of an interleaved comparison (one per
    implementation, so thread pools never share a process): each request is one
    line of JSON on its stdin, each answer one line of JSON on its stdout.

    Parameters
    ----------
    name : str
        Says which worker died, if one does.
    argv : list of str
        The command that runs the worker.
    env : dict, optional
        Its environment (default: this process's).
    """

    def __init__(self, name, argv, env=None):
        self.name = name
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)

    def ask(self, request):
        """Send ``request`` and return the worker's answer."""
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.read()

    def read(self):
        """The worker's next answer (a line of JSON)."""
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker died (exit {self.process.wait()})")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()

def runner_arguments(description, rounds):
    """The command line of an in-process interleaved runner: ``--rounds`` (default
    ``rounds``) and ``--threads`` (default 2), parsed."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def interleaved_rounds(first, second, rounds):
    """Time the calls ``first`` and ``second`` in this process, one sample of each per
    round, the order flipping every round. Returns ``(first seconds, second seconds,
    per-round ratios first / second)``, lists of ``rounds`` entries."""
    import time

    times = ([], [])
    for round_index in range(rounds):
        for which in ((0, 1) if round_index % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (first, second)[which]()
            times[which].append(time.perf_counter() - start)
    return times[0], times[1], [a / b for a, b in zip(*times)]

def ratio_line(name, first, second, ratios, goal, width):
    """One printed row of an interleaved runner: ``name`` (padded to ``width``), the
    median milliseconds of ``first`` and ``second`` (seconds), the median [min max]
    of ``ratios`` and whether it meets ``goal``."""
    import statistics

    ratio = statistics.median(ratios)
    return (f"{name:<{width}}{1e3 * statistics.median(first):11.2f}"
            f"{1e3 * statistics.median(second):11.2f}  {ratio:.3f} [{min(ratios):.3f} "
            f"{max(ratios):.3f}]  <= {goal:.3g} {'met' if ratio <= goal else 'MISSED'}")

# The reference materialises (B, H, Lq, Lk) float64 scores: skipped beyond this.
REFERENCE_MAX_LENGTH = 2048


def attention_flops(batch, heads, q_len, kv_len, dim, causal=False):
    """Multiply-adds of the two products, counted as ``4*B*H*Lq*Lk*D`` (half if causal
    with ``Lq == Lk``)."""
    flops = 4 * batch * heads * q_len * kv_len * dim
    return flops // 2 if causal and q_len == kv_len else flops


def numpy_dtype(name):
    """The NumPy dtype of ``name``; ``"bfloat16"`` is ``ml_dtypes.bfloat16`` (skipped,
    through ``NotImplementedError``, when ml_dtypes is not installed)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise NotImplementedError("ml_dtypes is not installed") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def as_tensor(array):
    """A NumPy array as a torch tensor of the same dtype (bfloat16 included), a copy."""
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def random_qkv(q_shape, kv_shape, dtype, kv_heads=None):
    """Standard-normal ``(B, H, L, D)`` query, key and value of ``dtype`` (a name;
    ``"bfloat16"`` for ``ml_dtypes.bfloat16``)."""
    dtype = numpy_dtype(dtype)
    rng = np.random.default_rng(0)
    if kv_heads is not None:
        kv_shape = kv_shape[:1] + (kv_heads,) + kv_shape[2:]
    query = rng.standard_normal(q_shape, dtype=np.float32).astype(dtype)
    key = rng.standard_normal(kv_shape, dtype=np.float32).astype(dtype)
    value = rng.standard_normal(kv_shape, dtype=np.float32).astype(dtype)
    return query, key, value


def skip_unsupported(impl, *lengths):
    """Raise ``NotImplementedError`` (asv's signal to skip, when raised in ``setup``)
    if ``impl`` is ``"reference"`` and a length exceeds ``REFERENCE_MAX_LENGTH``, or
    ``"torch"`` and PyTorch is not installed."""
    if impl == "reference" and max(lengths, default=0) > REFERENCE_MAX_LENGTH:
        raise NotImplementedError("the reference is too slow and large beyond L=2048")
    if impl == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise NotImplementedError("PyTorch is not installed") from None


def attention_call(impl, query, key, value, warm_up=True, **options):
    """A no-argument callable running ``impl`` on these inputs, warmed up once
    (``warm_up=True``) to compile or load the kernels for exactly this dtype and layout.

    Raises ``NotImplementedError`` (asv's signal to skip) when ``impl`` is
    ``"torch"`` and PyTorch is not installed, or when the reference would build
    score matrices longer than ``REFERENCE_MAX_LENGTH``.
    """
    skip_unsupported(impl, query.shape[-2], key.shape[-2])
    if impl == "torch":
        import torch
        import torch.nn.functional as F

        tensors = [as_tensor(array) for array in (query, key, value)]
        torch_options = {"is_causal": options.pop("causal", False), **options}

        def call():
            with torch.no_grad():
                return F.scaled_dot_product_attention(*tensors, **torch_options)
    else:
        module = __import__(impl)

        def call():
            return module.scaled_dot_product_attention(query, key, value, **options)
    if warm_up:
        call()
    return call


def best_seconds(call, tries=3):
    """The shortest of ``tries`` timed calls of ``call``, in seconds."""
    best = np.inf
    for _ in range(tries):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def resident_bytes():
    """This process's resident set size (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def extra_memory_bytes(call):
    """Run ``call()``; return its peak resident memory above the pre-call level, minus
    the size of what it returns (an ndarray or a torch tensor).

    A thread samples the resident set every half millisecond while the call runs, so
    the figure is the call's own peak, not the process's lifetime high-water mark.
    Garbage is collected and glibc's free memory handed back to the system first:
    otherwise the call could reuse pages that are resident but free (its output
    among them) without raising the resident set, and the figure would undercount.
    """
    gc.collect()
    _release_free_heap()
    before = resident_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = call()
    finally:
        done.set()
        sampler.join()
    result_bytes = result.numel() * result.element_size() if hasattr(result, "numel") else result.nbytes
    return max(peak[0], resident_bytes()) - before - result_bytes


def _release_free_heap():
    """glibc's ``malloc_trim(0)``: return free heap pages to the system (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
