"""Attention layers in plain NumPy, written to be read: the oracle of fastattn.layers.

Functions take the weights as a PyTorch-style state_dict of NumPy arrays (the same
names ``fastattn.layers`` classes return from ``state_dict()``), compute in float64,
and loop over heads one at a time with :func:`reference.scaled_dot_product_attention`.
"""

import math

import numpy as np
from scipy.special import erf

from reference.attention import scaled_dot_product_attention


def positional_encoding(length, d_model, base=10000.0):
    """``PE[pos, 2i] = sin(pos / base**(2i/d))``, ``PE[pos, 2i+1] = cos(...)``, entry by entry."""
    encoding = np.zeros((length, d_model))  # (length, d_model)
    for pos in range(length):
        for column in range(d_model):
            pair_start = column - column % 2  # the 2i shared by columns 2i and 2i+1
            angle = pos / base ** (pair_start / d_model)
            encoding[pos, column] = math.sin(angle) if column % 2 == 0 else math.cos(angle)
    return encoding


def layer_norm(x, weight, bias, eps=1e-5):
    """Normalise the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``."""
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    variance = x.var(axis=-1, keepdims=True)  # (..., 1) biased, as PyTorch
    return (x - mean) / np.sqrt(variance + eps) * weight + bias  # (..., d)


def multi_head_attention(query, key, value, state, num_heads, num_kv_heads=None, mask=None,
                         causal=False, kv_lengths=None, return_weights=False):
    """Multi-head attention of ``(batch, L, dim)`` arrays, one head at a time.

    ``state`` holds ``in_proj_weight`` (or ``q/k/v_proj_weight``), ``out_proj.weight``
    and optionally ``in_proj_bias``, ``out_proj.bias``. ``mask`` (True = may attend)
    broadcasts to ``(batch, num_heads, Lq, Lk)``; a 3-D mask is shared by the heads.
    With ``return_weights`` also returns the weights of every head
    ``(batch, num_heads, Lq, Lk)``, as ``fastattn.MultiHeadAttention`` does.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    query, key, value = (np.asarray(a, np.float64) for a in (query, key, value))
    embed_dim = query.shape[-1]
    head_dim = embed_dim // num_heads
    kv_dim = head_dim * num_kv_heads
    if "in_proj_weight" in state:
        w_query, w_key, w_value = np.split(state["in_proj_weight"],
                                           [embed_dim, embed_dim + kv_dim])
    else:
        w_query, w_key, w_value = (state[f"{p}_proj_weight"] for p in "qkv")
    zeros = np.zeros(embed_dim + 2 * kv_dim)
    b_query, b_key, b_value = np.split(state.get("in_proj_bias", zeros),
                                       [embed_dim, embed_dim + kv_dim])
    if mask is not None:
        mask = np.asarray(mask)
        mask = mask[:, None] if mask.ndim == 3 else mask  # (batch, 1, Lq, Lk)
        mask = np.broadcast_to(mask, (query.shape[0], num_heads) + mask.shape[-2:])

    heads, weights = [], []
    for head in range(num_heads):
        kv_head = head // (num_heads // num_kv_heads)  # grouped-query: shared kv head
        rows = slice(head * head_dim, (head + 1) * head_dim)
        kv_rows = slice(kv_head * head_dim, (kv_head + 1) * head_dim)
        q = query @ w_query[rows].T + b_query[rows]  # (batch, Lq, head_dim)
        k = key @ w_key[kv_rows].T + b_key[kv_rows]  # (batch, Lk, head_dim)
        v = value @ w_value[kv_rows].T + b_value[kv_rows]  # (batch, Lk, head_dim)
        head_mask = None if mask is None else mask[:, head]  # (batch, Lq, Lk)
        out, head_weights = scaled_dot_product_attention(
            q, k, v, head_mask, causal=causal, kv_lengths=kv_lengths,
            return_weights=True)  # (batch, Lq, head_dim), (batch, Lq, Lk)
        heads.append(out)
        weights.append(head_weights)
    concatenated = np.concatenate(heads, axis=-1)  # (batch, Lq, embed_dim)
    out = concatenated @ state["out_proj.weight"].T + state.get("out_proj.bias", 0.0)
    return (out, np.stack(weights, axis=1)) if return_weights else out  # (batch, H, Lq, Lk)


def feed_forward(x, state, activation="relu"):
    """``linear2(activation(linear1(x)))`` with PyTorch ``nn.Linear`` weights."""
    hidden = x @ state["linear1.weight"].T + state["linear1.bias"]  # (..., dim_ff)
    if activation == "relu":
        hidden = np.maximum(hidden, 0.0)
    else:  # exact GELU
        hidden = 0.5 * hidden * (1.0 + erf(hidden / np.sqrt(2.0)))
    return hidden @ state["linear2.weight"].T + state["linear2.bias"]  # (..., d_model)


def _sub_state(state, prefix):
    return {name[len(prefix):]: array for name, array in state.items() if name.startswith(prefix)}


def _norm(x, state, name, eps):
    return layer_norm(x, state[f"{name}.weight"], state[f"{name}.bias"], eps)


def encoder_layer(x, state, num_heads, norm_first=False, activation="relu", eps=1e-5,
                  mask=None, causal=False, kv_lengths=None):
    """Self-attention + Add & Norm + feed-forward + Add & Norm (pre- or post-norm)."""
    x = np.asarray(x, np.float64)

    def attend(h):
        return multi_head_attention(h, h, h, _sub_state(state, "self_attn."), num_heads,
                                    mask=mask, causal=causal, kv_lengths=kv_lengths)

    if norm_first:
        x = x + attend(_norm(x, state, "norm1", eps))
        return x + feed_forward(_norm(x, state, "norm2", eps), state, activation)
    x = _norm(x + attend(x), state, "norm1", eps)
    return _norm(x + feed_forward(x, state, activation), state, "norm2", eps)


def decoder_layer(target, memory, state, num_heads, norm_first=False, activation="relu",
                  eps=1e-5, causal=True, target_mask=None, memory_mask=None,
                  target_kv_lengths=None, memory_kv_lengths=None):
    """Masked self-attention + cross-attention + feed-forward, each with Add & Norm."""
    x, memory = np.asarray(target, np.float64), np.asarray(memory, np.float64)

    def attend_self(h):
        return multi_head_attention(h, h, h, _sub_state(state, "self_attn."), num_heads,
                                    mask=target_mask, causal=causal,
                                    kv_lengths=target_kv_lengths)

    def attend_memory(h):
        return multi_head_attention(h, memory, memory, _sub_state(state, "multihead_attn."),
                                    num_heads, mask=memory_mask, kv_lengths=memory_kv_lengths)

    if norm_first:
        x = x + attend_self(_norm(x, state, "norm1", eps))
        x = x + attend_memory(_norm(x, state, "norm2", eps))
        return x + feed_forward(_norm(x, state, "norm3", eps), state, activation)
    x = _norm(x + attend_self(x), state, "norm1", eps)
    x = _norm(x + attend_memory(x), state, "norm2", eps)
    return _norm(x + feed_forward(x, state, activation), state, "norm3", eps)
