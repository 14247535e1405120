"""Attention layers as NumPy building blocks on top of the fused kernel: multi-head
attention with learned projections, positional encoding, LayerNorm, and Transformer
encoder and decoder layers (forward only), loadable from PyTorch state_dicts."""

from fastattn.layers.multihead import MultiHeadAttention
from fastattn.layers.norm import FeedForward, LayerNorm
from fastattn.layers.positional import sinusoidal_positional_encoding
from fastattn.layers.transformer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = ["MultiHeadAttention", "LayerNorm", "FeedForward", "sinusoidal_positional_encoding",
           "TransformerEncoderLayer", "TransformerDecoderLayer"]
