"""Split one decoder layer into a K/V graph and a query-chunk graph (DESIGN §1).

- K/V graph: ``(*layer_inputs, full_len, chunk_len) -> (key, value)``, the ancestors of the
  attention's key and value operands; token-wise, so the runtime computes the whole sequence's
  K/V once per layer chunk by chunk (and backpropagates dK/dV the same way).
- Query-chunk graph: ``(*layer_inputs, key_prefix, value_prefix, [chunk_mask,] full_len, q_len,
  kv_len) -> output chunk``: the layer with the key/value operands replaced by the prefix computed
  once and the mask replaced by the chunk's mask. An ``is_causal`` sdpa over the prefix becomes
  ``prefix_sdpa`` (``sbp_compiler/prefix_attention.py``), which runs a causal chunk without a
  mask; a ``chunk_mask`` input is left only where every chunk sees every key (``full_keys``). The runtime passes the sequence inputs sliced
  to the query chunk; the analysis labels every dim of the graph ``Q`` (query axis) or ``K`` (key
  axis), proves that only the attention mixes positions, and the shape arguments are rescaled to
  the chunk's lengths.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from sbp_compiler.prefix_attention import prefix_sdpa

from .attention import Attention, find_attentions
from .key_selection import find_key_selections
from .errors import CannotChunk, Reason
from .find_layers import placeholders_for
from .grad_mode import reproduce_grad_modes
from .fx_utils import ancestors, eliminate_dead_code
from .rescale import rescale_shape_arguments
from .seq_dims import SeqDimAnalysis, UNKNOWN, example, is_plain, op_name, shape_of

Q, K = "Q", "K"


@dataclasses.dataclass
class LayerSplit:
    kv_graph: fx.GraphModule
    query_graph: fx.GraphModule
    attentions: list[Attention]  # one, or several over the same sequence (differential attention)
    kv_nodes: list[fx.Node]  # what the K/V graph computes, in order: each attention's key and value
    query_slice_dims: list  # per layer input: the dim sliced to the query chunk, or None
    mask_inputs: list  # layer input indices of the masks and score biases, rebuilt per chunk
    mask_visibility: list  # per mask input: how its values say a key is visible (see _mask_roots)
    # sdpa's is_causal over all keys (``full_keys``): the runtime passes a causal chunk mask. Over
    # the prefix the query graph is lower-right causal by itself (``prefix_sdpa``).
    synthesize_causal_mask: bool
    kv_seq_dim: int  # sequence dim of the key/value operands
    output_seq_dim: int
    dropout_sources: list  # layer input indices whose .item() is a dropout probability
    rescaled_arguments: int
    # Why every chunk sees every key instead of its prefix ("" if it does not): keys selected by
    # top-k (``passes/key_selection``), or a mask whose construction is not understood.
    full_keys: str = ""


def _dropout_probability_sources(gm: fx.GraphModule, attention: Attention, placeholders: list) -> list:
    """Layer inputs whose value sets a dropout probability (Dynamo lifts module floats as tensors).

    Literal probabilities > 0 are refused here; lifted ones are checked by the runtime each call.
    """
    sources = []
    probabilities = [attention.dropout_p]
    for node in gm.graph.nodes:
        if op_name(node) == "dropout":
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            if training is not False:
                probabilities.append(p)
    for p in probabilities:
        if isinstance(p, (int, float)):
            if p > 0:
                raise CannotChunk(Reason.DROPOUT, f"p={p}")
            continue
        # p = placeholder.item()
        if op_name(p) == "item" and p.args[0] in placeholders:
            sources.append(placeholders.index(p.args[0]))
        else:
            raise CannotChunk(Reason.DROPOUT, f"dropout probability computed by {p.name}")
    return sources


# Ops a mask may go through inside the layer on its way to the scores, keeping which keys it
# lets through: casts, views, slices (``mask[..., : key.shape[-2]]``).
_MASK_PASSING = frozenset("to float double half bfloat16 bool int long type_as contiguous clone view reshape expand "
                          "expand_as unsqueeze squeeze getitem".split())
_MASK_FLIPPING = frozenset("invert logical_not bitwise_not".split())


def _literal_tensor(node: fx.Node):
    """The value of ``torch.tensor(<bool or int literal>)``, else None."""
    if op_name(node) == "tensor" and len(node.args) == 1 and isinstance(node.args[0], (bool, int)):
        return node.args[0]
    return None


def _mask_roots(masks: list, candidates: set) -> list:
    """(layer input, how its values say a key is visible) for every mask operand: the input
    itself, or the input it is computed from inside the layer through casts, views, slices and
    comparisons with 0/1 (``mask == False``, ``~mask``); those ops run on the rebuilt chunk masks
    in the query-chunk graph. How a key is visible — "nonzero", "zero", or "above_min" for an
    additive float mask — is what the run-time causality check needs: a mask applied with
    ``masked_fill`` hides where it is True, one passed to sdpa shows where it is True."""
    roots = []
    for mask, use in masks:
        if use not in ("keep", "drop"):
            raise CannotChunk(Reason.MASK_UNSUPPORTED, f"mask operand {mask.name} is applied in a way not understood")
        node, flipped, compared = mask, use == "drop", False
        while node not in candidates:
            name = op_name(node)
            tensors = [a for a in node.all_input_nodes if isinstance(example(a), torch.Tensor)]
            literals = {a: _literal_tensor(a) for a in tensors}
            if name in ("eq", "ne") and len(tensors) == 2 and any(v is not None for v in literals.values()):
                tensors = [a for a in tensors if literals[a] is None]  # ``mask == torch.tensor(False)`` (CPM-Ant)
            if len(tensors) != 1 or node.op == "placeholder":
                raise CannotChunk(Reason.MASK_UNSUPPORTED,
                                  f"mask operand {mask.name} is computed inside the layer by {node.name} ({name})")
            if name in _MASK_FLIPPING:
                flipped = not flipped
            elif name in ("eq", "ne"):
                other = node.args[1] if node.args[0] is tensors[0] else node.args[0]
                other = literals.get(other, other) if isinstance(other, fx.Node) else other
                if isinstance(other, fx.Node) or other not in (0, 1, True, False):
                    raise CannotChunk(Reason.MASK_UNSUPPORTED, f"{node.name}: a mask compared with {other!r}")
                flipped ^= (name == "eq") == (other in (0, False))
                compared = True
            elif name not in _MASK_PASSING:
                raise CannotChunk(Reason.MASK_UNSUPPORTED,
                                  f"mask operand {mask.name} is computed inside the layer by {node.name} ({name})")
            node = tensors[0]
        operand = example(mask)
        if not compared and operand.is_floating_point() and use == "keep":
            how = "above_min"  # added to the scores
        else:
            how = "zero" if flipped else "nonzero"
        for root, seen in roots:
            if root is node and seen != how:
                raise CannotChunk(Reason.MASK_UNSUPPORTED, f"{node.name} masks the scores in two opposite ways")
        if all(root is not node for root, _ in roots):
            roots.append((node, how))
    return roots


def _sequence_mixer(layer_gm: fx.GraphModule, placeholders, input_labels, seq_length: int) -> str:
    """What mixes positions in a layer without attention (an SSM scan, a convolution, a linear
    attention), named by its op and the module it runs in: the refusal's detail."""
    analysis = SeqDimAnalysis(seq_length=seq_length, lenient=True)
    analysis.run(list(layer_gm.graph.nodes), _initial(placeholders, input_labels, lambda i, l, _: l))
    for node, cause in analysis.unknown_causes.items():
        if any(arg in analysis.unknown_causes for arg in node.all_input_nodes):
            continue  # not where it starts
        # The innermost module of the model, past the modules reached through a global: the
        # ``Func`` wrappers transformers >= 5.25 puts around kernel functions (a causal conv1d).
        stack = [module for path, module in (node.meta.get("nn_module_stack") or {}).values()
                 if not str(path).startswith("G[")]
        module = stack[-1] if stack else None
        module_name = getattr(module, "__name__", str(module).rsplit(".", 1)[-1].rstrip("'>")) if module else "the layer"
        return f"its sequence mixer is {module_name}: {cause}"[:400]
    return "no op mixes positions"


def split_layer(layer_gm: fx.GraphModule, input_labels: list, is_seq_sized, dynamic: bool, seq_length: int,
                call_mode: bool = True) -> LayerSplit:
    """``input_labels``: per layer input, its dims labelled ``"S"`` where they run along the sequence.
    ``call_mode``: the grad mode the layer's op is called in (see ``grad_mode.reproduce_grad_modes``).

    ``is_seq_sized``/``dynamic``: see ``SeqDimAnalysis``; with a dynamic length every
    sequence-sized dim must be explained by the analysis.
    """
    placeholders = [n for n in layer_gm.graph.nodes if n.op == "placeholder"]
    for node, labels in zip(placeholders, input_labels):
        if labels == UNKNOWN:
            raise CannotChunk(Reason.LAYER_INPUT_UNKNOWN, f"{node.name}: produced by an op without a rule")
    mask_candidates = {p for p, l in zip(placeholders, input_labels) if isinstance(l, tuple) and "S" in l}
    try:
        attentions = find_attentions(layer_gm, mask_candidates, is_seq_sized)
    except CannotChunk as refusal:
        if refusal.reason is Reason.NO_ATTENTION and not refusal.detail:
            raise CannotChunk(Reason.NO_ATTENTION, _sequence_mixer(layer_gm, placeholders, input_labels, seq_length)) from None
        raise

    # Masks (.., T, T) and score biases along the keys (ALiBi's (.., 1, T)) are rebuilt per chunk.
    # Several attentions must be masked alike: the run-time causality check looks at the masks
    # of a chunk together.
    selections = find_key_selections(layer_gm, mask_candidates, is_seq_sized)
    full_keys = "keys selected by top-k" if selections else ""
    attention = attentions[0]
    if not full_keys:
        try:
            roots = [_mask_roots(a.masks, mask_candidates) for a in attentions]
        except CannotChunk as refusal:
            # Which keys such a mask hides is not known (GPT-1's ``w * b - 1e4 * (1 - b)``): the
            # chunks see every key, and so eager's rows whatever the mask.
            full_keys = f"a mask computed in the layer: {refusal.detail}"
        else:
            named = [sorted((node.name, how) for node, how in r) for r in roots]
            if any(n != named[0] for n in named[1:]) or len({a.is_causal for a in attentions}) > 1:
                raise CannotChunk(Reason.MULTIPLE_ATTENTION,
                                  f"{', '.join(a.node.name for a in attentions)} are masked differently")
    if full_keys:
        # Every key in every chunk: the masks are rebuilt over all keys, and since no causality
        # is assumed, none is checked. Masks: the (.., T, T) inputs, and the (.., T) ones a mask
        # operand is made from (a padding bias along the keys).
        behind_masks = set().union(*(ancestors(m) for a in attentions for m, _ in a.masks))
        roots = [[(p, "above_min") for p, l in zip(placeholders, input_labels)
                  if isinstance(l, tuple) and (l.count("S") == 2 and l[-2:] == ("S", "S")
                                               or l.count("S") == 1 and l[-1] == "S" and p in behind_masks)]]
    mask_inputs, mask_visibility = [], []
    for mask, visible in roots[0]:
        index = placeholders.index(mask)
        mask_labels = input_labels[index]
        if mask_labels.count("S") == 2 and mask_labels[-2:] != ("S", "S") or mask_labels.count("S") == 1 and mask_labels[-1] != "S":
            raise CannotChunk(Reason.MASK_UNSUPPORTED,
                              f"the attention's mask is computed from {mask.name}, whose sequence axes are not a "
                              "mask's last dims (a mask that depends on the layer's own data, as a sparse-attention "
                              "indexer's top-k keys, is not rebuilt per chunk)")
        if index not in mask_inputs:
            mask_inputs.append(index)
            mask_visibility.append(visible)
    if not mask_inputs and not attention.is_causal:
        raise CannotChunk(Reason.NOT_CAUSAL, "attention without mask and without is_causal")
    for i, (p, labels) in enumerate(zip(placeholders, input_labels)):
        if isinstance(labels, tuple) and labels.count("S") > 1 and i not in mask_inputs:
            raise CannotChunk(Reason.LAYER_INPUT_UNKNOWN, f"{p.name} has {labels.count('S')} sequence dims")

    dropout_sources = sorted({i for a in attentions for i in _dropout_probability_sources(layer_gm, a, placeholders)})
    # Each attention's key and value, and each selection's key; shared ones once.
    kv_nodes = list(dict.fromkeys([n for a in attentions for n in (a.key, a.value)] + [s.key for s in selections]))
    kv_graph, kv_seq_dim = _kv_graph(layer_gm, kv_nodes, placeholders, input_labels, is_seq_sized, dynamic, seq_length)
    query_graph, output_seq_dim, rescaled = _query_graph(layer_gm, attentions, kv_nodes, placeholders, input_labels,
                                                         kv_seq_dim, is_seq_sized, dynamic, seq_length, mask_inputs,
                                                         {s.key for s in selections}, bool(full_keys))
    # A no_grad block inside the layer stays one in both graphs (``passes/grad_mode``).
    reproduce_grad_modes(kv_graph, call_mode)
    reproduce_grad_modes(query_graph, call_mode)
    query_slice_dims = [
        labels.index("S") if isinstance(labels, tuple) and labels.count("S") == 1 and i not in mask_inputs else None
        for i, labels in enumerate(input_labels)
    ]
    return LayerSplit(
        kv_graph=kv_graph,
        query_graph=query_graph,
        attentions=attentions,
        kv_nodes=kv_nodes,
        query_slice_dims=query_slice_dims,
        mask_inputs=mask_inputs,
        mask_visibility=mask_visibility,
        synthesize_causal_mask=not mask_inputs and bool(full_keys),
        kv_seq_dim=kv_seq_dim,
        output_seq_dim=output_seq_dim,
        dropout_sources=dropout_sources,
        rescaled_arguments=rescaled,
        full_keys=full_keys,
    )


def _initial(placeholders, input_labels, rename):
    initial = {}
    for p, labels in zip(placeholders, input_labels):
        if isinstance(labels, tuple):
            initial[p] = tuple(rename(i, l, labels) for i, l in enumerate(labels))
        else:
            initial[p] = labels
    return initial


def _kv_graph(layer_gm, kv_nodes, placeholders, input_labels, is_seq_sized, dynamic, seq_length):
    graph = fx.Graph()
    env = placeholders_for(graph, placeholders)
    needed = set()
    stack = list(kv_nodes)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    for node in layer_gm.graph.nodes:
        if node in needed and node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in kv_nodes))
    new_placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(new_placeholders[-1]):
        full_len = graph.placeholder("full_len")
    with graph.inserting_after(full_len):
        chunk_len = graph.placeholder("chunk_len")
    kv_gm = fx.GraphModule(layer_gm, graph)
    analysis = SeqDimAnalysis(is_seq_sized=is_seq_sized, refuse_unexplained=dynamic, seq_length=seq_length,
                              creation_label="S")
    labels = analysis.run(list(graph.nodes), _initial(new_placeholders, input_labels, lambda i, l, _: l))
    for node in kv_nodes:
        kv_labels = labels[env[node]]
        if not isinstance(kv_labels, tuple) or kv_labels.count("S") != 1:
            raise CannotChunk(Reason.NO_SEQUENCE_DIM, "key/value without exactly one sequence dim")
        if not all(is_plain(l) for l in kv_labels):
            raise CannotChunk(Reason.NO_SEQUENCE_DIM, "key/value sequence dim merged with other dims")
        if kv_labels.index("S") - len(kv_labels) != -2:
            raise CannotChunk(Reason.NO_SEQUENCE_DIM, "key/value sequence dim is not dim -2")
    kv_seq_dim = -2
    # K/V are token-wise too: computed (and backpropagated) chunk by chunk, never whole.
    rescale_shape_arguments(kv_gm, labels, {"S": (full_len, chunk_len)})
    return kv_gm, kv_seq_dim


def _query_graph(layer_gm, attentions, kv_nodes, placeholders, input_labels, kv_seq_dim, is_seq_sized, dynamic,
                 seq_length, mask_inputs, selection_keys, full_keys):
    graph = fx.Graph()
    env = placeholders_for(graph, placeholders)
    prefixes = []
    keys = {a.key for a in attentions} | selection_keys
    for i, node in enumerate(kv_nodes):
        # key_prefix, value_prefix (then key_prefix_1, ... where a layer has several attentions)
        kind = "key" if node in keys else "value"
        index = sum(1 for n in kv_nodes[:i] if (n in keys) == (node in keys))
        prefix = graph.placeholder(f"{kind}_prefix" + (f"_{index}" if index else ""))
        prefix.meta = dict(node.meta)
        env[node] = prefix
        prefixes.append(prefix)
    chunk_mask = None
    if not mask_inputs:
        chunk_mask = graph.placeholder("chunk_mask")
    full_len, q_len, kv_len = (graph.placeholder(name) for name in ("full_len", "q_len", "kv_len"))
    by_node = {a.node: a for a in attentions}
    for node in layer_gm.graph.nodes:
        if node.op == "placeholder" or node in env:
            continue
        if node.op == "output":
            graph.output(env[node.args[0]])
            continue
        copy = graph.node_copy(node, lambda n: env[n])
        attention = by_node.get(node)
        if attention is not None and chunk_mask is not None:
            # is_causal=True is upper-left aligned for q_len != kv_len: pass the lower-right mask.
            copy.kwargs = {**copy.kwargs, "attn_mask": chunk_mask, "is_causal": False}
        if attention is not None and attention.grouped_query_replication:
            # sdpa repeats the key/value heads itself: the prefix and its gradient stay at the
            # number of key/value heads instead of a repeated copy per chunk.
            args, kwargs = list(copy.args), dict(copy.kwargs, enable_gqa=True)
            for position, name, prefix in ((1, "key", env[attention.key]), (2, "value", env[attention.value])):
                if len(args) > position:
                    args[position] = prefix
                else:
                    kwargs[name] = prefix
            copy.args, copy.kwargs = tuple(args), kwargs
        env[node] = copy
    eliminate_dead_code(graph)
    query_gm = fx.GraphModule(layer_gm, graph)

    mixing = {env[n] for a in attentions for n in a.mixing_nodes if n in env}

    def rename(i, label, labels, rebuilt):
        if label != "S":
            return label
        if labels.count("S") == 2:  # a mask: (..., query, key)
            return Q if i == len(labels) - 2 else K
        return K if rebuilt else Q  # a score bias along the keys, or a token-wise input

    new_placeholders = [n for n in graph.nodes if n.op == "placeholder"][: len(placeholders)]
    initial = {}
    for index, (p, labels) in enumerate(zip(new_placeholders, input_labels)):
        initial[p] = tuple(rename(i, l, labels, index in mask_inputs) for i, l in enumerate(labels)) \
            if isinstance(labels, tuple) else labels
    for node, prefix in zip(kv_nodes, prefixes):
        kv_labels = [None] * len(shape_of(node))
        kv_labels[kv_seq_dim] = K
        initial[prefix] = tuple(kv_labels)
    if chunk_mask is not None:
        initial[chunk_mask] = (Q, K)
    analysis = SeqDimAnalysis(
        # With every key present, any op may reduce or select along them: it sees eager's rows.
        mixing_allowed=lambda node, label: node in mixing and label == K,
        complete_axis=K if full_keys else None,
        is_seq_sized=is_seq_sized,
        refuse_unexplained=dynamic,
        seq_length=seq_length,
    )
    labels = analysis.run(list(graph.nodes), initial)
    output = next(n for n in graph.nodes if n.op == "output").args[0]
    out_labels = labels[output]
    if not isinstance(out_labels, tuple) or out_labels.count(Q) != 1 or K in out_labels or not all(map(is_plain, out_labels)):
        raise CannotChunk(Reason.LAYER_OUTPUTS, f"layer output sequence axes {out_labels}")
    rescaled = rescale_shape_arguments(query_gm, labels, {Q: (full_len, q_len), K: (full_len, kv_len)})
    if not full_keys:
        # Analysed as the layer wrote it; run over the prefix by ``prefix_sdpa``, without the
        # chunk mask where it is causal (is_causal: none is passed at all).
        for node, attention in by_node.items():
            if attention.kind != "sdpa":
                continue
            copy = env[node]
            copy.target = prefix_sdpa
            if chunk_mask is not None:
                copy.kwargs = {k: v for k, v in copy.kwargs.items() if k not in ("attn_mask", "is_causal")}
        if chunk_mask is not None:
            graph.erase_node(chunk_mask)
        query_gm.recompile()
    return query_gm, out_labels.index(Q), rescaled
