"""Keys selected from the layer's own data: a sparse-attention indexer (DeepSeek-V3.2's DSA,
GLM-5's) scores every key for each query with a light second attention, ``q_idx @ k_idx^T``,
masks it causally and keeps the ``topk`` keys; the attention's mask is then the causal mask
``&`` those keys.

A chunk cannot take that top-k over its key prefix only: ``topk`` breaks ties (a ReLU'd score
is often exactly zero) by where the tied keys lie in the whole row, so a shorter row picks
other keys. A layer with such a selection is chunked with every key instead of the prefix
(``LayerSplit.full_keys``): each chunk computes eager's very rows, whatever the masks, and only
its queries are cut to the chunk. The indexer's key joins the K/V graph, computed once per
layer like the attention's.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch.fx as fx

from .attention import from_outside
from .seq_dims import op_name, shape_of

# Ops between the score matmul and the top-k that keep one row of scores per query: scaling,
# ReLU, masks, the per-head weighting ``weights @ scores`` (the scores are its right operand).
_SELECTION_CHAIN = frozenset("mul truediv div add sub relu to float type masked_fill where squeeze unsqueeze "
                             "contiguous sum matmul".split())
_KEY_CASTS = frozenset("to float type unsqueeze contiguous".split())


@dataclasses.dataclass
class KeySelection:
    topk: fx.Node
    scores: fx.Node  # the matmul q @ k^T
    key: fx.Node  # (.., T, dim): what the K/V graph computes


def _key_of(operand: fx.Node, is_seq_sized) -> Optional[fx.Node]:
    """``k`` of a score matmul's right operand ``k.transpose(-1, -2)`` (through casts and
    unsqueezes), if ``k`` runs along the sequence at dim -2; else None."""
    node = operand
    while op_name(node) in _KEY_CASTS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if op_name(node) != "transpose":
        return None
    ndim = len(shape_of(node) or ())
    if ndim < 2 or sorted(d % ndim for d in node.args[1:3]) != [ndim - 2, ndim - 1]:
        return None
    key = node.args[0]
    shape = shape_of(key)
    return key if shape is not None and len(shape) >= 2 and is_seq_sized(shape[-2]) else None


def _selection(topk: fx.Node, layer_inputs: set, is_seq_sized) -> Optional[KeySelection]:
    scores_in = topk.args[0]
    shape = shape_of(scores_in)
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    if shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1 or not is_seq_sized(shape[-1]):
        return None
    node = scores_in
    while op_name(node) in _SELECTION_CHAIN:
        if op_name(node) == "matmul":
            right = node.args[1]
            key = _key_of(right, is_seq_sized)
            if key is not None:
                return KeySelection(topk=topk, scores=node, key=key)
            node = right  # weights @ scores: follow the scores
            continue
        # The operand carrying the keys along its last dim: the scores, not a mask from outside.
        rows = [a for a in node.all_input_nodes
                if (s := shape_of(a)) is not None and len(s) >= 1 and is_seq_sized(s[-1])
                and not from_outside(a, layer_inputs)]
        if len(rows) != 1:
            return None
        node = rows[0]
    return None


def find_key_selections(gm: fx.GraphModule, layer_inputs: set, is_seq_sized) -> list[KeySelection]:
    """Every ``topk`` over the keys of a score matmul in the layer, in graph order.
    ``layer_inputs``: the placeholders a mask may come from (see ``find_attentions``)."""
    found = []
    for node in gm.graph.nodes:
        if op_name(node) == "topk" and isinstance(node.args[0], fx.Node):
            selection = _selection(node, layer_inputs, is_seq_sized)
            if selection is not None:
                found.append(selection)
    return found
