"""Attention over a paged KV cache in plain NumPy: the pages gathered, then the plain
reference, one sequence at a time (float64).

The same contract as :func:`fastattn.paged_attention` (its checks are shared:
:mod:`fastattn._contract.paged_checks`); this version copies each sequence's pages
into contiguous keys and values, which the kernels never do.
"""

import numpy as np

from fastattn._contract.paged_checks import check_paged, paged_options
from reference.attention import scaled_dot_product_attention

__all__ = ["paged_attention", "gather_pages"]


def gather_pages(pages, block_table, seq_len):
    """A sequence's tokens ``(Hkv, seq_len, D)`` from ``pages`` ``(n_pages, page_size,
    Hkv, D)`` and its row of the block table ``(max_pages,)``."""
    page_size = pages.shape[1]
    used = block_table[:-(-seq_len // page_size)]  # (pages in use,)
    tokens = pages[used].reshape(-1, pages.shape[2], pages.shape[3])[:seq_len]  # (L, Hkv, D)
    return tokens.transpose(1, 0, 2)  # (Hkv, L, D)


def paged_attention(q, k_pages, v_pages, block_table, seq_lens, *, return_lse=False,
                    **options):
    """:func:`fastattn.paged_attention` by gathering each sequence's pages and calling
    :func:`reference.scaled_dot_product_attention` with bottom-right causal alignment
    (query ``i`` at ``seq_lens[b] - Lq + i``) and grouped-query heads."""
    problem = check_paged(q, k_pages, v_pages, block_table, seq_lens,
                          paged_options(options))
    batch, heads, q_len = problem.query.shape[:3]
    keywords = dict(problem.options.as_keywords(), causal_alignment="bottom_right",
                    enable_gqa=True, return_lse=True)
    out = np.zeros((batch, heads, q_len, problem.value_dim), problem.out_dtype)  # (B, H, Lq, Dv)
    lse = np.full((batch, heads, q_len), -np.inf, problem.compute_dtype)  # (B, H, Lq)
    for b in range(batch):
        seq_len = int(problem.seq_lens[b])
        keys = gather_pages(problem.key_pages, problem.block_table[b], seq_len)  # (Hkv, L, Dk)
        values = gather_pages(problem.value_pages, problem.block_table[b], seq_len)  # (Hkv, L, Dv)
        out[b], lse[b] = scaled_dot_product_attention(
            problem.query[b].astype(np.float64), keys.astype(np.float64),
            values.astype(np.float64), **keywords)  # (H, Lq, Dv), (H, Lq)
    return (out, lse) if return_lse else out
