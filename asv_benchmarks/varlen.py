"""Packed sequences of different lengths (``fastattn.varlen_attention``) against the
padded call of the same batch (issue 23's goal).

usage: python asv_benchmarks/varlen.py [--rounds 15] [--threads 2]

Eight sequences of lengths drawn from [64, 2048] (a fixed seed), 8 heads, head dim
64, float32. The padded call is ``scaled_dot_product_attention`` on ``(8, 8, Lmax,
64)`` with ``kv_lengths``: keys beyond a sequence's length are skipped, padded query
rows are computed. Its work counts the scores it computes; the packed call's the
scores of the real tokens only (each sequence's ``L_s x L_s``, half for causal).
Goal: ``varlen / padded <= (real work / padded work) x 1.15 + 0.05``, forward and
forward + backward, non-causal and causal.

Each round times the packed call and the padded call once each (the order flipping
every round) in this process, and the script prints the median of the per-round
ratios with their min and max; run it alone on the machine (``flock -x`` where the
CPU is shared).
"""

import numpy as np

import fastattn

try:  # imported by asv as part of the asv_benchmarks package
    from .common import interleaved_rounds, ratio_line, runner_arguments
except ImportError:  # run as a script: python asv_benchmarks/varlen.py
    from common import interleaved_rounds, ratio_line, runner_arguments

SEQUENCES, HEADS, HEAD_DIM = 8, 8, 64
LENGTHS = np.random.default_rng(23).integers(64, 2049, SEQUENCES)  # (8,) tokens each


def packed_and_padded(lengths=LENGTHS, dtype=np.float32):
    """Random ``q``, ``k``, ``v`` packed ``(total, H, D)`` with their offsets
    ``(n_seq + 1,)``, and the same tokens padded ``(n_seq, H, Lmax, D)``."""
    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)  # (n_seq + 1,)
    longest = int(lengths.max())
    packed = [rng.standard_normal((offsets[-1], HEADS, HEAD_DIM)).astype(dtype)
              for _ in range(3)]  # (total, H, D) each
    padded = [np.zeros((len(lengths), HEADS, longest, HEAD_DIM), dtype)
              for _ in range(3)]  # (n_seq, H, Lmax, D) each
    for sequence, length in enumerate(lengths):
        rows = slice(offsets[sequence], offsets[sequence + 1])
        for array, source in zip(padded, packed):
            array[sequence, :, :length] = source[rows].transpose(1, 0, 2)
    return packed, offsets, padded


def work_ratio(lengths, causal):
    """Scores the packed call computes over those the padded call computes (each
    padded query row sees its sequence's keys, up to its own position when causal)."""
    longest = int(lengths.max())
    rows = np.arange(longest)[:, None]  # (Lmax, 1) query positions
    lengths = np.asarray(lengths)[None, :]  # (1, n_seq)
    padded = np.minimum(rows + 1, lengths) if causal else np.broadcast_to(lengths, (
        longest, lengths.shape[1]))  # (Lmax, n_seq) keys each padded row sees
    real = (lengths * (lengths + 1) // 2 if causal else lengths ** 2).sum()
    return float(real / padded.sum())


def calls(causal, backward, lengths=LENGTHS):
    """``{"varlen": f, "padded": g}``: the packed and the padded call (the forward, or
    the forward and then the backward)."""
    (q, k, v), offsets, (qp, kp, vp) = packed_and_padded(lengths)
    kv_lengths = np.asarray(lengths)

    def packed():
        out, lse = fastattn.varlen_attention(q, k, v, offsets, offsets, causal=causal,
                                             return_lse=True)
        if backward:
            fastattn.varlen_attention_backward(out, q, k, v, out, lse, offsets, offsets,
                                               causal=causal)

    def padded():
        out, lse = fastattn.scaled_dot_product_attention(
            qp, kp, vp, causal=causal, kv_lengths=kv_lengths, return_lse=True)
        if backward:
            fastattn.scaled_dot_product_attention_backward(
                out, qp, kp, vp, out, lse, causal=causal, kv_lengths=kv_lengths)

    return {"varlen": packed, "padded": padded}


class VarlenVsPadded:
    """asv: the packed and the padded call of the same batch."""

    params = (["varlen", "padded"], [False, True], ["forward", "forward+backward"])
    param_names = ["layout", "causal", "pass"]
    timeout = 300

    def setup(self, layout, causal, which):
        self.call = calls(causal, which == "forward+backward")[layout]
        self.call()  # compiled and warm

    def time_call(self, layout, causal, which):
        self.call()


def main():
    arguments = runner_arguments(__doc__.splitlines()[0], rounds=15)
    fastattn.set_num_threads(arguments.threads)
    print(f"lengths {LENGTHS.tolist()}, H={HEADS}, D={HEAD_DIM}, float32, "
          f"{arguments.threads} threads, {arguments.rounds} rounds")
    print(f"{'case':<28}{'varlen ms':>11}{'padded ms':>11}  ratio med [min max]     goal")
    for causal in (False, True):
        for backward in (False, True):
            pair = calls(causal, backward)
            for call in pair.values():
                call()
            goal = work_ratio(LENGTHS, causal) * 1.15 + 0.05
            name = ("causal " if causal else "") + ("forward+backward" if backward else "forward")
            print(ratio_line(name, *interleaved_rounds(pair["varlen"], pair["padded"],
                                                       arguments.rounds), goal, 28), flush=True)

if __name__ == "__main__":
    main()
