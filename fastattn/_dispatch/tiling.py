"""How the kernels tile a call: block sizes, key spans and key groups, from the shape alone.

Every choice here depends on the problem's shape, never on the thread count, so
results are bitwise identical however many threads run.
"""

import functools

# Forward: keys per inner block, and the most query rows per prange task. Large
# blocks keep the two BLAS products per block efficient; see choose_block_q for
# smaller ones.
FORWARD_BLOCK_K = 512
FORWARD_BLOCK_Q = 256
# Fewest prange tasks a forward call should offer before query blocks are made smaller.
FORWARD_MIN_TASKS = 16
# Below this many multiply-adds per matrix product no BLAS starts threads of its own
# (OpenBLAS's threshold is 4x larger), so tiny calls skip the BLAS thread switch.
SERIAL_BLAS_WORK = 65536

# Backward: rows and keys per block.
BACKWARD_BLOCK_Q = 256
BACKWARD_BLOCK_K = 256
# Fewest parallel tasks a backward call should offer; the keys are cut into up to
# this many groups, each adding its share of dQ into a buffer of its own, to reach
# it. Each extra group costs one more dQ-sized buffer, fresh memory on every call,
# so this is kept lower than the forward's (B=1, H=8, L=512: 16 -> 8 took a backward
# call from about 16 to 9 ms, most of the difference spent in page faults).
BACKWARD_MIN_TASKS = 8


@functools.lru_cache(maxsize=256)
def forward_plan(n_batch, q_len, kv_len, head_dim, value_dim, return_weights, block_size=None):
    """How the forward kernel tiles a call, from its shape alone (cached, so repeated
    shapes skip it): ``((block_q, block_k), split_len, n_splits, blas_threads)``.

    ``block_size`` is a block mask's ``(block_q, block_k)`` (the kernels then work in
    its tiles), else None: ``choose_block_q`` and ``FORWARD_BLOCK_K``. Keys are split into
    spans of ``split_len`` (:func:`choose_split_len`), unless the weights are returned
    (they need each row's whole softmax in one task). ``blas_threads``: whether a
    block product is large enough for BLAS to thread (see :data:`SERIAL_BLAS_WORK`).
    """
    block_q, block_k = block_size or (choose_block_q(n_batch, q_len), FORWARD_BLOCK_K)
    split_len = kv_len
    if not return_weights:
        split_len = choose_split_len(n_batch * -(-q_len // block_q), kv_len, block_k)
    split_len = max(split_len, 1)  # keys per span; the kernel reads the count off split_out
    n_splits = max(1, -(-kv_len // split_len))
    largest_product = block_q * min(kv_len, block_k) * max(head_dim, value_dim)
    return ((block_q, block_k), split_len, n_splits,
            largest_product > SERIAL_BLAS_WORK)


def choose_split_len(n_tasks, kv_len, block_k=FORWARD_BLOCK_K):
    """Keys per span when a call's ``n_tasks`` query blocks are fewer than
    ``FORWARD_MIN_TASKS``: the keys are cut into spans of whole ``block_k`` blocks so that
    query blocks x spans reaches ``FORWARD_MIN_TASKS`` (decoding one token against a long
    cache, say), and the spans' results are merged by their log-sum-exp. Returns
    ``kv_len`` (no split) when the call has enough tasks or too few keys. Depends on
    the shape only, so results are bitwise identical for every thread count."""
    n_key_blocks = -(-kv_len // block_k)
    if n_tasks >= FORWARD_MIN_TASKS or n_key_blocks < 2:
        return kv_len
    wanted_splits = -(-FORWARD_MIN_TASKS // max(n_tasks, 1))
    return max(1, n_key_blocks // wanted_splits) * block_k


def choose_block_q(n_batch, q_len):
    """Query rows per task: ``FORWARD_BLOCK_Q``, halved (down to 16) until the call has
    ``FORWARD_MIN_TASKS`` tasks. Depends on the shape only, never on the thread count, so
    results are bitwise identical however many threads run."""
    block_q = FORWARD_BLOCK_Q
    while block_q > 16 and n_batch * -(-q_len // block_q) < FORWARD_MIN_TASKS:
        block_q //= 2
    return block_q


def choose_key_groups(n_batch, kv_len, block_k=BACKWARD_BLOCK_K):
    """Key groups per batch entry: enough for ``BACKWARD_MIN_TASKS`` tasks, at most one per key
    block of ``block_k``. Depends on the shape only, never on the thread count."""
    n_key_blocks = -(-kv_len // block_k)
    return max(1, min(-(-BACKWARD_MIN_TASKS // max(n_batch, 1)), n_key_blocks))


# Decode: the streaming kernel (fastattn.kernels.decode) takes calls of at most this
# many query rows per batch entry, where the forward kernel's packed block products
# cost a pass over keys and values of their own. Measured (H=32, D=128, float32, 2
# threads, Zen 3, its time over the forward kernel's, Lk 512 / 4096): 4 rows
# 0.41 / 0.42, 8 rows 0.60 / 0.54, 16 rows 1.02 / 0.93, 32 rows 1.44 / 1.47.
DECODE_MAX_ROWS = 8
# Keys per block of the decode kernel (its scores are one (rows, block) buffer):
# 256 took 5-15% less time than 32 or 64 (one row and four), as much as 512 or 1024.
DECODE_BLOCK_K = 256
# Fewest tasks (batch entries x key spans) a decode call should offer, and the fewest
# keys a span may hold: a span's merge costs a pass over its (rows, Dv) output.
DECODE_MIN_TASKS = 16
DECODE_MIN_SPAN = 512


@functools.lru_cache(maxsize=256)
def decode_plan(n_batch, kv_len):
    """How the decode kernel tiles a call, from its shape alone (cached):
    ``(block_k, span_len, n_spans)``. The keys of each batch entry are cut into
    spans of whole ``DECODE_BLOCK_K`` blocks, of at least ``DECODE_MIN_SPAN`` keys,
    until entries x spans reaches ``DECODE_MIN_TASKS`` (one span more where the
    blocks do not divide evenly, the last one short); never by thread count, so
    results are bitwise identical however many threads run."""
    n_blocks = max(-(-kv_len // DECODE_BLOCK_K), 1)
    most_spans = max(kv_len // DECODE_MIN_SPAN, 1)
    n_spans = min(-(-DECODE_MIN_TASKS // max(n_batch, 1)), most_spans)
    span_len = max(n_blocks // n_spans, 1) * DECODE_BLOCK_K  # whole blocks per span
    n_spans = max(-(-kv_len // span_len), 1)
    return DECODE_BLOCK_K, span_len, n_spans


# Decode calls reading fewer bytes of keys and values than this run on one thread:
# waking a second one costs more than it saves. Measured (B=1, Hq=8 over Hkv=2, D=64,
# float32, Zen 3, 2 cores; each call after a pause, 1 and 2 threads alternating, time
# at 2 threads over 1): after a 0.3 ms sleep 64 KiB 2.19, 128 KiB 5.53, 256 KiB 2.91,
# 512 KiB 0.92, 1 MiB 0.82; after PyTorch products on 2 threads (a model's linear
# layers) 0.97, 0.97, 0.92, 0.81, 0.88. The forward
# kernel showed no such loss (16-256 queries: 0.58-1.02), so it keeps every thread.
# In a transformers model decoding (Llama-style, Hq=8 over Hkv=2, D=64, about 1 MiB of
# keys and values per layer call) one thread did not pay either: 7.92 ms a token
# against 7.75 at 2 threads, the other work the same (6.68, 6.67 ms;
# asv_benchmarks/hf_decode.py).
DECODE_SERIAL_BYTES = 512 * 1024


def decode_threads(kv_bytes, threads):
    """Threads a decode call reading ``kv_bytes`` of keys and values runs on, out of
    the ``threads`` it may use: one below :data:`DECODE_SERIAL_BYTES`, else all."""
    return 1 if kv_bytes < DECODE_SERIAL_BYTES else threads
