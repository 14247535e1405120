"""fastattn.torch: the differentiable attention on PyTorch tensors.

Forward results against PyTorch's own ``scaled_dot_product_attention`` and the float64
reference, gradients by ``torch.autograd.gradcheck`` (float64) and against PyTorch's
autograd (float32), the dtype rules, zero-copy conversion and the errors.
Skipped when PyTorch is not installed.
"""

import subprocess
import sys

import numpy as np
import pytest

import reference

torch = pytest.importorskip("torch")
fastattn_torch = pytest.importorskip("fastattn.torch")

F32_TOLERANCE = 2e-5


def random_tensors(q_shape, kv_shape, dtype=torch.float64, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=generator, dtype=dtype)
               for shape in (q_shape, kv_shape, kv_shape)]  # query, key, value
    return [tensor.requires_grad_(requires_grad) for tensor in tensors]


# Options with a dense-mask equivalent that PyTorch's SDPA can check, as
# (name, fastattn keywords, boolean mask for torch (Lq, Lk) -> (B?, ..., Lq, Lk)).
def torch_mask(q_len, kv_len, batch, options):
    i = torch.arange(q_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    off = kv_len - q_len if options.get("causal_alignment") == "bottom_right" else 0
    visible = torch.ones(q_len, kv_len, dtype=torch.bool)
    if options.get("causal"):
        visible &= j <= i + off
    if options.get("window") is not None:
        left, right = options["window"]
        visible &= (j >= i + off - left) & (j <= i + off + right)
    visible = visible.expand(batch, 1, q_len, kv_len).clone()  # (B, 1, Lq, Lk)
    if options.get("kv_lengths") is not None:
        lengths = torch.as_tensor(options["kv_lengths"])
        visible &= (j < lengths[:, None, None, None])
    return visible


CASES = [
    ("plain", {}),
    ("causal", {"causal": True}),
    ("causal bottom_right", {"causal": True, "causal_alignment": "bottom_right"}),
    ("window", {"causal": True, "window": (3, 0)}),
    ("kv_lengths", {"kv_lengths": np.array([5, 9])}),
    ("scale", {"scale": 0.3}),
]


@pytest.mark.parametrize("name,options", CASES, ids=[case[0] for case in CASES])
@pytest.mark.parametrize("q_len,kv_len", [(1, 9), (7, 9), (9, 9)])
def test_forward_matches_torch_sdpa(name, options, q_len, kv_len):
    query, key, value = random_tensors((2, 3, q_len, 8), (2, 3, kv_len, 8), torch.float32)
    got = fastattn_torch.scaled_dot_product_attention(query, key, value, **options)
    visible = torch_mask(q_len, kv_len, 2, options)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=visible, scale=options.get("scale"))
    seen = visible.any(-1, keepdim=True).expand_as(expected[..., :1])  # rows with a key
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got * seen, expected * seen, rtol=F32_TOLERANCE,
                               atol=F32_TOLERANCE)


@pytest.mark.parametrize("name,options", CASES, ids=[case[0] for case in CASES])
def test_gradcheck_float64(name, options):
    query, key, value = random_tensors((2, 2, 5, 4), (2, 2, 9, 4), requires_grad=True)
    value = value.detach()[..., :3].clone().requires_grad_()

    def attention(query, key, value):
        return fastattn_torch.scaled_dot_product_attention(query, key, value, **options)

    assert torch.autograd.gradcheck(attention, (query, key, value))


def test_gradcheck_score_functions():
    """score_mod with its score_mod_grad, and a block mask, through autograd."""
    import math

    import numba

    import fastattn

    @numba.njit
    def wobble(s, b, h, i, j):
        return s + 0.5 * math.sin(s) - 0.1 * h

    @numba.njit
    def wobble_grad(s, b, h, i, j):
        return 1.0 + 0.5 * math.cos(s)

    @numba.njit
    def prefix(b, h, i, j):
        return j < 3 or j <= i

    query, key, value = random_tensors((2, 2, 5, 4), (2, 2, 9, 4), requires_grad=True)
    block_mask = fastattn.create_block_mask(prefix, (2, 2), 5, 9, block_size=4)

    def attention(query, key, value):
        return fastattn_torch.scaled_dot_product_attention(
            query, key, value, score_mod=wobble, score_mod_grad=wobble_grad,
            block_mask=block_mask)

    assert torch.autograd.gradcheck(attention, (query, key, value))


def test_gradcheck_gqa_mask_bias():
    query, _, _ = random_tensors((2, 4, 5, 4), (2, 4, 6, 4), requires_grad=True)
    _, key, value = random_tensors((2, 2, 5, 4), (2, 2, 6, 4), seed=1, requires_grad=True)
    generator = torch.Generator().manual_seed(2)
    mask = torch.rand((2, 1, 5, 6), generator=generator) > 0.3  # (B, 1, Lq, Lk)
    bias = torch.randn((5, 6), generator=generator, dtype=torch.float64)  # (Lq, Lk)

    def attention(query, key, value):
        return fastattn_torch.scaled_dot_product_attention(query, key, value, mask, bias=bias,
                                                           enable_gqa=True)

    assert torch.autograd.gradcheck(attention, (query, key, value))


def test_gradients_match_torch_float32_gqa():
    query, _, _ = random_tensors((2, 4, 33, 16), (2, 4, 40, 16), torch.float32,
                                 requires_grad=True)
    _, key, value = random_tensors((2, 2, 33, 16), (2, 2, 40, 16), torch.float32, seed=1,
                                   requires_grad=True)
    grad_out = torch.randn(2, 4, 33, 16, generator=torch.Generator().manual_seed(3))
    got = fastattn_torch.scaled_dot_product_attention(
        query, key, value, causal=True, causal_alignment="bottom_right", enable_gqa=True)
    got_grads = torch.autograd.grad(got, (query, key, value), grad_out)
    visible = torch_mask(33, 40, 2, {"causal": True, "causal_alignment": "bottom_right"})
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=visible, enable_gqa=True)
    expected_grads = torch.autograd.grad(expected, (query, key, value), grad_out)
    for name, g, e in zip(("query", "key", "value"), got_grads, expected_grads):
        assert g.shape == e.shape and g.dtype == torch.float32, name
        tolerance = F32_TOLERANCE * max(1.0, float(e.abs().max()))
        torch.testing.assert_close(g, e, rtol=0, atol=tolerance, msg=name)


def test_float64_matches_reference_and_returns():
    query, key, value = random_tensors((3, 17, 8), (3, 23, 8))
    out, weights, lse = fastattn_torch.scaled_dot_product_attention(
        query, key, value, causal=True, return_weights=True, return_lse=True)
    expected = reference.scaled_dot_product_attention(
        query.numpy(), key.numpy(), value.numpy(), causal=True, return_weights=True,
        return_lse=True)
    for got, want in zip((out, weights, lse), expected):
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_computed_in_float32(dtype):
    query, key, value = (tensor.to(dtype) for tensor in random_tensors((2, 9, 8), (2, 11, 8)))
    got = fastattn_torch.scaled_dot_product_attention(query, key, value, causal=True)
    as32 = [tensor.float() for tensor in (query, key, value)]
    expected = fastattn_torch.scaled_dot_product_attention(*as32, causal=True)
    assert got.dtype == dtype
    assert torch.equal(got, expected.to(dtype))  # float32 result rounded once

    query.requires_grad_()
    fastattn_torch.scaled_dot_product_attention(query, key, value).sum().backward()
    assert query.grad.dtype == dtype and torch.isfinite(query.grad.float()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_tensors_are_not_copied_and_lse_is_float32(dtype):
    pytest.importorskip("ml_dtypes")
    query, key, value = random_tensors((2, 4, 16, 8), (2, 4, 16, 8), dtype)
    for tensor in (query, key, value, query.transpose(1, 2)):  # any strides: a view
        array = fastattn_torch._compute_array(tensor)
        assert array.__array_interface__["data"][0] == tensor.data_ptr()
        assert array.strides == tuple(stride * 2 for stride in tensor.stride())
    out, lse = fastattn_torch.scaled_dot_product_attention(query, key, value, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    expected = torch.logsumexp(query.double() @ key.double().transpose(-1, -2)
                               / np.sqrt(8), dim=-1)  # (2, 4, 16)
    np.testing.assert_allclose(lse.numpy(), expected.numpy(), rtol=2e-5, atol=2e-5)


def test_contiguous_float32_inputs_are_not_copied():
    query, key, value = random_tensors((2, 4, 16, 8), (2, 4, 16, 8), torch.float32)
    for tensor in (query, key, value, query.transpose(1, 2)):  # any strides: a view
        array = fastattn_torch._compute_array(tensor)
        assert array.__array_interface__["data"][0] == tensor.data_ptr()
        assert array.strides == tuple(stride * 4 for stride in tensor.stride())
    out = fastattn_torch.scaled_dot_product_attention(query, key, value)
    assert out.is_contiguous() and out.dtype == torch.float32


def test_masks_as_tensors_or_arrays_and_no_grad():
    query, key, value = random_tensors((2, 6, 4), (2, 6, 4), torch.float32)
    mask = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) > 0.5  # (Lq, Lk)
    bias = torch.randn(6, 6)
    from_tensors = fastattn_torch.scaled_dot_product_attention(
        query, key, value, mask, bias=bias, kv_lengths=torch.tensor([6, 4]))
    from_arrays = fastattn_torch.scaled_dot_product_attention(
        query, key, value, mask.numpy(), bias=bias.numpy(), kv_lengths=[6, 4])
    assert torch.equal(from_tensors, from_arrays)
    query.requires_grad_()
    with torch.no_grad():
        out = fastattn_torch.scaled_dot_product_attention(query, key, value)
    assert out.grad_fn is None and not out.requires_grad


def test_weights_and_lse_carry_no_gradient():
    query, key, value = random_tensors((5, 4), (7, 4), requires_grad=True)
    out, weights, lse = fastattn_torch.scaled_dot_product_attention(
        query, key, value, return_weights=True, return_lse=True)
    assert out.requires_grad
    assert not weights.requires_grad and not lse.requires_grad


def test_errors():
    query, key, value = random_tensors((2, 5, 4), (2, 6, 4), torch.float32)
    meta = torch.empty((2, 6, 4), device="meta")  # any device but the CPU
    with pytest.raises(ValueError, match="key is on device meta"):
        fastattn_torch.scaled_dot_product_attention(query, meta, value)
    float_mask = torch.zeros((5, 6), requires_grad=True)
    with pytest.raises(ValueError, match="mask requires grad"):
        fastattn_torch.scaled_dot_product_attention(query, key, value, float_mask)
    with pytest.raises(ValueError, match="bias is on device meta"):
        fastattn_torch.scaled_dot_product_attention(query, key, value,
                                                    bias=torch.empty((5, 6), device="meta"))
    with pytest.raises(TypeError, match="one dtype"):
        fastattn_torch.scaled_dot_product_attention(query, key.double(), value)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fastattn_torch.scaled_dot_product_attention(*(t.int() for t in (query, key, value)))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fastattn_torch.scaled_dot_product_attention(query.numpy(), key, value)
    with pytest.raises(ValueError, match="Dk"):  # fastattn's own checks still apply
        fastattn_torch.scaled_dot_product_attention(query, key[..., :3], value)


def test_import_without_torch_names_the_extra():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import fastattn.torch\nexcept ImportError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert 'pip install "fastattn[torch]"' in result.stdout


def test_bfloat16_without_ml_dtypes_is_computed_from_a_float32_copy():
    """fastattn and fastattn.torch import without ml_dtypes; a bfloat16 tensor is then
    handed over as a float32 copy, and the results keep their dtypes."""
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "import torch, fastattn, fastattn.torch\n"
            "q = torch.randn(2, 5, 8).to(torch.bfloat16)\n"
            "out, lse = fastattn.torch.scaled_dot_product_attention(q, q, q, return_lse=True)\n"
            "print(out.dtype, lse.dtype)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["torch.bfloat16", "torch.float32"]


def test_huggingface_import_without_transformers_names_the_extra():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import fastattn.huggingface\n"
            "except ImportError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert 'pip install "fastattn[huggingface]"' in result.stdout


def test_bias_gradient_gradcheck():
    """A bias that requires grad gets its gradient, for each way it broadcasts."""
    generator = torch.Generator().manual_seed(3)
    query, key, value = random_tensors((2, 3, 5, 4), (2, 3, 6, 4), requires_grad=True)
    for bias_shape in ((3, 5, 6), (1, 1, 1, 6), (5, 1)):
        bias = torch.randn(bias_shape, generator=generator, dtype=torch.float64,
                           requires_grad=True)

        def attention(query, key, value, bias):
            return fastattn_torch.scaled_dot_product_attention(query, key, value, bias=bias,
                                                               causal=True)
        assert torch.autograd.gradcheck(attention, (query, key, value, bias))


def test_bias_gradient_alone_matches_autograd():
    query, key, value = random_tensors((2, 3, 7, 8), (2, 3, 9, 8), dtype=torch.float32)
    bias = torch.randn(3, 7, 9, requires_grad=True)
    out = fastattn_torch.scaled_dot_product_attention(query, key, value, bias=bias)
    out.square().sum().backward()
    expected_bias = bias.detach().clone().requires_grad_(True)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value,
                                                                attn_mask=expected_bias)
    expected.square().sum().backward()
    torch.testing.assert_close(bias.grad, expected_bias.grad, rtol=1e-4, atol=1e-5)


def test_dropout_seed_from_pytorch_generator():
    """torch.manual_seed repeats a dropout run; a generator= leaves the default one
    untouched; gradients regenerate the forward's decisions (gradcheck)."""
    query, key, value = random_tensors((2, 3, 16, 8), (2, 3, 20, 8), requires_grad=True)
    torch.manual_seed(11)
    first = fastattn_torch.scaled_dot_product_attention(query, key, value, dropout_p=0.3)
    torch.manual_seed(11)
    again = fastattn_torch.scaled_dot_product_attention(query, key, value, dropout_p=0.3)
    other = fastattn_torch.scaled_dot_product_attention(query, key, value, dropout_p=0.3)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - other).abs().max() > 1e-3
    torch.manual_seed(5)
    state = torch.get_rng_state()
    fastattn_torch.scaled_dot_product_attention(query, key, value, dropout_p=0.3,
                                                generator=torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.get_rng_state())

    def attention(query, key, value):
        return fastattn_torch.scaled_dot_product_attention(query, key, value, dropout_p=0.3,
                                                           dropout_seed=1234)
    assert torch.autograd.gradcheck(attention, (query, key, value))
