"""fastattn.show_config, and the Numba releases the kernels' cache patch is tested with."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

import fastattn
import fastattn.blas as blas


def run_python(code, **environment):
    """Run ``code`` in a fresh interpreter with ``environment`` added (and this
    process's fastattn variables and spin count, which its kernel calls set, left
    out); its stdout."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("FASTATTN_") and name != "GOMP_SPINCOUNT"}
    env.update(environment)
    finished = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    return finished.stdout.strip()


# ---------------------------------------------------------------- show_config

def test_show_config_returns_every_section():
    config = fastattn.show_config(mode="dicts")
    assert set(config) == {"fastattn", "blas", "cpu", "environment", "numba", "cache",
                           "process settings"}
    assert config["fastattn"]["version"] == fastattn.__version__
    assert config["blas"]["in use"] == blas.current_name()
    assert set(config["blas"]["routes"]) == set(blas.BACKENDS)
    for name, route in config["blas"]["routes"].items():
        assert route["usable"] == (blas.available()[name] is None)
    assert set(config["cpu"]["features"]) == {"avx2", "fma", "f16c", "avx512f", "avx512_bf16",
                                              "amx_tile"}
    assert "converted to float32" in config["cpu"]["16-bit inputs"]
    import numba

    assert config["numba"]["version"] == numba.__version__
    assert config["process settings"]["switches"] == {
        "spin count": "FASTATTN_SPINCOUNT", "threading layer priority":
            "FASTATTN_THREADING_LAYER", "all": "FASTATTN_PROCESS_SETTINGS"}


def test_show_config_prints_by_default(capsys):
    assert fastattn.show_config() is None
    printed = capsys.readouterr().out
    assert f"in use: {blas.current_name()}" in printed
    assert "process settings:" in printed and "  spin count: " in printed


def test_show_config_is_public_and_its_examples_run():
    import doctest

    from fastattn._runtime import config_report

    assert "show_config" in fastattn.__all__
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for example in doctest.DocTestFinder().find(config_report.show_config, "show_config",
                                                globs={}):
        runner.run(example)
    assert runner.tries >= 3 and runner.failures == 0


@pytest.mark.parametrize("mode", ["dict", "", None, "STDOUT"])
def test_show_config_refuses_unknown_modes(mode):
    with pytest.raises(ValueError, match="mode must be 'stdout' or 'dicts'"):
        fastattn.show_config(mode=mode)


def test_show_config_says_why_the_route_was_chosen():
    previous = blas.use("scipy")
    try:
        config = fastattn.show_config(mode="dicts")
        assert config["blas"]["reason"] == "forced by fastattn.blas.use('scipy')"
    finally:
        blas.use(previous or "auto")
    if len([why for why in blas.available().values() if why is None]) > 1:
        blas.use("auto")
        config = fastattn.show_config(mode="dicts")
        assert config["blas"]["reason"].startswith("fastest measured on this machine")
        for route in config["blas"]["routes"].values():
            assert all(value > 0 for value in route["GFLOP/s"].values())


def test_show_config_of_a_forced_route_measures_nothing(monkeypatch, tmp_path):
    """A route forced by name is not timed; show_config shows stored figures if the
    machine has them, and measures none itself."""
    from fastattn._runtime import routes

    def no_measuring(addresses):
        raise AssertionError("measured")

    monkeypatch.setattr(routes, "measure", no_measuring)
    monkeypatch.setattr(routes, "cache_folder", lambda: str(tmp_path))
    previous = blas.use("scipy")
    try:
        config = fastattn.show_config(mode="dicts")["blas"]
        assert "measurement" not in config
        assert all("GFLOP/s" not in route for route in config["routes"].values())
    finally:
        monkeypatch.undo()
        blas.use(previous or "auto")


def test_show_config_without_cpu_information(monkeypatch):
    from fastattn._runtime import routes

    monkeypatch.setattr(routes, "cpu_description", lambda: {})
    assert set(fastattn.show_config(mode="dicts")["cpu"]["features"].values()) == {"unknown"}


def test_show_config_reports_the_route_environment_as_set(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    environment = fastattn.show_config(mode="dicts")["environment"]
    assert environment["OPENBLAS_CORETYPE"] == "Haswell"
    assert environment["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"


def test_show_config_starts_no_threads_and_applies_nothing():
    """Before any kernel call it reports the settings as not applied and the
    threading layer as not started, and leaves both so."""
    code = """
        import os, fastattn
        from numba.np.ufunc import parallel
        config = fastattn.show_config(mode="dicts")
        print(config["numba"]["threading layer"].startswith("not started"),
              config["process settings"]["spin count"].startswith("not applied"),
              parallel._is_initialized, os.environ.get("GOMP_SPINCOUNT", "unset"))
    """
    assert run_python(code).split() == ["True", "True", "False", "unset"]


def test_show_config_after_a_kernel_call_with_a_setting_switched_off():
    code = """
        import numpy as np, fastattn
        q = np.ones((1, 4, 4))
        fastattn.scaled_dot_product_attention(q, q, q)
        config = fastattn.show_config(mode="dicts")
        settings = config["process settings"]
        print(config["numba"]["threading layer"], config["blas"]["reason"])
        print(settings["spin count"])
        print(settings["threading layer priority"])
    """
    layer_and_reason, spin, layer = run_python(
        code, FASTATTN_SPINCOUNT="0", FASTATTN_BLAS="scipy").split("\n")
    assert layer_and_reason == "omp forced by FASTATTN_BLAS=scipy"
    assert spin == "off (FASTATTN_SPINCOUNT=0)"
    assert layer == "Numba's threading layer priority omp tbb workqueue"


# ---------------------------------------------------------------- the Numba pin

def pinned_numba_range():
    """``(lower, upper)`` of pyproject.toml's ``numba>=lower,<upper`` requirement."""
    import re

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "pyproject.toml")
    with open(path) as file:
        found = re.search(r'"numba>=([0-9.]+),<([0-9.]+)"', file.read())
    assert found, "pyproject.toml pins numba as numba>=A,<B"
    return found.groups()


@pytest.mark.parametrize("which, inside", [("lower", True), ("upper", False),
                                           ("below", False), ("installed", True)])
def test_cache_patch_is_gated_on_the_pinned_numba_range(monkeypatch, which, inside):
    """Within the releases pyproject.toml allows the kernels' cache is keyed on their
    sources; outside them the patch is skipped with a warning, Numba's keys stay."""
    import numba
    from numba.core import caching

    from fastattn.kernels import config

    lower, upper = pinned_numba_range()
    version = {"lower": lower + ".0", "upper": upper + ".0", "below": "0.58.1",
               "installed": numba.__version__}[which]
    config._key_caches_once()  # patched once per process, as the first kernel does
    locators = list(caching.CacheImpl._locator_classes)
    monkeypatch.setattr(numba, "__version__", version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patched = config.key_caches_on_sources()
    assert patched is inside
    assert any("outside the releases" in str(w.message) for w in caught) is not inside
    assert caching.CacheImpl._locator_classes == locators  # never patched twice
