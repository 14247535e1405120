"""fastattn as a Hugging Face transformers attention implementation.

::

    import fastattn.huggingface
    fastattn.huggingface.register()          # adds attn_implementation="fastattn"
    model = AutoModel.from_pretrained(path, attn_implementation="fastattn")

:func:`register` adds two functions under one name: :func:`attention_forward` to
transformers' ``AttentionInterface`` (what each attention layer calls) and
:func:`attention_mask` to its ``AttentionMaskInterface`` (what a model calls once per
forward to build its mask). The mask function does not build a dense mask: it
recognises transformers' causal, sliding-window and bidirectional patterns and the 2-D
padding mask, and returns a :class:`StructuralMask` that :func:`attention_forward`
turns into fastattn's ``causal`` / ``causal_alignment`` / ``window`` / ``kv_lengths``
options (a ``(B, 1, 1, Lk)`` boolean mask for left padding). Only a pattern it does
not recognise (packed sequences, image-token overlays, ...) becomes a dense boolean
mask, built by transformers' own ``sdpa_mask``.

What a model passes to the attention function maps as follows:

================================  ==============================================
transformers                      fastattn
================================  ==============================================
``scaling``                       ``scale``
causal mask (``q_offset``,        ``causal=True``, ``causal_alignment``
``kv_offset`` from the cache)     ``"bottom_right"`` when decoding with a cache
sliding-window mask               ``window=(sliding_window - 1, 0)``
right padding                     ``kv_lengths``
left padding                      boolean mask ``(B, 1, 1, Lk)``
fewer kv heads than query heads   ``enable_gqa=True`` (K and V are not repeated)
``output_attentions=True``        ``return_weights=True``
a 4-D boolean / float mask        ``mask`` / ``bias``
``softcap``                       ``softcap`` (Gemma 2's ``attn_logit_softcapping``)
``dropout`` (training mode)       ``dropout_p``, its seed drawn from PyTorch's generator
``position_bias`` (T5)            ``bias``, with its gradient when it requires one
padding in an encoder's           the real tokens packed, ``varlen_attention``
self-attention (BERT)             (no work on padding)
================================  ==============================================

In an encoder's self-attention (a layer whose ``is_decoder`` is False: BERT and its
relatives) with a padded batch and nothing else in the mask, the real tokens of every
row are packed one after another and attended with
:func:`fastattn.torch.varlen_attention`, so no work is spent on padded queries or keys;
the outputs of padded positions, which no real token ever sees, are 0.

PyTorch and transformers are optional dependencies:
``pip install "fastattn[huggingface]"``.
"""

try:
    import torch
    import transformers
    from transformers import masking_utils
    from transformers.modeling_utils import AttentionInterface
except ImportError as error:  # pragma: no cover - exercised in an environment without them
    raise ImportError(
        "fastattn.huggingface needs PyTorch and transformers; install them with "
        'pip install "fastattn[huggingface]"') from error

import dataclasses
import warnings

import numpy as np

import fastattn
import fastattn.torch
from fastattn._dispatch import decode_steps, token_packing

__all__ = ["register", "attention_forward", "attention_mask", "StructuralMask"]

# The transformers releases this module is tested with (pyproject's "huggingface" extra):
# from the first to before the second.
TESTED_TRANSFORMERS = ((5, 24), (5, 25))

def register(name="fastattn"):
    """Register fastattn with transformers under ``name``.

    Afterwards ``attn_implementation=name`` (in ``from_pretrained``, ``from_config``
    or ``model.set_attn_implementation``) makes every attention layer that goes
    through transformers' ``AttentionInterface`` run on fastattn.

    Parameters
    ----------
    name : str, default "fastattn"
        The ``attn_implementation`` string to register.

    Returns
    -------
    str
        ``name``.

    Warns
    -----
    UserWarning
        When the installed transformers is outside the tested releases.

    Examples
    --------
    >>> import torch, transformers, fastattn.huggingface
    >>> fastattn.huggingface.register()
    'fastattn'
    >>> config = transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.AutoModelForCausalLM.from_config(
    ...     config, attn_implementation="fastattn").eval()
    >>> with torch.no_grad():
    ...     logits = model(torch.arange(1, 9)[None]).logits
    >>> logits.shape
    torch.Size([1, 8, 64])
    """
    version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    oldest, too_new = TESTED_TRANSFORMERS
    if not oldest <= version < too_new:
        warnings.warn(
            f"fastattn.huggingface is tested with transformers >={oldest[0]}.{oldest[1]},"
            f"<{too_new[0]}.{too_new[1]}; found {transformers.__version__}: masks it does not "
            "recognise fall back to dense boolean masks, and other changes may break it",
            stacklevel=2)
    AttentionInterface.register(name, attention_forward)
    masking_utils.AttentionMaskInterface.register(name, attention_mask)
    return name


@dataclasses.dataclass(frozen=True)
class StructuralMask:
    """What :func:`attention_mask` gives a model instead of a dense mask.

    Attributes
    ----------
    options : dict
        fastattn keywords (``causal``, ``causal_alignment``, ``window``,
        ``kv_lengths``) that say which keys each query may see.
    mask : numpy.ndarray of bool or None
        A boolean mask broadcastable to ``(B, H, Lq, Lk)`` for what ``options`` cannot
        say: ``(B, 1, 1, Lk)`` for left padding, ``(B, 1, Lq, Lk)`` for a pattern that
        was not recognised.
    shape : tuple of int
        ``(B, 1, Lq, Lk)``, the shape of the dense mask this stands for.

    Examples
    --------
    >>> import fastattn.huggingface
    >>> mask = fastattn.huggingface.attention_mask(1, 5, 5)      # causal, no padding
    >>> sorted(mask.options.items()), mask.mask, mask.shape, mask.ndim
    ([('causal', True), ('causal_alignment', 'bottom_right')], None, (1, 1, 5, 5), 4)
    """

    options: dict
    mask: np.ndarray | None
    shape: tuple

    @property
    def ndim(self):
        """4, as for the dense mask: transformers reads it when a mask built once (for
        a static cache, by ``generate``) comes back into the model."""
        return len(self.shape)


def attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                   mask_function=masking_utils.causal_mask_function, attention_mask=None,
                   local_size=None, device="cpu", **kwargs):
    """The mask function registered with ``AttentionMaskInterface``.

    Called by transformers' ``create_causal_mask`` and its siblings with the same
    arguments as ``sdpa_mask``. Query ``i`` sits at position ``i + q_offset`` and key
    ``j`` at ``j + kv_offset``; ``mask_function(b, h, q_pos, kv_pos)`` says who may
    attend, ``attention_mask`` is the 2-D padding mask ``(B, kv_offset + Lk)``
    (True = a real token).

    Returns
    -------
    StructuralMask
        fastattn options for transformers' own causal, sliding-window and
        bidirectional mask functions; a dense boolean mask, built by ``sdpa_mask``,
        for any other ``mask_function``. A ``StructuralMask`` given as
        ``attention_mask`` (one ``generate`` built ahead for a static cache) is
        returned as it is, as transformers returns a 4-D tensor mask.

    Examples
    --------
    Transformers' causal mask function with a right-padded batch becomes options,
    not a dense mask:

    >>> import torch, fastattn.huggingface
    >>> padding = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    >>> mask = fastattn.huggingface.attention_mask(2, 4, 4, attention_mask=padding)
    >>> mask.options["causal"], mask.options["kv_lengths"].tolist(), mask.mask
    (True, [4, 2], None)
    """
    if isinstance(attention_mask, StructuralMask):  # built already (generate, static cache)
        return attention_mask
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    shape = (batch_size, 1, q_length, kv_length)
    bounds = _recognise(mask_function)
    options = None if bounds is None else _position_options(bounds, q_length, kv_length,
                                                            q_offset - kv_offset)
    if options is None:  # a pattern not recognised, or an offset no alignment expresses
        dense = masking_utils.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
            local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
            use_vmap=kwargs.get("use_vmap", False), device=device)  # (B, 1, Lq, Lk)
        return StructuralMask({}, dense.numpy(), shape)
    mask = None
    if attention_mask is not None:
        padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padding[:, kv_offset:kv_offset + kv_length].numpy()  # (B, Lk) True = token
        mask, kv_lengths = _padding_options(padding)
        if kv_lengths is not None:
            options["kv_lengths"] = kv_lengths
    return StructuralMask(options, mask, shape)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, softcap=None, sliding_window=None,
                      output_attentions=False, position_bias=None, **kwargs):
    """The attention function registered with ``AttentionInterface``.

    Parameters
    ----------
    module : torch.nn.Module
        The calling attention layer (``is_causal`` and ``config`` are read from it).
    query : torch.Tensor, shape ``(B, Hq, Lq, D)``
    key, value : torch.Tensor, shape ``(B, Hkv, Lk, D)``
        ``Hq`` a multiple of ``Hkv``; the kv heads are not repeated.
    attention_mask : StructuralMask, torch.Tensor or None
        From :func:`attention_mask`, or a 4-D mask the caller prepared: boolean
        (True = may attend) or additive float. ``None`` means causal (top-left, as
        PyTorch's ``is_causal``) when the layer is causal and ``Lq > 1``, else no mask.
    dropout : float
        Attention dropout (models pass their configured rate in training mode, 0 in
        eval mode): fastattn's ``dropout_p``, its seed drawn from PyTorch's default
        generator, so ``torch.manual_seed`` repeats a training step.
    scaling : float, optional
        The score scale; default ``1 / sqrt(D)``.
    is_causal : bool, optional
        Overrides ``module.is_causal`` when ``attention_mask`` is None.
    softcap : float, optional
        Score soft-capping (Gemma 2); fastattn's kernels do not take it yet.
    sliding_window : int, optional
        Used only when ``attention_mask`` is None (the mask already carries it).
    output_attentions : bool
        Also return the attention weights ``(B, Hq, Lq, Lk)`` from the fused kernel.
    position_bias : torch.Tensor, optional
        An additive score bias (T5-style); it gets its gradient when it requires one
        (a learned relative-position bias trains).

    Returns
    -------
    attn_output : torch.Tensor, shape ``(B, Lq, Hq, D)``
    attn_weights : torch.Tensor or None

    Examples
    --------
    Called the way a transformers attention layer calls it, with the query heads'
    ``(B, H, L, D)`` tensors and a mask from :func:`attention_mask`:

    >>> import torch, fastattn.huggingface
    >>> generator = torch.Generator().manual_seed(0)
    >>> query = torch.randn(1, 4, 6, 8, generator=generator)
    >>> key, value = (torch.randn(1, 2, 6, 8, generator=generator) for _ in range(2))
    >>> layer = torch.nn.Module()
    >>> layer.is_causal = True
    >>> mask = fastattn.huggingface.attention_mask(1, 6, 6)
    >>> out, weights = fastattn.huggingface.attention_forward(layer, query, key, value, mask)
    >>> out.shape, weights                              # (B, L, H, D)
    (torch.Size([1, 6, 4, 8]), None)
    """
    out = _decoding_step(query, key, value, attention_mask, dropout, scaling, softcap,
                         output_attentions, position_bias)
    if out is not None:  # a generation loop's decoding step, prepared once per shape
        return out, None
    options = _score_options(softcap)
    tokens = _packed_tokens(module, query, key, attention_mask, output_attentions,
                            position_bias)
    if tokens is not None:  # an encoder's padded batch: the real tokens, packed
        return _packed_attention(query, key, value, tokens, scaling, dropout, options), None
    q_length = query.shape[-2]
    mask = bias = None
    if isinstance(attention_mask, StructuralMask):
        options.update(attention_mask.options)
        mask = attention_mask.mask
    elif attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and q_length > 1:
            options["causal"] = True
            if sliding_window is not None:
                options["window"] = (sliding_window - 1, 0)
    elif isinstance(attention_mask, torch.Tensor):
        if attention_mask.dtype == torch.bool:
            mask = attention_mask
        else:
            bias = attention_mask
    else:
        raise TypeError(f"attention_mask of type {type(attention_mask).__name__} is not supported "
                        "by fastattn (expected a fastattn StructuralMask, a tensor or None)")
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias

    # (B, Hq, Lq, D) arrives as a transposed view of (B, Lq, Hq, D); PyTorch's
    # threaded copy is cheaper than the one the kernels' layout step would make.
    results = fastattn.torch.scaled_dot_product_attention(
        query.contiguous(), key, value, mask, bias=bias, scale=scaling,
        enable_gqa=key.shape[-3] != query.shape[-3], return_weights=bool(output_attentions),
        dropout_p=float(dropout or 0.0), **options)
    out, weights = results if output_attentions else (results, None)  # out (B, Hq, Lq, D)
    return out.transpose(1, 2).contiguous(), weights  # (B, Lq, Hq, D)


# ---------------------------------------------------------------- decoding steps

def _decoding_step(query, key, value, attention_mask, dropout, scaling, softcap,
                   output_attentions, position_bias):
    """The output ``(B, 1, Hq, D)`` of a decoding step (one query per head, no
    gradient, no weights, no dropout, no position bias, a mask that is causal or
    absent: every cached key is visible), run through the step prepared for its
    shapes (:func:`fastattn._dispatch.decode_steps.decode_step`: checks and argument
    groups kept between tokens, bitwise the same results as the general path); None
    for any other call, which takes the general path."""
    if (query.shape[-2] != 1 or output_attentions or position_bias is not None or dropout
            or not query.is_cpu):
        return None
    if attention_mask is None:  # one query: nothing to hide
        keywords = {}
    elif (type(attention_mask) is StructuralMask and attention_mask.mask is None
          and "kv_lengths" not in attention_mask.options):
        keywords = dict(attention_mask.options)
    else:
        return None
    tracked = query.requires_grad or key.requires_grad or value.requires_grad
    if tracked and torch.is_grad_enabled():
        return None
    dtype = query.dtype
    if (dtype not in _DECODE_DTYPES or key.dtype != dtype or value.dtype != dtype
            or not (key.is_cpu and value.is_cpu)):
        return None  # the general path says what is wrong
    keywords.update(scale=scaling, enable_gqa=key.shape[-3] != query.shape[-3],
                    **_score_options(softcap))
    arrays = tuple(fastattn.torch._compute_array(tensor)
                   for tensor in (query, key, value))  # NumPy views, no copy
    step = decode_steps.decode_step(*arrays, keywords)
    if step is None:
        return None
    out = step(*arrays)  # (B, Hq, 1, D)
    batch, heads, _, value_dim = out.shape
    # one query per head: (B, Hq, 1, D) is laid out as (B, 1, Hq, D) already
    return fastattn.torch._as_tensor(out.reshape(batch, 1, heads, value_dim), dtype)


# the tensor dtypes of decoding steps (float16 and bfloat16 read as stored)
_DECODE_DTYPES = fastattn.torch.NATIVE_DTYPES + fastattn.torch.WIDENED_DTYPES


# ---------------------------------------------------------------- packed tokens

def _packed_tokens(module, query, key, attention_mask, output_attentions, position_bias):
    """Where the real tokens are, boolean ``(B, L)``, when a call can run on them alone:
    the self-attention of an encoder (``module.is_decoder`` False, not causal, not a
    cross-attention) whose mask is padding and nothing else; None otherwise (no
    padding, another pattern, weights asked for, a position bias)."""
    if (not isinstance(attention_mask, StructuralMask) or output_attentions
            or position_bias is not None or getattr(module, "is_decoder", None) is not False
            or getattr(module, "is_causal", False) or "Cross" in type(module).__name__):
        return None
    length = key.shape[-2]
    if set(attention_mask.options) - {"kv_lengths"} or query.shape[-2] != length:
        return None
    if "kv_lengths" in attention_mask.options:  # right padding
        return np.arange(length) < attention_mask.options["kv_lengths"][:, None]  # (B, L)
    mask = attention_mask.mask
    if mask is not None and mask.shape == (query.shape[0], 1, 1, length):  # other padding
        return mask[:, 0, 0, :]  # (B, L)
    return None


def _packed_attention(query, key, value, tokens, scaling, dropout, options):
    """Attention over the real tokens ``tokens`` ``(B, L)`` of each row only: gathered
    head-major (one copy of each of ``query``, ``key`` and ``value`` ``(B, H, L, D)``),
    attended by :func:`fastattn.torch.varlen_attention` and scattered back into a
    zeroed ``(B, L, H, D)`` output. Under autograd the gathers and the scatter are
    PyTorch's indexing (differentiable); without it, NumPy's, which start no threads
    (PyTorch's threaded indexing waits for its threads to wake, which costs more than
    these copies of a few MB)."""
    batch, heads, length, _ = query.shape
    cu_seqlens = np.zeros(batch + 1, np.int64)  # (B + 1,)
    np.cumsum(tokens.sum(axis=1), out=cu_seqlens[1:])
    attention_options = dict(scale=scaling, dropout_p=float(dropout or 0.0), **options)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (query, key, value)):
        mask = torch.from_numpy(np.ascontiguousarray(tokens))  # (B, L) bool
        packed = [tensor.transpose(0, 1)[:, mask].transpose(0, 1)  # (total, H, D) views of
                  for tensor in (query, key, value)]  # head-major (H, total, D) gathers
        out = fastattn.torch.varlen_attention(*packed, cu_seqlens, cu_seqlens,
                                              **attention_options)  # (total, H, D)
        full = out.new_zeros((batch, length, heads, out.shape[-1]))  # (B, L, H, D)
        full[mask] = out
        return full
    rows = np.flatnonzero(tokens)  # (total,) real tokens of the flattened (B * L)
    packed = [fastattn.torch._as_tensor(_gathered_rows(tensor, rows), tensor.dtype)
              for tensor in (query, key, value)]  # (total, H, D) each
    out = fastattn.torch.varlen_attention(*packed, cu_seqlens, cu_seqlens,
                                          **attention_options)  # (total, H, D)
    source_of = np.full(batch * length, -1, np.int64)  # (B * L,) packed row, -1 padding
    source_of[rows] = np.arange(rows.shape[0])
    full = token_packing.padded_rows(fastattn.torch._compute_array(out),
                                     source_of)  # (B * L, H, D), padding 0
    return fastattn.torch._as_tensor(full, out.dtype).view(batch, length, heads, -1)


def _gathered_rows(tensor, rows):
    """The rows ``rows`` of the tokens of ``tensor`` ``(B, H, L, D)``: a NumPy
    ``(total, H, D)`` view of a head-major ``(H, total, D)`` copy, made in one
    threaded pass."""
    tokens_first = fastattn.torch._compute_array(tensor).transpose(0, 2, 1, 3)  # (B, L, H, D)
    flat = tokens_first.reshape((-1,) + tokens_first.shape[2:])  # (B * L, H, D)
    return token_packing.packed_rows(flat, rows)  # (total, H, D)


# ---------------------------------------------------------------- score options

def _score_options(softcap):
    """fastattn keywords for the score modifications a model asks for: Gemma 2's
    ``attn_logit_softcapping`` arrives as ``softcap``, fastattn's keyword of the same
    meaning (``s = softcap * tanh(s / softcap)``), differentiated in the backward."""
    return {} if softcap is None else {"softcap": softcap}


# ---------------------------------------------------------------- masks

def _recognise(mask_function):
    """``(lower, upper)`` bounds on ``kv_pos - q_pos`` for transformers' own mask
    functions (None for an unbounded side), or None for any other function.

    causal: ``kv <= q``, upper 0; sliding window ``w`` over causal: ``kv > q - w``,
    lower ``1 - w``; bidirectional sliding window ``w``: ``|q - kv| <= w``.
    """
    if mask_function is masking_utils.causal_mask_function:
        return (None, 0)
    if mask_function is masking_utils.bidirectional_mask_function:
        return (None, None)
    if getattr(mask_function, "__module__", None) != masking_utils.__name__:
        return None
    parts = _closure(mask_function)
    name = mask_function.__qualname__
    if name == "sliding_window_overlay.<locals>.inner_mask":
        return (1 - int(parts["sliding_window"]), None)
    if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":
        window = int(parts["sliding_window"])
        return (-window, window)
    if name == "and_masks.<locals>.and_mask":
        parts = [_recognise(part) for part in parts.get("mask_functions", ())]
        if not parts or None in parts:
            return None
        lowers = [lower for lower, _ in parts if lower is not None]
        uppers = [upper for _, upper in parts if upper is not None]
        return (max(lowers) if lowers else None, min(uppers) if uppers else None)
    return None


def _closure(function):
    cells = function.__closure__ or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells)))


def _position_options(bounds, q_length, kv_length, offset):
    """fastattn's ``causal`` / ``causal_alignment`` / ``window`` for keys ``j`` visible
    to query ``i`` iff ``lower <= j - (i + offset) <= upper``, or None when no
    alignment can place them (``offset = q_offset - kv_offset``)."""
    lower, upper = bounds
    if lower is None and upper is None:
        return {}
    # bottom_right places the diagonal at Lk - Lq: what a cache gives while decoding
    alignment, diagonal = ("bottom_right", kv_length - q_length) if offset == kv_length - q_length \
        else ("top_left", 0)
    shift = offset - diagonal
    options = {"causal_alignment": alignment}
    if upper == 0 and shift == 0:
        options["causal"] = True
    unbounded = q_length + kv_length + abs(offset)
    left = unbounded if lower is None else -(lower + shift)
    right = unbounded if upper is None else upper + shift
    if left < 0 or right < 0:
        return None
    if lower is not None or not options.get("causal"):
        options["window"] = (left, right)
    return options


def _padding_options(padding):
    """``(mask, kv_lengths)`` for a 2-D padding mask ``(B, Lk)``: kv_lengths when
    every row is tokens then padding, else a ``(B, 1, 1, Lk)`` boolean mask."""
    if padding.all():
        return None, None
    lengths = padding.sum(axis=1)  # (B,)
    if np.array_equal(padding, np.arange(padding.shape[1]) < lengths[:, None]):
        return None, lengths.astype(np.int64)
    return padding[:, None, None, :], None  # (B, 1, 1, Lk)
