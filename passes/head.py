"""The LM head and loss, chunked along the sequence (DESIGN §1, last paragraph).

After the last decoder layer a causal LM computes final norm -> lm_head -> [soft-capping,
scaling] -> per-token quantities (cross-entropy, log p(token), logsumexp, entropy), then reduces
them to the loss. The first part is token-wise and holds the widest tensors of training (the
``[B, T, vocab]`` logits, their float copy, log-softmax and its gradient); the rest works on
per-token values.

Analysis (``find_head_region``): starting from the last layer's output, every op the strict
sequence-dimension analysis proves token-wise joins the region; the first op that reduces,
slices or otherwise mixes along the sequence ends it (its reason is kept for the report). Values
the region reads from elsewhere (shifted labels, masks) are sliced per chunk; if their sequence
dim is merged with the batch (``labels.view(-1)``), the view is copied into the region so the
slice is taken before it. Region values used outside it are its outputs: per-token values, or the
full logits when the caller gets them back (then they have to exist; the report says so).

Rewriting (``outline_head``): the region becomes one ``streambp::head`` call, probed first on a
short real example against the unchunked region.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import operator

import sympy
import torch
import torch.fx as fx

from sbp_compiler.head_runtime import HeadPlan, OutputLayout, evaluate, head_forward, head_forward_with_gradients
from sbp_compiler.report import HeadDecision
from sbp_compiler.runtime import register_plan

from .errors import CannotChunk, Reason
from .find_layers import extract_subgraph
from .fx_utils import descendants, eliminate_dead_code, refuse_side_effects
from .grad_mode import grad_mode_of, record_grad_modes, reproduce_grad_modes
from .op_arguments import OpArguments
from .outline import GraphContext
from .probe import fabricate
from .rescale import rescale_shape_arguments
from .seq_dims import NON_TENSOR, SeqDimAnalysis, UNKNOWN, example, op_name, shape_of, size_hint

log = logging.getLogger("sbp_compiler.passes.head")

S = "S"
# Ops that only re-view or convert a value: copied into the region to un-merge a sequence dim.
SHAPE_ONLY = frozenset(
    "view reshape flatten unflatten view_as reshape_as squeeze unsqueeze contiguous to float double "
    "half bfloat16 long int clone detach".split()
)
VIEW_LIKE = frozenset("view reshape flatten unflatten view_as reshape_as squeeze unsqueeze".split())


@dataclasses.dataclass
class HeadRegion:
    members: list[fx.Node]  # token-wise nodes after the layers, graph order; moved into the op
    copied: list[fx.Node]  # shape-only producers of inputs, copied in (the originals stay)
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    labels: dict  # strict sequence labels of members and inputs
    stops: list[tuple[str, str]]  # (node, why it stays outside) for users of region values


def _has_seq(labels) -> bool:
    if isinstance(labels, tuple):
        return S in labels
    if isinstance(labels, list):
        return any(_has_seq(l) for l in labels)
    return False


def find_head_region(gm: fx.GraphModule, start: fx.Node, labels: dict, is_seq_sized, dynamic: bool, full_length: int) -> HeadRegion:
    """``labels``: whole-graph sequence labels (``"S"``); ``start``: the last layer's output.

    Values the whole-graph analysis could not relate to the sequence but that meet it in the
    head (labels whose length is a dynamic size of its own) are labelled by that use, where it
    is unambiguous; ``labels`` is updated. The runtime checks their length on every call."""
    for _ in range(4):
        region, strict = _find_head_region(gm, start, labels, is_seq_sized, dynamic, full_length)
        if not any(_label_by_use(operand, dim, labels, is_seq_sized, full_length)
                   for operand, dim in strict.unaligned.values()):
            return region
    return region


def _label_by_use(operand: fx.Node, dim: int, labels: dict, is_seq_sized, full_length: int) -> bool:
    """Label ``operand`` along the sequence at ``dim``, where a sequence axis needs it.

    Walks back through shape-only ops to the value they view; if exactly one dim of it has the
    sequence's length, that dim is labelled and the labels are propagated back down."""
    chain = [operand]
    while op_name(chain[-1]) in SHAPE_ONLY:
        tensor_args = [a for a in chain[-1].all_input_nodes if isinstance(example(a), torch.Tensor)]
        if len(tensor_args) != 1:
            break
        chain.append(tensor_args[0])
    root = chain[-1]
    shape = shape_of(root)
    if shape is None or root.op == "output":
        return False
    candidates = [d for d, size in enumerate(shape) if size_hint(size) == full_length]
    if len(candidates) != 1:
        return False
    root_labels = tuple(S if d == candidates[0] else None for d in range(len(shape)))
    analysis = SeqDimAnalysis(is_seq_sized=is_seq_sized, seq_length=full_length)
    try:
        found = analysis.run(list(reversed(chain[:-1])), {root: root_labels})
    except CannotChunk:
        return False
    if not isinstance(found.get(operand), tuple) or found[operand][dim] != S:
        return False
    for node in chain:
        labels[node] = found[node]
    return True


def _find_head_region(gm, start, labels, is_seq_sized, dynamic, full_length):
    after = descendants(start)
    order = [n for n in gm.graph.nodes if n in after]
    initial = {n: l for n, l in labels.items() if n not in after}
    strict = SeqDimAnalysis(is_seq_sized=is_seq_sized, refuse_unexplained=dynamic, lenient=True, aligned_only=True,
                            seq_length=full_length)
    strict_labels = strict.run(order, initial)
    strict.unaligned = {n: u for n, u in strict.unaligned.items() if u[0] not in after}

    members: list[fx.Node] = []
    inside = {start}
    for node in order:
        if not any(a in inside for a in node.all_input_nodes):
            continue
        node_labels = strict_labels.get(node)
        sized = op_name(node) in NON_TENSOR and node_labels is None
        if _has_seq(node_labels) or sized:
            members.append(node)
            inside.add(node)
    member_set = set(members)
    if not any(isinstance(example(n), torch.Tensor) for n in members):
        raise CannotChunk(Reason.HEAD_NOT_FOUND, f"no token-wise op uses {start.name}")

    stops = {}  # user -> why it stays outside, in first-use order
    for node in members:
        for user in node.users:
            if user not in member_set and user.op != "output" and user not in stops:
                stops[user] = strict.unknown_causes.get(user) or "has no sequence dim"
    for node in members:
        if op_name(node) in NON_TENSOR and any(u not in member_set for u in node.users):
            raise CannotChunk(Reason.HEAD_LAYOUT, f"{node.name} (a size of a head value) is used after the head")

    copied, inputs = _region_inputs(members, start, strict_labels, full_length)
    outputs = [n for n in members if any(u not in member_set for u in n.users)]
    for node in outputs:
        if not isinstance(example(node), torch.Tensor):
            raise CannotChunk(Reason.HEAD_LAYOUT, f"{node.name} leaves the head and is not a tensor")
    stops = [(user.name, why) for user, why in stops.items()]
    return HeadRegion(members, copied, inputs, outputs, strict_labels, stops), strict


def _is_plain(node: fx.Node, labels, full_length: int) -> bool:
    """A value whose only sequence dim is exactly the sequence length (not merged with others)."""
    return (
        isinstance(labels, tuple) and labels.count(S) == 1
        and size_hint(shape_of(node)[labels.index(S)]) == full_length
    )


def _region_inputs(members, start, labels, full_length):
    """(copied producers, inputs): every sequence input ends up plain, or the region is refused."""
    member_set = set(members)
    copied: list[fx.Node] = []
    while True:
        inputs = []
        for node in copied + members:
            for arg in node.all_input_nodes:
                if arg not in member_set and arg not in copied and arg not in inputs:
                    inputs.append(arg)
        # Scalars other than sizes (a lifted epsilon's ``.item()``, a ``torch.Size`` built from
        # the length) are computed in the region, from their own inputs.
        scalars = [
            n for n in inputs
            if n.op != "placeholder" and not isinstance(example(n), (torch.Tensor, int, torch.SymInt))
        ]
        if scalars:
            copied.extend(scalars)
            continue
        merged = [
            n for n in inputs
            if _has_seq(labels.get(n)) and not _is_plain(n, labels.get(n), full_length)
        ]
        if not merged:
            copied_set = set(copied)
            return [n for n in start.graph.nodes if n in copied_set], inputs
        node = merged[0]
        tensor_args = [a for a in node.all_input_nodes if isinstance(example(a), torch.Tensor)]
        if op_name(node) not in SHAPE_ONLY or len(tensor_args) != 1:
            raise CannotChunk(
                Reason.HEAD_LAYOUT,
                f"head input {node.name} {tuple(shape_of(node))} has its sequence dim merged with others",
            )
        copied.append(node)


@dataclasses.dataclass
class _Extracted:
    gm: fx.GraphModule  # (*inputs, full_len, chunk_len) -> tuple of outputs
    labels: dict
    placeholders: list[fx.Node]
    outputs: list[fx.Node]
    rescaled: int


def _extract(region: HeadRegion, outer_labels: dict, is_seq_sized, dynamic, full_length: int) -> _Extracted:
    taken = set(region.members) | set(region.copied)
    nodes = [n for n in region.inputs[0].graph.nodes if n in taken]
    gm = extract_subgraph(region.inputs, nodes, region.outputs)
    graph = gm.graph
    output_node = next(n for n in graph.nodes if n.op == "output")
    if len(region.outputs) == 1:  # always a tuple, whatever the number of outputs
        output_node.args = ((output_node.args[0],),)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        full_len = graph.placeholder("full_len")
    with graph.inserting_after(full_len):
        chunk_len = graph.placeholder("chunk_len")
    gm.recompile()
    # The proof: the strict analysis over the extracted graph, refusing instead of lenient.
    initial = {}
    for p, node in zip(placeholders, region.inputs):
        node_labels = region.labels.get(node, outer_labels.get(node))
        if node_labels == UNKNOWN or (isinstance(node_labels, tuple) and node_labels.count(S) > 1):
            raise CannotChunk(Reason.HEAD_LAYOUT, f"head input {node.name} has labels {node_labels}")
        initial[p] = node_labels
    analysis = SeqDimAnalysis(is_seq_sized=is_seq_sized, refuse_unexplained=dynamic, aligned_only=True,
                              seq_length=full_length)
    labels = analysis.run(list(graph.nodes), initial)
    outputs = list(output_node.args[0])
    for out in outputs:
        if not isinstance(labels.get(out), tuple) or labels[out].count(S) != 1:
            raise CannotChunk(Reason.HEAD_LAYOUT, f"head output {out.name} has sequence labels {labels.get(out)}")
    rescaled = rescale_shape_arguments(gm, labels, {S: (full_len, chunk_len)})
    # A loss's no_grad block (per-token weights) stays one (see ``_replace`` for the call).
    reproduce_grad_modes(gm, _runs_with_autograd(region))
    return _Extracted(gm, labels, placeholders, outputs, rescaled)


def _runs_with_autograd(region: HeadRegion) -> bool:
    """The head op's grad mode: with autograd if any of its outputs was computed with it."""
    return any(grad_mode_of(o) for o in region.outputs)


def _expr(size) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def _layouts(extracted: _Extracted, seq_expr: sympy.Expr, full_length: int) -> dict:
    """(dim, outer, inner) of every value's sequence dim: its size is outer x T x inner."""
    # Inputs labelled by use may state the length with a symbol of their own; the runtime checks
    # it equals the sequence's, so the layouts use the sequence's symbol throughout.
    same_length = {}
    for p in extracted.placeholders:
        p_labels = extracted.labels.get(p)
        if isinstance(p_labels, tuple) and S in p_labels:
            size = _expr(shape_of(p)[p_labels.index(S)])
            if size != seq_expr and isinstance(size, sympy.Symbol):
                same_length[size] = seq_expr

    def expr(size) -> sympy.Expr:
        return _expr(size).xreplace(same_length)

    layouts = {}
    for node in extracted.gm.graph.nodes:
        node_labels = extracted.labels.get(node)
        if not isinstance(node_labels, tuple) or S not in node_labels or node.op == "output":
            continue
        if node_labels.count(S) != 1:
            raise CannotChunk(Reason.HEAD_LAYOUT, f"{node.name} has two sequence dims")
        dim = node_labels.index(S)
        shape = [expr(s) for s in shape_of(node)]
        hints = [size_hint(s) for s in shape_of(node)]
        if node.op == "placeholder" or hints[dim] == full_length:
            layouts[node] = (dim, sympy.Integer(1), sympy.Integer(1))
        elif op_name(node) in VIEW_LIKE:
            source = node.args[0]
            k, outer, inner = layouts[source]
            source_shape = [expr(s) for s in shape_of(source)]
            # A view keeps the row-major order: the sequence index keeps its flat stride.
            stride = inner * math.prod(source_shape[k + 1:])
            new_inner = sympy.simplify(stride / math.prod(shape[dim + 1:]))
            new_outer = sympy.simplify(shape[dim] / (seq_expr * new_inner))
            for value in (new_inner, new_outer):
                if sympy.fraction(sympy.together(value))[1] != 1:
                    raise CannotChunk(Reason.HEAD_LAYOUT, f"{node.name}: sequence dim split by a view")
            layouts[node] = (dim, new_outer, new_inner)
        else:
            found = {
                layouts[a][1:] for a in node.all_input_nodes
                if a in layouts and expr(shape_of(a)[layouts[a][0]]) == shape[dim]
            }
            if len(found) != 1:
                raise CannotChunk(Reason.HEAD_LAYOUT, f"{node.name}: cannot tell how its sequence dim is laid out")
            layouts[node] = (dim, *found.pop())
    return layouts


def _token_bytes(node: fx.Node, full_length: int) -> int:
    value = example(node)
    if not isinstance(value, torch.Tensor):
        return 0
    return math.prod(size_hint(s) for s in value.shape) * value.element_size() // max(1, full_length)


def _rows_per_token(node: fx.Node, full_length: int) -> int:
    """Rows of ``node`` (all dims but the last, e.g. the logits' batch) per token: the LM-head
    matmul's rows in a chunk are this times the chunk's tokens."""
    shape = [size_hint(s) for s in example(node).shape]
    return max(1, math.prod(shape[:-1]) // max(1, full_length))


# Ops that project the hidden state (to the vocabulary, in an LM head).
PROJECTIONS = frozenset({"linear", "matmul", "mm", "bmm", "einsum", "addmm"})


def outline_head(context: GraphContext, chunk_size, decision: HeadDecision) -> None:
    """Rewrite the head region of ``context.gm``, after ``context.last_layer_output``, into one
    ``streambp::head`` call, in place."""
    start = context.last_layer_output
    record_grad_modes(context.gm.graph)
    region = find_head_region(context.gm, start, context.labels, context.is_seq_sized, context.dynamic,
                              context.full_length)
    decision.stops = region.stops
    refuse_side_effects(region.members + region.copied, region.inputs, context.mutated)
    full = context.full_length
    seq_inputs = [n for n in region.inputs if _has_seq(region.labels.get(n, context.labels.get(n)))]
    token_bytes_in = max(_token_bytes(n, full) for n in seq_inputs)
    widest = max(region.members, key=lambda n: _token_bytes(n, full))
    # Chunking pays when some value is computed inside and not returned: then it never exists
    # at full length (the final norm, the logits, the log-softmax and their gradients).
    inside = [
        n for n in region.members
        if n not in region.outputs and isinstance(example(n), torch.Tensor) and op_name(n) not in SHAPE_ONLY
    ]
    if not inside:
        raise CannotChunk(Reason.HEAD_NOTHING_INSIDE, f"every value computed after {start.name} leaves the head")
    if context.head_only and not any(op_name(n) in PROJECTIONS for n in region.members):
        # A graph of its own that starts at a hidden state and projects nothing (a final norm
        # that Dynamo split off): chunking it saves nothing.
        raise CannotChunk(Reason.HEAD_NOTHING_INSIDE, f"no projection (an LM head) after {start.name}")
    extracted = _extract(region, context.labels, context.is_seq_sized, context.dynamic, full)
    seq_len = shape_of(start)[region.labels[start].index(S)]
    layouts = _layouts(extracted, _expr(seq_len), full)

    arguments = OpArguments(Reason.HEAD_LAYOUT)
    refs = [arguments.ref(n) for n in region.inputs]
    tensors, ints = arguments.tensors, arguments.ints
    seq_dims = [layouts[p][0] if p in layouts else None for p in extracted.placeholders]
    symbol_sources = {}
    for p, ref in zip(extracted.placeholders, refs):
        if ref.kind == "tensor":
            for dim, size in enumerate(shape_of(p)):
                if isinstance(size, torch.SymInt):
                    symbol_sources.setdefault(size.node.expr, (ref.index, dim))
    output_layouts, output_shapes = [], []
    for out in extracted.outputs:
        dim, outer, inner = layouts[out]
        output_layouts.append(OutputLayout(dim, outer, inner))
        output_shapes.append(tuple(_expr(s) for s in shape_of(out)))
        try:  # every size the runtime computes must be known from the inputs' shapes
            binding = {symbol: 1 for symbol in symbol_sources}
            for size in (outer, inner, *output_shapes[-1]):
                evaluate(size, binding)
        except (KeyError, ValueError) as error:
            raise CannotChunk(Reason.HEAD_LAYOUT, f"{out.name}: size not derived from the inputs: {error}") from None
    start_ref = refs[region.inputs.index(start)]
    name = "head"
    plan = HeadPlan(
        name=name,
        graph=context.wrap_subgraph(name, extracted.gm),
        inputs=refs,
        input_seq_dims=seq_dims,
        outputs=output_layouts,
        output_shapes=output_shapes,
        output_dtypes=[example(o).dtype for o in extracted.outputs],
        symbol_sources=symbol_sources,
        seq_input=start_ref.index,
        chunk_size=chunk_size,
        token_bytes_in=token_bytes_in,
        token_bytes_widest=_token_bytes(widest, full),
        rows_per_token=_rows_per_token(widest, full),
        hidden_width=size_hint(shape_of(max(seq_inputs, key=lambda n: _token_bytes(n, full)))[-1]),
        gradients_in_forward=_gradients_in_forward(region),
    )
    _probe(plan, region, context)
    plan_id = register_plan(plan, context.plans)
    op = torch.ops.streambp.head_with_gradients if plan.gradients_in_forward else torch.ops.streambp.head
    _replace(context.gm, region, op.default, plan_id, tensors, ints)

    decision.chunked = True
    decision.nodes = [n.name for n in region.members if isinstance(example(n), torch.Tensor)]
    decision.widest = f"{widest.name} {tuple(shape_of(widest))}"
    # An output is reported whole when it is the head's widest value and wider than its input:
    # one as wide as the hidden state (what TRL's fused LM head reads) costs no more than it.
    decision.outputs = [
        (n.name, tuple(shape_of(n)), _token_bytes(n, full) >= max(plan.token_bytes_widest, token_bytes_in + 1))
        for n in region.outputs
    ]
    decision.chunk_size = chunk_size if chunk_size != "auto" else (
        f"auto (now {plan.chunk_length(full)} of {full} tokens)"
    )
    decision.rescaled_arguments = extracted.rescaled
    decision.gradients_in_forward = bool(plan.gradients_in_forward)


def _gradients_in_forward(region: HeadRegion) -> list[int]:
    """The inputs whose gradients forward can compute: all that need one, if the region's one
    output reaches the loss only through full sums. Then the output's gradient is one value
    repeated, and backward only scales what forward computed for a gradient of ones (the runtime
    checks that it is, and recomputes otherwise). Otherwise none."""
    if len(region.outputs) != 1:
        return []
    (out,) = region.outputs
    value = example(out)
    if not (isinstance(value, torch.Tensor) and value.requires_grad and value.is_floating_point()):
        return []
    members = set(region.members)
    users = [u for u in out.users if u not in members]
    if not users or not all(_is_full_sum(u, out) for u in users):
        return []
    return [
        i for i, n in enumerate(region.inputs)
        if isinstance(example(n), torch.Tensor) and example(n).requires_grad
    ]


def _is_full_sum(node: fx.Node, value: fx.Node) -> bool:
    """``value.sum()`` or ``torch.sum(value)``: every element, no dtype or dims."""
    plain_sum = (node.op == "call_method" and node.target == "sum") or (
        node.op == "call_function" and node.target is torch.sum
    )
    return plain_sum and node.args == (value,) and not node.kwargs


def _probe(plan: HeadPlan, region: HeadRegion, context: GraphContext) -> None:
    """Run the chunked head on a short real example (random data where the graph has none) and
    compare with the same region run whole: shapes and layouts must agree."""
    length = min(context.full_length, 7)
    arguments = [fabricate(n, context.real_inputs) for n in region.inputs]
    arguments = [
        a.narrow(d, 0, length).contiguous() if d is not None else a for a, d in zip(arguments, plan.input_seq_dims)
    ]
    tensors = [a for a, r in zip(arguments, plan.inputs) if r.kind == "tensor"]
    ints = [a for a, r in zip(arguments, plan.inputs) if r.kind == "int"]
    probe_plan = dataclasses.replace(plan, chunk_size=3)
    try:
        with torch.no_grad():
            whole = plan.graph(*arguments, context.full_length, length)
            chunked = head_forward(probe_plan, tensors, ints, stated_length=context.full_length)
    except Exception as error:  # any failure here would be a failure at training time
        raise CannotChunk(Reason.SHAPE_PROBE, f"head: {error!r}"[:500]) from None
    for name, a, b in zip((n.name for n in region.outputs), whole, chunked):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
            raise CannotChunk(Reason.SHAPE_PROBE, f"head output {name}: chunked run differs from the whole region")
    if plan.gradients_in_forward:
        probe_plan.gradients_in_forward = plan.gradients_in_forward
        try:
            head_forward_with_gradients(probe_plan, tensors, ints, stated_length=context.full_length)
        except Exception as error:  # then backward recomputes, as for any other head
            log.info("streambp: head gradients stay in backward: %r", error)
            plan.gradients_in_forward = []


def _replace(gm: fx.GraphModule, region: HeadRegion, op, plan_id: int, tensors: list, ints: list) -> None:
    graph = gm.graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    last_input = max(region.inputs, key=position.__getitem__)
    members = set(region.members)
    first_use = min(
        (position[u] for o in region.outputs for u in o.users if u not in members), default=len(position)
    )
    if position[last_input] >= first_use:
        raise CannotChunk(Reason.HEAD_LAYOUT, f"{last_input.name} is computed after a head output is used")
    # The op runs with autograd if any output was computed with it, wherever its last input
    # left the grad mode (a label mask made under no_grad); outputs eager computed without
    # autograd are detached, as they were.
    site = grad_mode_of(last_input.next)
    wanted = _runs_with_autograd(region)
    previous = last_input
    if wanted != site:
        with graph.inserting_after(previous):
            previous = graph.call_function(torch._C._set_grad_enabled, (wanted,))
    with graph.inserting_after(previous):
        call = graph.call_function(op, (plan_id, list(tensors), list(ints)))
    call.meta["example_value"] = [example(o) for o in region.outputs]
    results, previous = [], call
    for i, out in enumerate(region.outputs):
        with graph.inserting_after(previous):
            previous = graph.call_function(operator.getitem, (call, i))
        previous.meta = dict(out.meta)
        if wanted and not grad_mode_of(out):
            with graph.inserting_after(previous):
                previous = graph.call_function(torch.Tensor.detach, (previous,))
            previous.meta = dict(out.meta)
        results.append(previous)
    if wanted != site:
        with graph.inserting_after(previous):
            graph.call_function(torch._C._set_grad_enabled, (site,))
    for out, item in zip(region.outputs, results):
        out.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
    for node in reversed(region.members):
        if not node.users:
            graph.erase_node(node)
    eliminate_dead_code(graph)
    graph.lint()
    gm.recompile()
