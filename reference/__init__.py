"""Plain NumPy implementations of fastattn's public API, written to be read.

They are the oracle the fused Numba kernels are tested against: every function
here builds its intermediates in full, computes in float64 and never calls a kernel.
"""

from reference.attention import masked_softmax, scaled_dot_product_attention
from reference.gradients import scaled_dot_product_attention_backward
from reference.layers import (decoder_layer, encoder_layer, feed_forward, layer_norm,
                              multi_head_attention, positional_encoding)
from reference.varlen import varlen_attention, varlen_attention_backward

__all__ = ["scaled_dot_product_attention", "scaled_dot_product_attention_backward",
           "masked_softmax", "multi_head_attention", "positional_encoding", "layer_norm",
           "feed_forward", "encoder_layer", "decoder_layer",
           "varlen_attention", "varlen_attention_backward"]
