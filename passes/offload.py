"""Option ``layer_inputs="offload"``: each saved layer input goes to host memory after its
layer's forward and comes back one layer ahead of its backward.

Unlike the passes of ``sbp_compiler.pipeline`` this one rewrites AOTAutograd's partitioned
graphs (it runs inside the partition function, where torch's own activation offloading runs),
since only there is it known which tensors forward saves for backward. For every
``streambp::layer`` op of the forward graph whose hidden-state input ``x`` is saved:

forward:  after ``x``'s last use, ``h = streambp.offload(x)``; the wait for that copy,
          ``h = streambp.transfer_wait(h, x)``, goes after the next layer's op, so the copy
          overlaps that layer's compute and at most two layer inputs are on the device at once;
          the saved tensor is ``h`` instead of ``x``, and ``x`` is freed after the wait.
backward: ``streambp.reload(h, device)`` just before the backward of the layer above
          (prefetch, one layer ahead: one reload in flight) and its wait just before the
          layer's own backward reads it.

A layer input is left alone where freeing it could be wrong or gain nothing: a graph input
(held by the caller: per-layer graphs under FSDP2 or DDP's pieces), a value the graph returns, a
view (its base would stay) or a value another saved tensor is a view of, and a non-contiguous one.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import extract_tensor_metadata

import sbp_compiler.offload_ops  # noqa: F401  (registers the streambp transfer ops)
from .fx_utils import is_view, view_base
from sbp_compiler.layer_pieces import layer_ops
from sbp_compiler.runtime import PLANS

OFFLOAD = torch.ops.streambp.offload.default
RELOAD = torch.ops.streambp.reload.default
WAIT = torch.ops.streambp.transfer_wait.default
LAYER_BACKWARD = torch.ops.streambp.layer_backward.default


@dataclasses.dataclass
class OffloadResult:
    offloaded: int = 0
    layers: int = 0
    kept: dict = dataclasses.field(default_factory=dict)  # layer (graph order) -> why its input stays

    def describe(self) -> str:
        text = (f"{self.offloaded} of {self.layers} offloaded to host memory after their layer's forward, each "
                "reloaded during the backward of the layer above it (option layer_inputs='offload')")
        if self.kept:
            text += "; kept: " + ", ".join(f"layer {i} ({why})" for i, why in sorted(self.kept.items()))
        return text


def _why_kept(x: fx.Node, returned: set, saved: list) -> str:
    if x.op == "placeholder":
        return "an input of the graph, held by its caller"
    if x in returned:
        return "returned by the graph"
    if is_view(x):
        return "a view"
    if any(s is not x and view_base(s) is x for s in saved):
        return "another saved tensor is a view of it"
    value = x.meta.get("val")
    if not isinstance(value, torch.Tensor) or not value.is_contiguous():
        return "not contiguous"
    if value.device.type == "meta":
        return "on the meta device"
    return ""


def _host_value(value: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(value, device="cpu", memory_format=torch.contiguous_format)


def offload_layer_inputs(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> OffloadResult:
    """Rewrite the partitioned ``fw`` / ``bw`` graphs in place (see the module's docstring)."""
    output = fw.graph.find_nodes(op="output")[0]
    outputs = list(output.args[0])
    returned, saved = set(outputs[:num_fwd_outputs]), outputs[num_fwd_outputs:]
    calls = layer_ops(fw)
    result = OffloadResult(layers=len(calls))
    order = {n: i for i, n in enumerate(fw.graph.nodes)}
    placeholders = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    replaced = {}  # forward's saved x -> the wait node saved instead
    for k, call in enumerate(calls):
        x = call.args[1][PLANS[call.args[0]].output_like]
        if x not in saved or not isinstance(x, fx.Node) or x.name not in placeholders:
            result.kept[k] = "not saved for backward"
            continue
        why = _why_kept(x, returned, saved)
        if why:
            result.kept[k] = why
            continue
        last = max((u for u in x.users if u.op != "output"), key=order.__getitem__)
        with fw.graph.inserting_after(last):
            host = fw.graph.call_function(OFFLOAD, (x,), name=f"offload_{x.name}")
        host.meta["val"] = _host_value(x.meta["val"])
        following = [c for c in calls[k + 1:] if order[c] > order[last]]
        if following:
            with fw.graph.inserting_after(following[0]):
                waited = fw.graph.call_function(WAIT, (host, x), name=f"offloaded_{x.name}")
        else:
            with fw.graph.inserting_before(output):
                waited = fw.graph.call_function(WAIT, (host, x), name=f"offloaded_{x.name}")
        waited.meta["val"] = host.meta["val"]
        for node in (host, waited):
            node.meta["tensor_meta"] = extract_tensor_metadata(node.meta["val"])
        replaced[x] = waited
        result.offloaded += 1
    if not replaced:
        return result
    output.update_arg(0, tuple(replaced.get(n, n) if i >= num_fwd_outputs else n for i, n in enumerate(outputs)))
    _reload_in_backward(bw, {placeholders[x.name]: waited for x, waited in replaced.items()})
    fw.graph.lint()
    bw.graph.lint()
    fw.recompile()
    bw.recompile()
    return result


def _reload_in_backward(bw: fx.GraphModule, offloaded: dict) -> None:
    """Each backward placeholder of ``offloaded`` (-> the forward's wait node it now receives)
    becomes a host tensor, reloaded one layer backward ahead of its first use."""
    graph = bw.graph
    # Positions of the original nodes (the users found below are among them; the nodes inserted
    # here do not change their relative order).
    order = {n: i for i, n in enumerate(graph.nodes)}
    backwards = [n for n in graph.nodes if n.op == "call_function" and n.target is LAYER_BACKWARD]
    for old, waited in offloaded.items():
        with graph.inserting_after(old):
            host = graph.placeholder(waited.name)
        host.meta.update(waited.meta)
        device_value = old.meta["val"]
        old.replace_all_uses_with(host)
        graph.erase_node(old)
        first = min(host.users, key=order.__getitem__)
        earlier = [n for n in backwards if order[n] < order[first]]
        # Prefetch: the copy starts before the backward of the layer above (the op just before).
        with graph.inserting_before(earlier[-1] if earlier else first):
            reloaded = graph.call_function(RELOAD, (host, device_value.device), name=f"reload_{host.name}")
        with graph.inserting_before(first):
            ready = graph.call_function(WAIT, (reloaded, host), name=f"reloaded_{host.name}")
        for node in (reloaded, ready):
            node.meta["val"] = device_value
            node.meta["tensor_meta"] = extract_tensor_metadata(device_value)
        for user in list(host.users):
            if user not in (reloaded, ready):
                user.replace_input_with(host, ready)
