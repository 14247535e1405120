"""Moving the real tokens of a padded batch into the packed, head-major layout of the
packed-sequence kernels, and their outputs back: one pass, on the kernels' threads.

A padded batch arrives token-major, ``(B * L, H, D)`` (the layout a model's
projections produce); the packed-sequence kernels (:mod:`fastattn.kernels.segments`)
read head-major stacks ``(H, total, D)`` of the real tokens only. :func:`gather_kernel`
makes that stack in one pass (reading each token's heads once, writing every head's
row), :func:`scatter_kernel` writes a packed output back into the padded layout,
padding rows zero. Neither looks at the values: the arrays are passed as unsigned
integers of the element's size (``uint16`` for bfloat16 and float16, ``uint32`` for
float32, ``uint64`` for float64), so three compiled variants serve every dtype, and a
NaN or any other bit pattern is moved as it is.
"""

from numba import prange, types

from fastattn.kernels.config import kernel_per_dtype
from fastattn.kernels.groups import array_type


def _gather_tokens(tokens, rows, slots, packed):
    """``packed[h, t, :] = tokens[rows[t], h, :]`` for every packed token ``t`` and
    head ``h``: ``tokens`` ``(B * L, H, D)``, ``rows`` ``(total,)`` int64 (each in
    ``[0, B * L)``), ``packed`` ``(H, total, D)``. ``slots`` threads take equal
    contiguous shares of the tokens."""
    total = rows.shape[0]
    heads, _, width = packed.shape
    for slot in prange(slots):
        for t in range(slot * total // slots, (slot + 1) * total // slots):
            source = rows[t]
            for h in range(heads):
                for c in range(width):
                    packed[h, t, c] = tokens[source, h, c]


def _scatter_tokens(packed, source_of, slots, tokens):
    """``tokens[p, h, :] = packed[h, source_of[p], :]`` where ``source_of[p] >= 0``,
    else zero bits (0.0 in every float format): ``packed`` ``(H, total, D)``,
    ``source_of`` ``(B * L,)`` int64, ``tokens`` ``(B * L, H, D)``. Every row of
    ``tokens`` is written; ``slots`` threads take equal contiguous shares of them."""
    n_rows, heads, width = tokens.shape
    for slot in prange(slots):
        for p in range(slot * n_rows // slots, (slot + 1) * n_rows // slots):
            source = source_of[p]
            for h in range(heads):
                if source >= 0:
                    for c in range(width):
                        tokens[p, h, c] = packed[h, source, c]
                else:
                    for c in range(width):
                        tokens[p, h, c] = 0


def _move_signature(dtype):
    """(source (3-D), row map (1-D int64), slots, destination (3-D, written)) of an
    unsigned integer ``dtype``: both kernels' signature."""
    return types.void(array_type(dtype, 3), array_type("int64", 1), types.int64,
                      array_type(dtype, 3, readonly=False))


gather_kernel = kernel_per_dtype(_gather_tokens, _move_signature)
scatter_kernel = kernel_per_dtype(_scatter_tokens, _move_signature)
