"""
Attention maps of the lecture notes' sentences
==============================================

The notes give 3-d word embeddings for "Money Bank Grows" and "River Bank Flows"
and for THE / CAT / SAT (:mod:`fastattn.demo.examples`). With identity projections
(``W_q = W_k = W_v = I``) self-attention is ``softmax(E E^T / sqrt(d_k)) E``: each row
of the weights says how much one word (the query) takes from every word (the keys).
"""

import matplotlib.pyplot as plt
import numpy as np

import fastattn
from fastattn.demo import examples

# %%
# Self-attention over each sentence
# ---------------------------------
#
# The weights come from the fused kernel with ``return_weights=True``; the contextual
# embedding of "Bank" is row 1 of the output.

panels = []
bank_vectors = {}
for sentence, rows in examples.SENTENCES.items():
    embeddings = examples.MONEY_RIVER_EMBEDDINGS[rows]  # (3, 3) one sentence
    out, weights = fastattn.scaled_dot_product_attention(
        embeddings, embeddings, embeddings, return_weights=True)  # (3, 3), (3, 3)
    words = [examples.MONEY_RIVER_WORDS[row] for row in rows]
    panels.append((sentence, words, weights))
    bank_vectors[sentence] = out[1]

low = min(weights.min() for _, _, weights in panels)
high = max(weights.max() for _, _, weights in panels)
figure, axes = plt.subplots(1, 2, figsize=(9, 4), constrained_layout=True)
for axis, (sentence, words, weights) in zip(axes, panels):
    image = axis.imshow(weights, cmap="viridis", vmin=low, vmax=high)
    axis.set_xticks(range(3), words)
    axis.set_yticks(range(3), words)
    axis.set_xlabel("key")
    axis.set_ylabel("query")
    axis.set_title(f"'{sentence}'")
    for (row, col), weight in np.ndenumerate(weights):
        axis.text(col, row, f"{weight:.2f}", ha="center", va="center",
                  color="black" if image.norm(weight) > 0.6 else "white")
figure.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
figure.suptitle("softmax(E E^T / sqrt(3)): each row sums to 1")

# %%
# The static embedding of "Bank" is the same in both sentences; its contextual
# embeddings differ, because each mixes in its own neighbours:

money_bank, river_bank = bank_vectors.values()
print("static embedding of Bank:      ", examples.MONEY_RIVER_EMBEDDINGS[1])
for sentence, vector in bank_vectors.items():
    print(f"Bank in {sentence!r}:", np.round(vector, 4))
print("distance between the two contextual embeddings:",
      round(float(np.linalg.norm(money_bank - river_bank)), 4))

# %%
# THE CAT SAT, raw and causal
# ---------------------------
#
# The notes' second example scores THE, CAT and SAT against each other without
# scaling (``scale=1.0``). A decoder's causal mask hides the future: each word then
# attends only to itself and the words before it.

words = examples.THE_CAT_SAT_WORDS
embeddings = examples.THE_CAT_SAT_EMBEDDINGS  # (3, 4)
figure, axes = plt.subplots(1, 2, figsize=(9, 4), constrained_layout=True)
for axis, causal in zip(axes, (False, True)):
    _, weights = fastattn.scaled_dot_product_attention(
        embeddings, embeddings, embeddings, scale=1.0, causal=causal, return_weights=True)
    image = axis.imshow(weights, cmap="magma", vmin=0.0, vmax=1.0)
    axis.set_xticks(range(3), words)
    axis.set_yticks(range(3), words)
    axis.set_xlabel("key")
    axis.set_ylabel("query")
    axis.set_title("causal (decoder)" if causal else "bidirectional (encoder)")
    for (row, col), weight in np.ndenumerate(weights):
        axis.text(col, row, f"{weight:.2f}", ha="center", va="center",
                  color="black" if weight > 0.6 else "white")
figure.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
figure.suptitle("THE CAT SAT, scores Q K^T without scaling")
plt.show()
