"""Multi-head attention with learned projections, on top of the fused kernel."""

import numpy as np

from fastattn._contract.arguments import (as_mask_array, as_real_array, check_kv_lengths,
                                       result_dtypes)
from fastattn.layers.common import check_dtype, check_size, check_state
from fastattn.layers.linear import linear
from fastattn._contract.options import AttentionOptions
from fastattn._contract.problem import checked_problem


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
        Of the parameters (float32 or float64); see Notes for the computation's.
    seed : int, optional
        Seeds the initial weights (Xavier-uniform projections, zero biases, as PyTorch).
    dropout : float, default 0.0
        Attention dropout in ``[0, 1)``, applied while the layer is in training mode
        (:meth:`train`; a new layer is in evaluation mode, as it serves inference).
        Each call then draws a dropout seed from ``rng``
        (see ``dropout_p`` of :func:`fastattn.scaled_dot_product_attention`).
    rng : numpy.random.Generator, optional
        Where the dropout seeds come from (default: a generator seeded with ``seed``).

    Notes
    -----
    Weights are stored in PyTorch's ``(out, in)`` layout, and
    :meth:`load_state_dict` takes a ``torch.nn.MultiheadAttention`` state_dict given
    as NumPy arrays. Masks keep fastattn's polarity, True = may attend (PyTorch's
    boolean MHA masks mean the opposite).

    Dtypes follow the kernel's rules (:func:`fastattn.scaled_dot_product_attention`)
    with the weights as one more operand: the computation and the output take
    ``np.result_type`` of the parameters and the inputs. A float32 layer given float32
    inputs computes in float32; given float64 inputs (or int64 ones) it computes in
    float64 with its weights cast up, as NumPy's ``x @ W`` would; float16 and bool
    inputs are computed in the parameters' dtype. Complex, object and string inputs are a ``TypeError``.
    PyTorch instead refuses inputs whose dtype differs from the parameters'.

    Inputs are ``(batch, L, width)`` or, all of them at once, unbatched ``(L, width)``;
    query, key and value must agree on the batch size (no broadcasting of it).

    A query that can see no key (every key masked, ``kv_lengths`` 0) gets zero from
    every head, as the kernel's rule says, so its output is the output bias
    ``b_o``; PyTorch returns NaN for such rows.

    Examples
    --------
    Grouped-query self-attention (8 query heads sharing 2 key/value heads), then
    cross-attention to another sequence:

    >>> import numpy as np, fastattn
    >>> mha = fastattn.MultiHeadAttention(embed_dim=32, num_heads=8, num_kv_heads=2, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 10, 32)).astype(np.float32)
    >>> y = mha(x, causal=True, kv_lengths=[10, 6])       # (batch, L, embed_dim)
    >>> y.shape, y.dtype
    ((2, 10, 32), dtype('float32'))
    >>> memory = np.random.default_rng(1).standard_normal((2, 5, 32)).astype(np.float32)
    >>> out, weights = mha(y, memory, return_weights=True)
    >>> out.shape, weights.shape
    ((2, 10, 32), (2, 8, 10, 5))
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None,
                 bias=True, dtype=np.float32, seed=None, dropout=0.0, rng=None):
        embed_dim = check_size("embed_dim", embed_dim)
        num_heads = check_size("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else check_size("num_kv_heads",
                                                                         num_kv_heads)
        kdim = embed_dim if kdim is None else check_size("kdim", kdim)
        vdim = embed_dim if vdim is None else check_size("vdim", vdim)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a positive multiple of "
                             f"num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        self.dtype = check_dtype(dtype)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.kdim, self.vdim = kdim, vdim
        self.head_dim = embed_dim // num_heads
        self.kv_dim = self.head_dim * num_kv_heads
        self.has_bias = bias
        # checked as the kernel checks dropout_p (a ValueError naming it)
        self.dropout = AttentionOptions(dropout_p=dropout, dropout_seed=0).dropout_p
        self.training = False
        self.rng = np.random.default_rng(seed) if rng is None else rng
        if not isinstance(self.rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")

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

    def train(self, mode=True):
        """Training mode (``mode=True``: dropout applies) or evaluation mode; returns
        the layer, as PyTorch's ``Module.train``."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode: no dropout. Returns the layer."""
        return self.train(False)

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
            True = may attend. ``(Lq, Lk)`` for every entry and head, ``(batch, Lq, Lk)``
            shared by the heads, or ``(batch, num_heads, Lq, Lk)``; any axis may be 1.
            For unbatched inputs ``(Lq, Lk)`` or ``(num_heads, Lq, Lk)`` (PyTorch's
            unbatched ``attn_mask`` shapes). A mask that would broadcast the batch beyond
            the inputs' is a ``ValueError``.
        causal : bool, default False
            Key ``j`` visible to query ``i`` iff ``j <= i`` (top-left alignment).
        kv_lengths : array_like of int, optional
            Valid key count of each batch entry, shape ``(batch,)`` (a scalar for
            unbatched inputs); keys at and past it are padding, as PyTorch's
            ``key_padding_mask``.
        return_weights : bool, default False
            Also return the per-head weights ``(batch, num_heads, Lq, Lk)``
            (``(num_heads, Lq, Lk)`` unbatched). PyTorch averages them over the heads
            unless ``average_attn_weights=False``; these are never averaged.

        Returns
        -------
        out : ndarray, shape ``(batch, Lq, embed_dim)`` (``(Lq, embed_dim)`` unbatched)
            In ``np.result_type`` of the parameters and the inputs (see the class Notes).
        weights : ndarray, only if ``return_weights``

        Raises
        ------
        TypeError
            For inputs that are not real (complex, object, string), a non-boolean mask,
            non-integer ``kv_lengths``.
        ValueError
            For an input of the wrong width or rank, batch sizes or key/value lengths
            that differ, a mask that does not fit, ``kv_lengths`` of the wrong shape or
            out of ``[0, Lk]``, or an omitted key/value that cannot stand in (above).
        """
        from fastattn._dispatch.run import run_forward

        query, key, value, unbatched = self._inputs(query, key, value)
        batch, q_len, kv_len = query.shape[0], query.shape[1], key.shape[1]
        mask = self._mask(mask, unbatched, (batch, self.num_heads, q_len, kv_len))
        if kv_lengths is not None:
            if unbatched and np.ndim(kv_lengths) == 0:
                kv_lengths = np.reshape(kv_lengths, (1,))  # (1,)
            kv_lengths = check_kv_lengths(kv_lengths, () if unbatched else (batch,), kv_len)

        # projections in the inputs' compute dtype (linear casts the weights)
        q = linear(query, self.w_query, self.b_query,
                   split_heads=self.num_heads)  # (B, H, Lq, d_h)
        k = linear(key, self.w_key, self.b_key,
                   split_heads=self.num_kv_heads)  # (B, Hkv, Lk, d_h)
        v = linear(value, self.w_value, self.b_value,
                   split_heads=self.num_kv_heads)  # (B, Hkv, Lk, d_h)
        # the mask and kv_lengths are checked above: the problem is built, not re-checked
        dropout = {}
        if self.training and self.dropout > 0.0:  # a fresh seed per call
            dropout = dict(dropout_p=self.dropout,
                           dropout_seed=int(self.rng.integers(0, 2 ** 63, dtype=np.int64)))
        problem = checked_problem(q, k, v, mask=mask, kv_lengths=kv_lengths, causal=causal,
                                  gqa_group=self.num_heads // self.num_kv_heads, **dropout)
        heads, weights, _ = run_forward(problem, return_weights)  # (B, H, Lq, d_h)
        weights = weights if return_weights else None
        out = linear(heads, self.w_out, self.b_out, merge_heads=True)  # (B, Lq, E)
        if unbatched:
            out = out[0]  # (Lq, E)
            weights = None if weights is None else weights[0]  # (H, Lq, Lk)
        return (out, weights) if return_weights else out

    def _inputs(self, query, key, value):
        """Validate the inputs; return them batched, in the compute dtype, and whether
        they came unbatched."""
        key, value = self._default_key_value(key, value)
        arrays = {"query": (query, self.embed_dim)}
        if key is not None:
            arrays["key"] = (key, self.kdim)
        if value is not None:
            arrays["value"] = (value, self.vdim)
        checked = {}
        for name, (array, width) in arrays.items():
            array = as_real_array(name, array)
            if array.ndim not in (2, 3) or array.shape[-1] != width:
                raise ValueError(f"{name} must have shape (batch, L, {width}) or (L, {width}); "
                                 f"got {array.shape}")
            checked[name] = array
        shapes = ", ".join(f"{name} {array.shape}" for name, array in checked.items())
        if len({array.ndim for array in checked.values()}) > 1:
            raise ValueError(f"query, key and value must be all batched (3-D) or all "
                             f"unbatched (2-D); got {shapes}")
        if len({array.shape[:-2] for array in checked.values()}) > 1:
            raise ValueError(f"query, key and value must have the same batch size (axis 0); "
                             f"got {shapes}")
        key = checked.get("key", checked["query"])
        value = checked.get("value", key)
        if key.shape[-2] != value.shape[-2]:
            raise ValueError(f"key and value must have the same length Lk (axis -2); got key "
                             f"{key.shape} and value {value.shape}")
        dtype, _ = result_dtypes(self.dtype, *checked.values())
        query, key, value = (np.asarray(array, dtype) for array in (checked["query"], key, value))
        unbatched = query.ndim == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]  # (1, L, width) each
        return query, key, value, unbatched

    def _mask(self, mask, unbatched, full_shape):
        """The mask with a head axis, checked to broadcast to ``full_shape`` without
        enlarging it (a batch the inputs do not have would change the output's shape)."""
        if mask is None:
            return None
        mask = as_mask_array(mask)
        given = mask.shape
        if mask.ndim == 3:  # (batch, Lq, Lk) shared by the heads; unbatched: (H, Lq, Lk)
            mask = mask[None] if unbatched else mask[:, None]  # (B or 1, H or 1, Lq, Lk)
        elif unbatched and mask.ndim == 4:
            mask = mask[None]  # (1, B, H, Lq, Lk): refused below
        try:
            fits = np.broadcast_shapes(mask.shape, full_shape) == full_shape
        except ValueError:
            fits = False
        if not fits:
            forms = (f"(Lq, Lk) or (num_heads, Lq, Lk) = {full_shape[1:]}" if unbatched else
                     f"(Lq, Lk), (batch, Lq, Lk) or (batch, num_heads, Lq, Lk) = {full_shape}")
            raise ValueError(f"mask of shape {given} does not fit the "
                             f"{'unbatched ' if unbatched else ''}inputs: it must broadcast "
                             f"to {forms}")
        return mask

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
        return check_state(owner, state, expected, self.dtype, prefix)

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
