"""fastattn against its peers (the NumPy reference, and PyTorch when installed),
each implementation timed in a process of its own.

    python asv_benchmarks/peer_comparison.py            # every case (a few minutes)
    python asv_benchmarks/peer_comparison.py --quick    # fewer repeats, no 64k-long case
    python asv_benchmarks/peer_comparison.py --cases tiny decode
    python asv_benchmarks/peer_comparison.py --cases memory-H8-L16384   # one call's extra memory

Numba's OpenMP threads and PyTorch's slow each other down when they share a process,
so every (case, implementation) pair runs in a fresh interpreter that prints one
JSON line; this parent prints the table. Times are medians of several runs after a
warm-up; attention FLOPs are ``4*B*H*Lq*Lk*D``, half that for causal with Lq == Lk.
Quote ratios from one run, not absolute times: the machine may be shared.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

try:  # imported by asv as part of the asv_benchmarks package
    from .common import attention_flops, extra_memory_bytes
except ImportError:  # run as a script: python asv_benchmarks/peer_comparison.py
    from common import attention_flops, extra_memory_bytes

# name: B, H (query heads), Hkv, Lq, Lk, D, causal, dtype, implementations, threads
#       (None = all cores), memory (also measure extra memory), backward (time the
#       gradients instead of the forward)
CASES = {}


def _case(name, length=None, dim=64, *, batch=1, heads=8, kv_heads=None, q_len=None,
          kv_len=None, causal=False, dtype="float32", impls=("fastattn", "torch"),
          threads=None, memory=False, backward=False):
    CASES[name] = dict(batch=batch, heads=heads, kv_heads=kv_heads or heads,
                       q_len=q_len or length, kv_len=kv_len or length, dim=dim, causal=causal,
                       dtype=dtype, impls=impls, threads=threads, memory=memory,
                       backward=backward)


for _length in (512, 2048, 4096):
    for _dim in (64, 128):
        for _causal in (False, True):
            _impls = ("fastattn", "torch", "reference") if (_length, _dim) == (2048, 64) else (
                "fastattn", "torch")
            _case(f"L{_length}-D{_dim}{'-causal' if _causal else ''}", _length, _dim,
                  causal=_causal, impls=_impls)
_case("L2048-D64-float64", 2048, 64, dtype="float64")
_case("decode", dim=128, heads=32, q_len=1, kv_len=4096)
_case("decode-gqa", dim=128, heads=32, kv_heads=8, q_len=1, kv_len=4096)
_case("decode-H1", dim=128, heads=1, q_len=1, kv_len=32768)  # keys split across threads
_case("tiny", 16, 8, heads=1)
_case("L4096-D64-1thread", 4096, 64, impls=("fastattn",), threads=1)
_case("memory-L16384", 16384, 64, heads=1, impls=("fastattn", "torch"), memory=True)
_case("memory-H8-L16384", 16384, 64, impls=("fastattn",), memory=True)
_case("memory-L65536", 65536, 64, heads=1, impls=("fastattn",), memory=True)
for _length in (512, 2048):
    _case(f"backward-L{_length}-D64", _length, 64, backward=True,
          impls=("fastattn", "torch", "reference"), memory=True)


def case_flops(case):
    return attention_flops(case["batch"], case["heads"], case["q_len"], case["kv_len"],
                           case["dim"], case["causal"])


# ---------------------------------------------------------------- worker side

def _make_call(impl, case):
    rng = np.random.default_rng(0)
    dtype = np.dtype(case["dtype"])
    q_shape = (case["batch"], case["heads"], case["q_len"], case["dim"])
    kv_shape = (case["batch"], case["kv_heads"], case["kv_len"], case["dim"])
    query = rng.standard_normal(q_shape, dtype=np.float32).astype(dtype)
    key = rng.standard_normal(kv_shape, dtype=np.float32).astype(dtype)
    value = rng.standard_normal(kv_shape, dtype=np.float32).astype(dtype)
    options = dict(enable_gqa=case["kv_heads"] != case["heads"])
    if case["backward"]:
        return _make_backward_call(impl, case, query, key, value)
    if impl == "torch":
        import torch
        import torch.nn.functional as F

        if case["threads"]:
            torch.set_num_threads(case["threads"])
        tensors = [torch.from_numpy(array) for array in (query, key, value)]

        def call():
            with torch.no_grad():
                return F.scaled_dot_product_attention(*tensors, is_causal=case["causal"],
                                                      **options).numpy()
        return call
    module = __import__("fastattn" if impl == "fastattn" else "reference")
    return lambda: module.scaled_dot_product_attention(query, key, value,
                                                       causal=case["causal"], **options)


def _make_backward_call(impl, case, query, key, value):
    """The gradients of query, key and value; the forward runs once, untimed."""
    grad_out = np.random.default_rng(1).standard_normal(query.shape, dtype=np.float32)
    grad_out = grad_out.astype(query.dtype)[..., :value.shape[-1]]
    if impl == "torch":
        import torch
        import torch.nn.functional as F

        inputs = [torch.from_numpy(array.copy()).requires_grad_() for array in (query, key, value)]
        out = F.scaled_dot_product_attention(*inputs, is_causal=case["causal"])
        grad = torch.from_numpy(np.ascontiguousarray(grad_out))

        def call():
            grads = torch.autograd.grad(out, inputs, grad, retain_graph=True)
            return grads[0].numpy()
        return call
    module = __import__("fastattn" if impl == "fastattn" else "reference")
    out, lse = module.scaled_dot_product_attention(query, key, value, causal=case["causal"],
                                                   return_lse=True)
    return lambda: module.scaled_dot_product_attention_backward(
        grad_out, query, key, value, out, lse, causal=case["causal"])[0]


def run_worker(impl, case, repeats):
    """Time one implementation on one case; print a JSON line."""
    result = {}
    if case["memory"]:
        # compile (or load) on a small problem of the same dtype and layout, so no
        # freed full-size buffers are resident when the first full-size call starts
        small = dict(case, q_len=min(case["q_len"], 8), kv_len=min(case["kv_len"], 8))
        _make_call(impl, small)()
        call = _make_call(impl, case)
        result["extra_mib"] = extra_memory_bytes(call) / 2.0 ** 20
    else:
        call = _make_call(impl, case)
    call()  # compile, or load from the cache
    started = time.perf_counter()
    call()
    single = time.perf_counter() - started
    inner = max(1, int(0.02 / max(single, 1e-7)))  # samples of at least ~20 ms
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            call()
        samples.append((time.perf_counter() - started) / inner)
    result["seconds"] = float(np.median(samples))
    print(json.dumps(result))


def run_first_call_worker():
    """Seconds to import fastattn and finish a first float32 call, in this process."""
    started = time.perf_counter()
    import fastattn

    query = np.ones((1, 1, 4, 8), np.float32)
    fastattn.scaled_dot_product_attention(query, query, query)
    print(json.dumps({"seconds": time.perf_counter() - started}))


# ---------------------------------------------------------------- parent side

def _spawn(arguments, env=None):
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), *arguments],
                               capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {arguments} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure(impl, case, repeats):
    env = dict(os.environ)
    if case["threads"] and impl == "fastattn":
        env["NUMBA_NUM_THREADS"] = str(case["threads"])
    return _spawn(["--worker", impl, json.dumps(case), str(repeats)], env)


def first_call_seconds(cold):
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache_dir:
        if cold:  # an empty cache: everything compiles
            env["NUMBA_CACHE_DIR"] = cache_dir
        return _spawn(["--first-call"], env)["seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), help="default: all")
    parser.add_argument("--quick", action="store_true", help="3 repeats, skip the 64k case")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--first-call", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, case, repeats = args.worker
        return run_worker(impl, json.loads(case), int(repeats))
    if args.first_call:
        return run_first_call_worker()

    slow = ("memory-L65536", "memory-H8-L16384")
    names = args.cases or [name for name in CASES if not (args.quick and name in slow)]
    repeats = 3 if args.quick else args.repeats
    have_torch = importlib.util.find_spec("torch") is not None
    if not have_torch:
        print("PyTorch is not installed: comparing fastattn with the reference only "
              "(pip install torch==2.13.0 for the peer)", file=sys.stderr)
    jobs = [(name, impl) for name in names for impl in CASES[name]["impls"]
            if impl != "torch" or have_torch]
    results = {}
    for number, (name, impl) in enumerate(jobs, 1):
        print(f"[{number}/{len(jobs)}] {name} {impl} ...", end=" ", file=sys.stderr, flush=True)
        results[name, impl] = measure(impl, CASES[name], repeats)
        print(f"{results[name, impl]['seconds'] * 1e3:.2f} ms", file=sys.stderr, flush=True)

    print(f"\n{'case':22}{'impl':>10}{'median ms':>12}{'GFLOP/s':>10}"
          f"{'fastattn/torch':>16}{'ref/fastattn':>14}{'extra MiB':>11}")
    for name in names:
        case = CASES[name]
        fast = results.get((name, "fastattn"), {}).get("seconds")
        for impl in case["impls"]:
            if (name, impl) not in results:
                continue
            result = results[name, impl]
            seconds = result["seconds"]
            versus_torch = versus_reference = ""
            if impl == "torch" and fast:
                versus_torch = f"{fast / seconds:.2f}"
            if impl == "reference" and fast:
                versus_reference = f"{seconds / fast:.1f}"
            extra = f"{result['extra_mib']:.1f}" if "extra_mib" in result else ""
            print(f"{name:22}{impl:>10}{seconds * 1e3:>12.3f}"
                  f"{case_flops(case) / seconds / 1e9:>10.1f}{versus_torch:>16}"
                  f"{versus_reference:>14}{extra:>11}")

    print()
    for length in (512, 2048, 4096):
        for dim in (64, 128):
            plain = results.get((f"L{length}-D{dim}", "fastattn"))
            causal = results.get((f"L{length}-D{dim}-causal", "fastattn"))
            if plain and causal:
                print(f"causal / non-causal time, fastattn L={length} D={dim}: "
                      f"{causal['seconds'] / plain['seconds']:.2f}")
    for length in (512, 2048):
        backward = results.get((f"backward-L{length}-D64", "fastattn"))
        forward = results.get((f"L{length}-D64", "fastattn"))
        if backward and forward:
            print(f"backward / forward time, fastattn L={length} D=64: "
                  f"{backward['seconds'] / forward['seconds']:.2f}")
    one = results.get(("L4096-D64-1thread", "fastattn"))
    two = results.get(("L4096-D64", "fastattn"))
    if one and two:
        print(f"speed-up 1 -> {os.cpu_count()} threads, fastattn L=4096 D=64: "
              f"{one['seconds'] / two['seconds']:.2f}x")
    if not args.cases:
        print(f"import + first call, warm on-disk cache: {first_call_seconds(cold=False):.2f} s; "
              f"cold (empty cache, compiles): {first_call_seconds(cold=True):.1f} s")


if __name__ == "__main__":
    main()
