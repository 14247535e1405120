"""Greedy decoding with a KV cache: a small decoder-only transformer in NumPy whose
attention reads each layer's fastattn.KVCache in place.

The model (random weights, a seeded toy) embeds tokens, runs ``n_layers`` blocks of
pre-norm causal self-attention (grouped-query: fewer kv heads than query heads) and a
ReLU MLP, and maps the last position to logits. Decoding first appends the whole
prompt of every sequence to the caches (prompts of different lengths: each sequence
takes its own count), then one token per step: only the new token's keys and values
are computed and appended, and its query attends to everything its sequence holds.
:func:`generate_without_cache` recomputes the whole sequence every step (the same
tokens, for checking).

    python examples/kv_cache_decoding.py [--steps 20] [--page-size 16]
"""

import argparse

import numpy as np

import fastattn


class TinyDecoder:
    """Random weights of a decoder-only transformer of ``n_layers`` blocks."""

    def __init__(self, vocab=64, d_model=32, heads=4, kv_heads=2, n_layers=2, seed=0):
        rng = np.random.default_rng(seed)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d_model // heads

        def weight(*shape):
            return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        self.embedding = weight(vocab, d_model) * np.sqrt(vocab)  # (vocab, d)
        kv_width = kv_heads * self.head_dim
        self.layers = [dict(query=weight(d_model, d_model), key=weight(d_model, kv_width),
                            value=weight(d_model, kv_width), out=weight(d_model, d_model),
                            up=weight(d_model, 4 * d_model), down=weight(4 * d_model, d_model))
                       for _ in range(n_layers)]
        self.unembedding = weight(d_model, vocab)  # (d, vocab)

    def split_heads(self, x, heads):
        """``(B, n, heads * D)`` -> ``(B, heads, n, D)``."""
        return x.reshape(x.shape[0], x.shape[1], heads, self.head_dim).transpose(0, 2, 1, 3)

    def forward(self, tokens, caches=None, lengths=None):
        """Logits ``(B, n, vocab)`` of ``tokens`` ``(B, n)``. With ``caches`` (one
        :class:`fastattn.KVCache` per layer) the tokens' keys and values are appended
        (sequence ``b`` taking its first ``lengths[b]``) and attention reads the
        caches; without, causal attention over ``tokens`` alone."""
        x = self.embedding[tokens]  # (B, n, d)
        batch, n_new = tokens.shape
        for index, layer in enumerate(self.layers):
            h = norm(x)  # (B, n, d)
            q = self.split_heads(h @ layer["query"], self.heads)  # (B, H, n, D)
            k = self.split_heads(h @ layer["key"], self.kv_heads)  # (B, Hkv, n, D)
            v = self.split_heads(h @ layer["value"], self.kv_heads)  # (B, Hkv, n, D)
            if caches is None:
                attended = fastattn.scaled_dot_product_attention(
                    q, k, v, causal=True, enable_gqa=True)  # (B, H, n, D)
            else:
                caches[index].append(k, v, lengths=lengths)
                attended = caches[index].attend(q)  # (B, H, n, D)
            x = x + attended.transpose(0, 2, 1, 3).reshape(batch, n_new, -1) @ layer["out"]
            x = x + np.maximum(norm(x) @ layer["up"], 0.0) @ layer["down"]  # (B, n, d)
        return norm(x) @ self.unembedding  # (B, n, vocab)


def norm(x):
    """RMS normalisation over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def generate(model, prompts, steps, page_size=None):
    """Greedy continuations ``(B, steps)`` of ``prompts`` (lists of token ids of any
    lengths), decoding with one :class:`fastattn.KVCache` per layer."""
    batch = len(prompts)
    lengths = np.array([len(prompt) for prompt in prompts])
    padded = np.zeros((batch, lengths.max()), np.int64)  # (B, longest prompt)
    for b, prompt in enumerate(prompts):
        padded[b, :len(prompt)] = prompt
    caches = [fastattn.KVCache(batch, model.kv_heads, model.head_dim,
                               capacity=int(lengths.max()) + steps, page_size=page_size)
              for _ in model.layers]
    # the prompt: every position of every sequence (padding appended to no cache);
    # each sequence's next token comes from its own last prompt position. attend()
    # places the queries at each sequence's last tokens, so the prompt goes in one
    # token column at a time where lengths differ
    logits = model.forward(padded[:, :1], caches)[:, -1]  # (B, vocab)
    for t in range(1, lengths.max()):
        taking = (lengths > t).astype(np.int64)  # (B,) sequences whose prompt goes on
        step_logits = model.forward(padded[:, t:t + 1], caches, lengths=taking)[:, -1]
        logits = np.where(taking[:, None] == 1, step_logits, logits)  # (B, vocab)
    tokens = np.empty((batch, steps), np.int64)
    for step in range(steps):
        tokens[:, step] = np.argmax(logits, axis=-1)  # (B,)
        logits = model.forward(tokens[:, step:step + 1], caches)[:, -1]  # (B, vocab)
    return tokens


def generate_without_cache(model, prompts, steps):
    """The same greedy continuations, recomputing each whole sequence every step."""
    results = []
    for prompt in prompts:
        sequence = list(prompt)
        for _ in range(steps):
            logits = model.forward(np.array([sequence]))[0, -1]  # (vocab,)
            sequence.append(int(np.argmax(logits)))
        results.append(sequence[len(prompt):])
    return np.array(results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--page-size", type=int, default=16, help="0: contiguous cache")
    arguments = parser.parse_args()
    model = TinyDecoder()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [30, 31, 32, 33]]
    cached = generate(model, prompts, arguments.steps, arguments.page_size or None)
    for prompt, continuation in zip(prompts, cached):
        print(prompt, "->", continuation.tolist())
    same = np.array_equal(cached, generate_without_cache(model, prompts, arguments.steps))
    print("same tokens as recomputing every step:", same)


if __name__ == "__main__":
    main()
