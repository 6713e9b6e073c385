"""Per-token losses: a loss reduced over the tokens becomes a per-token loss and an explicit sum.

``cross_entropy(logits, target, reduction="sum" | "mean")`` contracts the sequence inside one op,
so the vocabulary-wide computation before it could not be chunked along the sequence. Rewritten
as ``reduction="none"`` followed by ``sum`` (and, for "mean", a division by the number of targets
that are not ``ignore_index``), the per-token part is token-wise and the head pass can take it
into its chunked region; what is left reduces a ``[tokens]`` vector. Both forms compute the same
value (PyTorch's "mean" is this sum divided by this count, label smoothing included); only the
order of the floating-point sum differs.

Only the unweighted, class-index form on ``[N, C]`` logits is rewritten; others are left as they
are (correct, just not chunked).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fx_utils import compute_example, example, fake_mode_of

_LOSSES = (F.cross_entropy, F.nll_loss)
# Positional parameters of F.cross_entropy / F.nll_loss, in order.
_PARAMETERS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")


def _bound_arguments(node: fx.Node) -> dict:
    bound = dict(zip(_PARAMETERS, node.args))
    bound.update(node.kwargs)
    return bound


def _rewritable(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _LOSSES:
        return False
    bound = _bound_arguments(node)
    logits, target = example(bound.get("input")), example(bound.get("target"))
    return (
        isinstance(logits, torch.Tensor) and logits.dim() == 2
        and isinstance(target, torch.Tensor) and target.dim() == 1 and not target.is_floating_point()
        and bound.get("weight") is None
        and bound.get("size_average") is None and bound.get("reduce") is None
        and bound.get("reduction", "mean") in ("sum", "mean")
        and isinstance(bound.get("ignore_index", -100), int)
    )


def split_token_losses(gm: fx.GraphModule) -> list[str]:
    """Rewrite in place; returns the names of the rewritten loss nodes."""
    graph = gm.graph
    rewritten, created = [], []
    mode = fake_mode_of(graph)
    for node in list(graph.nodes):
        if not _rewritable(node):
            continue
        bound = _bound_arguments(node)
        reduction = bound.pop("reduction", "mean")
        ignore_index = bound.get("ignore_index", -100)
        with graph.inserting_before(node):
            per_token = graph.call_function(node.target, (), {**bound, "reduction": "none"})
            total = graph.call_method("sum", (per_token,))
            if reduction == "mean":
                counted = graph.call_function(torch.ne, (bound["target"], ignore_index))
                count = graph.call_method("sum", (counted,))
                total = graph.call_function(torch.div, (total, count))
        for new in (per_token, total):
            new.meta = {k: v for k, v in node.meta.items() if k != "example_value"}
        created.extend(n for n in _nodes_between(per_token, node))
        node.replace_all_uses_with(total)
        graph.erase_node(node)
        rewritten.append(node.name)
    for new in created:  # example values for the new nodes only, with fake tensors like Dynamo's
        compute_example(new, mode)
    if rewritten:
        gm.recompile()
    return rewritten


def _nodes_between(first: fx.Node, stop: fx.Node) -> list[fx.Node]:
    """``first`` and the nodes after it, up to ``stop``: what was inserted before ``stop``."""
    nodes, node = [], first
    while node is not stop:
        nodes.append(node)
        node = node.next
    return nodes
