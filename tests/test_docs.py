"""The documentation keeps its promises (``docs/``, built by Sphinx in CI):

- every public name has a page in the API reference (``docs/api.rst``);
- every public name has a worked example: an ``Examples`` section in its docstring
  (or its module's), or, for the few listed below, a ``>>>`` example in a guide page;
- those examples, and the ``>>>`` examples of every page in ``docs/``, run as written.
"""

import doctest
import importlib
import inspect
import pathlib
import re

import pytest

import fastattn

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OPTION_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# the integrations' modules, and the package each needs
INTEGRATIONS = {"fastattn.torch": "torch", "fastattn.huggingface": "transformers",
                "fastattn.huggingface_paged": "transformers", "fastattn.dask": "dask"}
# public functions of fastattn.blas (the rest of the module serves the kernels)
BLAS_PUBLIC = ("use", "current", "available")

# Modules whose docstrings hold the public names' examples; their Examples run here.
EXAMPLE_MODULES = ["fastattn.attention", "fastattn.block_mask", "fastattn.merge",
                   "fastattn.blas", "fastattn.score_math", "fastattn.layers.multihead",
                   "fastattn.layers.norm", "fastattn.layers.positional",
                   "fastattn.layers.transformer", "fastattn._contract.options",
                   "fastattn.torch", "fastattn.huggingface", "fastattn.mask_functions",
                   "fastattn.varlen", "fastattn.kv_cache", "fastattn.huggingface_paged"]

# Public names whose example is a guide page's (their docstrings live in modules
# that other work of issue 19 is reshaping); the page must call them in a ``>>>`` line.
EXAMPLE_IN_GUIDE = {
    "fastattn.set_num_threads": "guide/runtime.rst",
    "fastattn.get_num_threads": "guide/runtime.rst",
    "fastattn.dask.scaled_dot_product_attention": "guide/dask.rst",
    "fastattn.dask.scaled_dot_product_attention_backward": "guide/dask.rst",
}

# pages whose examples need an optional package
PAGE_NEEDS = {"guide/torch_huggingface.rst": "transformers", "guide/layers.rst": "torch",
              "guide/half.rst": "ml_dtypes",
              "guide/dask.rst": "dask"}


def public_names():
    """``{qualified name: (module name, attribute)}`` of every public name."""
    names = {f"fastattn.{name}": ("fastattn", name) for name in fastattn.__all__}
    layers = importlib.import_module("fastattn.layers")
    score_math = importlib.import_module("fastattn.score_math")
    names.update({f"fastattn.layers.{name}": ("fastattn.layers", name)
                  for name in layers.__all__ if name not in fastattn.__all__})
    names.update({f"fastattn.blas.{name}": ("fastattn.blas", name) for name in BLAS_PUBLIC})
    names.update({f"fastattn.score_math.{name}": ("fastattn.score_math", name)
                  for name in score_math.__all__})
    for module_name, needs in INTEGRATIONS.items():
        try:
            importlib.import_module(needs)
        except ImportError:
            continue
        module = importlib.import_module(module_name)
        names.update({f"{module_name}.{name}": (module_name, name) for name in module.__all__})
    return names


def api_reference_names():
    """Qualified names listed in ``docs/api.rst``'s autosummary tables."""
    documented, module, in_table = set(), "fastattn", False
    for line in (DOCS / "api.rst").read_text().splitlines():
        current = re.match(r"\.\. currentmodule:: (\S+)", line)
        if current:
            module = current.group(1)
        if line.startswith(".. autosummary::"):
            in_table = True
        elif in_table and line.strip() and not line.startswith("   "):
            in_table = False
        elif in_table and line.startswith("   ") and not line.strip().startswith(":"):
            documented.add(f"{module}.{line.strip()}")
    return documented


def test_every_public_name_has_a_page_in_the_api_reference():
    missing = sorted(set(public_names()) - api_reference_names())
    assert not missing, f"add these to docs/api.rst: {missing}"


def test_every_public_name_has_an_example():
    lacking = []
    for qualified, (module_name, attribute) in public_names().items():
        if qualified in EXAMPLE_IN_GUIDE:
            page = (DOCS / EXAMPLE_IN_GUIDE[qualified]).read_text()
            called = f"{module_name}.{attribute}("
            if not any(line.lstrip().startswith((">>>", "...")) and called in line
                       for line in page.splitlines()):
                lacking.append(f"{qualified} (no >>> line of {EXAMPLE_IN_GUIDE[qualified]} "
                               f"calls {called}...)")
            continue
        module = importlib.import_module(module_name)
        docs = [inspect.getdoc(getattr(module, attribute)) or ""]
        if module_name == "fastattn.score_math":  # Numba functions: the module shows them
            docs.append(inspect.getdoc(module) or "")
        if not any(re.search(r"^Examples\n-{8}\n", doc, flags=re.M) and ">>>" in doc
                   for doc in docs):
            lacking.append(qualified)
    assert not lacking, f"public names without an Examples section: {lacking}"


@pytest.mark.parametrize("module_name", EXAMPLE_MODULES)
def test_docstring_examples_run(module_name):
    needs = INTEGRATIONS.get(module_name)
    if needs:
        pytest.importorskip(needs)
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=OPTION_FLAGS)
    tests = [test for test in finder.find(module, module_name) if test.examples]
    assert tests or module_name == "fastattn._contract.options", f"{module_name}: no examples"
    failures = []
    for test in tests:
        report = []
        result = runner.run(test, out=report.append)
        if result.failed:
            failures.append("".join(report))
    assert not failures, "\n".join(failures)


def doc_pages():
    return sorted(str(path.relative_to(DOCS)) for path in DOCS.rglob("*.rst")
                  if "_build" not in path.parts and "generated" not in path.parts
                  and "auto_examples" not in path.parts and "_templates" not in path.parts
                  and re.search(r"^\s*>>> ", path.read_text(), flags=re.M))


@pytest.mark.parametrize("page", doc_pages())
def test_page_examples_run(page):
    needs = PAGE_NEEDS.get(page)
    if needs:
        pytest.importorskip(needs)
    parser = doctest.DocTestParser()
    text = (DOCS / page).read_text()
    test = parser.get_doctest(text, {"__name__": f"docs/{page}"}, page, str(DOCS / page), 0)
    report = []
    result = doctest.DocTestRunner(optionflags=OPTION_FLAGS).run(test, out=report.append)
    assert result.attempted > 0
    assert not result.failed, "".join(report)


def test_benchmark_tables_read_asv_and_peer_results(tmp_path, monkeypatch):
    """The performance page's tables (docs/_ext/benchmark_tables.py) read the files
    that asv and asv_benchmarks/peer_comparison.py write, in their formats."""
    pytest.importorskip("sphinx")
    monkeypatch.syspath_prepend(str(DOCS / "_ext"))
    tables = importlib.import_module("benchmark_tables")
    import json

    benchmark = "forward.TimeForward.time_forward"
    results = tmp_path / "results"
    (results / "machine-a").mkdir(parents=True)
    (results / "benchmarks.json").write_text(json.dumps(
        {benchmark: {"param_names": ["impl", "length"]}}))
    (results / "machine-a" / "machine.json").write_text("{}")
    columns = ["result", "params", "version"]
    params = [["'fastattn'", "'torch'"], ["128", "512"]]
    for date, values in ((1, [1.0, 2.0, 3.0, 4.0]), (2, [0.001, None, 0.004, float("nan")])):
        (results / "machine-a" / f"run{date}.json").write_text(json.dumps({
            "commit_hash": f"{date}" * 40, "date": date, "params": {"machine": "machine-a"},
            "result_columns": columns, "results": {benchmark: [values, params, "v"]}}))
    (run,) = tables.asv_runs(benchmark, results)
    assert run["commit"] == "2" * 40  # the newest run
    header, rows = tables.asv_table_rows(run, "impl")
    assert header == ["length", "fastattn", "torch"]
    assert rows == [["128", "1 ms", "4 ms"]]  # unmeasured (None, NaN) entries left out

    peer = tmp_path / "peer"
    peer.mkdir()
    row = {"case": "L512-D64", "first": "fastattn", "other": "torch", "first_ms": 2.5,
           "other_ms": 3.5, "ratio": 0.714, "ratio_min": 0.6, "ratio_max": 0.8, "share": 0.5}
    (peer / "peer.json").write_text(json.dumps({"rounds": 3, "threads": 2, "rows": [row]}))
    (peer / "memory.json").write_text(json.dumps({"rounds": 3, "rows": []}))  # no table
    ((path, saved),) = tables.peer_results(peer)
    header, rows = tables.peer_table_rows(saved)
    assert rows == [["L512-D64", "fastattn", "torch", "2.5", "3.5", "0.714 [0.60, 0.80]",
                     "0.50"]]
