"""Figures of the lecture notes' examples, for ``python -m fastattn demo --plot DIR``.

matplotlib is an optional extra (``pip install 'fastattn[plot]'``); it is imported
only here, only when figures are asked for.
"""

import pathlib

import numpy as np

from fastattn.demo.examples import MONEY_RIVER_EMBEDDINGS, MONEY_RIVER_WORDS, SENTENCES


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the demo's figures need matplotlib: "
                          "pip install 'fastattn[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_demo_plots(directory):
    """Write the demo's figures as PNG files into ``directory``; return their paths.

    - ``attention_weights.png``: heatmaps of the self-attention weights of
      "Money Bank Grows" and "River Bank Flows" (identity projections, 1/sqrt(3)),
      on one colour scale set by the weights (:func:`attention_weights_figure`).
    - ``score_variance.png``: histograms of ``q.k`` for standard-normal vectors at
      d_k = 3, 100 and 1000, raw and divided by sqrt(d_k).
    """
    plt = _pyplot()
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []

    figure = attention_weights_figure(plt)
    paths.append(directory / "attention_weights.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    rng = np.random.default_rng(0)
    figure, axes = plt.subplots(2, 3, figsize=(11, 6), constrained_layout=True)
    for column, head_dim in enumerate((3, 100, 1000)):
        query, key = rng.standard_normal((2, 300, head_dim))  # (L, d_k) each
        raw = (query @ key.T).ravel()  # (L*L,) dot products
        for row, (scores, label) in enumerate(((raw, "raw q.k"),
                                               (raw / np.sqrt(head_dim), "q.k / sqrt(d_k)"))):
            axis = axes[row, column]
            axis.hist(scores, bins=80, color="tab:blue" if row == 0 else "tab:green")
            axis.set_title(f"d_k = {head_dim}: {label}, variance {scores.var():.1f}")
            axis.set_yticks([])
    figure.suptitle("Variance of dot products grows with d_k; scaling by 1/sqrt(d_k) restores it")
    paths.append(directory / "score_variance.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)
    return paths


def attention_weights_figure(plt):
    """Heatmaps of the self-attention weights of each demo sentence, side by side.

    The panels share one colour scale running from the smallest to the largest weight
    shown (here about 0.2 to 0.48), so the one colourbar reads correctly for both and
    the differences between weights use the whole colour map; a fixed 0..1 (or 0..0.5)
    scale would squeeze them into a few shades. Each cell is also labelled with its
    value, in black or white, whichever stands out from the cell's colour.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from fastattn.attention import scaled_dot_product_attention

    panels = []
    for sentence, rows in SENTENCES.items():
        embeddings = MONEY_RIVER_EMBEDDINGS[rows]  # (3, 3)
        _, weights = scaled_dot_product_attention(embeddings, embeddings, embeddings,
                                                  return_weights=True)  # (3, 3)
        panels.append((sentence, [MONEY_RIVER_WORDS[row] for row in rows], weights))
    low = min(weights.min() for _, _, weights in panels)
    high = max(weights.max() for _, _, weights in panels)

    figure, axes = plt.subplots(1, len(panels), figsize=(9, 4), constrained_layout=True)
    for axis, (sentence, words, weights) in zip(np.atleast_1d(axes), panels):
        image = axis.imshow(weights, cmap="viridis", vmin=low, vmax=high)
        axis.set_xticks(range(len(words)), words)
        axis.set_yticks(range(len(words)), words)
        axis.set_xlabel("key")
        axis.set_ylabel("query")
        axis.set_title(f"'{sentence}'")
        for (row, col), weight in np.ndenumerate(weights):
            light_cell = image.norm(weight) > 0.6  # viridis turns light near its top
            axis.text(col, row, f"{weight:.2f}", ha="center", va="center",
                      color="black" if light_cell else "white")
    figure.colorbar(image, ax=axes, shrink=0.8,
                    label=f"attention weight (shared scale {low:.2f} to {high:.2f})")
    figure.suptitle("Self-attention weights, softmax(E E^T / sqrt(3)); each row sums to 1")
    return figure
