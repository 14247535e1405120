"""fastattn.layers against the plain reference layers, and what positional encoding does."""

import numpy as np
import pytest

import fastattn
import reference

TOLERANCE = {np.float32: 2e-5, np.float64: 1e-10}


def assert_matches(got, want, dtype):
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("length, d_model", [(0, 4), (1, 1), (7, 6), (50, 33)])
def test_positional_encoding(length, d_model):
    encoding = fastattn.sinusoidal_positional_encoding(length, d_model, dtype=np.float64)
    assert encoding.shape == (length, d_model)
    np.testing.assert_allclose(encoding, reference.positional_encoding(length, d_model),
                               atol=1e-12)
    if length:  # position 0: sin 0 = 0 in even columns, cos 0 = 1 in odd ones
        assert (encoding[0, 0::2] == 0).all() and (encoding[0, 1::2] == 1).all()


def test_positional_encoding_refuses_bad_sizes():
    with pytest.raises(ValueError, match="d_model"):
        fastattn.sinusoidal_positional_encoding(3, -1)
    with pytest.raises(ValueError, match="base"):
        fastattn.sinusoidal_positional_encoding(3, 4, base=0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (5, 5), (9, 13)])
def test_multi_head_cross_attention(rng, dtype, q_len, kv_len):
    layer = fastattn.MultiHeadAttention(12, 3, kdim=5, vdim=7, dtype=dtype, seed=1)
    query = rng.standard_normal((2, q_len, 12)).astype(dtype)
    key = rng.standard_normal((2, kv_len, 5)).astype(dtype)
    value = rng.standard_normal((2, kv_len, 7)).astype(dtype)
    mask = rng.random((2, q_len, kv_len)) < 0.8
    got = layer(query, key, value, mask=mask, kv_lengths=[kv_len, max(kv_len - 2, 0)])
    want = reference.multi_head_attention(query, key, value, layer.state_dict(), 3, mask=mask,
                                          kv_lengths=[kv_len, max(kv_len - 2, 0)])
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_multi_head_self_attention_and_grouped_heads(rng, dtype, num_kv_heads):
    layer = fastattn.MultiHeadAttention(16, 4, num_kv_heads=num_kv_heads, dtype=dtype, seed=2)
    x = rng.standard_normal((3, 11, 16)).astype(dtype)
    mask = rng.random((3, 4, 11, 11)) < 0.8  # per head
    out, weights = layer(x, mask=mask, causal=True, kv_lengths=[11, 6, 1],
                         return_weights=True)
    want, want_weights = reference.multi_head_attention(
        x, x, x, layer.state_dict(), 4, num_kv_heads, mask=mask, causal=True,
        kv_lengths=[11, 6, 1], return_weights=True)
    assert_matches(out, want, dtype)
    assert_matches(weights, want_weights, dtype)  # every head's weights, like with like
    assert weights.shape == (3, 4, 11, 11)
    out, weights = layer(x, causal=True, return_weights=True)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=TOLERANCE[dtype])
    assert (np.triu(weights, k=1) == 0).all()


def test_unbatched_input(rng):
    layer = fastattn.MultiHeadAttention(8, 2, dtype=np.float64, seed=3)
    x = rng.standard_normal((6, 8))
    np.testing.assert_allclose(layer(x), layer(x[None])[0])


def test_state_dict_round_trip(rng):
    source = fastattn.MultiHeadAttention(8, 2, kdim=3, vdim=3, dtype=np.float64, seed=4)
    target = fastattn.MultiHeadAttention(8, 2, kdim=3, vdim=3, dtype=np.float64, seed=5)
    target.load_state_dict(source.state_dict())
    x, k = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 5, 3))
    np.testing.assert_array_equal(target(x, k), source(x, k))


def test_multi_head_validation():
    with pytest.raises(ValueError, match="num_heads"):
        fastattn.MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        fastattn.MultiHeadAttention(12, 4, num_kv_heads=3)
    layer = fastattn.MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"query.*\(batch, L, 8\).*\(2, 3, 5\)"):
        layer(np.zeros((2, 3, 5)))
    state = layer.state_dict()
    with pytest.raises(ValueError, match=r"in_proj_weight.*\(24, 8\)"):
        layer.load_state_dict({**state, "in_proj_weight": np.zeros((24, 9))})
    with pytest.raises(ValueError, match="missing.*out_proj.bias"):
        layer.load_state_dict({k: v for k, v in state.items() if k != "out_proj.bias"})
    with pytest.raises(ValueError, match="unexpected.*bias_k"):
        layer.load_state_dict({**state, "bias_k": np.zeros((1, 1, 8))})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer(rng, dtype, norm_first, activation):
    layer = fastattn.TransformerEncoderLayer(16, 4, 24, norm_first=norm_first,
                                             activation=activation, dtype=dtype, seed=6)
    x = rng.standard_normal((2, 9, 16)).astype(dtype)
    got = layer(x, causal=True, kv_lengths=[9, 4])
    want = reference.encoder_layer(x, layer.state_dict(), 4, norm_first, activation,
                                   causal=True, kv_lengths=[9, 4])
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer(rng, dtype, norm_first):
    layer = fastattn.TransformerDecoderLayer(16, 2, 20, norm_first=norm_first, dtype=dtype,
                                             seed=7)
    target = rng.standard_normal((2, 6, 16)).astype(dtype)
    memory = rng.standard_normal((2, 11, 16)).astype(dtype)
    want = reference.decoder_layer(target, memory, layer.state_dict(), 2, norm_first)
    assert_matches(layer(target, memory), want, dtype)
    masks = {"target_mask": rng.random((2, 6, 6)) < 0.8,
             "memory_mask": rng.random((2, 2, 6, 11)) < 0.8,
             "target_kv_lengths": [6, 3], "memory_kv_lengths": [11, 4]}
    want = reference.decoder_layer(target, memory, layer.state_dict(), 2, norm_first, **masks)
    assert_matches(layer(target, memory, **masks), want, dtype)


def test_layer_norm(rng):
    norm = fastattn.LayerNorm(5, dtype=np.float64)
    norm.load_state_dict({"weight": np.arange(1.0, 6.0), "bias": np.full(5, 0.5)})
    x = rng.standard_normal((3, 5))
    np.testing.assert_allclose(norm(x), reference.layer_norm(x, np.arange(1.0, 6.0), 0.5))
    plain = fastattn.LayerNorm(5, dtype=np.float64)(x)
    np.testing.assert_allclose(plain.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(plain.var(-1), 1.0, rtol=1e-4)  # eps keeps it just under 1


def test_word_order_needs_positional_encoding():
    """Without positional encoding, "tiger kills lion" gives the contextual embeddings of
    "lion kills tiger" in permuted order; with it, the same word differs by position."""
    rng = np.random.default_rng(11)
    lion, kills, tiger = rng.standard_normal((3, 16))  # word embeddings, (16,) each
    first = np.stack([lion, kills, tiger])[None]  # (1, 3, 16) "lion kills tiger"
    second = np.stack([tiger, kills, lion])[None]  # (1, 3, 16) "tiger kills lion"
    layer = fastattn.MultiHeadAttention(16, 2, dtype=np.float64, seed=12)
    reversed_order = [2, 1, 0]

    plain_first, plain_second = layer(first), layer(second)
    np.testing.assert_allclose(plain_second[0], plain_first[0][reversed_order], atol=1e-12)

    encoding = fastattn.sinusoidal_positional_encoding(3, 16, dtype=np.float64)  # (3, 16)
    encoded_first, encoded_second = layer(first + encoding), layer(second + encoding)
    difference = np.abs(encoded_second[0] - encoded_first[0][reversed_order]).max()
    assert difference > 0.05  # "lion" as subject and as object no longer coincide


@pytest.mark.parametrize("kdim, vdim, named", [(5, 8, "kdim=5"), (8, 7, "vdim=7")])
def test_self_attention_needs_embed_dim_wide_keys_and_values(rng, kdim, vdim, named):
    """key=None uses the query as key and value: only a layer with kdim == vdim == embed_dim
    can do that; any other must say which width does not fit, not fail inside a matmul."""
    layer = fastattn.MultiHeadAttention(8, 2, kdim=kdim, vdim=vdim, seed=0)
    with pytest.raises(ValueError, match=rf"self-attention.*{named}.*embed_dim=8"):
        layer(rng.standard_normal((2, 3, 8)))


def test_value_defaults_to_key_only_when_widths_agree(rng):
    query = rng.standard_normal((2, 3, 8))
    key = rng.standard_normal((2, 4, 5))
    same = fastattn.MultiHeadAttention(8, 2, kdim=5, vdim=5, dtype=np.float64, seed=0)
    np.testing.assert_array_equal(same(query, key), same(query, key, key))
    differ = fastattn.MultiHeadAttention(8, 2, kdim=5, vdim=7, seed=0)
    with pytest.raises(ValueError, match=r"value=None.*kdim=5.*vdim=7"):
        differ(query, key)
    with pytest.raises(ValueError, match="value.*without key"):
        same(query, value=key)


def weights_of(layer):
    return {name: array.copy() for name, array in layer.state_dict().items()}


def assert_unchanged(layer, before):
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for name, array in before.items():
        np.testing.assert_array_equal(after[name], array, err_msg=name)


def test_packed_state_needs_embed_dim_wide_keys_and_values():
    """PyTorch packs q/k/v into in_proj_weight only when kdim == vdim == embed_dim; a
    packed (3E, E) matrix loaded into a kdim/vdim layer would give keys of the wrong width."""
    packed = fastattn.MultiHeadAttention(8, 2, seed=0).state_dict()
    layer = fastattn.MultiHeadAttention(8, 2, kdim=5, vdim=7, seed=1)
    before = weights_of(layer)
    with pytest.raises(ValueError, match=r"in_proj_weight.*kdim=5, vdim=7.*q_proj_weight"):
        layer.load_state_dict(packed)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("change, error, message", [
    (lambda s: s.update(in_proj_bias=np.zeros(5)), ValueError, r"'in_proj_bias'.*\(24,\)"),
    (lambda s: s.pop("out_proj.weight"), ValueError, r"missing \['out_proj.weight'\]"),
    (lambda s: s.update(bias_k=np.zeros((1, 1, 8))), ValueError, r"unexpected \['bias_k'\]"),
    (lambda s: s.update(q_proj_weight=np.zeros((8, 8))), ValueError, "unexpected.*q_proj_weight"),
    (lambda s: s.update({"out_proj.weight": np.full((8, 8), 1j)}), TypeError,
     r"'out_proj.weight'.*complex"),
    (lambda s: s.update({"out_proj.bias": np.full(8, "a")}), TypeError, r"'out_proj.bias'"),
])
def test_load_state_dict_errors_name_the_key_and_change_nothing(change, error, message):
    layer = fastattn.MultiHeadAttention(8, 2, seed=0)
    state = fastattn.MultiHeadAttention(8, 2, seed=1).state_dict()
    change(state)
    before = weights_of(layer)
    with pytest.raises(error, match=message):
        layer.load_state_dict(state)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("layer_type", ["encoder", "decoder"])
def test_transformer_load_state_dict_is_all_or_nothing(layer_type):
    """A bad entry in a late part (norm2) must leave the earlier parts (self_attn) as they
    were, and the error names the full key."""
    make = {"encoder": fastattn.TransformerEncoderLayer,
            "decoder": fastattn.TransformerDecoderLayer}[layer_type]
    layer, source = make(8, 2, 12, seed=0), make(8, 2, 12, seed=1)
    state = source.state_dict()
    state["norm2.bias"] = np.zeros(3)
    before = weights_of(layer)
    with pytest.raises(ValueError, match=r"'norm2.bias'.*\(8,\)"):
        layer.load_state_dict(state)
    assert_unchanged(layer, before)
    del state["norm2.bias"]
    with pytest.raises(ValueError, match=r"missing \['norm2.bias'\]"):
        layer.load_state_dict(state)
    with pytest.raises(ValueError, match=r"unexpected.*'norm4.weight'"):
        layer.load_state_dict({**source.state_dict(), "norm4.weight": np.ones(8)})
    layer.load_state_dict(source.state_dict())
    assert_unchanged(layer, source.state_dict())


NOT_REAL = {"complex": np.full((2, 3, 8), 1 + 1j), "object": np.full((2, 3, 8), 1.0, object),
            "str": np.full((2, 3, 8), "1")}


@pytest.mark.parametrize("kind", sorted(NOT_REAL))
def test_layers_refuse_inputs_that_are_not_real(rng, kind):
    """Complex inputs used to lose their imaginary part with only a ComplexWarning."""
    bad = NOT_REAL[kind]
    good = rng.standard_normal((2, 3, 8))
    layer = fastattn.MultiHeadAttention(8, 2, seed=0)
    for name, call in (("query", lambda: layer(bad)), ("key", lambda: layer(good, bad, good)),
                       ("value", lambda: layer(good, good, bad))):
        with pytest.raises(TypeError, match=f"{name} must hold real numbers"):
            call()
    with pytest.raises(TypeError, match="real numbers"):
        fastattn.LayerNorm(8)(bad)
    with pytest.raises(TypeError, match="real numbers"):
        fastattn.layers.FeedForward(8, 4)(bad)
    with pytest.raises(TypeError, match="real numbers"):
        fastattn.TransformerEncoderLayer(8, 2, 4, seed=0)(bad)
    with pytest.raises(TypeError, match="memory must hold real numbers"):
        fastattn.TransformerDecoderLayer(8, 2, 4, seed=0)(good, bad)


@pytest.mark.parametrize("layer_dtype, input_dtype, result", [
    (np.float32, np.float32, np.float32), (np.float32, np.float64, np.float64),
    (np.float64, np.float32, np.float64), (np.float32, np.float16, np.float32),
    (np.float32, np.int64, np.float64), (np.float32, np.bool_, np.float32),
    (np.float64, np.int32, np.float64)])
def test_layer_dtype_follows_result_type_of_weights_and_inputs(rng, layer_dtype, input_dtype,
                                                              result):
    """The kernel's rule, with the weights as one more operand: np.result_type of the
    weights and the inputs, integer-only combinations in float64."""
    x = (rng.standard_normal((2, 5, 8)) * 3).astype(input_dtype)
    layers = [fastattn.MultiHeadAttention(8, 2, dtype=layer_dtype, seed=0),
              fastattn.LayerNorm(8, dtype=layer_dtype),
              fastattn.layers.FeedForward(8, 4, dtype=layer_dtype, rng=rng),
              fastattn.TransformerEncoderLayer(8, 2, 4, dtype=layer_dtype, seed=0)]
    for layer in layers:
        got = layer(x)
        assert got.dtype == result, type(layer).__name__
        if result == np.float64:  # the weights in float64, exactly
            np.testing.assert_allclose(got, layer(x.astype(np.float64)), rtol=1e-12, atol=1e-12)
    out = fastattn.TransformerDecoderLayer(8, 2, 4, dtype=layer_dtype, seed=0)(x, x)
    assert out.dtype == result


def test_multi_head_input_shape_errors(rng):
    layer = fastattn.MultiHeadAttention(8, 2, kdim=5, vdim=6, seed=0)
    query = rng.standard_normal((2, 3, 8))
    key, value = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 4, 6))
    with pytest.raises(ValueError, match=r"key must have shape \(batch, L, 5\).*\(2, 4, 6\)"):
        layer(query, value, value)
    with pytest.raises(ValueError, match=r"batch.*query \(2, 3, 8\).*key \(3, 4, 5\)"):
        layer(query, rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 6)))
    with pytest.raises(ValueError, match=r"batch.*query \(2, 3, 8\).*key \(1, 4, 5\)"):
        layer(query, key[:1], value[:1])  # no silent broadcasting of the batch
    with pytest.raises(ValueError, match=r"all batched.*query \(2, 3, 8\).*key \(4, 5\)"):
        layer(query, key[0], value[0])
    with pytest.raises(ValueError, match=r"Lk.*key \(2, 4, 5\).*value \(2, 3, 6\)"):
        layer(query, key, value[:, :3])
    with pytest.raises(ValueError, match=r"batch.*key \(2, 4, 5\).*value \(1, 4, 6\)"):
        layer(query, key, value[:1])


def test_multi_head_mask_shapes(rng):
    layer = fastattn.MultiHeadAttention(8, 2, dtype=np.float64, seed=0)
    x = rng.standard_normal((3, 4, 8))
    per_head = rng.random((3, 2, 4, 4)) < 0.7
    shared = per_head[:, 0]  # (3, 4, 4)
    np.testing.assert_array_equal(layer(x, mask=shared), layer(x, mask=shared[:, None]))
    np.testing.assert_array_equal(layer(x, mask=shared[:1]),
                                  layer(x, mask=np.broadcast_to(shared[:1], (3, 4, 4))))
    with pytest.raises(ValueError, match=r"mask of shape \(5, 4, 4\).*\(3, 2, 4, 4\)"):
        layer(x, mask=np.ones((5, 4, 4), bool))  # used to broadcast the output to batch 5
    with pytest.raises(ValueError, match=r"mask of shape \(3, 3, 4, 4\)"):
        layer(x, mask=np.ones((3, 3, 4, 4), bool))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 3, 2, 4, 4\)"):
        layer(x, mask=np.ones((1, 3, 2, 4, 4), bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        layer(x, mask=np.ones((4, 4)))
    # unbatched: (Lq, Lk) or (num_heads, Lq, Lk), as PyTorch's unbatched attn_mask
    single = layer(x[0], mask=per_head[0])
    np.testing.assert_array_equal(single, layer(x[:1], mask=per_head[:1])[0])
    assert single.shape == (4, 8)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 4, 4\).*\(2, 4, 4\)"):
        layer(x[0], mask=shared)  # used to return a result for batch entry 0 of 3


def test_multi_head_kv_lengths_checks(rng):
    layer = fastattn.MultiHeadAttention(8, 2, dtype=np.float64, seed=0)
    x = rng.standard_normal((2, 4, 8))
    with pytest.raises(ValueError, match=r"kv_lengths must have shape \(2,\).*\(3,\)"):
        layer(x, kv_lengths=[4, 4, 4])
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, Lk\] = \[0, 4\]"):
        layer(x, kv_lengths=[4, 5])
    with pytest.raises(TypeError, match="kv_lengths must hold integers"):
        layer(x, kv_lengths=[4.0, 2.0])
    np.testing.assert_array_equal(layer(x[0], kv_lengths=3), layer(x[:1], kv_lengths=[3])[0])
    np.testing.assert_array_equal(layer(x[0], kv_lengths=[3]), layer(x[0], kv_lengths=3))


@pytest.mark.parametrize("arguments, message", [
    ((0, 2), "embed_dim must be a positive int"), ((8, 2.0), "num_heads must be a positive int"),
    ((8, 0), "num_heads must be a positive int"), ((8, 3), "multiple of num_heads=3"),
    ((8, 2, {"kdim": 0}), "kdim"), ((8, 2, {"vdim": -1}), "vdim"),
    ((8, 2, {"num_kv_heads": 0}), "num_kv_heads"),
])
def test_multi_head_constructor_checks(arguments, message):
    *sizes, options = arguments if isinstance(arguments[-1], dict) else (*arguments, {})
    with pytest.raises(ValueError, match=message):
        fastattn.MultiHeadAttention(*sizes, **options)


def test_norm_and_feed_forward_checks():
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        fastattn.LayerNorm(0)
    with pytest.raises(ValueError, match="eps must be a positive"):
        fastattn.LayerNorm(4, eps=-1.0)
    with pytest.raises(ValueError, match="dim_feedforward"):
        fastattn.layers.FeedForward(4, 0)
    with pytest.raises(ValueError, match=r"FeedForward expects a last dim of 4.*\(2, 3\)"):
        fastattn.layers.FeedForward(4, 8)(np.ones((2, 3)))
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        fastattn.LayerNorm(4, dtype=np.float16)


def test_query_that_sees_no_key_gives_the_output_bias(rng):
    layer = fastattn.MultiHeadAttention(8, 2, dtype=np.float64, seed=0)
    state = layer.state_dict()
    state["out_proj.bias"] = rng.standard_normal(8)
    layer.load_state_dict(state)
    x = rng.standard_normal((2, 3, 8))
    mask = np.ones((2, 3, 3), bool)
    mask[0, 1] = False  # query 1 of entry 0 sees nothing
    out = layer(x, mask=mask, kv_lengths=[3, 0])  # entry 1 has no keys at all
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out[0, 1], state["out_proj.bias"], atol=1e-15)
    np.testing.assert_allclose(out[1], np.broadcast_to(state["out_proj.bias"], (3, 8)),
                               atol=1e-15)


# ---------------------------------------------------------------- linear

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0, 64), (3, 64), (1000, 300), (2, 517, 256), (4, 8, 130, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_numpy(shape, with_bias, dtype):
    """Small products go to NumPy, large ones to the row-block kernel; both agree."""
    from fastattn.layers.linear import linear

    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)  # (..., in)
    weight = rng.standard_normal((96, shape[-1]))  # (out, in), float64: cast to x's dtype
    bias = rng.standard_normal(96) if with_bias else None  # (out,)
    expected = x.astype(np.float64) @ weight.T + (bias if with_bias else 0.0)  # (..., out)
    got = linear(x, weight, bias)
    assert got.shape == shape[:-1] + (96,) and got.dtype == dtype
    tolerance = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * shape[-1])


def test_multihead_checks_its_mask_once(monkeypatch, rng):
    """The layer checks the mask and builds its attention problem once: the kernel's
    argument checks do not run a second time."""
    import fastattn._contract.arguments as arguments
    import fastattn.layers.multihead as multihead
    import fastattn._contract.problem as problem

    calls = {"mask": 0, "check_attention": 0}
    real_mask, real_check = arguments.as_mask_array, problem.check_attention

    def counting_mask(mask):
        calls["mask"] += 1
        return real_mask(mask)

    def counting_check(*args, **kwargs):
        calls["check_attention"] += 1
        return real_check(*args, **kwargs)

    monkeypatch.setattr(multihead, "as_mask_array", counting_mask)
    monkeypatch.setattr(arguments, "as_mask_array", counting_mask)
    monkeypatch.setattr(problem, "as_mask_array", counting_mask)
    monkeypatch.setattr(problem, "check_attention", counting_check)
    layer = fastattn.MultiHeadAttention(16, 4, seed=0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    mask = rng.random((2, 5, 5)) < 0.8
    mask[..., 0] = True
    out = layer(x, mask=mask)
    assert calls == {"mask": 1, "check_attention": 0}
    expected = reference.multi_head_attention(x, x, x, layer.state_dict(), 4, mask=mask)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0, 5, 64), (2, 3, 64), (2, 517, 256), (3, 130, 64),
                                   (1, 1, 300)])
@pytest.mark.parametrize("heads", [1, 3, 8])
def test_linear_split_into_heads(shape, heads, dtype):
    """With ``heads``, the result comes head-major ``(B, H, L, d)`` and C-contiguous,
    equal to splitting the plain result (kernel path, with row blocks that straddle
    batch entries, and the small-product path alike)."""
    from fastattn.layers.linear import linear

    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)  # (B, L, in)
    weight = rng.standard_normal((24 * heads, shape[-1]))  # (H * d, in)
    bias = rng.standard_normal(24 * heads)  # (H * d,)
    got = linear(x, weight, bias, split_heads=heads)
    batch, length = shape[:2]
    plain = x.astype(np.float64) @ weight.T + bias  # (B, L, H * d)
    expected = plain.reshape(batch, length, heads, 24).transpose(0, 2, 1, 3)  # (B, H, L, d)
    assert got.shape == (batch, heads, length, 24) and got.dtype == dtype
    assert got.flags.c_contiguous
    tolerance = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * shape[-1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0, 3, 5, 8), (2, 3, 4, 8), (2, 8, 517, 32), (3, 1, 130, 64)])
def test_linear_merges_heads(shape, dtype):
    """With ``merge_heads``, the input is head-major ``(B, H, L, d)`` and each row
    ``(b, l)`` reads the heads side by side: equal to merging them first (kernel
    path, and the small-product path)."""
    from fastattn.layers.linear import linear

    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(dtype)  # (B, H, L, d)
    batch, heads, length, head_dim = shape
    weight = rng.standard_normal((40, heads * head_dim))  # (out, H * d)
    bias = rng.standard_normal(40)  # (out,)
    merged = x.astype(np.float64).transpose(0, 2, 1, 3).reshape(
        batch, length, heads * head_dim)  # (B, L, H * d)
    expected = merged @ weight.T + bias  # (B, L, out)
    got = linear(x, weight, bias, merge_heads=True)
    assert got.shape == (batch, length, 40) and got.dtype == dtype
    tolerance = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * heads * head_dim)


# ---------------------------------------------------------------- dropout

def test_attention_dropout_in_training_mode_only(rng):
    """In training mode each call draws a seed from the layer's rng and drops with it;
    the result equals the kernel called on the layer's projections with that seed."""
    layer = fastattn.MultiHeadAttention(16, 4, dtype=np.float64, seed=3, dropout=0.3,
                                        rng=np.random.default_rng(9))
    x = rng.standard_normal((2, 12, 16))
    evaluated = layer(x, causal=True)
    np.testing.assert_array_equal(evaluated, layer(x, causal=True))  # eval: no dropout
    layer.train()
    trained = [layer(x, causal=True) for _ in range(2)]
    assert np.abs(trained[0] - evaluated).max() > 1e-3
    assert np.abs(trained[0] - trained[1]).max() > 1e-3  # a new seed per call
    seeds = np.random.default_rng(9)
    for out in trained:
        seed = int(seeds.integers(0, 2 ** 63, dtype=np.int64))
        heads = lambda w, b: (x @ w.T + b).reshape(2, 12, 4, 4).transpose(0, 2, 1, 3)  # noqa: E731
        attended = reference.scaled_dot_product_attention(
            heads(layer.w_query, layer.b_query), heads(layer.w_key, layer.b_key),
            heads(layer.w_value, layer.b_value), causal=True, dropout_p=0.3,
            dropout_seed=seed)  # (2, H, L, d)
        expected = attended.transpose(0, 2, 1, 3).reshape(2, 12, 16) @ layer.w_out.T + layer.b_out
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(layer.eval()(x, causal=True), evaluated)


def test_transformer_layers_switch_their_attentions(rng):
    encoder = fastattn.TransformerEncoderLayer(16, 4, 32, dropout=0.5, seed=1, dtype=np.float64)
    decoder = fastattn.TransformerDecoderLayer(16, 4, 32, dropout=0.5, seed=1, dtype=np.float64)
    x = rng.standard_normal((2, 6, 16))
    for layer, call in ((encoder, lambda: encoder(x)), (decoder, lambda: decoder(x, x))):
        before = call()
        assert layer.train() is layer
        assert np.abs(call() - before).max() > 1e-3
        np.testing.assert_array_equal(layer.eval()(*((x,) if layer is encoder else (x, x))),
                                      before)


@pytest.mark.parametrize("dropout, error", [(1.0, ValueError), (-0.5, ValueError),
                                            ("0.1", TypeError)])
def test_bad_dropout_is_refused(dropout, error):
    with pytest.raises(error, match="dropout_p"):
        fastattn.MultiHeadAttention(16, 4, dropout=dropout)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        fastattn.MultiHeadAttention(16, 4, dropout=0.1, rng=42)
