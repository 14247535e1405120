"""Training options: attention dropout and the bias gradient, over sequence length.

``(1, 8, L, 64)`` float32, forward and backward (the gradients alone, given the
forward's ``out`` and ``lse``), each with the option and without, so asv's history
shows both the option's time and its cost over the plain call. PyTorch runs its SDPA
with ``dropout_p`` (autograd for the backward) and an additive ``attn_mask`` that
requires grad for the bias gradient. The interleaved ratios of the issue's goals come
from ``score_ratios.py --groups dropout bias_grad``.
"""

import numpy as np

from .common import random_qkv, skip_unsupported

DROPOUT_P, SEED = 0.1, 12345
IMPLEMENTATIONS = ["fastattn", "reference", "torch"]


def _fastattn_calls(impl, query, key, value, options, return_bias_grad=False):
    """``(forward, backward)`` callables of the NumPy implementations, warmed up."""
    module = __import__(impl)
    out, lse = module.scaled_dot_product_attention(query, key, value, return_lse=True,
                                                   **options)

    def forward():
        return module.scaled_dot_product_attention(query, key, value, **options)

    def backward():
        return module.scaled_dot_product_attention_backward(
            out, query, key, value, out, lse, return_bias_grad=return_bias_grad, **options)
    forward(), backward()
    return forward, backward


def _torch_calls(query, key, value, dropout_p=0.0, bias=None):
    """``(forward, backward)`` through ``torch.nn.functional.scaled_dot_product_attention``."""
    import torch
    import torch.nn.functional as F

    tensors = [torch.from_numpy(array).requires_grad_() for array in (query, key, value)]
    mask = None if bias is None else torch.from_numpy(bias).requires_grad_()
    inputs = tensors + ([mask] if mask is not None else [])

    def forward():
        with torch.no_grad():
            return F.scaled_dot_product_attention(*tensors, attn_mask=mask, dropout_p=dropout_p)
    out = F.scaled_dot_product_attention(*tensors, attn_mask=mask, dropout_p=dropout_p)
    grad = torch.ones_like(out)

    def backward():
        return torch.autograd.grad(out, inputs, grad, retain_graph=True)
    forward(), backward()
    return forward, backward


class TimeDropout:
    """Forward and backward with attention dropout ``p = 0.1`` and without."""

    params = [IMPLEMENTATIONS, [512, 2048], [False, True]]
    param_names = ["impl", "length", "dropout"]
    timeout = 600
    number = 1
    repeat = (1, 5, 30.0)

    def setup(self, impl, length, dropout):
        skip_unsupported(impl, length)
        query, key, value = random_qkv((1, 8, length, 64), (1, 8, length, 64), "float32")
        if impl == "torch":
            self.forward, self.backward = _torch_calls(query, key, value,
                                                       DROPOUT_P if dropout else 0.0)
        else:
            options = dict(dropout_p=DROPOUT_P, dropout_seed=SEED) if dropout else {}
            self.forward, self.backward = _fastattn_calls(impl, query, key, value, options)

    def time_forward(self, impl, length, dropout):
        self.forward()

    def time_backward(self, impl, length, dropout):
        self.backward()


class TimeBiasGradient:
    """The backward with a per-head ``(H, L, L)`` bias, with its gradient and without."""

    params = [IMPLEMENTATIONS, [512, 2048], [False, True]]
    param_names = ["impl", "length", "bias_grad"]
    timeout = 600
    number = 1
    repeat = (1, 5, 30.0)

    def setup(self, impl, length, bias_grad):
        skip_unsupported(impl, length)
        query, key, value = random_qkv((1, 8, length, 64), (1, 8, length, 64), "float32")
        bias = np.random.default_rng(1).standard_normal((8, length, length)).astype(np.float32)
        if impl == "torch":
            if not bias_grad:
                raise NotImplementedError("PyTorch's SDPA takes the bias as attn_mask: the "
                                          "benchmark times it with its gradient only")
            _, self.backward = _torch_calls(query, key, value, bias=bias[None])
        else:
            _, self.backward = _fastattn_calls(impl, query, key, value, dict(bias=bias),
                                               return_bias_grad=bias_grad)

    def time_backward(self, impl, length, bias_grad):
        self.backward()
