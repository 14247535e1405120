"""Checks of an attention call over a paged KV cache, before any layout.

:func:`check_paged` turns the arrays of a :func:`fastattn.paged_attention` call (the
queries, the page pools, the block table and the sequence lengths) and its
:class:`~fastattn._contract.options.AttentionOptions` into a :class:`PagedProblem`.
The kernels (:mod:`fastattn._dispatch.paged_run`) and the NumPy oracle
(:mod:`reference.paged`) both start from it.

This module imports NumPy only, never Numba.
"""

from dataclasses import dataclass

import numpy as np

from fastattn._contract.arguments import (as_real_array, default_scale, half_format,
                                          kernel_dtype, result_dtypes)
from fastattn._contract.options import AttentionOptions, options_from

__all__ = ["PAGED_OPTIONS", "PagedProblem", "check_paged", "paged_options"]

# The options a paged call takes (positions come from seq_lens: causal is bottom-right)
PAGED_OPTIONS = frozenset({"scale", "softcap", "causal", "causal_alignment", "window",
                           "enable_gqa"})


@dataclass(slots=True)
class PagedProblem:
    """A validated paged attention call.

    Attributes
    ----------
    query : ndarray, shape ``(B, H, Lq, Dk)``
    key_pages, value_pages : ndarray, shapes ``(n_pages, page_size, Hkv, Dk)`` and
        ``(n_pages, page_size, Hkv, Dv)``
        As given (``np.asarray``, dtype unchanged).
    block_table : ndarray of int32, shape ``(B, max_pages)``, C-contiguous
    seq_lens : ndarray of int64, shape ``(B,)``
        Tokens each sequence holds, the ``Lq`` new ones included.
    options : AttentionOptions
    gqa_group : int
        ``H // Hkv``.
    compute_dtype, out_dtype : numpy.dtype
    scale : float
    """

    query: np.ndarray
    key_pages: np.ndarray
    value_pages: np.ndarray
    block_table: np.ndarray
    seq_lens: np.ndarray
    options: AttentionOptions
    gqa_group: int
    compute_dtype: np.dtype
    out_dtype: np.dtype
    scale: float

    @property
    def q_len(self):
        """``Lq``, the new tokens of each sequence."""
        return self.query.shape[2]

    @property
    def page_size(self):
        return self.key_pages.shape[1]

    @property
    def value_dim(self):
        return self.value_pages.shape[3]

    @property
    def kernel_dtype(self):
        """The kernels' variant: ``uint16`` when both page pools share one 16-bit float
        dtype (read as stored), else the compute dtype."""
        return kernel_dtype(self.compute_dtype, self.key_pages.dtype, self.value_pages.dtype)

    @property
    def half_format(self):
        """How 16-bit pages are read (0 bfloat16, 1 float16; 0 for float pages)."""
        return half_format(self.key_pages.dtype, self.value_pages.dtype) or 0

    @property
    def max_len(self):
        """The longest sequence (0 for an empty batch)."""
        return int(self.seq_lens.max()) if self.seq_lens.size else 0


def paged_options(keywords, function_name="paged_attention"):
    """The :class:`AttentionOptions` of a paged call's ``**keywords``: positions come
    from ``seq_lens``, so ``causal_alignment`` may only be ``"bottom_right"``."""
    alignment = keywords.get("causal_alignment", "bottom_right")
    if alignment != "bottom_right":
        raise ValueError(f"{function_name}: causal_alignment must be 'bottom_right' (query i "
                         f"sits at seq_lens - Lq + i); got {alignment!r}")
    return options_from(keywords, function_name)


def check_paged(query, key_pages, value_pages, block_table, seq_lens, options,
                function_name="paged_attention"):
    """Validate a paged attention call (``options`` from :func:`paged_options`).

    Raises
    ------
    TypeError
        Non-real arrays, a block table or lengths that are not integers.
    ValueError
        Arrays of the wrong rank or of shapes that do not fit together, a query head
        count that is not a multiple of ``Hkv``, a length below ``Lq`` or beyond what
        the sequence's row of the block table covers, or a block-table entry a sequence
        uses that is outside the pool; the message names the argument.
    NotImplementedError
        An option outside :data:`PAGED_OPTIONS`.
    """
    unsupported = sorted(options.as_keywords().keys() - PAGED_OPTIONS)
    if unsupported:
        raise NotImplementedError(
            f"{function_name} does not take {unsupported[0]}=; it takes "
            f"{', '.join(sorted(PAGED_OPTIONS - {'causal_alignment'}))}")
    query = as_real_array("query", query)
    key_pages = as_real_array("key_pages", key_pages)
    value_pages = as_real_array("value_pages", value_pages)
    if query.ndim != 4:
        raise ValueError(f"query must be (B, H, Lq, D); got shape {query.shape}")
    for name, pages in (("key_pages", key_pages), ("value_pages", value_pages)):
        if pages.ndim != 4:
            raise ValueError(f"{name} must be (n_pages, page_size, Hkv, D); got shape "
                             f"{pages.shape}")
    if key_pages.shape[:3] != value_pages.shape[:3]:
        raise ValueError(f"key_pages {key_pages.shape} and value_pages {value_pages.shape} "
                         f"must agree in (n_pages, page_size, Hkv)")
    if key_pages.shape[3] != query.shape[3]:
        raise ValueError(f"query's head size {query.shape[3]} differs from key_pages' "
                         f"{key_pages.shape[3]} (query {query.shape}, key_pages "
                         f"{key_pages.shape})")
    n_pages, page_size, kv_heads = key_pages.shape[:3]
    batch, heads, q_len = query.shape[:3]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query's {heads} heads must be a multiple of the pages' {kv_heads} "
                         f"kv heads (query {query.shape}, key_pages {key_pages.shape})")
    if page_size == 0:
        raise ValueError(f"key_pages must have pages of at least one token; got shape "
                         f"{key_pages.shape}")
    block_table = _integer_array("block_table", block_table, 2, (batch, None),
                                 "(B, max_pages)")
    seq_lens = _integer_array("seq_lens", seq_lens, 1, (batch,), "(B,)")
    covered = block_table.shape[1] * page_size
    if seq_lens.size and (seq_lens.min() < q_len or seq_lens.max() > covered):
        b = int(np.flatnonzero((seq_lens < q_len) | (seq_lens > covered))[0])
        raise ValueError(
            f"seq_lens[{b}] = {seq_lens[b]} must count the Lq = {q_len} new tokens and at "
            f"most the {covered} tokens its row of block_table covers ({block_table.shape[1]} "
            f"pages of {page_size})")
    used = np.arange(block_table.shape[1]) < -(-seq_lens[:, None] // page_size)  # (B, pages)
    outside = used & ((block_table < 0) | (block_table >= n_pages))  # (B, pages)
    if outside.any():
        b, page = (int(index[0]) for index in np.nonzero(outside))
        raise ValueError(f"block_table[{b}, {page}] = {block_table[b, page]} is outside the "
                         f"pool of {n_pages} pages (key_pages {key_pages.shape})")
    compute_dtype, out_dtype = result_dtypes(query, key_pages, value_pages)
    return PagedProblem(
        query=query, key_pages=key_pages, value_pages=value_pages,
        block_table=np.ascontiguousarray(block_table, np.int32),
        seq_lens=np.ascontiguousarray(seq_lens, np.int64), options=options,
        gqa_group=heads // kv_heads, compute_dtype=compute_dtype, out_dtype=out_dtype,
        scale=default_scale(options.scale, query.shape[3]))


def _integer_array(name, array, ndim, shape, meaning):
    """``array`` as an integer ndarray of ``ndim`` dims and ``shape`` (None: any size)."""
    array = np.asarray(array)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers; got dtype {array.dtype}")
    if array.ndim != ndim or any(want is not None and size != want
                                 for size, want in zip(array.shape, shape)):
        raise ValueError(f"{name} must have shape {meaning} with B = {shape[0]} (the query's "
                         f"batch); got {array.shape}")
    return array
