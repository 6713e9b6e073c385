"""Runtime: each decoder layer as an opaque custom op with a chunked forward and backward.

``streambp::layer`` runs a layer chunk by chunk along the sequence and, through
``register_autograd``, saves only its inputs. Its backward is another opaque op,
``streambp::layer_backward``, that runs the StreamBP loop of DESIGN §1:

1. K/V for the whole sequence, once (no graph kept);
2. per query chunk ``[s, e)``: the query-chunk graph on the chunk's inputs and the key/value
   prefix ``[:e]`` as leaves, backpropagating the chunk's output gradient; this gives the chunk's
   input gradient, adds into dK/dV and into the weight gradients;
3. dK/dV backpropagated through the K/V graph once (chunk by chunk, as it is token-wise).

Both ops are opaque to AOTAutograd, so the chunk loop is neither unrolled nor specialised to a
length: one compiled graph serves every sequence length. Layers are identified by an integer
handle into ``PLANS``, since a custom op cannot take Python objects.
"""
from __future__ import annotations

import dataclasses
import itertools
import weakref
import logging
from typing import Callable, Optional, Sequence

import torch

from .chunked_autograd import (
    LOW_PRECISION, InputGradients, accumulator_like, autograd_in_kernel, backward_into_leaves, grad_placeholders_fake, op_input_grads,
    save_op_inputs, shared_leaves,
)
from .memory_budget import LAYER_COPIES, MASK_PAIR_BYTES, budget_bytes, largest_chunk
from .prefix_attention import gradients_into

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InputRef:
    """Where a layer (or mask builder) input comes from in the op's ``tensors``/``ints`` lists."""

    kind: str  # "tensor", "int", or "mask" (rebuilt per chunk, not an argument of the op)
    index: int


@dataclasses.dataclass
class MaskSpec:
    """A layer input rebuilt per chunk: an attention mask (.., T, T), or a score bias along the
    keys (ALiBi's (.., 1, T))."""

    layer_input: int  # the layer input it replaces
    builder: Callable  # (*inputs, full, q_start, q_len, kv_len) -> the chunk's mask
    inputs: list[InputRef]  # where the builder's inputs are in the op's arguments
    visible: str = "above_min"  # which values let a key through: "nonzero", "zero", "above_min" (additive)


@dataclasses.dataclass
class LayerPlan:
    name: str
    kv_graph: Callable  # (*layer_inputs sliced to a chunk, full, chunk_len) -> (key, value, ...) chunks
    query_graph: Callable  # (*layer_inputs, key_prefix, value_prefix, ..., [mask,] full, q_len, kv_len)
    layer_inputs: list[InputRef]
    masks: list[MaskSpec]  # empty: sdpa's is_causal (``causal_mask_input``: a causal mask is passed instead)
    query_slice_dims: list[Optional[int]]  # per layer input
    kv_seq_dim: int
    output_seq_dim: int
    output_like: int  # index into tensors of an input with the output's shape and dtype
    dropout_sources: list[int]  # layer inputs holding a dropout probability
    chunk_size: int
    # Every chunk attends to every key, not its prefix (keys selected by top-k, see
    # ``passes/key_selection``, or a mask computed in the layer): eager's rows whatever the
    # masks, so none is checked for causality.
    full_keys: bool = False
    # sdpa's is_causal over all keys (``full_keys``): the query graph takes a causal chunk mask.
    # Over the prefix it needs none (``prefix_attention.prefix_sdpa``).
    causal_mask_input: bool = False
    # Option memory_budget (set where chunk_size is "auto"): the chunk size is then the largest
    # whose estimated working set fits, from the widest token-wise value (bytes per token) and
    # the widest (query x key) one (bytes per pair; at least the batch's chunk mask).
    memory_budget: object = None
    token_bytes: int = 0
    pair_bytes: int = 0

    def unpack(self, tensors, ints):
        """(layer inputs, each mask's builder inputs) from the op's arguments."""
        def pick(ref: InputRef):
            if ref.kind == "mask":
                return None
            return tensors[ref.index] if ref.kind == "tensor" else ints[ref.index]

        return [pick(r) for r in self.layer_inputs], [[pick(r) for r in spec.inputs] for spec in self.masks]

    def chunk_length(self, full: int, device) -> int:
        """Query tokens per chunk at this length: ``chunk_size``, or from the memory budget."""
        budget = budget_bytes(self.memory_budget, device) if self.memory_budget is not None else None
        if budget is None:
            return self.chunk_size
        per_token = LAYER_COPIES * self.token_bytes + full * MASK_PAIR_BYTES * self.pair_bytes
        return largest_chunk(budget, per_token, full)

    def chunks(self, length: int, size: int):
        for start in range(0, length, size):
            yield start, min(length, start + size)

    def kv_chunks(self, length: int, size: int):
        """Chunks of the K/V computation: it has no (chunk x T) mask, so it takes bigger steps
        (fewer, larger matmuls) at a working set of at most 1024 tokens of its intermediates."""
        return self.chunks(length, max(size, KV_CHUNK_TOKENS))

    def key_length(self, end: int, full: int) -> int:
        """How many keys the chunk ending at ``end`` sees: its prefix, or all."""
        return full if self.full_keys else end

    def chunk_masks(self, mask_values, start: int, end: int, full: int, device) -> list[torch.Tensor]:
        """The masks of queries ``[start, end)`` over keys ``[0, end)``: a lower-right causal
        one for is_causal, or every rebuilt mask, built over all keys and checked together to
        hide every key after its query (the keys past the chunk too: a chunk only ever sees its
        prefix), then cut to the prefix. With ``full_keys``, over all keys, unchecked."""
        keys = self.key_length(end, full)
        if not self.masks:
            if not self.causal_mask_input:
                return []
            query = torch.arange(start, end, device=device)
            return [torch.arange(keys, device=device)[None, :] <= query[:, None]]
        masks = [spec.builder(*values, full, start, end - start, full) for spec, values in zip(self.masks, mask_values)]
        if self.full_keys:
            return masks
        check_lower_right_causal(masks, start, end, self.name, [spec.visible for spec in self.masks])
        return [mask.narrow(-1, 0, end) for mask in masks]

    def sliced(self, values, start, end):
        """The layer inputs with every sequence input narrowed to ``[start, end)``; contiguous,
        as the layer may view them (GPT-1's ``x.view(-1, width)`` on its input): a chunk-sized
        copy where the batch is > 1."""
        return [
            v if dim is None else v.narrow(dim, start, end - start).contiguous()
            for v, dim in zip(values, self.query_slice_dims)
        ]

    def key_value(self, values, full, size: Optional[int] = None) -> list[torch.Tensor]:
        """K and V of the whole sequence (of every attention of the layer: differential
        attention has two), computed chunk by chunk (no [T, width] temporaries)."""
        whole = None
        for start, end in self.kv_chunks(full, size or self.chunk_size):
            parts = self.kv_graph(*self.sliced(values, start, end), full, end - start)
            if whole is None:
                whole = [p.new_empty(_with_length(p.shape, self.kv_seq_dim, full)) for p in parts]
            for tensor, part in zip(whole, parts):
                tensor.narrow(self.kv_seq_dim, start, end - start).copy_(part)
        return whole

    def query_args(self, values, mask_values, kvs, start, end, full):
        args = self.sliced(values, start, end)
        masks = self.chunk_masks(mask_values, start, end, full, kvs[0].device)
        for spec, mask in zip(self.masks, masks):
            args[spec.layer_input] = mask
        keys = self.key_length(end, full)
        args += [t.narrow(self.kv_seq_dim, 0, keys) for t in kvs]
        if self.causal_mask_input:
            args += masks
        return args + [full, end - start, keys]

    def gradient_fits_over_incoming(self, tensors, grad_output, needs_grad) -> bool:
        """Whether the gradient of the layer's hidden-state input (``output_like``) can be summed
        into ``grad_output``'s memory (``layer_backward(into_grad_output=True)``): it needs a
        gradient, is sliced like the output, and both are contiguous of one shape and of a dtype
        summed in place (not the float32 sums of bfloat16/float16). Real or fake tensors."""
        like = tensors[self.output_like]
        dims = [dim for ref, dim in zip(self.layer_inputs, self.query_slice_dims)
                if ref.kind == "tensor" and ref.index == self.output_like]
        return (bool(needs_grad[self.output_like]) and bool(dims) and all(d == self.output_seq_dim for d in dims)
                and grad_output.dtype == like.dtype and like.dtype not in LOW_PRECISION
                and tuple(grad_output.shape) == tuple(like.shape)
                and grad_output.is_contiguous() and like.is_contiguous())

    def check_dropout(self, values):
        for index in self.dropout_sources:
            if float(values[index].detach()) != 0.0:
                raise RuntimeError(
                    f"streambp: {self.name} runs dropout with p={float(values[index].detach())} but was compiled "
                    "for p=0; recompile (torch._dynamo.reset()) so that it runs unchunked"
                )


def _with_length(shape, dim, length):
    shape = list(shape)
    shape[dim] = length
    return shape


KV_CHUNK_TOKENS = 1024
# Plan id -> plan, weakly: a plan lives as long as the compiled graph that owns it (``owner``
# in ``register_plan``) and goes with it; a long training script that recompiles does not keep
# every plan it ever made.
PLANS: "weakref.WeakValueDictionary[int, LayerPlan]" = weakref.WeakValueDictionary()
_plan_ids = itertools.count()


def register_plan(plan, owner: list) -> int:
    """``plan``'s id for the custom ops; ``owner`` (the plans of one compiled graph, kept by
    what runs it) holds the plan alive."""
    owner.append(plan)
    plan_id = next(_plan_ids)
    PLANS[plan_id] = plan
    return plan_id


# Keys per block when a chunk's masks are checked to hide the keys after the chunk.
CHECK_BLOCK_KEYS = 4096


class NotCausalError(RuntimeError):
    """A chunk mask lets a query see a later key: chunking would change the result."""


def _visible(mask: torch.Tensor, how: str = "above_min") -> torch.Tensor:
    """Where a mask lets a key through: its nonzero entries, its zero entries (a masked_fill
    condition), or, for an additive mask, entries above half the dtype's minimum."""
    if mask.dtype == torch.bool:  # as it is: ``mask != 0`` would first copy it to int64
        return ~mask if how == "zero" else mask
    if how == "nonzero":
        return mask != 0
    if how == "zero":
        return mask == 0
    if not mask.is_floating_point():
        return torch.ones_like(mask, dtype=torch.bool)  # an integer added to the scores hides nothing
    return mask > torch.finfo(mask.dtype).min / 2


def check_lower_right_causal(masks: list[torch.Tensor], start: int, end: int, where: str, how=None) -> None:
    """Refuse chunk masks (queries ``[start, end)`` over all keys) that together let query
    ``start + j`` see a key after it (a key is visible if every mask lets it through; a score
    bias such as ALiBi lets every key through).

    Chunking is exact only because keys past a query are invisible to it; a mask that is not
    causal (an encoder, a prefix-LM, a look-ahead window) would give wrong gradients, so this is
    checked every time, on the diagonal block and on every key after the chunk.
    """
    full = max(mask.shape[-1] for mask in masks)
    device = masks[0].device
    how = how or ["above_min"] * len(masks)

    def visible(begin, length):
        seen = None
        for mask, kind in zip(masks, how):
            part = _visible(mask.narrow(-1, begin, length) if mask.shape[-1] == full else mask, kind)
            seen = part if seen is None else seen & part
        return seen

    query = torch.arange(end - start, device=device)
    future = query[None, :] > query[:, None]
    seen = bool((visible(start, end - start) & future).any())
    # The keys after the chunk, in blocks: what a block's check makes is chunk x block, not
    # chunk x T (at 32k tokens the whole of it was twice the size of a hidden state).
    for begin in range(end, full, CHECK_BLOCK_KEYS):
        if seen:
            break
        seen = bool(visible(begin, min(CHECK_BLOCK_KEYS, full - begin)).any())
    if seen:
        raise NotCausalError(
            f"streambp: the attention mask of {where} lets a query see later keys (not causal); "
            "this model cannot be chunked along the sequence"
        )


def layer_forward(plan: LayerPlan, tensors: Sequence[torch.Tensor], ints: Sequence[int]) -> torch.Tensor:
    values, mask_values = plan.unpack(tensors, ints)
    plan.check_dropout(values)
    like = tensors[plan.output_like]
    full = like.shape[plan.output_seq_dim]
    size = plan.chunk_length(full, like.device)
    with torch.no_grad():
        kvs = plan.key_value(values, full, size)
        out = torch.empty_like(like)
        for start, end in plan.chunks(full, size):
            chunk = plan.query_graph(*plan.query_args(values, mask_values, kvs, start, end, full))
            out.narrow(plan.output_seq_dim, start, end - start).copy_(chunk)
    return out


def layer_backward(
    plan: LayerPlan,
    tensors: Sequence[torch.Tensor],
    ints: Sequence[int],
    grad_output: torch.Tensor,
    needs_grad: Sequence[bool],
    into_grad_output: bool = False,
) -> list[torch.Tensor]:
    """The gradients of the op's tensors (placeholder scalars for those needing none). With
    ``into_grad_output``, the hidden-state input's gradient is written over ``grad_output``
    (whose chunk ``c`` is dead once chunk ``c``'s backward has run) and a placeholder returned
    in its place: one ``tokens x hidden`` tensor fewer at the layer's peak."""
    values, mask_values = plan.unpack(tensors, ints)
    full = tensors[plan.output_like].shape[plan.output_seq_dim]
    size = plan.chunk_length(full, grad_output.device)
    grads = InputGradients(tensors, needs_grad)
    over_incoming = into_grad_output and grad_output._base is None and plan.gradient_fits_over_incoming(
        tensors, grad_output, needs_grad)
    if over_incoming:
        grads.sum_into(plan.output_like, grad_output, plan.output_seq_dim)
    # Layer inputs that receive gradients, by position in the layer's argument list.
    wanted = [
        i for i, ref in enumerate(plan.layer_inputs)
        if ref.kind == "tensor" and needs_grad[ref.index]
    ]

    def attach_leaves(args, whole_leaves):
        """Put gradient-tracking leaves in ``args``: shared ones for whole inputs (weights),
        fresh ones for the chunk's slices of sequence inputs."""
        leaves = {i: whole_leaves[i] if i in whole_leaves else args[i].detach().requires_grad_() for i in wanted}
        for i, leaf in leaves.items():
            args[i] = leaf
        return leaves

    def accumulate(leaves, leaf_grads, start, end):
        grads.add_chunk([plan.layer_inputs[i].index for i in leaves], leaf_grads,
                        [plan.query_slice_dims[i] for i in leaves], start, end)

    with autograd_in_kernel():
        with torch.no_grad():
            kvs = plan.key_value(values, full, size)
        grad_kvs = [accumulator_like(t) for t in kvs]
        whole_leaves = shared_leaves(grads, {
            i: (plan.layer_inputs[i].index, values[i]) for i in wanted if plan.query_slice_dims[i] is None
        })
        n, count = len(values), len(kvs)
        for start, end in plan.chunks(full, size):
            args = plan.query_args(values, mask_values, kvs, start, end, full)
            leaves = attach_leaves(args, whole_leaves)
            prefixes = []
            for i in range(n, n + count):
                args[i] = args[i].detach().requires_grad_()
                prefixes.append(args[i])
            # Attention over the prefix adds its dK/dV into grad_kvs itself where it can
            # (prefix_attention.gradients_into); the rest comes back through the leaves.
            sums = [g.narrow(plan.kv_seq_dim, 0, plan.key_length(end, full)) for g in grad_kvs]
            with gradients_into(list(zip(prefixes, sums))):
                chunk_output = plan.query_graph(*args)
            chunk_grads = backward_into_leaves(
                chunk_output,
                grad_output.narrow(plan.output_seq_dim, start, end - start),
                [*prefixes, *leaves.values()],
            )
            for total, grad in zip(sums, chunk_grads[:count]):
                if grad is not None:
                    total.add_(grad)
            accumulate(leaves, chunk_grads[count:], start, end)
            grads.end_chunk(end)
            # Nothing of this chunk may outlive it: its gradients are prefix- and weight-sized.
            del chunk_grads, chunk_output, args, leaves, prefixes, grad, sums
        # The prefix contributions: dK/dV through the K/V projections, once per layer (chunk
        # by chunk: the K/V computation is token-wise).
        del kvs
        for start, end in plan.kv_chunks(full, size) if wanted else ():
            args = plan.sliced(values, start, end)
            leaves = attach_leaves(args, whole_leaves)
            parts = plan.kv_graph(*args, full, end - start)
            # Only what depends on a trained input is differentiated (LoRA on q/v: K's
            # projection is frozen, nothing before K needs a gradient).
            pairs = [
                (out, grad.narrow(plan.kv_seq_dim, start, end - start).to(out.dtype))
                for out, grad in zip(parts, grad_kvs) if out.requires_grad
            ]
            if pairs:
                kv_grads = backward_into_leaves([out for out, _ in pairs], [g for _, g in pairs], list(leaves.values()))
                accumulate(leaves, kv_grads, start, end)
                del kv_grads
            del args, leaves, parts, pairs
    result = grads.result()
    if into_grad_output and not over_incoming:  # the graph reads the gradient from grad_output
        grad_output.copy_(result[plan.output_like])
        result[plan.output_like] = grad_output.new_zeros(())
    return result


# -- the custom ops ---------------------------------------------------------------------------

@torch.library.custom_op("streambp::layer", mutates_args=())
def layer_op(plan_id: int, tensors: list[torch.Tensor], ints: list[int]) -> torch.Tensor:
    return layer_forward(PLANS[plan_id], tensors, ints)


@layer_op.register_fake
def _layer_fake(plan_id, tensors, ints):
    return torch.empty_like(tensors[PLANS[plan_id].output_like])


@torch.library.custom_op("streambp::layer_backward", mutates_args=())
def layer_backward_op(
    plan_id: int,
    tensors: list[torch.Tensor],
    ints: list[int],
    grad_output: torch.Tensor,
    needs_grad: list[bool],
) -> list[torch.Tensor]:
    return layer_backward(PLANS[plan_id], tensors, ints, grad_output, needs_grad)


@layer_backward_op.register_fake
def _layer_backward_fake(plan_id, tensors, ints, grad_output, needs_grad):
    return grad_placeholders_fake(tensors, needs_grad)


@torch.library.custom_op("streambp::layer_backward_into_grad_output", mutates_args=("grad_output",))
def layer_backward_into_grad_output_op(
    plan_id: int,
    tensors: list[torch.Tensor],
    ints: list[int],
    grad_output: torch.Tensor,
    needs_grad: list[bool],
) -> list[torch.Tensor]:
    """``layer_backward`` with the hidden-state input's gradient written over ``grad_output``
    (placed by ``passes/gradient_in_place.py`` where nothing else reads it)."""
    return layer_backward(PLANS[plan_id], tensors, ints, grad_output, needs_grad, into_grad_output=True)


@layer_backward_into_grad_output_op.register_fake
def _layer_backward_into_grad_output_fake(plan_id, tensors, ints, grad_output, needs_grad):
    grads = grad_placeholders_fake(tensors, needs_grad)
    like = PLANS[plan_id].output_like
    grads[like] = tensors[like].new_zeros(())
    return grads


def _backward(ctx, grad_output):
    tensors = list(ctx.saved_tensors)
    grads = torch.ops.streambp.layer_backward(ctx.plan_id, tensors, ctx.ints, grad_output, ctx.needs_grad)
    return op_input_grads(ctx, grads)


layer_op.register_autograd(_backward, setup_context=save_op_inputs)
