"""General FX helpers the passes share: what a node writes in place, whether it draws random
numbers, and dead-code elimination that keeps both.

Dynamo graphs are torch-level and not functional: ``x.add_(y)``, ``x[..., :n].copy_(y)``,
``x[idx] = v`` and ``x += y`` write into a tensor that other nodes read, and their own return
value is often unused. ``fx.Graph.eliminate_dead_code`` only knows side effects of
``call_function`` targets, so it silently drops such ``call_method`` nodes; every pass here uses
``eliminate_dead_code`` below instead.
"""
from __future__ import annotations

import functools
import inspect
import operator
from typing import Optional

import torch
import torch.fx as fx

# In-place operators Dynamo records as functions (``x += y`` is ``operator.iadd(x, y)``).
_INPLACE_OPERATORS = frozenset({
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.imatmul,
})
# Methods whose trailing underscore does not mean a write to the tensor's data.
_NOT_DATA_WRITES = frozenset({"requires_grad_", "retain_grad", "share_memory_", "register_hook"})

# Ops that draw from a random number generator (method and function names).
RANDOM_OPS = frozenset(
    """rand rand_like randn randn_like randint randint_like randperm bernoulli bernoulli_ multinomial
    normal normal_ poisson exponential_ uniform_ random_ geometric_ cauchy_ log_normal_ rrelu rrelu_
    gumbel_softmax _standard_gamma _sample_dirichlet binomial native_dropout""".split()
)
_DROPOUTS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"})


def op_name(node: fx.Node) -> str:
    """The name rules are keyed by: a method's name, a function's ``__name__``, else the node's op."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def example(node_or_value):
    """The fake value Dynamo (``example_value``) or AOTAutograd (``val``) recorded for a node;
    a non-node argument as it is."""
    if isinstance(node_or_value, fx.Node):
        return node_or_value.meta.get("example_value", node_or_value.meta.get("val"))
    return node_or_value


def ancestors(node: fx.Node, data_only: bool = False) -> set:
    """``node`` and every node it is computed from; ``data_only``: not through sizes (a slice
    ``mask[..., : key.shape[-2]]`` reads the key's size, not its values)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(a for a in n.all_input_nodes
                         if not data_only or isinstance(example(a), (torch.Tensor, list, tuple)))
    return seen


def descendants(node: fx.Node) -> set:
    """Every node computed from ``node`` (not ``node`` itself)."""
    seen, stack = set(), [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def mutated_argument(node: fx.Node) -> Optional[fx.Node]:
    """The tensor ``node`` writes into in place, or None if it writes nothing."""
    if node.op not in ("call_method", "call_function", "call_module") or not node.args:
        return _out_argument(node)
    first = node.args[0]
    if not isinstance(first, fx.Node) or not isinstance(example(first), torch.Tensor):
        return _out_argument(node)
    name = op_name(node)
    if node.op == "call_method":
        if name.endswith("_") and not name.startswith("__") and name not in _NOT_DATA_WRITES:
            return first
        return None
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target) if node.graph.owning_module else None
        return first if getattr(module, "inplace", False) else None
    if node.target in _INPLACE_OPERATORS:
        return first
    if _inplace_flag(node):
        return first
    if isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        overload = node.target if isinstance(node.target, torch._ops.OpOverload) else getattr(node.target, "default", None)
        schema = getattr(overload, "_schema", None)
        if schema is not None and schema.is_mutable:
            for argument, value in zip(schema.arguments, node.args):
                if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, fx.Node):
                    return value
            return first
        return None
    if name.endswith("_") and not name.startswith("_") and name not in _NOT_DATA_WRITES and (
            getattr(torch, name, None) is node.target or getattr(torch.Tensor, name, None) is node.target
            or getattr(node.target, "__module__", "") == "torch.nn.init"):
        return first
    return _out_argument(node)


@functools.lru_cache(maxsize=None)
def _inplace_position(function) -> Optional[int]:
    """Position of a function's ``inplace`` parameter (``F.relu(x, inplace=True)``), or None."""
    try:
        parameters = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None
    return parameters.index("inplace") if "inplace" in parameters else None


def _inplace_flag(node: fx.Node) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    try:
        position = _inplace_position(node.target)
    except TypeError:  # an unhashable target
        return False
    return position is not None and len(node.args) > position and node.args[position] is True


def _out_argument(node: fx.Node) -> Optional[fx.Node]:
    out = node.kwargs.get("out") if node.op in ("call_function", "call_method") else None
    return out if isinstance(out, fx.Node) else None


def is_random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers (dropout counts when its probability may be > 0 and
    it is in training mode; ``passes/layer_split`` checks lifted probabilities at run time)."""
    if node.op not in ("call_method", "call_function"):
        return False
    name = op_name(node)
    if name in RANDOM_OPS or getattr(node.target, "_nondeterministic_seeded", False):
        return True
    if name in _DROPOUTS:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        return training is not False and not (isinstance(p, (int, float)) and p == 0)
    return False


def changes_global_state(node: fx.Node) -> bool:
    """Calls made for what they switch, not for their value: functorch's vmap/grad levels
    (``_vmap_increment_nesting`` inside ``associative_scan``), whose results may be unused but
    whose removal unbalances the matching decrement."""
    module = getattr(node.target, "__module__", "") or ""
    return node.op == "call_function" and (module.startswith("torch._functorch") or module.startswith("torch._C._functorch"))


def has_side_effect(node: fx.Node) -> bool:
    """Kept by dead-code elimination: FX's own notion of impure, writes in place, random draws
    (dropping an unused draw would shift every later random number), global state switches."""
    return node.is_impure() or mutated_argument(node) is not None or is_random(node) or changes_global_state(node)


def _returns_alias(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def is_view(node: fx.Node) -> bool:
    """Whether an op node's value may share memory with an input of the op: a view op's output,
    or an element of an aliasing op's list (``split``)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, fx.Node) and source.op == "call_function" and _returns_alias(source)
    return _returns_alias(node)


def view_base(node: fx.Node) -> fx.Node:
    """The node whose memory ``node`` views (``node`` itself where it is no view)."""
    while is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def owns_its_memory(node: fx.Node) -> bool:
    """Whether a node's value is certainly memory of its own: the output of an op with a schema
    saying it aliases none of its inputs, or an element of such an op's list. Placeholders
    (held by the caller) and ops without a schema are not."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        node = node.args[0]
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return False
    schema = getattr(node.target, "_schema", None)
    return schema is not None and not _returns_alias(node)


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """``graph.eliminate_dead_code`` that keeps in-place writes and random draws, in the graph
    and in the subgraphs it calls. torch's own recurses into those (a custom autograd function's
    backward body) with its default notion of side effects, which drops an unused
    ``scatter_add_`` there (PhiMoE's router backward): a wrong gradient."""
    graph.lint()
    changed = False
    for node in reversed(list(graph.nodes)):
        if node.op not in ("placeholder", "output") and not node.users and not has_side_effect(node):
            graph.erase_node(node)
            changed = True
    root = graph.owning_module
    if root is not None:
        called = {n.target for n in graph.find_nodes(op="get_attr")}
        for name, child in root.named_children():
            if name in called and isinstance(child, fx.GraphModule) and eliminate_dead_code(child.graph):
                child.recompile()
                changed = True
    return changed


def fake_mode_of(graph: fx.Graph):
    """The fake-tensor mode the graph's example values live in (a fresh one if it has none)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for node in graph.nodes:
        value = example(node)
        if isinstance(value, torch._subclasses.FakeTensor):
            return value.fake_mode
    return FakeTensorMode()


def compute_example(node: fx.Node, fake_mode) -> None:
    """Give a node that a pass created an example value, computed on its inputs' fake values
    like Dynamo's own, and ``example_value`` in its meta."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), example)
    with unset_fake_temporarily(), fake_mode:
        if node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            value = node.target(*args, **kwargs)
    node.meta["example_value"] = value


def snapshot_graph(gm: fx.GraphModule) -> fx.Graph:
    """A copy of ``gm``'s graph (nodes and their meta) to put back with ``restore_graph``."""
    copy = fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    copy._codegen = gm.graph._codegen
    copies: dict = {}
    value, output = copy.graph_copy(gm.graph, copies, return_output_node=True)
    copy.output(value).meta = dict(output.meta)
    for node, new in copies.items():  # what Dynamo sets on nodes besides meta (``_dynamo_source``)
        for name, attribute in vars(node).items():
            vars(new).setdefault(name, attribute)
    return copy


def restore_graph(gm: fx.GraphModule, snapshot: fx.Graph) -> None:
    """Put back a graph saved by ``snapshot_graph``."""
    gm.graph = snapshot
    gm.recompile()


def refuse_side_effects(nodes, inputs, mutated, allow_dropout: bool = False) -> None:
    """Refuse a region to chunk if it draws random numbers, writes in place, or reads a value
    that a write left in the graph touches (``passes/functionalize``): a recomputed chunk would
    not compute what the original ops did. ``allow_dropout``: ``dropout`` itself is checked by
    the caller (its probability may be 0 only at run time)."""
    from .errors import CannotChunk, Reason

    for node in nodes:
        if is_random(node) and not (allow_dropout and op_name(node) == "dropout"):
            raise CannotChunk(Reason.RANDOM, f"{node.name} ({op_name(node)})")
        written = mutated_argument(node)
        if written is not None:
            raise CannotChunk(Reason.MUTATION, f"{node.name} ({op_name(node)}) writes into {written.name} in place")
    for node in list(nodes) + list(inputs):
        if node in mutated:
            raise CannotChunk(Reason.MUTATION, f"{node.name} is written in place elsewhere in the graph")
