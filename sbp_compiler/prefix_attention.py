"""Attention of a query chunk over its key prefix: the mask only where it hides something.

A chunk's queries are the last ``q_len`` of ``kv_len`` positions. The query-chunk graph calls
``prefix_sdpa`` (sdpa's signature) where the layer called sdpa. When the chunk's mask is exactly
lower-right causal (query ``j`` sees keys ``0 .. kv_len - q_len + j``: Hugging Face's mask of an
unpadded batch, rebuilt per chunk, or ``is_causal`` with no mask at all), the CPU path splits the
keys into the prefix before the chunk, which every query sees (flash attention, no mask), and the
square diagonal block (flash attention with ``is_causal``, which skips the blocks above the
diagonal), and merges the two exactly by their log-sum-exps. Its backward runs each block's flash
backward with the merged output and log-sum-exp: that is the gradient of the whole softmax (as
split-KV and ring attention do). Any other mask (padding, a sliding window) goes to the same
flash kernel with the mask, as sdpa itself would run it on the CPU.

Elsewhere (CUDA, dropout, autocast, unequal query/value head sizes) it is plain sdpa with the chunk's mask;
on CUDA, with no mask, torch's lower-right ``CausalBias``, which picks a kernel that needs none
(not measured: no GPU was available).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Keys per block of the prefix when its gradients are summed in place (``gradients_into``): the
# most of dK/dV that exists at once beside the sums.
PREFIX_BLOCK_KEYS = 1024
_sinks = threading.local()


@contextlib.contextmanager
def gradients_into(pairs):
    """While a chunk's graph runs (eagerly): ``pairs`` of (prefix leaf, its gradient sum, of the
    leaf's shape and strides). An attention whose key and value are views of such leaves, over
    an unmasked prefix and causal diagonal, adds its dK/dV into the sums block by block in
    backward and returns none for them: no prefix-sized gradient is allocated per chunk."""
    previous = getattr(_sinks, "pairs", None)
    _sinks.pairs = pairs
    try:
        yield
    finally:
        _sinks.pairs = previous


def _without_overlap(tensor: torch.Tensor) -> bool:
    """No two elements of ``tensor`` share memory (a sufficient test: each dim's stride spans
    the dims of smaller stride; torch's own check gives up on narrowed views)."""
    span = 1
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape) if sz > 1):
        if stride < span:
            return False
        span = stride * size
    return True


def _sum_view(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """The view of a ``gradients_into`` sum with ``tensor``'s place in its leaf, if ``tensor``
    views one without overlap; None otherwise (or while compiling: fake tensors)."""
    pairs = getattr(_sinks, "pairs", None)
    if not pairs or torch.compiler.is_compiling() or not tensor.requires_grad:
        return None
    for leaf, total in pairs:
        if (tensor.untyped_storage().data_ptr() == leaf.untyped_storage().data_ptr()
                and leaf.shape == total.shape and leaf.stride() == total.stride()
                and _without_overlap(tensor)):
            offset = tensor.storage_offset() - leaf.storage_offset()
            return total.as_strided(tensor.size(), tensor.stride(), total.storage_offset() + offset)
    return None


def is_lower_right_causal(mask: Optional[torch.Tensor], q_len: int, kv_len: int) -> bool:
    """``mask`` (None: none) lets query ``j`` see exactly keys ``0 .. kv_len - q_len + j``."""
    if mask is None:
        return True
    if mask.dtype != torch.bool or mask.shape[-2:] != (q_len, kv_len):
        return False
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    return bool(torch.equal(mask, causal.expand(mask.shape)))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # What sdpa makes of a boolean mask before its CPU flash kernel.
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


@torch.library.custom_op("streambp::prefix_attention", mutates_args=(), device_types="cpu")
def prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(output ``[B, H, q, D]``, log-sum-exp ``[B, H, q]``) of the chunk's attention over its
    prefix; ``mask`` boolean or None (lower-right causal). Key/value may have fewer heads
    (grouped queries): the kernel reads them in place."""
    start = key.shape[-2] - query.shape[-2]
    if not is_lower_right_causal(mask, query.shape[-2], key.shape[-2]):
        return _contiguous(*_flash(query, key, value, 0.0, False, attn_mask=_additive(mask, query.dtype), scale=scale))
    if start == 0:
        return _contiguous(*_flash(query, key, value, 0.0, True, scale=scale))
    prefix_out, prefix_lse = _flash(query, key[:, :, :start], value[:, :, :start], 0.0, False, scale=scale)
    diagonal_out, diagonal_lse = _flash(query, key[:, :, start:], value[:, :, start:], 0.0, True, scale=scale)
    lse = torch.logaddexp(prefix_lse, diagonal_lse)
    out = (prefix_out * torch.exp(prefix_lse - lse).unsqueeze(-1)
           + diagonal_out * torch.exp(diagonal_lse - lse).unsqueeze(-1))
    return _contiguous(out.to(query.dtype), lse)


def _contiguous(out, lse):
    # The kernel's output follows the query's layout (often transposed); the op's (and its fake's)
    # is contiguous, as a compiled caller expects.
    return out.contiguous(), lse.contiguous()


@prefix_attention.register_fake
def _(query, key, value, mask, scale):
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return query.new_empty(query.shape), query.new_empty(query.shape[:-1], dtype=lse_dtype)


def _setup_context(ctx, inputs, output):
    query, key, value, mask, ctx.scale = inputs
    ctx.save_for_backward(query, key, value, mask, *output)
    ctx.key_sum, ctx.value_sum = _sum_view(key), _sum_view(value)
    # The log-sum-exp is returned for the caller's information; no gradient flows through it.
    ctx.mark_non_differentiable(output[1])


@torch.library.custom_op("streambp::prefix_attention_backward", mutates_args=(), device_types="cpu")
def prefix_attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                              scale: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of ``prefix_attention``. An op of its own: which blocks it runs depends on
    the mask's values, which a traced backward (fake tensors) cannot read."""
    grad_out = grad_out.contiguous()
    start = key.shape[-2] - query.shape[-2]
    if not is_lower_right_causal(mask, query.shape[-2], key.shape[-2]):
        grads = _flash_backward(grad_out, query, key, value, out, lse, 0.0, False,
                                attn_mask=_additive(mask, query.dtype), scale=scale)
    elif start == 0:
        grads = _flash_backward(grad_out, query, key, value, out, lse, 0.0, True, scale=scale)
    else:
        # Each block's gradients with the merged output and log-sum-exp: the softmax over all keys.
        dq_prefix, dk_prefix, dv_prefix = _flash_backward(
            grad_out, query, key[:, :, :start], value[:, :, :start], out, lse, 0.0, False, scale=scale)
        dq_diagonal, dk_diagonal, dv_diagonal = _flash_backward(
            grad_out, query, key[:, :, start:], value[:, :, start:], out, lse, 0.0, True, scale=scale)
        grads = (dq_prefix + dq_diagonal, torch.cat([dk_prefix, dk_diagonal], -2),
                 torch.cat([dv_prefix, dv_diagonal], -2))
    return tuple(grad.contiguous() for grad in grads)


@prefix_attention_backward.register_fake
def _(grad_out, query, key, value, mask, out, lse, scale):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _backward_into(grad_out, query, key, value, out, lse, scale, key_sum, value_sum) -> torch.Tensor:
    """dQ of a lower-right causal ``prefix_attention``, its dK/dV added into ``key_sum`` /
    ``value_sum``: the prefix in blocks of ``PREFIX_BLOCK_KEYS`` keys, then the diagonal, each
    block's flash backward with the merged output and log-sum-exp (the gradient of the softmax
    over all keys, as in ``prefix_attention_backward``)."""
    grad_out = grad_out.contiguous()
    start = key.shape[-2] - query.shape[-2]
    blocks = [(b, min(start, b + PREFIX_BLOCK_KEYS), False) for b in range(0, start, PREFIX_BLOCK_KEYS)]
    blocks.append((start, key.shape[-2], True))
    grad_query = None
    for begin, end, causal in blocks:
        dq, dk, dv = _flash_backward(grad_out, query, key[:, :, begin:end], value[:, :, begin:end], out, lse, 0.0,
                                     causal, scale=scale)
        key_sum[:, :, begin:end].add_(dk)
        value_sum[:, :, begin:end].add_(dv)
        grad_query = dq if grad_query is None else grad_query.add_(dq)
        del dk, dv
    return grad_query.contiguous()


def _backward(ctx, grad_out, grad_lse):
    query, key, value, mask, out, lse = ctx.saved_tensors
    if (ctx.key_sum is not None and ctx.value_sum is not None
            and is_lower_right_causal(mask, query.shape[-2], key.shape[-2])):
        grad_query = _backward_into(grad_out, query, key, value, out, lse, ctx.scale, ctx.key_sum, ctx.value_sum)
        return grad_query, None, None, None, None
    return *prefix_attention_backward(grad_out, query, key, value, mask, out, lse, ctx.scale), None, None


prefix_attention.register_autograd(_backward, setup_context=_setup_context)


def takes_flash_path(query, key, value, attn_mask, dropout_p, enable_gqa) -> bool:
    """Whether ``prefix_sdpa`` runs ``streambp::prefix_attention`` for these operands (known
    from shapes, dtypes and devices alone, so a traced graph takes one branch)."""
    return (
        query.device.type == "cpu" and query.dtype in _FLASH_DTYPES
        and key.dtype == query.dtype and value.dtype == query.dtype
        and query.dim() == key.dim() == value.dim() == 4
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and key.shape[1] == value.shape[1]
        and (key.shape[1] == query.shape[1] or enable_gqa and query.shape[1] % key.shape[1] == 0)
        and query.shape[-2] <= key.shape[-2]
        and (attn_mask is None or attn_mask.dtype == torch.bool and attn_mask.dim() == 4)
        and isinstance(dropout_p, (int, float)) and dropout_p == 0
        # Under autocast sdpa casts its operands first: left to sdpa, so it runs as in eager.
        and not torch.is_autocast_enabled(query.device.type)
    )


def prefix_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """sdpa of a query chunk over its key prefix. ``attn_mask``: the chunk's mask, or None for
    lower-right causal (the query-chunk graph drops an ``is_causal`` sdpa's flag, which is
    upper-left aligned)."""
    if takes_flash_path(query, key, value, attn_mask, dropout_p, enable_gqa):
        return prefix_attention(query, key, value, attn_mask, scale)[0]
    if attn_mask is None:
        q_len, kv_len = query.shape[-2], key.shape[-2]
        if query.device.type == "cuda":
            attn_mask = causal_lower_right(q_len, kv_len)
        else:
            attn_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=enable_gqa)
