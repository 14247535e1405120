"""Attention dropout decisions from a counter-based generator (Philox4x32-10).

Each decision is a pure function of ``(seed, b, h, i, j)``: the forward and the
backward regenerate the same decisions without storing them, and they do not depend
on the thread count, the tiling or the dtype. Philox4x32-10 (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011; the generator of PyTorch's and
FlashAttention's dropout) maps a 128-bit counter and a 64-bit key to four 32-bit
words; fastattn's counter for key ``j`` and queries ``4q .. 4q + 3`` of batch entry
``(b, h)`` is ``(j, q, h, b)``, its key the seed, and word ``i % 4`` decides query
``i``: kept iff ``word >= threshold`` with ``threshold = round(p * 2**32)``. Kept
probabilities are scaled by ``1 / (1 - p)``.

One counter serves four rows of a key's column, so the loop over a block's columns
computes one Philox per column for each quad of rows, branch-free, at the CPU's
vector width. ``reference.dropout`` computes the same words with NumPy.
"""

import numpy as np
from numba import njit

from fastattn.kernels.config import jit_helper
from fastattn.kernels.vector_math import cast_like, full_width_vectors

# Philox4x32 round multipliers and Weyl key increments.
# Everything is uint64 (Numba would turn uint64 mixed with int64 into floats).
PHILOX_M0, PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
PHILOX_W0, PHILOX_W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
PHILOX_ROUNDS = 10
WORD = np.uint64(0xFFFFFFFF)
SHIFT = np.uint64(32)


@njit(inline="always")
def philox_round(c0, c1, c2, c3, k0, k1):
    """One Philox4x32 round on uint64 words holding 32-bit values."""
    product0 = PHILOX_M0 * c0  # (hi0, lo0): a 64-bit product of 32-bit words
    product1 = PHILOX_M1 * c2
    return ((product1 >> SHIFT) ^ c1 ^ k0, product1 & WORD,
            (product0 >> SHIFT) ^ c3 ^ k1, product0 & WORD)


@njit(inline="always")
def philox10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counter ``(c0, c1, c2, c3)`` under key ``(k0, k1)``, the ten
    rounds written out (a loop-free body the column loop can vectorise)."""
    c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1)
    k0, k1 = (k0 + PHILOX_W0) & WORD, (k1 + PHILOX_W1) & WORD
    c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1)
    k0, k1 = (k0 + PHILOX_W0) & WORD, (k1 + PHILOX_W1) & WORD
    c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1)
    k0, k1 = (k0 + PHILOX_W0) & WORD, (k1 + PHILOX_W1) & WORD
    c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1)
    k0, k1 = (k0 + PHILOX_W0) & WORD, (k1 + PHILOX_W1) & WORD
    c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1)
    k0, k1 = (k0 + PHILOX_W0) & WORD, (k1 + PHILOX_W1) & WORD
    c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1)
    k0, k1 = (k0 + PHILOX_W0) & WORD, (k1 + PHILOX_W1) & WORD
    c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1)
    k0, k1 = (k0 + PHILOX_W0) & WORD, (k1 + PHILOX_W1) & WORD
    c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1)
    k0, k1 = (k0 + PHILOX_W0) & WORD, (k1 + PHILOX_W1) & WORD
    c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1)
    k0, k1 = (k0 + PHILOX_W0) & WORD, (k1 + PHILOX_W1) & WORD
    return philox_round(c0, c1, c2, c3, k0, k1)


@jit_helper
def philox_words(c0, c1, c2, c3, key0, key1):
    """The four 32-bit words of Philox4x32-10 for counter ``(c0, c1, c2, c3)`` and key
    ``(key0, key1)`` (each below ``2**32``), as int64."""
    w0, w1, w2, w3 = philox10(np.uint64(c0) & WORD, np.uint64(c1) & WORD,
                              np.uint64(c2) & WORD, np.uint64(c3) & WORD,
                              np.uint64(key0) & WORD, np.uint64(key1) & WORD)
    return np.int64(w0), np.int64(w1), np.int64(w2), np.int64(w3)


@jit_helper
def drop_in_place(block, row_start, key_start, entry, options):
    """Multiply ``block`` ``(rows, cols)`` by the dropout factor of query
    ``row_start + r`` and key ``key_start + c`` of batch entry ``entry`` (``(b, h) =
    divmod(entry, options.heads)``): 0 for a dropped probability, ``1 / (1 - p)`` for a
    kept one.

    ``options`` (the kernels' ``ScoreOptions``) carries ``dropout_seed_low``,
    ``dropout_seed_high`` (the seed's two 32-bit halves), ``dropout_threshold``
    (``round(p * 2**32)``) and ``dropout_keep_scale``. Rows go by quads of absolute
    positions ``4q .. 4q + 3`` (one counter per key and quad): the quad's words are
    computed into a small buffer, then applied row by row; a quad the block cuts is
    computed whole and only its rows inside the block are touched.
    """
    full_width_vectors()
    rows, cols = block.shape
    if rows == 0 or cols == 0:
        return
    batch = np.uint64(entry // options.heads) & WORD
    head = np.uint64(entry % options.heads) & WORD
    key0 = np.uint64(options.dropout_seed_low) & WORD
    key1 = np.uint64(options.dropout_seed_high) & WORD
    threshold = np.uint64(options.dropout_threshold)
    keep_scale = cast_like(options.dropout_keep_scale, block)
    zero = cast_like(0.0, block)
    words = np.empty((4, cols), np.uint32)  # a quad's words, one row of them per query
    for quad in range(row_start >> 2, ((row_start + rows - 1) >> 2) + 1):
        first = quad * 4 - row_start  # block row of the quad's query 4 * quad
        fill_quad_words(words, quad, key_start, head, batch, key0, key1)
        for lane in range(4):
            r = first + lane
            if 0 <= r < rows:  # all four but in a quad the block cuts
                for c in range(cols):
                    block[r, c] *= keep_scale if np.uint64(words[lane, c]) >= threshold else zero


@jit_helper
def fill_quad_words(words, quad, key_start, head, batch, key0, key1):
    """``words`` ``(4, cols)``: the Philox words of queries ``4 * quad + lane`` and keys
    ``key_start + c`` (a loop with no branch and no aliasing store: it vectorises)."""
    full_width_vectors()
    quad_word = np.uint64(quad) & WORD
    for c in range(words.shape[1]):
        w0, w1, w2, w3 = philox10(np.uint64(key_start + c) & WORD, quad_word, head, batch,
                                  key0, key1)
        words[0, c] = np.uint32(w0)
        words[1, c] = np.uint32(w1)
        words[2, c] = np.uint32(w2)
        words[3, c] = np.uint32(w3)


@jit_helper
def keep_factor(row, key, entry, options):
    """The dropout factor of one probability (see :func:`drop_in_place`), as a float."""
    words = philox_words(key, row >> 2, entry % options.heads, entry // options.heads,
                         options.dropout_seed_low, options.dropout_seed_high)
    return options.dropout_keep_scale if words[row & 3] >= options.dropout_threshold else 0.0
