"""The rewriting pass: each chunkable decoder layer becomes one ``streambp::layer`` call.

Runs the analyses (layer regions, sequence dims of the whole graph, per-layer split, mask
builders), probes each rewritten layer on small real chunks, and only then replaces the layer's
ops in the outer graph. A layer any step refuses keeps its original ops (ordinary autograd) and
its reason is recorded.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Optional

import torch
import torch.fx as fx

from sbp_compiler.config import auto_chunk_size
from sbp_compiler.report import GraphReport, LayerDecision
from sbp_compiler.autocast import AutocastState
from sbp_compiler.chunked_autograd import inputs_needing_grad
from sbp_compiler.runtime import (
    InputRef, LayerPlan, MaskSpec, NotCausalError, layer_backward, layer_forward, register_plan,
)

from .checkpoint import inline_checkpoints
from .constant_sizes import static_length
from .errors import CannotChunk, Reason
from .grad_mode import grad_mode_of, record_grad_modes, reproduce_grad_modes, without_gradient_path
from .find_layers import LayerRegion, extract_subgraph, find_layer_regions, is_size_arithmetic, region_of
from .fx_utils import eliminate_dead_code, refuse_side_effects
from .layer_split import LayerSplit, split_layer
from .mask import build_mask_builder
from .op_arguments import OpArguments
from .random_draws import replay_random_draws
from .probe import differs, fabricate, probe_generator, scale_floor
from .seq_dims import SeqDimAnalysis, UNKNOWN, example, is_plain, layout, seq_sized_predicate, size_hint, with_layout

log = logging.getLogger("sbp_compiler.passes.outline")


def _is_parameter_or_buffer(node: fx.Node, example_input) -> bool:
    return isinstance(example_input, torch.nn.Parameter) or "_buffers_" in node.name or "_parameters_" in node.name


def sequence_labels(gm: fx.GraphModule, example_inputs, is_seq_sized, seq_length: int,
                    hidden_input: Optional[fx.Node] = None) -> tuple[dict, dict]:
    """Label ``"S"`` every dim of every value that runs along the sequence (lenient).

    ``hidden_input``: a graph input known to be the hidden state (.., T, hidden), when the graph
    starts there (one layer, or the head, as a graph of its own): only its dim -2 is the
    sequence, also where a static length equals the width (4096 tokens of a 4096-wide model).

    Returns (labels by node, why a node could not be labelled)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    initial = {}
    for node, value in zip(placeholders, example_inputs):
        shape = getattr(example(node), "shape", None)
        if shape is None or _is_parameter_or_buffer(node, value):
            continue
        initial[node] = tuple(frozenset({node.name}) if is_seq_sized(s) else None for s in shape)
        if node is hidden_input:
            initial[node] = tuple(frozenset({node.name}) if d == len(shape) - 2 else None for d in range(len(shape)))
    analysis = SeqDimAnalysis(is_seq_sized=is_seq_sized, source_mode=True, lenient=True, seq_length=seq_length)
    source_labels = analysis.run(list(gm.graph.nodes), initial)

    def to_s(labels):
        if isinstance(labels, tuple):
            return tuple(with_layout("S", *layout(l)) if l else None for l in labels)
        if isinstance(labels, list):
            return [to_s(l) for l in labels]
        return labels

    labels = {node: to_s(labels) for node, labels in source_labels.items()}
    return labels, analysis.unknown_causes


@dataclasses.dataclass
class GraphContext:
    """What every layer's rewrite, and then the head's, needs to know about the graph."""

    gm: fx.GraphModule
    labels: dict  # node -> sequence labels ("S") from the whole-graph analysis
    unknown_causes: dict  # node -> why the analysis could not label it
    is_seq_sized: Callable
    dynamic: bool
    full_length: int  # the example's sequence length
    chunk_size: int
    real_inputs: dict  # placeholder -> example input
    wrap_subgraph: Callable[[str, fx.GraphModule], Callable]
    # mask node -> (MaskBuilder, its callable): one builder serves every layer using that mask
    mask_builders: dict = dataclasses.field(default_factory=dict)
    mutated: frozenset = frozenset()  # values an in-place write left in the graph touches
    autocast: AutocastState = AutocastState(())  # the state the graph was traced with
    last_layer_output: Optional[fx.Node] = None  # the node now standing for it
    length: object = None  # the sequence length as the graph has it: an int, or a SymInt when dynamic
    plans: list = dataclasses.field(default_factory=list)  # every plan made for this graph: its compiled code keeps them
    head_only: bool = False  # no layers: the head starts at a graph input (see ``head_only_context``)


def _several_outputs(outputs: list[fx.Node]) -> str:
    """Why a layer with several outputs is refused, naming them; the ``use_cache`` hint only when
    the extra outputs look like a key/value cache (4-d tensors)."""
    def kind(node):
        value = example(node)
        return f"{tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__

    text = f"{len(outputs)} values leave the layer: " + ", ".join(f"{n.name} {kind(n)}" for n in outputs[:6])
    tensors = [example(n) for n in outputs if isinstance(example(n), torch.Tensor)]
    cache_like = [v for v in tensors if v.dim() == 4]
    if tensors and not any(v.requires_grad for v in tensors):
        text += " (an inference step, as in generate(), with autograd off: no backward to chunk; it runs as traced)"
    elif len(cache_like) >= 2:
        text += " (with use_cache=True each layer also returns its K/V cache: call the model with use_cache=False for training)"
    elif any("router" in n.name for n in outputs):
        text += (" (output_router_logits=True: each layer's router logits leave it for the load-balancing loss, "
                 "which sums over all tokens; train with output_router_logits=False to chunk the layers)")
    return text


def _layer_output_example(regions: list[LayerRegion]) -> torch.Tensor:
    """The output of the first layer that has a single output: (.., T, hidden)."""
    single = [r for r in regions if len(r.outputs) == 1]
    if not single:
        raise CannotChunk(Reason.LAYER_OUTPUTS, _several_outputs(regions[0].outputs))
    out = example(single[0].outputs[0])
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise CannotChunk(Reason.NO_SEQUENCE_DIM, "layer output is not a (.., T, hidden) tensor")
    return out


# The probe compares the chunked layer with the original one, forward and backward, at the
# example's full length up to this many tokens (one unchunked layer step at compile time); longer
# examples are checked on a prefix of PROBE_PREFIX tokens, chunked against one chunk.
FULL_REFERENCE_TOKENS = 1024
PROBE_PREFIX = 12


class _ProbeValues:
    """One fabricated value per outer-graph node the layer reads (from a generator of its own)."""

    def __init__(self, real: dict):
        self.real, self.generator, self.values = real, probe_generator(), {}

    def __call__(self, node: fx.Node):
        if node not in self.values:
            self.values[node] = fabricate(node, self.real, self.generator)
        return self.values[node]


def _causal_text(plan: LayerPlan) -> str:
    if plan.causal_mask_input:
        return "lower-right causal (built per chunk)"
    return "lower-right causal, no mask (prefix and diagonal block merged by log-sum-exp)"


def _working_set_widths(nodes, labels: dict, output: torch.Tensor, mask_free: bool) -> dict:
    """What a chunk of the layer holds per token and per (query, key) pair, from its widest
    values along one sequence dim (MLP intermediates) and along two (scores, a given mask); at
    least a bool chunk mask per batch row, unless the attention runs without one (``mask_free``:
    is_causal over the prefix). For ``memory_budget``'s estimate."""
    per_pair = 0 if mask_free else max(1, output.numel() // max(1, output.shape[-2] * output.shape[-1]))
    per_token = 0
    for node in nodes:
        value, dims = example(node), labels.get(node)  # per dim: None, or a sequence label
        if not isinstance(value, torch.Tensor) or not dims:
            continue
        sizes = [size_hint(s) for s in value.shape]
        seq = [d for d, label in enumerate(dims) if label is not None]
        rest = math.prod(s for d, s in enumerate(sizes) if d not in seq) * value.element_size()
        if len(seq) == 1:
            per_token = max(per_token, rest)
        elif len(seq) == 2:
            per_pair = max(per_pair, rest)
    return dict(token_bytes=per_token, pair_bytes=per_pair)


def _probe(plan: LayerPlan, region: LayerRegion, layer_gm: fx.GraphModule, mask_inputs: list,
           split: LayerSplit, arguments: OpArguments, context: GraphContext):
    """Run the rewritten layer on real chunks of fabricated data before it replaces the original:
    shapes must hold, mask causality too, chunks of a prefix must agree with the prefix run as
    one chunk, and (up to ``FULL_REFERENCE_TOKENS``) the outputs and every input gradient must
    equal the original layer's."""
    full = context.full_length
    value_of = _ProbeValues(context.real_inputs)
    values = [value_of(n) for n in region.inputs]
    mask_values = [[value_of(n) for n in inputs] for inputs in mask_inputs]
    try:
        with torch.no_grad():
            kvs = plan.key_value(values, full)
    except Exception as error:
        raise CannotChunk(Reason.SHAPE_PROBE, f"chunked K/V: {error!r}"[:500]) from None
    for tensor, node in zip(kvs, split.kv_nodes):
        if list(tensor.shape) != [size_hint(s) for s in example(node).shape]:
            raise CannotChunk(Reason.SHAPE_PROBE, f"chunked K/V gave shape {list(tensor.shape)}")
    out_shape = [size_hint(s) for s in example(region.outputs[0]).shape]

    def run_chunk(start, end):
        try:
            args = plan.query_args(values, mask_values, kvs, start, end, full)
        except NotCausalError as error:
            raise CannotChunk(Reason.NOT_CAUSAL, str(error)) from None
        try:
            with torch.no_grad():
                return plan.query_graph(*args)
        except Exception as error:  # any failure here would be a failure at training time
            raise CannotChunk(Reason.SHAPE_PROBE, f"chunk [{start}, {end}): {error!r}"[:500]) from None

    for start, end in ((0, min(full, 2)), (1, min(full, 4)), (max(0, full - 3), full)):
        if end <= start:
            continue
        chunk = run_chunk(start, end)
        expected = list(out_shape)
        expected[plan.output_seq_dim] = end - start
        if list(chunk.shape) != expected:
            raise CannotChunk(Reason.SHAPE_PROBE, f"chunk [{start}, {end}) gave shape {list(chunk.shape)}, expected {expected}")

    # Chunks of a prefix against the prefix as one chunk: a layer that is not token-wise (a view
    # that mixes positions, a mask that changes with the chunk) gives other values.
    length = min(full, PROBE_PREFIX)
    whole = run_chunk(0, length)
    for size in (2, 3):
        pieces = [run_chunk(s, min(length, s + size)) for s in range(0, length, size)]
        why = differs(whole, torch.cat(pieces, plan.output_seq_dim), autocast=context.autocast)
        if why:
            raise CannotChunk(Reason.PROBE_MISMATCH, f"chunks of {size} tokens against one chunk: {why}")
    if full <= FULL_REFERENCE_TOKENS:
        _compare_with_original(plan, region, layer_gm, mask_values, arguments, value_of, context)


def _compare_with_original(plan, region, layer_gm, mask_values, arguments, value_of, context):
    """Outputs and input gradients of the chunked op (its own forward and backward) against
    the original layer under autograd, on the same fabricated inputs."""
    full = context.full_length
    leaves = {}
    for node in arguments.tensors:
        value = value_of(node)
        if value.is_floating_point() or value.is_complex():
            leaves[node] = value.detach().requires_grad_()
    try:
        inputs = [leaves.get(n, value_of(n)) for n in region.inputs]
        for spec, values in zip(plan.masks, mask_values):  # the whole masks, as the layer saw them
            inputs[spec.layer_input] = spec.builder(*values, full, 0, full, full)
        with torch.enable_grad(), context.autocast.entered():
            expected = layer_gm(*inputs)
        grad_output = torch.randn(expected.shape, dtype=expected.dtype, generator=probe_generator())
        differentiable = [n for n in arguments.tensors if n in leaves]
        expected_grads = torch.autograd.grad(expected, [leaves[n] for n in differentiable], grad_output,
                                             allow_unused=True)
        tensors = [leaves.get(n, value_of(n)) for n in arguments.tensors]
        ints = [value_of(n) for n in arguments.ints]
        got = layer_forward(plan, tensors, ints)
        got_grads = layer_backward(plan, tensors, ints, grad_output, inputs_needing_grad(tensors))
    except CannotChunk:
        raise
    except NotCausalError as error:
        raise CannotChunk(Reason.NOT_CAUSAL, str(error)) from None
    except Exception as error:
        raise CannotChunk(Reason.SHAPE_PROBE, f"forward and backward at the full length: {error!r}"[:500]) from None
    why = differs(expected, got, autocast=context.autocast)
    if why:
        raise CannotChunk(Reason.PROBE_MISMATCH, f"output against the original layer: {why}")
    floor = scale_floor(expected_grads, expected.dtype, context.autocast)
    for node, grad in zip(differentiable, expected_grads):
        mine = got_grads[arguments.tensors.index(node)]
        grad = torch.zeros_like(mine) if grad is None else grad
        why = differs(grad, mine, floor, context.autocast)
        if why:
            raise CannotChunk(Reason.PROBE_MISMATCH, f"gradient of {node.name} against the original layer: {why}")


def _graph_context(gm, example_inputs, hidden: torch.Tensor, chunk_size, report: GraphReport, wrap_subgraph,
                   mutated, autocast, plans, hidden_input: Optional[fx.Node] = None) -> GraphContext:
    """The graph's sequence length (dim -2 of ``hidden``, a (.., T, hidden) value), chunk size and
    sequence labels of every value (``hidden_input``: see ``sequence_labels``)."""
    seq_len = static_length(hidden.shape[-2])
    dynamic = isinstance(seq_len, torch.SymInt)
    report.dynamic = dynamic
    report.sequence_length = str(seq_len.node.expr) if dynamic else str(seq_len)
    if not dynamic and seq_len < 2:
        raise CannotChunk(Reason.SHORT_SEQUENCE, f"static length {seq_len}")
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(size_hint(hidden.shape[-1]))
    report.chunk_size = chunk_size
    is_seq_sized = seq_sized_predicate(seq_len)
    labels, unknown_causes = sequence_labels(gm, example_inputs, is_seq_sized, size_hint(seq_len), hidden_input)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return GraphContext(
        gm=gm,
        labels=labels,
        unknown_causes=unknown_causes,
        is_seq_sized=is_seq_sized,
        dynamic=dynamic,
        full_length=size_hint(seq_len),
        length=seq_len,
        chunk_size=chunk_size,
        real_inputs=dict(zip(placeholders, example_inputs)),
        wrap_subgraph=wrap_subgraph,
        mutated=frozenset(mutated),
        autocast=autocast,
        plans=plans if plans is not None else [],
    )


def head_only_context(gm: fx.GraphModule, example_inputs, chunk_size, report: GraphReport, wrap_subgraph,
                      mutated=frozenset(), autocast: AutocastState = AutocastState(()),
                      plans: Optional[list] = None) -> Optional[GraphContext]:
    """A graph without decoder layers whose head starts at one of its inputs: the hidden state
    that an earlier graph computed (the loss of an FSDP2 root unit, after the layers' graphs).
    The input is the one float, non-parameter (.., T, hidden) tensor that requires grad; the head
    pass then proves what follows token-wise, as after a layer. None if there is no such input."""
    candidates = [
        node for node, value in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)
        if isinstance(value, torch.Tensor) and not _is_parameter_or_buffer(node, value)
        and value.is_floating_point() and value.requires_grad and value.dim() >= 2
    ]
    if len(candidates) != 1:
        return None
    context = _graph_context(gm, example_inputs, example(candidates[0]), chunk_size, report, wrap_subgraph,
                             mutated, autocast, plans, hidden_input=candidates[0])
    context.last_layer_output, context.head_only = candidates[0], True
    return context


def outline_layers(
    gm: fx.GraphModule,
    example_inputs,
    chunk_size,
    report: GraphReport,
    wrap_subgraph: Callable[[str, fx.GraphModule], Callable],
    mutated: frozenset = frozenset(),
    autocast: AutocastState = AutocastState(()),
    plans: Optional[list] = None,
) -> "GraphContext":
    """Rewrite ``gm`` in place; ``wrap_subgraph(name, gm)`` turns each new subgraph into a callable.
    Every layer's decision is appended to ``report``. Returns what the head pass needs to know
    about the graph, ``last_layer_output`` included. ``mutated``: values an in-place write that
    stayed in the graph touches (``passes/functionalize``); a layer reading one is refused.
    ``plans``: where every plan made is kept (see ``runtime.register_plan``).

    ``chunk_size``: an int, or "auto" (resolved from the hidden size, see ``auto_chunk_size``).
    """
    regions = find_layer_regions(gm)
    record_grad_modes(gm.graph)
    layer_output = _layer_output_example(regions)
    context = _graph_context(gm, example_inputs, layer_output, chunk_size, report, wrap_subgraph, mutated,
                             autocast, plans, regions[0].hidden_input)
    for region in regions:
        decision = LayerDecision(path=region.path, chunked=False)
        report.layers.append(decision)
        try:
            context.last_layer_output = _outline_one(context, region, decision)
        except Exception as error:  # noqa: BLE001 - any failure keeps this layer's ordinary ops
            refusal = error if isinstance(error, CannotChunk) else CannotChunk(
                Reason.INTERNAL_ERROR, f"{type(error).__name__}: {error}"[:500])
            decision.reason, decision.detail = refusal.reason, refusal.detail
            log.info("streambp: %s not chunked: %s", region.path, refusal)
            if not isinstance(error, CannotChunk):
                log.debug("streambp: %s", region.path, exc_info=True)
            now = region_of(region.path, region.nodes)  # its inputs as the graph stands (a chunked layer before it)
            context.last_layer_output = now.outputs[0] if len(now.outputs) == 1 else None
            _label_like_input(context, context.last_layer_output, now.inputs)
    _label_like_input(context, context.last_layer_output, regions[0].inputs)
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return context


def _label_like_input(context: GraphContext, output: Optional[fx.Node], inputs: list[fx.Node]) -> None:
    """If a refused layer (an SSM mixer, say) left its output unexplained, label it like its
    input of the same shape and dtype, so the next layer and the head can still be chunked.

    Sound: what is chunked next is proven token-wise and causal along the labelled dim by its
    own analysis, with every sequence input sliced alike; chunking it is exact whatever the
    refused layer computed along that dim.
    """
    last = output
    if last is None or isinstance(context.labels.get(last), tuple):
        return
    out = example(last)
    if not isinstance(out, torch.Tensor):
        return
    for node in inputs:
        value, labels = example(node), context.labels.get(node)
        if (isinstance(value, torch.Tensor) and isinstance(labels, tuple) and labels.count("S") == 1
                and value.shape == out.shape and value.dtype == out.dtype):
            context.labels[last] = labels
            return


def _localize_scalars(gm: fx.GraphModule, region: LayerRegion) -> LayerRegion:
    """The region with the size arithmetic it reads that is not an int (``_sym_sqrt(s3)``, a
    SymFloat scale shared by every layer) copied into it, so that the op only takes tensors and
    ints; returns the region's new boundary."""
    memo: dict = {}
    wanted = [n for n in region.inputs if n.op != "placeholder" and is_size_arithmetic(n, memo)
              and not isinstance(example(n), (int, torch.SymInt))]
    if not wanted:
        return region_of(region.path, region.nodes)
    chain, stack = set(), list(wanted)
    while stack:
        node = stack.pop()
        if node not in chain and node.op != "placeholder":
            chain.add(node)
            stack.extend(node.all_input_nodes)
    first = region.nodes[0]
    copies: dict = {}
    for node in gm.graph.nodes:
        if node in chain:
            with gm.graph.inserting_before(first):
                copies[node] = gm.graph.node_copy(node, lambda n: copies.get(n, n))
            copies[node].meta = dict(node.meta, nn_module_stack=first.meta.get("nn_module_stack"))
    for node in region.nodes:
        for old, new in copies.items():
            if old in node.all_input_nodes:
                node.replace_input_with(old, new)
    return region_of(region.path, list(copies.values()) + list(region.nodes))


def _check_plain_input(node: fx.Node, node_labels, context: GraphContext) -> None:
    """A layer input is narrowed to each chunk along its sequence dims: each must be the
    sequence itself, of its length, not merged with other dims (``[B*T, d]``)."""
    if not isinstance(node_labels, tuple):
        return
    shape = example(node).shape
    for dim, label in enumerate(node_labels):
        if label is not None and (not is_plain(label) or size_hint(shape[dim]) != context.full_length):
            raise CannotChunk(Reason.LAYER_INPUT_UNKNOWN,
                              f"{node.name} {tuple(shape)}: its sequence dim {dim} is merged with other dims")


def _mask_text(built) -> str:
    if built.given:
        shape = tuple(size_hint(d) for d in example(built.inputs[0]).shape)
        return (f"given whole to this graph ({built.inputs[0].name} {shape}, built in another graph), "
                "a view of it per chunk")
    if built.query_sources:
        return f"rebuilt per chunk (query sources {built.query_sources}, key sources {built.key_sources})"
    return f"key bias rebuilt per chunk (key sources {built.key_sources})"


def _outline_one(context: GraphContext, region: LayerRegion, decision: LayerDecision) -> fx.Node:
    gm, labels, wrap_subgraph = context.gm, context.labels, context.wrap_subgraph
    region = _localize_scalars(context.gm, region)
    region = replay_random_draws(context.gm, region, labels, context.length, context.is_seq_sized)
    refuse_side_effects(region.nodes, region.inputs, context.mutated, allow_dropout=True)
    if len(region.outputs) != 1:
        raise CannotChunk(Reason.LAYER_OUTPUTS, _several_outputs(region.outputs))
    output = region.outputs[0]
    layer_gm = extract_subgraph(region.inputs, region.nodes, region.outputs)
    inline_checkpoints(layer_gm, context.mutated)  # gradient checkpointing: redundant in a chunked layer
    input_labels = [labels.get(n, UNKNOWN) for n in region.inputs]
    for node, node_labels in zip(region.inputs, input_labels):
        if node_labels == UNKNOWN:
            raise CannotChunk(Reason.LAYER_INPUT_UNKNOWN, f"{node.name}: {context.unknown_causes.get(node, 'no labels')}")
    for node, node_labels in zip(region.inputs, input_labels):
        _check_plain_input(node, node_labels, context)
    call_mode = grad_mode_of(output)  # the op runs where the layer's output was computed
    split = split_layer(layer_gm, input_labels, context.is_seq_sized, context.dynamic, context.full_length, call_mode)
    reproduce_grad_modes(layer_gm, call_mode)  # the probe's reference: the layer as eager runs it

    mask_nodes = [region.inputs[i] for i in split.mask_inputs]
    builders = []  # (MaskBuilder, its callable) per rebuilt input; one serves every layer using it
    for mask_node in mask_nodes:
        if mask_node not in context.mask_builders:
            built = build_mask_builder(mask_node, labels, context.is_seq_sized, context.mutated, context.full_length)
            context.mask_builders[mask_node] = (built, wrap_subgraph(f"{region.path}.mask.{mask_node.name}", built.graph))
        builders.append(context.mask_builders[mask_node])

    # Arguments of the op: tensors and ints; the masks themselves are rebuilt per chunk.
    arguments = OpArguments(Reason.LAYER_INPUT_UNKNOWN)
    ref, tensors, ints = arguments.ref, arguments.tensors, arguments.ints

    layer_refs = [ref(n) if n not in mask_nodes else InputRef("mask", -1) for n in region.inputs]
    masks = [MaskSpec(index, run, [ref(n) for n in built.inputs], visible)
             for index, (built, run), visible in zip(split.mask_inputs, builders, split.mask_visibility)]
    out_value = example(output)
    like = [
        i for i, n in enumerate(tensors)
        if n in region.inputs and split.query_slice_dims[region.inputs.index(n)] is not None
        and example(n).shape == out_value.shape and example(n).dtype == out_value.dtype
    ]
    if not like:
        raise CannotChunk(Reason.LAYER_OUTPUTS, "no layer input has the output's shape and dtype")

    name = region.path
    plan = LayerPlan(
        name=name,
        kv_graph=wrap_subgraph(f"{name}.kv", split.kv_graph),
        query_graph=wrap_subgraph(f"{name}.query", split.query_graph),
        layer_inputs=layer_refs,
        masks=masks,
        query_slice_dims=split.query_slice_dims,
        kv_seq_dim=split.kv_seq_dim,
        output_seq_dim=split.output_seq_dim,
        output_like=like[0],
        dropout_sources=split.dropout_sources,
        chunk_size=context.chunk_size,
        full_keys=bool(split.full_keys),
        causal_mask_input=split.synthesize_causal_mask,
        **_working_set_widths([*region.inputs, *region.nodes], context.labels, out_value,
                              mask_free=not masks and not split.synthesize_causal_mask),
    )
    _probe(plan, region, layer_gm, [built.inputs for built, _ in builders], split, arguments, context)
    plan_id = register_plan(plan, context.plans)

    graph = gm.graph
    # Inputs the layer reads only under no_grad are passed detached: eager leaves their .grad None.
    layer_placeholders = [n for n in layer_gm.graph.nodes if n.op == "placeholder"]
    frozen = {region.inputs[layer_placeholders.index(p)] for p in without_gradient_path(layer_gm)}
    passed = []
    for node in tensors:
        if node in frozen and example(node).requires_grad:
            with graph.inserting_before(output):
                detached = graph.call_method("detach", (node,))
            detached.meta = dict(node.meta)
            node = detached
        passed.append(node)
    with graph.inserting_before(output):
        call = graph.call_function(torch.ops.streambp.layer.default, (plan_id, passed, list(ints)))
    call.meta = dict(output.meta)
    # The op's output is proven to run along the sequence at output_seq_dim, whatever the lenient
    # whole-graph analysis made of the original ops (a dispatch it could not follow, say).
    labels[call] = tuple("S" if d == split.output_seq_dim else None for d in range(example(output).dim()))
    members = set(region.nodes)
    output.replace_all_uses_with(call, delete_user_cb=lambda user: user not in members)
    for node in reversed(region.nodes):
        if not node.users:
            graph.erase_node(node)
    decision.chunked = True
    kinds = [a.kind + (" grouped-query" if a.grouped_query_replication else "") for a in split.attentions]
    decision.attention = " + ".join(kinds)  # two for differential attention
    decision.keys, decision.keys_reason = ("all", split.full_keys) if split.full_keys else ("prefix", "")
    decision.mask = _causal_text(plan) if not builders else "; ".join(
        _mask_text(built) for built, _ in builders)
    decision.rescaled_arguments = split.rescaled_arguments
    return call
