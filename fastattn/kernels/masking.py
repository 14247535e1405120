"""Visibility rules of the kernels' tile loops: which keys a query may see, and
which queries may see a key.

Key ``j`` is visible to query ``i`` of batch entry ``b`` iff

    lo(i) <= j < hi(i),  lo(i) = i + off - reach_left,
                         hi(i) = min(i + off + reach_right + 1, kv_lengths[b])

and the user's mask allows it (see
:meth:`fastattn._contract.problem.AttentionProblem.key_reach`). ``lo`` and ``hi`` grow with
``i``, so the keys a block of queries can see form one interval, and so do the
queries that can see a block of keys: blocks outside them are never visited.

A :class:`KeyRule` is that rule for one batch entry,
``(kv_stop, diag_offset, reach_left, reach_right)``.
"""

from typing import NamedTuple

from fastattn.kernels.config import jit_helper


class KeyRule(NamedTuple):
    """The structural visibility rule of one batch entry."""

    kv_stop: int
    diag_offset: int
    reach_left: int
    reach_right: int


@jit_helper
def entry_rule(visibility, entry, kv_len):
    """The :class:`KeyRule` of batch entry ``entry`` (``kv_len`` keys in all)."""
    kv_stop = visibility.kv_lengths[entry] if visibility.has_kv_lengths else kv_len
    return KeyRule(kv_stop, visibility.diag_offset, visibility.reach_left,
                   visibility.reach_right)


@jit_helper
def visible_range(row, rule):
    """Half-open interval ``[lo, hi)`` of keys that query ``row`` may see structurally."""
    lo = max(row + rule.diag_offset - rule.reach_left, 0)
    hi = min(row + rule.diag_offset + rule.reach_right + 1, rule.kv_stop)
    return lo, hi


@jit_helper
def row_block_keys(row_start, row_stop, rule):
    """Keys of the query rows ``[row_start, row_stop)``: ``(first, last)``, the
    interval some row may see, and ``(common_first, common_last)``, the interval
    every row sees (empty when ``common_last <= common_first``)."""
    first, common_last = visible_range(row_start, rule)
    common_first, last = visible_range(row_stop - 1, rule)
    return first, last, common_first, common_last


@jit_helper
def key_block_rows(key_start, key_stop, rule, q_len):
    """Half-open interval of query rows that may see a key of ``[key_start,
    key_stop)``: those with ``lo(i) < key_stop`` and ``hi(i) > key_start``."""
    row_first = min(max(key_start - rule.diag_offset - rule.reach_right, 0), q_len)
    row_last = max(min(key_stop - 1 - rule.diag_offset + rule.reach_left + 1, q_len),
                   row_first)
    return row_first, row_last


@jit_helper
def block_fully_visible(row_start, row_stop, key_start, key_stop, rule):
    """Whether every query of ``[row_start, row_stop)`` sees every key of
    ``[key_start, key_stop)`` structurally."""
    common_first = visible_range(row_stop - 1, rule)[0]
    common_last = visible_range(row_start, rule)[1]
    return common_first <= key_start and key_stop <= common_last


@jit_helper
def visible_columns(row, key_start, cols, rule):
    """Columns ``[first, stop)`` of a block of ``cols`` keys from ``key_start`` that
    query ``row`` may see structurally (``first == stop`` when none)."""
    lo, hi = visible_range(row, rule)
    first = min(max(lo - key_start, 0), cols)
    stop = max(min(hi - key_start, cols), first)
    return first, stop
