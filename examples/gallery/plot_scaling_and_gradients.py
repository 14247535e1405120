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
head_dims = np.array([2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
settings = {"scale = 1 (no scaling)": 1.0, "scale = 1/sqrt(d_k)": None}

top_weight = {name: [] for name in settings}
query_gradient = {name: [] for name in settings}
for head_dim in head_dims:
    query, key, value = rng.standard_normal((3, length, head_dim))  # (L, d_k) each
    grad_out = rng.standard_normal((length, head_dim))  # d(loss)/d(out), a random loss
    for name, scale in settings.items():
        out, weights, lse = fastattn.scaled_dot_product_attention(
            query, key, value, scale=scale, return_weights=True, return_lse=True)
        grad_query, grad_key, grad_value = fastattn.scaled_dot_product_attention_backward(
            grad_out, query, key, value, out, lse, scale=scale)
        top_weight[name].append(weights.max(axis=-1).mean())  # mean over rows
        # the gradient per score: remove the 1/sqrt(d_k) that dQ = scale * dS K carries
        effective_scale = 1.0 if scale is not None else 1.0 / np.sqrt(head_dim)
        query_gradient[name].append(
            np.sqrt(np.mean((grad_query / effective_scale) ** 2)) / np.sqrt(head_dim))

# %%
# Saturation: the largest weight of each row, averaged over rows. A value near 1
# means the softmax has become an argmax.

figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
for name in settings:
    left.plot(head_dims, top_weight[name], marker="o", label=name)
left.axhline(1.0 / length, color="gray", linestyle=":", label="uniform weights (1/L)")
left.set_xscale("log", base=2)
left.set_yscale("log")
left.set_xlabel("d_k")
left.set_ylabel("mean of each row's largest weight")
left.set_title(f"Softmax saturation (L = {length})")
left.legend()

# %%
# The gradient: the root-mean-square of ``dL/dS``, read back from the query
# gradient ``dQ = scale * dS K`` (``K`` has entries of unit variance). A saturated
# softmax passes almost no gradient to its scores.

for name in settings:
    right.plot(head_dims, query_gradient[name], marker="o", label=name)
right.set_xscale("log", base=2)
right.set_yscale("log")
right.set_xlabel("d_k")
right.set_ylabel("rms of dL/dS (from dQ)")
right.set_title("Gradient reaching the scores")
right.legend()
figure.suptitle("Without 1/sqrt(d_k) the softmax saturates and the gradient vanishes")
plt.show()
