"""
Why divide by sqrt(d_k): softmax saturation and vanishing gradients
===================================================================

For query and key entries with unit variance, ``q.k`` has variance ``d_k``. Without
the ``1/sqrt(d_k)`` scaling the scores spread further as ``d_k`` grows, the softmax
puts nearly all of a row's weight on one key, and the gradient that flows back to the
queries and keys shrinks towards zero: the layer stops learning. With the scaling the
scores keep unit variance at every ``d_k``.

Both curves come from fastattn's kernels: the weights from the forward
(``return_weights=True``), the gradients from the fused backward
(:func:`fastattn.scaled_dot_product_attention_backward`) of a random loss.
"""

import matplotlib.pyplot as plt
import numpy as np

import fastattn

rng = np.random.default_rng(0)
length = 128
value_dim = 16  # d_v, the same at every d_k, so only the scores change
head_dims = np.array([2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
settings = {"scale = 1 (no scaling)": 1.0, "scale = 1/sqrt(d_k)": None}

top_weight = {name: [] for name in settings}
score_gradient = {name: [] for name in settings}
for head_dim in head_dims:
    query, key = rng.standard_normal((2, length, head_dim))  # (L, d_k) each
    value = rng.standard_normal((length, value_dim))  # (L, d_v)
    grad_out = rng.standard_normal((length, value_dim))  # d(loss)/d(out), a random loss
    for name, scale in settings.items():
        out, weights, lse = fastattn.scaled_dot_product_attention(
            query, key, value, scale=scale, return_weights=True, return_lse=True)
        grad_query, grad_key, grad_value = fastattn.scaled_dot_product_attention_backward(
            grad_out, query, key, value, out, lse, scale=scale)
        top_weight[name].append(weights.max(axis=-1).mean())  # mean over rows
        # dQ = scale * dS K, and K has independent entries of unit variance, so the
        # rms of row i of dQ / scale is about |dS_i|, the gradient of row i's scores
        used_scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
        row_norms = np.sqrt(np.mean((grad_query / used_scale) ** 2, axis=-1))  # (L,)
        score_gradient[name].append(np.median(row_norms))  # the typical row

# %%
# Saturation: the largest weight of each row, averaged over rows. A value near 1
# means the softmax has become an argmax.

figure, axis = plt.subplots(figsize=(6, 4), constrained_layout=True)
for name in settings:
    axis.plot(head_dims, top_weight[name], marker="o", label=name)
axis.axhline(1.0 / length, color="gray", linestyle=":", label="uniform weights (1/L)")
axis.set_xscale("log", base=2)
axis.set_yscale("log")
axis.set_xlabel("d_k")
axis.set_ylabel("mean of each row's largest weight")
axis.set_title(f"Softmax saturation (L = {length})")
axis.legend()

# %%
# The gradient of a random loss ``sum(grad_out * out)`` with respect to the scores,
# ``dS = P * (dO V^T - D)``, read back from the query gradient ``dQ = scale * dS K``.
# A saturated softmax passes almost no gradient back to its scores, and so to the
# queries and keys that made them.

figure, axis = plt.subplots(figsize=(6, 4), constrained_layout=True)
for name in settings:
    axis.plot(head_dims, score_gradient[name], marker="o", label=name)
axis.set_xscale("log", base=2)
axis.set_yscale("log")
axis.set_xlabel("d_k")
axis.set_ylabel("median over rows of |dL/dS_i|")
axis.set_title("Gradient reaching the scores")
axis.legend()
plt.show()
