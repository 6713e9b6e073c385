"""Decoder-layer detection: the repeated blocks of a Dynamo graph, found without model names.

Dynamo records in ``node.meta["nn_module_stack"]`` the module path each op ran in. A decoder
stack is a ModuleList: paths ``<prefix>.<i>`` (``model.layers.3`` in Llama, ``transformer.h.3``
in GPT-2; its blocks may be of different classes, as in hybrids), of one block in a one-layer model. Every op whose stack contains such a
path belongs to that layer. Whether a found block may be chunked is decided later, by the
sequence-dimension analysis of its ops, not by its name.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import torch
import torch.fx as fx

from .errors import CannotChunk, Reason
from .fx_utils import op_name

_INDEXED = re.compile(r"^(?P<prefix>.+)\.(?P<index>\d+)$")


@dataclasses.dataclass
class LayerRegion:
    """The ops of one decoder layer in the outer graph, and the values crossing its boundary."""

    path: str  # module path, e.g. "model.layers.3"
    nodes: list[fx.Node]
    inputs: list[fx.Node]  # values defined outside and used inside, in first-use order
    outputs: list[fx.Node]  # values defined inside and used outside
    hidden_input: "fx.Node | None" = None  # a whole-graph layer's hidden state: the placeholder shaped like its output


def _clean_path(path: str) -> str:
    """``model.layers.3`` from Dynamo's source names of a module.

    The root is ``L['self']`` or, when the model's forward is wrapped, ``L['args'][0]``
    (transformers 5.24); submodules appear as ``.name``, ``._modules['name']``,
    ``.__dict__['_modules']['name']`` (a PEFT model's ``base_model``) or ``[3]``.
    """
    path = re.sub(r"^[LG]\['[^']*'\](\[\d+\])*\.?", "", path)
    path = re.sub(r"\.?__dict__\['_modules'\]\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\.?_modules\['([^']*)'\]", r".\1", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".")


_ROOT = re.compile(r"^[LG]\['(?P<name>[^']*)'\]")


def _layer_key(node: fx.Node):
    """((root, stack prefix), index, call) of the outermost indexed module ``node`` ran in.

    ``root`` names the object the path starts from (``model`` and ``ref`` for two models in one
    graph: a policy and its reference), so that two models' ``model.layers.0`` stay apart.
    ``call`` counts the calls of that module in the graph: Dynamo keys a module's second call
    ``<id>@1`` (a looped or weight-shared block, as Dory's recurrent layers, or one model run
    twice): each call is a layer of its own, or one region would span the layers called in
    between."""
    for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        match = _INDEXED.match(_clean_path(path))
        if match:
            root = _ROOT.match(str(path))
            call = str(key).partition("@")[2]
            return ((root["name"] if root else ""), match["prefix"]), int(match["index"]), int(call) if call.isdigit() else 0
    return None


def _layer_path(prefix: str, index: int, call: int) -> str:
    return f"{prefix}.{index}" if call == 0 else f"{prefix}.{index}@{call}"


def _same_stack_elsewhere(main, stacks):
    """The main stack, and the stacks of the same path under other roots: the decoder of a second
    model in the graph (a DPO reference beside its policy), chunked as well."""
    (root, prefix), _ = main
    return [main] + [item for item in stacks if item[0][1] == prefix and item[0][0] != root]


def is_size_arithmetic(node: fx.Node, memo: dict) -> bool:
    """A scalar computed from sizes alone (``2 * s16``, ``_sym_sqrt(s3)``): Dynamo computes it
    once and shares it between layers, so it belongs to no layer."""
    if node not in memo:
        value = node.meta.get("example_value", node.meta.get("val"))
        if node.op == "placeholder":  # a size symbol, or a constant Dynamo lifted (``math.pi``)
            memo[node] = True
        elif isinstance(value, (torch.Tensor, list, tuple)) or value is None:
            memo[node] = False
        else:
            memo[node] = node.op in ("call_function", "call_method") and all(
                is_size_arithmetic(a, memo) for a in node.all_input_nodes)
    return memo[node]


def _positions_from_sizes(node: fx.Node, memo: dict) -> bool:
    """``torch.arange(hidden_states.shape[1])`` inside a layer (Llama 4's attention temperature):
    made from sizes alone, it is left outside the layer and enters it as an input, so that each
    chunk gets its own positions, as it gets its rows of ``position_ids``."""
    return (node.op == "call_function" and getattr(node.target, "__name__", "") == "arange"
            and all(is_size_arithmetic(a, memo) for a in node.all_input_nodes))


def _rows_of_a_table(node: fx.Node, memo: dict) -> bool:
    """``self.bias[:, :, k - q:k, :k]`` (GPT-Neo's causal table) or ``alibi[:, :, -k:]`` (MPT's
    bias over the longest sequence) inside a layer: slices by sizes alone of a value made before
    the layers (a buffer, a table of positions) that needs no gradient are left outside the
    layer and enter it as an input, so that a mask or bias made from them is rebuilt per chunk
    like any mask built before the layers, and a table of positions is narrowed like
    ``position_ids``."""
    if not (node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem" and len(node.args) == 2):
        return False
    base, index = node.args
    value = base.meta.get("example_value", base.meta.get("val")) if isinstance(base, fx.Node) else None
    if not (isinstance(value, torch.Tensor) and not value.requires_grad
            and (base.op == "placeholder" or _layer_key(base) is None and base.op in ("call_function", "call_method"))):
        return False
    items = index if isinstance(index, tuple) else (index,)

    def plain(bound):
        return bound is None or isinstance(bound, int) or isinstance(bound, fx.Node) and is_size_arithmetic(bound, memo)

    return all(item is None or item is Ellipsis or isinstance(item, slice) and plain(item.start) and plain(item.stop)
               and item.step in (None, 1) for item in items)


def find_layer_regions(gm: fx.GraphModule) -> list[LayerRegion]:
    groups: dict[tuple[str, str], dict[tuple[int, int], list[fx.Node]]] = defaultdict(lambda: defaultdict(list))
    scalars: dict = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or is_size_arithmetic(node, scalars):
            continue
        if _positions_from_sizes(node, scalars) or _rows_of_a_table(node, scalars):
            continue  # an input of the layer, narrowed per chunk like position_ids, or a mask
        key = _layer_key(node)
        if key is not None:
            prefix, index, call = key
            # One ModuleList is one stack, whatever the classes of its blocks (Jamba alternates
            # attention and Mamba layers, Qwen3-Next linear and full attention).
            groups[prefix][index, call].append(node)
    # A one-layer model has a ModuleList of one block: single blocks count only when nothing
    # repeats. A wrong pick is safe: the block's own analysis refuses what is not a causal layer.
    stacks = [(key, layers) for key, layers in groups.items() if len(layers) >= 2] or list(groups.items())
    if not stacks:
        whole = whole_graph_layer(gm, scalars)
        if whole is not None:
            return [whole]
        raise CannotChunk(Reason.NO_REPEATED_LAYERS, "no ModuleList of decoder blocks in this graph (where Dynamo "
                          "splits a model at graph breaks, each piece is a graph of its own: TORCH_LOGS=graph_breaks "
                          "shows where)")
    # The decoder stack is the repeated block with the most ops in total.
    chosen = _same_stack_elsewhere(max(stacks, key=lambda item: sum(len(n) for n in item[1].values())), stacks)
    named = len(chosen) > 1  # two models: their layers are named from their roots
    found = [(f"{root}.{prefix}" if named and root else prefix, key, nodes)
             for (root, prefix), layers in chosen for key, nodes in layers.items()]
    # In the order the graph runs them (a looped block's calls interleave with the others').
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    found.sort(key=lambda item: order[item[2][0]])
    return [region_of(_layer_path(prefix, *key), nodes) for prefix, key, nodes in found]


# The name of the region that is a whole graph: each decoder layer compiled as a graph of its own
# (an FSDP2 unit, whose hooks break the graph around it, or ``layer.compile()`` per layer); one
# such graph serves every layer of the same code.
WHOLE_GRAPH_LAYER = "layer (the whole graph)"


def _attention_like(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and (
        "scaled_dot_product_attention" in op_name(node) or op_name(node) == "softmax")


def _graph_outputs(gm: fx.GraphModule) -> list:
    leaves: list = []
    fx.node.map_aggregate(gm.graph.output_node().args, leaves.append)
    return leaves


def whole_graph_layer(gm: fx.GraphModule, scalars: dict) -> "LayerRegion | None":
    """The graph itself as one decoder layer, where no ModuleList appears in it: it computes
    attention and returns one tensor shaped like one of its (non-parameter) inputs, the hidden
    state. A wrong pick is safe, as for found blocks: the region's own analysis refuses what is
    not a causal layer."""
    outputs = _graph_outputs(gm)
    out = outputs[0].meta.get("example_value") if len(outputs) == 1 and isinstance(outputs[0], fx.Node) else None
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return None
    hidden_inputs = [
        n for n in gm.graph.nodes if n.op == "placeholder"
        and isinstance(v := n.meta.get("example_value"), torch.Tensor) and not isinstance(v, torch.nn.Parameter)
        and v.shape == out.shape and v.dtype == out.dtype
    ]
    if not hidden_inputs or not any(_attention_like(n) for n in gm.graph.nodes):
        return None
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")
             and not is_size_arithmetic(n, scalars) and not _positions_from_sizes(n, scalars)
             and not _rows_of_a_table(n, scalars)]
    region = region_of(WHOLE_GRAPH_LAYER, nodes)
    region.hidden_input = hidden_inputs[0]
    return region


def region_of(path: str, nodes: list[fx.Node]) -> LayerRegion:
    """The boundary of a set of nodes as the graph stands now (earlier rewrites change it)."""
    members = set(nodes)
    inputs: list[fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            # A submodule the region calls (a custom autograd function's bodies) goes with it.
            if arg not in members and arg not in inputs and arg.op != "get_attr":
                inputs.append(arg)
    outputs = [n for n in nodes if any(user not in members for user in n.users)]
    return LayerRegion(path=path, nodes=nodes, inputs=inputs, outputs=outputs)


def placeholders_for(graph: fx.Graph, values: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Placeholders in ``graph`` standing for ``values``, with their names and example values."""
    env = {}
    for value in values:
        env[value] = graph.placeholder(value.name)
        env[value].meta = dict(value.meta)
    return env


def extract_subgraph(inputs: list[fx.Node], nodes: list[fx.Node], outputs: list[fx.Node]) -> fx.GraphModule:
    """Copy ``nodes`` into a standalone GraphModule with ``inputs`` as placeholders.

    Placeholders keep the names and example values of the values they stand for, so a dump of
    the subgraph reads like the original code.
    """
    graph = fx.Graph()
    env = placeholders_for(graph, inputs)

    def copied(node: fx.Node) -> fx.Node:
        if node not in env and node.op == "get_attr":
            env[node] = graph.node_copy(node)
        return env[node]

    for node in nodes:
        env[node] = graph.node_copy(node, copied)
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    return fx.GraphModule(outputs[0].graph.owning_module or {}, graph)
