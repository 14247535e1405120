"""The kernels are called through their compiled entry points, which do not check
argument types: every argument the public functions build must have exactly the
type of the kernel's signature (array writeability aside: the signatures type the
inputs read-only, and a writeable array may stand for a read-only one)."""

import numba
import numpy as np
import pytest
from numba import types

import fastattn
from fastattn.kernels import backward, decode, forward, projection as linear


def writeable(numba_type):
    """``numba_type`` with every array in it typed writeable."""
    if isinstance(numba_type, types.Array):
        return numba_type.copy(readonly=False)
    if isinstance(numba_type, types.BaseTuple):
        return types.BaseTuple.from_types([writeable(t) for t in numba_type.types],
                                          getattr(numba_type, "pyclass", tuple))
    return numba_type


@pytest.fixture
def checked_kernels(monkeypatch):
    """Every kernel getter returns a wrapper that checks the arguments' types against
    the signature before calling the entry point; yields the calls seen."""
    seen = []

    def checking(getter):
        def kernel(dtype):
            entry_point = getter(dtype)
            expected = [writeable(t) for t in getter.signature(np.dtype(dtype)).args]

            def call(*args):
                got = [writeable(numba.typeof(arg)) for arg in args]
                assert got == expected, (getter.__doc__, got, expected)
                seen.append(getter.__doc__)
                return entry_point(*args)
            return call
        kernel.signature = getter.signature
        kernel.__doc__ = getter.__doc__
        return kernel

    import fastattn._dispatch.paged_run as paged_run
    import fastattn._dispatch.run as run
    import fastattn._dispatch.token_packing as token_packing
    import fastattn.layers.linear as layers_linear
    for module, names in ((run, ("forward_kernel", "exact_rows_kernel", "backward_kernel",
                                 "decode_kernel")),
                          (layers_linear, ("linear_kernel",)),
                          (paged_run, ("paged_kernel",)),
                          (token_packing, ("gather_kernel", "scatter_kernel"))):
        for name in names:
            monkeypatch.setattr(module, name, checking(getattr(module, name)))
    return seen


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_arguments_have_the_signatures_types(checked_kernels, rng, dtype):
    query = rng.standard_normal((2, 4, 33, 8)).astype(dtype)
    key = rng.standard_normal((2, 2, 1100, 8)).astype(dtype)
    value = rng.standard_normal((2, 2, 1100, 5)).astype(dtype)
    query.flags.writeable = False  # a read-only input, passed as it is
    mask = rng.random((33, 1100)) < 0.9
    bias = rng.standard_normal((1, 4, 1, 1100)).astype(dtype)
    for options in ({}, {"mask": mask, "bias": bias}, {"causal": True, "window": (3, 0),
                                                       "kv_lengths": [5, 1100]}):
        for return_weights in (False, True):
            out, *_, lse = fastattn.scaled_dot_product_attention(
                query, key, value, enable_gqa=True, return_weights=return_weights,
                return_lse=True, **options)
        fastattn.scaled_dot_product_attention_backward(out, query, key, value, out, lse,
                                                       enable_gqa=True, **options)
    fastattn.scaled_dot_product_attention(query[:, :, :1], key, value, enable_gqa=True)  # fold
    nan_value = value.copy()
    nan_value[0, 0, 3, 1] = np.nan  # marks rows for the exact kernel
    fastattn.scaled_dot_product_attention(query, key, nan_value, enable_gqa=True)
    layer = fastattn.MultiHeadAttention(64, 4, dtype=dtype, seed=0)
    layer(rng.standard_normal((4, 300, 64)).astype(dtype))
    assert {forward.forward_kernel.__doc__, forward.exact_rows_kernel.__doc__,
            backward.backward_kernel.__doc__, linear.linear_kernel.__doc__} <= set(checked_kernels)


def test_dispatcher_is_the_same_compiled_kernel():
    """``kernel.dispatcher(dtype)`` is the type-checked dispatcher of the entry point."""
    dispatcher = forward.forward_kernel.dispatcher(np.float32)
    entry_point = forward.forward_kernel(np.float32)
    assert dispatcher.overloads[dispatcher.signatures[0]].entry_point is entry_point


@pytest.mark.parametrize("dtype", ["bfloat16", np.float16, np.float32, np.float64])
def test_token_moves_have_the_signatures_types(checked_kernels, rng, dtype):
    """The packing kernels, over every float dtype seen as unsigned integers."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    from fastattn._dispatch import token_packing
    tokens = rng.standard_normal((30, 3, 4)).astype(dtype)  # (R, H, D)
    packed = token_packing.packed_rows(tokens, np.array([1, 4, 29]))  # (3, H, D)
    token_packing.padded_rows(packed, np.array([-1, 0, 2, -1]))
    assert len(set(checked_kernels)) == 2


@pytest.mark.parametrize("dtype", ["bfloat16", np.float16])
def test_16_bit_arguments_have_the_signatures_types(checked_kernels, rng, dtype):
    """The kernels' 16-bit variant (``uint16`` storage, float32 compute): forward with
    and without operands, backward, decode, and the exact rows of a NaN."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    query = rng.standard_normal((2, 4, 33, 8)).astype(dtype)
    key = rng.standard_normal((2, 2, 1100, 8)).astype(dtype)
    value = rng.standard_normal((2, 2, 1100, 5)).astype(dtype)
    query.flags.writeable = False  # a read-only input, passed as it is
    mask = rng.random((33, 1100)) < 0.9
    bias = rng.standard_normal((1, 4, 1, 1100)).astype(np.float32)
    for options in ({}, {"mask": mask, "bias": bias}):
        out, lse = fastattn.scaled_dot_product_attention(query, key, value, enable_gqa=True,
                                                         return_lse=True, **options)
        fastattn.scaled_dot_product_attention_backward(out, query, key, value, out, lse,
                                                       enable_gqa=True, **options)
    fastattn.scaled_dot_product_attention(query[:, :, :1], key, value, enable_gqa=True)
    nan_value = value.copy()
    nan_value[0, 0, 3, 1] = np.nan  # marks rows for the exact kernel
    fastattn.scaled_dot_product_attention(query, key, nan_value, enable_gqa=True)
    assert {forward.forward_kernel.__doc__, forward.exact_rows_kernel.__doc__,
            backward.backward_kernel.__doc__, decode.decode_kernel.__doc__} <= set(
                checked_kernels)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_arguments_have_the_signatures_types(checked_kernels, rng, dtype):
    """Packed sequences (``varlen_attention``): forward, backward (with argument
    gradients: partitions), and the exact rows of a NaN."""
    cu_seqlens = np.array([0, 5, 5, 300, 301], np.int32)
    query = rng.standard_normal((301, 4, 8)).astype(dtype)
    key, value = (rng.standard_normal((301, 2, 8)).astype(dtype) for _ in range(2))
    for options in ({}, {"causal": True, "window": (3, 0), "softcap": 2.0,
                         "alibi_slopes": np.ones(4), "dropout_p": 0.1, "dropout_seed": 1}):
        out, lse = fastattn.varlen_attention(query, key, value, cu_seqlens, cu_seqlens,
                                             return_lse=True, **options)
        fastattn.varlen_attention_backward(out, query, key, value, out, lse, cu_seqlens,
                                           cu_seqlens, **options)
    nan_value = value.copy()
    nan_value[7, 0, 1] = np.nan  # marks rows for the exact kernel
    fastattn.varlen_attention(query, key, nan_value, cu_seqlens, cu_seqlens)
    assert {forward.forward_kernel.__doc__, forward.exact_rows_kernel.__doc__,
            backward.backward_kernel.__doc__} <= set(checked_kernels)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, "bfloat16"])
def test_paged_arguments_have_the_signatures_types(checked_kernels, rng, dtype):
    """The paged kernel (fastattn.kernels.paged): decoding with grouped heads folded,
    a prefill with a softcap, and a contiguous KVCache's one page per sequence."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    from fastattn.kernels import paged

    k_pages, v_pages = rng.standard_normal((2, 6, 16, 2, 8)).astype(dtype)
    k_pages.flags.writeable = False  # read-only pages, passed as they are
    table = np.array([[3, 1, 0], [5, 2, 4]])  # int64: converted to int32
    for q_len, options in ((1, {}), (5, {"softcap": 2.0, "causal": True})):
        query = rng.standard_normal((2, 4, q_len, 8)).astype(np.float32)
        fastattn.paged_attention(query, k_pages, v_pages, table, [40, 33], **options)
    cache = fastattn.KVCache(2, 2, 8, dtype=dtype)
    cache.append(k_pages[:2].transpose(2, 0, 1, 3), k_pages[2:4].transpose(2, 0, 1, 3))
    cache.attend(rng.standard_normal((2, 4, 3, 8)))
    assert paged.paged_kernel.__doc__ in checked_kernels
