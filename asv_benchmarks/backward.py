"""Backward attention (gradients): time over sequence length and d_k.

fastattn and the reference run their backward functions on the forward's ``out``
and ``lse``; PyTorch runs autograd through its fused SDPA (``torch.autograd.grad``
over a retained graph, so only the backward is timed). 4-D ``(1, 8, L, D)`` float32.
"""

import numpy as np

from .common import IMPLEMENTATIONS, as_tensor, random_qkv, skip_unsupported


def backward_call(impl, query, key, value, causal):
    """A no-argument callable computing the three gradients, warmed up once."""
    skip_unsupported(impl, query.shape[-2], key.shape[-2])
    grad_out = np.random.default_rng(1).standard_normal(query.shape[:-1] + value.shape[-1:],
                                                        dtype=np.float32).astype(query.dtype)
    if impl == "torch":
        import torch
        import torch.nn.functional as F

        inputs = [as_tensor(array).requires_grad_() for array in (query, key, value)]
        out = F.scaled_dot_product_attention(*inputs, is_causal=causal)
        grad = as_tensor(grad_out)

        def call():
            return torch.autograd.grad(out, inputs, grad, retain_graph=True)
    else:
        module = __import__(impl)
        out, lse = module.scaled_dot_product_attention(query, key, value, causal=causal,
                                                       return_lse=True)

        def call():
            return module.scaled_dot_product_attention_backward(grad_out, query, key, value,
                                                                out, lse, causal=causal)
    call()
    return call


class TimeBackward:
    """Gradients of query, key and value over sequence length x d_k."""

    params = [IMPLEMENTATIONS, [128, 512, 2048, 8192], [32, 64, 128], [False, True]]
    param_names = ["impl", "length", "d_k", "causal"]
    timeout = 600
    number = 1
    repeat = (1, 5, 30.0)

    def setup(self, impl, length, d_k, causal):
        shape = (1, 8, length, d_k)
        self.call = backward_call(impl, *random_qkv(shape, shape, "float32"), causal)

    def time_backward(self, impl, length, d_k, causal):
        self.call()
