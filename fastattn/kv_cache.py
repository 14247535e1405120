"""KV caches for decoding: attention over paged key/value pools, and a cache that owns them.

:func:`paged_attention` attends queries to keys and values kept in pages of a shared
pool, through a block table (vLLM's and FlashInfer's layout), reading the pages in
place. :class:`KVCache` owns such storage for a batch of sequences, paged or
contiguous, appends each step's keys and values and attends to what it holds.
"""

import numpy as np

from fastattn._contract.arguments import result_dtypes
from fastattn._contract.paged_checks import check_paged, paged_options
from fastattn._dispatch.paged_run import run_paged

__all__ = ["paged_attention", "KVCache"]


def paged_attention(q, k_pages, v_pages, block_table, seq_lens, *, return_lse=False,
                    **options):
    r"""Attention of new tokens' queries to a paged KV cache, read in place.

    Sequence ``b`` holds ``seq_lens[b]`` tokens (the ``Lq`` new ones included); its
    token ``t`` is row ``t % page_size`` of page ``block_table[b, t // page_size]``.
    Query ``i`` sits at position ``p_i = seq_lens[b] - Lq + i`` (bottom-right), and
    query head ``h`` reads kv head ``h // (H // Hkv)`` (grouped-query attention when
    ``Hkv < H``):

    .. math::

        \mathrm{out}_{bhi} = \sum_{j \in V(i)} \mathrm{softmax}_j\big(\mathrm{scale}\;
        q_{bhi} \cdot k_{bj}\big)\, v_{bj}, \qquad
        V(i) = \{\, j < \mathrm{seq\_lens}[b] \,\}
        \ (\text{with causal: } j \le p_i;\ \text{a window: } p_i - l \le j \le p_i + r).

    Parameters
    ----------
    q : array_like, shape ``(B, H, Lq, Dk)``
        Queries of the ``Lq`` newest tokens of each sequence.
    k_pages : array_like, shape ``(n_pages, page_size, Hkv, Dk)``
    v_pages : array_like, shape ``(n_pages, page_size, Hkv, Dv)``
        The pools of pages; float32, float64, or bfloat16/float16 read as stored.
    block_table : array_like of int, shape ``(B, max_pages)``
        Physical page of each logical page of each sequence (int32 in vLLM); entries
        past a sequence's last page are never read (padding such as -1 is fine).
    seq_lens : array_like of int, shape ``(B,)``
        Tokens each sequence holds, ``Lq <= seq_lens[b] <= max_pages * page_size``.
    return_lse : bool, default False
        Also return the natural log-sum-exp of each row's scores ``(B, H, Lq)``.
    scale : float, optional
        Default ``1 / sqrt(Dk)``.
    softcap : float, optional
        ``s = softcap * tanh(s / softcap)`` after scaling.
    causal : bool, default False
        Query ``i`` sees keys ``j <= p_i`` (bottom-right; ``causal_alignment``, if
        given, must be ``"bottom_right"``). A decoding step (``Lq == 1``) sees every
        key either way.
    window : (int, int), optional
        ``(left, right)``: keys ``p_i - left <= j <= p_i + right``.
    enable_gqa : bool
        Accepted and ignored: ``Hkv < H`` implies it.

    Returns
    -------
    out : ndarray, shape ``(B, H, Lq, Dv)``
        In the inputs' result dtype (``np.result_type`` rules; 16-bit pages with 16-bit
        queries give 16-bit results).
    lse : ndarray, shape ``(B, H, Lq)``, only if ``return_lse``
        In the compute dtype (float32 for 16-bit pages).

    Raises
    ------
    ValueError
        Shapes that do not fit, a length below ``Lq`` or beyond what the sequence's
        table row covers, a block-table entry outside the pool (each naming
        ``seq_lens`` or ``block_table``).
    NotImplementedError
        Other attention options (bias, masks, ``kv_lengths``: use ``seq_lens``).

    Notes
    -----
    The kernel reads each sequence's pages where they are, one block of keys within
    a page at a time, with the decode kernel's loops; the query heads of a kv head
    share one pass over its pages when decoding. 16-bit pages are converted as they
    are read; queries are converted to the compute dtype (a copy of ``q`` only).
    With float32 queries and 16-bit pages the output is rounded to the pages' dtype
    before its conversion to float32.

    See Also
    --------
    KVCache : owns pages (or contiguous storage) and appends to them.
    reference.paged.paged_attention : the NumPy oracle (gathers the pages).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> k_pages = rng.standard_normal((6, 4, 2, 8))   # 6 pages of 4 tokens, 2 kv heads
    >>> v_pages = rng.standard_normal((6, 4, 2, 8))
    >>> block_table = np.array([[5, 0, 2], [1, 3, -1]], np.int32)
    >>> seq_lens = np.array([10, 7])                  # 3 and 2 pages in use
    >>> q = rng.standard_normal((2, 4, 1, 8))          # 4 query heads: GQA
    >>> out = fastattn.paged_attention(q, k_pages, v_pages, block_table, seq_lens)
    >>> out.shape
    (2, 4, 1, 8)

    Sequence 1 is its pages' first 7 rows, in table order:

    >>> k1 = k_pages[[1, 3]].reshape(8, 2, 8)[:7].transpose(1, 0, 2)   # (Hkv, 7, D)
    >>> v1 = v_pages[[1, 3]].reshape(8, 2, 8)[:7].transpose(1, 0, 2)
    >>> same = fastattn.scaled_dot_product_attention(q[1], k1, v1, enable_gqa=True)
    >>> bool(np.allclose(out[1], same))
    True
    """
    problem = check_paged(q, k_pages, v_pages, block_table, seq_lens,
                          paged_options(options))
    out, lse = run_paged(problem)
    return (out, lse) if return_lse else out


class KVCache:
    r"""Keys and values of a batch of sequences, grown a step at a time, attended in place.

    Each sequence ``b`` holds ``lengths[b]`` tokens. :meth:`append` writes new keys
    and values after them (each sequence may take a different number);
    :meth:`attend` runs :func:`paged_attention` over what each sequence holds,
    bottom-right causal: the ``Lq`` queries are the sequences' last ``Lq`` tokens.

    Parameters
    ----------
    batch, kv_heads, head_dim : int
        Sequences, kv heads and the size of each key and value.
    capacity : int, optional
        Tokens per sequence to make room for at once. The room is allocated
        uninitialised, so the operating system commits memory only as tokens are
        written; appends up to ``capacity`` never move what the cache holds, and one
        beyond it is a ``ValueError``. Without it the cache starts with room for
        :attr:`INITIAL_CAPACITY` tokens and doubles when full (moving what it
        holds: amortised, as a Python list).
    page_size : int, optional
        Tokens per page: the cache keeps a pool ``(n_pages, page_size, kv_heads,
        head_dim)`` and a block table, taking a page from the pool when a sequence
        needs one (pages of different sequences interleave). None (default): each
        sequence's tokens are contiguous, ``(batch, kv_heads, capacity, head_dim)``.
    dtype : dtype, default float32
        float32, float64, or ``ml_dtypes.bfloat16`` / float16 (read as stored by the
        kernels; :meth:`append` rounds into it).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> cache = fastattn.KVCache(2, 2, 8, page_size=4)
    >>> k, v = rng.standard_normal((2, 2, 2, 5, 8))       # a prompt of 5 tokens
    >>> cache.append(k, v, lengths=[5, 3])                 # the second holds 3 of them
    >>> cache.lengths
    array([5, 3])
    >>> q = rng.standard_normal((2, 4, 1, 8))              # one new token, 4 query heads
    >>> k1, v1 = rng.standard_normal((2, 2, 2, 1, 8))
    >>> cache.append(k1, v1)
    >>> out = cache.attend(q)
    >>> out.shape
    (2, 4, 1, 8)
    >>> keys = np.concatenate([k[1, :, :3], k1[1]], axis=1)      # (Hkv, 4, D)
    >>> values = np.concatenate([v[1, :, :3], v1[1]], axis=1)
    >>> same = fastattn.scaled_dot_product_attention(q[1], keys, values, enable_gqa=True)
    >>> bool(np.allclose(out[1], same, atol=1e-6))
    True
    """

    INITIAL_CAPACITY = 256

    def __init__(self, batch, kv_heads, head_dim, *, capacity=None, page_size=None,
                 dtype=np.float32):
        for name, value, least in (("batch", batch, 0), ("kv_heads", kv_heads, 1),
                                   ("head_dim", head_dim, 1), ("capacity", capacity, 1),
                                   ("page_size", page_size, 1)):
            if value is None and name in ("capacity", "page_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or value < least:
                raise ValueError(f"{name} must be an int >= {least}; got {value!r}")
        self.dtype = np.dtype(dtype)
        if result_dtypes(self.dtype)[1] != self.dtype:
            raise TypeError(f"dtype must be float32, float64, bfloat16 or float16; got "
                            f"{self.dtype}")
        self.batch, self.kv_heads, self.head_dim = int(batch), int(kv_heads), int(head_dim)
        self.page_size = None if page_size is None else int(page_size)
        self.grows = capacity is None
        self._lengths = np.zeros(self.batch, np.int64)  # (B,) tokens held
        self._common_length = 0  # what every sequence holds, or None when they differ
        self._allocate(int(capacity) if capacity is not None else self.INITIAL_CAPACITY)

    @property
    def lengths(self):
        """Tokens each sequence holds, int64 ``(batch,)`` (a copy)."""
        return self._lengths.copy()

    @property
    def capacity(self):
        """Tokens per sequence the cache has room for now."""
        return self._capacity

    def _allocate(self, capacity):
        """Room for ``capacity`` tokens per sequence, keeping what is held."""
        shape_tail = (self.kv_heads, self.head_dim)
        if self.page_size is None:
            keys = np.empty((self.batch, self.kv_heads, capacity, self.head_dim),
                            self.dtype)  # (B, Hkv, capacity, D)
            values = np.empty_like(keys)
            if hasattr(self, "_keys"):
                held = self._capacity
                keys[:, :, :held] = self._keys  # a move, when a growing cache is full
                values[:, :, :held] = self._values
            self._keys, self._values = keys, values
        else:
            max_pages = -(-capacity // self.page_size)
            pool = (self.batch * max_pages, self.page_size) + shape_tail
            key_pages = np.empty(pool, self.dtype)  # (n_pages, page_size, Hkv, D)
            value_pages = np.empty_like(key_pages)
            table = np.zeros((self.batch, max_pages), np.int32)  # (B, max_pages)
            if hasattr(self, "_key_pages"):  # pages keep their numbers
                used = self._pages_used
                key_pages[:used] = self._key_pages[:used]
                value_pages[:used] = self._value_pages[:used]
                table[:, :self._block_table.shape[1]] = self._block_table
            else:
                self._pages_used = 0
            self._key_pages, self._value_pages = key_pages, value_pages
            self._block_table = table
            capacity = max_pages * self.page_size
        self._capacity = capacity

    def append(self, k, v, lengths=None):
        """Write new keys and values after what each sequence holds.

        Parameters
        ----------
        k, v : array_like, shape ``(batch, kv_heads, n, head_dim)``
            The new tokens' keys and values (converted to the cache's dtype).
        lengths : array_like of int, shape ``(batch,)``, optional
            How many of the ``n`` tokens each sequence takes (its first ones;
            ``0 <= lengths[b] <= n``); default all ``n``.

        Raises
        ------
        ValueError
            Shapes that do not match the cache, ``lengths`` out of range, or a
            sequence that would grow past a fixed ``capacity``.
        """
        if lengths is None and self._fast_append(k, v):
            return
        k, v = np.asarray(k), np.asarray(v)
        expected = (self.batch, self.kv_heads)
        for name, array in (("k", k), ("v", v)):
            if array.ndim != 4 or array.shape[:2] != expected \
                    or array.shape[3] != self.head_dim or array.shape != k.shape:
                raise ValueError(f"{name} must be (batch, kv_heads, n, head_dim) = "
                                 f"({self.batch}, {self.kv_heads}, n, {self.head_dim}), as k; "
                                 f"got {array.shape}")
        n_new = k.shape[2]
        counts = self._counts(lengths, n_new)  # (B,)
        ends = self._lengths + counts  # (B,)
        if self.batch and ends.max() > self._capacity:
            if not self.grows:
                b = int(np.argmax(ends))
                raise ValueError(f"sequence {b} would hold {ends[b]} tokens, past the "
                                 f"cache's capacity={self._capacity}")
            self._allocate(max(2 * self._capacity, int(ends.max())))
        if self.page_size is None:
            self._write_contiguous(k, v, counts, n_new)
        else:
            self._write_pages(k, v, counts, n_new)
        self._lengths = ends
        self._common_length = int(ends[0]) if self.batch and (ends == ends[0]).all() else None

    def _fast_append(self, k, v):
        """The common step of a decoding loop, with the fewest NumPy calls: every
        sequence holds as many tokens and takes all of ``k`` and ``v`` (arrays of the
        expected shape), within the room there is. Returns whether it appended (else
        :meth:`append` takes the general path, checks included)."""
        start = self._common_length
        if (start is None or type(k) is not np.ndarray or type(v) is not np.ndarray
                or k.shape != v.shape or k.ndim != 4
                or k.shape[:2] != (self.batch, self.kv_heads) or k.shape[3] != self.head_dim):
            return False
        n_new = k.shape[2]
        stop = start + n_new
        if stop > self._capacity:
            return False
        if self.page_size is None:
            self._keys[:, :, start:stop] = k  # (B, Hkv, n, D)
            self._values[:, :, start:stop] = v
        elif n_new == 1:
            logical, row = divmod(start, self.page_size)
            if row == 0:  # a new page for every sequence, in batch order
                used = self._pages_used
                self._block_table[:, logical] = np.arange(used, used + self.batch)
                self._pages_used = used + self.batch
            pages = self._block_table[:, logical]  # (B,)
            self._key_pages[pages, row] = k[:, :, 0]  # (B, Hkv, D)
            self._value_pages[pages, row] = v[:, :, 0]
        else:
            return False
        self._lengths += n_new
        self._common_length = stop
        return True

    def _counts(self, lengths, n_new):
        """New tokens per sequence, int64 ``(B,)``, from ``append``'s ``lengths``."""
        if lengths is None:
            return np.full(self.batch, n_new, np.int64)
        counts = np.asarray(lengths)
        if counts.dtype.kind not in "iu" or counts.shape != (self.batch,):
            raise ValueError(f"lengths must be integers of shape (batch,) = ({self.batch},); "
                             f"got {counts.dtype} {counts.shape}")
        if counts.size and (counts.min() < 0 or counts.max() > n_new):
            raise ValueError(f"lengths must lie in [0, n] = [0, {n_new}]; got {counts}")
        return counts.astype(np.int64)

    def _write_contiguous(self, k, v, counts, n_new):
        """Tokens into ``(B, Hkv, capacity, D)`` storage: one slice assignment when every
        sequence holds as many tokens and takes all ``n_new``, else one per sequence
        (plain copies on the calling thread: no thread team wakes for a token)."""
        starts = self._lengths
        if self.batch and (counts == n_new).all() and (starts == starts[0]).all():
            start = starts[0]
            self._keys[:, :, start:start + n_new] = k  # (B, Hkv, n, D)
            self._values[:, :, start:start + n_new] = v
            return
        for b in np.flatnonzero(counts):
            start, count = starts[b], counts[b]
            self._keys[b, :, start:start + count] = k[b, :, :count]  # (Hkv, count, D)
            self._values[b, :, start:start + count] = v[b, :, :count]

    def _write_pages(self, k, v, counts, n_new):
        """Tokens into the page pool, taking pages as sequences need them: one fancy
        assignment for a single new token per sequence, else one per page touched."""
        size = self.page_size
        starts = self._lengths
        first_page = -(-starts // size)  # (B,) logical pages already taken
        last_page = -(-(starts + counts) // size)  # (B,) pages needed after
        for b in np.flatnonzero(last_page > first_page):  # take pages in batch order
            wanted = last_page[b] - first_page[b]
            self._block_table[b, first_page[b]:last_page[b]] = np.arange(
                self._pages_used, self._pages_used + wanted)
            self._pages_used += wanted
        if n_new == 1 and (counts == 1).all():
            rows = np.arange(self.batch)
            pages = self._block_table[rows, starts // size]  # (B,)
            self._key_pages[pages, starts % size] = k[:, :, 0]  # (B, Hkv, D)
            self._value_pages[pages, starts % size] = v[:, :, 0]
            return
        for b in np.flatnonzero(counts):
            token, stop = int(starts[b]), int(starts[b] + counts[b])
            while token < stop:  # page by page
                page, row = self._block_table[b, token // size], token % size
                taken = min(size - row, stop - token)
                offset = token - starts[b]
                self._key_pages[page, row:row + taken] = k[b, :, offset:offset + taken] \
                    .transpose(1, 0, 2)  # (taken, Hkv, D)
                self._value_pages[page, row:row + taken] = v[b, :, offset:offset + taken] \
                    .transpose(1, 0, 2)
                token += taken

    def attend(self, q, **options):
        """Attention of ``q`` ``(batch, H, Lq, head_dim)``, the queries of each
        sequence's last ``Lq`` tokens (appended already), to what each sequence holds:
        :func:`paged_attention` with ``causal=True`` and the cache's storage read in
        place; ``q`` is converted to the cache's dtype, the results' dtype. ``options`` as :func:`paged_attention` takes them (``return_lse``,
        ``scale``, ``softcap``, ``window``, ...).

        Raises
        ------
        ValueError
            A sequence holding fewer than ``Lq`` tokens (naming ``seq_lens``), or
            shapes that do not fit.
        """
        options = dict(options)
        options.setdefault("causal", True)
        q = np.asarray(q).astype(self.dtype, copy=False)  # the cache's dtype: pages as stored
        if self.page_size is not None:
            return paged_attention(q, self._key_pages, self._value_pages,
                                   self._block_table, self._lengths, **options)
        # contiguous storage as a pool of one page per (sequence, kv head): each
        # kv head's query heads attend to their page as one sequence
        if q.ndim != 4 or q.shape[0] != self.batch or q.shape[1] % self.kv_heads:
            raise ValueError(f"q must be (batch, H, Lq, head_dim) with batch = {self.batch} "
                             f"and H a multiple of kv_heads = {self.kv_heads}; got {q.shape}")
        batch, heads, q_len = q.shape[:3]
        rows = batch * self.kv_heads
        pages = (rows, self._capacity, 1, self.head_dim)
        results = paged_attention(
            q.reshape(rows, heads // self.kv_heads, q_len, q.shape[3]),
            self._keys.reshape(pages), self._values.reshape(pages),
            _one_page_each(rows), np.repeat(self._lengths, self.kv_heads), **options)
        if isinstance(results, tuple):
            out, lse = results
            return out.reshape(batch, heads, q_len, -1), lse.reshape(batch, heads, q_len)
        return results.reshape(batch, heads, q_len, -1)


def _one_page_each(rows):
    """The block table ``(rows, 1)`` of ``rows`` sequences of one page each."""
    return np.arange(rows, dtype=np.int32).reshape(rows, 1)

