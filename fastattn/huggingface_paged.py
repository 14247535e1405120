"""fastattn as the attention of transformers' continuous batching (``generate_batch``).

::

    import fastattn.huggingface_paged
    outputs = fastattn.huggingface_paged.generate_batch(model, prompts, generation_config)

Transformers' continuous batching (``model.generate_batch``, ``init_continuous_batching``)
keeps every request's keys and values in one paged cache and runs all scheduled
requests as one packed sequence per step. It accepts only ``"sdpa"``,
``"paged|eager"`` and flash implementations: its manager raises ``ValueError`` for any
other ``attn_implementation``, a registered one included, and a custom name containing
``"flash"`` is sent to the flash-kernel loader, which fails for a function that is not
a Hub kernel. :func:`continuous_batching` therefore builds the manager under
``"paged|eager"`` (the check passes) and switches the model to :func:`attention_forward`
(registered as ``"fastattn_paged"``) before the first step; the check runs only when
a manager is built, and with a non-sdpa, non-eager implementation transformers builds
no dense masks and passes the packed layout instead.

What each step hands the attention function, and what fastattn does with it:

- A prefill or mixed step: the queries of every request packed, ``(1, H, total_q, D)``,
  every request's keys and values ``(1, Hkv, total_k, D)``, gathered from the cache by
  its ``update`` in the model's layer before the attention function is called, and
  ``cu_seq_lens_q/k``. fastattn runs :func:`fastattn.torch.varlen_attention` with
  ``causal=True, causal_alignment="bottom_right"`` (each request's queries are its
  newest tokens; a chunked prefill's too).
- A decode step (one new token per request) with a block table: the cache's page
  views ``k_cache``, ``v_cache`` ``(n_pages, page_size, Hkv, D)``, ``block_table``
  and ``cu_seq_lens_k``, the new keys and values not yet written. fastattn writes
  them into the pages and :func:`fastattn.paged_attention` reads the pages in place:
  no gather. Transformers enables this path only for FlashAttention on CUDA or XPU;
  :func:`continuous_batching` turns it on (``max_blocks_per_request``), since
  transformers' page views are fastattn's layout.

PyTorch and transformers are optional dependencies:
``pip install "fastattn[huggingface]"``.
"""

try:
    import torch
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints
    from transformers.modeling_utils import AttentionInterface
except ImportError as error:  # pragma: no cover - exercised in an environment without them
    raise ImportError(
        "fastattn.huggingface_paged needs PyTorch and transformers; install them with "
        'pip install "fastattn[huggingface]"') from error

import contextlib
import copy
import math

import numpy as np

import fastattn
import fastattn.torch

__all__ = ["register", "attention_forward", "continuous_batching", "generate_batch"]

# the attention_implementation name continuous batching runs fastattn under
PAGED_NAME = "fastattn_paged"
# what the manager is built under: an implementation its check accepts for every model
_ACCEPTED_NAME = "paged|eager"
# transformers' default for max_blocks_per_request when nothing hints at request lengths
_DEFAULT_BLOCKS_PER_REQUEST = 32


def register(name=PAGED_NAME):
    """Register :func:`attention_forward` with transformers' ``AttentionInterface``.

    :func:`continuous_batching` and :func:`generate_batch` call it; it is needed only
    to drive a continuous-batching manager by hand.

    Returns
    -------
    str
        ``name``.

    Examples
    --------
    >>> import fastattn.huggingface_paged
    >>> fastattn.huggingface_paged.register()
    'fastattn_paged'
    """
    AttentionInterface.register(name, attention_forward)
    return name


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, softcap=None, cu_seq_lens_q=None,
                      cu_seq_lens_k=None, block_table=None, k_cache=None, v_cache=None,
                      **kwargs):
    r"""The attention function of a continuous-batching step.

    Request ``s`` holds query rows ``cu_seq_lens_q[s]:cu_seq_lens_q[s + 1]`` (its
    newest tokens) and ``n_s = cu_seq_lens_k[s + 1] - cu_seq_lens_k[s]`` tokens in all;
    its query ``i`` sits at position ``p_i = n_s - Lq_s + i`` and sees keys
    ``j <= p_i`` of its own request (and ``j > p_i - w`` with a sliding window ``w``):

    .. math::

        \mathrm{out}_{s,i} = \sum_{j \in V(i)} \mathrm{softmax}_j\big(\mathrm{scaling}\;
        q_{s,i} \cdot k_{s,j}\big)\, v_{s,j}, \qquad
        V(i) = \{\, j \le p_i \,\}\ (\cap \{\, j > p_i - w \,\}).

    Parameters
    ----------
    module : torch.nn.Module
        The calling attention layer.
    query : torch.Tensor, shape ``(1, H, total_q, D)``
        The queries of every request, packed.
    key, value : torch.Tensor, shape ``(1, Hkv, total_k, D)`` or ``(1, Hkv, total_q, D)``
        Every request's keys and values, read back from the cache (prefill and mixed
        steps); with ``block_table``, only the new tokens' (decode steps).
    attention_mask : None
        Continuous batching builds no mask for this implementation.
    scaling : float, optional
        Default ``1 / sqrt(D)``.
    sliding_window : int, optional
        A sliding layer's window ``w``: query ``i`` sees keys ``p_i - w < j <= p_i``
        (``window=(w - 1, 0)``). Transformers' sliding-window cache hands over each
        request's last ``min(past, w - 1)`` cached tokens, in order, then its new ones.
    softcap : float, optional
        Score soft-capping (Gemma 2's ``attn_logit_softcapping``).
    cu_seq_lens_q, cu_seq_lens_k : torch.Tensor of int, shape ``(n_requests + 1,)``
        Each request's first query row and first key row.
    block_table : torch.Tensor of int, shape ``(n_requests, max_pages)``, optional
        A decode step: each request's pages in ``k_cache`` and ``v_cache``
        ``(n_pages, page_size, Hkv, D)``; the new keys and values are written at
        position ``n_s - 1`` of each request, then the pages are read in place.

    Returns
    -------
    attn_output : torch.Tensor, shape ``(1, total_q, H, D)``
    attn_weights : None

    Raises
    ------
    ValueError
        A call without ``cu_seq_lens_q`` and ``cu_seq_lens_k`` (outside continuous
        batching: use ``attn_implementation="fastattn"``).

    Examples
    --------
    Two requests packed, the second attending to 3 earlier tokens and its 2 new ones:

    >>> import torch, fastattn.huggingface_paged
    >>> generator = torch.Generator().manual_seed(0)
    >>> query = torch.randn(1, 4, 6, 8, generator=generator)          # 4 + 2 queries
    >>> key, value = (torch.randn(1, 2, 9, 8, generator=generator) for _ in range(2))
    >>> cu_q, cu_k = torch.tensor([0, 4, 6]), torch.tensor([0, 4, 9])
    >>> out, _ = fastattn.huggingface_paged.attention_forward(
    ...     torch.nn.Module(), query, key, value, None, cu_seq_lens_q=cu_q,
    ...     cu_seq_lens_k=cu_k)
    >>> out.shape                                                      # (1, total_q, H, D)
    torch.Size([1, 6, 4, 8])
    >>> alone = torch.nn.functional.scaled_dot_product_attention(
    ...     query[:, :, 4:], key[:, :, 4:], value[:, :, 4:], enable_gqa=True,
    ...     attn_mask=torch.ones(2, 5, dtype=torch.bool).tril(3))
    >>> bool(torch.allclose(out[0, 4:], alone[0].transpose(0, 1), atol=1e-5))
    True
    """
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError(
            f"{PAGED_NAME} is the attention of transformers' continuous batching and needs "
            "cu_seq_lens_q and cu_seq_lens_k; use attn_implementation='fastattn' elsewhere")
    options = {"scale": scaling, "causal": True, "causal_alignment": "bottom_right"}
    if sliding_window is not None:  # a sliding layer's cache reads its last w - 1 tokens
        options["window"] = (sliding_window - 1, 0)
    if softcap is not None:
        options["softcap"] = softcap
    if block_table is not None and k_cache is not None and v_cache is not None:
        return _decode_in_place(query, key, value, cu_seq_lens_k, block_table, k_cache,
                                v_cache, options), None
    packed = [tensor[0].transpose(0, 1) for tensor in (query, key, value)]  # (total, H, D)
    out = fastattn.torch.varlen_attention(*packed, cu_seq_lens_q, cu_seq_lens_k,
                                          **options)  # (total_q, H, D)
    return out[None], None  # (1, total_q, H, D)


def _decode_in_place(query, key, value, cu_seq_lens_k, block_table, k_cache, v_cache,
                     options):
    """One new token per request: its key and value written into the pages ``k_cache``,
    ``v_cache`` ``(n_pages, page_size, Hkv, D)`` at position ``n_s - 1``, then
    :func:`fastattn.paged_attention` over the pages in place. Returns ``(1, B, H, D)``.

    The index arithmetic and the writes run on NumPy views of the tensors (no thread
    team wakes for a few rows)."""
    requests = query.shape[2]
    bounds = cu_seq_lens_k.numpy()  # (>= B + 1,)
    seq_lens = (bounds[1:requests + 1] - bounds[:requests]).astype(np.int64)  # (B,) with new
    table = block_table[:requests].numpy()  # (B, max_pages), -1 past each request's pages
    key_pages, value_pages = (fastattn.torch._compute_array(cache)
                              for cache in (k_cache, v_cache))  # (n_pages, page_size, Hkv, D)
    position = seq_lens - 1  # (B,) where the new token goes
    pages = table[np.arange(requests), position // key_pages.shape[1]]  # (B,)
    rows = position % key_pages.shape[1]  # (B,)
    key_pages[pages, rows] = fastattn.torch._compute_array(key[0]).transpose(1, 0, 2)  # (B, Hkv, D)
    value_pages[pages, rows] = fastattn.torch._compute_array(value[0]).transpose(1, 0, 2)
    queries = fastattn.torch._compute_array(query[0]).transpose(1, 0, 2)[:, :, None]  # (B, H, 1, D)
    out = fastattn.paged_attention(queries, key_pages, value_pages, table, seq_lens,
                                   **options)  # (B, H, 1, D)
    out = fastattn.torch._as_tensor(out, query.dtype)
    return out.transpose(1, 2).reshape(1, requests, out.shape[1], out.shape[3])  # (1, B, H, D)


# ---------------------------------------------------------------- entry points

@contextlib.contextmanager
def continuous_batching(model, generation_config=None, continuous_batching_config=None, *,
                        workload_hints=None, decode_in_place=True):
    """A started continuous-batching manager whose attention is fastattn.

    Transformers' ``init_continuous_batching`` under fastattn: the manager is built
    while the model is on ``"paged|eager"`` (transformers' check accepts no other
    custom implementation), then the model runs on :func:`attention_forward` until the
    context ends, when the manager is stopped and destroyed and the model's
    ``attn_implementation`` restored.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal language model (any ``attn_implementation``).
    generation_config : transformers.GenerationConfig, optional
        Default ``model.generation_config``.
    continuous_batching_config : transformers.ContinuousBatchingConfig, optional
        Copied; its ``auto_switch_to_flash`` is turned off. ``max_blocks_per_request``
        bounds the requests whose decode steps read the pages in place (default
        enough for ``workload_hints``, else 32 pages).
    workload_hints : transformers' ``WorkloadHints``, optional
    decode_in_place : bool, default True
        Decode steps read the cache's pages in place (transformers' block-table path,
        which it otherwise enables only for FlashAttention on CUDA/XPU). False:
        every step reads keys and values gathered by transformers.

    Yields
    ------
    transformers' ``ContinuousBatchingManager``, started: ``add_request(s)``,
    ``get_result``, ``request_id_iter``.

    Examples
    --------
    >>> import torch, transformers, fastattn.huggingface_paged
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> config = transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(config).eval()
    >>> generation = transformers.GenerationConfig(max_new_tokens=3, do_sample=False,
    ...                                            eos_token_id=-1)
    >>> batching = transformers.ContinuousBatchingConfig(page_size=4, num_blocks=16,
    ...                                                  max_batch_tokens=32)
    >>> with fastattn.huggingface_paged.continuous_batching(
    ...         model, generation, batching) as manager:
    ...     request = manager.add_request([5, 6, 7], max_new_tokens=3)
    ...     result = manager.get_result(request_id=request, timeout=60)
    ...     while not result.is_finished():
    ...         result = manager.get_result(request_id=request, timeout=60)
    >>> len(result.generated_tokens)
    3
    """
    name = register()
    original = model.config._attn_implementation
    config = copy.deepcopy(continuous_batching_config or ContinuousBatchingConfig())
    config.auto_switch_to_flash = False
    blocks = config.max_blocks_per_request
    model.set_attn_implementation(_ACCEPTED_NAME)
    try:
        manager = model.init_continuous_batching(generation_config, config, workload_hints)
        model.set_attn_implementation(name)
        resolved = manager.continuous_batching_config
        if decode_in_place and blocks != 0:  # transformers resolved it to 0 on this device
            resolved.max_blocks_per_request = blocks if blocks is not None \
                else _blocks_for(workload_hints, resolved.page_size)
        manager.start()
        try:
            yield manager
        finally:
            manager.stop(block=True)
            manager.destroy()
    finally:
        model.set_attn_implementation(original)


def _blocks_for(workload_hints, page_size):
    """Pages per request for the in-place decode path: what the longest request of
    ``workload_hints`` needs (transformers' rule: one more, rounded up to even), else
    transformers' default of 32."""
    longest = 0 if workload_hints is None else \
        workload_hints.max_prompt_length + workload_hints.max_generated_length
    if longest <= 0:
        return _DEFAULT_BLOCKS_PER_REQUEST
    blocks = math.ceil(longest / page_size) + 1
    return blocks + blocks % 2


def generate_batch(model, inputs, generation_config=None, continuous_batching_config=None, *,
                   max_new_tokens=None, decode_in_place=True, record_timestamps=False,
                   timeout=None):
    """``model.generate_batch`` with fastattn as the attention.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal language model (any ``attn_implementation``; restored afterwards).
    inputs : list of list of int
        The prompts' token ids.
    generation_config : transformers.GenerationConfig, optional
        Default ``model.generation_config``.
    continuous_batching_config : transformers.ContinuousBatchingConfig, optional
        As for :func:`continuous_batching`.
    max_new_tokens : int, optional
        Default ``generation_config.max_new_tokens``.
    decode_in_place : bool, default True
        As for :func:`continuous_batching`.
    record_timestamps : bool, default False
        Record when each token was generated (each output's ``timestamps``).
    timeout : float, optional
        Seconds to wait for each result; None waits as long as the manager runs.

    Returns
    -------
    dict of str to transformers' ``GenerationOutput``
        By request id, in the order of ``inputs`` (as ``model.generate_batch``).

    Raises
    ------
    RuntimeError
        A request that failed (the manager's error), or a manager that stopped or a
        wait that timed out before every request finished. ``model.generate_batch``
        logs these and returns what it has.

    Examples
    --------
    >>> import torch, transformers, fastattn.huggingface_paged
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> config = transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(config).eval()
    >>> generation = transformers.GenerationConfig(max_new_tokens=4, do_sample=False,
    ...                                            eos_token_id=-1)
    >>> batching = transformers.ContinuousBatchingConfig(page_size=4, num_blocks=16,
    ...                                                  max_batch_tokens=32)
    >>> prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    >>> outputs = fastattn.huggingface_paged.generate_batch(model, prompts, generation,
    ...                                                     batching)
    >>> alone = model.generate(torch.tensor([prompts[1]]), generation_config=generation)
    >>> list(outputs["req_1"].generated_tokens) == alone[0, 2:].tolist()
    True
    """
    generation_config = model.generation_config if generation_config is None \
        else generation_config
    if max_new_tokens is None:
        max_new_tokens = generation_config.max_new_tokens
    copies = generation_config.num_return_sequences or 1
    hints = _workload_hints(inputs, max_new_tokens, copies)
    results = {}
    with continuous_batching(model, generation_config, continuous_batching_config,
                             workload_hints=hints, decode_in_place=decode_in_place) as manager:
        request_ids = manager.add_requests(inputs=inputs, max_new_tokens=max_new_tokens,
                                           record_timestamps=record_timestamps)
        while len(results) < len(request_ids) * copies:
            result = manager.get_result(timeout=1 if timeout is None else timeout)
            if result is None:
                if timeout is not None or not manager.is_running():
                    raise RuntimeError(
                        f"continuous batching {'timed out' if manager.is_running() else 'stopped'}"
                        f" with {len(results)} of {len(request_ids) * copies} requests finished")
                continue
            if result.is_finished():
                results[result.request_id] = result
    failed = {request: result.error for request, result in results.items()
              if result.error is not None}
    if failed:
        request, error = next(iter(failed.items()))
        raise RuntimeError(f"{len(failed)} request(s) failed in continuous batching; "
                           f"{request}: {error}")
    ordered = {}
    for request in request_ids:  # transformers' order: a request's children, then itself
        for child in range(copies - 1):
            ordered[f"{request}__child#{child}"] = results[f"{request}__child#{child}"]
        ordered[request] = results[request]
    return ordered


def _workload_hints(inputs, max_new_tokens, copies):
    """Transformers' ``WorkloadHints`` for a batch of prompts (as its ``generate_batch``
    builds them)."""
    return WorkloadHints(max_prompt_length=max((len(ids) for ids in inputs), default=0),
                         max_generated_length=max_new_tokens or 0,
                         num_requests=len(inputs) * copies)
