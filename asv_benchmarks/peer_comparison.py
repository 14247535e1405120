"""fastattn against its peers, timed in interleaved rounds, one process per implementation.

    python asv_benchmarks/peer_comparison.py                      # every goal case (~15 min)
    python asv_benchmarks/peer_comparison.py --cases forward      # a group (see --list)
    python asv_benchmarks/peer_comparison.py --cases tiny decode --rounds 21
    python asv_benchmarks/peer_comparison.py --quick              # 5 rounds, shorter samples
    python asv_benchmarks/peer_comparison.py --impls fastattn,torch,reference
    python asv_benchmarks/peer_comparison.py --impls fastattn,fastattn@../old-checkout
    python asv_benchmarks/peer_comparison.py --json results.json  # also every sample as JSON
    python asv_benchmarks/peer_comparison.py --memory             # extra memory of one call

How it measures
---------------
Every implementation runs in one persistent worker process of its own, started once
for the whole run (Numba's OpenMP threads and PyTorch's slow each other down in one
process, and a fresh process per sample would time imports and page faults). For
each case the parent asks every worker to prepare it (build the inputs, compile or
load, warm up, choose how many calls make one sample of at least ``--min-sample``
seconds), then runs ``--rounds`` rounds: in each round every worker times one sample
in turn (A B A B ..., the order reversed every other round), and a ratio is taken
between the neighbouring samples of the same round, so the machine's drift (30% and
more on a shared machine) cancels. The table quotes, per case, the median of the
per-round ratios ``first / other`` with their min and max, and each implementation's
median time per call and GFLOP/s.

An implementation is ``fastattn``, ``torch`` (``torch.nn.functional
.scaled_dot_product_attention``; autograd through it for the backward;
``nn.MultiheadAttention`` for the layer), ``reference`` (the NumPy oracle), each
optionally followed by ``@DIR`` (import it from the checkout ``DIR``, e.g. an older
fastattn) and by ``+VAR=value`` items (environment variables of its worker, e.g.
``fastattn+MALLOC_TRIM_THRESHOLD_=65536``). The first of ``--impls`` is the subject of
the ratios; the ``trim`` cases compare the subject in Dask's worker environment with
the subject in the default one, whatever the other implementations.

The same rounds of the forward cases also time float32 matrix products in a worker of
their own (``sgemm``):

- ``sgemm``: one 2048 x 2048 x 2048 product, its columns split between the run's
  threads, with the BLAS the kernels call (:mod:`fastattn.blas` as this process's
  environment chooses it: MKL when installed, else SciPy's), one sequential ``sgemm``
  per thread as the kernels call it: the machine's dense float32 throughput, the
  ceiling a fused attention kernel can approach (its products are nearly all of its
  FLOPs). The ``share`` column (float32 forward cases) is the subject's GFLOP/s over
  this, per round, as a median.
- ``block sgemm``: the forward's own block products, ``(256, 64) @ (64, 512)`` and
  ``(256, 512) @ (512, 64)``, with the same BLAS on each of the run's threads at
  once, as the kernel calls them: what its products alone reach.

Attention FLOPs are ``4*B*H*Lq*Lk*D``, half for causal with ``Lq == Lk`` (the backward
is timed alone, given the forward's results, and counted as 2.5 times the forward's
FLOPs: five products to the forward's two). Progress goes to stderr, the table to stdout.
Run it alone on the machine (``flock -x`` where the CPU is shared).
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

try:  # imported by asv as part of the asv_benchmarks package
    from .common import REFERENCE_MAX_LENGTH, WorkerProcess, attention_flops, extra_memory_bytes
except ImportError:  # run as a script: python asv_benchmarks/peer_comparison.py
    from common import REFERENCE_MAX_LENGTH, WorkerProcess, attention_flops, extra_memory_bytes

TRIM_ENV = "+MALLOC_TRIM_THRESHOLD_=65536"  # what Dask's worker processes set
SGEMM = "sgemm"  # the worker that times matrix products
SQUARE_N = 2048  # the square sgemm: SQUARE_N^3 multiply-adds
BLOCK_Q, BLOCK_K, BLOCK_D = 256, 512, 64  # the forward kernel's block of queries x keys


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed problem.

    ``kind`` is ``"forward"``, ``"backward"`` (the gradients alone, given the forward's
    ``out`` and ``lse``) or ``"layer"`` (a multi-head attention layer of ``heads`` heads
    and ``heads * dim`` wide on ``(batch, q_len, heads * dim)``). ``impls``: None for
    the run's ``--impls``, else this case's own list, where ``{subject}`` stands for the
    run's first implementation.
    """

    name: str
    kind: str = "forward"
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    q_len: int = 512
    kv_len: int = 512
    dim: int = 64
    causal: bool = False
    dtype: str = "float32"
    impls: tuple = None

    def flops(self):
        """Floating-point operations of one call (see the module docstring)."""
        if self.kind == "layer":
            width = self.heads * self.dim
            projections = 4 * 2 * self.batch * self.q_len * width * width  # W_q, W_k, W_v, W_o
            return projections + attention_flops(self.batch, self.heads, self.q_len,
                                                 self.kv_len, self.dim, self.causal)
        flops = attention_flops(self.batch, self.heads, self.q_len, self.kv_len, self.dim,
                                self.causal)
        return flops * 5 // 2 if self.kind == "backward" else flops


def _attention_cases(kind, prefix=""):
    return [Case(f"{prefix}L{length}-D{dim}{'-causal' if causal else ''}", kind,
                 q_len=length, kv_len=length, dim=dim, causal=causal)
            for length in (512, 2048, 4096) for dim in (64, 128) for causal in (False, True)]


_TRIM_IMPLS = ("{subject}" + TRIM_ENV, "{subject}")
GROUPS = {  # issue 14's goal table, group by group
    "forward": _attention_cases("forward"),
    "backward": _attention_cases("backward", "backward-"),
    "float64": [Case("L2048-D64-float64", q_len=2048, kv_len=2048, dtype="float64")],
    "decode": [Case("decode", heads=32, kv_heads=32, q_len=1, kv_len=4096, dim=128),
               Case("decode-gqa", heads=32, kv_heads=8, q_len=1, kv_len=4096, dim=128)],
    "tiny": [Case("tiny", heads=1, kv_heads=1, q_len=16, kv_len=16, dim=8)],
    "layer": [Case("mha-4x512x512", "layer", batch=4, q_len=512, kv_len=512, dim=64)],
    "trim": [Case("trim-L4096", q_len=4096, kv_len=4096, impls=_TRIM_IMPLS),
             Case("trim-backward-L4096", "backward", q_len=4096, kv_len=4096,
                  impls=_TRIM_IMPLS)],
}
GOAL_GROUPS = list(GROUPS)
GROUPS["streaming-decode"] = [  # issue 20: the decode kernel's cases (not goals here)
    Case("decode-B1-H32-L4096", heads=32, kv_heads=32, q_len=1, kv_len=4096, dim=128),
    Case("decode-gqa-B8-H32-KV8-L2048", batch=8, heads=32, kv_heads=8, q_len=1, kv_len=2048,
         dim=128),
    Case("spec-Lq4-H32-L4096", heads=32, kv_heads=32, q_len=4, kv_len=4096, dim=128),
    Case("spec-Lq8-H32-L4096", heads=32, kv_heads=32, q_len=8, kv_len=4096, dim=128),
]
GROUPS["extra"] = [  # not goals: context for the table
    Case("decode-H1", heads=1, kv_heads=1, q_len=1, kv_len=32768, dim=128),
    Case("L4096-D64-1thread", q_len=4096, kv_len=4096,
         impls=("{subject}+NUMBA_NUM_THREADS=1", "{subject}")),
]
CASES = {case.name: case for cases in GROUPS.values() for case in cases}

# one call's extra resident memory, each (case, impl) in a fresh process (--memory)
MEMORY_CASES = {
    "memory-L16384": (Case("memory-L16384", heads=1, kv_heads=1, q_len=16384, kv_len=16384),
                      ("fastattn", "torch")),
    "memory-H8-L16384": (Case("memory-H8-L16384", q_len=16384, kv_len=16384), ("fastattn",)),
    "memory-L65536": (Case("memory-L65536", heads=1, kv_heads=1, q_len=65536, kv_len=65536),
                      ("fastattn",)),
    "memory-backward-L2048": (Case("memory-backward-L2048", "backward", q_len=2048,
                                   kv_len=2048), ("fastattn", "torch", "reference")),
}


# ---------------------------------------------------------------- worker side

def parse_impl(spec):
    """``(name, directory or None, {variable: value})`` of an implementation spec."""
    name, *settings = spec.split("+")
    env = dict(setting.split("=", 1) for setting in settings)
    name, _, directory = name.partition("@")
    return name, directory or None, env


def _inputs(case):
    """Seeded standard-normal query, key, value and output gradient of ``case``."""
    rng = np.random.default_rng(0)
    dtype = np.dtype(case.dtype)
    q_shape = (case.batch, case.heads, case.q_len, case.dim)
    kv_shape = (case.batch, case.kv_heads, case.kv_len, case.dim)
    query = rng.standard_normal(q_shape, dtype=np.float32).astype(dtype)  # (B, H, Lq, D)
    key = rng.standard_normal(kv_shape, dtype=np.float32).astype(dtype)  # (B, Hkv, Lk, D)
    value = rng.standard_normal(kv_shape, dtype=np.float32).astype(dtype)  # (B, Hkv, Lk, D)
    grad_out = rng.standard_normal(q_shape, dtype=np.float32).astype(dtype)  # (B, H, Lq, D)
    return query, key, value, grad_out


def _torch_call(case, threads):
    """A no-argument callable running PyTorch on ``case``."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    query, key, value, grad_out = _inputs(case)
    if case.kind == "layer":
        width = case.heads * case.dim
        layer = torch.nn.MultiheadAttention(width, case.heads, batch_first=True).eval()
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(
            (case.batch, case.q_len, width), dtype=np.float32))  # (B, L, E)

        def call():
            with torch.no_grad():
                return layer(x, x, x, need_weights=False, is_causal=case.causal)[0]
        return call
    options = dict(is_causal=case.causal, enable_gqa=case.kv_heads != case.heads)
    if case.kind == "backward":
        inputs = [torch.from_numpy(array).requires_grad_() for array in (query, key, value)]
        out = F.scaled_dot_product_attention(*inputs, **options)  # (B, H, Lq, D)
        grad = torch.from_numpy(grad_out)  # (B, H, Lq, D)
        return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)
    tensors = [torch.from_numpy(array) for array in (query, key, value)]

    def call():
        with torch.no_grad():
            return F.scaled_dot_product_attention(*tensors, **options)
    return call


def _numpy_call(name, case):
    """A no-argument callable running ``fastattn`` or ``reference`` on ``case``, or a
    string saying why this implementation cannot run it."""
    if name == "reference" and (case.kind == "layer"
                                or max(case.q_len, case.kv_len) > REFERENCE_MAX_LENGTH):
        return f"the reference runs attention up to L={REFERENCE_MAX_LENGTH}, no layers"
    module = __import__(name)
    if case.kind == "layer":
        layer = module.MultiHeadAttention(case.heads * case.dim, case.heads, seed=0)
        x = np.random.default_rng(0).standard_normal(
            (case.batch, case.q_len, case.heads * case.dim), dtype=np.float32)  # (B, L, E)
        return lambda: layer(x, causal=case.causal)
    query, key, value, grad_out = _inputs(case)
    options = dict(causal=case.causal, enable_gqa=case.kv_heads != case.heads)
    if case.kind == "backward":
        out, lse = module.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                       **options)  # (B, H, Lq, D), (B, H, Lq)
        return lambda: module.scaled_dot_product_attention_backward(
            grad_out, query, key, value, out, lse, **options)
    return lambda: module.scaled_dot_product_attention(query, key, value, **options)


class SgemmSampler:
    """Times float32 matrix products (see the module docstring) with the BLAS the
    kernels call (:mod:`fastattn.blas`: MKL when installed, else SciPy's), called the
    way the kernels call it: one single-threaded ``sgemm`` per thread, through its
    address (ctypes releases the GIL, so the threads run at once).

    ``sample()`` returns ``(square, block)`` GFLOP/s: one ``n x n x n`` product, its
    columns split evenly between ``threads`` threads, and the forward kernel's block
    products on ``threads`` threads at once.
    """

    def __init__(self, threads, min_sample):
        from concurrent.futures import ThreadPoolExecutor

        from fastattn import blas
        from threadpoolctl import threadpool_limits

        # SciPy's OpenBLAS at one thread (the kernels do the same); MKL is sequential
        self.limits = threadpool_limits(limits=1, user_api="blas")
        self.backend = blas.current()
        self.gemm = _fortran_sgemm(blas.gemm_address(np.float32))
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads)
        rng = np.random.default_rng(0)

        def fortran(*shape):
            return np.asfortranarray(rng.standard_normal(shape, dtype=np.float32))

        self.a, self.b, self.c = (fortran(SQUARE_N, SQUARE_N) for _ in range(3))
        cuts = [SQUARE_N * part // threads for part in range(threads + 1)]
        self.square_parts = [(self.a, self.b[:, start:stop], self.c[:, start:stop])
                             for start, stop in zip(cuts, cuts[1:])]  # column blocks
        # per thread: Q (Bq, D), K^T (D, Bk), S (Bq, Bk), V (Bk, D), O (Bq, D)
        self.blocks = [(fortran(BLOCK_Q, BLOCK_D), fortran(BLOCK_D, BLOCK_K),
                        fortran(BLOCK_Q, BLOCK_K), fortran(BLOCK_K, BLOCK_D),
                        fortran(BLOCK_Q, BLOCK_D)) for _ in range(threads)]
        self.block_flops = 2 * 2 * BLOCK_Q * BLOCK_K * BLOCK_D  # both products
        self.pairs = 1
        self.sample()  # warm up, then size the block sample like the others
        seconds = self._block_seconds()
        self.pairs = max(1, int(min_sample / max(seconds, 1e-7)))
        self.blas = [{"internal_api": self.backend["name"],
                      "filepath": self.backend["library"]}]

    def _block_pairs(self, operands):
        query, key_t, scores, value, out = operands
        for _ in range(self.pairs):
            self.gemm(query, key_t, scores)  # (Bq, Bk)
            self.gemm(scores, value, out)  # (Bq, D)

    def _block_seconds(self):
        started = time.perf_counter()
        list(self.pool.map(self._block_pairs, self.blocks))
        return time.perf_counter() - started

    def sample(self):
        started = time.perf_counter()
        list(self.pool.map(lambda part: self.gemm(*part), self.square_parts))
        square = 2 * SQUARE_N ** 3 / (time.perf_counter() - started) / 1e9
        block = self.threads * self.pairs * self.block_flops / self._block_seconds() / 1e9
        return square, block


def _fortran_sgemm(address):
    """``product(a, b, c)``: ``c = a @ b`` for F-contiguous float32 matrices, through the
    Fortran-convention ``sgemm`` at ``address`` (every argument by pointer)."""
    import ctypes

    pointer = ctypes.c_void_p
    sgemm = ctypes.CFUNCTYPE(None, *[pointer] * 13)(address)
    no_transpose = ctypes.c_char(b"n")
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def product(a, b, c):
        m, k = a.shape
        n = b.shape[1]
        ints = [ctypes.c_int(value) for value in (m, n, k, a.strides[1] // 4,
                                                  b.strides[1] // 4, c.strides[1] // 4)]
        sgemm(*map(ctypes.addressof, (no_transpose, no_transpose, *ints[:3], one)),
              a.ctypes.data, ctypes.addressof(ints[3]), b.ctypes.data,
              ctypes.addressof(ints[4]), ctypes.addressof(zero), c.ctypes.data,
              ctypes.addressof(ints[5]))
    return product


def run_worker(spec, threads):
    """Serve one implementation: read JSON requests from stdin, answer each on stdout.

    Requests are ``{"op": "prepare", "case": {...}, "min_sample": s}`` (build, warm
    up, choose the calls per sample; answers what was loaded, or ``{"skip": why}``),
    ``{"op": "sample"}`` (answers ``{"seconds": per call}``) and ``{"op": "memory"}``
    (answers ``{"extra_bytes": ...}`` for a just-prepared, not yet run, case).
    """
    name, directory, _ = parse_impl(spec)
    if directory:
        sys.path.insert(0, os.path.abspath(directory))
    call, calls_per_sample, sampler = None, 1, None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "prepare":
                call = sampler = None  # free the previous case's arrays first
                if name == SGEMM:
                    sampler = SgemmSampler(threads, request["min_sample"])
                    answer = {"blas": sampler.blas}
                else:
                    case = Case(**request["case"])
                    call = (_torch_call(case, threads) if name == "torch"
                            else _numpy_call(name, case))
                    if isinstance(call, str):
                        answer, call = {"skip": call}, None
                    else:
                        answer = {"module": _module_file(name)}
                        if not request.get("cold"):
                            calls_per_sample = _warm_up(call, request["min_sample"])
                            answer["calls_per_sample"] = calls_per_sample
            elif request["op"] == "sample" and sampler is not None:
                answer = dict(zip(("square_gflops", "block_gflops"), sampler.sample()))
            elif request["op"] == "sample":
                started = time.perf_counter()
                for _ in range(calls_per_sample):
                    call()
                answer = {"seconds": (time.perf_counter() - started) / calls_per_sample}
            elif request["op"] == "memory":
                answer = {"extra_bytes": extra_memory_bytes(lambda: _first(call()))}
        except ImportError as error:
            hint = " (pip install torch==2.13.0 for the peer)" if name == "torch" else ""
            answer = {"skip": f"{error}{hint}"}
        except Exception as error:  # report it, keep serving: the parent decides
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)


def _first(result):
    """The first array of a result (the gradients' tuple: the query's)."""
    return result[0] if isinstance(result, (tuple, list)) else result


def _module_file(name):
    module = sys.modules.get("torch" if name == "torch" else name)
    return f"{module.__name__} {getattr(module, '__version__', '')} {module.__file__}"


def _warm_up(call, min_sample):
    """Compile or load, warm the thread pools; the calls per sample of ``min_sample`` s."""
    call()
    started = time.perf_counter()
    call()
    one = time.perf_counter() - started
    return max(1, int(min_sample / max(one, 1e-7)))


# ---------------------------------------------------------------- parent side

class Worker(WorkerProcess):
    """A persistent worker process serving one implementation spec."""

    def __init__(self, spec, threads):
        _, _, env_items = parse_impl(spec)
        env = dict(os.environ, **env_items)
        if spec != SGEMM and "NUMBA_NUM_THREADS" not in env_items:
            env["NUMBA_NUM_THREADS"] = str(threads)
        self.spec = spec
        super().__init__(spec, [sys.executable, os.path.abspath(__file__), "--worker", spec,
                                "--threads", str(threads)], env)

    def ask(self, **request):
        answer = super().ask(request)
        if "error" in answer:
            raise RuntimeError(f"worker {self.spec}: {answer['error']}")
        return answer


def _median(values):
    return statistics.median(values) if values else float("nan")


def _progress(text):
    print(text, file=sys.stderr, flush=True)


def _case_impls(case, impls):
    if case.impls is None:
        return list(impls)
    return [spec.format(subject=impls[0]) for spec in case.impls]


def measure_case(case, specs, workers, rounds, min_sample, gap, with_sgemm, number, total):
    """Interleaved rounds of one case: ``{spec: [seconds per call, ...]}`` plus the sgemm
    samples, or None for an implementation that cannot run it."""
    started = time.perf_counter()
    _progress(f"[{number}/{total}] {case.name}: preparing {', '.join(specs)}")
    info, live = {}, []
    for spec in specs:
        answer = workers[spec].ask(op="prepare", case=dataclasses.asdict(case),
                                   min_sample=min_sample)
        info[spec] = answer
        if "skip" in answer:
            _progress(f"    {spec} skipped: {answer['skip']}")
        else:
            live.append(spec)
    samples = {spec: [] for spec in live}
    sgemm = []
    for number_round in range(rounds):
        order = live if number_round % 2 == 0 else live[::-1]
        round_started = time.perf_counter()
        for spec in order:
            time.sleep(gap)  # let the previous worker's threads stop spinning
            samples[spec].append(workers[spec].ask(op="sample")["seconds"])
        if with_sgemm:
            time.sleep(gap)
            sgemm.append(workers[SGEMM].ask(op="sample"))
        if time.perf_counter() - round_started > 1.0:  # a slow case: show each round
            cells = "  ".join(f"{spec} {samples[spec][-1] * 1e3:.2f} ms" for spec in live)
            _progress(f"    round {number_round + 1}/{rounds}: {cells}")
    cells = "  ".join(f"{spec} {_median(samples[spec]) * 1e3:.3f} ms" for spec in live)
    _progress(f"    done in {time.perf_counter() - started:.0f} s: {cells}")
    return {"case": dataclasses.asdict(case), "impls": specs, "info": info,
            "seconds": samples, "sgemm": sgemm}


def summarise(result):
    """Rows of the table for one measured case: one per (first impl, other impl) pair."""
    case = Case(**{**result["case"], "impls": None})
    samples = result["seconds"]
    live = list(samples)
    rows = []
    if not live:
        return rows
    first = live[0]
    shares = [case.flops() / seconds / 1e9 / sgemm["square_gflops"]
              for seconds, sgemm in zip(samples[first], result["sgemm"])
              if case.dtype == "float32"]
    for other in live[1:] or [None]:
        row = {"case": result["case"]["name"], "first": first, "other": other,
               "first_ms": _median(samples[first]) * 1e3,
               "first_gflops": case.flops() / _median(samples[first]) / 1e9,
               "share": _median(shares) if shares else None}
        if other is not None:
            ratios = [a / b for a, b in zip(samples[first], samples[other])]
            row.update(other_ms=_median(samples[other]) * 1e3,
                       other_gflops=case.flops() / _median(samples[other]) / 1e9,
                       ratio=_median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        rows.append(row)
    return rows


def _short(spec, width):
    return spec if len(spec) <= width else "..." + spec[-(width - 3):]


def _gflops(value):
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def print_table(results, rounds, threads):
    """The peer table (stdout)."""
    print(f"\n{rounds} interleaved rounds, {threads} threads; ratio = first / other "
          "(median of per-round ratios [min, max]); share = first's GFLOP/s / same "
          "round's 2048^3 sgemm")
    print(f"{'case':28}{'first':>39}{'other':>39}{'first ms':>11}{'other ms':>11}"
          f"{'ratio [min, max]':>23}{'GFLOP/s':>9}{'other':>8}{'share':>7}")
    for result in results:
        for row in summarise(result):
            other = row["other"] or "-"
            ratio = (f"{row['ratio']:.3f} [{row['ratio_min']:.2f}, {row['ratio_max']:.2f}]"
                     if row["other"] else "")
            other_ms = f"{row['other_ms']:.4f}" if row["other"] else ""
            other_gflops = _gflops(row["other_gflops"]) if row["other"] else ""
            share = f"{row['share']:.2f}" if row["share"] is not None else ""
            print(f"{row['case']:28}{_short(row['first'], 38):>39}{_short(other, 38):>39}"
                  f"{row['first_ms']:>11.4f}{other_ms:>11}{ratio:>23}"
                  f"{_gflops(row['first_gflops']):>9}{other_gflops:>8}{share:>7}")
    shares = {row["case"]: row["share"] for result in results for row in summarise(result)
              if row["share"] is not None and result["case"]["impls"] is None
              and result["case"]["kind"] == "forward"
              and result["case"]["q_len"] >= 2048 and result["case"]["dim"] >= 64}
    if shares:
        lowest = min(shares, key=shares.get)
        print(f"\nshare of sgemm, float32 forward with L >= 2048, D >= 64: lowest "
              f"{shares[lowest]:.2f} ({lowest}), highest {max(shares.values()):.2f}")
    sgemm = [sample for result in results for sample in result["sgemm"]]
    if sgemm:
        square = [sample["square_gflops"] for sample in sgemm]
        block = [sample["block_gflops"] for sample in sgemm]
        print(f"\nsgemm, {threads} threads, the kernels' BLAS, {len(sgemm)} samples interleaved "
              f"with the forward rounds: {SQUARE_N}^3 median {_median(square):.1f} GFLOP/s "
              f"[{min(square):.1f}, {max(square):.1f}];\nforward block products "
              f"({BLOCK_Q}x{BLOCK_D} @ {BLOCK_D}x{BLOCK_K}, {BLOCK_Q}x{BLOCK_K} @ "
              f"{BLOCK_K}x{BLOCK_D}) median {_median(block):.1f} [{min(block):.1f}, "
              f"{max(block):.1f}] (one sequential sgemm per thread, {threads} threads)")


def run_rounds(args, names):
    """Measure ``names`` in interleaved rounds; print the table; return the results."""
    impls = args.impls.split(",")
    threads = args.threads
    cases = [CASES[name] for name in names]
    specs = list(dict.fromkeys(spec for case in cases for spec in _case_impls(case, impls)))
    with_sgemm = not args.no_sgemm and any(case.kind == "forward" for case in cases)
    workers = {spec: Worker(spec, threads) for spec in specs + [SGEMM] * with_sgemm}
    results = []
    try:
        for spec, worker in workers.items():
            if spec != SGEMM:  # which module each worker loaded
                worker.info = worker.ask(op="prepare", case=dataclasses.asdict(
                    Case("import", q_len=4, kv_len=4)), min_sample=0.0, cold=True)
                _progress(f"{spec}: {worker.info.get('module') or worker.info.get('skip')}")
        if with_sgemm:
            blas = workers[SGEMM].ask(op="prepare", min_sample=args.min_sample)["blas"]
            _progress(f"sgemm BLAS: {blas}")
        for number, case in enumerate(cases, 1):
            case_specs = [spec for spec in _case_impls(case, impls)
                          if "skip" not in workers[spec].info]
            results.append(measure_case(case, case_specs, workers, args.rounds,
                                        args.min_sample, args.gap,
                                        with_sgemm and case.kind == "forward", number,
                                        len(cases)))
    finally:
        for worker in workers.values():
            worker.close()
    print_table(results, args.rounds, threads)
    return results


def run_memory(args, names):
    """Extra resident memory of one call, each (case, impl) in a fresh worker."""
    results = []
    print(f"\n{'case':24}{'impl':>22}{'extra MiB':>11}")
    for name in names:
        case, case_impls = MEMORY_CASES[name]
        for spec in case_impls:
            _progress(f"{name}: {spec} ...")
            worker = Worker(spec, args.threads)
            try:
                # compile or load on a small problem of the same kind, so no freed
                # full-size buffers are resident when the measured call starts
                small = dataclasses.replace(case, q_len=8, kv_len=8)
                answer = worker.ask(op="prepare", case=dataclasses.asdict(small), min_sample=0)
                if "skip" in answer:
                    continue
                worker.ask(op="prepare", case=dataclasses.asdict(case), min_sample=0, cold=True)
                extra = worker.ask(op="memory")["extra_bytes"] / 2.0 ** 20
            finally:
                worker.close()
            results.append({"case": name, "impl": spec, "extra_mib": extra})
            print(f"{name:24}{spec:>22}{extra:>11.1f}", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--cases", nargs="*",
                        help="case names or groups (default: every goal group; see --list)")
    parser.add_argument("--impls", default="fastattn,torch",
                        help="comma-separated implementation specs; the first is the subject")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--min-sample", type=float, default=0.02,
                        help="seconds of calls per sample at least (default 0.02)")
    parser.add_argument("--gap", type=float, default=0.01,
                        help="seconds between samples, for idle threads to stop spinning")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="5 rounds of 10 ms samples")
    parser.add_argument("--no-sgemm", action="store_true", help="skip the sgemm samples")
    parser.add_argument("--memory", action="store_true",
                        help="extra memory of one call instead of times (cases: "
                             + ", ".join(MEMORY_CASES) + ")")
    parser.add_argument("--json", metavar="PATH", help="also write every sample here")
    parser.add_argument("--from-json", metavar="PATH",
                        help="print the table of an earlier --json file, measure nothing")
    parser.add_argument("--list", action="store_true", help="print the groups and cases")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.worker, args.threads)
    if args.list:
        for group, cases in GROUPS.items():
            print(f"{group}: {' '.join(case.name for case in cases)}")
        print(f"memory (--memory): {' '.join(MEMORY_CASES)}")
        return None
    if args.from_json:
        with open(args.from_json) as file:
            saved = json.load(file)
        return print_table(saved["results"], saved["rounds"], saved["threads"])
    if args.quick:
        args.rounds, args.min_sample = 5, 0.01
    known = MEMORY_CASES if args.memory else CASES
    names = []
    for item in args.cases or (list(MEMORY_CASES) if args.memory else GOAL_GROUPS):
        if item in GROUPS and not args.memory:
            names.extend(case.name for case in GROUPS[item])
        elif item in known:
            names.append(item)
        else:
            parser.error(f"unknown case or group {item!r}; --list shows them")
    names = list(dict.fromkeys(names))
    results = run_memory(args, names) if args.memory else run_rounds(args, names)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"argv": sys.argv[1:], "threads": args.threads, "rounds": args.rounds,
                       "results": results,
                       "rows": [] if args.memory else [row for result in results
                                                       for row in summarise(result)]},
                      file, indent=1)
    return None


if __name__ == "__main__":
    main()
