"""
A block mask's tiles
====================

:func:`fastattn.create_block_mask` evaluates a ``mask_mod(b, h, i, j)`` once and
records, for every tile of 128 queries by 128 keys, whether it is empty (skipped),
full (no per-element calls) or partial (the kernels call ``mask_mod`` on its
elements). :attr:`fastattn.BlockMask.states` holds those states; here they are drawn
over the element-wise mask for three masks: packed documents, a sliding window and a
prefix-LM.
"""

import matplotlib.pyplot as plt
import numba
import numpy as np
from matplotlib.colors import ListedColormap

import fastattn
from fastattn.block_mask import EMPTY, FULL, PARTIAL

length = 1024
starts = np.array([0, 200, 520, 600, length])  # packed documents
document_of = np.repeat(np.arange(len(starts) - 1), np.diff(starts))  # (L,)


@numba.njit
def same_document(b, h, i, j):
    return document_of[i] == document_of[j] and j <= i


@numba.njit
def sliding_window(b, h, i, j):
    return i - 192 <= j <= i


@numba.njit
def prefix_lm(b, h, i, j):
    return j < 300 or j <= i


masks = {"packed documents, causal": same_document,
         "sliding window of 193, causal": sliding_window,
         "prefix-LM (300-token prompt)": prefix_lm}

# %%
# Each panel: the tiles' states as colours, the element-wise mask (True = may
# attend) drawn over them in black, and the fraction of tiles the kernels skip.

positions = np.arange(length)
tile_colours = ListedColormap(["white", "#fdd49e", "#6baed6"])  # empty, partial, full
figure, axes = plt.subplots(1, len(masks), figsize=(13, 4.6), constrained_layout=True)
for axis, (title, mask_mod) in zip(axes, masks.items()):
    block_mask = fastattn.create_block_mask(mask_mod, (1, 1), length, length)
    states = block_mask.states[0]  # (q tiles, key tiles)
    axis.imshow(states, cmap=tile_colours, vmin=0, vmax=2, extent=(0, length, length, 0),
                interpolation="nearest")
    visible = np.array([[mask_mod(0, 0, i, j) for j in positions[::4]]
                        for i in positions[::4]])  # (L/4, L/4) the mask, every 4th entry
    axis.contour(positions[::4], positions[::4], visible.astype(float), levels=[0.5],
                 colors="black", linewidths=0.8)
    counts = {name: int(np.sum(states == state))
              for name, state in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}
    axis.set_title(f"{title}\n{counts['empty']} empty, {counts['partial']} partial, "
                   f"{counts['full']} full: {block_mask.sparsity():.0%} skipped")
    axis.set_xlabel("key j")
    axis.set_ylabel("query i")
    axis.set_xticks(range(0, length + 1, 256))
    axis.set_yticks(range(0, length + 1, 256))
figure.suptitle("BlockMask.states: white tiles are skipped, blue ones need no mask_mod "
                "calls, orange ones are checked element by element")

# %%
# The block mask gives the same attention as the dense boolean mask it stands for,
# without an ``(L, L)`` array:

rng = np.random.default_rng(0)
q, k, v = rng.standard_normal((3, 1, 1, length, 64)).astype(np.float32)  # (B, H, L, D)
documents = fastattn.create_block_mask(same_document, (1, 1), length, length)
dense = (document_of[:, None] == document_of[None, :]) & (positions[None, :] <= positions[:, None])
sparse_out = fastattn.scaled_dot_product_attention(q, k, v, block_mask=documents)
dense_out = fastattn.scaled_dot_product_attention(q, k, v, dense)
print("largest difference, block mask vs dense mask:",
      float(np.abs(sparse_out - dense_out).max()))
plt.show()
