"""The state of a tile of a block mask, as the kernels and
:func:`fastattn.create_block_mask` both read it: no key visible (:data:`EMPTY`,
skipped), some (:data:`PARTIAL`, ``mask_mod`` called per element) or every one
(:data:`FULL`, no calls). Plain constants: importing this module loads no Numba.
"""

EMPTY, PARTIAL, FULL = 0, 1, 2
