"""fastattn.dask with the user-function options (issue 22, part 6): score_mod,
mask_mod, block masks (broadcast ones included), score_mod_args, mask_mod_args,
score_mod_grad and score_mod_args_grad, on a real dask.distributed LocalCluster of
two worker processes on loopback that the module starts and stops. Each result is
compared with the local call on the whole arrays, at the contract's tolerances;
chunks are 2 x 2 (queries x keys), of awkward sizes, and the batch is chunked so
that ``b`` and ``h`` are global too."""

import sys

import numba
import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

import fastattn  # noqa: E402
import fastattn.dask as fdask  # noqa: E402
from conftest import TOLERANCE  # noqa: E402
from fastattn.dask.pairs import chunk_pairs  # noqa: E402
from fastattn.dask.plan import plan_attention  # noqa: E402
from fastattn._contract.options import AttentionOptions  # noqa: E402

# Worker processes cannot import this test module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def client():
    """A real LocalCluster: two worker processes of one thread each, on loopback."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            yield client


@numba.njit
def relative_table(s, b, h, i, j, table, scales):
    """A relative-position table ``(H, 2 L - 1)``, per-head scales ``(H,)`` and a
    term in ``b``: wrong positions or entries in a chunk change the result."""
    return s * scales[h] + table[h, i - j + (table.shape[1] - 1) // 2] + 0.25 * b


@numba.njit
def relative_table_grad(s, b, h, i, j, table, scales):
    return scales[h]


@numba.njit
def relative_table_args_grad(g, s, b, h, i, j, grads, table, scales):
    grads[0][h, i - j + (table.shape[1] - 1) // 2] += g
    grads[1][h] += g * s


@numba.njit
def causal(b, h, i, j):
    return j <= i


@numba.njit
def same_document(b, h, i, j, document_of):
    """Documents per mask entry ``b`` (``document_of`` ``(B', L)``), every fourth key
    hidden from head ``h`` by a shift of ``h``."""
    return document_of[b, i] == document_of[b, j] and (i + j + h) % 4 != 1


def inputs(rng, dtype, batch=(2, 3), q_len=45, kv_len=51, head_dim=8):
    query = rng.standard_normal(batch + (q_len, head_dim)).astype(dtype)
    key = rng.standard_normal(batch + (kv_len, head_dim)).astype(dtype)
    value = rng.standard_normal(batch + (kv_len, head_dim)).astype(dtype)
    return query, key, value


def lazy(query, key, value):
    """2 x 2 chunks of awkward sizes along the lengths, the batch chunked too."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    q_chunks, kv_chunks = (q_len // 2 + 3, q_len - q_len // 2 - 3), (kv_len // 2 - 2,
                                                                      kv_len - kv_len // 2 + 2)
    return [da.from_array(array, chunks=(1, (2, 1), chunks, array.shape[-1]))
            for array, chunks in ((query, q_chunks), (key, kv_chunks), (value, kv_chunks))]


def function_options(rng, name, dtype, q_len=45, kv_len=51):
    """The forward's options and the backward's functions of a case."""
    length = max(q_len, kv_len)
    table = (rng.standard_normal((3, 2 * length - 1)).astype(dtype),
             (1.0 + 0.3 * rng.standard_normal(3)).astype(dtype))
    ids = np.sort(rng.integers(0, 3, (2, length)), axis=1)
    scores = dict(score_mod=relative_table, score_mod_args=table)
    if name == "score_mod":
        return dict(scores, causal=True), {}
    masked = fastattn.and_masks(causal, same_document)
    if name == "mask_mod":
        return dict(scores, mask_mod=masked, mask_mod_args=(ids,)), {}
    mask_batch = {"block_mask": (2, 3), "broadcast_block_mask": (1, 1)}[name]
    block_mask = fastattn.create_block_mask(masked, mask_batch, q_len, kv_len, block_size=16,
                                            mask_mod_args=(ids[:mask_batch[0]],))
    return dict(scores, block_mask=block_mask), {}


CASES = ["score_mod", "mask_mod", "block_mask", "broadcast_block_mask"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", CASES)
def test_user_functions_equal_the_local_call(client, rng, name, dtype):
    """Forward (out, lse) and backward (dq, dk, dv and the arguments' gradients) on
    the cluster equal the local call within the contract's tolerances."""
    query, key, value = inputs(rng, dtype)
    options, _ = function_options(rng, name, dtype)
    backward = dict(score_mod_grad=relative_table_grad,
                    score_mod_args_grad=relative_table_args_grad)
    want_out, want_lse = fastattn.scaled_dot_product_attention(query, key, value,
                                                               return_lse=True, **options)
    grad_out = rng.standard_normal(want_out.shape).astype(dtype)
    *want_grads, want_arg_grads = fastattn.scaled_dot_product_attention_backward(
        grad_out, query, key, value, want_out, want_lse, **backward, **options)

    chunked = lazy(query, key, value)
    out, lse = fdask.scaled_dot_product_attention(*chunked, return_lse=True, **options)
    *grads, arg_grads = fdask.scaled_dot_product_attention_backward(
        grad_out, *chunked, out, lse, **backward, **options)
    got_out, got_lse, *got = client.compute([out, lse, *grads, *arg_grads], sync=True)
    tolerance = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(got_out, want_out, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(got_lse, want_lse, rtol=tolerance, atol=tolerance)
    for got_grad, want_grad in zip(got, want_grads + list(want_arg_grads)):
        assert got_grad.shape == want_grad.shape and got_grad.dtype == want_grad.dtype
        scale = max(1.0, np.abs(want_grad).max())  # sums of many terms of either sign
        np.testing.assert_allclose(got_grad, want_grad, rtol=0, atol=tolerance * scale)


def test_argument_gradients_are_the_same_every_time(client, rng):
    """The chunk pairs' shares of the argument gradients are summed in a fixed order:
    two runs on the cluster give the same bits."""
    query, key, value = inputs(rng, np.float32)
    options, _ = function_options(rng, "mask_mod", np.float32)
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                     **options)
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    runs = []
    for _ in range(2):
        arg_grads = fdask.scaled_dot_product_attention_backward(
            grad_out, *lazy(query, key, value), out, lse, score_mod_grad=relative_table_grad,
            score_mod_args_grad=relative_table_args_grad, **options)[3]
        runs.append(client.compute(list(arg_grads), sync=True))
    for first, second in zip(*runs):
        np.testing.assert_array_equal(first, second)


def test_empty_block_mask_tiles_make_no_task(rng):
    """A chunk pair whose block mask tiles are all empty is not computed: causal
    documents of 32 tokens over 2 x 2 chunks of 32 leave the upper-right pair out."""
    query, key, value = inputs(rng, np.float64, (1, 2), 64, 64)
    ids = np.repeat([[0, 1]], 32, axis=1)  # (1, 64): two documents of 32 tokens
    block_mask = fastattn.create_block_mask(fastattn.and_masks(causal, same_document),
                                            (1, 1), 64, 64, block_size=16,
                                            mask_mod_args=(ids,))
    chunked = [da.from_array(array, chunks=(1, 2, 32, 8)) for array in (query, key, value)]
    plan = plan_attention(*chunked, None, AttentionOptions(block_mask=block_mask))
    seen = [(pair.q_index, pair.kv_index) for pair in chunk_pairs(plan)
            if pair.block is not None]
    assert seen == [(0, 0), (1, 1)]  # documents do not see each other
    out = fdask.scaled_dot_product_attention(*chunked, block_mask=block_mask)
    np.testing.assert_allclose(out.compute(scheduler="sync"),
                               fastattn.scaled_dot_product_attention(query, key, value,
                                                                     block_mask=block_mask),
                               rtol=1e-10, atol=1e-10)
