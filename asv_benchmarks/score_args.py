"""Arrays passed to user functions at each call (``score_mod_args``) and their
gradients: the goals of issue 22, parts 1-3.

asv: :class:`TimeScoreArgs` times each case alone. Run as a script, the goals are
measured in interleaved rounds (each round times every case of a group once in
turn; each ratio is taken within the round, so machine drift cancels; the median of
the per-round ratios is printed with their min and max)::

    python asv_benchmarks/score_args.py [--groups table backward new_table new_function bounds]
                                        [--rounds 15]

- ``table`` (float32 ``(1, 8, 2048, 64)``): a relative-position ``score_mod`` reading
  a per-call ``(H, 2L - 1)`` table over the same function with the table captured
  (goal <= 1.05) and over plain attention (goal <= 1.4).
- ``backward`` (same shapes): the backward that also returns the table's gradient
  over the same backward without it (goal <= 1.35).
- ``new_table`` (float32 ``(1, 4, 256, 64)``, the issue's shape): a new table, and new
  document ids for a ``mask_mod``, at every call over the same call repeated (goal
  <= 1.05); the same with the documents in a broadcast ``(1, 1)`` block mask made at
  every call (``create_block_mask`` and the call, new ids against the same ids).
- ``new_function`` (same shape): the step that builds a new function capturing the
  new table (what a new table cost before ``score_mod_args``: a compile per step),
  beside the call with a per-call table.
- ``bounds``: the relative-bias recipe with Numba's bounds checks in the user's
  function over the same recipe without them (reported: goal <= 1.05 or say so).

Rounds alternate the order of the cases (A B, then B A), so that no case always
follows the same one.
"""

import argparse
import sys
import time

import numpy as np

try:  # imported by asv as part of the asv_benchmarks package
    from . import score_functions
except ImportError:  # run as a script
    import score_functions

HEADS, HEAD_DIM = 8, 64


def relative_args():
    """``score_mod(s, b, h, i, j, table)``: ``s + table[h, i - j + L - 1]``, the table
    ``(H, 2L - 1)`` passed at each call; its ``score_mod_grad`` and
    ``score_mod_args_grad``."""
    import numba

    @numba.njit
    def score_mod(s, b, h, i, j, table):
        return s + table[h, i - j + (table.shape[1] - 1) // 2]

    @numba.njit
    def score_mod_grad(s, b, h, i, j, table):
        return 1.0

    @numba.njit
    def score_mod_args_grad(g, s, b, h, i, j, grads, table):
        grads[0][h, i - j + (table.shape[1] - 1) // 2] += g

    return score_mod, score_mod_grad, score_mod_args_grad


def documents_args():
    """``mask_mod(b, h, i, j, document_of)``: causal within each token's document."""
    import numba

    @numba.njit
    def mask_mod(b, h, i, j, document_of):
        return document_of[i] == document_of[j] and j <= i

    return mask_mod


def inputs(heads, length, seed=0):
    rng = np.random.default_rng(seed)
    shape = (1, heads, length, HEAD_DIM)
    return tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(3))


def table_for(heads, length, seed=1):
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((heads, 2 * length - 1))).astype(np.float32)


def group_calls(group):
    """``({case: call}, [(numerator, denominator, goal)])`` of a group; every call is
    a function of the round index."""
    import fastattn

    forward, backward = (fastattn.scaled_dot_product_attention,
                         fastattn.scaled_dot_product_attention_backward)
    if group in ("table", "backward", "bounds"):
        length = 2048
        query, key, value = inputs(HEADS, length)
        table = table_for(HEADS, length)
        score_mod, score_mod_grad, args_grad = relative_args()
        with_args = dict(score_mod=score_mod, score_mod_args=(table,))
    if group == "table":
        captured = dict(score_mod=score_functions.relative_position_bias(table))
        return {"plain": lambda step: forward(query, key, value),
                "captured table": lambda step: forward(query, key, value, **captured),
                "per-call table": lambda step: forward(query, key, value, **with_args)}, [
            ("per-call table", "captured table", "<= 1.05"),
            ("per-call table", "plain", "<= 1.4")]
    if group == "backward":
        out, lse = forward(query, key, value, return_lse=True, **with_args)
        grads = dict(with_args, score_mod_grad=score_mod_grad)
        return {"backward": lambda step: backward(out, query, key, value, out, lse, **grads),
                "backward + table grad": lambda step: backward(
                    out, query, key, value, out, lse, score_mod_args_grad=args_grad, **grads)}, [
            ("backward + table grad", "backward", "<= 1.35")]
    if group == "bounds":
        from fastattn.kernels import hooks

        unchecked, _, _ = relative_args()
        hooks.BOUNDS_CHECKS = False
        try:  # the hook of `unchecked` is built now, without bounds checks
            forward(query, key, value, score_mod=unchecked, score_mod_args=(table,))
        finally:
            hooks.BOUNDS_CHECKS = True
        return {"unchecked": lambda step: forward(query, key, value, score_mod=unchecked,
                                                  score_mod_args=(table,)),
                "checked": lambda step: forward(query, key, value, **with_args)}, [
            ("checked", "unchecked", "<= 1.05 (else say so)")]
    if group in ("new_table", "new_function"):
        heads, length = 4, 256
        query, key, value = inputs(heads, length)
        tables = [table_for(heads, length, seed) for seed in range(4)]
        rng = np.random.default_rng(3)
        documents = [np.sort(rng.integers(0, 4, length)) for _ in range(4)]
        score_mod, _, _ = relative_args()
        mask_mod = documents_args()

        def call(table, document_of):
            return forward(query, key, value, score_mod=score_mod, score_mod_args=(table,),
                           mask_mod=mask_mod, mask_mod_args=(document_of,))

        def new_function(step):  # before score_mod_args: a new function per new table
            table = tables[step % 4] + np.float32(step)  # new values each step
            return forward(query, key, value,
                           score_mod=score_functions.relative_position_bias(table))

        def masked_call(table, document_of):  # a broadcast block mask of the documents
            block_mask = fastattn.create_block_mask(mask_mod, (1, 1), length, length,
                                                    block_size=64, mask_mod_args=(document_of,))
            return forward(query, key, value, score_mod=score_mod, score_mod_args=(table,),
                           block_mask=block_mask)

        if group == "new_function":  # a compile per step: a group of its own, so that
            # the calls after it do not pay for the threads it left asleep
            return {"same table": lambda step: call(tables[0], documents[0]),
                    "new captured-table function": new_function}, []
        return {"same table": lambda step: call(tables[0], documents[0]),
                "new table and documents": lambda step: call(
                    tables[step % 4].copy(), documents[step % 4].copy()),
                "same block mask documents": lambda step: masked_call(tables[0], documents[0]),
                "new block mask documents": lambda step: masked_call(
                    tables[step % 4].copy(), documents[step % 4].copy())}, [
            ("new table and documents", "same table", "<= 1.05"),
            ("new block mask documents", "same block mask documents", "<= 1.05")]
    raise ValueError(group)


def run_group(group, rounds):
    calls, ratios = group_calls(group)
    for call in calls.values():  # compile or load, warm up
        call(-2)
        call(-1)
    times = {name: [] for name in calls}
    for step in range(rounds):
        order = list(calls.items())
        for name, call in (order if step % 2 == 0 else order[::-1]):  # A B, then B A
            started = time.perf_counter()
            call(step)
            times[name].append(time.perf_counter() - started)
        print(f"  {group}: round {step + 1}/{rounds}", file=sys.stderr)
    print(f"{group}:")
    for name in calls:
        print(f"  {name}: median {np.median(times[name]) * 1e3:.2f} ms")
    for numerator, denominator, goal in ratios:
        ratio = np.array(times[numerator]) / np.array(times[denominator])
        print(f"  {numerator} / {denominator}: median {np.median(ratio):.3f} "
              f"[min {ratio.min():.3f}, max {ratio.max():.3f}] over {ratio.size} rounds "
              f"(goal {goal})")


class TimeScoreArgs:
    """Forward and backward time of a relative-position ``score_mod`` whose table is
    passed per call, with and without the table's gradient, at L = 2048; and a call
    with a new table and new document ids (L = 256)."""

    params = [["plain", "captured table", "per-call table"]]
    param_names = ["case"]
    timeout = 600
    number = 1
    repeat = (1, 5, 30.0)

    def setup(self, case):
        self.calls = group_calls("table")[0]
        self.calls[case](0)

    def time_forward(self, case):
        self.calls[case](0)


class TimeScoreArgsBackward:
    params = [["backward", "backward + table grad"]]
    param_names = ["case"]
    timeout = 600
    number = 1
    repeat = (1, 5, 30.0)

    def setup(self, case):
        self.calls = group_calls("backward")[0]
        self.calls[case](0)

    def time_backward(self, case):
        self.calls[case](0)


class TimeNewTable:
    params = [["same table", "new table and documents", "same block mask documents",
               "new block mask documents"]]
    param_names = ["case"]
    timeout = 300

    def setup(self, case):
        self.calls = group_calls("new_table")[0]
        self.calls[case](0)
        self.step = 0

    def time_call(self, case):
        self.step += 1
        self.calls[case](self.step)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", nargs="+",
                        default=["table", "backward", "new_table", "new_function", "bounds"])
    parser.add_argument("--rounds", type=int, default=15)
    arguments = parser.parse_args()
    for group in arguments.groups:
        run_group(group, arguments.rounds)


if __name__ == "__main__":
    main()
