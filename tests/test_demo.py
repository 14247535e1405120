"""The main job: `python -m fastattn demo` prints the notes' examples and agrees."""

import subprocess
import sys

import pytest

from fastattn.__main__ import main


def test_demo_prints_every_example_and_agrees(capsys):
    assert main(["demo"]) == 0
    printed = capsys.readouterr().out
    for expected in ("Money Bank Grows", "River Bank Flows", "THE CAT SAT", "softmax([6, 4])",
                     "Decoder (causal) mask", "d_k", "within the contract"):
        assert expected in printed


def test_demo_writes_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["demo", "--plot", str(tmp_path)]) == 0
    for name in ("attention_weights.png", "score_variance.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "fastattn", "--help"], capture_output=True,
                            text=True, check=True)
    assert "demo" in result.stdout
