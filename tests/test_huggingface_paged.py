"""fastattn as the attention of transformers' continuous batching (``generate_batch``).

Small randomly initialised Llama (grouped-query heads, 2 query heads per kv head),
Qwen2 (one kv head), Mistral (sliding window 8 in every layer) and Gemma 2 (sliding and
full layers, softcap) models generate greedily for prompts of awkward lengths (1 token,
within a page, a page plus one, longer than the window, longer than a step's token
budget so its prefill is chunked) with ``fastattn.huggingface_paged.generate_batch``:
the tokens equal those of the same model's continuous batching with ``"sdpa"``
(``"paged|eager"`` for Gemma 2, which has no sdpa) and of ordinary ``generate``; the
log-probabilities of the chosen tokens agree within 1e-4. Both paths are checked to
run: decode steps reading the cache's pages in place (``fastattn.paged_attention``;
transformers offers it for models without sliding layers) and every step on keys
gathered by transformers (``decode_in_place=False``). Also: a request joining a running
batch, a prefill attending to pages shared with an earlier request (prefix sharing),
forked requests (``num_return_sequences=2``), failures raised, the model's
``attn_implementation`` restored.
Skipped when PyTorch or transformers is not installed.
"""

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
huggingface_paged = pytest.importorskip("fastattn.huggingface_paged")
import fastattn  # noqa: E402
import fastattn.huggingface  # noqa: E402

LOGPROB_TOLERANCE = 1e-4  # float32 log-probabilities of the chosen tokens vs sdpa
PAGE_SIZE = 4  # transformers' smallest page
MAX_BATCH_TOKENS = 16  # a step's token budget: the 19-token prompt's prefill is chunked
NEW_TOKENS = 6
# 1 token, a page - 1, a page + 1, two requests within one step, one past the budget
PROMPTS = [[7], [3, 1, 4], [2, 7, 1, 8, 2], [5, 9, 2, 6, 5, 3, 5, 8, 9, 7],
           [(11 * i) % 89 + 1 for i in range(19)]]

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
SLIDING_WINDOW = 8  # shorter than the longer prompts
CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=1)),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2,
                                                 sliding_window=SLIDING_WINDOW)),
    "gemma2": (transformers.Gemma2Config, dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=50.0)),
}
# transformers' block-table (in-place decode) path needs every layer's cache to keep
# pages; its sliding-window cache is a rolling buffer
IN_PLACE_DECODING = {"llama", "qwen2"}
# transformers' continuous batching and generate compared against: sdpa, where the model
# has it (Gemma 2 has eager attention only)
REFERENCE = {"gemma2": ("paged|eager", "eager")}


def reference_implementations(name):
    """``(for continuous batching, for generate)``."""
    return REFERENCE.get(name, ("sdpa", "sdpa"))


def make_model(name, implementation="sdpa"):
    config_class, options = CONFIGS[name]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        config_class(**COMMON, **options), attn_implementation=implementation).eval()


def generation_config():
    return transformers.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False,
                                         eos_token_id=-1, pad_token_id=0)


def batching_config():
    return transformers.ContinuousBatchingConfig(
        page_size=PAGE_SIZE, num_blocks=64, max_batch_tokens=MAX_BATCH_TOKENS,
        return_logprobs=True)


@pytest.fixture
def counted(monkeypatch):
    """Calls of fastattn's packed and paged functions, by name."""
    calls = {"varlen_attention": 0, "paged_attention": 0}
    for name, module in (("varlen_attention", fastattn.torch), ("paged_attention", fastattn)):
        original = getattr(module, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.parametrize("decode_in_place", [True, False])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_generate_batch_matches_sdpa_and_generate(name, decode_in_place, counted):
    batching, generating = reference_implementations(name)
    model = make_model(name, batching)
    expected = model.generate_batch(PROMPTS, generation_config=generation_config(),
                                    continuous_batching_config=batching_config())
    assert model.config._attn_implementation == batching
    assert counted == {"varlen_attention": 0, "paged_attention": 0}  # sdpa ran alone

    got = huggingface_paged.generate_batch(model, PROMPTS, generation_config(),
                                           batching_config(), decode_in_place=decode_in_place)
    assert list(got) == list(expected)  # request ids, in the prompts' order
    for request, result in got.items():
        assert result.error is None
        assert result.generated_tokens == expected[request].generated_tokens, request
        torch.testing.assert_close(torch.tensor(result.logprobs),
                                   torch.tensor(expected[request].logprobs),
                                   rtol=0, atol=LOGPROB_TOLERANCE, msg=request)
    assert counted["varlen_attention"] > 0  # prefill and mixed steps
    assert (counted["paged_attention"] > 0) == (decode_in_place and name in IN_PLACE_DECODING)
    assert model.config._attn_implementation == batching  # restored

    model.set_attn_implementation(generating)
    for prompt, result in zip(PROMPTS, got.values()):  # ordinary generate, one prompt
        alone = model.generate(torch.tensor([prompt]), generation_config=generation_config())
        assert result.generated_tokens == alone[0, len(prompt):].tolist()


def test_manager_streams_requests_added_while_others_decode():
    """A request added after the first has started decoding joins a running batch."""
    model = make_model("llama")
    expected = model.generate_batch(PROMPTS[1:3], generation_config=generation_config(),
                                    continuous_batching_config=batching_config())
    results = {}
    with huggingface_paged.continuous_batching(model, generation_config(),
                                               batching_config()) as manager:
        first = manager.add_request(PROMPTS[1], max_new_tokens=NEW_TOKENS)
        started = manager.get_result(request_id=first, timeout=120)  # one token out
        second = manager.add_request(PROMPTS[2], max_new_tokens=NEW_TOKENS)
        for request in (first, second):
            result = started if request == first else None
            while result is None or not result.is_finished():
                result = manager.get_result(request_id=request, timeout=120)
            results[request] = result.generated_tokens
    assert list(results.values()) == [result.generated_tokens for result in expected.values()]


def test_shared_prefix_pages_are_read(monkeypatch):
    """A prompt that starts with a finished request's prompt reuses its full pages
    (transformers' prefix sharing): its prefill's queries are only the tokens after
    them, attending to the shared pages too."""
    model = make_model("llama")
    prompt = PROMPTS[3]  # two full pages and a half
    longer = prompt + [3, 3]
    steps = []
    original = fastattn.torch.varlen_attention

    def recording(q, k, v, cu_seqlens_q, cu_seqlens_k, **options):
        steps.append((cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()))
        return original(q, k, v, cu_seqlens_q, cu_seqlens_k, **options)
    with huggingface_paged.continuous_batching(model, generation_config(),
                                               batching_config()) as manager:
        for ids in (prompt, longer):
            if ids is longer:  # the first request has finished: record the second's steps
                monkeypatch.setattr(fastattn.torch, "varlen_attention", recording)
            request = manager.add_request(ids, max_new_tokens=NEW_TOKENS)
            result = manager.get_result(request_id=request, timeout=120)
            while not result.is_finished():
                result = manager.get_result(request_id=request, timeout=120)
    shared = 2 * PAGE_SIZE
    assert steps[0] == ([len(longer) - shared], [len(longer)])
    alone = model.generate(torch.tensor([longer]), generation_config=generation_config())
    assert result.generated_tokens == alone[0, len(longer):].tolist()


def test_forked_requests_match_sdpa():
    """num_return_sequences=2: each prompt's second sequence is a fork of the first's
    pages; results come in transformers' order (children, then the request)."""
    model = make_model("llama")
    config = generation_config()
    config.num_return_sequences = 2
    expected = model.generate_batch(PROMPTS[:3], generation_config=config,
                                    continuous_batching_config=batching_config())
    got = huggingface_paged.generate_batch(model, PROMPTS[:3], config, batching_config())
    assert list(got) == list(expected)
    assert [result.generated_tokens for result in got.values()] == [
        result.generated_tokens for result in expected.values()]


def test_model_restored_to_fastattn_after_generate_batch():
    """A model on attn_implementation="fastattn" generates in continuous batching
    through this module (transformers' own generate_batch refuses it) and is back on
    "fastattn" afterwards."""
    fastattn.huggingface.register()
    model = make_model("llama", "fastattn")
    with pytest.raises(ValueError, match="not supported for continuous batching"):
        model.generate_batch(PROMPTS[:2], generation_config=generation_config(),
                             continuous_batching_config=batching_config())
    got = huggingface_paged.generate_batch(model, PROMPTS[:2], generation_config(),
                                           batching_config())
    assert model.config._attn_implementation == "fastattn"
    for prompt, result in zip(PROMPTS[:2], got.values()):
        alone = model.generate(torch.tensor([prompt]), generation_config=generation_config())
        assert result.generated_tokens == alone[0, len(prompt):].tolist()


def test_failed_requests_raise(monkeypatch):
    """transformers' generate_batch logs a failed step and returns what it has;
    fastattn's raises, naming the error."""
    def broken(*args, **kwargs):
        raise FloatingPointError("a broken kernel")
    monkeypatch.setattr(fastattn.torch, "varlen_attention", broken)
    model = make_model("llama")
    with pytest.raises(RuntimeError, match="a broken kernel"):
        huggingface_paged.generate_batch(model, PROMPTS[:2], generation_config(),
                                         batching_config())
    assert model.config._attn_implementation == "sdpa"


def test_attention_forward_needs_the_packed_layout():
    query, key = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        huggingface_paged.attention_forward(torch.nn.Module(), query, key, key, None)


def test_decode_in_place_writes_the_new_token_and_matches_the_gathered_keys():
    """One decode step on pages shared by three requests (table rows padded with -1):
    the new keys land at each request's last position, and the output equals the
    packed attention over the same tokens gathered."""
    generator = torch.Generator().manual_seed(0)
    kv_heads, dim, page_size = 2, 8, 4
    k_cache, v_cache = (torch.randn(9, page_size, kv_heads, dim, generator=generator)
                        for _ in range(2))
    block_table = torch.tensor([[4, -1, -1], [0, 7, 2], [5, 1, -1]], dtype=torch.int32)
    lengths = torch.tensor([1, 9, 8])  # the new token included
    cu_seq_lens_k = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    query = torch.randn(1, 4, 3, dim, generator=generator)
    key, value = (torch.randn(1, kv_heads, 3, dim, generator=generator) for _ in range(2))
    out, _ = huggingface_paged.attention_forward(
        torch.nn.Module(), query, key, value, None, cu_seq_lens_q=torch.arange(4),
        cu_seq_lens_k=cu_seq_lens_k, block_table=block_table, k_cache=k_cache,
        v_cache=v_cache)

    tokens = [block_table[b, :(length + page_size - 1) // page_size].long()
              for b, length in enumerate(lengths.tolist())]
    gathered_k, gathered_v = (
        torch.cat([cache[pages].reshape(-1, kv_heads, dim)[:length]
                   for pages, length in zip(tokens, lengths.tolist())])
        for cache in (k_cache, v_cache))  # (total_k, Hkv, D)
    last = cu_seq_lens_k[1:] - 1
    torch.testing.assert_close(gathered_k[last], key[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(gathered_v[last], value[0].transpose(0, 1), rtol=0, atol=0)
    expected, _ = huggingface_paged.attention_forward(
        torch.nn.Module(), query, gathered_k.transpose(0, 1)[None],
        gathered_v.transpose(0, 1)[None], None, cu_seq_lens_q=torch.arange(4),
        cu_seq_lens_k=cu_seq_lens_k)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert out.shape == (1, 3, 4, dim)


def test_module_keeps_copies_of_configs():
    """The caller's ContinuousBatchingConfig is not changed."""
    config = batching_config()
    before = copy.deepcopy(config)
    huggingface_paged.generate_batch(make_model("llama"), PROMPTS[:1], generation_config(),
                                     config)
    assert vars(config) == vars(before)
