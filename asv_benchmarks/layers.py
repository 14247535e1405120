"""Layers on top of the kernel: one multi-head attention layer and one Transformer
encoder layer, float32, batch 4, d_model 512, 8 heads (feed-forward 2048).

A layer's dense products (projections, feed-forward) and its attention run on
fastattn's threads; these track the whole layer, as a user calls it.
PyTorch's ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (eval mode,
no grad, ``batch_first=True``) are the peers, skipped when PyTorch is absent.
"""

import numpy as np

from .common import skip_unsupported

BATCH, D_MODEL, HEADS, FEED_FORWARD = 4, 512, 8, 2048
LAYER_IMPLEMENTATIONS = ["fastattn", "torch"]


def _layer_call(impl, kind, length, causal):
    """A no-argument callable running one layer on ``(BATCH, length, D_MODEL)``."""
    x = np.random.default_rng(0).standard_normal((BATCH, length, D_MODEL), dtype=np.float32)
    skip_unsupported(impl)
    if impl == "torch":
        import torch

        if kind == "attention":
            layer = torch.nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        else:
            layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, dropout=0.0,
                                                     batch_first=True)
        layer.eval()
        tensor = torch.from_numpy(x)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(length) if causal else None

        def call():
            with torch.no_grad():
                if kind == "attention":
                    return layer(tensor, tensor, tensor, attn_mask=mask, is_causal=causal,
                                 need_weights=False)[0]
                return layer(tensor, src_mask=mask, is_causal=causal)
    else:
        import fastattn

        if kind == "attention":
            layer = fastattn.MultiHeadAttention(D_MODEL, HEADS, seed=0)
        else:
            layer = fastattn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, seed=0)

        def call():
            return layer(x, causal=causal)
    call()  # compile or load the kernels, warm the thread pools
    return call


class TimeLayers:
    """One layer's forward over sequence length, causal or not."""

    params = [LAYER_IMPLEMENTATIONS, ["attention", "encoder"], [128, 512], [False, True]]
    param_names = ["impl", "layer", "length", "causal"]
    timeout = 300

    def setup(self, impl, kind, length, causal):
        self.call = _layer_call(impl, kind, length, causal)

    def time_layer(self, impl, kind, length, causal):
        self.call()
