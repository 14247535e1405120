"""The README's examples run and do what they claim."""

import importlib.util
import pathlib

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gradient_descent_fits_the_teacher():
    losses = load_example("train_attention").train(steps=60, report=None)
    assert losses[-1] < losses[0] / 10
    assert all(later <= 1.5 * earlier for earlier, later in zip(losses, losses[1:]))


def test_kv_cache_decoding_gives_the_tokens_of_recomputing_every_step():
    example = load_example("kv_cache_decoding")
    model = example.TinyDecoder()
    prompts = [[1, 2, 3, 4, 5], [9], [30, 31, 32]]
    want = example.generate_without_cache(model, prompts, 8)
    for page_size in (None, 1, 4):
        np.testing.assert_array_equal(example.generate(model, prompts, 8, page_size), want)
