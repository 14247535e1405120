"""fastattn on PyTorch tensors: a differentiable ``scaled_dot_product_attention``.

A thin adapter over :func:`fastattn.scaled_dot_product_attention` and its backward.
CPU tensors go in and come out; float32 and float64 tensors are handed to the kernels
as NumPy views of the same memory (``Tensor.numpy()``) and the results come back as
tensors over the kernels' arrays (``torch.from_numpy``), so nothing is copied on the
way. float16 and bfloat16 tensors are handed over the same way (bfloat16 as an
``ml_dtypes.bfloat16`` view, which needs ``pip install "fastattn[half]"``; without
ml_dtypes a float32 copy is made): the kernels read them as they are, compute in
float32 and write the output in the input dtype; ``lse`` is float32.

Gradients come from :func:`fastattn.scaled_dot_product_attention_backward` through a
``torch.autograd.Function`` that keeps the forward's ``out`` and ``lse`` (never the
``(Lq, Lk)`` weights).

PyTorch is an optional dependency: ``pip install "fastattn[torch]"``.
"""

try:
    import torch
except ImportError as error:  # pragma: no cover - exercised in an environment without torch
    raise ImportError(
        'fastattn.torch needs PyTorch; install it with pip install "fastattn[torch]"') from error

import numpy as np

import fastattn
from fastattn.attention import selected_results

__all__ = ["scaled_dot_product_attention", "varlen_attention"]

# Tensor dtypes computed natively, and the 16-bit ones read as stored (float32 compute).
NATIVE_DTYPES = (torch.float32, torch.float64)
WIDENED_DTYPES = (torch.float16, torch.bfloat16)

try:  # NumPy holds bfloat16 as ml_dtypes.bfloat16 (optional: fastattn[half])
    from ml_dtypes import bfloat16 as _NUMPY_BFLOAT16
except ImportError:  # pragma: no cover - exercised in an environment without ml_dtypes
    _NUMPY_BFLOAT16 = None


def scaled_dot_product_attention(query, key, value, mask=None, *, bias=None, kv_lengths=None,
                                 return_weights=False, return_lse=False, score_mod_grad=None,
                                 score_mod_args_grad=None, dropout_p=0.0, generator=None,
                                 **options):
    r"""fastattn's fused attention on CPU ``torch.Tensor``\ s, differentiable.

    .. math::

        \mathrm{out} = \mathrm{softmax}\!\left(\mathrm{scale}\cdot QK^\top + B,
        \text{masked}\right) V

    Validates and converts the tensors, then calls
    :func:`fastattn.scaled_dot_product_attention` (and, for gradients,
    :func:`fastattn.scaled_dot_product_attention_backward`); every rule of that
    function applies.

    Parameters
    ----------
    query : torch.Tensor, shape ``(*batch, Lq, Dk)``
    key : torch.Tensor, shape ``(*batch, Lk, Dk)``
    value : torch.Tensor, shape ``(*batch, Lk, Dv)``
        CPU tensors of one floating dtype: float32 or float64 (computed natively),
        float16 or bfloat16 (read as stored, computed in float32, the output in the
        input dtype and ``lse`` in float32); none is copied.
    mask : torch.Tensor or array_like of bool, optional
        Broadcastable to ``(*batch, Lq, Lk)``; **True = may attend** (as in
        ``torch.nn.functional.scaled_dot_product_attention``). A mask never
        has a gradient; one that requires grad is an error.
    bias : torch.Tensor or array_like, optional
        Added to the scaled scores. A bias tensor that requires grad gets its gradient
        (learned relative-position biases: T5, Swin, ALiBi-style tables), in its own
        shape, summed over the axes it broadcasts along.
    kv_lengths : torch.Tensor or array_like of int, optional
        Keys ``j >= kv_lengths[b]`` of batch entry ``b`` are padding.
    return_weights : bool, default False
        Also return the attention weights ``(*batch, Lq, Lk)``. They are a result,
        not a differentiable output: no gradient flows back through them.
    return_lse : bool, default False
        Also return the log-sum-exp of each row ``(*batch, Lq)`` (no gradient either).
    score_mod_grad : numba-compiled function, optional
        With a ``score_mod``, its derivative, for the backward (see
        :func:`fastattn.scaled_dot_product_attention_backward`).
    score_mod_args_grad : numba-compiled function, optional
        Needed when a tensor of ``score_mod_args`` requires grad: it adds each
        score's contribution to their gradients (see
        :func:`fastattn.scaled_dot_product_attention_backward`); those tensors then
        get their ``.grad`` (learned relative-position tables, per-head scales).
    dropout_p : float, default 0.0
        Attention dropout (PyTorch's ``dropout_p``). Unless ``dropout_seed=`` is
        given, the seed of the dropout decisions is drawn from ``generator`` (default:
        PyTorch's default CPU generator), so ``torch.manual_seed`` repeats a run; the
        backward regenerates the same decisions from it.
    generator : torch.Generator, optional
        Where the dropout seed is drawn from, leaving the default generator untouched.
    **options
        Any other keyword of :func:`fastattn.scaled_dot_product_attention`
        (``causal``, ``causal_alignment``, ``window``, ``scale``, ``enable_gqa``,
        ``softcap``, ``score_mod``, ``block_mask``, ...), passed unchanged to the
        forward and the backward; ``score_mod_args`` and ``mask_mod_args`` may hold
        tensors (read in place; only ``score_mod_args`` may require grad).

    Returns
    -------
    out : torch.Tensor, shape ``(*batch, Lq, Dv)``, or a tuple
        ``(out, weights)``, ``(out, lse)`` or ``(out, weights, lse)`` in that order.

    Raises
    ------
    ValueError
        A tensor on another device than the CPU; a mask or ``mask_mod_args`` tensor
        that requires grad; a ``score_mod_args`` tensor that requires grad without a
        ``score_mod_args_grad``.
    TypeError
        ``query``, ``key`` and ``value`` of different or non-floating dtypes.

    Notes
    -----
    Autograd records one node, :class:`_FusedAttention`, whose backward is fastattn's
    fused backward given the forward's ``out`` and ``lse``; nothing of size
    ``Lq*Lk`` is kept between the two. ``torch.autograd.gradcheck`` passes in
    float64. Under ``torch.no_grad()`` (or when no input requires grad) no autograd
    node is recorded.

    Examples
    --------
    >>> import torch, fastattn.torch
    >>> generator = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(2, 4, 64, 16, generator=generator, requires_grad=True)
    ...            for _ in range(3))
    >>> out = fastattn.torch.scaled_dot_product_attention(q, k, v, causal=True)
    >>> out.shape
    torch.Size([2, 4, 64, 16])
    >>> out.sum().backward()                           # fastattn's fused backward
    >>> expected = torch.nn.functional.scaled_dot_product_attention(
    ...     q.detach(), k.detach(), v.detach(), is_causal=True)
    >>> bool(torch.allclose(out, expected, atol=1e-5)), q.grad.shape
    (True, torch.Size([2, 4, 64, 16]))
    """
    dtype = _check_tensors(query, key, value)
    mask = _as_constant_array(mask, "mask")
    kv_lengths = _as_constant_array(kv_lengths, "kv_lengths")
    options = dict(options, kv_lengths=kv_lengths, dropout_p=dropout_p)
    if dropout_p and options.get("dropout_seed") is None:  # PyTorch's random stream
        options["dropout_seed"] = int(torch.randint(0, 2 ** 63 - 1, (1,), dtype=torch.int64,
                                                    generator=generator).item())
    if options.get("mask_mod_args") is not None:
        options["mask_mod_args"] = tuple(_as_constant_array(arg, f"mask_mod_args[{position}]")
                                         for position, arg
                                         in enumerate(options["mask_mod_args"]))
    arg_tensors = _score_mod_arg_tensors(options.get("score_mod_args"), score_mod_args_grad)
    inputs = (query, key, value)
    bias_tensor = bias if isinstance(bias, torch.Tensor) else None
    if bias_tensor is not None:
        _check_device(bias_tensor, "bias")

    if torch.is_grad_enabled() and any(
            isinstance(tensor, torch.Tensor) and tensor.requires_grad
            for tensor in inputs + arg_tensors + (bias_tensor,)):
        out, weights, lse = _FusedAttention.apply(query, key, value, mask, bias, options,
                                                  bool(return_weights), score_mod_grad,
                                                  score_mod_args_grad, *arg_tensors)
    else:
        options["bias"] = _bias_array(bias)
        if arg_tensors:
            options["score_mod_args"] = tuple(_bias_array(arg) for arg in arg_tensors)
        arrays = [_compute_array(tensor) for tensor in inputs]
        results = fastattn.scaled_dot_product_attention(
            *arrays, mask, return_weights=return_weights, return_lse=True, **options)
        out, weights, lse = _unpack(results, return_weights)
        out, weights = _as_tensor(out, dtype), _as_tensor(weights, dtype)
        lse = _lse_tensor(lse) if return_lse else None  # no tensor made when not asked for

    return selected_results(out, weights, lse, return_weights, return_lse)


class _FusedAttention(torch.autograd.Function):
    """The autograd node: forward and backward are fastattn's fused kernels.

    Saves ``query``, ``key``, ``value`` and the forward's ``out`` (in the input dtype)
    and ``lse`` (in the compute dtype: float32 for float16/bfloat16); the mask, the bias and the
    other options travel on ``ctx`` as NumPy arrays and Python values. A bias tensor is
    an input of the node: it gets a gradient when it requires one; so do the tensors
    of ``score_mod_args`` (the trailing inputs ``arg_tensors``).
    """

    @staticmethod
    def forward(ctx, query, key, value, mask, bias, options, return_weights, score_mod_grad,
                score_mod_args_grad, *arg_tensors):
        dtype = query.dtype
        options = dict(options, bias=_bias_array(bias))
        if arg_tensors:
            options["score_mod_args"] = tuple(_bias_array(arg) for arg in arg_tensors)
            ctx.arg_tensors = arg_tensors
        ctx.score_mod_args_grad = score_mod_args_grad
        arrays = [_compute_array(tensor) for tensor in (query, key, value)]
        results = fastattn.scaled_dot_product_attention(
            *arrays, mask, return_weights=return_weights, return_lse=True, **options)
        out, weights, lse = _unpack(results, return_weights)
        out_tensor = _as_tensor(out, dtype)  # (*batch, Lq, Dv)
        lse_tensor = _lse_tensor(lse)  # (*batch, Lq) float32 for 16-bit inputs
        ctx.save_for_backward(query, key, value, out_tensor, lse_tensor)
        ctx.mask, ctx.options = mask, dict(options)
        ctx.bias_like = bias if isinstance(bias, torch.Tensor) else None
        if score_mod_grad is not None:
            ctx.options["score_mod_grad"] = score_mod_grad

        weights_tensor = _as_tensor(weights, dtype)
        ctx.mark_non_differentiable(*(t for t in (weights_tensor, lse_tensor) if t is not None))
        return out_tensor, weights_tensor, lse_tensor

    @staticmethod
    def backward(ctx, grad_out, _grad_weights, _grad_lse):
        query, key, value, out, lse = ctx.saved_tensors
        arrays = [_compute_array(tensor) for tensor in (query, key, value)]
        grad_out = _compute_array(grad_out.to(out.dtype))  # (*batch, Lq, Dv)
        bias_needed = ctx.needs_input_grad[4]
        args_needed = ctx.needs_input_grad[9:]
        args_grad = ctx.score_mod_args_grad if any(args_needed) else None
        grads = fastattn.scaled_dot_product_attention_backward(
            grad_out, *arrays, _compute_array(out), lse.numpy(), ctx.mask,
            return_bias_grad=bias_needed, score_mod_args_grad=args_grad, **ctx.options)
        arg_grads = [None] * len(args_needed)
        if args_grad is not None:
            arg_grads = [_as_tensor(grad, tensor.dtype) if wanted else None
                         for grad, tensor, wanted in zip(grads[-1], ctx.arg_tensors,
                                                         args_needed)]
            grads = grads[:-1]
        sources = (query, key, value) + ((ctx.bias_like,) if bias_needed else ())
        needed = ctx.needs_input_grad[:3] + ((True,) if bias_needed else ())
        grads = [_as_tensor(grad, source.dtype) if wanted else None
                 for grad, source, wanted in zip(grads, sources, needed)]
        if not bias_needed:
            grads.append(None)
        return (*grads[:3], None, grads[3], None, None, None, None, *arg_grads)


def _check_tensors(query, key, value):
    """The common dtype of ``query``, ``key`` and ``value``, after checking that they
    are CPU tensors of one floating dtype."""
    names = ("query", "key", "value")
    for name, tensor in zip(names, (query, key, value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__} "
                            "(use fastattn.scaled_dot_product_attention for NumPy arrays)")
        _check_device(tensor, name)
    dtypes = {name: tensor.dtype for name, tensor in zip(names, (query, key, value))}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"query, key and value must have one dtype; got {dtypes}")
    dtype = query.dtype
    if dtype not in NATIVE_DTYPES + WIDENED_DTYPES:
        raise TypeError(f"query, key and value must be float16, bfloat16, float32 or float64 "
                        f"tensors; got {dtype}")
    return dtype


def _check_device(tensor, name):
    if not tensor.is_cpu:
        raise ValueError(f"{name} is on device {tensor.device}, but fastattn runs on the CPU; "
                         f"move it with {name}.cpu() (shape {tuple(tensor.shape)})")


def _as_constant_array(value, name):
    """A mask, bias or kv_lengths given as a tensor, as a NumPy array (a view when
    possible); anything else is passed on to fastattn unchanged."""
    if not isinstance(value, torch.Tensor):
        return value
    _check_device(value, name)
    if value.requires_grad:
        raise ValueError(
            f"{name} requires grad (shape {tuple(value.shape)}), but fastattn computes no gradient "
            f"for {name}; pass {name}.detach() if it is a constant")
    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.numpy()


def _score_mod_arg_tensors(args, score_mod_args_grad):
    """The tensors of ``score_mod_args`` (as a tuple; arrays are passed through),
    checked: on the CPU, and a ``score_mod_args_grad`` for those that require grad."""
    if args is None:
        return ()
    if not isinstance(args, (tuple, list)):
        return (args,)  # fastattn's check names the mistake
    for position, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            _check_device(arg, f"score_mod_args[{position}]")
            if arg.requires_grad and score_mod_args_grad is None and torch.is_grad_enabled():
                raise ValueError(
                    f"score_mod_args[{position}] requires grad (shape {tuple(arg.shape)}); "
                    f"pass score_mod_args_grad=, the function that adds each score's "
                    f"contribution to the gradients of score_mod_args, or pass "
                    f"score_mod_args[{position}].detach()")
    return tuple(args)


def _bias_array(bias):
    """The bias as fastattn takes it: a NumPy view of a tensor (float32 for a bfloat16
    one, which NumPy cannot hold), anything else unchanged."""
    if not isinstance(bias, torch.Tensor):
        return bias
    bias = bias.detach()
    if bias.dtype == torch.bfloat16:
        bias = bias.float()
    return bias.numpy()


def _compute_array(tensor):
    """A NumPy view of a tensor, as fastattn takes it: float16, float32 and float64
    as they are, bfloat16 as ``ml_dtypes.bfloat16`` (a float32 copy without
    ml_dtypes)."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        if _NUMPY_BFLOAT16 is None:
            return tensor.float().numpy()
        return tensor.view(torch.int16).numpy().view(_NUMPY_BFLOAT16)
    return tensor.numpy()


def _as_tensor(array, dtype):
    """A NumPy result as a tensor of ``dtype`` (shares memory unless a cast is needed;
    an ``ml_dtypes.bfloat16`` array is viewed as a bfloat16 tensor)."""
    if array is None:
        return None
    if _NUMPY_BFLOAT16 is not None and array.dtype == _NUMPY_BFLOAT16:
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _lse_tensor(lse):
    """The forward's lse as a tensor: float32 for 16-bit inputs, else the compute dtype."""
    return torch.from_numpy(lse)


def _unpack(results, return_weights):
    """``(out, weights or None, lse)`` from a call made with ``return_lse=True``."""
    if return_weights:
        return results
    out, lse = results
    return out, None, lse


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, return_lse=False,
                     score_mod_grad=None, score_mod_args_grad=None, dropout_p=0.0,
                     generator=None, **options):
    r"""fastattn's packed attention (:func:`fastattn.varlen_attention`) on CPU
    ``torch.Tensor``\ s, differentiable.

    Sequence ``s`` holds rows ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]`` of ``q`` and
    ``cu_seqlens_k[s]:cu_seqlens_k[s + 1]`` of ``k`` and ``v`` (FlashAttention's
    ``flash_attn_varlen_func`` layout); every rule of :func:`fastattn.varlen_attention`
    applies. Tensors are handed over as in :func:`scaled_dot_product_attention`
    (NumPy views, no copy: head-major tensors, ``(H, total, D)`` transposed to
    ``(total, H, D)``, are read in place).

    Parameters
    ----------
    q : torch.Tensor, shape ``(total_q, H, Dk)``
    k : torch.Tensor, shape ``(total_k, Hkv, Dk)``
    v : torch.Tensor, shape ``(total_k, Hkv, Dv)``
    cu_seqlens_q, cu_seqlens_k : torch.Tensor or array_like of int, shape ``(n_seq + 1,)``
    return_lse : bool, default False
        Also return the log-sum-exp ``(H, total_q)`` (no gradient).
    score_mod_grad, score_mod_args_grad, dropout_p, generator
        As for :func:`scaled_dot_product_attention`.
    **options
        Any other keyword of :func:`fastattn.varlen_attention`.

    Returns
    -------
    out : torch.Tensor, shape ``(total_q, H, Dv)``, or ``(out, lse)``

    Examples
    --------
    >>> import torch, fastattn.torch
    >>> generator = torch.Generator().manual_seed(0)
    >>> cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32)
    >>> q, k, v = (torch.randn(12, 4, 8, generator=generator, requires_grad=True)
    ...            for _ in range(3))
    >>> out = fastattn.torch.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, causal=True)
    >>> out.sum().backward()
    >>> expected = torch.nn.functional.scaled_dot_product_attention(
    ...     q[5:].detach().transpose(0, 1), k[5:].detach().transpose(0, 1),
    ...     v[5:].detach().transpose(0, 1), is_causal=True)       # the second sequence
    >>> bool(torch.allclose(out[5:], expected.transpose(0, 1), atol=1e-5)), q.grad.shape
    (True, torch.Size([12, 4, 8]))
    """
    dtype = _check_tensors(q, k, v)
    offsets = (_as_constant_array(cu_seqlens_q, "cu_seqlens_q"),
               _as_constant_array(cu_seqlens_k, "cu_seqlens_k"))
    options = dict(options, dropout_p=dropout_p)
    if dropout_p and options.get("dropout_seed") is None:  # PyTorch's random stream
        options["dropout_seed"] = int(torch.randint(0, 2 ** 63 - 1, (1,), dtype=torch.int64,
                                                    generator=generator).item())
    if options.get("mask_mod_args") is not None:
        options["mask_mod_args"] = tuple(_as_constant_array(arg, f"mask_mod_args[{position}]")
                                         for position, arg
                                         in enumerate(options["mask_mod_args"]))
    arg_tensors = _score_mod_arg_tensors(options.get("score_mod_args"), score_mod_args_grad)
    if torch.is_grad_enabled() and any(
            isinstance(tensor, torch.Tensor) and tensor.requires_grad
            for tensor in (q, k, v) + arg_tensors):
        out, lse = _VarlenAttention.apply(q, k, v, offsets, options, score_mod_grad,
                                          score_mod_args_grad, *arg_tensors)
    else:
        if arg_tensors:
            options["score_mod_args"] = tuple(_bias_array(arg) for arg in arg_tensors)
        out, lse = fastattn.varlen_attention(*(_compute_array(tensor) for tensor in (q, k, v)),
                                             *offsets, return_lse=True, **options)
        out, lse = _as_tensor(out, dtype), _lse_tensor(lse)
    return (out, lse) if return_lse else out


class _VarlenAttention(torch.autograd.Function):
    """The autograd node of :func:`varlen_attention`: fastattn's packed forward and
    backward. Saves ``q``, ``k``, ``v``, ``out`` and ``lse``; the offsets and options
    travel on ``ctx``; the tensors of ``score_mod_args`` are trailing inputs."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, options, score_mod_grad, score_mod_args_grad,
                *arg_tensors):
        options = dict(options)
        if arg_tensors:
            options["score_mod_args"] = tuple(_bias_array(arg) for arg in arg_tensors)
            ctx.arg_tensors = arg_tensors
        out, lse = fastattn.varlen_attention(*(_compute_array(tensor) for tensor in (q, k, v)),
                                             *offsets, return_lse=True, **options)
        out_tensor, lse_tensor = _as_tensor(out, q.dtype), _lse_tensor(lse)
        ctx.save_for_backward(q, k, v, out_tensor, lse_tensor)
        ctx.offsets, ctx.options = offsets, options
        ctx.score_mod_grad, ctx.score_mod_args_grad = score_mod_grad, score_mod_args_grad
        ctx.mark_non_differentiable(lse_tensor)
        return out_tensor, lse_tensor

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        args_needed = ctx.needs_input_grad[7:]
        args_grad = ctx.score_mod_args_grad if any(args_needed) else None
        grads = fastattn.varlen_attention_backward(
            _compute_array(grad_out.to(out.dtype)),
            *(_compute_array(tensor) for tensor in (q, k, v)), _compute_array(out),
            lse.numpy(), *ctx.offsets, score_mod_grad=ctx.score_mod_grad,
            score_mod_args_grad=args_grad, **ctx.options)
        arg_grads = [None] * len(args_needed)
        if args_grad is not None:
            arg_grads = [_as_tensor(grad, tensor.dtype) if wanted else None
                         for grad, tensor, wanted in zip(grads[-1], ctx.arg_tensors,
                                                         args_needed)]
        input_grads = [_as_tensor(grad, source.dtype) if wanted else None
                       for grad, source, wanted in zip(grads[:3], (q, k, v),
                                                       ctx.needs_input_grad[:3])]
        return (*input_grads, None, None, None, None, *arg_grads)
