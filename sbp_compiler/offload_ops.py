"""Ops that move a saved layer input to host memory and back (option ``layer_inputs="offload"``).

Three ops in the pattern of torch's own activation offloading (``torch.ops.ao``: offload /
reload + wait_tensor), so the forward and backward graphs show every transfer and where it is
waited for:

    host = streambp.offload(x)                 # the copy starts (CUDA: side stream, pinned memory)
    host = streambp.transfer_wait(host, x)     # the compute stream waits for it; x may now be freed
    ...
    x2 = streambp.reload(host, device)
    x2 = streambp.transfer_wait(x2, host)

On CUDA they are torch's ``ao`` ops: one transfer stream per device, pinned host buffers
(pooled inside ``torch._functorch._activation_offloading.offload_ops.pinned_memory_pool()``),
completion events. ``transfer_wait`` takes the transfer's source as an argument only to keep it
alive until the copy is done; it does not free the source's storage itself (torch's
``ao.wait_tensor(keepalive=...)`` does, which would break a source aliased elsewhere): the graph
drops its last reference right after the wait.

On CPU the same graph runs with host-to-host copies and no waiting, so CI tests the rewiring
of every offloaded tensor for exactness; the memory saving exists only on an accelerator.
"""
from __future__ import annotations

import torch
from torch.fx import has_side_effect


def _ao():
    # Registers torch.ops.ao.* (importing it on CPU is harmless: nothing runs until called).
    from torch._functorch._activation_offloading import offload_ops

    return offload_ops


@torch.library.custom_op("streambp::offload", mutates_args=())
def offload(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cpu":
        return _ao().offload(tensor)
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu").copy_(tensor)


@offload.register_fake
def _(tensor):
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")


@torch.library.custom_op("streambp::reload", mutates_args=())
def reload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (host) back on ``device``, with its sizes and strides."""
    if device.type != "cpu":
        return _ao().reload(tensor, device)
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device).copy_(tensor)


@reload.register_fake
def _(tensor, device):
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)


# An aliasing schema (the output is the input, as ao::wait_tensor's), which custom_op forbids.
_lib = torch.library.Library("streambp", "FRAGMENT")
_lib.define("transfer_wait(Tensor(a) tensor, Tensor source) -> Tensor(a)")


@torch.library.impl("streambp::transfer_wait", "CompositeExplicitAutograd")
def _transfer_wait(tensor: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cpu" or source.device.type != "cpu":
        # The transfer's completion event, registered by ao.offload / ao.reload under this tensor.
        torch.ops.ao.wait_tensor.default(tensor)
    return tensor


@torch.library.register_fake("streambp::transfer_wait")
def _(tensor, source):
    return tensor


# Never dead code: the wait orders the compute stream after the copy.
has_side_effect(torch.ops.streambp.transfer_wait.default)
