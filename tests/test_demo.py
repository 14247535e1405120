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


def test_heatmap_colour_scale_follows_the_weights():
    """One shared scale from the smallest to the largest weight shown: the colourbar is
    right for every panel and no weight is clipped (it was a fixed 0..0.5)."""
    pytest.importorskip("matplotlib")
    import numpy as np

    from fastattn.demo.plots import _pyplot, attention_weights_figure

    plt = _pyplot()
    figure = attention_weights_figure(plt)
    try:
        images = [axis.images[0] for axis in figure.axes if axis.images]
        assert len(images) == 2
        shown = np.concatenate([image.get_array().ravel() for image in images])
        for image in images:
            assert image.get_clim() == (shown.min(), shown.max())
        colourbar_axes = [axis for axis in figure.axes if not axis.images]
        assert len(colourbar_axes) == 1
        assert "attention weight" in colourbar_axes[0].get_ylabel()
    finally:
        plt.close(figure)
