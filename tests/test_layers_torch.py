"""fastattn.layers loaded with random PyTorch weights match PyTorch's modules.
Skipped when PyTorch is not installed (it is never a runtime dependency).

Every comparison records its largest absolute difference in ``MAX_DIFFERENCES``;
``pytest tests/test_layers_torch.py -s`` prints them at the end of the module.
"""

import numpy as np
import pytest

import fastattn

torch = pytest.importorskip("torch")

TOLERANCE = {np.float32: 1e-5, np.float64: 1e-10}
MAX_DIFFERENCES = {}  # case -> largest |fastattn - torch| seen


@pytest.fixture(scope="module", autouse=True)
def report_differences():
    yield
    print("\nmax |fastattn - torch| per case:")
    for case, difference in sorted(MAX_DIFFERENCES.items()):
        print(f"  {case:<60} {difference:.3g}")


def assert_matches_torch(case, got, expected, dtype, slack=1.0):
    """``got`` (NumPy) against ``expected`` (a tensor), within the dtype's tolerance
    times ``slack``; records the largest absolute difference under ``case``."""
    expected = expected.detach().numpy()
    assert got.dtype == dtype and got.shape == expected.shape
    difference = float(np.abs(got - expected).max()) if got.size else 0.0
    MAX_DIFFERENCES[case] = max(MAX_DIFFERENCES.get(case, 0.0), difference)
    tolerance = TOLERANCE[dtype] * slack
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)


def numpy_state(module):
    return {name: tensor.detach().numpy() for name, tensor in module.state_dict().items()}


def torch_dtype(dtype):
    return torch.float64 if dtype == np.float64 else torch.float32


def tensors(*arrays):
    return tuple(torch.from_numpy(np.ascontiguousarray(array)) for array in arrays)


def torch_mha(dtype, seed, embed_dim=16, num_heads=4, **options):
    """A ``torch.nn.MultiheadAttention`` with random weights and biases (PyTorch starts
    its biases at zero, which would hide a wrongly placed bias)."""
    torch.manual_seed(seed)
    module = torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True, **options)
    module = module.to(torch_dtype(dtype)).eval()
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("bias"):
                parameter.uniform_(-0.5, 0.5)
    return module


def padding_of(lengths, kv_len):
    """kv_lengths as PyTorch's key_padding_mask ``(batch, Lk)``: True = padding."""
    return np.arange(kv_len)[None, :] >= np.asarray(lengths)[:, None]  # (batch, Lk)


DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kdim, vdim", [(None, None), (5, 7)], ids=["packed", "separate"])
def test_multihead_cross_attention_matches_torch(rng, dtype, kdim, vdim):
    module = torch_mha(dtype, 0, kdim=kdim, vdim=vdim)
    state = numpy_state(module)
    assert ("in_proj_weight" in state) == (kdim is None)  # separate q/k/v_proj_weight
    layer = fastattn.MultiHeadAttention(16, 4, kdim=kdim, vdim=vdim, dtype=dtype)
    layer.load_state_dict(state)
    query = rng.standard_normal((2, 5, 16)).astype(dtype)
    key = rng.standard_normal((2, 9, kdim or 16)).astype(dtype)
    value = rng.standard_normal((2, 9, vdim or 16)).astype(dtype)
    allowed = rng.random((5, 9)) < 0.8
    allowed[:, 0] = True  # every row keeps a key: PyTorch gives NaN for fully masked rows
    with torch.no_grad():
        expected, expected_weights = module(*tensors(query, key, value),
                                            attn_mask=torch.from_numpy(~allowed),
                                            average_attn_weights=False)
    got, weights = layer(query, key, value, mask=allowed, return_weights=True)
    case = f"MHA cross {'kdim/vdim' if kdim else 'packed'} bool mask {np.dtype(dtype)}"
    assert_matches_torch(case, got, expected, dtype)
    assert_matches_torch(case + " weights", weights, expected_weights, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_multihead_self_attention_matches_torch(rng, dtype, bias):
    """Self-attention with a per-head boolean mask, causal masking and kv_lengths as
    key_padding_mask, with and without biases."""
    module = torch_mha(dtype, 1, bias=bias)
    layer = fastattn.MultiHeadAttention(16, 4, bias=bias, dtype=dtype)
    layer.load_state_dict(numpy_state(module))
    x = rng.standard_normal((3, 7, 16)).astype(dtype)
    lengths = np.array([7, 4, 1])
    per_head = rng.random((3, 4, 7, 7)) < 0.7
    per_head[..., 0] = True  # key 0 stays visible to every row (no NaN in PyTorch)
    causal = np.tril(np.ones((7, 7), bool))  # True = may attend
    name = f"MHA self {'bias' if bias else 'no bias'} {np.dtype(dtype)}"
    with torch.no_grad():
        (x_t,) = tensors(x)
        plain, _ = module(x_t, x_t, x_t, need_weights=False)
        masked, _ = module(x_t, x_t, x_t, need_weights=False,
                           attn_mask=torch.from_numpy(~per_head.reshape(12, 7, 7)))
        causal_padded, _ = module(x_t, x_t, x_t, need_weights=False,
                                  attn_mask=torch.from_numpy(~causal), is_causal=True,
                                  key_padding_mask=torch.from_numpy(padding_of(lengths, 7)))
    assert_matches_torch(name, layer(x), plain, dtype)
    assert_matches_torch(name + " per-head mask", layer(x, mask=per_head), masked, dtype)
    assert_matches_torch(name + " causal + kv_lengths",
                         layer(x, causal=True, kv_lengths=lengths), causal_padded, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_grouped_query_attention_matches_expanded_torch_heads(rng, dtype, num_kv_heads):
    """PyTorch's MHA has no grouped-query form; the same computation is a full MHA whose
    key and value projections repeat each kv head's rows for its group of query heads."""
    layer = fastattn.MultiHeadAttention(16, 4, num_kv_heads=num_kv_heads, dtype=dtype, seed=3)
    state = layer.state_dict()
    state["in_proj_bias"] = rng.uniform(-0.5, 0.5, state["in_proj_bias"].shape)
    layer.load_state_dict(state)
    state = layer.state_dict()
    head_dim, group = 4, 4 // num_kv_heads

    def expand(rows):  # (Hkv * d_h, ...) -> (H * d_h, ...), kv head h // group for head h
        return np.repeat(rows.reshape((num_kv_heads, head_dim) + rows.shape[1:]), group,
                         axis=0).reshape((4 * head_dim,) + rows.shape[1:])

    b_query, b_key, b_value = np.split(state["in_proj_bias"], [16, 16 + num_kv_heads * 4])
    module = torch_mha(dtype, 4)
    module.load_state_dict({name: torch.from_numpy(array) for name, array in {
        "in_proj_weight": np.concatenate([state["q_proj_weight"],
                                          expand(state["k_proj_weight"]),
                                          expand(state["v_proj_weight"])]),
        "in_proj_bias": np.concatenate([b_query, expand(b_key), expand(b_value)]),
        "out_proj.weight": state["out_proj.weight"],
        "out_proj.bias": state["out_proj.bias"]}.items()})
    query = rng.standard_normal((2, 6, 16)).astype(dtype)
    memory = rng.standard_normal((2, 10, 16)).astype(dtype)
    lengths = np.array([10, 3])
    with torch.no_grad():
        q_t, m_t = tensors(query, memory)
        expected, expected_weights = module(
            q_t, m_t, m_t, key_padding_mask=torch.from_numpy(padding_of(lengths, 10)),
            average_attn_weights=False)
        causal, _ = module(q_t, q_t, q_t, need_weights=False, is_causal=True,
                           attn_mask=torch.from_numpy(~np.tril(np.ones((6, 6), bool))))
    got, weights = layer(query, memory, kv_lengths=lengths, return_weights=True)
    case = f"GQA 4q/{num_kv_heads}kv heads {np.dtype(dtype)}"
    assert_matches_torch(case + " cross", got, expected, dtype)
    assert_matches_torch(case + " cross weights", weights, expected_weights, dtype)
    assert_matches_torch(case + " self causal", layer(query, causal=True), causal, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(rng, dtype, norm_first, activation):
    torch.manual_seed(1)
    module = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True,
                                              norm_first=norm_first, activation=activation)
    module = module.to(torch_dtype(dtype)).eval()
    layer = fastattn.TransformerEncoderLayer(16, 4, 32, norm_first=norm_first,
                                             activation=activation, dtype=dtype)
    layer.load_state_dict(numpy_state(module))
    x = rng.standard_normal((3, 7, 16)).astype(dtype)
    lengths = np.array([7, 5, 2])
    causal = np.tril(np.ones((7, 7), bool))  # True = may attend
    with torch.no_grad():
        (x_t,) = tensors(x)
        padded = module(x_t, src_key_padding_mask=torch.from_numpy(padding_of(lengths, 7)))
        causal_padded = module(x_t, src_mask=torch.from_numpy(~causal), is_causal=True,
                               src_key_padding_mask=torch.from_numpy(padding_of(lengths, 7)))
    case = f"encoder {'pre' if norm_first else 'post'}-norm {np.dtype(dtype)}"
    assert_matches_torch(case, layer(x, kv_lengths=lengths), padded, dtype, slack=10)
    assert_matches_torch(case, layer(x, causal=True, kv_lengths=lengths), causal_padded,
                         dtype, slack=10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_decoder_layer_matches_torch(rng, dtype, norm_first):
    torch.manual_seed(2)
    module = torch.nn.TransformerDecoderLayer(16, 2, 24, dropout=0.0, batch_first=True,
                                              norm_first=norm_first)
    module = module.to(torch_dtype(dtype)).eval()
    layer = fastattn.TransformerDecoderLayer(16, 2, 24, norm_first=norm_first, dtype=dtype)
    layer.load_state_dict(numpy_state(module))
    target = rng.standard_normal((2, 6, 16)).astype(dtype)
    memory = rng.standard_normal((2, 8, 16)).astype(dtype)
    memory_lengths = np.array([8, 5])
    memory_allowed = rng.random((6, 8)) < 0.8
    memory_allowed[:, 0] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=torch_dtype(dtype))
    with torch.no_grad():
        target_t, memory_t = tensors(target, memory)
        expected = module(target_t, memory_t, tgt_mask=causal, tgt_is_causal=True)
        masked = module(target_t, memory_t, tgt_mask=causal, tgt_is_causal=True,
                        memory_mask=torch.from_numpy(~memory_allowed),
                        memory_key_padding_mask=torch.from_numpy(padding_of(memory_lengths, 8)))
    case = f"decoder {'pre' if norm_first else 'post'}-norm {np.dtype(dtype)}"
    assert_matches_torch(case, layer(target, memory), expected, dtype, slack=10)
    assert_matches_torch(case, layer(target, memory, memory_mask=memory_allowed,
                                     memory_kv_lengths=memory_lengths), masked, dtype, slack=10)
