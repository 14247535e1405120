"""transformers greedy decoding, per token, with attn_implementation="fastattn" and "sdpa"
(issue 23 part 3): a Llama-style model (hidden 512, 8 heads, 2 kv heads, head dim 64,
4 layers), float32, 2 threads, after a 1024-token prompt.

Goals (fastattn over sdpa, each in a process of its own, as asv runs parameters):

- the time per new token, ``(t(1 + new) - t(1)) / new``: <= 0.93;
- the model's other work per token (the token's time minus the time in the model's
  attention function: linear layers, norms, the cache): <= 1.02, i.e. fastattn's
  threads do not slow PyTorch's down.

The interleaved comparison (persistent workers, A B A B, the median of per-round
ratios) is ``python asv_benchmarks/hf_models.py --cases llama-decode``.
"""

import os
import time

THREADS = 2
NEW_TOKENS = 32
PROMPT = 1024


class TrackLlamaDecode:
    """Per-token times of greedy decoding; the implementation is the parameter."""

    params = [["fastattn", "sdpa"]]
    param_names = ["implementation"]
    unit = "ms"
    timeout = 900
    number = 1
    repeat = 1

    def setup(self, implementation):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import torch
            import transformers
        except ImportError:
            raise NotImplementedError("needs torch and transformers") from None
        from transformers.modeling_utils import AttentionInterface

        torch.set_num_threads(THREADS)
        if implementation == "fastattn":
            import fastattn
            import fastattn.huggingface

            fastattn.set_num_threads(THREADS)
            fastattn.huggingface.register()
        transformers.logging.set_verbosity_error()
        self.attention_seconds = 0.0
        attention = AttentionInterface._global_mapping[implementation]

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return attention(*args, **kwargs)
            finally:
                if args[1].shape[-2] == 1:  # (module, query, ...): a decoding step
                    self.attention_seconds += time.perf_counter() - start
        AttentionInterface._global_mapping[implementation] = timed
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
        self.model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=implementation).eval()
        self.prompt = torch.randint(1, 1024, (1, PROMPT),
                                    generator=torch.Generator().manual_seed(1))
        self.torch = torch
        self.generate(4)

    def generate(self, count):
        start = time.perf_counter()
        with self.torch.no_grad():
            self.model.generate(self.prompt, attention_mask=self.torch.ones_like(self.prompt),
                                max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                pad_token_id=0)
        return time.perf_counter() - start

    def per_token(self):
        """``(token seconds, other-work seconds)``, medians of five samples."""
        tokens, others = [], []
        for _ in range(5):
            one = self.generate(1)
            self.attention_seconds = 0.0
            many = self.generate(1 + NEW_TOKENS)
            token = (many - one) / NEW_TOKENS
            tokens.append(token)
            others.append(token - self.attention_seconds / NEW_TOKENS)
        return sorted(tokens)[2], sorted(others)[2]

    def track_token_ms(self, implementation):
        return 1e3 * self.per_token()[0]

    def track_other_work_ms(self, implementation):
        return 1e3 * self.per_token()[1]
