"""Looking through activation checkpointing (``model.gradient_checkpointing_enable()``, TRL's
default): Dynamo traces ``torch.utils.checkpoint`` as one ``tag_activation_checkpoint`` call of
a subgraph holding the whole layer, which hides its attention from the analysis.

A chunked layer recomputes itself anyway, so the wrapper is redundant there: its body is copied
into the layer's own subgraph in place of the call. Only that copy changes; a layer that is then
refused keeps its checkpointed call in the model's graph, and with it the memory saving the user
asked for.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fx_utils import refuse_side_effects
from .grad_mode import GRAD_ENABLED, grad_mode_of, is_grad_switch, switched_to


def _is_checkpoint(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.higher_order.tag_activation_checkpoint


def inline_checkpoints(gm: fx.GraphModule, mutated=frozenset()) -> bool:
    """Replace every checkpoint call in ``gm`` by the ops of its body; True if there was one.
    The body's ops are held to the same rules as any layer op: a random draw or a write in place
    inside it refuses the layer (their replay applies to the model's graph, not to bodies), and
    they run in the grad mode they ran in (``passes/grad_mode``)."""
    calls = [n for n in gm.graph.nodes if _is_checkpoint(n)]
    for call in calls:
        body_node, *operands = call.args
        body = getattr(gm, body_node.target)
        env = {}
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, operands))
        copies = []
        mode = grad_mode_of(call)
        with gm.graph.inserting_before(call):
            for node in body.graph.nodes:
                if node.op == "placeholder":
                    continue
                if is_grad_switch(node):  # a no_grad block in the body: its ops are tagged instead
                    mode = switched_to(node)
                    continue
                if node.op == "output":
                    results = node.args[0]
                    break
                if node.op == "get_attr":  # a body's own subgraph (a custom autograd function)
                    gm.add_submodule(node.target, getattr(body, node.target))
                env[node] = gm.graph.node_copy(node, lambda n: env[n])
                env[node].meta[GRAD_ENABLED] = mode
                copies.append(env[node])
        refuse_side_effects(copies, [], mutated, allow_dropout=True)
        results = results if isinstance(results, (list, tuple)) else (results,)
        for user in list(call.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(env.get(results[user.args[1]], results[user.args[1]]))
                gm.graph.erase_node(user)
        if not call.users:
            gm.graph.erase_node(call)
        if not body_node.users:
            gm.graph.erase_node(body_node)
    if calls:
        gm.graph.lint()
        gm.recompile()
    return bool(calls)
