"""The peer comparison script runs end to end: one tiny case, two interleaved rounds,
fastattn against the NumPy reference (PyTorch is not needed), table and JSON parsed."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "asv_benchmarks" / "peer_comparison.py"


def test_peer_comparison_tiny_two_rounds(tmp_path):
    output = tmp_path / "peer.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--cases", "tiny", "--rounds", "2", "--min-sample",
         "0.002", "--gap", "0", "--impls", "fastattn,reference", "--json", str(output)],
        capture_output=True, text=True, env=env, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]

    # stdout: a table row naming the case and both implementations, with a ratio
    rows = [line.split() for line in completed.stdout.splitlines()
            if line.startswith("tiny ")]
    assert len(rows) == 1, completed.stdout
    name, first, other, first_ms, other_ms, ratio, low, high = rows[0][:8]
    assert (name, first, other) == ("tiny", "fastattn", "reference")
    assert float(first_ms) > 0 and float(other_ms) > 0
    # min and max are printed to 2 decimals, the median to 3: compare within rounding
    assert float(low.strip("[,")) - 0.005 <= float(ratio) <= float(high.strip("]")) + 0.005

    # JSON: every sample, and the summary row computed from them
    data = json.loads(output.read_text())
    (result,) = data["results"]
    assert result["case"]["name"] == "tiny"
    seconds = result["seconds"]
    assert sorted(seconds) == ["fastattn", "reference"]
    assert all(len(samples) == 2 and min(samples) > 0 for samples in seconds.values())
    assert len(result["sgemm"]) == 2
    assert all(sample["square_gflops"] > 0 and sample["block_gflops"] > 0
               for sample in result["sgemm"])
    (row,) = data["rows"]
    ratios = sorted(a / b for a, b in zip(seconds["fastattn"], seconds["reference"]))
    assert row["ratio_min"] == ratios[0] and row["ratio_max"] == ratios[-1]
    assert abs(row["first_ms"] - 1e3 * sum(seconds["fastattn"]) / 2) < 1e-9
    # the workers imported this checkout
    for spec in ("fastattn", "reference"):
        assert str(ROOT) in result["info"][spec]["module"]
    # progress on stderr, one line per case at least
    assert "[1/1] tiny" in completed.stderr
