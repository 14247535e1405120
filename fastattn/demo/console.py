"""The worked examples of the user's lecture notes, run through fastattn and the reference.

``python -m fastattn demo`` prints each example with both implementations side by
side and exits non-zero if they disagree beyond the contract's float64 tolerance.
"""

import time

import numpy as np

from fastattn.demo.examples import (MONEY_RIVER_EMBEDDINGS, MONEY_RIVER_WORDS, SENTENCES,
                                     THE_CAT_SAT_EMBEDDINGS, THE_CAT_SAT_WORDS)

# float64 results of the two implementations must agree to the contract's bound.
AGREEMENT_TOLERANCE = 1e-10


class SideBySide:
    """Runs both implementations on the same call and records their largest difference."""

    def __init__(self, fast, reference):
        self.fast, self.reference = fast, reference
        self.worst = 0.0

    def __call__(self, *args, **kwargs):
        fast = self.fast(*args, **kwargs)
        reference = self.reference(*args, **kwargs)
        pairs = zip(fast, reference) if isinstance(fast, tuple) else [(fast, reference)]
        for got, want in pairs:
            finite = np.isfinite(want)
            assert (np.isfinite(got) == finite).all(), "non-finite entries differ"
            if finite.any():
                self.worst = max(self.worst, float(np.abs(got[finite] - want[finite]).max()))
        return fast, reference


def format_table(matrix, row_labels, col_labels, digits=3):
    """A small labelled matrix as text."""
    width = max(7, digits + 4, *(len(label) for label in col_labels))
    label_width = max(len(label) for label in row_labels)
    lines = [" " * label_width + "".join(f"{label:>{width}}" for label in col_labels)]
    for label, row in zip(row_labels, matrix):
        lines.append(f"{label:<{label_width}}" + "".join(f"{value:>{width}.{digits}f}" for value in row))
    return "\n".join(lines)


def side_by_side(left_title, left, right_title, right, gap=4):
    """Two blocks of text next to each other."""
    left_lines, right_lines = left.splitlines(), right.splitlines()
    width = max(len(line) for line in left_lines + [left_title])
    rows = [f"{left_title:<{width}}{' ' * gap}{right_title}"]
    for index in range(max(len(left_lines), len(right_lines))):
        left_line = left_lines[index] if index < len(left_lines) else ""
        right_line = right_lines[index] if index < len(right_lines) else ""
        rows.append(f"{left_line:<{width}}{' ' * gap}{right_line}")
    return "\n".join(rows)


def heading(text):
    print(f"\n== {text} " + "=" * max(0, 72 - len(text)))


def show_contextual_bank(compare):
    heading("002  Self-attention weights, identity projections, scale 1/sqrt(3)")
    bank_vectors = {}
    for sentence, rows in SENTENCES.items():
        words = [MONEY_RIVER_WORDS[row] for row in rows]
        embeddings = MONEY_RIVER_EMBEDDINGS[rows]  # (3, 3) one sentence
        (out, weights), (ref_out, ref_weights) = compare(
            embeddings, embeddings, embeddings, return_weights=True)
        print(f"\n'{sentence}'")
        print(side_by_side("fastattn weights", format_table(weights, words, words),
                           "reference weights", format_table(ref_weights, words, words)))
        bank_vectors[sentence] = out[1]  # contextual embedding of "Bank"
    static = MONEY_RIVER_EMBEDDINGS[1]
    money, river = bank_vectors.values()
    print("\nContextual embedding of 'Bank' (static embedding "
          f"{np.array2string(static, precision=3)}):")
    for sentence, vector in bank_vectors.items():
        print(f"  in '{sentence}': {np.array2string(vector, precision=4)}")
    print(f"  distance between the two: {np.linalg.norm(money - river):.4f} "
          "(the static embeddings are identical, distance 0)")


def show_the_cat_sat(compare):
    heading("001  THE CAT SAT: raw scores Q K^T and softmax([6, 4])")
    embeddings = THE_CAT_SAT_EMBEDDINGS
    (_, weights, lse), _ = compare(embeddings, embeddings, embeddings, scale=1.0,
                                   return_weights=True, return_lse=True)
    scores = np.log(weights) + lse[:, None]  # (3, 3) scores read back from the softmax
    print(format_table(scores, THE_CAT_SAT_WORDS, THE_CAT_SAT_WORDS, digits=1))
    print("Each word scores highest against SAT, and SAT most against itself.")
    query, key = np.array([[1.0]]), np.array([[6.0], [4.0]])
    (_, six_four), (_, ref_six_four) = compare(query, key, key, scale=1.0, return_weights=True)
    print(f"softmax([6, 4]) = {np.array2string(six_four[0], precision=4)} fastattn, "
          f"{np.array2string(ref_six_four[0], precision=4)} reference (notes: [0.88, 0.12])")


def show_causal_mask(compare):
    heading("004  Decoder (causal) mask, L=5, d_k=6, d_v=4")
    rng = np.random.default_rng(4)
    query, key = rng.standard_normal((2, 5, 6))  # (L, d_k) each
    value = rng.standard_normal((5, 4))  # (L, d_v)
    (out, weights), (_, ref_weights) = compare(query, key, value, causal=True, return_weights=True)
    positions = [f"w{index}" for index in range(5)]
    print(side_by_side("fastattn weights", format_table(weights, positions, positions),
                       "reference weights", format_table(ref_weights, positions, positions)))
    print(f"row sums {np.array2string(weights.sum(-1), precision=3)}; "
          f"row 0 output equals V[0]: {bool(np.allclose(out[0], value[0]))}")


def show_scaling(compare):
    heading("000  Why scale by sqrt(d_k): variance of q.k and softmax saturation")
    rng = np.random.default_rng(0)
    print(f"{'d_k':>6}{'var raw':>10}{'var scaled':>12}"
          f"{'top weight raw (fast / ref)':>30}{'top weight scaled (fast / ref)':>33}")
    for head_dim in (3, 100, 1000):
        query, key = rng.standard_normal((2, 200, head_dim))  # (L, d_k) each
        value = np.zeros((200, 1))
        raw = query @ key.T  # (L, L)
        tops = []
        for scale in (1.0, None):
            (_, weights), (_, ref_weights) = compare(query, key, value, scale=scale,
                                                     return_weights=True)
            tops.append(f"{weights.max(-1).mean():.3f} / {ref_weights.max(-1).mean():.3f}")
        print(f"{head_dim:>6}{raw.var():>10.1f}{(raw / np.sqrt(head_dim)).var():>12.3f}"
              f"{tops[0]:>30}{tops[1]:>33}")
    print("Raw variance grows like d_k and the softmax saturates (one key takes all the "
          "weight);\nscaling by 1/sqrt(d_k) keeps variance near 1 and the weights spread.")


def run_demo(plot_dir=None):
    """Print every example; return the process exit status (0 when both paths agree).

    With ``plot_dir``, also write the figures of :func:`fastattn.demo.plots.write_demo_plots`
    there (or say how to install matplotlib when it is missing).
    """
    import reference

    print("Loading fastattn kernels (the first run compiles them: about 30 s; "
          "later runs load the on-disk cache) ...", flush=True)
    started = time.perf_counter()
    import fastattn

    fast = fastattn.scaled_dot_product_attention
    fast(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)))  # compile or load float64
    print(f"kernels ready in {time.perf_counter() - started:.1f} s")

    compare = SideBySide(fast, reference.scaled_dot_product_attention)
    show_contextual_bank(compare)
    show_the_cat_sat(compare)
    show_causal_mask(compare)
    show_scaling(compare)

    heading("Agreement")
    agree = compare.worst <= AGREEMENT_TOLERANCE
    print(f"largest |fastattn - reference| over every example: {compare.worst:.2e} "
          f"({'within' if agree else 'OUTSIDE'} the contract's {AGREEMENT_TOLERANCE:.0e})")
    if plot_dir is not None:
        from fastattn.demo.plots import write_demo_plots

        heading("Figures")
        try:
            for path in write_demo_plots(plot_dir):
                print(f"wrote {path}")
        except ImportError as error:
            print(f"no figures: {error}")
    return 0 if agree else 1
