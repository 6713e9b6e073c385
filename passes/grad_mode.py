"""Grad mode inside the regions we rewrite: ``with torch.no_grad():`` blocks in a layer (a
sparse-attention indexer's top-k, router statistics) or in a loss (per-token weights).

Dynamo records such a block as ``torch._C._set_grad_enabled(False) ... (True)`` calls that no
value depends on, so a region made of the ops a value needs leaves them behind. Recomputing a
chunk with autograd through ops eager ran without it sends gradients through values eager
treats as constants: a silent wrong gradient. So every node is tagged with the grad mode it
runs in (``record_grad_modes``), and every graph made from a region's ops switches to the mode
each op had (``reproduce_grad_modes``). Switches there are relative: the runtime runs a chunk
under ``no_grad`` in forward and with autograd in backward, so "on" means the mode the chunk
was entered with, never a literal ``True``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .errors import CannotChunk, Reason

GRAD_ENABLED = "streambp_grad_enabled"  # node.meta key: the grad mode the node runs in


def is_grad_switch(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch._C._set_grad_enabled


def switched_to(switch: fx.Node):
    """The mode a switch sets: its literal value, or None where it is computed."""
    return switch.args[0] if switch.args and isinstance(switch.args[0], bool) else None


def record_grad_modes(graph: fx.Graph) -> None:
    """Tag every node with the grad mode it runs in. The graph starts in the mode it was traced
    in (Dynamo guards on it, so it is the mode now, at compile time); a switch whose value is
    not a literal leaves the mode unknown (None), which ``reproduce_grad_modes`` refuses."""
    mode = torch.is_grad_enabled()
    for node in graph.nodes:
        node.meta[GRAD_ENABLED] = mode
        if is_grad_switch(node):
            mode = switched_to(node)


def grad_mode_of(node: fx.Node, untagged=True):
    """The tagged mode; ``untagged`` for nodes made by a pass since (rescaled sizes)."""
    return node.meta.get(GRAD_ENABLED, untagged)


def reproduce_grad_modes(gm: fx.GraphModule, call_mode: bool = True) -> bool:
    """Insert switches into ``gm`` so that each of its nodes runs in its tagged grad mode.
    ``call_mode``: the mode the op made of ``gm`` is called in; nodes tagged with it run in the
    mode ``gm`` is entered with (no_grad in a chunk's forward, autograd in its recompute), the
    others without autograd, and the mode is back at the end. True if any switch was needed."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    modes = {n: grad_mode_of(n, untagged=call_mode) for n in nodes}
    unknown = [n for n in nodes if modes[n] is None]
    if unknown:
        raise CannotChunk(Reason.UNKNOWN_OP, f"{unknown[0].name} runs in a grad mode set from a computed value")
    enabled_inside = [n for n in nodes if modes[n] and not call_mode]
    if enabled_inside:
        raise CannotChunk(Reason.UNKNOWN_OP, f"{enabled_inside[0].name} runs with autograd where the region "
                          "around it runs without")
    if all(modes[n] == call_mode for n in nodes):
        return False
    graph = gm.graph
    with graph.inserting_before(nodes[0]):
        entry = graph.call_function(torch.is_grad_enabled, ())
    entry.meta["example_value"] = True
    enabled = True
    for node in nodes + [next(n for n in graph.nodes if n.op == "output")]:
        wanted = node.op == "output" or modes[node] == call_mode
        if wanted != enabled:
            with graph.inserting_before(node):
                graph.call_function(torch._C._set_grad_enabled, (entry if wanted else False,))
            enabled = wanted
    gm.recompile()
    return True


def without_gradient_path(gm: fx.GraphModule) -> set:
    """Placeholders of ``gm`` that its output does not depend on through any op run with
    autograd (weights used only under ``no_grad``, an indexer's): eager leaves their ``.grad``
    None, so the op must not hand them a gradient of zeros (an optimizer would decay them)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    connected, stack = set(), list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in connected:
            continue
        connected.add(node)
        if node.op != "placeholder" and grad_mode_of(node):
            stack.extend(node.all_input_nodes)
    return {n for n in gm.graph.nodes if n.op == "placeholder" and n not in connected}
