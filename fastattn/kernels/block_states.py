"""The kernel of :func:`fastattn.create_block_mask`: the state of every tile of a
``mask_mod``, computed by calling its block hook on a block of zeros."""

import numpy as np
from numba import prange, types

from fastattn.kernels.tile_states import EMPTY, FULL, PARTIAL
from fastattn.kernels.config import kernel_per_dtype
from fastattn.kernels.groups import array_type
from fastattn.kernels.hooks import (APPLY_MASK, argument_kinds, block_hook, call_hook_at,
                                    data_pointer, hook_table, raise_hook_error)


# rows of a tile evaluated per call of the hook (the scratch block is this many rows
# of a tile's keys, whatever the tile's height)
STRIP_ROWS = 8


def _block_states(hook, heads, q_len, kv_len, block_q, block_k, states, table):
    """Fill ``states`` ``(N, q tiles, key tiles)``: for batch entry ``n``
    (``b, h = divmod(n, heads)``), tile ``(t, u)`` covers queries
    ``[t * block_q, (t + 1) * block_q)`` and keys ``[u * block_k, (u + 1) * block_k)``
    (cut at ``q_len`` and ``kv_len``); the hook at address ``hook`` applies
    ``mask_mod`` to blocks of zeros, :data:`STRIP_ROWS` rows of the tile at a time,
    and the count of ``-inf`` left says whether the tile is empty, partial or full
    (the first strips that show both hidden and seen keys end it: partial);
    ``table`` is the call's hook table (the arrays passed to ``mask_mod``)."""
    n_batch, n_q_tiles, n_k_tiles = states.shape
    for task in prange(n_batch * n_q_tiles):
        entry = task // n_q_tiles
        q_tile = task - entry * n_q_tiles
        row_start = q_tile * block_q
        rows = min(block_q, q_len - row_start)
        buffer = np.empty(min(rows, STRIP_ROWS) * block_k, np.float32)  # a strip
        for k_tile in range(n_k_tiles):
            key_start = k_tile * block_k
            cols = min(block_k, kv_len - key_start)
            hidden = 0
            for strip_start in range(row_start, row_start + rows, STRIP_ROWS):
                strip_rows = min(STRIP_ROWS, row_start + rows - strip_start)
                buffer[:] = 0.0
                raised = call_hook_at(hook, data_pointer(buffer), data_pointer(buffer),
                                      strip_rows, cols, strip_start, key_start, entry // heads,
                                      entry % heads, APPLY_MASK, data_pointer(table), 0)
                if raised:
                    table[0] = raised
                for index in range(strip_rows * cols):
                    hidden += buffer[index] == -np.inf
                if 0 < hidden < (strip_start + strip_rows - row_start) * cols:
                    break  # some keys hidden, some seen: partial, whatever follows
            states[entry, q_tile, k_tile] = (FULL if hidden == 0 else
                                             EMPTY if hidden == rows * cols else PARTIAL)


def _signature(dtype):
    return types.void(types.int64, *(types.int64,) * 5,
                      array_type(np.int8, 3, readonly=False),
                      array_type(np.int64, 1, readonly=False))


_block_states_kernel = kernel_per_dtype(_block_states, _signature)


def evaluate_block_states(mask_mod, heads, q_len, kv_len, block_q, block_k, states,
                          mask_mod_args=()):
    """Fill ``states`` ``(N, q tiles, key tiles)`` for ``mask_mod`` called with the
    arrays ``mask_mod_args`` (see :func:`_block_states`); an exception inside
    ``mask_mod`` raises ``IndexError`` naming it."""
    if states.size:
        hook = block_hook(None, mask_mod, None, np.float32, (),
                          argument_kinds(mask_mod_args))
        table = hook_table((), mask_mod_args)
        _block_states_kernel(np.float32)(hook.address, heads, q_len, kv_len, block_q,
                                         block_k, states, table)
        raise_hook_error(table, {"mask_mod": mask_mod})
