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
AUTO = "mkl" if MKL_MISSING is None and blas._cpu_vendor() == "GenuineIntel" else "scipy"


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
        assert blas.use("auto") == "scipy"
        assert blas.current_name() == AUTO
    finally:
        blas.use(previous or "auto")


@pytest.mark.skipif(MKL_MISSING is not None, reason=f"mkl: {MKL_MISSING}")
def test_auto_takes_mkl_on_intel_cpus_only(monkeypatch):
    """MKL's speed was measured on Intel CPUs only; elsewhere ``auto`` keeps SciPy's
    BLAS, and MKL is still there on request."""
    previous = blas.use("scipy")
    try:
        monkeypatch.setattr(blas, "_cpu_vendor", lambda: "AuthenticAMD")
        blas.use("auto")
        assert blas.current_name() == "scipy"
        blas.use("mkl")
        assert blas.current_name() == "mkl"
        monkeypatch.setattr(blas, "_cpu_vendor", lambda: "GenuineIntel")
        blas.use("auto")
        assert blas.current_name() == "mkl"
    finally:
        monkeypatch.undo()
        blas.use(previous or "auto")


@pytest.mark.parametrize("name", ["openblas", "", None, "MKL "])
def test_use_refuses_unknown_names(name):
    with pytest.raises(ValueError, match=r"name must be one of 'auto', 'mkl', 'scipy'"):
        blas.use(name)


def test_environment_variable_chooses_the_backend():
    code = "import fastattn.blas as b; print(b.current_name())"
    assert run_python(code, FASTATTN_BLAS="scipy") == "scipy"
    assert run_python(code, FASTATTN_BLAS=" SciPy ") == "scipy"
    assert run_python(code, FASTATTN_BLAS="auto") == AUTO


def test_environment_variable_with_a_bad_value_names_itself():
    code = """
        import numpy as np, fastattn
        try:
            fastattn.scaled_dot_product_attention(*np.ones((3, 4, 4)))
        except ValueError as error:
            print(error)
    """
    assert "FASTATTN_BLAS must be one of" in run_python(code, FASTATTN_BLAS="openblas")


@pytest.mark.skipif(MKL_MISSING is not None, reason=f"mkl: {MKL_MISSING}")
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
    assert run_python(code).split() == ["mkl", "1", "False"]


@pytest.mark.skipif(MKL_MISSING is not None, reason=f"mkl: {MKL_MISSING}")
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


def test_reachable_as_an_attribute_of_the_package():
    code = "import fastattn; print(fastattn.blas.current_name() in fastattn.blas.BACKENDS)"
    assert run_python(code) == "True"
