"""The streaming decode kernel (fastattn.kernels.decode): few query rows against a
long cache, against the float64 NumPy reference, and its dispatch by shape."""

import numba
import numpy as np
import pytest
from conftest import TOLERANCE, assert_close_to_reference, random_inputs

import fastattn
import fastattn._dispatch.run as run
import reference
from fastattn._dispatch import tiling
from fastattn._dispatch.tiling import DECODE_BLOCK_K as BLOCK_K, decode_plan

DTYPES = [np.float32, np.float64]
# Awkward key counts: 1, one below, at and one past a block, and past 16 blocks.
KV_LENGTHS = [1, BLOCK_K - 1, BLOCK_K, BLOCK_K + 1, 4097]
OPTIONS = {
    "plain": {},
    "causal-bottom-right": dict(causal=True, causal_alignment="bottom_right"),
    "causal-top-left": dict(causal=True),
    "window": dict(window=(BLOCK_K + 3, 0), causal=True, causal_alignment="bottom_right"),
    "softcap-scale": dict(softcap=3.0, scale=0.7),
    "kv-lengths": dict(kv_lengths=[BLOCK_K - 3, 0, 1]),
}


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts the calls of the decode kernel (each call's dtype)."""
    calls = []
    getter = run.decode_kernel

    def counting(dtype):
        calls.append(np.dtype(dtype))
        return getter(dtype)
    monkeypatch.setattr(run, "decode_kernel", counting)
    return calls


@pytest.fixture
def without_decode_kernel(monkeypatch):
    """Every call goes to the forward kernel."""
    monkeypatch.setattr(tiling, "DECODE_MAX_ROWS", 0)


@pytest.mark.parametrize("n_batch", [1, 3, 16, 64])
@pytest.mark.parametrize("kv_len", [0, 1, BLOCK_K + 1, 4097, 100_000])
def test_plan_spans_are_whole_blocks_and_cover_the_keys(n_batch, kv_len):
    block_k, span_len, n_spans = decode_plan(n_batch, kv_len)
    assert block_k == BLOCK_K
    assert span_len % block_k == 0 and span_len > 0
    assert (n_spans - 1) * span_len < max(kv_len, 1) <= n_spans * span_len
    assert n_spans == 1 or span_len >= tiling.DECODE_MIN_SPAN
    wanted = -(-tiling.DECODE_MIN_TASKS // n_batch)
    assert n_spans <= 2 * max(wanted, 1) + 1  # spans of whole blocks: up to twice as many
    assert n_spans >= min(wanted, kv_len // tiling.DECODE_MIN_SPAN) or n_spans == 1


@pytest.mark.parametrize("q_len, options, return_weights, expected", [
    (1, {}, False, True),
    (8, dict(causal=True, causal_alignment="bottom_right", kv_lengths=[5, 9]), False, True),
    (3, dict(softcap=2.0, window=(4, 2)), False, True),
    (9, {}, False, False),  # more rows than the decode kernel takes
    (1, {}, True, False),  # weights asked for
    (1, dict(bias=np.zeros((1, 40))), False, False),
    (1, dict(alibi_slopes=np.ones(3)), False, False),
    (1, dict(mask=np.ones((1, 40), bool)), False, False),
])
def test_dispatch_by_shape_and_options(rng, decode_calls, q_len, options, return_weights,
                                       expected):
    query, key, value = random_inputs(rng, (2, 3, q_len, 8), (2, 3, 40, 8))
    options = dict(options)
    mask = options.pop("mask", None)
    fastattn.scaled_dot_product_attention(query, key, value, mask,
                                          return_weights=return_weights, **options)
    assert bool(decode_calls) == expected


def test_grouped_query_decoding_folds_into_rows(rng, decode_calls):
    """Under GQA a group's query heads become the rows of one decode task."""
    query, key, value = random_inputs(rng, (2, 8, 1, 16), (2, 2, 300, 16))
    assert_close_to_reference(query, key, value, enable_gqa=True, return_lse=True)
    assert decode_calls == [np.dtype(np.float64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_len", KV_LENGTHS)
@pytest.mark.parametrize("q_len", [1, 2, 3, 5, 8])
def test_lengths_around_blocks(rng, decode_calls, q_len, kv_len, dtype):
    query, key, value = random_inputs(rng, (3, 2, q_len, 16), (3, 2, kv_len, 16), 12, dtype)
    assert_close_to_reference(query, key, value, return_lse=True)
    for alignment in ("top_left", "bottom_right"):
        assert_close_to_reference(query, key, value, causal=True, causal_alignment=alignment,
                                  return_lse=True)
    assert decode_calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_len", [BLOCK_K + 1, 4097])
@pytest.mark.parametrize("q_len", [1, 4, 8])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_options(rng, decode_calls, option, q_len, kv_len, dtype):
    query, key, value = random_inputs(rng, (3, 2, q_len, 32), (3, 2, kv_len, 32), 8, dtype)
    out, lse = assert_close_to_reference(query, key, value, return_lse=True, **OPTIONS[option])
    assert decode_calls
    if option == "kv-lengths":  # entry 1 sees no key: output 0, lse -inf
        assert (out[1] == 0).all() and (lse[1] == -np.inf).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, q_len", [(8, 2, 1), (32, 8, 1), (16, 2, 1),
                                                    (32, 2, 1), (8, 2, 3)])
def test_grouped_query_attention(rng, decode_calls, heads, kv_heads, q_len, dtype):
    """GQA decoding (folded into up to 8 rows, or more rows than that on the forward
    kernel) and GQA with a few draft tokens (not folded: each head its own task)."""
    query, key, value = random_inputs(rng, (2, heads, q_len, 32), (2, kv_heads, 1500, 32),
                                      dtype=dtype)
    for options in ({}, dict(causal=True, causal_alignment="bottom_right", softcap=5.0),
                     dict(kv_lengths=[700, 3])):
        assert_close_to_reference(query, key, value, enable_gqa=True, return_lse=True,
                                  **options)
    assert bool(decode_calls) == (q_len > 1 or heads // kv_heads <= tiling.DECODE_MAX_ROWS)


def test_float16_inputs(rng):
    query, key, value = random_inputs(rng, (2, 4, 2, 16), (2, 4, 700, 16), dtype=np.float16)
    out, lse = assert_close_to_reference(query, key, value, return_lse=True)
    assert out.dtype == np.float16 and lse.dtype == np.float32  # lse in the compute dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_agrees_with_the_forward_kernel(rng, option, dtype, monkeypatch):
    """The decode kernel and the forward kernel (with its own key spans) agree to a few
    rounding steps, on shapes both split into spans."""
    query, key, value = random_inputs(rng, (3, 2, 4, 16), (3, 2, 3000, 16), 8, dtype)
    decoded = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                    **OPTIONS[option])
    monkeypatch.setattr(tiling, "DECODE_MAX_ROWS", 0)
    forward = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                    **OPTIONS[option])
    for got, want in zip(decoded, forward):
        np.testing.assert_allclose(got, want, rtol=10 * TOLERANCE[np.dtype(dtype)],
                                   atol=10 * TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("shape", [(1, 2, 1, 5000), (2, 16, 4, 700), (1, 1, 8, 3)])
def test_bitwise_identical_for_every_thread_count(rng, decode_calls, shape):
    batch, heads, q_len, kv_len = shape
    query, key, value = random_inputs(rng, (batch, heads, q_len, 64),
                                      (batch, heads, kv_len, 64), dtype=np.float32)
    previous = fastattn.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            fastattn.set_num_threads(threads)
            results.append(fastattn.scaled_dot_product_attention(
                query, key, value, causal=True, causal_alignment="bottom_right",
                return_lse=True))
    finally:
        fastattn.set_num_threads(previous)
    assert decode_calls
    for one, two in zip(*results):
        assert one.tobytes() == two.tobytes()


@pytest.mark.parametrize("kv_len", [3, 2000])
def test_small_calls_run_on_the_calling_thread(rng, monkeypatch, kv_len):
    """Below DECODE_SERIAL_BYTES of keys and values a decode call runs on one thread
    (one scratch slot), above it on every thread; the thread count the caller set is
    kept, and the results match the reference."""
    query, key, value = random_inputs(rng, (1, 8, 1, 64), (1, 2, kv_len, 64),
                                      dtype=np.float32)
    small = key.nbytes + value.nbytes < tiling.DECODE_SERIAL_BYTES
    seen = []
    getter = run.decode_kernel

    def recording(dtype):
        kernel = getter(dtype)

        def call(*arguments):
            seen.append((arguments[3].slots, numba.get_num_threads()))
            return kernel(*arguments)
        return call
    monkeypatch.setattr(run, "decode_kernel", recording)
    previous = fastattn.get_num_threads()
    try:
        fastattn.set_num_threads(2)
        out = fastattn.scaled_dot_product_attention(
            query, key, value, enable_gqa=True, causal=True, causal_alignment="bottom_right")
        assert fastattn.get_num_threads() == 2
    finally:
        fastattn.set_num_threads(previous)
    assert seen == ([(1, 1)] if small else [(2, 2)])
    expected = reference.scaled_dot_product_attention(
        query.astype(np.float64), key.astype(np.float64), value.astype(np.float64),
        enable_gqa=True, causal=True, causal_alignment="bottom_right")
    np.testing.assert_allclose(out, expected, rtol=TOLERANCE[np.dtype(np.float32)],
                               atol=TOLERANCE[np.dtype(np.float32)])


# NaN: B=2, H=2, Lq=4 rows against Lk=1300 keys (spans of whole blocks).
NAN_KV_LEN, NAN_KEY = 1300, 1297  # a key that row 0 of a bottom-right causal call cannot see


def nan_case(rng, dtype, where, position):
    """Inputs with one NaN in the query, key or value of entry (1, 0)."""
    query, key, value = random_inputs(rng, (2, 2, 4, 8), (2, 2, NAN_KV_LEN, 8), dtype=dtype)
    target = {"query": query, "key": key, "value": value}[where]
    target[(1, 0) + position] = np.nan
    return query, key, value


def assert_same_nan_and_values(got, want, dtype):
    """The NaN pattern is the reference's; every other entry is close to it."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=TOLERANCE[np.dtype(dtype)],
                               atol=TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where, position, options", [
    ("key", (NAN_KEY, 3), dict(causal=True, causal_alignment="bottom_right")),  # rows 1-3
    ("value", (NAN_KEY, 3), dict(causal=True, causal_alignment="bottom_right")),
    ("key", (NAN_KEY, 3), dict(kv_lengths=[NAN_KV_LEN, 700])),  # hidden from every row
    ("value", (NAN_KEY, 3), dict(kv_lengths=[NAN_KV_LEN, 700])),
    ("value", (5, 0), {}),  # column 0 of every row of the entry
    ("query", (2, 5), {}),  # row 2 only
    ("key", (0, 0), dict(kv_lengths=[NAN_KV_LEN, 0])),  # entry 1 sees nothing
])
def test_nan_reaches_only_what_sees_it(rng, decode_calls, where, position, options, dtype):
    query, key, value = nan_case(rng, dtype, where, position)
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                     **options)
    want_out, want_lse = reference.scaled_dot_product_attention(
        query.astype(np.float64), key.astype(np.float64), value.astype(np.float64),
        return_lse=True, **options)
    assert decode_calls
    assert_same_nan_and_values(out, want_out, dtype)
    assert_same_nan_and_values(lse, want_lse, dtype)
    assert not np.isnan(out[0]).any() and not np.isnan(out[1, 1]).any()  # other entries


@pytest.mark.parametrize("dtype", DTYPES)
def test_arguments_have_the_signatures_types(rng, monkeypatch, dtype):
    """The decode kernel is called through its entry point, which checks no types:
    every argument must have exactly its signature's type (writeability aside)."""
    from test_kernel_interface import writeable

    getter, seen = run.decode_kernel, []

    def checking(kernel_dtype):
        entry_point = getter(kernel_dtype)
        expected = [writeable(t) for t in getter.signature(np.dtype(kernel_dtype)).args]

        def call(*args):
            assert [writeable(numba.typeof(arg)) for arg in args] == expected
            seen.append(kernel_dtype)
            return entry_point(*args)
        return call
    monkeypatch.setattr(run, "decode_kernel", checking)
    query, key, value = random_inputs(rng, (2, 8, 1, 16), (2, 2, 1500, 16), 4, dtype)
    query.flags.writeable = False  # a read-only input, passed as it is
    full_key, full_value = np.repeat(key, 4, 1), np.repeat(value, 4, 1)  # (2, 8, 1500, D)
    fastattn.scaled_dot_product_attention(query, full_key, full_value)
    fastattn.scaled_dot_product_attention(query, key, value, enable_gqa=True)  # folded
    fastattn.scaled_dot_product_attention(query, full_key, full_value, causal=True,
                                          kv_lengths=[3, 1500], window=(9, 0), softcap=2.0)
    assert len(seen) == 3


@pytest.mark.parametrize("kv_bytes, threads, expected", [
    (0, 2, 1), (tiling.DECODE_SERIAL_BYTES - 1, 2, 1), (tiling.DECODE_SERIAL_BYTES, 2, 2),
    (tiling.DECODE_SERIAL_BYTES, 1, 1), (10 * tiling.DECODE_SERIAL_BYTES, 4, 4)])
def test_decode_threads_by_work(kv_bytes, threads, expected):
    assert tiling.decode_threads(kv_bytes, threads) == expected
