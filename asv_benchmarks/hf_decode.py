"""transformers greedy decoding, per token, with attn_implementation="fastattn" and "sdpa"
(issue 23 part 3): a Llama-style model (hidden 512, 8 heads, 2 kv heads, head dim 64,
4 layers), float32, 2 threads, after a 1024-token prompt.

Goals (fastattn over sdpa, each in a process of its own, as asv runs parameters):

- the time per new token, ``(t(1 + new) - t(1)) / new``: <= 0.93;
- the model's other work per token (the token's time minus the time in the model's
  attention function: linear layers, norms, the cache): <= 1.02, i.e. fastattn's
  threads do not slow PyTorch's down.

The interleaved comparison (persistent workers, one per implementation, A B A B, the
median of per-round ratios), with where a decoding step's attention time goes::

    python asv_benchmarks/hf_decode.py --rounds 9
    python asv_benchmarks/hf_decode.py --impls fastattn,fastattn@../older-checkout,sdpa

``fastattn@DIR`` imports fastattn from another checkout (before and after a change).
With ``--profile`` the workers also time the layers of fastattn's call (microseconds
per layer call: the attention function the model calls, ``fastattn.torch``, the NumPy
call, a prepared decoding step, the decode kernel; a layer a tree does not have is
left out); the timers add a little time of their own, so ratios come from runs
without it.
"""

import argparse
import json
import os
import sys
import time

try:  # imported by asv as part of the asv_benchmarks package
    from .common import WorkerProcess
except ImportError:  # run as a script: python asv_benchmarks/hf_decode.py
    from common import WorkerProcess

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


WORKER = r'''
import json, os, sys, time
implementation, threads, new_tokens, profile = (sys.argv[1], int(sys.argv[2]),
                                                int(sys.argv[3]), sys.argv[4] == "1")
if "@" in implementation:
    implementation, where = implementation.split("@", 1)
    sys.path.insert(0, where)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
torch.set_num_threads(threads)
import transformers
from transformers.modeling_utils import AttentionInterface
import fastattn, fastattn.huggingface, fastattn.torch
fastattn.set_num_threads(threads)
fastattn.huggingface.register()
transformers.logging.set_verbosity_error()

spent, decoding = {}, [False]


def timed(function, part, outermost=False):
    def wrapper(*args, **kwargs):
        if outermost:  # (module, query, ...): a decoding step has one query per head
            decoding[0] = args[1].shape[-2] == 1
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            if decoding[0]:
                spent[part] = spent.get(part, 0.0) + time.perf_counter() - start
    return wrapper


mapping = AttentionInterface._global_mapping
mapping[implementation] = timed(mapping[implementation], "attention function", True)
if profile and implementation == "fastattn":
    import fastattn._dispatch.run as run
    fastattn.torch.scaled_dot_product_attention = timed(
        fastattn.torch.scaled_dot_product_attention, "fastattn.torch")
    numpy_call = timed(fastattn.scaled_dot_product_attention, "NumPy call")
    fastattn.torch.fastattn = type(sys)("fastattn_timed")
    fastattn.torch.fastattn.__dict__.update(fastattn.__dict__)
    fastattn.torch.fastattn.scaled_dot_product_attention = numpy_call
    try:
        from fastattn._dispatch import decode_steps
        decode_steps.DecodeStep.__call__ = timed(decode_steps.DecodeStep.__call__,
                                                 "prepared step")
    except ImportError:  # a tree without prepared steps
        pass
    kernel_of = run.decode_kernel
    run.decode_kernel = lambda dtype: timed(kernel_of(dtype), "decode kernel")

torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
model = transformers.AutoModelForCausalLM.from_config(
    config, attn_implementation=implementation).eval()
prompt = torch.randint(1, 1024, (1, 1024), generator=torch.Generator().manual_seed(1))


def generate(count):
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=count,
                       min_new_tokens=count, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


generate(4)
print(json.dumps("ready"), flush=True)  # compiled and warm: the parent starts timing
for line in sys.stdin:
    one = generate(1)
    spent.clear()
    many = generate(1 + new_tokens)
    token = (many - one) / new_tokens
    calls = new_tokens * config.num_hidden_layers
    print(json.dumps({"token": token,
                      "other": token - spent.get("attention function", 0.0) / new_tokens,
                      "per_call_us": {part: 1e6 * seconds / calls
                                      for part, seconds in spent.items()}}), flush=True)
'''


def main():
    parser = argparse.ArgumentParser(description="interleaved per-token decoding times")
    parser.add_argument("--impls", default="fastattn,sdpa",
                        help="comma-separated: fastattn, fastattn@DIR, sdpa, eager, each "
                             "optionally +VAR=VALUE (its worker's environment); the last "
                             "is the peer of every ratio")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--new", type=int, default=NEW_TOKENS, help="new tokens per sample")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--profile", action="store_true",
                        help="also time the layers of fastattn's call")
    arguments = parser.parse_args()
    names = arguments.impls.split(",")
    workers = {}
    for name in names:  # NAME+VAR=VALUE: the worker runs with that environment variable
        implementation, *settings = name.split("+")
        environment = dict(os.environ, OMP_NUM_THREADS=str(arguments.threads),
                           **dict(setting.split("=", 1) for setting in settings))
        workers[name] = WorkerProcess(name, [sys.executable, "-c", WORKER, implementation,
                                             str(arguments.threads), str(arguments.new),
                                             "1" if arguments.profile else "0"], environment)
    for worker in workers.values():  # no worker compiles while another one times
        worker.read()
    samples = {name: [] for name in names}
    for round_index in range(arguments.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(workers[name].ask("sample"))
    for worker in workers.values():
        worker.close()

    def median(values):
        return sorted(values)[len(values) // 2]

    peer = names[-1]
    print(f"Llama-style decoding after a {PROMPT}-token prompt, {arguments.new} new tokens "
          f"per sample, {arguments.threads} threads, {arguments.rounds} interleaved rounds")
    print(f"{'implementation':<34}{'token ms':>9}{'other ms':>9}   token / {peer} "
          f"med [min max]   other work / {peer}")
    for name in names:
        tokens = [sample["token"] for sample in samples[name]]
        others = [sample["other"] for sample in samples[name]]
        line = f"{name:<34}{1e3 * median(tokens):9.3f}{1e3 * median(others):9.3f}"
        if name != peer:
            ratios = [a["token"] / b["token"] for a, b in zip(samples[name], samples[peer])]
            other = [a["other"] / b["other"] for a, b in zip(samples[name], samples[peer])]
            line += (f"   {median(ratios):.3f} [{min(ratios):.3f} {max(ratios):.3f}]"
                     f"        {median(other):.3f} [{min(other):.3f} {max(other):.3f}]")
        print(line)
    print("\nper layer call, us (median over rounds):")
    for name in names:
        parts = sorted({part for sample in samples[name] for part in sample["per_call_us"]})
        cells = ", ".join(f"{part} {median([s['per_call_us'].get(part, 0.0) for s in samples[name]]):.1f}"
                          for part in parts)
        print(f"  {name}: {cells}")


if __name__ == "__main__":
    main()
