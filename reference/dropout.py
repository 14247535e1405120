"""Attention dropout decisions in NumPy: Philox4x32-10, written to be read.

The same generator as the kernels' (:mod:`fastattn.kernels.dropout`), vectorised
over whole arrays of counters: the decision for query ``i`` and key ``j`` of batch
entry ``(b, h)`` is 16-bit half ``i % 8`` (of word ``(i % 8) // 2``, the low half for
even ``i``) of Philox4x32-10 at counter ``(j, i // 8, h, b)`` with the seed as key;
the probability is kept iff that half is ``>= min(round(p * 2**16), 2**16 - 1)``.
"""

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # round multipliers
W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # key increments
LOW32 = np.uint64(0xFFFFFFFF)
ROUNDS = 10


def philox4x32(counter, seed):
    """Philox4x32-10 of ``counter`` (four uint64 arrays holding 32-bit words, any
    common shape) under the 64-bit ``seed``: four uint64 arrays of 32-bit words."""
    c0, c1, c2, c3 = (np.asarray(word, np.uint64) & LOW32 for word in counter)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(ROUNDS):
        product0, product1 = M0 * c0, M1 * c2  # 64-bit products of 32-bit words
        c0, c1, c2, c3 = ((product1 >> np.uint64(32)) ^ c1 ^ k0, product1 & LOW32,
                          (product0 >> np.uint64(32)) ^ c3 ^ k1, product0 & LOW32)
        k0, k1 = (k0 + W0) & LOW32, (k1 + W1) & LOW32
    return c0, c1, c2, c3


def threshold(p):
    """The 16-bit threshold of drop probability ``p``: ``min(round(p * 2**16), 2**16 - 1)``."""
    return min(int(round(p * 65536.0)), 65535)


def keep_mask(seed, p, batch_index, head_index, rows, keys):
    """Whether each probability ``(N, Lq, Lk)`` is kept under dropout ``p``, for batch
    entries ``(batch_index[n], head_index[n])`` ``(N,)``, queries at positions ``rows``
    ``(Lq,)`` and keys at ``keys`` ``(Lk,)``."""
    b = np.asarray(batch_index, np.uint64)[:, None, None]  # (N, 1, 1)
    h = np.asarray(head_index, np.uint64)[:, None, None]  # (N, 1, 1)
    rows = np.asarray(rows, np.uint64)[None, :, None]  # (1, Lq, 1)
    keys = np.asarray(keys, np.uint64)[None, None, :]  # (1, 1, Lk)
    shape = (b.shape[0], rows.shape[1], keys.shape[2])
    counter = [np.broadcast_to(word, shape) for word in (keys, rows >> np.uint64(3), h, b)]
    words = np.stack(philox4x32(counter, seed), axis=-1)  # (N, Lq, Lk, 4)
    lane = rows % np.uint64(8)  # (1, Lq, 1) which 16-bit half of the four words
    word_index = np.broadcast_to((lane >> np.uint64(1)).astype(np.intp), shape)  # (N, Lq, Lk)
    chosen = np.take_along_axis(words, word_index[..., None], axis=-1)[..., 0]  # (N, Lq, Lk)
    half = (chosen >> (np.uint64(16) * (lane & np.uint64(1)))) & np.uint64(0xFFFF)  # (N, Lq, Lk)
    return half >= np.uint64(threshold(p))  # (N, Lq, Lk)


def dropout_factors(problem):
    """The factor each probability ``(*batch, Lq, Lk)`` of ``problem`` is multiplied
    by: ``1 / (1 - p)`` where kept, 0 where dropped; the scalar 1.0 without dropout."""
    if problem.dropout_p == 0.0:
        return 1.0
    batch, head, row_offset, key_offset = problem.options.dropout_positions(
        problem.batch_shape, problem.heads)  # (N,), (N,), int, int
    kept = keep_mask(problem.dropout_seed, problem.dropout_p, batch, head,
                     row_offset + np.arange(problem.q_len),
                     key_offset + np.arange(problem.kv_len))  # (N, Lq, Lk)
    kept = kept.reshape(problem.batch_shape + (problem.q_len, problem.kv_len))  # (*batch, Lq, Lk)
    return np.where(kept, 1.0 / (1.0 - problem.dropout_p), 0.0)  # (*batch, Lq, Lk)
