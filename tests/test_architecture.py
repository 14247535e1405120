"""The package's structure: imports run one way, and what the kernels compile in is
covered by their cache key.

- ``fastattn/kernels/`` imports only the standard library, NumPy, Numba (with its
  llvmlite) and other modules of ``fastattn/kernels/``.
- No import circle anywhere in the package (imports inside functions count too).
- Editing any module of the kernels (a helper, a constant) makes the kernels that
  compile it in recompile, in a copy of the package with a cache of its own.
- Importing the package, its front ends or its kernels changes no process setting.
"""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fastattn"
KERNEL_IMPORTS_ALLOWED = ("numpy", "numba", "llvmlite")


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path):
    """Every module ``path`` imports (at any depth of its code), absolute names (the
    package uses no relative imports: a test below checks it)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import of {node.module}"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_graph():
    """module -> the package's own modules it imports."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {imported for imported in imported_modules(path)
                       if imported in modules and imported != name}
    return graph


def test_kernels_import_only_numpy_numba_and_kernels():
    outside = {}
    for path in (PACKAGE / "kernels").glob("*.py"):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if name.startswith("fastattn.kernels") or top in KERNEL_IMPORTS_ALLOWED:
                continue
            if top == "fastattn" or top not in sys.stdlib_module_names:
                outside.setdefault(path.name, []).append(name)
    assert outside == {}


def test_no_import_circles():
    graph = package_graph()
    circles = []

    def visit(node, trail):
        for nxt in sorted(graph[node]):
            if nxt in trail:
                circles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, trail + [nxt])
        done.add(node)

    done = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert circles == []


def test_no_two_modules_share_a_file_name():
    names = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            names.setdefault(path.name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: where for name, where in names.items() if len(where) > 1} == {}


def run_python(code, env, cwd=None):
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_editing_a_kernel_module_recompiles(tmp_path):
    """The block-state kernel compiles in the tile-state constants of
    ``kernels/tile_states.py``: editing that file (not the kernel's own) must
    recompile it rather than load the stale cache entry."""
    shutil.copytree(PACKAGE, tmp_path / "fastattn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    code = ("import numba, numpy as np, fastattn\n"
            "from fastattn.kernels import block_states\n"
            "assert fastattn.__file__.startswith(%r)\n"
            "@numba.njit\n"
            "def causal(b, h, i, j):\n"
            "    return j <= i\n"
            "fastattn.create_block_mask(causal, (1,), 8, 8, block_size=4)\n"
            "stats = block_states._block_states_kernel.dispatcher(np.float32).stats\n"
            "print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))"
            % str(tmp_path))
    assert run_python(code, env, tmp_path) == "0 1"  # compiled and cached
    assert run_python(code, env, tmp_path) == "1 0"  # loaded
    constants = tmp_path / "fastattn" / "kernels" / "tile_states.py"
    constants.write_text(constants.read_text() + "# edited\n")
    assert run_python(code, env, tmp_path) == "0 1"  # recompiled, not the stale entry


@pytest.mark.parametrize("module", ["fastattn", "fastattn.attention", "fastattn.kernels.forward",
                                    "fastattn.kernels.backward", "fastattn._runtime.threads",
                                    "fastattn.layers", "reference"])
def test_importing_changes_no_process_setting(module):
    env = {name: value for name, value in os.environ.items()
           if name not in ("GOMP_SPINCOUNT", "FASTATTN_PROCESS_SETTINGS")
           and not name.startswith("NUMBA_THREADING")}
    code = ("import os, numba\n"
            "before = dict(os.environ), list(numba.config.THREADING_LAYER_PRIORITY)\n"
            f"import {module}\n"
            "print(before == (dict(os.environ), list(numba.config.THREADING_LAYER_PRIORITY)))")
    assert run_python(code, env) == "True"
