"""Arrays passed to the user functions at every call (``score_mod_args``,
``mask_mod_args``), the gradients of ``score_mod_args`` (``score_mod_args_grad``),
bounds errors inside user functions, and how user functions are compiled for the
kernels (issue 22, parts 1-3 and 7). fastattn against the reference on awkward
lengths, the argument gradients against PyTorch autograd through a dense
computation, and bitwise the same gradients for 1 and 2 threads."""

import math

import numba
import numpy as np
import pytest
from conftest import (FASTATTN, REFERENCE, TOLERANCE, assert_close_to_reference,
                      assert_gradients_match_reference, forward_and_backward, forward_options,
                      random_inputs)
from user_functions import (document_ids, relative_table, same_document, table_bias,
                            table_bias_args_grad, table_bias_grad, unit_grad, wobble,
                            wobble_grad)

import fastattn
import fastattn.score_math
import reference
from fastattn.kernels import hooks

TABLE_OPTIONS = dict(score_mod=table_bias, score_mod_grad=table_bias_grad)


def table_options(rng, heads, q_len, kv_len, dtype=np.float64):
    """The relative-table ``score_mod`` options for ``heads`` heads, ``Lq``, ``Lk``."""
    return dict(TABLE_OPTIONS,
                score_mod_args=relative_table(rng, heads, max(q_len, kv_len), dtype))


# ---------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (1, 300), (127, 129), (129, 127),
                                           (257, 513)])
def test_score_mod_args_match_the_reference(rng, q_len, kv_len, dtype):
    query, key, value = random_inputs(rng, (2, 3, q_len, 8), (2, 3, kv_len, 8), 4, dtype)
    options = table_options(rng, 3, q_len, kv_len)
    for alignment in ("top_left", "bottom_right"):
        assert_close_to_reference(query, key, value, causal=True, causal_alignment=alignment,
                                  return_lse=True, score_mod=table_bias,
                                  score_mod_args=options["score_mod_args"])


def test_score_mod_args_equal_the_same_bias(rng):
    """The table read per call gives what the same values as a dense bias give."""
    query, key, value = random_inputs(rng, (2, 3, 40, 8), (2, 3, 40, 8))
    table, scales = relative_table(rng, 3, 40)
    offsets = np.arange(40)[:, None] - np.arange(40)[None, :] + 39  # (L, L)
    bias = table[:, offsets]  # (H, L, L)
    got = fastattn.scaled_dot_product_attention(query, key, value, score_mod=table_bias,
                                                score_mod_args=(table, np.ones(3)))
    want = fastattn.scaled_dot_product_attention(query, key, value, bias=bias)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_new_values_and_shapes_compile_nothing(rng):
    """A new table (new values, a new length) or new document ids: no new hook, no
    new compile of the user's function; the result follows the new values."""
    query, key, value = random_inputs(rng, (1, 2, 30, 8), (1, 2, 30, 8), 8, np.float32)
    table, scales = relative_table(rng, 2, 30, np.float32)
    docs = document_ids(rng, 30)
    assert_close_to_reference(query, key, value, score_mod=table_bias,
                              score_mod_args=(table, scales), mask_mod=same_document,
                              mask_mod_args=(docs,))
    before = hooks.block_hook.cache_info().misses, len(table_bias.overloads)
    for step in range(3):
        length = 30 + 7 * step
        query, key, value = random_inputs(rng, (1, 2, length, 8), (1, 2, length, 8), 8,
                                          np.float32)
        table, scales = relative_table(rng, 2, length, np.float32)
        docs = document_ids(rng, length, 2 + step)
        assert_close_to_reference(query, key, value, score_mod=table_bias,
                                  score_mod_args=(table, scales), mask_mod=same_document,
                                  mask_mod_args=(docs,))
    assert (hooks.block_hook.cache_info().misses, len(table_bias.overloads)) == before


def test_arrays_are_read_at_each_call(rng):
    """Changing an array in place between calls changes the result (a captured
    array would keep the values it had when compiled)."""
    query, key, value = random_inputs(rng, (1, 2, 20, 8), (1, 2, 20, 8))
    table, scales = relative_table(rng, 2, 20)
    first = fastattn.scaled_dot_product_attention(query, key, value, score_mod=table_bias,
                                                  score_mod_args=(table, scales))
    table[:] = 0.0
    scales[:] = 1.0
    second = fastattn.scaled_dot_product_attention(query, key, value, score_mod=table_bias,
                                                   score_mod_args=(table, scales))
    np.testing.assert_allclose(second, fastattn.scaled_dot_product_attention(query, key, value),
                               rtol=1e-12, atol=1e-12)
    assert not np.allclose(first, second)


def test_arrays_of_any_layout(rng):
    """Non-contiguous, Fortran-ordered, read-only and integer arrays are accepted."""
    query, key, value = random_inputs(rng, (2, 3, 20, 8), (2, 3, 25, 8))
    table, scales = relative_table(rng, 3, 25)
    wide = np.asfortranarray(np.repeat(table, 2, axis=1))[:, ::2]  # (3, 49) strided view
    scales = scales.copy()
    scales.flags.writeable = False
    for args in ((wide, scales), (table, np.array([1, 2, 3]))):
        assert_close_to_reference(query, key, value, score_mod=table_bias, score_mod_args=args)


def test_decode_with_score_mod_args(rng):
    """One query against a cache (the decode shape) with a per-call table."""
    query, key, value = random_inputs(rng, (2, 4, 1, 16), (2, 4, 300, 16), 16, np.float32)
    options = table_options(rng, 4, 1, 300)
    assert_close_to_reference(query, key, value, causal=True, causal_alignment="bottom_right",
                              return_lse=True, score_mod=table_bias,
                              score_mod_args=options["score_mod_args"])


# ---------------------------------------------------------------- mask_mod_args

@pytest.mark.parametrize("q_len", [1, 65, 200])
def test_mask_mod_args_match_the_reference(rng, q_len):
    query, key, value = random_inputs(rng, (2, 3, q_len, 8), (2, 3, 200, 8), 8, np.float32)
    docs = document_ids(rng, 200)
    assert_close_to_reference(query, key, value, return_lse=True, mask_mod=same_document,
                              mask_mod_args=(docs,), causal_alignment="bottom_right")
    assert_gradients_match_reference(rng, query, key, value, mask_mod=same_document,
                                     mask_mod_args=(docs,))


def test_block_mask_carries_its_args(rng):
    query, key, value = random_inputs(rng, (2, 3, 150, 8), (2, 3, 150, 8), 8, np.float32)
    docs = document_ids(rng, 150, 5)
    block_mask = fastattn.create_block_mask(same_document, (2, 3), 150, 150, block_size=32,
                                            mask_mod_args=(docs,))
    assert block_mask.mask_mod_args[0] is docs or np.shares_memory(block_mask.mask_mod_args[0],
                                                                   docs)
    elementwise = fastattn.scaled_dot_product_attention(query, key, value, mask_mod=same_document,
                                                        mask_mod_args=(docs,))
    blocked = assert_close_to_reference(query, key, value, block_mask=block_mask)[0]
    np.testing.assert_allclose(blocked, elementwise, rtol=2e-5, atol=2e-5)
    grad_out = rng.standard_normal(blocked.shape).astype(np.float32)
    got = forward_and_backward(FASTATTN, query, key, value, None, grad_out, block_mask=block_mask)
    want = forward_and_backward(FASTATTN, query, key, value, None, grad_out,
                                mask_mod=same_document, mask_mod_args=(docs,))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="carries its own mask_mod_args"):
        fastattn.scaled_dot_product_attention(query, key, value, block_mask=block_mask,
                                              mask_mod_args=(docs.copy(),))


# ---------------------------------------------------------------- argument gradients

def dense_torch(query, key, value, table, scales, causal, grad_out):
    """Attention with the relative table and per-head scales written densely in
    PyTorch; returns autograd's gradients of ``sum(out * grad_out)`` for query, key,
    value, table and scales."""
    torch = pytest.importorskip("torch")
    tensors = [torch.tensor(array, requires_grad=True)
               for array in (query, key, value, table, scales)]
    q, k, v, t, c = tensors
    q_len, kv_len, length = q.shape[-2], k.shape[-2], (t.shape[1] + 1) // 2
    offsets = torch.arange(q_len)[:, None] - torch.arange(kv_len)[None, :] + length - 1
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    scores = scores * c[:, None, None] + t[:, offsets]  # (B, H, Lq, Lk)
    if causal:
        scores = scores.masked_fill(offsets < length - 1, -math.inf)
    out = torch.softmax(scores, dim=-1) @ v  # (B, H, Lq, Dv)
    (out * torch.tensor(grad_out)).sum().backward()
    return [tensor.grad.numpy() for tensor in tensors]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q_len, kv_len, causal", [(1, 1, False), (33, 65, False),
                                                   (129, 129, True), (70, 257, False)])
def test_argument_gradients_match_autograd(rng, q_len, kv_len, causal, dtype):
    query, key, value = random_inputs(rng, (2, 3, q_len, 16), (2, 3, kv_len, 16), 8, dtype)
    table, scales = relative_table(rng, 3, max(q_len, kv_len), dtype)
    grad_out = rng.standard_normal((2, 3, q_len, 8)).astype(dtype)
    options = dict(TABLE_OPTIONS, score_mod_args=(table, scales),
                   score_mod_args_grad=table_bias_args_grad, causal=causal)
    got = forward_and_backward(FASTATTN, query, key, value, None, grad_out, **options)
    as64 = [np.asarray(array, np.float64) for array in (query, key, value, table, scales)]
    wanted = dense_torch(*as64, causal, grad_out.astype(np.float64))
    from_reference = forward_and_backward(REFERENCE, *as64[:3], None,
                                          grad_out.astype(np.float64),
                                          **dict(options, score_mod_args=tuple(as64[3:])))
    assert len(got) == 4 and len(got[3]) == 2
    magnitude = max(1.0, *(np.abs(w).max() for w in wanted))
    tolerance = TOLERANCE[np.dtype(dtype)] * magnitude
    for name, g, r, w in zip(("query", "key", "value", "table", "scales"),
                             got[:3] + got[3], from_reference[:3] + from_reference[3], wanted):
        assert g.dtype == dtype, name
        # the table sums up to Lq*B scores per entry: float32 noise grows with it
        scaled = tolerance * (math.sqrt(2 * q_len) if name in ("table", "scales") else 1)
        np.testing.assert_allclose(g, w, rtol=0, atol=scaled, err_msg=name)
        np.testing.assert_allclose(r, w, rtol=0, atol=1e-10 * magnitude, err_msg=name)


def test_argument_gradients_are_bitwise_the_same_for_1_and_2_threads(rng):
    query, key, value = random_inputs(rng, (2, 4, 300, 16), (2, 4, 300, 16), 16, np.float32)
    table, scales = relative_table(rng, 4, 300, np.float32)
    grad_out = rng.standard_normal(query.shape).astype(np.float32)
    options = dict(TABLE_OPTIONS, score_mod_args=(table, scales),
                   score_mod_args_grad=table_bias_args_grad, causal=True)
    previous = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            if threads > numba.config.NUMBA_NUM_THREADS:
                pytest.skip("fewer than 2 threads available")
            numba.set_num_threads(threads)
            results.append(forward_and_backward(FASTATTN, query, key, value, None, grad_out,
                                                **options))
    finally:
        numba.set_num_threads(previous)
    for other in results[1:]:
        for got, want in zip(other[:3] + other[3], results[0][:3] + results[0][3]):
            np.testing.assert_array_equal(got, want)


def test_argument_gradients_with_bias_gradient_and_softcap(rng):
    """The arguments' gradients beside a bias gradient, and after a softcap."""
    query, key, value = random_inputs(rng, (2, 3, 50, 8), (2, 3, 60, 8))
    table, scales = relative_table(rng, 3, 60)
    bias = rng.standard_normal((3, 50, 60))
    grad_out = rng.standard_normal((2, 3, 50, 8))
    for extra in (dict(bias=bias), dict(softcap=2.0)):
        options = dict(TABLE_OPTIONS, score_mod_args=(table, scales), **extra)
        got, want = (
            backward(grad_out, query, key, value, out, lse, **options,
                     score_mod_args_grad=table_bias_args_grad,
                     return_bias_grad="bias" in extra)
            for forward, backward in (FASTATTN, REFERENCE)
            for out, lse in [forward(query, key, value, return_lse=True,
                                     **forward_options(options))])
        assert len(got) == len(want)
        for g, w in zip(got[:-1] + got[-1], want[:-1] + want[-1]):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


def test_torch_tensors_get_their_gradients(rng):
    torch = pytest.importorskip("torch")
    import fastattn.torch

    query, key, value = random_inputs(rng, (2, 3, 40, 8), (2, 3, 40, 8))
    table, scales = relative_table(rng, 3, 40)
    grad_out = rng.standard_normal((2, 3, 40, 8))
    wanted = dense_torch(query, key, value, table, scales, True, grad_out)
    tensors = [torch.tensor(array, requires_grad=True)
               for array in (query, key, value, table, scales)]
    out = fastattn.torch.scaled_dot_product_attention(
        *tensors[:3], causal=True, score_mod=table_bias, score_mod_grad=table_bias_grad,
        score_mod_args=tuple(tensors[3:]), score_mod_args_grad=table_bias_args_grad)
    (out * torch.tensor(grad_out)).sum().backward()
    for tensor, want in zip(tensors, wanted):
        np.testing.assert_allclose(tensor.grad.numpy(), want, rtol=1e-10, atol=1e-10)
    # a table that requires grad needs score_mod_args_grad; a detached one does not
    with pytest.raises(ValueError, match="score_mod_args_grad"):
        fastattn.torch.scaled_dot_product_attention(
            *tensors[:3], score_mod=table_bias, score_mod_grad=table_bias_grad,
            score_mod_args=tuple(tensors[3:]))
    with torch.no_grad():
        plain = fastattn.torch.scaled_dot_product_attention(
            *tensors[:3], causal=True, score_mod=table_bias, score_mod_args=tuple(tensors[3:]))
    np.testing.assert_allclose(plain.numpy(), out.detach().numpy(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- bounds

SHORT_TABLE = np.zeros((3, 5)), np.ones(3)  # too short for i - j + 2 beyond [-5, 5)


@numba.njit
def captured_table_bias(s, b, h, i, j):
    return s + SHORT_TABLE[0][h, i - j + 2]


@numba.njit
def shifted_documents(b, h, i, j, document_of):
    return document_of[i + 1] == document_of[j]


@numba.njit
def reaching_grad(s, b, h, i, j, table, scales):
    return scales[h + 5]


@numba.njit
def reaching_args_grad(g, s, b, h, i, j, grads, table, scales):
    grads[1][h + 5] += g


@pytest.mark.parametrize("role, options", [
    ("score_mod", dict(score_mod=table_bias, score_mod_args=SHORT_TABLE)),
    ("score_mod", dict(score_mod=captured_table_bias)),
    ("mask_mod", dict(mask_mod=shifted_documents, mask_mod_args=(np.zeros(20, np.int64),))),
], ids=["args", "captured", "mask_mod"])
def test_an_index_out_of_range_raises(role, options):
    """In fastattn (forward, backward, block masks) and in the reference alike."""
    query, key, value = random_inputs(np.random.default_rng(0), (1, 3, 20, 8), (1, 3, 20, 8))
    name = (options.get("score_mod") or options.get("mask_mod")).py_func.__name__
    for forward in (fastattn.scaled_dot_product_attention, reference.scaled_dot_product_attention):
        with pytest.raises(IndexError, match=f"{role} '{name}'"):
            forward(query, key, value, **options)
    out = np.zeros((1, 3, 20, 8))
    lse = np.zeros((1, 3, 20))
    grad = dict(score_mod_grad=table_bias_grad if "score_mod_args" in options
                else unit_grad) if role == "score_mod" else {}
    for backward in (FASTATTN[1], REFERENCE[1]):
        with pytest.raises(IndexError, match=f"{role} '{name}'"):
            backward(out, query, key, value, out, lse, **options, **grad)
    if role == "mask_mod":
        with pytest.raises(IndexError, match=f"mask_mod '{name}'"):
            fastattn.create_block_mask(shifted_documents, (1, 3), 20, 20,
                                       mask_mod_args=options["mask_mod_args"])


@pytest.mark.parametrize("role, functions", [
    ("score_mod_grad", dict(score_mod_grad=reaching_grad)),
    ("score_mod_args_grad", dict(score_mod_grad=table_bias_grad,
                                 score_mod_args_grad=reaching_args_grad)),
])
def test_an_index_out_of_range_in_the_backward_functions_raises(rng, role, functions):
    query, key, value = random_inputs(rng, (1, 3, 20, 8), (1, 3, 20, 8))
    options = dict(score_mod=table_bias, score_mod_args=relative_table(rng, 3, 20))
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                     **options)
    name = functions[role].py_func.__name__
    for backward in (FASTATTN[1], REFERENCE[1]):
        with pytest.raises(IndexError, match=f"{role} '{name}'"):
            backward(out, query, key, value, out, lse, **options, **functions)


# ---------------------------------------------------------------- errors

@numba.njit
def one_table(s, b, h, i, j, table):
    return s + table[h, 0]


@pytest.mark.parametrize("options, error, words", [
    (dict(score_mod_args=SHORT_TABLE), ValueError, ["score_mod_args", "without a score_mod"]),
    (dict(mask_mod_args=(np.zeros(3),)), ValueError, ["mask_mod_args", "without a mask_mod"]),
    (dict(score_mod=table_bias, score_mod_args=np.zeros((3, 5))), TypeError,
     ["score_mod_args", "tuple", "(array,)"]),
    (dict(score_mod=one_table, score_mod_args=(np.zeros((3, 5), np.complex128),)), TypeError,
     ["score_mod_args[0]", "complex128"]),
    (dict(score_mod=table_bias, score_mod_args=(np.zeros((3, 5)),)), TypeError,
     ["score_mod", "7 arguments", "not 6", "1 from the arrays"]),
    (dict(score_mod=one_table, score_mod_args=(np.zeros(5),)), TypeError,
     ["score_mod", "does not compile"]),
], ids=["score-args-alone", "mask-args-alone", "not-a-tuple", "complex", "arity", "ndim"])
def test_argument_errors(attention, options, error, words):
    query, key, value = random_inputs(np.random.default_rng(0), (1, 3, 4, 8), (1, 3, 5, 8))
    with pytest.raises(error) as raised:
        attention(query, key, value, **options)
    for word in words:
        assert word in str(raised.value)


@pytest.mark.parametrize("backward", [FASTATTN[1], REFERENCE[1]])
def test_args_grad_errors(backward):
    query, key, value = random_inputs(np.random.default_rng(0), (1, 3, 4, 8), (1, 3, 5, 8))
    out, lse = np.zeros((1, 3, 4, 8)), np.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="score_mod_args_grad was given without score_mod_args"):
        backward(out, query, key, value, out, lse, score_mod=wobble, score_mod_grad=wobble_grad,
                 score_mod_args_grad=table_bias_args_grad)
    with pytest.raises(ValueError, match="score_mod_args_grad was given without a score_mod"):
        backward(out, query, key, value, out, lse, score_mod_args_grad=table_bias_args_grad)


# ---------------------------------------------------------------- compiling (part 7)

@numba.njit
def weighted(s, b, h, i, j, *, weight=0.25):
    return s + weight * (i - j)


@numba.njit
def cap_helper(s):
    return 2.0 * math.tanh(s / 2.0)


@numba.njit
def capped_by_helper(s, b, h, i, j):
    return cap_helper(s)


@numba.njit
def capped_by_numpy(s, b, h, i, j):
    return 2.0 * np.tanh(s / 2.0)


@numba.njit
def capped_by_score_math(s, b, h, i, j):
    return 2.0 * fastattn.score_math.tanh(s / 2.0)


def test_keyword_only_defaults_are_kept(rng):
    query, key, value = random_inputs(rng, (1, 2, 30, 8), (1, 2, 30, 8))
    assert_close_to_reference(query, key, value, score_mod=weighted)
    i, j = np.arange(30)[:, None], np.arange(30)[None, :]
    np.testing.assert_allclose(
        fastattn.scaled_dot_product_attention(query, key, value, score_mod=weighted),
        fastattn.scaled_dot_product_attention(query, key, value, bias=0.25 * (i - j)),
        rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("score_mod", [capped_by_helper, capped_by_numpy],
                         ids=["jitted-helper", "np.tanh"])
def test_helpers_and_numpy_tanh_are_vectorised(rng, score_mod, dtype):
    """A helper Numba function using math.tanh, and np.tanh, run as
    fastattn.score_math.tanh inside the kernels: bitwise its results."""
    query, key, value = random_inputs(rng, (2, 3, 70, 16), (2, 3, 90, 16), 8, dtype)
    query = 3 * query
    got = fastattn.scaled_dot_product_attention(query, key, value, score_mod=score_mod)
    vectorised = fastattn.scaled_dot_product_attention(query, key, value,
                                                       score_mod=capped_by_score_math)
    np.testing.assert_array_equal(got, vectorised)
    assert_close_to_reference(query, key, value, score_mod=score_mod)


def test_the_hook_cache_is_bounded():
    assert hooks.block_hook.cache_info().maxsize == hooks.HOOK_CACHE_SIZE
    assert hooks.in_kernel.cache_info().maxsize == hooks.HOOK_CACHE_SIZE
