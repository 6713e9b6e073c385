"""Attention recognition inside one layer subgraph.

Two forms reach us from Hugging Face models at the torch level:
- ``scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=...)`` (sdpa and flex-free
  paths), and
- eager attention: ``matmul(q, k^T)`` -> scale / soft-cap / ``+ mask`` -> ``softmax(-1)`` ->
  dropout / cast -> ``matmul(p, v)``.

For either we return the query, key and value nodes, the mask operand (a value computed outside
the layer) and the nodes that may mix along the key axis. Everything upstream of the key and
value nodes becomes the K/V subgraph computed once per layer; the rest is the query-chunk graph.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from .errors import CannotChunk, Reason
from .fx_utils import ancestors
from .seq_dims import example, op_name, shape_of, size_hint as size_hint_of

# Ops allowed between the score matmul and the softmax, and between softmax and the value matmul.
_SCORE_CHAIN = {"mul", "truediv", "div", "add", "sub", "to", "float", "type", "type_as", "tanh", "where", "masked_fill",
                "contiguous", "cat", "concat", "concatenate", "view", "reshape"}
_PROB_CHAIN = {"to", "float", "type", "type_as", "dropout", "contiguous", "view", "reshape"}


@dataclasses.dataclass
class Attention:
    kind: str  # "sdpa" or "eager"
    node: fx.Node  # the sdpa node, or the value matmul of eager attention
    query: fx.Node
    key: fx.Node
    value: fx.Node
    # Operands from outside the layer that mask or bias the scores, as (node, how it is used):
    # "keep" (True/nonzero lets a key through, or added to the scores), "drop" (True hides a key:
    # masked_fill's condition, where()'s with the scores second), "subtract" (subtracted).
    masks: list
    mask_user: Optional[fx.Node]  # the node consuming the last of them (sdpa, or the add/where)
    is_causal: bool  # sdpa's is_causal flag (then there is no mask operand)
    mixing_nodes: frozenset  # nodes allowed to reduce/contract over the key axis
    dropout_p: object  # sdpa dropout_p argument (float or node)
    grouped_query_replication: bool = False  # key/value enter sdpa through repeat_kv


def is_repeat_kv(operand: fx.Node, source: fx.Node) -> bool:
    """``operand`` is ``source[:, :, None].expand(B, Hkv, rep, S, D).reshape(B, Hkv*rep, S, D)``,
    i.e. each key/value head repeated ``rep`` times in a row: what sdpa's ``enable_gqa`` does."""
    chain = []
    node = operand
    while node is not source:
        chain.append(node)
        node = node.args[0]
    names = [op_name(n) for n in reversed(chain) if op_name(n) != "contiguous"]
    if names != ["getitem", "expand", "reshape"]:
        return False
    index = next(n for n in reversed(chain) if op_name(n) == "getitem").args[1]
    src, out = shape_of(source), shape_of(operand)
    return (
        isinstance(index, tuple) and len(index) == 5 and index[2] is None
        and len(src) == 4 and len(out) == 4
        and src[0] == out[0] and src[2:] == out[2:]
        and size_hint_of(out[1]) % size_hint_of(src[1]) == 0
    )


def _key_before_transpose(scores: fx.Node, key_operand: fx.Node) -> fx.Node:
    """The key ``(.., T, head_dim)`` of ``scores = q @ key_operand``. A key that enters in
    another form (GPT-1's ``k.permute(0, 2, 3, 1)``) gets a transpose of its own inserted,
    ``key_operand.transpose(-2, -1)``, which the score matmul then reads transposed back."""
    if op_name(key_operand) == "transpose":
        return _strip_transpose(key_operand)
    graph = scores.graph
    with graph.inserting_before(scores):
        key = graph.call_method("transpose", (key_operand, -2, -1))
        operand = graph.call_method("transpose", (key, -2, -1))
    value = example(key_operand)
    key.meta = dict(key_operand.meta, example_value=value.transpose(-2, -1))
    operand.meta = dict(key_operand.meta, example_value=value)
    scores.replace_input_with(key_operand, operand)
    return key


def _strip_transpose(node: fx.Node) -> fx.Node:
    """``k.transpose(-2, -1)`` -> ``k``: the key of eager attention enters transposed."""
    if op_name(node) == "transpose":
        ndim = len(shape_of(node))
        if sorted(d % ndim for d in node.args[1:3]) == [ndim - 2, ndim - 1]:
            return node.args[0]
    raise CannotChunk(Reason.NO_ATTENTION, f"{node.name}: key operand of the score matmul is not a transpose")


_REPLICATION = {"reshape", "view", "expand", "unsqueeze", "contiguous", "getitem"}


def _before_replication(node: fx.Node) -> fx.Node:
    """Walk back from a key/value operand over grouped-query replication (``repeat_kv``:
    index with None, expand, reshape) to the un-replicated tensor.

    K/V are kept whole for a layer's backward, with their gradients: cutting before the
    replication keeps them at the number of key/value heads. The replication ops then run per
    chunk on the prefix, inside the query-chunk graph (and the analysis checks them there).
    """
    while op_name(node) in _REPLICATION and len(node.users) == 1:
        if op_name(node) == "getitem":
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if not all(i is None or i == slice(None) or i is Ellipsis for i in index):
                break
        source = node.args[0]
        if not isinstance(source, fx.Node) or len(source.users) != 1:
            break
        node = source
    return node


def _sdpa(node: fx.Node) -> Attention:
    args = list(node.args) + [None] * (7 - len(node.args))
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"]
    bound = {name: node.kwargs.get(name, args[i]) for i, name in enumerate(names)}
    if bound["dropout_p"] is None:
        bound["dropout_p"] = 0.0
    if node.kwargs.get("enable_gqa"):
        pass  # grouped keys stay grouped; the key axis is still dim -2
    key, value = _before_replication(bound["key"]), _before_replication(bound["value"])
    return Attention(
        kind="sdpa",
        node=node,
        query=bound["query"],
        key=key,
        value=value,
        masks=[(bound["attn_mask"], "keep")] if bound["attn_mask"] is not None else [],
        mask_user=node if bound["attn_mask"] is not None else None,
        is_causal=bool(bound["is_causal"]),
        mixing_nodes=frozenset({node}),
        dropout_p=bound["dropout_p"],
        grouped_query_replication=is_repeat_kv(bound["key"], key) and is_repeat_kv(bound["value"], value)
        and not node.kwargs.get("enable_gqa"),
    )


_KEY_REDUCTIONS = {"max", "amax", "logsumexp"}


def _key_reduction(node: fx.Node, source: Optional[fx.Node] = None) -> Optional[list]:
    """The nodes of ``source.max(-1, keepdim)[0]`` / ``amax(-1)`` / ``logsumexp(-1)``: a reduction
    over the keys that masked keys (at the dtype's minimum, or -inf) do not change, so it is the
    same over the chunk's key prefix as over every key. None if ``node`` is not one."""
    nodes = [node]
    if op_name(node) == "getitem" and node.args[1] == 0 and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        nodes.append(node)
    if op_name(node) not in _KEY_REDUCTIONS or not node.args or (source is not None and node.args[0] is not source):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    ndim = len(shape_of(node.args[0]) or ())
    if not isinstance(dim, int) or dim % max(ndim, 1) != ndim - 1:
        return None
    if op_name(node) == "max" and op_name(nodes[0]) != "getitem":
        return None
    return nodes


def _eager(softmax: fx.Node, layer_inputs: set) -> Optional[Attention]:
    """The eager attention around ``softmax``, or None if it is some other softmax.

    Walks from the softmax back to the score matmul over scaling, soft-capping, casts, the mask
    and attention sinks (a learned per-head logit joined to the keys, ``cat([scores, sinks],
    -1)``, dropped again after the softmax), and a stable softmax's ``scores - scores.max(-1)``;
    then forward to the value matmul. Reductions over the keys of the masked scores elsewhere in
    the layer (a sink's ``logsumexp``) are part of the attention too."""
    chain = [softmax]
    extra: list[fx.Node] = []
    masks, mask_user, sinks = [], None, []
    node = softmax.args[0]
    while op_name(node) in _SCORE_CHAIN or _clamps_from_below(node):
        chain.append(node)
        if op_name(node) in ("cat", "concat", "concatenate"):
            pieces = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            ndim = len(shape_of(node))
            if not isinstance(pieces, (list, tuple)) or len(pieces) < 2 or dim % ndim != ndim - 1:
                return None
            sinks.extend(pieces[1:])
            node = pieces[0]
            continue
        inputs = node.all_input_nodes
        reductions = [a for a in inputs for b in inputs if b is not a and _key_reduction(a, b)]
        for reduction in reductions:
            extra.extend(_key_reduction(reduction))
        rest = [a for a in inputs if a not in reductions]
        scores_in = [a for a in rest if not from_outside(a, layer_inputs)]
        if op_name(node) in ("add", "where", "masked_fill", "sub"):
            for other in rest:
                if other not in scores_in and _made_of_inputs(other):
                    masks.append((other, _mask_use(node, other, scores_in)))
                    mask_user = mask_user or node
        if not scores_in:
            return None
        node = scores_in[0]
    if op_name(node) not in ("matmul", "bmm", "baddbmm"):
        return None  # a softmax that is not attention (a router, say): an ordinary op
    scores = node
    chain.append(scores)
    if op_name(scores) == "baddbmm":  # bias + q @ k^T: ALiBi's per-key bias (BLOOM)
        bias = scores.kwargs.get("input", scores.args[0] if scores.args else None)
        query_operand = scores.kwargs.get("batch1", scores.args[1] if len(scores.args) > 1 else None)
        key_operand = scores.kwargs.get("batch2", scores.args[2] if len(scores.args) > 2 else None)
        if not (isinstance(bias, fx.Node) and from_outside(bias, layer_inputs)):
            return None
        if _made_of_inputs(bias):  # not a constant (GPT-NeoX-Japanese's zeros)
            masks.append((bias, "keep"))
            mask_user = mask_user or scores
    else:
        query_operand, key_operand = scores.args[0], scores.args[1]
    if any(scores in ancestors(sink) for sink in sinks):
        return None  # a joined operand computed from the scores is no sink
    users = list(softmax.users)
    probs = softmax
    while len(users) == 1 and (op_name(users[0]) in _PROB_CHAIN or sinks and _drops_last_keys(users[0])
                               or _masks_probabilities(users[0], probs, layer_inputs)):
        if op_name(users[0]) in ("masked_fill", "where", "mul"):  # zeroing fully masked rows (CPM-Ant)
            masks.extend((a, _mask_use(users[0], a, [probs])) for a in users[0].all_input_nodes
                         if a is not probs and _made_of_inputs(a))
        probs = users[0]
        chain.append(probs)
        users = list(probs.users)
    if len(users) != 1 or op_name(users[0]) not in ("matmul", "bmm") or users[0].args[0] is not probs:
        return None
    out = users[0]
    chain.append(out)
    # Other reductions over the keys of the masked scores (after the mask, before the softmax).
    masked = chain[1:chain.index(mask_user) + 1] if mask_user in chain else []
    for node in masked:
        for user in node.users:
            if user in chain:
                continue
            # ``max`` returns (values, indices): the reduction is read through its getitem.
            for candidate in list(user.users) if op_name(user) == "max" else [user]:
                extra.extend(_key_reduction(candidate, node) or [])
    return Attention(
        kind="eager" + (" with sinks" if sinks else ""),
        node=out,
        query=query_operand,
        key=_before_replication(_key_before_transpose(scores, key_operand)),
        value=_before_replication(out.args[1]),
        masks=masks,
        mask_user=mask_user,
        is_causal=False,
        mixing_nodes=frozenset(chain + extra),
        dropout_p=0.0,
    )


def _clamps_from_below(node: fx.Node) -> bool:
    """``torch.max(scores, torch.full((), finfo.min))`` (XGLM): an elementwise maximum with a
    constant, not a reduction over the keys."""
    if op_name(node) not in ("max", "maximum") or len(node.args) != 2 or node.kwargs:
        return False
    other = node.args[1]
    return isinstance(other, fx.Node) and isinstance(example(other), torch.Tensor) and not _made_of_inputs(other)


def _mask_use(user: fx.Node, mask: fx.Node, scores: list) -> str:
    """How ``user`` applies ``mask`` to the scores (or probabilities): see ``Attention.masks``."""
    name = op_name(user)
    if name == "masked_fill":
        return "drop"
    if name == "where":
        condition = user.args[0] if user.args else user.kwargs.get("condition")
        if condition is not mask:
            return "other"  # the mask is a fill value, not a condition: not understood
        kept = user.args[1] if len(user.args) > 1 else user.kwargs.get("input")
        return "keep" if kept in scores else "drop"
    if name == "sub":
        return "subtract" if user.args[1] is mask else "other"
    return "keep"  # add, mul


def _made_of_inputs(node: fx.Node) -> bool:
    """Whether a value is computed from some layer input's data (a mask), not a constant."""
    return any(n.op == "placeholder" for n in ancestors(node, data_only=True))


def _masks_probabilities(node: fx.Node, probs: fx.Node, layer_inputs: set) -> bool:
    """``probs.masked_fill(mask == 0, 0)``, ``where(mask, probs, 0)``, ``probs * mask`` with a mask
    from outside: the probabilities of masked keys set to zero after the softmax."""
    if op_name(node) not in ("masked_fill", "where", "mul") or probs not in node.all_input_nodes:
        return False
    others = [a for a in node.all_input_nodes if a is not probs]
    return bool(others) and all(from_outside(a, layer_inputs) for a in others)


def _drops_last_keys(node: fx.Node) -> bool:
    """``probs[..., :-n]``: the sink columns dropped after the softmax."""
    if op_name(node) != "getitem" or not isinstance(node.args[1], tuple):
        return False
    index = node.args[1]
    return (len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)
            and index[1].start in (None, 0) and index[1].step in (None, 1)
            and isinstance(index[1].stop, int) and index[1].stop < 0)


def from_outside(node: fx.Node, layer_inputs: set) -> bool:
    """True if ``node`` is a layer input or derived from layer inputs without the hidden state."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if n not in layer_inputs and isinstance(example(n), torch.Tensor):  # sizes (``s16``) are not data
                return False
            continue
        stack.extend(n.all_input_nodes)
    return True


def find_attentions(gm: fx.GraphModule, mask_candidates: set, is_seq_sized=None) -> list[Attention]:
    """The attentions of a layer subgraph, in graph order: one, or several over the same
    sequence (differential attention: two softmaxes of one query and key, each with its value).
    ``mask_candidates``: placeholders that may be masks. With ``is_seq_sized``, a softmax of
    ``q @ k^T`` whose keys are not the sequence's (Inkling's mixing of a few slots within each
    token) is no attention over the sequence: ordinary ops, analysed as any other."""
    found = []
    for node in gm.graph.nodes:
        name = op_name(node)
        if name == "scaled_dot_product_attention":
            found.append(_sdpa(node))
        elif name in ("softmax", "_softmax") and node.op in ("call_function", "call_method"):
            attention = _eager(node, mask_candidates)
            keys = shape_of(attention.key) if attention is not None else None
            if keys and is_seq_sized is not None and not (len(keys) >= 2 and is_seq_sized(keys[-2])):
                continue
            if attention is not None:
                found.append(attention)
    if not found:
        raise CannotChunk(Reason.NO_ATTENTION)
    return found
