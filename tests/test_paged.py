"""KV caches for decoding: fastattn.paged_attention (fastattn.kernels.paged) and
fastattn.KVCache, against the float64 reference over gathered pages
(reference/paged.py), on awkward shapes."""

import tracemalloc

import numpy as np
import pytest
from conftest import TOLERANCE

import fastattn
import reference
from fastattn._dispatch import paged_run, tiling
from reference.paged import gather_pages, paged_attention as reference_paged

OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window=(5, 0), causal=True),
    "window-both-sides": dict(window=(2, 3)),
    "softcap-scale": dict(softcap=2.0, scale=0.3),
}


def paged_inputs(rng, seq_lens, q_len, heads, kv_heads, page_size, head_dim=16, value_dim=None,
                 spare_pages=3, dtype=np.float64):
    """A pool holding every sequence's pages in shuffled order (plus spare pages never
    used), its block table (padded with -1) and queries ``(B, H, Lq, D)``."""
    value_dim = head_dim if value_dim is None else value_dim
    seq_lens = np.asarray(seq_lens)
    pages_needed = -(-seq_lens // page_size)  # (B,)
    max_pages = int(pages_needed.max()) + 1
    n_pages = int(pages_needed.sum()) + spare_pages
    order = rng.permutation(n_pages)  # physical page of each (sequence, logical page)
    table = np.full((len(seq_lens), max_pages), -1, np.int32)  # (B, max_pages)
    taken = 0
    for b, count in enumerate(pages_needed):
        table[b, :count] = order[taken:taken + count]
        taken += count
    k_pages = rng.standard_normal((n_pages, page_size, kv_heads, head_dim)).astype(dtype)
    v_pages = rng.standard_normal((n_pages, page_size, kv_heads, value_dim)).astype(dtype)
    q = rng.standard_normal((len(seq_lens), heads, q_len, head_dim)).astype(dtype)
    return q, k_pages, v_pages, table, seq_lens


def assert_matches_reference(q, k_pages, v_pages, table, seq_lens, **options):
    out, lse = fastattn.paged_attention(q, k_pages, v_pages, table, seq_lens, return_lse=True,
                                        **options)
    want_out, want_lse = reference_paged(*(np.asarray(a, np.float64)
                                           for a in (q, k_pages, v_pages)),
                                         table, seq_lens, return_lse=True, **options)
    tolerance = TOLERANCE[out.dtype]
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    np.testing.assert_allclose(out, want_out, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(lse, want_lse, rtol=tolerance, atol=tolerance)
    return out, lse


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("q_len", [1, 3, tiling.DECODE_MAX_ROWS + 1])
@pytest.mark.parametrize("heads, kv_heads", [(3, 3), (8, 2)], ids=["MHA", "GQA"])
@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_matches_reference(rng, dtype, options, q_len, heads, kv_heads, page_size):
    """Sequences of Lq tokens (nothing before them), a partly filled last page, a
    full last page, a longer one; shuffled tables padded with -1."""
    pages_of_queries = -(-q_len // page_size)
    seq_lens = [q_len, (pages_of_queries + 1) * page_size + 1,
                (pages_of_queries + 2) * page_size, 37]
    assert_matches_reference(*paged_inputs(rng, seq_lens, q_len, heads, kv_heads, page_size,
                                           dtype=dtype), **options)


@pytest.mark.parametrize("q_len", [1, 20])
@pytest.mark.parametrize("page_size", [16, 300])
def test_long_sequences_split_into_spans(rng, q_len, page_size):
    """Thousands of keys for one sequence: key spans (decode_plan), blocks cut at
    pages and at DECODE_BLOCK_K within a page; Dv != Dk."""
    seq_lens = [tiling.DECODE_BLOCK_K * 9 + 7, 700]
    assert_matches_reference(*paged_inputs(rng, seq_lens, q_len, 4, 2, page_size, head_dim=8,
                                           value_dim=12, dtype=np.float32), causal=True)


def test_results_are_the_same_bits_for_every_thread_count(rng):
    inputs = paged_inputs(rng, [3000, 2500, 1000], 1, 8, 2, 16, dtype=np.float32)
    assert 3 * 2 * 3000 >= paged_run.SERIAL_KEYS  # the threaded path
    results = []
    threads = fastattn.get_num_threads()
    for count in (1, threads):
        fastattn.set_num_threads(count)
        try:
            results.append(fastattn.paged_attention(*inputs, return_lse=True))
        finally:
            fastattn.set_num_threads(threads)
    for first, second in zip(*results):
        np.testing.assert_array_equal(first, second)


def test_gqa_decoding_equals_contiguous_attention(rng):
    """Decoding over pages gives what the contiguous kernels give on the gathered
    keys (float32, within the contract's tolerance)."""
    q, k_pages, v_pages, table, seq_lens = paged_inputs(rng, [40, 17], 1, 8, 2, 4,
                                                        dtype=np.float32)
    out = fastattn.paged_attention(q, k_pages, v_pages, table, seq_lens)
    for b, seq_len in enumerate(seq_lens):
        keys = gather_pages(k_pages, table[b], seq_len)  # (Hkv, L, D)
        values = gather_pages(v_pages, table[b], seq_len)
        want = fastattn.scaled_dot_product_attention(q[b], keys, values, enable_gqa=True)
        np.testing.assert_allclose(out[b], want, rtol=2e-5, atol=2e-5)


def test_pages_are_read_in_place(rng):
    """Extra memory of a call (traced peak) stays far below the pool's size: the
    pages are never gathered or copied."""
    q, k_pages, v_pages, table, seq_lens = paged_inputs(rng, [2000, 1500], 1, 4, 2, 16,
                                                        head_dim=64, dtype=np.float32)
    fastattn.paged_attention(q, k_pages, v_pages, table, seq_lens)  # compiled
    tracemalloc.start()
    try:
        fastattn.paged_attention(q, k_pages, v_pages, table, seq_lens)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.1 * k_pages.nbytes, (peak, k_pages.nbytes)


def test_empty_sizes(rng):
    q, k_pages, v_pages, table, seq_lens = paged_inputs(rng, [4, 6], 0, 2, 1, 4)
    out, lse = fastattn.paged_attention(q, k_pages, v_pages, table, seq_lens, return_lse=True)
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0)
    out = fastattn.paged_attention(q[:0], k_pages, v_pages, table[:0], seq_lens[:0])
    assert out.shape == (0, 2, 0, 16)


def test_errors_name_the_argument(rng):
    q, k_pages, v_pages, table, seq_lens = paged_inputs(rng, [5, 9], 2, 4, 2, 4)
    call = fastattn.paged_attention
    bad_table = table.copy()
    bad_table[1, 2] = k_pages.shape[0]  # the last page sequence 1 uses
    with pytest.raises(ValueError, match=r"block_table\[1, 2\]"):
        call(q, k_pages, v_pages, bad_table, seq_lens)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 17.*16 tokens its row"):
        call(q, k_pages, v_pages, table, [5, 17])
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 1 must count the Lq = 2"):
        call(q, k_pages, v_pages, table, [1, 9])
    with pytest.raises(ValueError, match="seq_lens must have shape"):
        call(q, k_pages, v_pages, table, [5, 9, 9])
    with pytest.raises(TypeError, match="block_table must hold integers"):
        call(q, k_pages, v_pages, table.astype(float), seq_lens)
    with pytest.raises(ValueError, match="multiple of the pages' 2 kv heads"):
        call(q[:, :3], k_pages, v_pages, table, seq_lens)
    with pytest.raises(ValueError, match="value_pages"):
        call(q, k_pages, v_pages[:, :2], table, seq_lens)
    with pytest.raises(ValueError, match="head size"):
        call(q[..., :8], k_pages, v_pages, table, seq_lens)
    with pytest.raises(ValueError, match="causal_alignment must be 'bottom_right'"):
        call(q, k_pages, v_pages, table, seq_lens, causal=True, causal_alignment="top_left")
    with pytest.raises(NotImplementedError, match="does not take kv_lengths="):
        call(q, k_pages, v_pages, table, seq_lens, kv_lengths=[1, 2])
    for implementation in (fastattn.paged_attention, reference_paged):  # one contract
        with pytest.raises(ValueError, match="block_table"):
            implementation(q, k_pages, v_pages, bad_table, seq_lens)


# ---------------------------------------------------------------- KVCache

def append_in_steps(cache, keys, values, steps, lengths):
    """Append ``keys``/``values`` ``(B, Hkv, n, D)`` in chunks of ``steps`` tokens,
    sequence ``b`` taking its first ``lengths[b]`` tokens."""
    start = 0
    for step in steps:
        counts = np.clip(np.asarray(lengths) - start, 0, step)
        cache.append(keys[:, :, start:start + step], values[:, :, start:start + step],
                     lengths=counts)
        start += step


class SmallStartCache(fastattn.KVCache):
    """Without a capacity, room for 8 tokens at first: the tests grow it a few times."""

    INITIAL_CAPACITY = 8


@pytest.mark.parametrize("page_size", [None, 1, 4, 7])
@pytest.mark.parametrize("capacity", [None, 30])
@pytest.mark.parametrize("q_len", [1, 4])
def test_cache_attends_to_what_each_sequence_holds(rng, page_size, capacity, q_len):
    """Appends of different sizes and per-sequence lengths (growing past the
    initial capacity when it is not fixed), then attention of the last ``q_len``
    tokens of each sequence against the reference on the appended tokens."""
    batch, kv_heads, heads, head_dim, total = 3, 2, 4, 8, 30
    keys, values = rng.standard_normal((2, batch, kv_heads, total, head_dim)).astype(np.float32)
    lengths = np.array([30, q_len, 17])
    cache = SmallStartCache(batch, kv_heads, head_dim, capacity=capacity, page_size=page_size)
    append_in_steps(cache, keys, values, [5, 1, 1, 13, 10], lengths)
    np.testing.assert_array_equal(cache.lengths, lengths)
    q = rng.standard_normal((batch, heads, q_len, head_dim)).astype(np.float32)
    out, lse = cache.attend(q, return_lse=True)
    for b, length in enumerate(lengths):
        want_out, want_lse = reference.scaled_dot_product_attention(
            q[b].astype(np.float64), keys[b, :, :length].astype(np.float64),
            values[b, :, :length].astype(np.float64), causal=True,
            causal_alignment="bottom_right", enable_gqa=True, return_lse=True)
        np.testing.assert_allclose(out[b], want_out, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(lse[b], want_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("page_size", [None, 16])
def test_cache_with_a_capacity_never_moves_what_it_holds(rng, page_size):
    cache = fastattn.KVCache(2, 2, 8, capacity=64, page_size=page_size)
    storage = cache._key_pages if page_size else cache._keys
    token = rng.standard_normal((2, 2, 1, 8))
    for _ in range(64):
        cache.append(token, token)
    assert (cache._key_pages if page_size else cache._keys) is storage
    with pytest.raises(ValueError, match="capacity=64"):
        cache.append(token, token)


@pytest.mark.parametrize("page_size", [None, 3])
def test_cache_one_token_at_a_time_equals_all_at_once(rng, page_size):
    keys, values = rng.standard_normal((2, 2, 3, 20, 8))
    stepped = fastattn.KVCache(2, 3, 8, page_size=page_size, dtype=np.float64)
    for t in range(20):
        stepped.append(keys[:, :, t:t + 1], values[:, :, t:t + 1])
    whole = fastattn.KVCache(2, 3, 8, page_size=page_size, dtype=np.float64)
    whole.append(keys, values)
    q = rng.standard_normal((2, 6, 2, 8))
    np.testing.assert_array_equal(stepped.attend(q), whole.attend(q))


def test_cache_errors(rng):
    cache = fastattn.KVCache(2, 2, 8, page_size=4)
    with pytest.raises(ValueError, match="k must be"):
        cache.append(np.zeros((2, 3, 1, 8)), np.zeros((2, 3, 1, 8)))
    with pytest.raises(ValueError, match="lengths must lie in"):
        cache.append(np.zeros((2, 2, 1, 8)), np.zeros((2, 2, 1, 8)), lengths=[2, 0])
    cache.append(np.zeros((2, 2, 1, 8)), np.zeros((2, 2, 1, 8)), lengths=[1, 0])
    with pytest.raises(ValueError, match="seq_lens"):  # sequence 1 holds no token
        cache.attend(np.zeros((2, 2, 1, 8)))
    with pytest.raises(ValueError, match="page_size must be an int >= 1"):
        fastattn.KVCache(2, 2, 8, page_size=0)
    with pytest.raises(TypeError, match="dtype must be"):
        fastattn.KVCache(2, 2, 8, dtype=np.int32)


ml_dtypes = pytest.importorskip("ml_dtypes")


@pytest.mark.parametrize("dtype", [np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)],
                         ids=["bfloat16", "float16"])
@pytest.mark.parametrize("page_size", [None, 16])
def test_16_bit_caches_are_read_as_stored(rng, dtype, page_size):
    """A 16-bit cache: results in its dtype, one 16-bit rounding away from the float64
    attention of the stored (rounded) values; lse float32."""
    keys, values = rng.standard_normal((2, 2, 2, 300, 32)).astype(np.float32)
    cache = fastattn.KVCache(2, 2, 32, page_size=page_size, dtype=dtype)
    cache.append(keys, values, lengths=[300, 123])
    q = rng.standard_normal((2, 8, 2, 32)).astype(np.float32)
    out, lse = cache.attend(q, return_lse=True)
    assert out.dtype == dtype and lse.dtype == np.float32
    for b, length in enumerate((300, 123)):
        want_out, want_lse = reference.scaled_dot_product_attention(
            *(a.astype(dtype).astype(np.float64) for a in (q[b], keys[b, :, :length],
                                                           values[b, :, :length])),
            causal=True, causal_alignment="bottom_right", enable_gqa=True, return_lse=True)
        step = 2.0 ** -7 if dtype != np.float16 else 2.0 ** -10
        bound = step * np.abs(want_out) + 2e-5
        assert np.all(np.abs(out[b].astype(np.float64) - want_out) <= bound)
        np.testing.assert_allclose(lse[b], want_lse, rtol=2e-5, atol=2e-5)
