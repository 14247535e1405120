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


def keep_mask(seed, p, batch_shape, q_len, kv_len, heads):
    """Whether each probability ``(*batch, Lq, Lk)`` is kept under dropout ``p``.

    Batch entry ``n`` of the flattened batch is ``(b, h) = divmod(n, heads)`` (the
    convention of the score functions).
    """
    n_batch = int(np.prod(batch_shape, dtype=np.int64))
    entry = np.arange(n_batch, dtype=np.uint64)[:, None, None]  # (N, 1, 1)
    rows = np.arange(q_len, dtype=np.uint64)[None, :, None]  # (1, Lq, 1)
    keys = np.arange(kv_len, dtype=np.uint64)[None, None, :]  # (1, 1, Lk)
    b, h = entry // np.uint64(heads), entry % np.uint64(heads)  # (N, 1, 1) each
    shape = (n_batch, q_len, kv_len)
    counter = [np.broadcast_to(word, shape) for word in (keys, rows >> np.uint64(3), h, b)]
    words = np.stack(philox4x32(counter, seed), axis=-1)  # (N, Lq, Lk, 4)
    lane = rows % np.uint64(8)  # (1, Lq, 1) which 16-bit half of the four words
    word_index = np.broadcast_to((lane >> np.uint64(1)).astype(np.intp), shape)  # (N, Lq, Lk)
    chosen = np.take_along_axis(words, word_index[..., None], axis=-1)[..., 0]  # (N, Lq, Lk)
    half = (chosen >> (np.uint64(16) * (lane & np.uint64(1)))) & np.uint64(0xFFFF)  # (N, Lq, Lk)
    return (half >= np.uint64(threshold(p))).reshape(tuple(batch_shape) + (q_len, kv_len))


def dropout_factors(problem):
    """The factor each probability ``(*batch, Lq, Lk)`` of ``problem`` is multiplied
    by: ``1 / (1 - p)`` where kept, 0 where dropped; the scalar 1.0 without dropout."""
    if problem.dropout_p == 0.0:
        return 1.0
    kept = keep_mask(problem.dropout_seed, problem.dropout_p, problem.batch_shape,
                     problem.q_len, problem.kv_len, problem.heads)  # (*batch, Lq, Lk)
    return np.where(kept, 1.0 / (1.0 - problem.dropout_p), 0.0)  # (*batch, Lq, Lk)
