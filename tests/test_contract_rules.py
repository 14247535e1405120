"""Rules of ../shared/API.md that every implementation keeps: dtypes, memory layouts,
rows with no visible key, empty sizes, thread counts."""

import numba
import numpy as np
import pytest
from conftest import as_tuple, assert_close_to_reference, random_inputs

import fastattn
import fastattn.blas

ALL_OUTPUTS = dict(return_weights=True, return_lse=True)


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype, out_dtype", [
    (np.float16, np.float16), (np.float32, np.float32), (np.float64, np.float64),
    (np.int32, np.float64), (np.int64, np.float64), (np.uint8, np.float64), (np.bool_, np.float64),
])
def test_result_dtype(attention, rng, dtype, out_dtype):
    """out and weights in the result dtype; lse in the compute dtype (float32 for
    16-bit inputs)."""
    query, key, value = (array.astype(dtype) for array in random_inputs(rng, (2, 5, 4), (2, 6, 4)))
    out, weights, lse = attention(query, key, value, **ALL_OUTPUTS)
    assert out.dtype == weights.dtype == out_dtype
    assert lse.dtype == (np.float32 if out_dtype == np.float16 else out_dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.bool_])
def test_promoted_dtypes_match_reference(rng, dtype):
    query, key, value = (np.round(array * 2).astype(dtype)
                         for array in random_inputs(rng, (2, 9, 4), (2, 130, 4)))
    assert_close_to_reference(query, key, value, causal=True, **ALL_OUTPUTS)


@pytest.mark.parametrize("dtype", [">f2", ">f4", ">f8"])
def test_big_endian_inputs_give_native_results(rng, dtype):
    query, key, value = (array.astype(dtype) for array in random_inputs(rng, (2, 5, 4), (2, 6, 4)))
    out, weights, lse = assert_close_to_reference(query, key, value, **ALL_OUTPUTS)
    native = np.dtype(dtype).newbyteorder("=")
    assert out.dtype == weights.dtype == native
    assert lse.dtype == (np.float32 if native == np.float16 else native)


def test_mixed_dtypes_follow_result_type(attention, rng):
    query, key, value = random_inputs(rng, (5, 4), (6, 4))
    out = attention(query.astype(np.float32), key.astype(np.float16), value.astype(np.float32))
    assert out.dtype == np.float32
    out = attention(query.astype(np.float32), key, value.astype(np.int16))
    assert out.dtype == np.float64


def test_bias_does_not_change_the_dtype(attention, rng):
    query, key, value = random_inputs(rng, (5, 4), (6, 4), dtype=np.float32)
    assert attention(query, key, value, bias=np.zeros((5, 6))).dtype == np.float32


@pytest.mark.parametrize("bad", [np.complex64, object, "U3"])
def test_unsupported_dtypes_raise_type_error(attention, rng, bad):
    query, key, value = random_inputs(rng, (5, 4), (6, 4))
    with pytest.raises(TypeError, match="query"):
        attention(query.astype(bad), key, value)
    with pytest.raises(TypeError, match="value"):
        attention(query, key, value.astype(bad))


# ---------------------------------------------------------------- layouts

def _layouts(array):
    """The same values in several memory layouts."""
    readonly = array.copy()
    readonly.flags.writeable = False
    return {
        "fortran": np.asfortranarray(array),
        "strided": np.repeat(array, 2, axis=-2)[..., ::2, :],
        "negative-stride": array[..., ::-1, :][..., ::-1, :],
        "transposed-view": np.ascontiguousarray(array.swapaxes(-1, -2)).swapaxes(-1, -2),
        "readonly": readonly,
        "broadcast": np.broadcast_to(array[:1], array.shape),
    }


@pytest.mark.parametrize("layout", list(_layouts(np.zeros((2, 3, 4)))))
def test_any_memory_layout(rng, layout):
    query, key, value = random_inputs(rng, (2, 70, 8), (2, 130, 8), dtype=np.float32)
    query, key, value = (_layouts(array)[layout] for array in (query, key, value))
    mask = _layouts(rng.random((2, 70, 130)) < 0.7)[layout]
    bias = _layouts(rng.standard_normal((2, 70, 130)))[layout]
    assert_close_to_reference(query, key, value, mask, bias=bias, **ALL_OUTPUTS)


def test_inputs_are_never_modified(attention, rng):
    query, key, value = random_inputs(rng, (2, 70, 8), (2, 130, 8), dtype=np.float32)
    mask = rng.random((70, 130)) < 0.5
    bias = rng.standard_normal((70, 130))
    kv_lengths = np.array([100, 3])
    originals = [array.copy() for array in (query, key, value, mask, bias, kv_lengths)]
    attention(query, key, value, mask, bias=bias, kv_lengths=kv_lengths, causal=True,
              **ALL_OUTPUTS)
    for array, original in zip((query, key, value, mask, bias, kv_lengths), originals):
        np.testing.assert_array_equal(array, original)


def test_lists_are_accepted(attention):
    out = attention([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[1.0], [2.0]])
    assert out.shape == (1, 1)


# ---------------------------------------------------------------- rows that see no key

def _assert_empty_rows(out, weights, lse, rows):
    assert not np.isnan(out).any() and not np.isnan(weights).any() and not np.isnan(lse).any()
    assert (out[rows] == 0).all() and (weights[rows] == 0).all() and (lse[rows] == -np.inf).all()


def test_fully_masked_rows(attention, rng):
    query, key, value = random_inputs(rng, (9, 4), (140, 4))
    mask = rng.random((9, 140)) < 0.5
    mask[[0, 4, 8]] = False
    out, weights, lse = attention(query, key, value, mask, **ALL_OUTPUTS)
    _assert_empty_rows(out, weights, lse, [0, 4, 8])
    np.testing.assert_allclose(np.delete(weights, [0, 4, 8], axis=0).sum(-1), 1.0)


def test_rows_hidden_by_minus_infinite_bias(attention, rng):
    query, key, value = random_inputs(rng, (4, 4), (6, 4))
    bias = np.zeros((4, 6))
    bias[2] = -np.inf
    _assert_empty_rows(*attention(query, key, value, bias=bias, **ALL_OUTPUTS), rows=[2])


def test_zero_kv_lengths(attention, rng):
    query, key, value = random_inputs(rng, (2, 5, 4), (2, 6, 4))
    out, weights, lse = attention(query, key, value, kv_lengths=[0, 6], **ALL_OUTPUTS)
    _assert_empty_rows(out, weights, lse, rows=0)
    assert np.isfinite(lse[1]).all()


def test_bottom_right_rows_above_the_diagonal(attention, rng):
    """Lq > Lk with bottom-right alignment: the first Lq - Lk queries see no key."""
    query, key, value = random_inputs(rng, (10, 4), (4, 4))
    out, weights, lse = attention(query, key, value, causal=True,
                                  causal_alignment="bottom_right", **ALL_OUTPUTS)
    _assert_empty_rows(out, weights, lse, rows=slice(0, 6))
    assert np.isfinite(lse[6:]).all()


def test_no_keys_at_all(attention, rng):
    query, key, value = random_inputs(rng, (2, 5, 4), (2, 0, 4), 3)
    out, weights, lse = attention(query, key, value, **ALL_OUTPUTS)
    assert out.shape == (2, 5, 3) and weights.shape == (2, 5, 0)
    _assert_empty_rows(out, weights, lse, rows=slice(None))


# ---------------------------------------------------------------- empty sizes

@pytest.mark.parametrize("q_shape, kv_shape, out_shape", [
    ((0, 4), (6, 4), (0, 5)),  # Lq == 0
    ((0, 3, 4), (0, 6, 4), (0, 3, 5)),  # zero batch
    ((2, 0, 3, 4), (1, 6, 4), (2, 0, 3, 5)),  # zero inner batch dim
])
def test_empty_sizes(attention, rng, q_shape, kv_shape, out_shape):
    query, key, value = random_inputs(rng, q_shape, kv_shape, 5)
    out, weights, lse = attention(query, key, value, **ALL_OUTPUTS)
    assert out.shape == out_shape
    assert weights.shape == out_shape[:-1] + (kv_shape[-2],)
    assert lse.shape == out_shape[:-1]


def test_zero_width_head_dim_gives_uniform_weights(attention):
    """Dk == 0: every score is an empty dot product, so each row is uniform."""
    query, key = np.zeros((3, 0)), np.zeros((4, 0))
    value = np.arange(8.0).reshape(4, 2)
    out, weights = attention(query, key, value, return_weights=True)
    np.testing.assert_allclose(weights, 0.25)
    np.testing.assert_allclose(out, np.broadcast_to(value.mean(0), (3, 2)))


# ---------------------------------------------------------------- threads

@pytest.mark.parametrize("q_shape, kv_shape", [
    ((2, 4, 600, 32), (2, 4, 1100, 32)),
    ((1, 2, 1, 32), (1, 2, 3000, 32)),  # decoding: keys split across tasks
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_identical_for_every_thread_count(rng, blas_backend, dtype, q_shape, kv_shape):
    query, key, value = random_inputs(rng, q_shape, kv_shape, dtype=dtype)
    default_threads = fastattn.get_num_threads()
    try:
        results = []
        for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            fastattn.set_num_threads(threads)
            assert fastattn.get_num_threads() == threads
            results.append(fastattn.scaled_dot_product_attention(
                query, key, value, causal=True, return_lse=True))
    finally:
        fastattn.set_num_threads(default_threads)
    for out, lse in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(lse, results[0][1])


@pytest.mark.parametrize("count", [0, -1, numba.config.NUMBA_NUM_THREADS + 1, 1.5, True])
def test_set_num_threads_refuses_bad_counts(count):
    with pytest.raises(ValueError, match="NUMBA_NUM_THREADS"):
        fastattn.set_num_threads(count)


@pytest.mark.parametrize("user_value, switch, expected", [
    (None, None, "10000"), ("5", None, "5"),
    (None, ("FASTATTN_PROCESS_SETTINGS", "0"), "unset"),
    (None, ("FASTATTN_SPINCOUNT", "off"), "unset"),
    (None, ("FASTATTN_THREADING_LAYER", "0"), "10000"),  # another setting's switch
])
def test_openmp_spin_count_default_keeps_the_users(user_value, switch, expected):
    """fastattn shortens OpenMP's idle spinning at its first kernel call unless the
    user chose a value or switched the setting (or all settings) off; importing
    fastattn, its front ends or its kernels changes nothing."""
    import os
    import subprocess
    import sys

    env = {name: value for name, value in os.environ.items()
           if name != "GOMP_SPINCOUNT" and not name.startswith("FASTATTN_")}
    if user_value is not None:
        env["GOMP_SPINCOUNT"] = user_value
    if switch is not None:
        env[switch[0]] = switch[1]
    code = ("import os, numpy as np, fastattn, fastattn.attention, fastattn.kernels.forward, "
            "fastattn._runtime.threads; imported = os.environ.get('GOMP_SPINCOUNT', 'unset'); "
            "q = np.ones((1, 4, 4)); fastattn.scaled_dot_product_attention(q, q, q); "
            "print(imported, os.environ.get('GOMP_SPINCOUNT', 'unset'))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == [user_value or "unset", expected]


@pytest.mark.parametrize("variable, value, expected", [
    (None, None, "omp"),
    ("NUMBA_THREADING_LAYER_PRIORITY", "workqueue omp tbb", "workqueue"),
    ("NUMBA_THREADING_LAYER", "workqueue", "workqueue"),
    ("FASTATTN_PROCESS_SETTINGS", "0", None),  # Numba's own order: TBB if installed
    ("FASTATTN_THREADING_LAYER", "0", None),
    ("FASTATTN_SPINCOUNT", "0", "omp"),  # another setting's switch
])
def test_kernels_run_on_openmp_unless_the_user_chose(variable, value, expected):
    """Numba would take TBB whenever the tbb package is installed (MKL's wheel brings
    it); fastattn puts OpenMP first, keeping a layer or an order the user set."""
    import os
    import subprocess
    import sys

    env = {name: v for name, v in os.environ.items()
           if not name.startswith(("NUMBA_THREADING", "FASTATTN_"))}
    if variable is not None:
        env[variable] = value
    code = ("import numba, numpy as np, fastattn; q = np.ones((1, 4, 4)); "
            "fastattn.scaled_dot_product_attention(q, q, q); print(numba.threading_layer())")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True)
    if expected is None:  # what Numba picks by itself (TBB where the tbb package is)
        numba_alone = ("import numba, numpy as np; f = numba.njit(parallel=True)("
                       "lambda x: x.sum()); f(np.ones(4)); print(numba.threading_layer())")
        expected = subprocess.run([sys.executable, "-c", numba_alone], env=env,
                                  capture_output=True, text=True, check=True).stdout.strip()
    assert result.stdout.split() == [expected]


@pytest.mark.skipif("not sys.platform.startswith('linux')", reason="reads /proc/self/maps")
@pytest.mark.parametrize("first", ["torch", None])
def test_spin_count_reported_as_not_taking_effect_after_an_earlier_libgomp(first):
    """libgomp reads GOMP_SPINCOUNT when it is loaded: a library that loaded it before
    fastattn's first call (PyTorch's wheel ships one, which Numba then shares) keeps
    its spin count, and fastattn says so."""
    import os
    import subprocess
    import sys

    if first is not None:
        pytest.importorskip(first)
    env = {name: v for name, v in os.environ.items()
           if name != "GOMP_SPINCOUNT" and not name.startswith("FASTATTN_")}
    code = ((f"import {first}; " if first else "") +
            "import numpy as np, fastattn; from fastattn._runtime import settings; "
            "q = np.ones((1, 4, 4)); fastattn.scaled_dot_product_attention(q, q, q); "
            "report = settings.report(); print(report['spin count took effect'], "
            "len(report['libgomp loaded before the spin count']))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True)
    took_effect, count = result.stdout.split()
    if first is None:
        assert (took_effect, count) == ("True", "0")
    else:
        loaded = subprocess.run([sys.executable, "-c", f"import {first}; from fastattn._runtime."
                                 "settings import loaded_libgomp; print(len(loaded_libgomp()))"],
                                env=env, capture_output=True, text=True, check=True)
        assert took_effect == str(loaded.stdout.strip() == "0")
        assert count == loaded.stdout.strip()


def test_cache_keys_fall_back_when_numba_changes(monkeypatch):
    """If Numba's private cache classes are missing or raise, the cache-key patch is
    skipped (with a warning for an error) and Numba's defaults stay."""
    import warnings

    from numba.core import caching

    from fastattn.kernels import config

    config._key_caches_once()  # patched as by any kernel compiled before this test
    locators = list(caching.CacheImpl._locator_classes)
    for name in ("UserProvidedCacheLocator", "_UserProvidedCacheLocator"):
        monkeypatch.delattr(caching, name, raising=False)
    assert config.key_caches_on_sources() is False
    assert caching.CacheImpl._locator_classes == locators

    def broken():
        raise AttributeError("Numba changed")

    monkeypatch.setattr(config, "key_caches_on_sources", broken)
    config._key_caches_once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert config._key_caches_once() is False
        assert any("default cache keys" in str(w.message) for w in caught)
    finally:
        config._key_caches_once.cache_clear()
        monkeypatch.undo()
        config._key_caches_once()  # memoised again; the locators are patched only once
    assert caching.CacheImpl._locator_classes == locators


def test_concurrent_calls_from_python_threads(rng):
    """The kernels release the GIL; calls from several Python threads at once must
    each give the single-threaded caller's result (forward and backward)."""
    import threading

    query, key, value = random_inputs(rng, (2, 4, 300, 32), (2, 4, 600, 32), dtype=np.float32)
    out, lse = fastattn.scaled_dot_product_attention(query, key, value, causal=True,
                                                     return_lse=True)
    grads = fastattn.scaled_dot_product_attention_backward(out, query, key, value, out, lse,
                                                           causal=True)
    mismatches = []

    def work():
        for _ in range(5):
            again = fastattn.scaled_dot_product_attention(query, key, value, causal=True)
            grads_again = fastattn.scaled_dot_product_attention_backward(
                out, query, key, value, out, lse, causal=True)
            if not (np.array_equal(again, out)
                    and all(np.array_equal(g, h) for g, h in zip(grads, grads_again))):
                mismatches.append(True)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches


def test_overlapping_calls_share_one_blas_thread_switch():
    """The BLAS thread count is process-wide: it stays at 1 until the last of several
    overlapping kernel calls has left, then returns to what it was (the kernels
    calling SciPy's BLAS; MKL runs sequential, and the switch does nothing then)."""
    from fastattn._runtime.blas_threads import blas_thread_functions
    from fastattn._runtime.threads import single_threaded_blas

    functions = blas_thread_functions()
    before = [get() for get, _ in functions]
    previous_backend = fastattn.blas.use("scipy")
    try:
        for _, set_ in functions:
            set_(3)
        threaded = [get() for get, _ in functions]  # 3, or the BLAS's own limit
        if threaded == [1] * len(functions):
            pytest.skip("this BLAS runs one thread only")
        first, second = single_threaded_blas(), single_threaded_blas()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert [get() for get, _ in functions] == [1] * len(functions)
        second.__exit__(None, None, None)
        assert [get() for get, _ in functions] == threaded
    finally:
        fastattn.blas.use(previous_backend or "auto")
        for (_, set_), count in zip(functions, before):
            set_(count)


def test_read_only_install_compiles_in_memory_and_warns_once(monkeypatch):
    """Where Numba finds no writable cache location, kernels compile in memory with
    one warning per process, however many kernels are built."""
    import warnings

    import numba
    from numba import types

    from fastattn.kernels import config

    real_njit = numba.njit

    def njit_without_cache(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(config.numba, "njit", njit_without_cache)
    config._warn_no_cache.cache_clear()

    def double(x):
        return 2.0 * x

    def triple(x):
        return 3.0 * x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels = [config.jit_kernel(types.float64(types.float64))(f) for f in (double, triple)]
    assert [k(2.0) for k in kernels] == [4.0, 6.0]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "NUMBA_CACHE_DIR" in messages[0]
    config._warn_no_cache.cache_clear()
