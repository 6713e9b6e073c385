"""Autograd inside a custom-op kernel, and gradients summed over chunks: what the layer and head
ops' backward loops share."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch


@contextlib.contextmanager
def autograd_in_kernel():
    """Autograd inside a custom-op kernel, where the dispatcher has switched it off."""
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False), \
            torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False), \
            torch.enable_grad():
        yield


LOW_PRECISION = (torch.bfloat16, torch.float16)


def accumulator_like(tensor: torch.Tensor) -> torch.Tensor:
    """Zeros to sum chunk gradients of ``tensor`` into: float32 for bfloat16/float16 tensors,
    so the sum over many chunks does not round at every chunk (eager rounds once)."""
    dtype = torch.float32 if tensor.dtype in LOW_PRECISION else None
    return torch.zeros_like(tensor, dtype=dtype)


class InputGradients:
    """Full-size gradients of an op's tensor inputs, summed chunk by chunk.

    A whole input (a weight) receives every chunk's gradient; a sequence input receives a
    chunk's gradient in its ``[start, end)`` slice along its sequence dim. Sums are kept in
    float32 for low-precision inputs and cast back once, in ``result``.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], needs_grad: Sequence[bool]):
        self.tensors = tensors
        self.needs_grad = needs_grad
        self.grads: list[Optional[torch.Tensor]] = [None] * len(tensors)
        # Inputs whose gradient is summed into a buffer that still holds other data (the
        # incoming gradient, read chunk by chunk): index -> end of the slices written so far,
        # and index -> the buffer's sequence dim.
        self.written_up_to: dict[int, int] = {}
        self.buffer_seq_dims: dict[int, int] = {}

    def sum_into(self, index: int, buffer: torch.Tensor, seq_dim: int) -> None:
        """Sum the gradient of sequence input ``index`` (chunked along ``seq_dim``) into ``buffer``
        instead of fresh zeros. ``buffer`` holds other data: each slice's first chunk gradient is
        copied over it, and ``end_chunk`` zeroes a slice no gradient reached, so chunks must come
        in order."""
        self.grads[index] = buffer
        self.written_up_to[index] = 0
        self.buffer_seq_dims[index] = seq_dim

    def add(self, index: int, grad: Optional[torch.Tensor], seq_dim: Optional[int] = None, start: int = 0, end: int = 0):
        if grad is None:
            return
        if self.grads[index] is None:
            self.grads[index] = accumulator_like(self.tensors[index])
        target = self.grads[index]
        if seq_dim is not None:
            target = target.narrow(seq_dim, start, end - start)
        written = self.written_up_to.get(index)
        if written is not None and start >= written:
            target.copy_(grad)  # the first gradient of this slice: what was there is dead
            self.written_up_to[index] = end
        else:
            target.add_(grad)

    def end_chunk(self, end: int) -> None:
        """Every chunk up to ``end`` is done: the slices of a ``sum_into`` buffer that no
        gradient reached are zeroed."""
        for index, written in self.written_up_to.items():
            if written < end:
                self.grads[index].narrow(self.buffer_seq_dims[index], written, end - written).zero_()
                self.written_up_to[index] = end

    def add_chunk(self, indices, chunk_grads, seq_dims, start: int, end: int) -> None:
        """One chunk's gradients of the inputs ``indices`` (``seq_dims`` as for ``add``). A
        method, so no loop variable outlives the call: a weight's chunk gradient is as large as
        the weight, and must be freed before the next chunk computes its own."""
        for index, grad, seq_dim in zip(indices, chunk_grads, seq_dims):
            self.add(index, grad, seq_dim, start, end)

    def result(self) -> list[torch.Tensor]:
        """An input that needs a gradient but did not reach an output gets zeros of its shape, as
        the fake implementations promise; the others get a placeholder scalar, as does a
        ``sum_into`` input (its gradient is in the buffer)."""
        return [
            t.new_zeros(()) if i in self.written_up_to
            else g.to(t.dtype) if g is not None else (torch.zeros_like(t) if need else t.new_zeros(()))
            for i, (g, t, need) in enumerate(zip(self.grads, self.tensors, self.needs_grad))
        ]


def shared_leaves(grads: InputGradients, whole_inputs: dict) -> dict:
    """Gradient-tracking leaves for an op's whole inputs (weights), shared by every chunk:
    ``whole_inputs`` maps a key to ``(index in grads, tensor)``. Autograd puts a chunk's gradient
    of a leaf in its ``.grad`` the moment it is computed; a hook adds it into ``grads`` and drops
    it, so beside the running sums there is at most one weight's chunk gradient at a time, not
    one for every weight of the layer."""
    leaves = {}
    for key, (index, tensor) in whole_inputs.items():
        leaf = tensor.detach().requires_grad_()

        def take(leaf, index=index):
            grads.add(index, leaf.grad)
            leaf.grad = None

        leaf.register_post_accumulate_grad_hook(take)
        leaves[key] = leaf
    return leaves


def backward_into_leaves(outputs, seeds, leaves: Sequence[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Backpropagate ``seeds`` from ``outputs`` into ``leaves``: each leaf's gradient, or None
    where none reached it or a ``shared_leaves`` hook already took it; no ``.grad`` is left set."""
    torch.autograd.backward(outputs, seeds, inputs=list(leaves))
    leaf_grads = [leaf.grad for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    return leaf_grads


def inputs_needing_grad(tensors: Sequence[torch.Tensor]) -> list[bool]:
    return [t.requires_grad and (t.is_floating_point() or t.is_complex()) for t in tensors]


def grad_placeholders_fake(tensors, needs) -> list[torch.Tensor]:
    return [torch.empty_like(t) if need else t.new_zeros(()) for t, need in zip(tensors, needs)]


def save_op_inputs(ctx, inputs, output) -> None:
    """``setup_context`` of a streambp op called as ``(plan_id, tensors, ints)``: only its inputs
    are kept for backward, with which of them need gradients."""
    plan_id, tensors, ints = inputs
    ctx.plan_id, ctx.ints = plan_id, ints
    ctx.needs_grad = inputs_needing_grad(tensors)
    ctx.save_for_backward(*tensors)


def op_input_grads(ctx, grads):
    """What a streambp op's autograd backward returns for ``(plan_id, tensors, ints)``."""
    # torch.library treats a non-empty int list as one leaf (grad None) but an empty one as a list.
    ints_grad = None if ctx.ints else []
    return None, [g if need else None for g, need in zip(grads, ctx.needs_grad)], ints_grad
