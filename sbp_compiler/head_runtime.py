"""Runtime of the chunked LM head: ``streambp::head`` and its backward ``streambp::head_backward``.

The head region (final norm -> lm_head -> per-token quantities, see ``passes/head.py``) is
token-wise, so it runs chunk by chunk along the sequence: forward writes each chunk's outputs
(per-token values such as log-probabilities or losses) into full-length buffers and keeps only
the op's inputs; backward recomputes each chunk with gradient-tracking leaves and backprops that
chunk's slice of the output gradients. The ``[B, T, vocab]`` logits exist one chunk at a time.
When the loss only sums the head's one output, ``streambp::head_with_gradients`` computes the
gradients in forward instead, and backward scales them (see the ops below).

An output's sequence dim may be merged with others (``[B*T]`` after ``view(-1)``): its layout is
``outer x T x inner`` along that dim, with ``outer``/``inner`` sympy expressions in the graph's
size symbols, bound at run time from the inputs' shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import sympy
import torch

from .chunked_autograd import (
    InputGradients, autograd_in_kernel, backward_into_leaves, grad_placeholders_fake, inputs_needing_grad,
    op_input_grads, save_op_inputs, shared_leaves,
)
from .memory_budget import HEAD_COPIES, budget_bytes, largest_chunk
from .runtime import PLANS, InputRef

# Each chunk multiplies by the whole LM-head weight three times (logits, and in backward the
# input and weight gradients); with fewer rows (batch x tokens) than this the time goes to reading
# that weight and to per-chunk overhead, not to arithmetic. Measured (hidden 256, vocabulary 32768,
# T=2048, batch 1): 16-token chunks made the step 3.7x checkpointing's, 64 1.4x, 128 1.3x, 256 1.2x
# for 30% more memory. Wider models pay less for more rows (their weights are larger beside the
# logits) and gain more (hidden 1024, vocabulary 32768: the three matmuls of 2048 tokens took
# 3.6 s in 128-row chunks, 2.7 s in 512-row ones): the floor is half the hidden size, within
# [AUTO_HEAD_MIN_ROWS, AUTO_HEAD_WIDE_MIN_ROWS].
AUTO_HEAD_MIN_ROWS = 128
AUTO_HEAD_WIDE_MIN_ROWS = 512


@dataclasses.dataclass
class OutputLayout:
    dim: int  # the dim that runs along the sequence
    outer: sympy.Expr  # size of the dims merged into it before the sequence
    inner: sympy.Expr  # ... and after it


@dataclasses.dataclass
class HeadPlan:
    name: str
    graph: Callable  # (*inputs sliced to a chunk, full_len, chunk_len) -> tuple of output chunks
    inputs: list[InputRef]  # "tensor" or "int"
    input_seq_dims: list[Optional[int]]  # per input: the sequence dim, sliced to the chunk
    outputs: list[OutputLayout]
    output_shapes: list[tuple]  # sympy expressions of the full-length outputs' sizes
    output_dtypes: list[torch.dtype]
    symbol_sources: dict  # size expression (a symbol, or Max(..) of them) -> (tensor index, dim) of that size
    seq_input: int  # index into tensors of an input whose ``input_seq_dims`` gives the length
    chunk_size: Union[int, str]
    token_bytes_in: int  # bytes per token of the widest sequence input (the hidden state)
    token_bytes_widest: int  # bytes per token of the widest value inside the region
    rows_per_token: int = 1  # rows of that value (the logits) per token: the batch size
    hidden_width: int = 0  # last dim of the widest sequence input (the hidden size)
    # Arguments (positions in ``inputs``) whose gradients forward computes, when the one output
    # reaches the loss only through full sums (see ``head_with_gradients``); empty otherwise.
    gradients_in_forward: list[int] = dataclasses.field(default_factory=list)
    memory_budget: object = None  # option memory_budget, set where head_chunk_size is "auto"

    def arguments(self, tensors, ints):
        return [tensors[r.index] if r.kind == "tensor" else ints[r.index] for r in self.inputs]

    def length(self, tensors) -> int:
        return tensors[self.seq_input].shape[self.input_seq_dims[self._seq_argument()]]

    def _seq_argument(self) -> int:
        return next(i for i, r in enumerate(self.inputs) if r.kind == "tensor" and r.index == self.seq_input)

    def chunk_length(self, full: int, device=None) -> int:
        """Tokens per chunk; "auto": a chunk's widest value (the logits) holds about as many bytes
        as one full-length hidden state (``B x T x hidden``), in a power of two, and at least
        ``min_rows()`` rows (batch x tokens); with a memory budget, the largest chunk
        whose logits and their float32 softmax and gradient fit."""
        if self.chunk_size != "auto":
            return max(1, min(full, self.chunk_size))
        budget = budget_bytes(self.memory_budget, device or torch.device("cpu")) if self.memory_budget is not None else None
        if budget is not None:
            return largest_chunk(budget, HEAD_COPIES * self.token_bytes_widest, full)
        floor = -(-self.min_rows() // max(1, self.rows_per_token))
        tokens = max(floor, full * self.token_bytes_in // max(1, self.token_bytes_widest))
        return max(1, min(full, 1 << (tokens.bit_length() - 1)))

    def min_rows(self) -> int:
        """Rows (batch x tokens) of an "auto" chunk at least: half the hidden size, within
        [AUTO_HEAD_MIN_ROWS, AUTO_HEAD_WIDE_MIN_ROWS]."""
        return min(AUTO_HEAD_WIDE_MIN_ROWS, max(AUTO_HEAD_MIN_ROWS, self.hidden_width // 2))

    def chunks(self, full: int, device=None):
        size = self.chunk_length(full, device)
        for start in range(0, full, size):
            yield start, min(full, start + size)

    def check_lengths(self, arguments, full: int) -> None:
        """Every sequence input must have the sequence's length (some are only known to by use)."""
        for i, (a, dim) in enumerate(zip(arguments, self.input_seq_dims)):
            if dim is not None and a.shape[dim] != full:
                raise RuntimeError(
                    f"streambp: input {i} of the LM head has length {a.shape[dim]} along dim {dim}, "
                    f"but the sequence has {full} tokens"
                )

    def sliced(self, arguments, start, end):
        # Contiguous, as the region may view them (``labels.view(-1)``): a chunk-sized copy.
        return [
            a if dim is None else a.narrow(dim, start, end - start).contiguous()
            for a, dim in zip(arguments, self.input_seq_dims)
        ]

    def sizes(self, tensors) -> dict:
        """Values of the size symbols in the outputs' shapes, read from the inputs' shapes
        (symbolic sizes in the fake implementation)."""
        return {symbol: tensors[index].shape[dim] for symbol, (index, dim) in self.symbol_sources.items()}

    def output_view(self, tensor: torch.Tensor, layout: OutputLayout, binding: dict, length: int):
        """``tensor`` with its sequence dim unmerged into (outer, length, inner)."""
        outer, inner = evaluate(layout.outer, binding), evaluate(layout.inner, binding)
        return tensor.unflatten(layout.dim, (outer, length, inner)), layout.dim + 1


def evaluate(expr: sympy.Expr, binding: dict):
    """A size expression (sums, products, max and min of size symbols) at the bound sizes, which
    may be SymInts; raises ``ValueError`` for anything else."""
    if expr in binding:
        return binding[expr]
    if expr.is_Integer:
        return int(expr)
    if expr.is_Add:
        return sum((evaluate(a, binding) for a in expr.args), 0)
    if expr.is_Mul:
        result = 1
        for a in expr.args:
            result = result * evaluate(a, binding)
        return result
    if expr.is_Pow and expr.exp.is_Integer and expr.exp > 0:
        return evaluate(expr.base, binding) ** int(expr.exp)
    if type(expr).__name__ in ("Max", "Min"):  # sympy's or torch's own (torch.utils._sympy)
        pick = torch.sym_max if type(expr).__name__ == "Max" else torch.sym_min
        values = [evaluate(a, binding) for a in expr.args]
        result = values[0]
        for value in values[1:]:
            result = pick(result, value)
        return result
    raise ValueError(f"size expression {expr} is not a polynomial in the sizes")


def head_forward(
    plan: HeadPlan, tensors: Sequence[torch.Tensor], ints: Sequence[int], stated_length: Optional[int] = None
) -> list[torch.Tensor]:
    """``stated_length``: the length the graph's shape arguments are stated at, if not the
    inputs' (a probe runs a static graph on a shortened example)."""
    arguments = plan.arguments(tensors, ints)
    full = plan.length(tensors)
    plan.check_lengths(arguments, full)
    stated = stated_length or full
    binding = plan.sizes(tensors)
    outputs: Optional[list[torch.Tensor]] = None
    with torch.no_grad():
        for start, end in plan.chunks(full, tensors[plan.seq_input].device):
            chunk_outputs = plan.graph(*plan.sliced(arguments, start, end), stated, end - start)
            if outputs is None:
                outputs = [_full_buffer(c, l, end - start, full) for c, l in zip(chunk_outputs, plan.outputs)]
            for buffer, chunk, layout in zip(outputs, chunk_outputs, plan.outputs):
                target, dim = plan.output_view(buffer, layout, binding, full)
                source, _ = plan.output_view(chunk, layout, binding, end - start)
                target.narrow(dim, start, end - start).copy_(source)
    return outputs


def head_forward_with_gradients(
    plan: HeadPlan, tensors: Sequence[torch.Tensor], ints: Sequence[int], stated_length: Optional[int] = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The one output, and the gradients of ``plan.gradients_in_forward`` for an output gradient
    of ones: what backward would compute for a summed loss, computed while the logits exist.
    Each chunk's head then runs once per step instead of twice (forward, and again in backward).
    ``stated_length`` as for ``head_forward``."""
    arguments = plan.arguments(tensors, ints)
    full = plan.length(tensors)
    plan.check_lengths(arguments, full)
    binding = plan.sizes(tensors)
    (layout,) = plan.outputs
    wanted = plan.gradients_in_forward
    grads = InputGradients([arguments[i] for i in wanted], [True] * len(wanted))
    output = None
    with autograd_in_kernel():
        whole_leaves = shared_leaves(grads, {
            i: (position, arguments[i]) for position, i in enumerate(wanted) if plan.input_seq_dims[i] is None
        })
        for start, end in plan.chunks(full, tensors[plan.seq_input].device):
            args = plan.sliced(arguments, start, end)
            leaves = {i: whole_leaves[i] if i in whole_leaves else args[i].detach().requires_grad_() for i in wanted}
            for i, leaf in leaves.items():
                args[i] = leaf
            (chunk,) = plan.graph(*args, stated_length or full, end - start)
            if output is None:
                output = _full_buffer(chunk, layout, end - start, full)
            target, dim = plan.output_view(output, layout, binding, full)
            source, _ = plan.output_view(chunk.detach(), layout, binding, end - start)
            target.narrow(dim, start, end - start).copy_(source)
            if chunk.requires_grad:
                leaf_grads = backward_into_leaves(chunk, torch.ones_like(chunk), list(leaves.values()))
                grads.add_chunk(range(len(leaves)), leaf_grads, [plan.input_seq_dims[i] for i in leaves], start, end)
                del leaf_grads
            del chunk, args, leaves
    return output, grads.result()


def uniform_value(grad: torch.Tensor) -> Optional[torch.Tensor]:
    """The value of every element of ``grad`` if they are all equal (and finite), else None."""
    first = grad.reshape(-1)[:1]
    if first.numel() == 0 or not bool(torch.isfinite(first).all()) or not bool((grad == first).all()):
        return None
    return first.reshape(())


def _full_buffer(chunk: torch.Tensor, layout: OutputLayout, chunk_length: int, full: int) -> torch.Tensor:
    shape = list(chunk.shape)
    shape[layout.dim] = shape[layout.dim] // chunk_length * full
    return chunk.new_empty(shape)


def head_backward(
    plan: HeadPlan,
    tensors: Sequence[torch.Tensor],
    ints: Sequence[int],
    grad_outputs: Sequence[torch.Tensor],
    needs_grad: Sequence[bool],
) -> list[torch.Tensor]:
    arguments = plan.arguments(tensors, ints)
    full = plan.length(tensors)
    binding = plan.sizes(tensors)
    grads = InputGradients(tensors, needs_grad)
    wanted = [i for i, r in enumerate(plan.inputs) if r.kind == "tensor" and needs_grad[r.index]]
    with autograd_in_kernel():
        whole_leaves = shared_leaves(grads, {
            i: (plan.inputs[i].index, arguments[i]) for i in wanted if plan.input_seq_dims[i] is None
        })
        for start, end in plan.chunks(full, tensors[plan.seq_input].device):
            args = plan.sliced(arguments, start, end)
            leaves = {i: whole_leaves[i] if i in whole_leaves else args[i].detach().requires_grad_() for i in wanted}
            for i, leaf in leaves.items():
                args[i] = leaf
            chunk_outputs = plan.graph(*args, full, end - start)
            differentiable, seeds = [], []
            for output, grad, layout in zip(chunk_outputs, grad_outputs, plan.outputs):
                if not output.requires_grad:
                    continue
                grad_view, dim = plan.output_view(grad, layout, binding, full)
                differentiable.append(output)
                seeds.append(grad_view.narrow(dim, start, end - start).reshape(output.shape))
            if not differentiable:
                continue
            leaf_grads = backward_into_leaves(differentiable, seeds, list(leaves.values()))
            grads.add_chunk([plan.inputs[i].index for i in leaves], leaf_grads,
                            [plan.input_seq_dims[i] for i in leaves], start, end)
            del leaf_grads, chunk_outputs, args, leaves, differentiable, seeds
    return grads.result()


# -- the custom ops ---------------------------------------------------------------------------
# ``streambp::head``: outputs only; backward recomputes every chunk.
# ``streambp::head_with_gradients``: the one output and the gradients for a summed loss; backward
# scales them when its output gradient is one value repeated (the loss is a sum or mean of the
# output), and otherwise recomputes like ``streambp::head`` (still exact, just not faster).

@torch.library.custom_op("streambp::head", mutates_args=())
def head_op(plan_id: int, tensors: list[torch.Tensor], ints: list[int]) -> list[torch.Tensor]:
    return head_forward(PLANS[plan_id], tensors, ints)


@head_op.register_fake
def _head_fake(plan_id, tensors, ints):
    plan = PLANS[plan_id]
    binding = plan.sizes(tensors)
    device = tensors[plan.seq_input].device
    return [
        torch.empty([evaluate(size, binding) for size in shape], dtype=dtype, device=device)
        for shape, dtype in zip(plan.output_shapes, plan.output_dtypes)
    ]


@torch.library.custom_op("streambp::head_backward", mutates_args=())
def head_backward_op(
    plan_id: int,
    tensors: list[torch.Tensor],
    ints: list[int],
    grad_outputs: list[torch.Tensor],
    needs_grad: list[bool],
) -> list[torch.Tensor]:
    return head_backward(PLANS[plan_id], tensors, ints, grad_outputs, needs_grad)


@head_backward_op.register_fake
def _head_backward_fake(plan_id, tensors, ints, grad_outputs, needs_grad):
    return grad_placeholders_fake(tensors, needs_grad)


def _setup_context(ctx, inputs, output):
    save_op_inputs(ctx, inputs, output)
    ctx.output_specs = [(o.shape, o.dtype, o.device) for o in output]


def _backward(ctx, grad_outputs):
    # An output nobody differentiated (returned logits the loss does not use) gets zeros.
    grad_outputs = [
        g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
        for g, (shape, dtype, device) in zip(grad_outputs, ctx.output_specs)
    ]
    grads = torch.ops.streambp.head_backward(ctx.plan_id, list(ctx.saved_tensors), ctx.ints, grad_outputs, ctx.needs_grad)
    return op_input_grads(ctx, grads)


head_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("streambp::head_with_gradients", mutates_args=())
def head_with_gradients_op(plan_id: int, tensors: list[torch.Tensor], ints: list[int]) -> list[torch.Tensor]:
    output, grads = head_forward_with_gradients(PLANS[plan_id], tensors, ints)
    return [output, *grads]


@head_with_gradients_op.register_fake
def _head_with_gradients_fake(plan_id, tensors, ints):
    plan = PLANS[plan_id]
    arguments = plan.arguments(tensors, ints)
    return _head_fake(plan_id, tensors, ints) + [torch.empty_like(arguments[i]) for i in plan.gradients_in_forward]


@torch.library.custom_op("streambp::head_backward_from_forward", mutates_args=())
def head_backward_from_forward_op(
    plan_id: int,
    tensors: list[torch.Tensor],
    ints: list[int],
    grad_output: torch.Tensor,
    forward_grads: list[torch.Tensor],
    needs_grad: list[bool],
) -> list[torch.Tensor]:
    plan = PLANS[plan_id]
    scale = uniform_value(grad_output)
    covered = {plan.inputs[i].index: g for i, g in zip(plan.gradients_in_forward, forward_grads)}
    if scale is None or any(need and index not in covered for index, need in enumerate(needs_grad)):
        return head_backward(plan, tensors, ints, [grad_output], needs_grad)
    return [
        covered[index] * scale if need else t.new_zeros(())
        for index, (t, need) in enumerate(zip(tensors, needs_grad))
    ]


@head_backward_from_forward_op.register_fake
def _head_backward_from_forward_fake(plan_id, tensors, ints, grad_output, forward_grads, needs_grad):
    return grad_placeholders_fake(tensors, needs_grad)


def _setup_context_with_gradients(ctx, inputs, output):
    plan_id, tensors, ints = inputs
    ctx.plan_id, ctx.ints = plan_id, ints
    ctx.needs_grad = inputs_needing_grad(tensors)
    ctx.input_count = len(tensors)
    ctx.save_for_backward(*tensors, *output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _backward_with_gradients(ctx, grad_outputs):
    grad_output = grad_outputs[0]
    if grad_output is None:  # the output does not reach the loss
        return op_input_grads(ctx, [None] * len(ctx.needs_grad))
    saved = list(ctx.saved_tensors)
    tensors, forward_grads = saved[:ctx.input_count], saved[ctx.input_count:]
    grads = torch.ops.streambp.head_backward_from_forward(
        ctx.plan_id, tensors, ctx.ints, grad_output, forward_grads, ctx.needs_grad
    )
    return op_input_grads(ctx, grads)


head_with_gradients_op.register_autograd(_backward_with_gradients, setup_context=_setup_context_with_gradients)
