"""The rewriting pass: each chunkable decoder layer becomes one ``streambp::layer`` call.

Runs the analyses (layer regions, sequence dims of the whole graph, per-layer split, mask
builders), probes each rewritten layer on small real chunks, and only then replaces the layer's
ops in the outer graph. A layer any step refuses keeps its original ops (ordinary autograd) and
its reason is recorded.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import torch
import torch.fx as fx

from sbp_compiler.config import auto_chunk_size
from sbp_compiler.report import GraphReport, LayerDecision
from sbp_compiler.runtime import InputRef, LayerPlan, NotCausalError, register_plan

from .errors import CannotChunk, Reason
from .find_layers import LayerRegion, extract_subgraph, find_layer_regions, region_of
from .layer_split import LayerSplit, split_layer
from .mask import build_mask_builder
from .op_arguments import OpArguments
from .probe import fabricate
from .seq_dims import SeqDimAnalysis, UNKNOWN, example, seq_sized_predicate, size_hint

log = logging.getLogger("sbp_compiler.passes.outline")


def _is_parameter_or_buffer(node: fx.Node, example_input) -> bool:
    return isinstance(example_input, torch.nn.Parameter) or "_buffers_" in node.name or "_parameters_" in node.name


def sequence_labels(gm: fx.GraphModule, example_inputs, is_seq_sized) -> tuple[dict, dict]:
    """Label ``"S"`` every dim of every value that runs along the sequence (lenient).

    Returns (labels by node, why a node could not be labelled)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    initial = {}
    for node, value in zip(placeholders, example_inputs):
        shape = getattr(example(node), "shape", None)
        if shape is None or _is_parameter_or_buffer(node, value):
            continue
        initial[node] = tuple(frozenset({node.name}) if is_seq_sized(s) else None for s in shape)
    analysis = SeqDimAnalysis(is_seq_sized=is_seq_sized, source_mode=True, lenient=True)
    source_labels = analysis.run(list(gm.graph.nodes), initial)

    def to_s(labels):
        if isinstance(labels, tuple):
            return tuple("S" if l else None for l in labels)
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
    last_layer_output: Optional[fx.Node] = None  # the node now standing for it


_SEVERAL_OUTPUTS = (
    "{n} values leave the layer (with use_cache=True each layer also returns its K/V cache: "
    "call the model with use_cache=False for training)"
)


def _layer_output_example(regions: list[LayerRegion]) -> torch.Tensor:
    """The output of the first layer that has a single output: (.., T, hidden)."""
    single = [r for r in regions if len(r.outputs) == 1]
    if not single:
        raise CannotChunk(Reason.LAYER_OUTPUTS, _SEVERAL_OUTPUTS.format(n=len(regions[0].outputs)))
    out = example(single[0].outputs[0])
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise CannotChunk(Reason.NO_SEQUENCE_DIM, "layer output is not a (.., T, hidden) tensor")
    return out


def _probe(plan: LayerPlan, region: LayerRegion, mask_inputs: list, split: LayerSplit, real: dict, full: int):
    """Run the rewritten layer on small real chunks (random data where no example input exists):
    shapes and mask causality must hold."""
    values = [fabricate(n, real) for n in region.inputs]
    mask_values = [fabricate(n, real) for n in mask_inputs]
    try:
        with torch.no_grad():
            key, value = plan.key_value(values, full)
    except Exception as error:
        raise CannotChunk(Reason.SHAPE_PROBE, f"chunked K/V: {error!r}"[:500]) from None
    if list(key.shape) != [size_hint(s) for s in example(split.attention.key).shape]:
        raise CannotChunk(Reason.SHAPE_PROBE, f"chunked K/V gave shape {list(key.shape)}")
    out_shape = [size_hint(s) for s in example(region.outputs[0]).shape]
    for start, end in ((0, min(full, 2)), (1, min(full, 4)), (max(0, full - 3), full)):
        if end <= start:
            continue
        with torch.no_grad():
            try:
                args = plan.query_args(values, mask_values, key, value, start, end, full)
            except NotCausalError as error:
                raise CannotChunk(Reason.NOT_CAUSAL, str(error)) from None
            try:
                chunk = plan.query_graph(*args)
            except Exception as error:  # any failure here would be a failure at training time
                raise CannotChunk(Reason.SHAPE_PROBE, f"chunk [{start}, {end}): {error!r}"[:500]) from None
        expected = list(out_shape)
        expected[plan.output_seq_dim] = end - start
        if list(chunk.shape) != expected:
            raise CannotChunk(Reason.SHAPE_PROBE, f"chunk [{start}, {end}) gave shape {list(chunk.shape)}, expected {expected}")


def outline_layers(
    gm: fx.GraphModule,
    example_inputs,
    chunk_size,
    report: GraphReport,
    wrap_subgraph: Callable[[str, fx.GraphModule], Callable],
) -> "GraphContext":
    """Rewrite ``gm`` in place; ``wrap_subgraph(name, gm)`` turns each new subgraph into a callable.
    Every layer's decision is appended to ``report``. Returns what the head pass needs to know
    about the graph, ``last_layer_output`` included.

    ``chunk_size``: an int, or "auto" (resolved from the hidden size, see ``auto_chunk_size``).
    """
    regions = find_layer_regions(gm)
    layer_output = _layer_output_example(regions)
    seq_len = layer_output.shape[-2]
    dynamic = isinstance(seq_len, torch.SymInt)
    report.dynamic = dynamic
    report.sequence_length = str(seq_len.node.expr) if dynamic else str(seq_len)
    if not dynamic and seq_len < 2:
        raise CannotChunk(Reason.SHORT_SEQUENCE, f"static length {seq_len}")
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(size_hint(layer_output.shape[-1]))
    report.chunk_size = chunk_size
    is_seq_sized = seq_sized_predicate(seq_len)
    labels, unknown_causes = sequence_labels(gm, example_inputs, is_seq_sized)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    context = GraphContext(
        gm=gm,
        labels=labels,
        unknown_causes=unknown_causes,
        is_seq_sized=is_seq_sized,
        dynamic=dynamic,
        full_length=size_hint(seq_len),
        chunk_size=chunk_size,
        real_inputs=dict(zip(placeholders, example_inputs)),
        wrap_subgraph=wrap_subgraph,
    )

    for region in regions:
        decision = LayerDecision(path=region.path, chunked=False)
        report.layers.append(decision)
        try:
            context.last_layer_output = _outline_one(context, region, decision)
        except CannotChunk as refusal:
            decision.reason, decision.detail = refusal.reason, refusal.detail
            log.info("streambp: %s not chunked: %s", region.path, refusal)
            outputs = region_of(region.path, region.nodes).outputs
            context.last_layer_output = outputs[0] if len(outputs) == 1 else None
    _label_last_output(context, regions)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return context


def _label_last_output(context: GraphContext, regions: list[LayerRegion]) -> None:
    """If a refused layer left the stack's output unexplained, label it like the stack's input.

    The head only needs to know which dim of the hidden state to chunk: a token-wise function of
    it is exact chunked along any dim, whatever the layers before it did.
    """
    last = context.last_layer_output
    if last is None or isinstance(context.labels.get(last), tuple):
        return
    out = example(last)
    for node in regions[0].inputs:
        value, labels = example(node), context.labels.get(node)
        if (isinstance(value, torch.Tensor) and isinstance(labels, tuple) and labels.count("S") == 1
                and value.shape == out.shape and value.dtype == out.dtype):
            context.labels[last] = labels
            return


def _outline_one(context: GraphContext, region: LayerRegion, decision: LayerDecision) -> fx.Node:
    gm, labels, wrap_subgraph = context.gm, context.labels, context.wrap_subgraph
    region = region_of(region.path, region.nodes)
    if len(region.outputs) != 1:
        raise CannotChunk(Reason.LAYER_OUTPUTS, _SEVERAL_OUTPUTS.format(n=len(region.outputs)))
    output = region.outputs[0]
    layer_gm = extract_subgraph(region.inputs, region.nodes, region.outputs)
    input_labels = [labels.get(n, UNKNOWN) for n in region.inputs]
    for node, node_labels in zip(region.inputs, input_labels):
        if node_labels == UNKNOWN:
            raise CannotChunk(Reason.LAYER_INPUT_UNKNOWN, f"{node.name}: {context.unknown_causes.get(node, 'no labels')}")
    split = split_layer(layer_gm, input_labels, context.is_seq_sized, context.dynamic)

    mask_node = region.inputs[split.mask_input] if split.mask_input is not None else None
    builder = run_builder = None
    if mask_node is not None:
        if mask_node not in context.mask_builders:
            built = build_mask_builder(mask_node, labels, context.is_seq_sized)
            context.mask_builders[mask_node] = (built, wrap_subgraph(f"{region.path}.mask", built.graph))
        builder, run_builder = context.mask_builders[mask_node]

    # Arguments of the op: tensors and ints; the mask itself is rebuilt per chunk.
    arguments = OpArguments(Reason.LAYER_INPUT_UNKNOWN)
    ref, tensors, ints = arguments.ref, arguments.tensors, arguments.ints

    layer_refs = [ref(n) if n is not mask_node else InputRef("mask", -1) for n in region.inputs]
    mask_refs = [ref(n) for n in builder.inputs] if builder else []
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
        mask_inputs=mask_refs,
        query_slice_dims=split.query_slice_dims,
        mask_input=split.mask_input,
        mask_builder=run_builder,
        kv_seq_dim=split.kv_seq_dim,
        output_seq_dim=split.output_seq_dim,
        output_like=like[0],
        dropout_sources=split.dropout_sources,
        chunk_size=context.chunk_size,
    )
    _probe(plan, region, builder.inputs if builder else [], split, context.real_inputs, context.full_length)
    plan_id = register_plan(plan)

    graph = gm.graph
    with graph.inserting_before(output):
        call = graph.call_function(torch.ops.streambp.layer.default, (plan_id, list(tensors), list(ints)))
    call.meta = dict(output.meta)
    labels[call] = labels[output]
    members = set(region.nodes)
    output.replace_all_uses_with(call, delete_user_cb=lambda user: user not in members)
    for node in reversed(region.nodes):
        if not node.users:
            graph.erase_node(node)
    decision.chunked = True
    decision.attention = split.attention.kind + (" grouped-query" if split.attention.grouped_query_replication else "")
    decision.mask = (
        "lower-right causal (built per chunk)" if builder is None
        else f"rebuilt per chunk (query sources {builder.query_sources}, key sources {builder.key_sources})"
    )
    decision.rescaled_arguments = split.rescaled_arguments
    return call
