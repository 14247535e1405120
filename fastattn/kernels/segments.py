"""Packed sequences of different lengths in the kernels' loops (FlashAttention's varlen
layout, the :class:`~fastattn.kernels.groups.Segments` group): where a batch entry's
rows lie, its visibility rule, and how the threads share the work items.

A packed call's batch entry ``e`` is head ``e % heads`` of sequence ``s = e // heads``:
its queries are rows ``query_starts[s]:query_starts[s + 1]`` of the query stack
``(heads, total_q, Dk)``, its keys and values rows ``key_starts[s]:key_starts[s + 1]``,
and every position it sees (the rules, ALiBi, dropout, the user functions) is counted
from its sequence's first row. Nothing outside the sequences is visited: no padding.
"""

from fastattn.kernels.config import jit_helper
from fastattn.kernels.masking import KeyRule


@jit_helper
def entry_segment(segments, visibility, entry):
    """Where batch entry ``entry`` of a packed call lies: ``(head, q_first, q_len,
    k_first, kv_len, rule)``: its head, its sequence's first query row and query count,
    first key row and key count in the stacks, and its :class:`KeyRule` (the sequence's
    keys, diagonal offset and the call's reach, from ``visibility``)."""
    sequence = entry // segments.heads
    q_first = segments.query_starts[sequence]
    k_first = segments.key_starts[sequence]
    kv_len = segments.key_starts[sequence + 1] - k_first
    rule = KeyRule(kv_len, segments.diag_offsets[sequence], visibility.reach_left,
                   visibility.reach_right)
    return (entry - sequence * segments.heads, q_first,
            segments.query_starts[sequence + 1] - q_first, k_first, kv_len, rule)


@jit_helper
def slot_share(slot, slots, n_items, work_cost, by_cost):
    """Items ``[first, stop)`` that slot ``slot`` of ``slots`` runs: equal counts, or,
    with ``by_cost``, equal shares of the cumulative cost ``work_cost`` ``(n_items + 1,)``
    (an item goes to the slot its cost's midpoint falls in)."""
    if not by_cost:
        return slot * n_items // slots, (slot + 1) * n_items // slots
    return (cost_share_start(slot, slots, n_items, work_cost),
            cost_share_start(slot + 1, slots, n_items, work_cost))


@jit_helper
def cost_share_start(slot, slots, n_items, work_cost):
    """First item of slot ``slot``'s share by cost: the first whose cost's midpoint
    ``(work_cost[i] + work_cost[i + 1]) / 2`` is at least ``slot / slots`` of the total
    (binary search; ``n_items`` for ``slot == slots``)."""
    if slot >= slots:
        return n_items
    target = 2 * slot * work_cost[n_items]  # midpoints doubled, times slots
    low, high = 0, n_items
    while low < high:
        middle = (low + high) // 2
        if (work_cost[middle] + work_cost[middle + 1]) * slots < target:
            low = middle + 1
        else:
            high = middle
    return low
