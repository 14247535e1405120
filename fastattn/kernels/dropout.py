"""Attention dropout decisions from a counter-based generator (Philox4x32-10).

Each decision is a pure function of ``(seed, b, h, i, j)``: the forward and the
backward regenerate the same decisions without storing them, and they do not depend
on the thread count, the tiling or the dtype. Philox4x32-10 (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011; the generator of PyTorch's and
FlashAttention's dropout) maps a 128-bit counter and a 64-bit key to four 32-bit
words, eight 16-bit halves. fastattn's counter for key ``j`` and queries ``8o .. 8o +
7`` of batch entry ``(b, h)`` is ``(j, o, h, b)``, its key the seed; query ``i`` takes
half ``i % 8`` (word ``(i % 8) // 2``, low half for even ``i``) and its probability is
dropped iff that half is below ``threshold = min(round(p * 2**16), 2**16 - 1)``: the
drop probability is ``p`` rounded to a multiple of ``2**-16`` (at most ``7.7e-6``
off). Kept probabilities are scaled by ``1 / (1 - p)``.

One counter serves eight rows of a key's column: the loop over a block's columns
computes one Philox per column for each octet of rows, branch-free, at the CPU's
vector width (16-bit halves rather than whole words halve that work, as
FlashAttention's 8-bit ones quarter it at a coarser resolution).
``reference.dropout`` computes the same decisions with NumPy.
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
HALF = np.uint64(0xFFFF)
HALF_SHIFT = np.uint64(16)


@njit(inline="always")
def philox_round(c0, c1, c2, c3, k0, k1):
    """One Philox4x32 round on uint64 words holding 32-bit values."""
    product0 = PHILOX_M0 * c0  # (hi0, lo0): a 64-bit product of 32-bit words
    product1 = PHILOX_M1 * c2
    return ((product1 >> SHIFT) ^ c1 ^ k0, product1 & WORD,
            (product0 >> SHIFT) ^ c3 ^ k1, product0 & WORD)


@njit(inline="always")
def philox10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counter ``(c0, c1, c2, c3)`` under key ``(k0, k1)`` (the loop
    of ten rounds is unrolled by LLVM, leaving a loop-free body the column loop can
    vectorise)."""
    for _ in range(PHILOX_ROUNDS - 1):
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
    options.dropout_entries[entry]``, positions shifted by
    the options' offsets): 0 for a dropped probability, ``1 / (1 - p)`` for a kept one.

    ``options`` (the kernels' ``ScoreOptions``) carries ``dropout_seed_low``,
    ``dropout_seed_high`` (the seed's two 32-bit halves), ``dropout_threshold`` (the
    16-bit threshold) and ``dropout_keep_scale``. Rows go by octets of absolute
    positions ``8o .. 8o + 7`` (one counter per key and octet): the octet's halves are
    computed into a small buffer, then applied row by row; an octet the block cuts is
    computed whole and only its rows inside the block are touched.
    """
    full_width_vectors()
    rows, cols = block.shape
    if rows == 0 or cols == 0:
        return
    batch = np.uint64(options.dropout_entries[entry, 0]) & WORD
    head = np.uint64(options.dropout_entries[entry, 1]) & WORD
    row_start += options.dropout_row_offset  # the positions of the decisions
    key_start += options.dropout_key_offset
    key0 = np.uint64(options.dropout_seed_low) & WORD
    key1 = np.uint64(options.dropout_seed_high) & WORD
    threshold = np.uint16(options.dropout_threshold)
    keep_scale = cast_like(options.dropout_keep_scale, block)
    zero = cast_like(0.0, block)
    halves = np.empty((8, cols), np.uint16)  # an octet's decisions, one row per query
    for octet in range(row_start >> 3, ((row_start + rows - 1) >> 3) + 1):
        first = octet * 8 - row_start  # block row of the octet's query 8 * octet
        fill_octet_halves(halves, octet, key_start, head, batch, key0, key1)
        for lane in range(8):
            r = first + lane
            if 0 <= r < rows:  # all eight but in an octet the block cuts
                for c in range(cols):
                    block[r, c] *= keep_scale if halves[lane, c] >= threshold else zero


@jit_helper
def fill_octet_halves(halves, octet, key_start, head, batch, key0, key1):
    """``halves`` ``(8, cols)``: the Philox halves of queries ``8 * octet + lane`` and
    keys ``key_start + c`` (a loop with no branch and no aliasing store: it
    vectorises)."""
    full_width_vectors()
    octet_word = np.uint64(octet) & WORD
    for c in range(halves.shape[1]):
        w0, w1, w2, w3 = philox10(np.uint64(key_start + c) & WORD, octet_word, head, batch,
                                  key0, key1)
        halves[0, c] = np.uint16(w0 & HALF)
        halves[1, c] = np.uint16(w0 >> HALF_SHIFT)
        halves[2, c] = np.uint16(w1 & HALF)
        halves[3, c] = np.uint16(w1 >> HALF_SHIFT)
        halves[4, c] = np.uint16(w2 & HALF)
        halves[5, c] = np.uint16(w2 >> HALF_SHIFT)
        halves[6, c] = np.uint16(w3 & HALF)
        halves[7, c] = np.uint16(w3 >> HALF_SHIFT)


@jit_helper
def keep_factor(row, key, entry, options):
    """The dropout factor of one probability (see :func:`drop_in_place`), as a float."""
    row += options.dropout_row_offset
    key += options.dropout_key_offset
    words = philox_words(key, row >> 3, options.dropout_entries[entry, 1],
                         options.dropout_entries[entry, 0], options.dropout_seed_low,
                         options.dropout_seed_high)
    lane = row & 7
    half = (words[lane >> 1] >> (16 * (lane & 1))) & 0xFFFF
    return options.dropout_keep_scale if half >= options.dropout_threshold else 0.0


def dropout_threshold(dropout_p):
    """The 16-bit threshold of drop probability ``dropout_p`` (a half below it drops):
    ``min(round(p * 2**16), 2**16 - 1)``."""
    return min(round(dropout_p * 65536.0), 65535)
