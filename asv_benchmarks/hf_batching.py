"""transformers' continuous batching (``generate_batch``) with fastattn as the attention
(:mod:`fastattn.huggingface_paged`) and with ``"sdpa"``: a Llama-style model (hidden
512, 8 heads, 2 kv heads, head dim 64, 4 layers), float32, 2 threads, greedy; 4
requests of 700 to 1100 prompt tokens, 32 new tokens each, pages of 64 tokens.

Implementations: ``fastattn`` (decode steps read transformers' cache pages in place),
``fastattn-gathered`` (every step on the keys transformers' cache gathers,
``decode_in_place=False``) and ``sdpa`` (``model.generate_batch``).

Goals (fastattn over sdpa):

- a decode step of all requests together (from the tokens' timestamps): <= 0.7;
- the whole batch, prefill included, per generated token: <= 0.8.

The interleaved comparison (one persistent worker per implementation, A B C A B C ...,
the median [min max] of the per-round ratios; tokens checked equal)::

    python asv_benchmarks/hf_batching.py --rounds 9
"""

import argparse
import json
import os
import sys
import time

try:  # imported by asv as part of the asv_benchmarks package
    from .common import WorkerProcess
except ImportError:  # run as a script
    from common import WorkerProcess

THREADS = 2
PROMPTS = [900, 1100, 700, 1000]  # prompt lengths of the requests
NEW_TOKENS = 32
IMPLEMENTATIONS = ["fastattn", "fastattn-gathered", "sdpa"]
GOALS = {"decode step": 0.7, "per token": 0.8}  # fastattn / sdpa


def batch_runner(implementation):
    """A function running the batch once; it returns ``(seconds, generated tokens,
    seconds per decode step, the tokens of each request)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        import transformers
    except ImportError:
        raise NotImplementedError("needs torch and transformers") from None
    torch.set_num_threads(THREADS)
    import fastattn
    import fastattn.huggingface_paged

    fastattn.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 2048, (length,), generator=generator).tolist()
               for length in PROMPTS]
    generation = transformers.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False,
                                               eos_token_id=-1, pad_token_id=0)

    def batching():
        return transformers.ContinuousBatchingConfig(page_size=64, num_blocks=256,
                                                     max_batch_tokens=1024)

    def run():
        start = time.perf_counter()
        if implementation == "sdpa":
            outputs = model.generate_batch(prompts, generation_config=generation,
                                           continuous_batching_config=batching(),
                                           record_timestamps=True)
        else:
            outputs = fastattn.huggingface_paged.generate_batch(
                model, prompts, generation, batching(), record_timestamps=True,
                decode_in_place=implementation == "fastattn")
        seconds = time.perf_counter() - start
        tokens = [list(result.generated_tokens) for result in outputs.values()]
        stamps = [result.timestamps for result in outputs.values()]
        # all requests decode together from the last one's first token until the
        # first one finishes
        first, done = max(times[0] for times in stamps), min(times[-1] for times in stamps)
        steps = min(sum(first < t <= done for t in times) for times in stamps)
        return seconds, sum(map(len, tokens)), (done - first) / max(steps, 1), tokens

    run()  # compile, warm
    return run


class TrackContinuousBatching:
    """Decode-step and per-token times; the implementation is the parameter."""

    params = [IMPLEMENTATIONS]
    param_names = ["implementation"]
    unit = "ms"
    timeout = 900
    number = 1
    repeat = 1

    def setup(self, implementation):
        self.run = batch_runner(implementation)

    def samples(self):
        """Medians of three runs: ``(seconds per token, seconds per decode step)``."""
        runs = [self.run() for _ in range(3)]
        per_token = sorted(seconds / count for seconds, count, _, _ in runs)[1]
        per_step = sorted(step for _, _, step, _ in runs)[1]
        return per_token, per_step

    def track_token_ms(self, implementation):
        return 1e3 * self.samples()[0]

    def track_decode_step_ms(self, implementation):
        return 1e3 * self.samples()[1]


def worker(implementation):
    """Answer each line of stdin with one run of the batch, as JSON."""
    run = batch_runner(implementation)
    for _ in sys.stdin:
        print(json.dumps(run()), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        return worker(arguments.worker)
    environment = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    workers = {name: WorkerProcess(name, [sys.executable, __file__, "--worker", name],
                                   environment) for name in IMPLEMENTATIONS}
    samples = {name: {"per token": [], "decode step": []} for name in IMPLEMENTATIONS}
    for round_index in range(arguments.rounds):
        shift = round_index % len(IMPLEMENTATIONS)  # each goes first in turn
        tokens = {}
        for name in IMPLEMENTATIONS[shift:] + IMPLEMENTATIONS[:shift]:
            seconds, count, step, tokens[name] = workers[name].ask("run")
            samples[name]["per token"].append(seconds / count)
            samples[name]["decode step"].append(step)
        if any(got != tokens["sdpa"] for got in tokens.values()):
            raise AssertionError(f"round {round_index}: the implementations' tokens differ")
    for each in workers.values():
        each.close()

    def median(values):
        return sorted(values)[len(values) // 2]

    print(f"threads={THREADS}, rounds={arguments.rounds}, prompts {PROMPTS}, "
          f"{NEW_TOKENS} new tokens each; tokens equal in every round")
    for measure, goal in GOALS.items():
        print(f"{measure}:")
        for name in IMPLEMENTATIONS:
            ratios = [a / b for a, b in zip(samples[name][measure], samples["sdpa"][measure])]
            verdict = f"  goal <= {goal} {'met' if median(ratios) <= goal else 'MISSED'}" \
                if name == "fastattn" else ""
            print(f"  {name:<18}{1e3 * median(samples[name][measure]):9.2f} ms   / sdpa "
                  f"{median(ratios):.3f} [{min(ratios):.3f} {max(ratios):.3f}]{verdict}")


if __name__ == "__main__":
    main()
