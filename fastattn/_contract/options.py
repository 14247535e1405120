"""The options of an attention call: one frozen, keyword-only object, validated once.

Every front end (the NumPy functions, their backward, :mod:`reference`,
:mod:`fastattn.dask`, :mod:`fastattn.torch`, the Hugging Face backend, the layers)
takes the same keyword options. They are declared once, here, as the fields of
:class:`AttentionOptions`, with their documentation in :data:`OPTION_DOCS`; the
front ends take them as ``**options`` and get their signature and the
"Parameters" entries of their docstring from this module
(:func:`takes_options`). What the options mean for a call of given shapes (the
default scale, the diagonal offset, whether a bias broadcasts) is worked out by
:func:`fastattn._contract.problem.check_attention`, which holds the options
object in the :class:`~fastattn._contract.problem.AttentionProblem` it returns.

Adding an option: a field and its documentation here (with its scalar checks in
``__post_init__``), its array checks in the problem (if it is an array), its step
in the kernels' score step and in the reference, and its tests.

This module imports NumPy only.
"""

import dataclasses
import functools
import inspect
import math
import numbers
import operator

import numpy as np

from fastattn._contract.arguments import check_kv_lengths

__all__ = ["AttentionOptions", "OPTION_DOCS", "CAUSAL_ALIGNMENTS", "options_from",
           "takes_options", "DEFAULT_OPTIONS"]

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class AttentionOptions:
    """The keyword options of the attention functions (see :data:`OPTION_DOCS`).

    Scalars are checked and normalised when the object is made (``window`` becomes a
    pair of ints, ``scale`` and ``softcap`` Python floats, ``causal`` and
    ``enable_gqa`` bools); arrays and user functions are kept as given and checked
    against the call's shapes by :func:`~fastattn._contract.problem.check_attention`.

    Examples
    --------
    >>> from fastattn._contract.options import AttentionOptions
    >>> AttentionOptions(causal=True, window=(4, 0)).window
    (4, 0)
    """

    bias: object = None
    causal: bool = False
    causal_alignment: str = "top_left"
    window: object = None
    kv_lengths: object = None
    scale: object = None
    enable_gqa: bool = False
    softcap: object = None
    alibi_slopes: object = None
    score_mod: object = None
    mask_mod: object = None
    block_mask: object = None
    score_mod_args: object = None
    mask_mod_args: object = None
    dropout_p: float = 0.0
    dropout_seed: object = None
    chunk_of: object = None
    # derived once, in __post_init__ (read on every call)
    has_score_functions: bool = dataclasses.field(init=False, repr=False, default=False)
    has_operands: bool = dataclasses.field(init=False, repr=False, default=False)
    set_names: frozenset = dataclasses.field(init=False, repr=False, default=frozenset())

    def __post_init__(self):
        dropout_p = _check_dropout_p(self.dropout_p)
        normalised = dict(
            causal=bool(self.causal), enable_gqa=bool(self.enable_gqa),
            causal_alignment=_check_causal_alignment(self.causal_alignment),
            window=_check_window(self.window), scale=_check_scale(self.scale),
            softcap=_check_softcap(self.softcap), dropout_p=dropout_p,
            dropout_seed=_check_dropout_seed(self.dropout_seed, dropout_p),
            chunk_of=_check_chunk_of(self.chunk_of))
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        # whether a user function (score_mod, mask_mod, block mask) shapes the scores
        has_score_functions = (self.score_mod is not None or self.mask_mod is not None
                               or self.block_mask is not None
                               or self.score_mod_args is not None
                               or self.mask_mod_args is not None)
        object.__setattr__(self, "has_score_functions", has_score_functions)
        # whether any option beyond the scalar ones (flags, scale, window, softcap) is
        # set: such calls cannot share their kernels' argument groups with other calls
        object.__setattr__(self, "has_operands", not (
            self.bias is None and self.kv_lengths is None and self.alibi_slopes is None
            and not has_score_functions and self.dropout_p == 0.0 and self.chunk_of is None))
        # the names of the options not at their default (the keys of as_keywords()),
        # read by the dispatch on every call
        object.__setattr__(self, "set_names", frozenset(self.as_keywords()))

    def replace(self, **changes):
        """A copy with ``changes`` (checked as in the constructor)."""
        return dataclasses.replace(self, **changes)

    def as_keywords(self, *, skip_defaults=True):
        """The options as a dict of keyword arguments (those left at their default
        omitted unless ``skip_defaults=False``), to pass on to another front end."""
        keywords = {}
        for field in dataclasses.fields(self):
            if not field.init:  # derived
                continue
            value = getattr(self, field.name)
            at_default = value is field.default or (
                type(value) in (bool, int, float, str) and value == field.default)
            if not (skip_defaults and at_default):
                keywords[field.name] = value
        return keywords

    def checked_arrays(self, batch_shape, kv_len):
        """The array options that depend only on the batch shape and ``Lk``, checked:
        ``kv_lengths`` as int64, one entry per index of the first batch axis; ALiBi
        slopes as float64 broadcast to ``batch_shape`` (a read-only view). A dict of
        the new values, to :meth:`replace` with. Also checks that ``chunk_of`` places
        this batch shape inside its larger one (a ``ValueError`` naming it)."""
        if self.chunk_of is not None:
            whole_batch, batch_start = self.chunk_of[:2]
            if (len(whole_batch) != len(batch_shape)
                    or any(start + size > whole for start, size, whole
                           in zip(batch_start, batch_shape, whole_batch))):
                raise ValueError(
                    f"chunk_of: a batch of shape {tuple(batch_shape)} starting at "
                    f"{batch_start} is not a block of the batch shape {whole_batch}")
        return dict(kv_lengths=check_kv_lengths(self.kv_lengths, batch_shape, kv_len),
                    alibi_slopes=_check_alibi_slopes(self.alibi_slopes, batch_shape))

    def entry_positions(self, batch_shape, heads):
        """Where the dropout decisions (and the user functions) of a call with this
        (local) ``batch_shape`` are taken: ``(b, h, row_offset, key_offset)``, the int64
        ``(N,)`` arrays ``b`` and ``h`` of every entry of the flattened batch and the
        offsets added to query and key positions. Those of the call itself
        (``divmod(entry, heads)``, no offsets), or, with ``chunk_of``, of the larger
        call this one is a chunk of."""
        n_batch = int(np.prod(batch_shape, dtype=np.int64))
        if self.chunk_of is None:
            entries = np.arange(n_batch, dtype=np.int64)  # (N,)
            return entries // heads, entries % heads, 0, 0
        whole_batch, batch_start, row_offset, key_offset = self.chunk_of[:4]
        entries = np.zeros(n_batch, np.int64)  # (N,) entries of the whole call, C order
        if batch_shape:
            local = np.unravel_index(np.arange(n_batch), batch_shape)  # per axis (N,)
            entries = np.ravel_multi_index(tuple(index + start for index, start
                                                 in zip(local, batch_start)),
                                           whole_batch).astype(np.int64)  # (N,)
        whole_heads = whole_batch[-1] if len(whole_batch) >= 2 else 1
        return entries // whole_heads, entries % whole_heads, row_offset, key_offset

    dropout_positions = entry_positions  # the name the dropout code reads


FIELD_NAMES = tuple(field.name for field in dataclasses.fields(AttentionOptions)
                    if field.init)
FIELD_SET = frozenset(FIELD_NAMES)


def options_from(keywords, function_name="scaled_dot_product_attention"):
    """The :class:`AttentionOptions` of a front end's ``**keywords``.

    An unknown keyword is a ``TypeError`` naming ``function_name``, as Python's own
    message for a function with explicit parameters would. Calls repeating the same
    scalar options (decoding loops, tiny calls) share one object, looked up by the
    keywords as given.
    """
    if not keywords:
        return DEFAULT_OPTIONS
    try:
        try:
            return _scalar_options(tuple(keywords.items()))
        except TypeError as error:  # an array or another unhashable value
            if "unhashable" not in str(error):
                raise
        return AttentionOptions(**keywords)
    except TypeError:
        unknown = sorted(keywords.keys() - FIELD_SET)
        if unknown:
            raise TypeError(f"{function_name}() got an unexpected keyword argument "
                            f"{unknown[0]!r}") from None
        raise


@functools.lru_cache(maxsize=64)
def _scalar_options(items):
    return AttentionOptions(**dict(items))


def _check_causal_alignment(causal_alignment):
    if causal_alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(
            f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}; got {causal_alignment!r}")
    return causal_alignment


def _check_window(window):
    """``window`` as a ``(left, right)`` pair of non-negative ints, or None."""
    if window is None:
        return None
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(
            f"window must be None or a pair (left, right) of non-negative ints; got {window!r}"
        ) from None
    for side, reach in (("left", left), ("right", right)):
        if isinstance(reach, (bool, np.bool_)) or not isinstance(reach, numbers.Integral):
            raise TypeError(f"window {side} must be an int; got {reach!r} in window={window!r}")
        if reach < 0:
            raise ValueError(f"window must be non-negative; got {side}={reach} in window={window!r}")
    return int(left), int(right)


def _check_scale(scale):
    """``scale`` as a finite Python float, or None (the default, ``1 / sqrt(Dk)``)."""
    if scale is None:
        return None
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number; got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    return scale


def _check_dropout_p(dropout_p):
    """``dropout_p`` as a Python float in ``[0, 1)``."""
    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number in [0, 1); got {dropout_p!r}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1); got {dropout_p}")
    return dropout_p


def _check_dropout_seed(dropout_seed, dropout_p):
    """``dropout_seed`` as a Python int in ``[0, 2**64)``; required when
    ``dropout_p > 0`` (the backward regenerates the decisions from it)."""
    if dropout_seed is None:
        if dropout_p > 0.0:
            raise ValueError(
                f"dropout_p={dropout_p} needs dropout_seed=, an int in [0, 2**64): the "
                "backward regenerates the same dropout decisions from it (pass the same "
                "seed to scaled_dot_product_attention_backward)")
        return None
    if isinstance(dropout_seed, (bool, np.bool_)) or not isinstance(dropout_seed,
                                                                     numbers.Integral):
        raise TypeError(f"dropout_seed must be an int in [0, 2**64); got {dropout_seed!r}")
    dropout_seed = int(dropout_seed)
    if not 0 <= dropout_seed < 2 ** 64:
        raise ValueError(f"dropout_seed must lie in [0, 2**64); got {dropout_seed}")
    return dropout_seed


def _check_chunk_of(chunk_of):
    """``chunk_of`` as ``(batch_shape, batch_start, row_start, key_start,
    mask_batch_shape)`` of non-negative Python ints (two tuples, two ints, a tuple
    that broadcasts to ``batch_shape`` or None; it may be left out), or None."""
    if chunk_of is None:
        return None
    try:
        whole_batch, batch_start, row_start, key_start, *mask_batch = chunk_of
        if len(mask_batch) > 1:
            raise ValueError("too many entries")
        mask_batch = mask_batch[0] if mask_batch else None
        if mask_batch is not None:
            mask_batch = tuple(operator.index(size) for size in mask_batch)
            np.broadcast_shapes(mask_batch, tuple(whole_batch))
        whole_batch = tuple(operator.index(size) for size in whole_batch)
        batch_start = tuple(operator.index(start) for start in batch_start)
        row_start, key_start = operator.index(row_start), operator.index(key_start)
    except (TypeError, ValueError):
        raise ValueError(f"chunk_of must be (batch_shape, batch_start, row_start, key_start"
                         f"[, mask_batch_shape]) of non-negative ints, mask_batch_shape "
                         f"broadcasting to batch_shape; got {chunk_of!r}") from None
    if (len(batch_start) != len(whole_batch) or min(whole_batch + batch_start, default=0) < 0
            or row_start < 0 or key_start < 0):
        raise ValueError(f"chunk_of must be (batch_shape, batch_start, row_start, key_start) "
                         f"of non-negative ints, batch_start as long as batch_shape; got "
                         f"{chunk_of!r}")
    return whole_batch, batch_start, row_start, key_start, mask_batch


def _check_softcap(softcap):
    """``softcap`` as a positive finite Python float, or None."""
    if softcap is None:
        return None
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be None or a positive real number; got {softcap!r}")
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap > 0.0):
        raise ValueError(f"softcap must be positive and finite; got {softcap}")
    return softcap


def _check_alibi_slopes(alibi_slopes, batch_shape):
    """Return ``alibi_slopes`` as a float64 array broadcast to ``batch_shape``, or None.

    The slopes must be real, finite and broadcastable to the batch shape (``(H,)``
    for ``(B, H, L, D)`` inputs, a scalar for 2-D inputs).
    """
    if alibi_slopes is None:
        return None
    slopes = np.asarray(alibi_slopes)
    if slopes.dtype.kind not in "iuf":
        raise TypeError(f"alibi_slopes must hold real numbers (int or float); "
                        f"got dtype {slopes.dtype}")
    try:
        broadcast = np.broadcast_shapes(slopes.shape, batch_shape)
    except ValueError:
        broadcast = None
    if broadcast != tuple(batch_shape):
        raise ValueError(
            f"alibi_slopes of shape {slopes.shape} does not broadcast to the batch shape "
            f"{tuple(batch_shape)} (for (B, H, L, D) inputs pass one slope per head, (H,))")
    slopes = slopes.astype(np.float64)
    if not np.isfinite(slopes).all():
        raise ValueError("alibi_slopes must be finite; got "
                         f"{slopes[~np.isfinite(slopes)].ravel()[:3].tolist()} among them")
    return np.broadcast_to(slopes, batch_shape)


# How the options build a score, in order (the contract's order; the kernels' score step
# and the reference follow it). Indented for a docstring.
SCORE_ORDER_DOC = """\
    A score is built in this order: ``s = scale * q.k``; with ``softcap``,
    ``s = softcap * tanh(s / softcap)``; with ALiBi slopes (``alibi_slopes``),
    ``s -= slope * |i + off - j|``; then the bias is added; then
    ``s = score_mod(s, b, h, i, j)``; finally keys hidden by the mask, the
    structural rules or ``mask_mod`` become ``-inf``. With ``dropout_p``, each
    probability of the softmax is then kept with probability ``1 - dropout_p`` and
    scaled by ``1 / (1 - dropout_p)`` (weights and lse are before dropout)."""

# numpydoc "Parameters" entries of the options, in the order of the fields.
OPTION_DOCS = {
    "bias": ("array_like, optional", """
        Real, broadcastable to ``(*batch, Lq, Lk)``, added to the scaled scores.
        ``-inf`` hides a key; ``+inf`` is refused. Cast to the compute dtype."""),
    "causal": ("bool, default False", """
        Key ``j`` is visible to query ``i`` only if ``j <= i + off``."""),
    "causal_alignment": ('{"top_left", "bottom_right"}, default "top_left"', """
        ``off = 0`` (PyTorch ``is_causal``) or ``off = Lk - Lq`` (KV-cache decoding).
        Also places the window."""),
    "window": ("(int, int), optional", """
        ``(left, right)``: key ``j`` visible iff ``i + off - left <= j <= i + off + right``."""),
    "kv_lengths": ("array_like of int, optional", """
        One per index of the first batch axis (one entry for 2-D inputs): keys
        ``j >= kv_lengths[b]`` are padding."""),
    "scale": ("float, optional", """
        Finite; default ``1 / sqrt(Dk)`` (1.0 when ``Dk == 0``)."""),
    "enable_gqa": ("bool, default False", """
        Grouped-query attention: axis -3 is heads, query head ``h`` uses kv head
        ``h // (Hq // Hkv)``."""),
    "softcap": ("float, optional", """
        Positive and finite: caps the scores smoothly, ``s = softcap * tanh(s /
        softcap)`` (Gemma 2, Grok; FlashAttention's ``softcap``)."""),
    "alibi_slopes": ("array_like, optional", """
        Real and finite, broadcastable to the batch shape (``(H,)`` for
        ``(B, H, L, D)`` inputs): ``s -= slope * |i + off - j|``, ``off`` as in
        ``causal_alignment`` (ALiBi; FlashAttention's ``alibi_slopes``)."""),
    "score_mod": ("numba-compiled function ``(s, b, h, i, j, *score_mod_args) -> float``, optional", """
        Called on each score ``s`` of query ``i`` and key ``j`` inside the kernels
        (no ``(Lq, Lk)`` array is built); its result is the new score. ``b`` and
        ``h``: with two or more batch axes ``h`` indexes the last one (heads) and
        ``b`` the others, flattened in C order; with one, ``b`` indexes it and
        ``h = 0``; with none both are 0. A ``-inf`` score (a key hidden by a ``-inf``
        bias) is left alone. Arrays it captures are frozen when it is compiled;
        pass arrays that change as ``score_mod_args``."""),
    "mask_mod": ("numba-compiled function ``(b, h, i, j, *mask_mod_args) -> bool``, optional", """
        True where query ``i`` may attend to key ``j``; combined with the other
        visibility rules by AND. Evaluated on every score; for masks with whole
        empty tiles, a ``block_mask`` skips them."""),
    "block_mask": ("BlockMask, optional", """
        From :func:`fastattn.create_block_mask` for this batch shape, ``Lq`` and
        ``Lk``; it carries its ``mask_mod``. Empty tiles are skipped and full ones
        need no ``mask_mod`` calls; the kernels then work in the mask's tiles.
        It carries the ``mask_mod_args`` it was made with."""),
    "score_mod_args": ("tuple of arrays, optional", """
        NumPy arrays passed to ``score_mod`` (and ``score_mod_grad``) after ``(s, b,
        h, i, j)``, read in place at each call: a relative-position table or per-head
        scales that change from call to call. What is compiled depends on the
        functions and the arrays' dtypes and dimensions only, so new values (or
        shapes) compile nothing. Bool, integer, float32 or float64; an index out of
        range inside the function raises ``IndexError``."""),
    "mask_mod_args": ("tuple of arrays, optional", """
        NumPy arrays passed to ``mask_mod`` after ``(b, h, i, j)`` (document ids per
        token, say), read in place at each call, as ``score_mod_args``."""),
    "dropout_p": ("float, default 0.0", """
        Attention dropout, in ``[0, 1)``: each probability ``P[i, j]`` is kept with
        probability ``1 - dropout_p`` and scaled by ``1 / (1 - dropout_p)`` (PyTorch's
        ``dropout_p``); the drop probability is applied at a resolution of ``2**-16``
        (at most ``7.7e-6`` off). ``return_weights`` and ``lse`` are before dropout."""),
    "dropout_seed": ("int, optional", """
        Required when ``dropout_p > 0``, below ``2**64``. Each decision is a pure
        function of ``(dropout_seed, b, h, i, j)`` (Philox4x32-10, a counter-based
        generator), so the backward regenerates it from the same seed, and it is the
        same for every thread count and tiling and in :mod:`reference`."""),
    "chunk_of": ("(tuple, tuple, int, int[, tuple]), optional", """
        ``(batch_shape, batch_start, row_start, key_start[, mask_batch_shape])``:
        this call computes the block of a larger call of batch shape ``batch_shape``
        whose batch starts at index ``batch_start`` (one entry per batch axis), whose
        queries start at ``row_start`` and keys at ``key_start``; dropout decisions
        and the user functions' ``(b, h, i, j)`` are then the larger call's
        (``mask_mod``'s ``(b, h)`` those of ``mask_batch_shape``, a shape that
        broadcasts to ``batch_shape``, when given: a broadcast block mask's). For
        code that splits one call into pieces (:mod:`fastattn.dask` passes it);
        without dropout or user functions it changes nothing. Not with a
        ``block_mask``."""),
}
assert tuple(OPTION_DOCS) == FIELD_NAMES

# the options of a call that sets none (shared)
DEFAULT_OPTIONS = AttentionOptions()


def options_parameters_doc(indent="    "):
    """The numpydoc entries of every option, indented by ``indent``."""
    lines = []
    for name, (kind, text) in OPTION_DOCS.items():
        lines.append(f"{indent}{name} : {kind}")
        lines += [f"{indent}    {line}" for line in inspect.cleandoc(text).splitlines()]
    return "\n".join(lines)


def takes_options(*, before=(), after=()):
    """Decorator for a front end ``f(..., **options)``: its ``__signature__`` lists the
    options as keyword-only parameters with their defaults, between the keyword-only
    parameters named in ``before`` and ``after`` (which keep their own defaults),
    and in its docstring ``{options}`` becomes :func:`options_parameters_doc` and
    ``{score_order}`` the order in which a score is built (:data:`SCORE_ORDER_DOC`)."""
    def decorate(function):
        signature = inspect.signature(function)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        own = {p.name: p for p in params}
        positional = [p for p in params if p.kind is not p.KEYWORD_ONLY]
        keyword = [own[name] for name in before]
        keyword += [inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY,
                                      default=field.default)
                    for field in dataclasses.fields(AttentionOptions)]
        keyword += [own[name] for name in after]
        missing = {p.name for p in params if p.kind is p.KEYWORD_ONLY} - set(before) - set(after)
        assert not missing, f"{function.__name__}: place {missing} in before= or after="
        function.__signature__ = signature.replace(parameters=positional + keyword)
        if function.__doc__:
            function.__doc__ = (function.__doc__
                                .replace("    {options}", options_parameters_doc())
                                .replace("    {score_order}", SCORE_ORDER_DOC))
        return function
    return decorate
