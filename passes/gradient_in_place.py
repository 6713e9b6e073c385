"""Each layer's input gradient written over its incoming gradient, in AOTAutograd's backward graph.

A layer's backward holds the gradient it receives (``dy``, tokens x hidden) and builds the
gradient of its input (``dx``, the same shape) beside it, though chunk ``c`` of ``dy`` is dead
once chunk ``c``'s backward has run and ``dx``'s chunk ``c`` is first written right then. Where
nothing else reads ``dy``, ``streambp::layer_backward`` becomes
``streambp::layer_backward_into_grad_output``, which writes ``dx`` into ``dy``'s memory: one
tokens x hidden tensor fewer at every layer's peak.

Like ``passes/offload.py`` this runs on a partitioned graph (the backward, before the eager inner
compiler runs it), since only there is it known who else reads ``dy``. It is left out where:

- ``dy`` is a graph input (the caller holds it) or not memory of its own (a view: its base may be
  read elsewhere), or anything but this op reads it, or the graph returns it;
- the hidden-state input needs no gradient, is sliced otherwise than the output, or is summed in
  float32 beside a bfloat16/float16 ``dy`` (``LayerPlan.gradient_fits_over_incoming``).
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from sbp_compiler.runtime import PLANS

from .fx_utils import is_view, owns_its_memory

LAYER_BACKWARD = torch.ops.streambp.layer_backward.default
INTO_GRAD_OUTPUT = torch.ops.streambp.layer_backward_into_grad_output.default


@dataclasses.dataclass
class GradientInPlaceResult:
    rewritten: int = 0
    layers: int = 0

    def describe(self) -> str:
        return (f"{self.rewritten} of {self.layers} layer backward(s) write their input gradient over "
                "the incoming gradient")


def _why_not(node: fx.Node, grad: fx.Node, order: dict) -> str:
    plan = PLANS[node.args[0]]
    tensors, needs_grad = node.args[1], node.args[4]
    if not isinstance(grad, fx.Node) or not owns_its_memory(grad):
        return "the incoming gradient is a graph input or a view"
    # Readers before the op see dy, as before; after it, dx: only the op's own input-gradient
    # users may come after (they are rewired to read it there). A reader before it must not be
    # a view, whose later readers would see dx.
    for user in grad.users:
        if user is not node and (user.op == "output" or order[user] > order[node] or is_view(user)):
            return "the incoming gradient is read elsewhere"
    if grad in tensors:
        return "the incoming gradient is an input of the layer"
    values = [t.meta.get("val") if isinstance(t, fx.Node) else t for t in tensors]
    incoming = grad.meta.get("val")
    if not all(isinstance(v, torch.Tensor) for v in (incoming, values[plan.output_like])):
        return "no example values"
    if not plan.gradient_fits_over_incoming(values, incoming, needs_grad):
        return "the input gradient does not fit over the incoming one"
    return ""


def write_gradients_over_incoming(bw: fx.GraphModule) -> GradientInPlaceResult:
    """Rewrite ``bw`` in place (see the module's docstring)."""
    graph = bw.graph
    calls = graph.find_nodes(op="call_function", target=LAYER_BACKWARD)
    result = GradientInPlaceResult(layers=len(calls))
    order = {n: i for i, n in enumerate(graph.nodes)}  # the new nodes take their old nodes' places
    for node in calls:
        grad = node.args[3]
        if _why_not(node, grad, order):
            continue
        like = PLANS[node.args[0]].output_like
        with graph.inserting_before(node):
            new = graph.call_function(INTO_GRAD_OUTPUT, node.args, node.kwargs)
        new.meta.update(node.meta)
        order[new] = order[node]
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        # The input gradient is now read from the incoming gradient's node, after the op.
        for user in list(new.users):
            if user.target is operator.getitem and user.args[1] == like:
                user.replace_all_uses_with(grad)
                graph.erase_node(user)
        result.rewritten += 1
    if result.rewritten:
        graph.lint()
        bw.recompile()
    return result
