"""fastattn.dask: attention on Dask arrays, on real Dask schedulers.

Every case runs the forward (out and lse) and the backward on the threaded scheduler,
the processes scheduler and a real ``dask.distributed`` LocalCluster of two worker
processes on loopback, and compares them with the float64 reference at the
contract's tolerances. Chunk sizes are chosen awkward (not dividing the lengths, one
row, one past a chunk).
"""

import concurrent.futures
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

import fastattn  # noqa: E402
import fastattn.dask as fdask  # noqa: E402
from fastattn.dask.tasks import task_threads  # noqa: E402
import reference  # noqa: E402
from conftest import TOLERANCE  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Worker processes cannot import this test module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------------ engines

@pytest.fixture(scope="module")
def client():
    """A real LocalCluster: two worker processes of one thread each, on loopback."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            yield client


@pytest.fixture(scope="module")
def process_pool():
    """The processes scheduler's pool, made once (spawned processes start slowly)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        yield pool


@pytest.fixture(params=["threads", "processes", "distributed"])
def compute(request):
    """``compute(*arrays)`` on each scheduler in turn."""
    if request.param == "distributed":
        client = request.getfixturevalue("client")
        return lambda *arrays: tuple(client.compute(list(arrays), sync=True))
    if request.param == "processes":
        pool = request.getfixturevalue("process_pool")
        return lambda *arrays: dask.compute(*arrays, scheduler="processes", pool=pool)
    return lambda *arrays: dask.compute(*arrays, scheduler="threads")


# ------------------------------------------------------------------ cases

def normal(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def make_case(name, rng):
    """NumPy inputs, their Dask versions and the options of one case."""
    dtype = np.float32 if name.startswith("float32") else np.float64
    q_shape, kv_shape, value_dim = (2, 3, 37, 16), (2, 3, 53, 16), 5
    q_chunks, kv_chunks = (1, 3, 10, 16), (2, 3, 16, 16)
    options, mask, bias = {}, None, None
    if name == "causal-top_left":
        options = {"causal": True}
    elif name == "causal-bottom_right":  # Lq > Lk: the first rows see nothing
        q_shape, kv_shape = (2, 3, 53, 16), (2, 3, 37, 16)
        options = {"causal": True, "causal_alignment": "bottom_right"}
    elif name == "window-bottom_right":
        options = {"window": (3, 5), "causal_alignment": "bottom_right"}
    elif name == "window-causal":
        options = {"window": (9, 0), "causal": True}
    elif name == "kv_lengths":
        options = {"kv_lengths": np.array([0, 29]), "causal": True,
                   "causal_alignment": "bottom_right"}
    elif name == "mask":  # a Dask mask chunked like the scores, broadcast over heads
        mask_np = rng.random((2, 1, 37, 53)) < 0.6
        mask_np[0, 0, 3] = False  # a row that sees nothing
        mask = (mask_np, da.from_array(mask_np, chunks=(1, 1, 10, 16)))
        options = {"causal": True, "causal_alignment": "bottom_right"}
    elif name == "bias":  # a NumPy bias with -inf, broadcast over batch and heads
        bias_np = rng.standard_normal((37, 53))
        bias_np[rng.random(bias_np.shape) < 0.3] = -np.inf
        bias = (bias_np, bias_np)
        options = {"window": (20, 2)}
    elif name == "padding-mask":  # a Dask key-padding mask (rows broadcast), a Dask bias
        mask_np = rng.random((2, 1, 1, 53)) < 0.8
        mask = (mask_np, da.from_array(mask_np, chunks=(1, 1, 1, 16)))
        bias_np = rng.standard_normal((2, 3, 37, 53))
        bias_np[:, :, :, 7] = -np.inf
        bias = (bias_np, da.from_array(bias_np, chunks=(1, 3, 10, 16)))
    elif name == "one-row-chunks":
        q_shape, kv_shape, q_chunks, kv_chunks = (1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 1, 8), \
            (1, 2, 1, 8)
        options = {"causal": True, "causal_alignment": "bottom_right", "window": (2, 0)}
    elif name == "gqa":
        q_shape, q_chunks = (2, 4, 37, 16), (1, 2, 10, 16)
        kv_shape, kv_chunks = (2, 2, 53, 16), (2, 2, 16, 16)
        options = {"enable_gqa": True, "causal": True}
    elif name == "gqa-decode":
        q_shape, kv_shape, q_chunks, kv_chunks = (2, 4, 1, 16), (2, 2, 300, 16), (2, 4, 1, 16), \
            (1, 2, 64, 16)
        options = {"enable_gqa": True, "causal": True, "causal_alignment": "bottom_right"}
    elif name == "broadcast-batch":
        q_shape, q_chunks = (1, 3, 37, 16), (1, 1, 37, 16)
        options = {"window": (4, 30)}
    elif name == "2-D":
        q_shape, kv_shape, q_chunks, kv_chunks = (37, 16), (53, 16), (17, 16), (11, 8)
        options = {"kv_lengths": [40], "causal": True, "scale": 0.3}
    elif name == "float32":
        options = {"causal": True}
    elif name == "float32-long":
        q_shape, kv_shape, q_chunks, kv_chunks = (1, 2, 300, 64), (1, 2, 700, 64), \
            (1, 2, 128, 64), (1, 2, 257, 64)
        options = {"causal": True, "causal_alignment": "bottom_right"}
    query, key = normal(rng, q_shape, dtype), normal(rng, kv_shape, dtype)
    value = normal(rng, kv_shape[:-1] + (value_dim,), dtype)
    lazy = (da.from_array(query, chunks=q_chunks), da.from_array(key, chunks=kv_chunks),
            da.from_array(value, chunks=kv_chunks[:-1] + (value_dim,)))
    if mask is not None:
        options = dict(options, mask=mask)
    if bias is not None:
        options = dict(options, bias=bias)
    return (query, key, value), lazy, options


CASES = ["plain", "causal-top_left", "causal-bottom_right", "window-bottom_right",
         "window-causal", "kv_lengths", "mask", "bias", "padding-mask", "one-row-chunks",
         "gqa", "gqa-decode",
         "broadcast-batch", "2-D", "float32", "float32-long"]


def split_options(options):
    """The options for the NumPy calls and for the Dask calls."""
    local = {name: (value[0] if name in ("mask", "bias") else value)
             for name, value in options.items()}
    lazy = {name: (value[1] if name in ("mask", "bias") else value)
            for name, value in options.items()}
    return local, lazy


def assert_close(got, want, dtype, name, relative_to_max=False):
    assert got.shape == want.shape, name
    assert got.dtype == dtype, name
    assert not np.isnan(got).any(), name
    tolerance = TOLERANCE[np.dtype(dtype)]
    if relative_to_max:  # gradients: sums of terms of either sign
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * max(1.0, np.abs(want).max()),
                                   err_msg=name)
        return
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=name)
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=tolerance, atol=tolerance,
                               err_msg=name)


@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_the_reference(compute, case, rng):
    arrays, lazy, options = make_case(case, rng)
    local_options, lazy_options = split_options(options)
    dtype = arrays[0].dtype
    as64 = [array.astype(np.float64) for array in arrays]
    want_out, want_lse = reference.scaled_dot_product_attention(*as64, return_lse=True,
                                                                 **local_options)
    grad_out = rng.standard_normal(want_out.shape).astype(dtype)
    want_grads = reference.scaled_dot_product_attention_backward(
        grad_out.astype(np.float64), *as64, want_out, want_lse, **local_options)

    out, lse = fdask.scaled_dot_product_attention(*lazy, return_lse=True, split_every=2,
                                                  **lazy_options)
    grads = fdask.scaled_dot_product_attention_backward(
        da.from_array(grad_out, chunks=out.chunks), *lazy, out, lse, split_every=3,
        **lazy_options)
    got_out, got_lse, *got_grads = compute(out, lse, *grads)

    assert_close(got_out, want_out, dtype, "out")
    assert_close(got_lse, want_lse, dtype, "lse")
    for name, got, want in zip(("grad_query", "grad_key", "grad_value"), got_grads, want_grads):
        assert_close(got, want, dtype, name, relative_to_max=True)
    # and the local fastattn call agrees with the same inputs
    local_out = fastattn.scaled_dot_product_attention(*arrays, **local_options)
    np.testing.assert_allclose(got_out, local_out, rtol=TOLERANCE[np.dtype(dtype)],
                               atol=TOLERANCE[np.dtype(dtype)])


def random_chunks(rng, length):
    """Random chunk sizes summing to ``length`` (ones, uneven, or a single chunk)."""
    if length == 0:
        return (0,)
    sizes = []
    while sum(sizes) < length:
        sizes.append(int(min(rng.integers(1, max(2, length // 2 + 2)), length - sum(sizes))))
    return tuple(sizes)


def test_random_chunkings_and_options_match_the_local_call(rng):
    """Random lengths, chunkings and structural options (the threaded scheduler):
    forward and backward equal the local call, which the local tests hold to the
    reference."""
    for _ in range(40):
        q_len, kv_len = (int(n) for n in rng.integers(1, 40, size=2))
        batch, heads = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        options = {"causal": bool(rng.integers(2)),
                   "causal_alignment": str(rng.choice(["top_left", "bottom_right"]))}
        if rng.integers(2):
            options["window"] = tuple(int(n) for n in rng.integers(0, 12, size=2))
        if rng.integers(2):
            options["kv_lengths"] = rng.integers(0, kv_len + 1, size=batch)
        if rng.integers(2):  # the local call's decisions at its global (b, h, i, j)
            options.update(dropout_p=0.3, dropout_seed=int(rng.integers(2 ** 62)))
        query = normal(rng, (batch, heads, q_len, 8))
        key, value = normal(rng, (batch, heads, kv_len, 8)), normal(rng, (batch, heads, kv_len, 3))
        mask = rng.random((batch, 1, q_len, kv_len)) < 0.8 if rng.integers(2) else None
        q_chunks, kv_chunks = random_chunks(rng, q_len), random_chunks(rng, kv_len)
        lazy_query = da.from_array(query, chunks=(1, heads, q_chunks, 8))
        lazy_key = da.from_array(key, chunks=(1, heads, kv_chunks, 8))
        lazy_mask = None if mask is None else da.from_array(mask, chunks=(1, 1, q_chunks,
                                                                          kv_chunks))
        want_out, want_lse = fastattn.scaled_dot_product_attention(
            query, key, value, mask, return_lse=True, **options)
        grad_out = normal(rng, want_out.shape)
        want_grads = fastattn.scaled_dot_product_attention_backward(
            grad_out, query, key, value, want_out, want_lse, mask, **options)
        out, lse = fdask.scaled_dot_product_attention(
            lazy_query, lazy_key, value, lazy_mask, return_lse=True,
            split_every=int(rng.integers(2, 4)), **options)
        grads = fdask.scaled_dot_product_attention_backward(
            grad_out, lazy_query, lazy_key, value, out, lse, lazy_mask, **options)
        got_out, got_lse, *got_grads = dask.compute(out, lse, *grads, scheduler="threads")
        where = f"Lq={q_len} Lk={kv_len} chunks {q_chunks} x {kv_chunks} {options}"
        np.testing.assert_allclose(got_out, want_out, rtol=1e-10, atol=1e-10, err_msg=where)
        np.testing.assert_array_equal(np.isneginf(got_lse), np.isneginf(want_lse), err_msg=where)
        finite = np.isfinite(want_lse)
        np.testing.assert_allclose(got_lse[finite], want_lse[finite], rtol=1e-10, atol=1e-10,
                                   err_msg=where)
        for got, want in zip(got_grads, want_grads):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg=where)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_decisions_are_the_local_call_s(client, rng, causal):
    """Chunked along the batch, the heads (unevenly), the queries and the keys, on a
    LocalCluster: the same dropout decisions as one local call, forward and backward."""
    query, key, value = (normal(rng, (2, 3, length, 8)) for length in (37, 53, 53))
    options = dict(causal=causal, dropout_p=0.25, dropout_seed=2 ** 50 + 3)
    want_out, want_lse = fastattn.scaled_dot_product_attention(query, key, value,
                                                               return_lse=True, **options)
    grad_out = normal(rng, want_out.shape)
    want_grads = fastattn.scaled_dot_product_attention_backward(
        grad_out, query, key, value, want_out, want_lse, **options)
    lazy = [da.from_array(array, chunks=(1, (2, 1), chunks, 8)) for array, chunks in
            ((query, (10, 27)), (key, (20, 20, 13)), (value, (20, 20, 13)))]
    out, lse = fdask.scaled_dot_product_attention(*lazy, return_lse=True, **options)
    grads = fdask.scaled_dot_product_attention_backward(grad_out, *lazy, out, lse, **options)
    got_out, got_lse, *got_grads = client.compute([out, lse, *grads], sync=True)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got_lse, want_lse, rtol=1e-10, atol=1e-10)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    plain = fastattn.scaled_dot_product_attention(query, key, value, causal=causal)
    assert np.abs(got_out - plain).max() > 0.1  # dropout did act


def test_results_keep_the_query_chunks(rng):
    _, (query, key, value), _ = make_case("plain", rng)
    out, lse = fdask.scaled_dot_product_attention(query, key, value, return_lse=True)
    assert out.chunks == query.chunks[:-1] + ((5,),)
    assert lse.chunks == query.chunks[:-1]
    grads = fdask.scaled_dot_product_attention_backward(out, query, key, value, out, lse)
    assert [g.chunks for g in grads] == [query.chunks, key.rechunk((1, 3, 16, 16)).chunks,
                                         value.rechunk((1, 3, 16, 5)).chunks]


def test_numpy_inputs_chunked_head_dims_and_float16(rng):
    query, key, value = (normal(rng, (2, 29, 12), np.float16) for _ in range(3))
    lazy_key = da.from_array(key, chunks=(1, 7, 5))  # Dk chunked: rechunked to one chunk
    out, lse = fdask.scaled_dot_product_attention(query, lazy_key, value, causal=True,
                                                  return_lse=True)
    got_out, got_lse = dask.compute(out, lse, scheduler="threads")
    want_out, want_lse = fastattn.scaled_dot_product_attention(query, key, value, causal=True,
                                                               return_lse=True)
    assert got_out.dtype == np.float16 and got_lse.dtype == np.float32  # lse: compute dtype
    np.testing.assert_allclose(got_out.astype(np.float32), want_out.astype(np.float32),
                               rtol=2e-3, atol=2e-3)


def test_empty_sizes(rng):
    query = da.zeros((2, 0, 8), chunks=(1, 1, 8))
    key = da.from_array(normal(rng, (2, 9, 8)), chunks=(1, 4, 8))
    out, lse = fdask.scaled_dot_product_attention(query, key, key, return_lse=True)
    assert out.compute().shape == (2, 0, 8) and lse.compute().shape == (2, 0)
    no_keys = da.zeros((2, 0, 8), chunks=(1, 1, 8))
    query = da.from_array(normal(rng, (2, 5, 8)), chunks=(1, 2, 8))
    out, lse = dask.compute(*fdask.scaled_dot_product_attention(query, no_keys, no_keys,
                                                                return_lse=True))
    np.testing.assert_array_equal(out, 0)
    assert np.isneginf(lse).all()


# ------------------------------------------------------------------ the graph

def pair_tasks(array):
    """Chunk-pair tasks (one local kernel call each) in an array's graph."""
    return [key for key in dict(array.__dask_graph__())
            if isinstance(key, tuple) and str(key[0]).startswith("fastattn-attention-pair")]


def test_invisible_chunk_pairs_make_no_task(rng):
    query = da.from_array(normal(rng, (2, 64, 8)), chunks=(2, 16, 8))
    key = da.from_array(normal(rng, (2, 64, 8)), chunks=(2, 16, 8))
    assert len(pair_tasks(fdask.scaled_dot_product_attention(query, key, key))) == 16
    causal = fdask.scaled_dot_product_attention(query, key, key, causal=True)
    assert sorted(task[-2:] for task in pair_tasks(causal)) == [
        (i, j) for i in range(4) for j in range(4) if j <= i]  # none above the diagonal
    band = fdask.scaled_dot_product_attention(query, key, key, window=(3, 0))
    assert sorted(task[-2:] for task in pair_tasks(band)) == [
        (0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (3, 2), (3, 3)]
    short = fdask.scaled_dot_product_attention(query, key, key, kv_lengths=[10, 7])
    assert sorted(task[-2:] for task in pair_tasks(short)) == [(i, 0) for i in range(4)]
    decode = fdask.scaled_dot_product_attention(query[:, :1], key, key, causal=True,
                                                causal_alignment="bottom_right",
                                                window=(20, 0))
    assert sorted(task[-2:] for task in pair_tasks(decode)) == [(0, 2), (0, 3)]
    backward = fdask.scaled_dot_product_attention_backward(
        query, query, key, key, query, query[..., 0], causal=True)
    assert all(len([k for k in dict(g.__dask_graph__()) if "grad-pair" in str(k[0])]) == 10
               for g in backward)


@pytest.mark.parametrize("options", [{}, {"causal": True, "causal_alignment": "bottom_right"},
                                     {"window": (3, 40)}])
def test_the_plan_takes_the_problem_s_rules(rng, options):
    """One reach rule and one diagonal offset: the plan's are the contract's."""
    from fastattn._contract.arguments import diagonal_offset
    from fastattn._contract.options import AttentionOptions
    from fastattn._contract.problem import key_reach
    from fastattn.dask.plan import plan_attention

    query = da.from_array(normal(rng, (2, 37, 8)), chunks=(1, 10, 8))
    key = da.from_array(normal(rng, (2, 53, 8)), chunks=(1, 16, 8))
    checked = AttentionOptions(**options)
    plan = plan_attention(query, key, key, None, checked)
    assert plan.reach == key_reach(checked.window, checked.causal, 37, 53)
    assert plan.problem.diag_offset == diagonal_offset(checked.causal_alignment, 37, 53)
    assert (plan.q_chunks, plan.kv_chunks) == ((10, 10, 10, 7), (16, 16, 16, 5))
    with pytest.raises(AttributeError):  # frozen
        plan.reach = (0, 0)


def test_merge_tree_keeps_each_task_small(rng):
    query = da.from_array(normal(rng, (1, 4, 8)), chunks=(1, 4, 8))
    key = da.from_array(normal(rng, (1, 64, 8)), chunks=(1, 4, 8))  # 16 key chunks
    out = fdask.scaled_dot_product_attention(query, key, key, split_every=4)
    graph = dict(out.__dask_graph__())
    merges = [task for key_, task in graph.items() if "merge" in str(key_[0])]
    assert merges and all(len(task) - 1 <= 4 for task in merges if callable(task[0]))
    np.testing.assert_allclose(out.compute(), fastattn.scaled_dot_product_attention(
        query.compute(), key.compute(), key.compute()), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ errors at build time

def local_error(*args, **kwargs):
    with pytest.raises((ValueError, TypeError)) as raised:
        fastattn.scaled_dot_product_attention(*args, **kwargs)
    return raised


BAD_CALLS = {
    "Dk": ((2, 5, 8), (2, 6, 7), (2, 6, 7), {}),
    "Lk of value": ((2, 5, 8), (2, 6, 8), (2, 7, 8), {}),
    "batch broadcast": ((2, 5, 8), (3, 6, 8), (3, 6, 8), {}),
    "mask shape": ((2, 5, 8), (2, 6, 8), (2, 6, 8), {"mask": np.ones((5, 5), bool)}),
    "mask dtype": ((2, 5, 8), (2, 6, 8), (2, 6, 8), {"mask": np.ones((5, 6))}),
    "bias +inf": ((2, 5, 8), (2, 6, 8), (2, 6, 8), {"bias": np.full((5, 6), np.inf)}),
    "gqa heads": ((1, 3, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8), {"enable_gqa": True}),
    "window": ((2, 5, 8), (2, 6, 8), (2, 6, 8), {"window": (-1, 2)}),
    "kv_lengths range": ((2, 5, 8), (2, 6, 8), (2, 6, 8), {"kv_lengths": [1, 7]}),
    "kv_lengths shape": ((2, 5, 8), (2, 6, 8), (2, 6, 8), {"kv_lengths": [1, 2, 3]}),
    "alignment": ((2, 5, 8), (2, 6, 8), (2, 6, 8), {"causal_alignment": "middle"}),
    "scale": ((2, 5, 8), (2, 6, 8), (2, 6, 8), {"scale": float("nan")}),
    "dtype": ((2, 5, 8), (2, 6, 8), (2, 6, 8), {"complex": True}),
}


@pytest.mark.parametrize("bad", sorted(BAD_CALLS))
def test_bad_input_gets_the_local_error_when_the_graph_is_built(bad):
    q_shape, k_shape, v_shape, options = BAD_CALLS[bad]
    options = dict(options)
    dtype = complex if options.pop("complex", False) else np.float64
    arrays = [np.zeros(shape, dtype) for shape in (q_shape, k_shape, v_shape)]
    want = local_error(*arrays, **options)
    lazy = [da.from_array(array, chunks=1) for array in arrays]  # every axis chunked
    with dask.config.set(scheduler=_refuse_to_compute):  # nothing may run
        with pytest.raises(want.type) as raised:
            fdask.scaled_dot_product_attention(*lazy, **options)
    assert str(raised.value) == str(want.value)


def _refuse_to_compute(*args, **kwargs):
    raise AssertionError("a graph ran while the error should come from building it")


# Bad arguments given as Dask arrays (or options next to them): (query dtype, mask,
# options). The mask, bias and kv_lengths named "lazy" are Dask arrays.
BAD_LAZY_CALLS = {
    "query dtype": (np.complex128, None, {}),
    "query dtype object": (object, None, {}),
    "mask dtype": (np.float64, "lazy float mask", {}),
    "bias dtype": (np.float64, None, {"bias": "lazy complex bias"}),
    "bias trailing dims": (np.float64, None, {"bias": "lazy bias (5, 5)"}),
    "bias batch": (np.float64, None, {"bias": "lazy bias (3, 5, 6)"}),
    "window negative": (np.float64, None, {"window": (2, -1)}),
    "window not an int": (np.float64, None, {"window": (1.5, 2)}),
    "window not a pair": (np.float64, None, {"window": 3}),
    "kv_lengths dtype": (np.float64, None, {"kv_lengths": "lazy float kv_lengths"}),
    "kv_lengths range": (np.float64, None, {"kv_lengths": "lazy kv_lengths [1, 7]"}),
    "kv_lengths shape": (np.float64, None, {"kv_lengths": [[1, 2]]}),
}


def lazy_argument(description):
    """The NumPy value of a "lazy ..." description, and its Dask version."""
    values = {"lazy float mask": np.ones((2, 5, 6)),
              "lazy complex bias": np.zeros((5, 6), complex),
              "lazy bias (5, 5)": np.zeros((5, 5)),
              "lazy bias (3, 5, 6)": np.zeros((3, 5, 6)),
              "lazy float kv_lengths": np.array([1.0, 2.0]),
              "lazy kv_lengths [1, 7]": np.array([1, 7])}
    if not isinstance(description, str) or description not in values:
        return description, description
    return values[description], da.from_array(values[description], chunks=1)


@pytest.mark.parametrize("bad", sorted(BAD_LAZY_CALLS))
def test_bad_dask_arguments_get_the_local_call_s_exact_message(bad):
    """Checked by the local rules on stand-ins of the Dask operands: the local call's
    exception type and message, with no kernel run and nothing computed (a Dask
    kv_lengths excepted)."""
    dtype, mask, options = BAD_LAZY_CALLS[bad]
    arrays = [np.zeros(shape, dtype) for shape in ((2, 5, 8), (2, 6, 8), (2, 6, 8))]
    local_mask, lazy_mask = lazy_argument(mask)
    local_options = {name: lazy_argument(value)[0] for name, value in options.items()}
    lazy_options = {name: lazy_argument(value)[1] for name, value in options.items()}
    want = local_error(*arrays, local_mask, **local_options)
    lazy = [da.from_array(array, chunks=1) for array in arrays]
    compute_allowed = "kv_lengths" in options and isinstance(lazy_options["kv_lengths"],
                                                             da.Array)
    with dask.config.set(scheduler="sync" if compute_allowed else _refuse_to_compute):
        with pytest.raises(want.type) as raised:
            fdask.scaled_dot_product_attention(*lazy, lazy_mask, **lazy_options)
    assert str(raised.value) == str(want.value)


@pytest.mark.parametrize("bad", ["grad_out dtype", "lse dtype", "out shape"])
def test_bad_backward_arrays_get_the_local_backward_s_exact_message(bad):
    query = np.zeros((2, 5, 4))
    grad_out, out, lse = np.zeros((2, 5, 4)), np.zeros((2, 5, 4)), np.zeros((2, 5))
    if bad == "grad_out dtype":
        grad_out = grad_out.astype(complex)
    elif bad == "lse dtype":
        lse = lse.astype("U1")
    else:
        out = np.zeros((2, 4, 4))
    with pytest.raises((TypeError, ValueError)) as want:
        fastattn.scaled_dot_product_attention_backward(grad_out, query, query, query, out, lse)
    lazy = [da.from_array(array, chunks=1) for array in (grad_out, query, out, lse)]
    with dask.config.set(scheduler=_refuse_to_compute):
        with pytest.raises(want.type) as raised:
            fdask.scaled_dot_product_attention_backward(lazy[0], lazy[1], lazy[1], lazy[1],
                                                        lazy[2], lazy[3])
    assert str(raised.value) == str(want.value)


def test_a_large_dask_bias_is_checked_without_reading_its_size():
    """The checks see a Dask bias of ``(Lq, Lk) = (2**17, 2**17)`` (128 GiB of float64)
    through a stand-in: building the graph takes no memory of that size."""
    length = 2 ** 17
    query = da.zeros((1, length, 8), chunks=(1, 2 ** 14, 8))
    bias = da.zeros((1, length, length), chunks=(1, 2 ** 14, 2 ** 14))
    out = fdask.scaled_dot_product_attention(query, query, query, bias=bias, causal=True)
    assert len(pair_tasks(out)) == 8 * 9 // 2


def test_mask_chunked_unlike_the_scores_is_refused(rng):
    query = da.from_array(normal(rng, (2, 8, 4)), chunks=(1, 4, 4))
    key = da.from_array(normal(rng, (2, 9, 4)), chunks=(1, 3, 4))
    mask = da.ones((2, 8, 9), dtype=bool, chunks=(1, 4, 4))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 8, 9\) is chunked .* rechunk"):
        fdask.scaled_dot_product_attention(query, key, key, mask)
    fdask.scaled_dot_product_attention(query, key, key, mask.rechunk((1, 4, 3)))  # accepted


def test_return_weights_is_refused():
    with pytest.raises(ValueError, match="return_weights"):
        fdask.scaled_dot_product_attention(np.zeros((3, 2)), np.zeros((3, 2)),
                                           np.zeros((3, 2)), return_weights=True)


def test_backward_arrays_of_the_wrong_shape_are_refused():
    query = np.zeros((2, 5, 4))
    with pytest.raises(ValueError, match=r"lse must have the forward's shape"):
        fdask.scaled_dot_product_attention_backward(query, query, query, query, query,
                                                    np.zeros((2, 4)))


# ------------------------------------------------------------------ distributed

def test_a_worker_killed_while_the_graph_runs_still_gives_the_answer(client, rng):
    """Results of fastattn tasks sit on both workers while the last key chunk waits on an Event;
    one worker process is then killed (SIGKILL), and the graph still completes with
    the right answer: the scheduler recomputes what the dead worker held."""
    query_np, key_np = normal(rng, (2, 2, 96, 16)), normal(rng, (2, 2, 160, 16))
    gate = distributed.Event(f"fastattn-gate-{os.getpid()}-{time.time()}", client=client)
    key = da.from_array(key_np, chunks=(1, 2, 32, 16)).map_blocks(
        _wait_for_gate, gate.name, dtype=key_np.dtype)
    query = da.from_array(query_np, chunks=(1, 2, 32, 16))
    out, lse = fdask.scaled_dot_product_attention(query, key, key, causal=True,
                                                  causal_alignment="bottom_right",
                                                  return_lse=True, split_every=2)
    futures = client.compute([out, lse])

    def pairs_in_memory():
        return client.run_on_scheduler(_pair_results_per_worker)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        held = pairs_in_memory()
        if len(held) == 2:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"partial results never reached both workers: {pairs_in_memory()}")
    victim = max(held, key=held.get)
    pids = client.run(os.getpid)
    os.kill(pids[victim], signal.SIGKILL)
    assert not any(future.done() for future in futures)  # killed while the graph runs
    deadline = time.monotonic() + 60
    while victim in client.scheduler_info()["workers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victim not in client.scheduler_info()["workers"]
    gate.set()
    got_out, got_lse = client.gather(futures)
    want_out, want_lse = fastattn.scaled_dot_product_attention(
        query_np, key_np, key_np, causal=True, causal_alignment="bottom_right",
        return_lse=True)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got_lse, want_lse, rtol=1e-10, atol=1e-10)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it for the next tests


def _wait_for_gate(block, gate_name, block_info=None):
    """Hold the last key chunk until the test opens the gate (its worker thread is
    free to run other tasks meanwhile)."""
    location = block_info[0]["chunk-location"]
    if location[-2] == block_info[0]["num-chunks"][-2] - 1:
        distributed.secede()
        distributed.Event(gate_name).wait()
        distributed.rejoin()
    return block


def _pair_results_per_worker(dask_scheduler):
    held = {}
    for task in dask_scheduler.tasks.values():
        if str(task.key[0] if isinstance(task.key, tuple) else task.key).startswith(
                "fastattn-attention") and task.state == "memory":
            for worker in task.who_has:
                held[worker.address] = held.get(worker.address, 0) + 1
    return held


def test_kernels_use_one_thread_per_task_on_workers(client):
    for _ in range(2):
        inside, worker_threads = client.submit(_threads_in_task, pure=False).result()
        assert inside == 1 <= worker_threads
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the threaded scheduler's case
        assert pool.submit(_threads_in_task_local).result() == 1
    assert _threads_in_task_local() == fastattn.get_num_threads()  # the caller's own setting


def _threads_in_task():
    with task_threads():
        inside = fastattn.get_num_threads()
    return inside, distributed.get_worker().state.nthreads


def _threads_in_task_local():
    with task_threads():
        return fastattn.get_num_threads()


# ------------------------------------------------------------------ packaging

def test_import_without_dask_names_the_extra():
    code = ("import sys; sys.modules['dask'] = None; sys.modules['dask.array'] = None\n"
            "import fastattn\n"
            "try:\n    import fastattn.dask\nexcept ImportError as error:\n"
            "    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    assert 'pip install "fastattn[dask]"' in result.stdout


def test_fastattn_does_not_import_dask():
    code = "import sys, fastattn; fastattn.merge_attention; print('dask' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    assert result.stdout.strip() == "False"


def test_memory_bank_example_runs_small():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dask_memory_bank.py"), "--log2-keys", "14",
         "--log2-chunk", "11", "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "agreement with the local call" in result.stdout
    assert "within float32 tolerance: True" in result.stdout



@pytest.mark.parametrize("option", [dict(softcap=2.0), dict(alibi_slopes=[0.5]),
                                    dict(chunk_of=((1,), (0,), 0, 0))])
def test_options_the_chunks_are_not_given_are_refused(option):
    """An option fastattn.dask does not carry to its chunks raises, naming it, rather
    than being dropped."""
    query = da.zeros((1, 8, 4), chunks=(1, 4, 4))
    name = next(iter(option))
    with pytest.raises(NotImplementedError, match=f"does not support {name}"):
        fdask.scaled_dot_product_attention(query, query, query, **option)
