"""fastattn.layers loaded with random PyTorch weights match PyTorch's modules.
Skipped when PyTorch is not installed (it is never a runtime dependency)."""

import numpy as np
import pytest

import fastattn

torch = pytest.importorskip("torch")

TOLERANCE = {np.float32: 1e-5, np.float64: 1e-10}


def numpy_state(module):
    return {name: tensor.detach().numpy() for name, tensor in module.state_dict().items()}


def torch_dtype(dtype):
    return torch.float64 if dtype == np.float64 else torch.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kdim, vdim", [(None, None), (5, 7)], ids=["packed", "separate"])
def test_multihead_attention_matches_torch(rng, dtype, kdim, vdim):
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(16, 4, batch_first=True, kdim=kdim, vdim=vdim)
    module = module.to(torch_dtype(dtype)).eval()
    layer = fastattn.MultiHeadAttention(16, 4, kdim=kdim, vdim=vdim, dtype=dtype)
    layer.load_state_dict(numpy_state(module))
    query = rng.standard_normal((2, 5, 16)).astype(dtype)
    key = rng.standard_normal((2, 9, kdim or 16)).astype(dtype)
    value = rng.standard_normal((2, 9, vdim or 16)).astype(dtype)
    allowed = rng.random((5, 9)) < 0.8
    allowed[:, 0] = True  # every row keeps a key: PyTorch gives NaN for fully masked rows
    with torch.no_grad():
        expected, _ = module(*(torch.from_numpy(a) for a in (query, key, value)),
                             attn_mask=torch.from_numpy(~allowed), need_weights=False)
    got = layer(query, key, value, mask=allowed)
    np.testing.assert_allclose(got, expected.numpy(), rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm_first", [False, True])
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
    padding = np.arange(7)[None, :] >= lengths[:, None]  # (3, 7) True = padding, PyTorch's polarity
    with torch.no_grad():
        expected = module(torch.from_numpy(x), src_key_padding_mask=torch.from_numpy(padding))
    got = layer(x, kv_lengths=lengths)
    np.testing.assert_allclose(got, expected.numpy(), rtol=TOLERANCE[dtype] * 10,
                               atol=TOLERANCE[dtype] * 10)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(rng, norm_first):
    torch.manual_seed(2)
    module = torch.nn.TransformerDecoderLayer(16, 2, 24, dropout=0.0, batch_first=True,
                                              norm_first=norm_first).double().eval()
    layer = fastattn.TransformerDecoderLayer(16, 2, 24, norm_first=norm_first, dtype=np.float64)
    layer.load_state_dict(numpy_state(module))
    target, memory = rng.standard_normal((2, 6, 16)), rng.standard_normal((2, 8, 16))
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    with torch.no_grad():
        expected = module(torch.from_numpy(target), torch.from_numpy(memory), tgt_mask=causal,
                          tgt_is_causal=True)
    np.testing.assert_allclose(layer(target, memory), expected.numpy(), atol=1e-10)
