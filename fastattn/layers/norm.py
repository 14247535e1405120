"""Layer normalisation and the position-wise feed-forward block of a Transformer."""

import math

import numpy as np
from scipy.special import erf

from fastattn.layers.common import check_dtype, check_size, check_state, layer_input
from fastattn.layers.linear import linear


class LayerNorm:
    r"""Normalise the last axis to zero mean and unit variance, then scale and shift.

    .. math:: y = \frac{x - \mathrm{mean}(x)}{\sqrt{\mathrm{var}(x) + \epsilon}} \cdot w + b

    (biased variance, as in PyTorch's ``nn.LayerNorm``; state keys ``weight``, ``bias``).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> norm = fastattn.LayerNorm(4)
    >>> y = norm(np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32))
    >>> np.round(y, 3)
    array([[-1.342, -0.447,  0.447,  1.342]], dtype=float32)
    """

    def __init__(self, d_model, eps=1e-5, *, dtype=np.float32):
        self.d_model, self.dtype = check_size("d_model", d_model), check_dtype(dtype)
        if not (isinstance(eps, (int, float, np.floating)) and eps > 0):
            raise ValueError(f"eps must be a positive number; got {eps!r}")
        self.eps = float(eps)
        self.weight = np.ones(d_model, self.dtype)  # (d_model,)
        self.bias = np.zeros(d_model, self.dtype)  # (d_model,)

    def __call__(self, x):
        """Normalise ``x`` ``(..., d_model)``; computed in ``np.result_type`` of the
        weights and ``x`` (integers in float64), as the other layers."""
        x = layer_input("LayerNorm", "x", x, self.d_model, self.dtype)  # (..., d)
        mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
        variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # (..., 1)
        return (x - mean) / np.sqrt(variance + self.eps) * self.weight + self.bias  # (..., d)

    def state_dict(self):
        return {"weight": self.weight.copy(), "bias": self.bias.copy()}

    def load_state_dict(self, state):
        """Load ``weight`` and ``bias`` (PyTorch ``nn.LayerNorm``); nothing changes on error."""
        self._assign(self._checked_state(state))

    def _checked_state(self, state, owner="LayerNorm", prefix=""):
        shape = (self.d_model,)
        return check_state(owner, state, {"weight": shape, "bias": shape}, self.dtype, prefix)

    def _assign(self, arrays):
        self.weight, self.bias = arrays["weight"], arrays["bias"]


ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))),  # exact, as PyTorch's default
}


class FeedForward:
    r"""Position-wise feed-forward network ``linear2(activation(linear1(x)))``.

    .. math:: \mathrm{FFN}(x) = \sigma(x W_1^\top + b_1) W_2^\top + b_2

    Weights in PyTorch's ``nn.Linear`` layout ``(out, in)``; state keys
    ``linear1.weight``, ``linear1.bias``, ``linear2.weight``, ``linear2.bias``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.layers import FeedForward
    >>> ffn = FeedForward(16, 64, activation="gelu", rng=np.random.default_rng(0))
    >>> ffn(np.ones((2, 5, 16), dtype=np.float32)).shape
    (2, 5, 16)
    >>> sorted(ffn.state_dict())
    ['linear1.bias', 'linear1.weight', 'linear2.bias', 'linear2.weight']
    """

    def __init__(self, d_model, dim_feedforward, *, activation="relu", dtype=np.float32,
                 rng=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {activation!r}")
        self.d_model = check_size("d_model", d_model)
        self.dim_feedforward = check_size("dim_feedforward", dim_feedforward)
        self.activation, self.dtype = activation, check_dtype(dtype)
        rng = np.random.default_rng() if rng is None else rng
        bound1, bound2 = 1 / np.sqrt(d_model), 1 / np.sqrt(dim_feedforward)
        self.w1 = rng.uniform(-bound1, bound1, (dim_feedforward, d_model)).astype(self.dtype)
        self.b1 = rng.uniform(-bound1, bound1, dim_feedforward).astype(self.dtype)
        self.w2 = rng.uniform(-bound2, bound2, (d_model, dim_feedforward)).astype(self.dtype)
        self.b2 = rng.uniform(-bound2, bound2, d_model).astype(self.dtype)

    def __call__(self, x):
        """``x`` ``(..., d_model)`` -> ``(..., d_model)``, in ``np.result_type`` of the
        weights and ``x`` (integers in float64)."""
        x = layer_input("FeedForward", "x", x, self.d_model, self.dtype)  # (..., d_model)
        hidden = ACTIVATIONS[self.activation](linear(x, self.w1, self.b1))  # (..., dim_ff)
        return linear(hidden, self.w2, self.b2)  # (..., d_model)

    def state_dict(self):
        return {"linear1.weight": self.w1.copy(), "linear1.bias": self.b1.copy(),
                "linear2.weight": self.w2.copy(), "linear2.bias": self.b2.copy()}

    def load_state_dict(self, state):
        """Load ``linear1.*`` and ``linear2.*``; nothing changes on error."""
        self._assign(self._checked_state(state))

    def _checked_state(self, state, owner="FeedForward", prefix=""):
        d, f = self.d_model, self.dim_feedforward
        return check_state(owner, state, {
            "linear1.weight": (f, d), "linear1.bias": (f,),
            "linear2.weight": (d, f), "linear2.bias": (d,)}, self.dtype, prefix)

    def _assign(self, arrays):
        self.w1, self.b1 = arrays["linear1.weight"], arrays["linear1.bias"]
        self.w2, self.b2 = arrays["linear2.weight"], arrays["linear2.bias"]
