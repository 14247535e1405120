"""Transformer encoder and decoder layers (forward only) built on MultiHeadAttention."""

import numpy as np

from fastattn.layers.common import layer_input
from fastattn.layers.multihead import MultiHeadAttention
from fastattn.layers.norm import FeedForward, LayerNorm


def _prefixed(state, prefix):
    return {name[len(prefix):]: array for name, array in state.items() if name.startswith(prefix)}


class _LayerBase:
    """Sub-layers stored under PyTorch's state_dict prefixes; training mode switches
    the attention dropout of every attention sub-layer."""

    _parts = ()  # (prefix, attribute) pairs

    def train(self, mode=True):
        """Training mode (attention dropout applies) or evaluation mode (the default,
        ``mode=False``); returns the layer. Only the attention's dropout is modelled
        (the ``dropout`` argument), not PyTorch's residual and feed-forward dropouts."""
        for _, attribute in self._parts:
            part = getattr(self, attribute)
            if isinstance(part, MultiHeadAttention):
                part.train(mode)
        return self

    def eval(self):
        """Evaluation mode: no dropout. Returns the layer."""
        return self.train(False)

    def state_dict(self):
        state = {}
        for prefix, attribute in self._parts:
            state.update({prefix + name: array
                          for name, array in getattr(self, attribute).state_dict().items()})
        state.update(self.feed_forward.state_dict())  # linear1.*, linear2.*
        return state

    def load_state_dict(self, state):
        """Load the matching PyTorch layer's state_dict given as NumPy arrays.

        Every part is checked before any is assigned, so after an error (which names
        the full key) the layer keeps its previous weights.
        """
        owner = type(self).__name__
        parts = [(prefix, getattr(self, attribute)) for prefix, attribute in self._parts]
        parts += [("", self.feed_forward)]
        known = tuple(prefix for prefix, _ in self._parts) + ("linear1.", "linear2.")
        unexpected = sorted(name for name in state if not name.startswith(known))
        if unexpected:
            raise ValueError(f"{owner}: state_dict keys do not match; unexpected {unexpected}")
        checked = []
        for prefix, part in parts:
            own = (_prefixed(state, prefix) if prefix else
                   {name: array for name, array in state.items()
                    if name.startswith(("linear1.", "linear2."))})
            checked.append((part, part._checked_state(own, owner, prefix)))
        for part, arrays in checked:
            part._assign(arrays)


class TransformerEncoderLayer(_LayerBase):
    r"""Self-attention, Add & Norm, feed-forward, Add & Norm.

    Post-norm (``norm_first=False``, the original Transformer)::

        x = norm1(x + self_attn(x));  x = norm2(x + ffn(x))

    Pre-norm (``norm_first=True``)::

        x = x + self_attn(norm1(x));  x = x + ffn(norm2(x))

    Matches ``torch.nn.TransformerEncoderLayer(batch_first=True)`` in evaluation mode
    (no dropout), whose state_dict it loads (``self_attn.*``, ``linear1.*``,
    ``linear2.*``, ``norm1.*``, ``norm2.*``). ``dropout=p`` gives the attention
    dropout ``p`` in training mode (:meth:`train`); see :class:`MultiHeadAttention`.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> encoder = fastattn.TransformerEncoderLayer(32, 4, 64, norm_first=True, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((3, 12, 32)).astype(np.float32)
    >>> y = encoder(x, kv_lengths=[12, 7, 3])          # padded batch: later keys ignored
    >>> y.shape
    (3, 12, 32)
    >>> padded_tail = encoder(x[1:2, :7])              # entry 1's tokens alone
    >>> bool(np.allclose(y[1:2, :7], padded_tail, atol=1e-5))
    True
    """

    _parts = (("self_attn.", "self_attn"), ("norm1.", "norm1"), ("norm2.", "norm2"))

    def __init__(self, d_model, nhead, dim_feedforward=2048, *, norm_first=False,
                 activation="relu", layer_norm_eps=1e-5, dtype=np.float32, seed=None,
                 dropout=0.0):
        rng = np.random.default_rng(seed)
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, nhead, dtype=dtype,
                                            seed=int(rng.integers(2 ** 31)), dropout=dropout)
        self.feed_forward = FeedForward(d_model, dim_feedforward, activation=activation,
                                        dtype=dtype, rng=rng)
        self.norm1 = LayerNorm(d_model, layer_norm_eps, dtype=dtype)
        self.norm2 = LayerNorm(d_model, layer_norm_eps, dtype=dtype)

    def __call__(self, x, *, mask=None, causal=False, kv_lengths=None):
        """Encode ``x`` ``(batch, L, d_model)`` (or unbatched ``(L, d_model)``).

        Parameters
        ----------
        x : array_like, shape ``(batch, L, d_model)``
        mask : array_like of bool, optional
            True = may attend; the shapes of :meth:`MultiHeadAttention.__call__`.
        causal : bool, default False
        kv_lengths : array_like of int, optional
            Valid length of each padded sequence, shape ``(batch,)`` (PyTorch's
            ``src_key_padding_mask``).

        Returns
        -------
        ndarray, shape of ``x``
            In ``np.result_type`` of the parameters and ``x`` (integers in float64).
        """
        def attend(h):
            return self.self_attn(h, mask=mask, causal=causal, kv_lengths=kv_lengths)

        x = layer_input(type(self).__name__, "x", x, self.self_attn.embed_dim,
                        self.self_attn.dtype)  # (batch, L, d_model)
        if self.norm_first:
            x = x + attend(self.norm1(x))  # (batch, L, d_model)
            return x + self.feed_forward(self.norm2(x))
        x = self.norm1(x + attend(x))  # (batch, L, d_model)
        return self.norm2(x + self.feed_forward(x))


class TransformerDecoderLayer(_LayerBase):
    r"""Masked self-attention, cross-attention to the encoder's memory, feed-forward,
    each followed (post-norm) or preceded (pre-norm) by LayerNorm with a residual::

        x = norm1(x + self_attn(x, causal));  x = norm2(x + cross_attn(x, memory));
        x = norm3(x + ffn(x))

    Matches ``torch.nn.TransformerDecoderLayer(batch_first=True)`` in evaluation mode;
    state keys ``self_attn.*``, ``multihead_attn.*``, ``linear1/2.*``, ``norm1/2/3.*``.
    ``dropout=p`` gives both attentions dropout ``p`` in training mode (:meth:`train`).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> decoder = fastattn.TransformerDecoderLayer(32, 4, 64, seed=0)
    >>> rng = np.random.default_rng(0)
    >>> target = rng.standard_normal((2, 6, 32)).astype(np.float32)
    >>> memory = rng.standard_normal((2, 9, 32)).astype(np.float32)   # the encoder's output
    >>> y = decoder(target, memory)                    # causal self-attention, then cross
    >>> y.shape
    (2, 6, 32)

    Causal: a position's output does not depend on later target positions.

    >>> changed = target.copy()
    >>> changed[:, 4:] = 0.0
    >>> bool(np.allclose(decoder(changed, memory)[:, :4], y[:, :4], atol=1e-5))
    True
    """

    _parts = (("self_attn.", "self_attn"), ("multihead_attn.", "cross_attn"),
              ("norm1.", "norm1"), ("norm2.", "norm2"), ("norm3.", "norm3"))

    def __init__(self, d_model, nhead, dim_feedforward=2048, *, norm_first=False,
                 activation="relu", layer_norm_eps=1e-5, dtype=np.float32, seed=None,
                 dropout=0.0):
        rng = np.random.default_rng(seed)
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, nhead, dtype=dtype,
                                            seed=int(rng.integers(2 ** 31)), dropout=dropout)
        self.cross_attn = MultiHeadAttention(d_model, nhead, dtype=dtype,
                                             seed=int(rng.integers(2 ** 31)), dropout=dropout)
        self.feed_forward = FeedForward(d_model, dim_feedforward, activation=activation,
                                        dtype=dtype, rng=rng)
        self.norm1, self.norm2, self.norm3 = (LayerNorm(d_model, layer_norm_eps, dtype=dtype)
                                              for _ in range(3))

    def __call__(self, target, memory, *, causal=True, target_mask=None, memory_mask=None,
                 target_kv_lengths=None, memory_kv_lengths=None):
        """``target`` attends to itself (causally by default), then to ``memory``.

        Parameters
        ----------
        target : array_like, shape ``(batch, Lt, d_model)``
        memory : array_like, shape ``(batch, Lm, d_model)``
            The encoder's output; same batch size as ``target``.
        causal : bool, default True
            Causal self-attention (PyTorch's ``tgt_is_causal`` with a square
            subsequent mask).
        target_mask, memory_mask : array_like of bool, optional
            True = may attend; broadcastable to ``(batch, nhead, Lt, Lt)`` and
            ``(batch, nhead, Lt, Lm)`` as in :meth:`MultiHeadAttention.__call__`.
        target_kv_lengths, memory_kv_lengths : array_like of int, optional
            Valid lengths ``(batch,)`` of the padded target and memory (PyTorch's
            ``tgt_key_padding_mask`` and ``memory_key_padding_mask``).

        Returns
        -------
        ndarray, shape ``(batch, Lt, d_model)``
            In ``np.result_type`` of the parameters and the inputs.
        """
        def attend_self(h):
            return self.self_attn(h, mask=target_mask, causal=causal,
                                  kv_lengths=target_kv_lengths)

        def attend_memory(h):
            return self.cross_attn(h, memory, mask=memory_mask, kv_lengths=memory_kv_lengths)

        d_model, dtype = self.self_attn.embed_dim, self.self_attn.dtype
        x = layer_input(type(self).__name__, "target", target, d_model, dtype)  # (batch, Lt, d)
        memory = layer_input(type(self).__name__, "memory", memory, d_model,
                             dtype)  # (batch, Lm, d)
        if self.norm_first:
            x = x + attend_self(self.norm1(x))  # (batch, Lt, d)
            x = x + attend_memory(self.norm2(x))
            return x + self.feed_forward(self.norm3(x))
        x = self.norm1(x + attend_self(x))  # (batch, Lt, d)
        x = self.norm2(x + attend_memory(x))
        return self.norm3(x + self.feed_forward(x))
