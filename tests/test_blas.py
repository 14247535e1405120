"""fastattn.blas: choosing the BLAS behind the block products, and results with each."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastattn
import fastattn.blas as blas
from conftest import assert_close_to_reference, assert_gradients_match_reference, random_inputs

MKL_MISSING = blas.available()["mkl"]
USABLE = [name for name, why_not in blas.available().items() if why_not is None]
needs_mkl = pytest.mark.skipif(MKL_MISSING is not None, reason=f"mkl: {MKL_MISSING}")


def run_python(code, **environment):
    """Run ``code`` in a fresh interpreter with ``environment`` added (and this
    process's ``FASTATTN_BLAS`` left out); its stdout."""
    env = {name: value for name, value in os.environ.items() if name != blas.ENVIRONMENT_VARIABLE}
    env.update(environment)
    finished = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    return finished.stdout.strip()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_each_backend_matches_the_reference(rng, blas_backend, dtype, causal):
    query, key, value = random_inputs(rng, (2, 3, 257, 40), (2, 3, 513, 40), 24, dtype)
    assert_close_to_reference(query, key, value, causal=causal, return_lse=True)
    assert_gradients_match_reference(rng, query, key, value, causal=causal)


def test_layers_use_the_chosen_backend(rng, blas_backend):
    """The layers' projections go through the same gemm (rows above the size at
    which they leave NumPy's ``@``)."""
    from fastattn.layers.linear import linear

    x = rng.standard_normal((300, 96)).astype(np.float32)
    weight = rng.standard_normal((80, 96)).astype(np.float32)
    bias = rng.standard_normal(80).astype(np.float32)
    expected = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    np.testing.assert_allclose(linear(x, weight, bias), expected, rtol=0, atol=2e-4)


def test_use_switches_and_returns_the_previous_choice():
    previous = blas.use("scipy")
    try:
        assert blas.current()["name"] == blas.current_name() == "scipy"
        assert blas._reason == "forced by fastattn.blas.use('scipy')"
        assert blas.use("auto") == "scipy"
        assert blas.current_name() in USABLE
        assert blas._reason.startswith(("fastest measured", "the only route"))
    finally:
        blas.use(previous or "auto")


@pytest.mark.parametrize("name", ["openblas", "", None, "MKL "])
def test_use_refuses_unknown_names(name):
    with pytest.raises(ValueError, match=r"name must be one of 'auto', 'mkl', 'scipy'"):
        blas.use(name)


@pytest.mark.parametrize("value, expected", [("scipy", "scipy"), (" SciPy ", "scipy"),
                                             pytest.param("mkl", "mkl", marks=needs_mkl)])
def test_environment_variable_forces_a_route(value, expected):
    code = "import fastattn.blas as b; print(b.current_name()); print(b._reason)"
    name, reason = run_python(code, FASTATTN_BLAS=value).split("\n")
    assert name == expected
    assert reason == f"forced by FASTATTN_BLAS={value.strip().lower()}"


def test_environment_variable_auto_takes_a_measured_route():
    code = "import fastattn.blas as b; print(b.current_name()); print(b._reason)"
    name, reason = run_python(code, FASTATTN_BLAS="auto").split("\n")
    assert name in USABLE
    assert reason.startswith(("fastest measured", "the only route")), reason


def test_environment_variable_with_a_bad_value_names_itself():
    code = """
        import numpy as np, fastattn
        try:
            fastattn.scaled_dot_product_attention(*np.ones((3, 4, 4)))
        except ValueError as error:
            print(error)
    """
    assert "FASTATTN_BLAS must be one of" in run_python(code, FASTATTN_BLAS="openblas")


@needs_mkl
def test_mkl_runs_sequential_and_scipy_blas_keeps_its_threads():
    """With MKL the kernels' calls leave SciPy's BLAS thread count alone (no switch
    is needed), and MKL reports its sequential layer afterwards."""
    code = """
        import ctypes, numpy as np, fastattn, fastattn.blas as b
        from fastattn._runtime.threads import single_threaded_blas
        q = np.ones((2, 300, 64), np.float32)
        fastattn.scaled_dot_product_attention(q, q, q)
        mkl = ctypes.CDLL(b.current()["library"])
        print(b.current_name(), mkl.MKL_Set_Threading_Layer(1), single_threaded_blas().active)
    """
    assert run_python(code, FASTATTN_BLAS="mkl").split() == ["mkl", "1", "False"]


@needs_mkl
def test_mkl_set_up_by_another_library_is_left_alone():
    """An MKL that another library already started with its threaded layer keeps it:
    ``auto`` falls back to SciPy's BLAS, and asking for ``mkl`` says why not."""
    code = """
        import ctypes, fastattn.blas as b
        mkl = ctypes.CDLL(b._mkl_candidates()[0])
        mkl.MKL_Set_Threading_Layer(0)  # Intel OpenMP threads, as a threaded user would
        mkl.MKL_Get_Max_Threads()  # MKL is initialised: the layer is fixed now
        print(b.current_name())
        try:
            b.use("mkl")
        except RuntimeError as error:
            print(error)
    """
    name, message = run_python(code).split("\n", 1)
    assert name == "scipy"
    assert "already set up by another library" in message and "sequential" in message


@needs_mkl
@pytest.mark.skipif("not sys.platform.startswith('linux')", reason="reads /proc/self/maps")
def test_auto_leaves_alone_an_mkl_another_library_loaded():
    """An MKL another library loaded but has not used yet keeps its threading layer
    under ``auto`` (switching it would make that library single-threaded); asking
    for ``mkl`` by name still takes it."""
    code = """
        import ctypes, fastattn.blas as b
        ctypes.CDLL(b._mkl_candidates()[0])  # loaded, not initialised: as NumPy-MKL would
        print(b.current_name(), "mkl" in b._loaded)
        print(b._reason)
        b.use("mkl")
        print(b.current_name())
    """
    chosen, reason, forced = run_python(code).split("\n")
    assert chosen == "scipy False"
    assert "was loaded by another library in this process; auto leaves it" in reason
    assert forced == "mkl"


def test_reachable_as_an_attribute_of_the_package():
    code = "import fastattn; print(fastattn.blas.current_name() in fastattn.blas.BACKENDS)"
    assert run_python(code) == "True"


# ---------------------------------------------------------------- routes by measurement

FAKE_LIBRARY = "/nowhere/libfake_blas.so"


@pytest.fixture
def fresh_choice(monkeypatch, tmp_path):
    """No route loaded or chosen yet, figures kept in ``tmp_path``; the process's
    routes and choice come back after the test."""
    from fastattn._runtime import routes

    monkeypatch.setattr(blas, "_loaded", {})
    monkeypatch.setattr(blas, "_failed_self_test", set())
    monkeypatch.setattr(routes, "cache_folder", lambda: str(tmp_path))
    saved = blas._chosen, blas._reason, blas._measurement
    yield tmp_path
    blas._chosen, blas._reason, blas._measurement = saved


def fake_figures(mkl_speed, scipy_speed):
    from fastattn._runtime import routes

    labels = [routes.case_label(dtype, case) for dtype in routes.DTYPES for case in routes.CASES]
    return {"mkl": dict.fromkeys(labels, mkl_speed), "scipy": dict.fromkeys(labels, scipy_speed)}


@needs_mkl
@pytest.mark.parametrize("mkl_speed, scipy_speed, expected", [
    (150.0, 105.0, "mkl"), (60.0, 80.0, "scipy"),
    (81.0, 80.0, "scipy"),  # within the noise: SciPy's, which changes nothing in the process
])
def test_auto_takes_the_fastest_route_measured_and_stores_the_figures(
        fresh_choice, monkeypatch, mkl_speed, scipy_speed, expected):
    from fastattn._runtime import routes

    measured = []
    monkeypatch.setattr(routes, "measure", lambda addresses: measured.append(set(addresses))
                        or fake_figures(mkl_speed, scipy_speed))
    blas.use("auto")
    assert blas.current_name() == expected
    assert measured == [{"mkl", "scipy"}]
    assert blas._reason == "fastest measured on this machine"
    stored = [path.name for path in fresh_choice.iterdir()]
    assert len(stored) == 1 and stored[0].startswith("fastattn-blas-routes-")

    # the next choice (another process, or use("auto") again) reads the stored figures
    monkeypatch.setattr(blas, "_loaded", {})
    blas.use("auto")
    assert blas.current_name() == expected
    assert measured == [{"mkl", "scipy"}]
    assert blas._reason == "fastest measured on this machine (stored figures)"
    assert blas._measurement["gflops"] == fake_figures(mkl_speed, scipy_speed)
    if expected == "scipy":
        assert set(blas._loaded) == {"scipy"}  # stored figures: MKL is not even loaded


@needs_mkl
def test_figures_are_kept_per_route_environment(fresh_choice, monkeypatch):
    """A variable that changes a library's code path gets figures of its own; the
    user's value is left as it is."""
    from fastattn._runtime import routes

    monkeypatch.setattr(routes, "measure", lambda addresses: fake_figures(70.0, 80.0))
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    blas.use("auto")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    blas.use("auto")
    assert len(list(fresh_choice.iterdir())) == 2
    assert blas._measurement["key"]["environment"]["OPENBLAS_CORETYPE"] == "Haswell"
    assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"


@needs_mkl
def test_unwritable_cache_folder_measures_in_each_process_silently(fresh_choice, monkeypatch):
    import warnings

    from fastattn._runtime import routes

    blocker = fresh_choice / "a file"
    blocker.write_text("")
    monkeypatch.setattr(routes, "cache_folder", lambda: str(blocker / "fastattn"))
    monkeypatch.setattr(routes, "measure", lambda addresses: fake_figures(70.0, 80.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blas.use("auto")
    assert blas.current_name() == "scipy"
    assert blas._measurement["source"] == "measured" and blas._measurement["cache_file"] is None


def test_a_corrupt_figures_file_is_measured_again(fresh_choice, monkeypatch):
    from fastattn._runtime import routes

    libraries = {"mkl": FAKE_LIBRARY, "scipy": blas._scipy_blas_file()}
    key = routes.machine_key(libraries)
    path = routes.cache_file(key)
    with open(path, "w") as file:
        file.write("{not json")
    assert routes.read_cached(path, key, libraries) is None
    routes.write_cached(path, {"format": routes.CACHE_FORMAT, "key": key,
                               "gflops": fake_figures(1.0, 2.0)})
    assert routes.read_cached(path, key, libraries)["gflops"] == fake_figures(1.0, 2.0)
    assert routes.read_cached(path, dict(key, cpu="another"), libraries) is None


def test_measure_times_every_route_on_every_case():
    """The real measurement (a short budget): a figure for every route and case."""
    from fastattn._runtime import routes

    addresses = {name: blas._load(name).addresses for name in USABLE}
    gflops = routes.measure(addresses, budget_s=0.01, max_rounds=2)
    labels = {routes.case_label(dtype, case) for dtype in routes.DTYPES for case in routes.CASES}
    assert set(gflops) == set(USABLE)
    for figures in gflops.values():
        assert set(figures) == labels
        assert all(value > 0 for value in figures.values())


# ---------------------------------------------------------------- the self-test

def test_self_test_accepts_each_usable_route():
    from fastattn._runtime import routes

    for name in USABLE:
        for dtype, address in blas._load(name).addresses.items():
            assert routes.self_test(address, dtype) is None, (name, dtype)


def test_self_test_catches_a_gemm_of_the_wrong_dtype():
    from fastattn._runtime import routes

    sgemm = blas._load("scipy").addresses[np.dtype(np.float32)]
    assert "wrong" in routes.self_test(sgemm, np.float64)


def numpy_ilp64_gemm():
    """NumPy's wheels bundle a 64-bit-integer OpenBLAS (``scipy_dgemm_64_``): its
    dgemm address, or None."""
    import ctypes
    import glob

    folder = os.path.dirname(np.__file__) + ".libs"
    for path in glob.glob(os.path.join(folder, "libscipy_openblas64_*")):
        function = getattr(ctypes.CDLL(path), "scipy_dgemm_64_", None)
        if function is not None:
            return ctypes.cast(function, ctypes.c_void_p).value
    return None


@pytest.mark.skipif(numpy_ilp64_gemm() is None, reason="no ILP64 OpenBLAS in NumPy's wheel")
def test_self_test_catches_an_ilp64_build():
    """The integers are passed so that a gemm reading 64-bit integers sees negative
    sizes and refuses the call (it prints its error) instead of reading past the
    arrays."""
    from fastattn._runtime import routes

    assert "ILP64" in routes.self_test(numpy_ilp64_gemm(), np.float64)


def wrong_route(monkeypatch):
    """Make "mkl" a route whose dgemm address is SciPy's sgemm (a garbage product)."""
    scipy = blas._load_scipy()
    addresses = dict.fromkeys(scipy.addresses, scipy.addresses[np.dtype(np.float32)])
    monkeypatch.setattr(blas, "_mkl_candidates", lambda: [FAKE_LIBRARY])
    monkeypatch.setattr(blas, "_load_mkl", lambda: blas._Backend("mkl", FAKE_LIBRARY, addresses))


def test_auto_skips_a_route_that_fails_its_self_test(fresh_choice, monkeypatch):
    from fastattn._runtime import routes

    wrong_route(monkeypatch)
    monkeypatch.setattr(routes, "read_cached", lambda *args: {  # stored: the wrong one fastest
        "gflops": fake_figures(500.0, 80.0), "key": None})
    with pytest.warns(RuntimeWarning, match="'mkl' failed its self-test"):
        blas.use("auto")
    assert blas.current_name() == "scipy"
    assert "passed over mkl" in blas._reason
    assert blas.available()["mkl"].startswith(f"{FAKE_LIBRARY} failed its self-test")


def test_a_route_asked_for_by_name_that_fails_its_self_test_is_refused(fresh_choice,
                                                                         monkeypatch):
    wrong_route(monkeypatch)
    with pytest.raises(RuntimeError, match=r"cannot use BLAS 'mkl'.*failed its self-test"):
        blas.use("mkl")


def test_auto_warns_of_a_route_failing_its_self_test_while_measuring(fresh_choice, monkeypatch):
    """No stored figures: the failing route is left out of the measurement, and said."""
    wrong_route(monkeypatch)
    with pytest.warns(RuntimeWarning, match="'mkl' failed its self-test"):
        blas.use("auto")
    assert blas.current_name() == "scipy"
    assert blas._reason.startswith("the only route that loads here; passed over mkl: ")
    assert list(fresh_choice.iterdir()) == []  # nothing measured, nothing stored
