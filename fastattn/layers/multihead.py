"""Multi-head attention with learned projections, on top of the fused kernel."""

import numpy as np

from fastattn.layers.common import check_state


class MultiHeadAttention:
    r"""Multi-head (and grouped-query) attention with projections W_q, W_k, W_v, W_o.

    .. math::

        \mathrm{head}_h = \mathrm{softmax}\!\left(\frac{Q_h K_h^\top}{\sqrt{d_h}}\right) V_h,
        \quad Q = X_q W_q^\top + b_q,\ K = X_k W_k^\top + b_k,\ V = X_v W_v^\top + b_v,

        \mathrm{out} = \mathrm{concat}(\mathrm{head}_1, \dots, \mathrm{head}_H)\, W_o^\top + b_o

    with ``d_h = embed_dim // num_heads``. Under grouped-query attention
    (``num_kv_heads < num_heads``) K and V have ``num_kv_heads`` heads, each shared
    by ``num_heads // num_kv_heads`` query heads.

    Parameters
    ----------
    embed_dim : int
        Width of queries and of the output; divisible by ``num_heads``.
    num_heads : int
    num_kv_heads : int, optional
        Heads of K and V (default ``num_heads``); must divide ``num_heads``.
    kdim, vdim : int, optional
        Widths of the key and value inputs (default ``embed_dim``).
    bias : bool, default True
        Whether the projections have biases.
    dtype : dtype, default float32
        Of the parameters and the computation (float32 or float64).
    seed : int, optional
        Seeds the initial weights (Xavier-uniform projections, zero biases, as PyTorch).

    Notes
    -----
    Weights are stored in PyTorch's ``(out, in)`` layout, and
    :meth:`load_state_dict` takes a ``torch.nn.MultiheadAttention`` state_dict given
    as NumPy arrays. Masks keep fastattn's polarity, True = may attend (PyTorch's
    boolean MHA masks mean the opposite).
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None,
                 bias=True, dtype=np.float32, seed=None):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a positive multiple of "
                             f"num_heads={num_heads}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64; got {self.dtype}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.head_dim = embed_dim // num_heads
        self.kv_dim = self.head_dim * num_kv_heads
        self.has_bias = bias

        rng = np.random.default_rng(seed)

        def xavier(rows, cols):
            bound = np.sqrt(6.0 / (rows + cols))
            return rng.uniform(-bound, bound, (rows, cols)).astype(self.dtype)

        self.w_query = xavier(embed_dim, embed_dim)  # (E, E)
        self.w_key = xavier(self.kv_dim, self.kdim)  # (kv_dim, kdim)
        self.w_value = xavier(self.kv_dim, self.vdim)  # (kv_dim, vdim)
        self.w_out = xavier(embed_dim, embed_dim)  # (E, E)
        zeros = (lambda size: np.zeros(size, self.dtype)) if bias else (lambda size: None)
        self.b_query, self.b_key = zeros(embed_dim), zeros(self.kv_dim)
        self.b_value, self.b_out = zeros(self.kv_dim), zeros(embed_dim)

    # ------------------------------------------------------------ forward

    def __call__(self, query, key=None, value=None, *, mask=None, causal=False,
                 kv_lengths=None, return_weights=False):
        """Attend from ``query`` to ``key``/``value`` (self-attention when ``key`` is None).

        Parameters
        ----------
        query : array_like, shape ``(batch, Lq, embed_dim)`` (or ``(Lq, embed_dim)``)
        key : array_like, shape ``(batch, Lk, kdim)``, optional
            Omitted (None): self-attention, ``query`` is also key and value, which needs
            ``kdim == vdim == embed_dim`` (else ``ValueError``).
        value : array_like, shape ``(batch, Lk, vdim)``, optional
            Omitted: ``key`` is also the value, which needs ``vdim == kdim`` (else
            ``ValueError``). PyTorch's ``forward`` has no such default; giving
            ``value`` without ``key`` is a ``ValueError``.
        mask : array_like of bool, optional
            True = may attend; broadcastable to ``(batch, num_heads, Lq, Lk)``, or
            ``(batch, Lq, Lk)`` (shared by the heads).
        causal : bool, default False
        kv_lengths : array_like of int, optional
            Valid key count of each batch entry (padded batches).
        return_weights : bool, default False
            Also return the per-head weights ``(batch, num_heads, Lq, Lk)``.

        Returns
        -------
        out : ndarray, shape ``(batch, Lq, embed_dim)``
        weights : ndarray, only if ``return_weights``
        """
        from fastattn.attention import scaled_dot_product_attention

        key, value = self._default_key_value(key, value)
        query, unbatched = self._batched("query", query, self.embed_dim)
        key = query if key is None else self._batched("key", key, self.kdim)[0]
        value = key if value is None else self._batched("value", value, self.vdim)[0]
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key {key.shape} and value {value.shape} must share (batch, Lk)")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.ndim == 3:  # (batch, Lq, Lk): the same for every head
                mask = mask[:, None]  # (batch, 1, Lq, Lk)

        q = self._heads(query @ self.w_query.T, self.b_query, self.num_heads)  # (B, H, Lq, d_h)
        k = self._heads(key @ self.w_key.T, self.b_key, self.num_kv_heads)  # (B, Hkv, Lk, d_h)
        v = self._heads(value @ self.w_value.T, self.b_value, self.num_kv_heads)  # (B, Hkv, Lk, d_h)
        result = scaled_dot_product_attention(
            q, k, v, mask, causal=causal, kv_lengths=kv_lengths,
            enable_gqa=self.num_kv_heads != self.num_heads, return_weights=return_weights)
        heads, weights = result if return_weights else (result, None)  # (B, H, Lq, d_h)
        batch, _, q_len, _ = heads.shape
        merged = heads.transpose(0, 2, 1, 3).reshape(batch, q_len, self.embed_dim)  # (B, Lq, E)
        out = merged @ self.w_out.T  # (B, Lq, E)
        if self.b_out is not None:
            out += self.b_out
        if unbatched:
            out = out[0]
            weights = None if weights is None else weights[0]
        return (out, weights) if return_weights else out

    def _default_key_value(self, key, value):
        """Check that the omitted inputs can stand in for each other (None = omitted)."""
        if key is None:
            if value is not None:
                raise ValueError("value was given without key; pass key as well (key=None "
                                 "means self-attention, with query as key and value)")
            for name, width in (("kdim", self.kdim), ("vdim", self.vdim)):
                if width != self.embed_dim:
                    raise ValueError(
                        f"self-attention (key=None) uses query as key and value, which needs "
                        f"kdim == vdim == embed_dim; this layer has {name}={width}, "
                        f"embed_dim={self.embed_dim}: pass key and value")
        elif value is None and self.vdim != self.kdim:
            raise ValueError(f"value=None uses key as the value, which needs vdim == kdim; this "
                             f"layer has kdim={self.kdim}, vdim={self.vdim}: pass value")
        return key, value

    def _batched(self, name, array, width):
        array = np.asarray(array, self.dtype)
        if array.ndim not in (2, 3) or array.shape[-1] != width:
            raise ValueError(f"{name} must have shape (batch, L, {width}) or (L, {width}); "
                             f"got {array.shape}")
        return (array[None], True) if array.ndim == 2 else (array, False)

    def _heads(self, projected, bias, heads):
        """``(B, L, heads * d_h)`` plus bias, as a ``(B, heads, L, d_h)`` view."""
        if bias is not None:
            projected += bias
        batch, length, _ = projected.shape
        return projected.reshape(batch, length, heads, self.head_dim).transpose(0, 2, 1, 3)

    # ------------------------------------------------------------ weights

    @property
    def packed(self):
        """Whether PyTorch would pack the projections into one ``in_proj_weight``."""
        return (self.kdim == self.embed_dim and self.vdim == self.embed_dim
                and self.num_kv_heads == self.num_heads)

    def state_dict(self):
        """Weights under PyTorch ``nn.MultiheadAttention``'s names, as NumPy arrays."""
        if self.packed:
            state = {"in_proj_weight": np.concatenate([self.w_query, self.w_key, self.w_value])}
        else:
            state = {"q_proj_weight": self.w_query.copy(), "k_proj_weight": self.w_key.copy(),
                     "v_proj_weight": self.w_value.copy()}
        state["out_proj.weight"] = self.w_out.copy()
        if self.has_bias:
            state["in_proj_bias"] = np.concatenate([self.b_query, self.b_key, self.b_value])
            state["out_proj.bias"] = self.b_out.copy()
        return state

    def load_state_dict(self, state):
        """Load a PyTorch ``nn.MultiheadAttention`` state_dict given as NumPy arrays.

        Takes the packed form (``in_proj_weight``, which PyTorch uses when
        ``kdim == vdim == embed_dim``) or the separate one (``q_proj_weight``,
        ``k_proj_weight``, ``v_proj_weight``, which PyTorch uses otherwise), plus
        ``out_proj.weight`` and, with biases, ``in_proj_bias`` and ``out_proj.bias``.
        Under grouped-query attention the key and value rows are ``num_kv_heads * d_h``.

        Raises
        ------
        ValueError
            For a missing or unexpected key, an array of the wrong shape, or the packed
            form on a layer whose ``kdim`` or ``vdim`` differ from ``embed_dim``; the
            message names the key.
        TypeError
            For an array that does not hold real numbers.

        Notes
        -----
        Loading is all or nothing: every entry is checked before any is assigned, so
        after an error the layer keeps its previous weights.
        """
        self._assign(self._checked_state(state))

    def _checked_state(self, state, owner="MultiHeadAttention", prefix=""):
        """Validated weights of ``state`` cast to the layer's dtype, not yet assigned."""
        e, kv = self.embed_dim, self.kv_dim
        expected = {"out_proj.weight": (e, e)}
        if "in_proj_weight" in state:
            if self.kdim != e or self.vdim != e:
                raise ValueError(
                    f"{owner}: state_dict[{prefix + 'in_proj_weight'!r}] is the packed "
                    f"form, which holds keys and values of width embed_dim={e}; this layer "
                    f"has kdim={self.kdim}, vdim={self.vdim}: give q_proj_weight, "
                    f"k_proj_weight and v_proj_weight (as PyTorch does for such layers)")
            expected["in_proj_weight"] = (e + 2 * kv, e)
        else:
            expected.update({"q_proj_weight": (e, e), "k_proj_weight": (kv, self.kdim),
                             "v_proj_weight": (kv, self.vdim)})
        if self.has_bias:
            expected.update({"in_proj_bias": (e + 2 * kv,), "out_proj.bias": (e,)})
        arrays = check_state(owner, state, expected, prefix)
        return {name: array.astype(self.dtype) for name, array in arrays.items()}

    def _assign(self, arrays):
        e, kv = self.embed_dim, self.kv_dim
        if "in_proj_weight" in arrays:
            self.w_query, self.w_key, self.w_value = np.split(arrays["in_proj_weight"],
                                                              [e, e + kv])
        else:
            self.w_query, self.w_key, self.w_value = (
                arrays["q_proj_weight"], arrays["k_proj_weight"], arrays["v_proj_weight"])
        self.w_out = arrays["out_proj.weight"]
        if self.has_bias:
            self.b_query, self.b_key, self.b_value = np.split(arrays["in_proj_bias"],
                                                              [e, e + kv])
            self.b_out = arrays["out_proj.bias"]
