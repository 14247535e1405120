"""fastattn: fused scaled dot-product attention for NumPy on the CPU.

The public functions validate and lay out their arguments, then call Numba kernels
(:mod:`fastattn.kernels`) that compute the masked softmax and the weighted sum in
one tiled pass. :mod:`reference` holds the plain NumPy oracle of the same contract.

Numba and the kernels load on first use of a public function, so importing
:mod:`fastattn` (and :mod:`fastattn._contract.problem` and :mod:`fastattn._dispatch.layout`, which :mod:`reference`
uses) stays cheap.
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "scaled_dot_product_attention": "fastattn.attention",
    "scaled_dot_product_attention_backward": "fastattn.attention",
    "MultiHeadAttention": "fastattn.layers",
    "LayerNorm": "fastattn.layers",
    "sinusoidal_positional_encoding": "fastattn.layers",
    "TransformerEncoderLayer": "fastattn.layers",
    "TransformerDecoderLayer": "fastattn.layers",
    "merge_attention": "fastattn.merge",
    "create_block_mask": "fastattn.block_mask",
    "BlockMask": "fastattn.block_mask",
    "and_masks": "fastattn.mask_functions",
    "or_masks": "fastattn.mask_functions",
    "noop_mask": "fastattn.mask_functions",
    "set_num_threads": "fastattn._runtime.threads",
    "get_num_threads": "fastattn._runtime.threads",
    "show_config": "fastattn._runtime.config_report",
    "varlen_attention": "fastattn.varlen",
    "varlen_attention_backward": "fastattn.varlen",
    "paged_attention": "fastattn.kv_cache",
    "KVCache": "fastattn.kv_cache",
}

# submodules reachable as attributes without their own import (cheap to import)
_SUBMODULES = ("blas",)

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"fastattn.{name}")  # also binds it in globals()
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'fastattn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC) | set(_SUBMODULES))
