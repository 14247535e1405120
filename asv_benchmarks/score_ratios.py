"""Interleaved cost of score options and user score functions (issue 11's goals).

usage: python asv_benchmarks/score_ratios.py [--groups builtins score_mod window documents
                                              dropout bias_grad flex compile] [--rounds 15]

float32 ``(B=1, H=8, L, D=64)`` forwards, 2 threads. Within a group, each round times
every case once in turn, and each ratio is taken within the round, so machine drift
cancels; the script prints the median of the per-round ratios with their min and max.

- ``builtins`` (L = 2048): softcap and ALiBi over plain; goals <= 1.25 x and <= 1.15 x.
- ``score_mod`` (L = 2048): a relative-position bias from an ``(H, 2L - 1)`` table
  through ``score_mod``, over plain; goal <= 1.4 x.
- ``window`` (L = 8192): a 256-key sliding window through ``mask_mod`` and
  ``create_block_mask``, over the built-in ``window=(256, 0)`` (goal <= 1.5 x), and
  the same window as a dense boolean mask over it (goal >= 10 x).
- ``documents`` (L = 8192): 8 packed documents of 1024 tokens, a dense boolean mask
  over the block mask; goal >= 6 x.
- ``flex`` (L = 2048, needs torch): fastattn with a softcap ``score_mod`` (written
  with ``math.tanh``, and with ``fastattn.score_math.tanh``) against PyTorch's
  FlexAttention under ``torch.compile`` with the same ``score_mod`` (inference),
  each in a process of its own, timed in turn; goal <= 1.0 x.
- ``dropout`` (L = 2048): attention dropout p = 0.1 over the same call without it,
  forward (goal <= 1.20 x) and backward (goal <= 1.25 x).
- ``bias_grad`` (L = 2048, a per-head ``(H, L, L)`` bias): the backward that also
  returns the bias gradient over the same backward without it (goal <= 1.30 x).
- ``compile``: seconds to the first result of a call with a new ``score_mod``, in a
  new process, with the kernels compiled (cold cache) and cached; and with a
  module-level ``cache=True`` ``score_mod`` compiled in an earlier process. Goals
  <= 30 s and <= 1.5 s.

The fastattn-only groups run in this process (one implementation); run the script
alone on the machine (``flock -x`` where the CPU is shared).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

try:  # imported by asv as part of the asv_benchmarks package
    from . import score_functions
    from .common import WorkerProcess
except ImportError:  # run as a script
    import score_functions
    from common import WorkerProcess

HEADS, HEAD_DIM = 8, 64
SLOPES = 2.0 ** (-8.0 * np.arange(1, HEADS + 1) / HEADS)
WINDOW, DOCUMENT = 256, 1024


def inputs(length, seed=0):
    rng = np.random.default_rng(seed)
    shape = (1, HEADS, length, HEAD_DIM)
    return tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(3))


def group_cases(group):
    """``(length, {case: options}, [(numerator, denominator, goal text)])``."""
    if group == "builtins":
        return 2048, {"plain": {}, "softcap": dict(softcap=30.0),
                      "alibi": dict(alibi_slopes=SLOPES)}, [
            ("softcap", "plain", "<= 1.25"), ("alibi", "plain", "<= 1.15")]
    if group == "score_mod":
        length = 2048
        table = np.random.default_rng(1).standard_normal((HEADS, 2 * length - 1)) * 0.1
        return length, {"plain": {}, "relative-bias score_mod": dict(
            score_mod=score_functions.relative_position_bias(table))}, [
            ("relative-bias score_mod", "plain", "<= 1.4")]
    if group == "window":
        return 8192, {"built-in window": dict(window=(WINDOW, 0)),
                      **block_and_dense(score_functions.sliding_window(WINDOW), 8192)}, [
            ("block mask", "built-in window", "<= 1.5"), ("dense mask", "block mask", ">= 10")]
    if group == "documents":
        return 8192, block_and_dense(score_functions.documents(DOCUMENT), 8192), [
            ("dense mask", "block mask", ">= 6")]
    if group == "dropout":
        dropout = dict(dropout_p=0.1, dropout_seed=12345)
        return 2048, {"plain": {}, "dropout": dropout,
                      "plain backward": dict(kind="backward"),
                      "dropout backward": dict(dropout, kind="backward")}, [
            ("dropout", "plain", "<= 1.20"), ("dropout backward", "plain backward", "<= 1.25")]
    if group == "bias_grad":
        length = 2048
        bias = np.random.default_rng(2).standard_normal((HEADS, length, length)).astype(
            np.float32)  # (H, L, L)
        return length, {"bias backward": dict(bias=bias, kind="backward"),
                        "bias backward + bias grad": dict(bias=bias, kind="backward",
                                                          return_bias_grad=True)}, [
            ("bias backward + bias grad", "bias backward", "<= 1.30")]
    raise ValueError(group)


def block_and_dense(mask_mod, length):
    """The cases "block mask" (``create_block_mask`` of ``mask_mod``) and "dense mask"
    (the same mask as an ``(L, L)`` boolean array)."""
    import fastattn

    block_mask = fastattn.create_block_mask(mask_mod, (1, HEADS), length, length)
    return {"block mask": dict(block_mask=block_mask),
            "dense mask": dict(mask=score_functions.dense_mask(mask_mod, length, length))}


def run_group(group, rounds):
    """Time a fastattn-only group in this process; print its ratios."""
    import fastattn

    length, cases, ratios = group_cases(group)
    query, key, value = inputs(length)
    calls = {}
    for name, options in cases.items():
        options = dict(options)
        mask = options.pop("mask", None)
        kind = options.pop("kind", "forward")
        return_bias_grad = options.pop("return_bias_grad", False)
        if kind == "backward":  # the gradients alone, given the forward's out and lse
            out, lse = fastattn.scaled_dot_product_attention(query, key, value, mask,
                                                             return_lse=True, **options)
            calls[name] = (lambda mask=mask, options=options, out=out, lse=lse,
                           return_bias_grad=return_bias_grad:
                           fastattn.scaled_dot_product_attention_backward(
                               out, query, key, value, out, lse, mask,
                               return_bias_grad=return_bias_grad, **options))
            continue
        calls[name] = (lambda mask=mask, options=options:
                       fastattn.scaled_dot_product_attention(query, key, value, mask, **options))
    for call in calls.values():  # compile or load, warm up
        call()
        call()
    times = {name: [] for name in calls}
    for round_index in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
        print(f"  {group}: round {round_index + 1}/{rounds}", file=sys.stderr)
    print(f"{group} (L={length}):")
    for name in calls:
        print(f"  {name}: median {np.median(times[name]) * 1e3:.1f} ms")
    for numerator, denominator, goal in ratios:
        report(f"{numerator} / {denominator}", np.array(times[numerator]) /
               np.array(times[denominator]), goal)


def report(label, ratios, goal):
    print(f"  {label}: median {np.median(ratios):.3f} [min {ratios.min():.3f}, "
          f"max {ratios.max():.3f}] over {ratios.size} rounds (goal {goal})")


# ---------------------------------------------------------------- FlexAttention

FLEX_LENGTH, FLEX_CAP = 2048, 30.0
WORKER = {
    "fastattn, math.tanh": """
        import fastattn, score_functions
        score_mod, _ = score_functions.softcap_score_mod({cap})
        call = lambda: fastattn.scaled_dot_product_attention(query, key, value,
                                                             score_mod=score_mod)
    """,
    "fastattn, score_math.tanh": """
        import fastattn, fastattn.score_math, score_functions
        score_mod, _ = score_functions.softcap_score_mod({cap}, fastattn.score_math.tanh)
        call = lambda: fastattn.scaled_dot_product_attention(query, key, value,
                                                             score_mod=score_mod)
    """,
    "torch-flex": """
        import torch
        from torch.nn.attention.flex_attention import flex_attention
        torch.set_num_threads(2)
        def score_mod(score, b, h, q_idx, kv_idx):
            return {cap} * torch.tanh(score / {cap})
        compiled = torch.compile(flex_attention)
        tensors = [torch.from_numpy(array) for array in (query, key, value)]
        def call():
            with torch.no_grad():
                return compiled(*tensors, score_mod=score_mod)
    """,
}


def worker_source(impl):
    return textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import numpy as np
        from score_ratios import inputs
        query, key, value = inputs({FLEX_LENGTH})
    """) + textwrap.dedent(WORKER[impl].format(cap=FLEX_CAP)) + textwrap.dedent("""
        call(); call()
        print('"ready"', flush=True)
        for line in sys.stdin:
            started = time.perf_counter()
            call()
            print(time.perf_counter() - started, flush=True)
    """)


def run_flex(rounds):
    """fastattn and FlexAttention, each in a persistent process, timed in turn."""
    workers = {impl: WorkerProcess(impl, [sys.executable, "-c", worker_source(impl)])
               for impl in WORKER}
    for impl, worker in workers.items():
        if worker.read() != "ready":
            raise RuntimeError(f"the {impl} worker did not start")
    times = {impl: [] for impl in workers}
    for round_index in range(rounds):
        for impl, worker in workers.items():
            times[impl].append(worker.ask("time"))
        print(f"  flex: round {round_index + 1}/{rounds}", file=sys.stderr)
    for worker in workers.values():
        worker.close()
    print(f"flex (L={FLEX_LENGTH}, softcap {FLEX_CAP} as score_mod, inference):")
    for impl in workers:
        print(f"  {impl}: median {np.median(times[impl]) * 1e3:.1f} ms")
    for impl in workers:
        if impl != "torch-flex":
            report(f"{impl} / torch-flex", np.array(times[impl]) / np.array(times["torch-flex"]),
                   "<= 1.0")


# ---------------------------------------------------------------- compile time

CACHED_MODULE = """
import numba

@numba.njit(cache=True)
def relative_distance(s, b, h, i, j):
    return s - 0.01 * abs(i - j)
"""

FIRST_CALL = """
import sys, time
started = time.perf_counter()
sys.path.insert(0, {module_dir!r})
import numpy as np
import fastattn
{define}
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 8, 512, 64)).astype(np.float32) for _ in range(3))
fastattn.scaled_dot_product_attention(q, k, v, score_mod=score_mod)
print(time.perf_counter() - started)
"""

NEW_FUNCTION = """
import numba
@numba.njit
def score_mod(s, b, h, i, j):
    return s - 0.02 * abs(i - j)
"""


def run_compile():
    """Seconds from process start (imports included) to the first result."""
    with tempfile.TemporaryDirectory() as scratch:
        with open(os.path.join(scratch, "user_scores.py"), "w") as module:
            module.write(CACHED_MODULE)
        env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(scratch, "numba-cache"))

        def first_call(define):
            source = FIRST_CALL.format(module_dir=scratch, define=define)
            done = subprocess.run([sys.executable, "-c", source], env=env, check=True,
                                  capture_output=True, text=True)
            return float(done.stdout.split()[-1])

        cached = "from user_scores import relative_distance as score_mod"
        cold = first_call(NEW_FUNCTION)
        warm_new = first_call(NEW_FUNCTION)
        first_cached = first_call(cached)
        again_cached = first_call(cached)
    print("compile (new process, float32 forward, B=1 H=8 L=512 D=64, imports included):")
    print(f"  new score_mod, kernels not yet compiled (cold cache): {cold:.2f} s (goal <= 30)")
    print(f"  new score_mod, kernels cached: {warm_new:.2f} s")
    print(f"  module-level cache=True score_mod, first process: {first_cached:.2f} s")
    print(f"  module-level cache=True score_mod, new process: {again_cached:.2f} s "
          f"(goal <= 1.5)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+",
                        default=["builtins", "score_mod", "window", "documents"],
                        choices=["builtins", "score_mod", "window", "documents", "dropout",
                                 "bias_grad", "flex", "compile"])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    for group in args.groups:
        if group == "flex":
            run_flex(args.rounds)
        elif group == "compile":
            run_compile()
        else:
            run_group(group, args.rounds)


if __name__ == "__main__":
    main()
