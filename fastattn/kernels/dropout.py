"""Attention dropout decisions from a counter-based generator (Philox4x32-10).

Each decision is a pure function of ``(seed, b, h, i, j)``: the forward and the
backward regenerate the same decisions without storing them, and they do not depend
on the thread count, the tiling or the dtype. Philox4x32-10 (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011; the generator of PyTorch's and
FlashAttention's dropout) maps a 128-bit counter and a 64-bit key to four 32-bit
words; fastattn's counter for query ``i`` and keys ``4g .. 4g + 3`` of batch entry
``(b, h)`` is ``(g, i, h, b)``, its key the seed, and word ``j % 4`` decides key
``j``: kept iff ``word >= threshold`` with ``threshold = round(p * 2**32)``. Kept
probabilities are scaled by ``1 / (1 - p)``.

``reference.dropout`` computes the same words with NumPy.
"""

import numpy as np

from fastattn.kernels.config import jit_helper
from fastattn.kernels.vector_math import cast_like

# Philox4x32 round multipliers and Weyl key increments.
# Everything is uint64 (Numba would turn uint64 mixed with int64 into floats).
PHILOX_M0, PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
PHILOX_W0, PHILOX_W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
PHILOX_ROUNDS = 10
WORD = np.uint64(0xFFFFFFFF)
SHIFT = np.uint64(32)


@jit_helper
def philox_words(group, row, head, entry, key0, key1):
    """The four 32-bit words of Philox4x32-10 for counter ``(group, row, head, entry)``
    and key ``(key0, key1)``, each an int64 holding a value below ``2**32``."""
    c0, c1, c2, c3 = np.uint64(group) & WORD, np.uint64(row) & WORD, \
        np.uint64(head) & WORD, np.uint64(entry) & WORD
    k0, k1 = np.uint64(key0), np.uint64(key1)
    for _ in range(PHILOX_ROUNDS):
        product0 = PHILOX_M0 * c0  # (hi0, lo0): a 64-bit product of 32-bit words
        product1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = ((product1 >> SHIFT) ^ c1 ^ k0, product1 & WORD,
                          (product0 >> SHIFT) ^ c3 ^ k1, product0 & WORD)
        k0 = (k0 + PHILOX_W0) & WORD
        k1 = (k1 + PHILOX_W1) & WORD
    return np.int64(c0), np.int64(c1), np.int64(c2), np.int64(c3)


@jit_helper
def drop_in_place(block, row_start, key_start, entry, options):
    """Multiply ``block`` ``(rows, cols)`` by the dropout factor of query
    ``row_start + r`` and key ``key_start + c`` of batch entry ``entry`` (``(b, h) =
    divmod(entry, options.heads)``): 0 for a dropped probability, ``1 / (1 - p)`` for a
    kept one.

    ``options`` (the kernels' ``ScoreOptions``) carries ``dropout_seed_low``,
    ``dropout_seed_high`` (the seed's two 32-bit halves), ``dropout_threshold``
    (``round(p * 2**32)``) and ``dropout_keep_scale``. Keys come four to a
    counter (:func:`philox_words`); the groups a block cuts are computed whole and
    only their columns inside the block are written.
    """
    rows, cols = block.shape
    if cols == 0:
        return
    batch, head = entry // options.heads, entry % options.heads
    keep_scale = cast_like(options.dropout_keep_scale, block)
    zero = cast_like(0.0, block)
    threshold = options.dropout_threshold
    first_group, last_group = key_start >> 2, (key_start + cols - 1) >> 2
    for r in range(rows):
        row = row_start + r
        for group in range(first_group, last_group + 1):
            words = philox_words(group, row, head, batch, options.dropout_seed_low,
                                 options.dropout_seed_high)
            base = group * 4 - key_start  # column of the group's first key
            for lane in range(4):
                c = base + lane
                if 0 <= c < cols:
                    block[r, c] *= keep_scale if words[lane] >= threshold else zero


@jit_helper
def keep_factor(row, key, entry, options):
    """The dropout factor of one probability (see :func:`drop_in_place`), as a float."""
    words = philox_words(key >> 2, row, entry % options.heads, entry // options.heads,
                         options.dropout_seed_low, options.dropout_seed_high)
    return options.dropout_keep_scale if words[key & 3] >= options.dropout_threshold else 0.0
