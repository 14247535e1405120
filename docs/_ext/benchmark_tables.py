"""Sphinx directives that render benchmark results found at build time as tables.

``.. asv-table:: BENCHMARK``
    The newest asv result of ``BENCHMARK`` (``forward.TimeForward.time_forward``)
    on each machine under ``.asv/results`` (``asv run`` with a commit, or
    ``asv run --python=same --set-commit-hash HEAD``): one row per measured
    parameter combination, with the values of the ``:pivot:`` parameter (default
    ``impl``) as columns. The caption names the machine, its CPU, the commit and the
    date of the run.

``.. peer-comparison-table::``
    Every JSON file that ``asv_benchmarks/peer_comparison.py --json PATH`` wrote into
    ``benchmark_results/`` (or the folder in ``FASTATTN_BENCHMARK_RESULTS``): one row
    per case and pair of implementations, with the median per-round ratio and its
    range.

The directives' content is shown instead when no result is found; it should say how
to produce one. Nothing measured is ever written into the pages' sources.
"""

import datetime
import itertools
import json
import math
import os
import pathlib

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

ROOT = pathlib.Path(__file__).resolve().parents[2]
ASV_RESULTS = ROOT / ".asv" / "results"
PEER_RESULTS_VARIABLE = "FASTATTN_BENCHMARK_RESULTS"
PEER_RESULTS = ROOT / "benchmark_results"


# ------------------------------------------------------------------ reading results

def asv_runs(benchmark, results_dir=ASV_RESULTS):
    """The newest run of ``benchmark`` on each machine under ``results_dir``.

    Returns a list of dicts: ``machine`` (asv's machine parameters), ``commit``,
    ``date`` (a ``datetime``), ``param_names``, and ``rows``: one ``(params,
    seconds)`` per measured combination, ``params`` a dict of repr strings as asv
    stores them.
    """
    runs = []
    if not results_dir.is_dir():
        return runs
    names = _asv_param_names(results_dir, benchmark)
    for machine_dir in sorted(path for path in results_dir.iterdir() if path.is_dir()):
        newest = None
        for path in machine_dir.glob("*.json"):
            if path.name == "machine.json":
                continue
            saved = json.loads(path.read_text())
            if benchmark in saved.get("results", {}) and (
                    newest is None or saved["date"] > newest["date"]):
                newest = saved
        if newest is None:
            continue
        columns = newest["result_columns"]
        entry = dict(zip(columns, newest["results"][benchmark]))
        values, params = entry["result"], entry["params"]
        param_names = names or [f"param{number + 1}" for number in range(len(params))]
        rows = [(dict(zip(param_names, combination)), value)
                for combination, value in zip(itertools.product(*params), values or [])
                if value is not None and not math.isnan(value)]
        runs.append({"machine": newest["params"], "commit": newest["commit_hash"],
                     "date": datetime.datetime.fromtimestamp(newest["date"] / 1000,
                                                             datetime.timezone.utc),
                     "param_names": param_names, "rows": rows})
    return runs


def _asv_param_names(results_dir, benchmark):
    """Parameter names of ``benchmark`` from asv's ``benchmarks.json``, or None."""
    path = results_dir / "benchmarks.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(benchmark, {}).get("param_names")


def peer_results(directory=None):
    """``(path, saved)`` for every peer-comparison JSON file in ``directory``."""
    directory = pathlib.Path(directory or os.environ.get(PEER_RESULTS_VARIABLE)
                             or PEER_RESULTS)
    found = []
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            saved = json.loads(path.read_text())
            if isinstance(saved, dict) and saved.get("rows"):
                found.append((path, saved))
    return found


# ------------------------------------------------------------------ building tables

def format_seconds(seconds):
    """A duration with a unit that keeps three significant digits."""
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= factor:
            return f"{seconds / factor:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def table_node(header, rows, caption):
    """A docutils table with a title (a string, or a list of strings and inline
    nodes), a header row and body rows of strings."""
    table = nodes.table()
    title = nodes.title()
    for part in [caption] if isinstance(caption, str) else caption:
        title += nodes.Text(part) if isinstance(part, str) else part
    table += title
    group = nodes.tgroup(cols=len(header))
    table += group
    for _ in header:
        group += nodes.colspec(colwidth=1)
    head = nodes.thead()
    group += head
    head += _row(header)
    body = nodes.tbody()
    group += body
    for cells in rows:
        body += _row(cells)
    return table


def _row(cells):
    row = nodes.row()
    for cell in cells:
        entry = nodes.entry()
        entry += nodes.paragraph(text=str(cell))
        row += entry
    return row


def asv_table_rows(run, pivot):
    """Header and rows of one asv run, the ``pivot`` parameter's values as columns."""
    others = [name for name in run["param_names"] if name != pivot]
    pivot_values = list(dict.fromkeys(params.get(pivot) for params, _ in run["rows"]))
    cells = {}
    for params, seconds in run["rows"]:
        key = tuple(params[name] for name in others)
        cells.setdefault(key, {})[params.get(pivot)] = format_seconds(seconds)
    header = others + [str(value).strip("'") for value in pivot_values]
    rows = [[value.strip("'") for value in key]
            + [measured.get(value, "") for value in pivot_values]
            for key, measured in cells.items()]
    return header, rows


def peer_table_rows(saved):
    """Header and rows of one peer-comparison JSON file."""
    header = ["case", "first", "other", "first ms", "other ms",
              "first / other, median [min, max]", "share of sgemm"]
    rows = []
    for row in saved["rows"]:
        compared = row.get("other") is not None
        rows.append([
            row["case"], row["first"], row["other"] or "",
            f"{row['first_ms']:.4g}", f"{row['other_ms']:.4g}" if compared else "",
            (f"{row['ratio']:.3f} [{row['ratio_min']:.2f}, {row['ratio_max']:.2f}]"
             if compared else ""),
            f"{row['share']:.2f}" if row.get("share") is not None else "",
        ])
    return header, rows


# ------------------------------------------------------------------ directives

class _ResultsDirective(SphinxDirective):
    has_content = True

    def run(self):
        # results appear and change outside the sources: read this page again at
        # every build (see _always_outdated)
        if not hasattr(self.env, "benchmark_table_docs"):
            self.env.benchmark_table_docs = set()
        self.env.benchmark_table_docs.add(self.env.docname)
        return self.tables() or self.fallback()

    def fallback(self):
        """The directive's content, parsed: what to show when nothing was measured."""
        container = nodes.container()
        self.state.nested_parse(self.content, self.content_offset, container)
        return container.children


class AsvTable(_ResultsDirective):
    required_arguments = 1
    option_spec = {"pivot": directives.unchanged}

    def tables(self):
        benchmark = self.arguments[0]
        pivot = self.options.get("pivot", "impl")
        tables = []
        for run in asv_runs(benchmark):
            header, rows = asv_table_rows(run, pivot)
            machine = run["machine"]
            caption = (f"{benchmark}: asv, machine {machine.get('machine')} "
                       f"({machine.get('cpu')}, {machine.get('num_cpu')} CPUs), commit "
                       f"{run['commit'][:8]}, {run['date']:%Y-%m-%d}")
            tables.append(table_node(header, rows, caption))
        return tables


class PeerComparisonTable(_ResultsDirective):
    option_spec = {"directory": directives.unchanged}

    def tables(self):
        directory = self.options.get("directory")
        if directory:
            directory = ROOT / directory
        tables = []
        for path, saved in peer_results(directory):
            header, rows = peer_table_rows(saved)
            command = " ".join(["peer_comparison.py", *saved.get("argv", [])])
            caption = [f"{path.name}: {saved.get('rounds')} interleaved rounds, "
                       f"{saved.get('threads')} threads (", nodes.literal(text=command), ")"]
            tables.append(table_node(header, rows, caption))
        return tables


def _always_outdated(app, env, added, changed, removed):
    return sorted(getattr(env, "benchmark_table_docs", set()) - set(removed))


def _purge(app, env, docname):
    getattr(env, "benchmark_table_docs", set()).discard(docname)


def _merge(app, env, docnames, other):
    env.benchmark_table_docs = (getattr(env, "benchmark_table_docs", set())
                                | getattr(other, "benchmark_table_docs", set()))


def setup(app):
    app.connect("env-get-outdated", _always_outdated)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.add_directive("asv-table", AsvTable)
    app.add_directive("peer-comparison-table", PeerComparisonTable)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
