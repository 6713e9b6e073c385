"""The attention mask, rebuilt per query chunk instead of materialised at (B, 1, T, T).

Hugging Face builds the mask before the layers from index comparisons: ``arange`` of query and
key positions, the padding ``attention_mask`` gathered at key positions, a sliding window, ...
(DESIGN §2). We copy the mask's ancestor cone out of the graph and find, by propagating *source*
labels, which sequence-sized sources reach the mask's query axis (dim -2) and which its key axis
(dim -1). The chunk builder narrows the query sources to ``[start, start + q_len)`` and the key
sources to ``[0, kv_len)``, and rescales the shape arguments on the way, so it returns exactly
the rows and the key prefix of the full mask that one chunk needs. Tables that are only looked
up by index (the padding mask, packed-sequence ids) stay whole: they are O(T).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .errors import CannotChunk, Reason
from .find_layers import placeholders_for
from .fx_utils import ancestors, refuse_side_effects
from .rescale import rescale_shape_arguments
from .seq_dims import SeqDimAnalysis, UNKNOWN, example, is_plain, op_name, shape_of, size_hint

Q, K = frozenset({"Q"}), frozenset({"K"})
# Ops whose value at a position depends on the positions before it only.
PREFIX_OPS = frozenset({"cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"})


@dataclasses.dataclass
class MaskBuilder:
    graph: fx.GraphModule  # (*inputs, full_len, q_start, q_len, kv_len) -> chunk mask
    inputs: list[fx.Node]  # outer-graph values the builder reads
    query_sources: list[str]
    key_sources: list[str]
    given: bool = False  # the mask is a graph input, whole: the builder takes its chunk's view


def build_mask_builder(mask: fx.Node, outer_labels: dict, is_seq_sized, mutated=frozenset(), seq_length=None) -> MaskBuilder:
    value = example(mask)
    if isinstance(value, torch.Tensor) and value.requires_grad:
        # The builder runs without autograd: a learned bias (trained ALiBi slopes) would get no
        # gradient at all.
        raise CannotChunk(Reason.MASK_UNSUPPORTED, f"{mask.name} is computed from trained parameters "
                          "(a learned score bias): a mask rebuilt per chunk would pass them no gradient")
    if mask.op == "placeholder":
        return _given_mask_builder(mask, outer_labels, seq_length)
    seen = ancestors(mask)
    cone = [n for n in mask.graph.nodes if n in seen]
    inputs = [n for n in cone if n.op == "placeholder"]
    refuse_side_effects(cone, inputs, mutated)
    # 1. Which sources reach which mask axis.
    initial = {}
    for p in inputs:
        labels = outer_labels.get(p)
        if isinstance(labels, tuple):
            initial[p] = tuple(frozenset({p.name}) if l == "S" else None for l in labels)
    analysis = SeqDimAnalysis(is_seq_sized=is_seq_sized, source_mode=True, lenient=True, seq_length=seq_length)
    labels = analysis.run(cone, initial)
    mask_labels = labels[mask]
    if mask_labels == UNKNOWN or not isinstance(mask_labels, tuple) or len(mask_labels) < 2:
        raise CannotChunk(Reason.MASK_UNSUPPORTED, f"cannot trace the construction of {mask.name}")
    query_sources, key_sources = mask_labels[-2] or frozenset(), mask_labels[-1]
    key_only = not query_sources and size_hint(shape_of(mask)[-2]) == 1  # a bias along the keys (ALiBi)
    if not (query_sources or key_only) or not key_sources or any(l for l in mask_labels[:-2]):
        raise CannotChunk(Reason.MASK_UNSUPPORTED, f"{mask.name}: sequence axes are not its last two dims")
    if query_sources & key_sources:
        raise CannotChunk(Reason.MASK_UNSUPPORTED, f"{sorted(query_sources & key_sources)} feed both mask axes")

    # 2. Copy the cone with each source narrowed to the chunk's rows or key prefix.
    graph = fx.Graph()
    env = placeholders_for(graph, inputs)
    full_len, q_start, q_len, kv_len = (graph.placeholder(n) for n in ("full_len", "q_start", "q_len", "kv_len"))
    chunk_labels = {}
    for node in cone:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
        node_chunk_labels = [None] * len(labels[node]) if isinstance(labels[node], tuple) else []
        for sources, axis in ((query_sources, Q), (key_sources, K)):
            # A source is a node, or one dim of it (``bias#2``, ``bias#3``: the rows of a table
            # give both the query and the key axis).
            for source in sorted(s for s in sources if s.partition("#")[0] == node.name):
                dim = labels[node].index(frozenset({source}))
                if not is_plain(labels[node][dim]) or size_hint(shape_of(node)[dim]) != seq_length:
                    raise CannotChunk(Reason.MASK_UNSUPPORTED, f"{node.name}: a mask source merged with other dims")
                start, length = (q_start, q_len) if axis is Q else (0, kv_len)
                narrowed = graph.call_function(torch.narrow, (env[node], dim, start, length))
                narrowed.meta = dict(node.meta)
                node_chunk_labels[dim] = axis
                chunk_labels[narrowed] = tuple(node_chunk_labels)
                env[node] = narrowed
    graph.output(env[mask])
    builder = fx.GraphModule(mask.graph.owning_module, graph)

    # 3. Follow the narrowed axes and restate the shape arguments at chunk lengths. Strict: the
    # chunk's mask equals the full mask's rows and key prefix only if nothing between the
    # narrowed sources and the mask mixes positions (``pos[-1] - pos``, ``k / k.max()``).
    # The key sources are narrowed to a prefix of the keys, so an op that only looks back along
    # them (ALiBi's positions from attention_mask.cumsum(-1)) gives the same values there.
    chunk_analysis = SeqDimAnalysis(seq_length=seq_length,
                                    mixing_allowed=lambda node, label: label == K and op_name(node) in PREFIX_OPS)
    try:
        chunk_result = chunk_analysis.run([n for n in graph.nodes], chunk_labels)
    except CannotChunk as refusal:
        raise CannotChunk(Reason.MASK_UNSUPPORTED, f"mask construction: {refusal.detail}") from None
    if chunk_result[env[mask]][-2:] != ((None, K) if key_only else (Q, K)):
        raise CannotChunk(Reason.MASK_UNSUPPORTED, "chunked mask axes do not come out as (query, key)")
    for node, node_labels in chunk_result.items():
        if isinstance(node_labels, tuple) and any(l is not None and l not in (Q, K) for l in node_labels):
            raise CannotChunk(Reason.MASK_UNSUPPORTED, f"{node.name}: query and key positions combined in one axis")
    rescale_shape_arguments(builder, chunk_result, {Q: (full_len, q_len), K: (full_len, kv_len)})
    return MaskBuilder(builder, inputs, sorted(query_sources), sorted(key_sources))


def _given_mask_builder(mask: fx.Node, outer_labels: dict, seq_length) -> MaskBuilder:
    """A mask the graph receives whole (built in another graph: an FSDP2 unit or a layer compiled
    on its own gets the (B, 1, T, T) mask its model built before the layers): the chunk's rows
    and key prefix are a view of it. It exists at full size already; nothing is built here."""
    labels = outer_labels.get(mask)
    shape = shape_of(mask)
    if not isinstance(labels, tuple) or len(labels) < 2 or any(l for l in labels[:-2]):
        raise CannotChunk(Reason.MASK_UNSUPPORTED, f"{mask.name}: sequence axes are not its last two dims")
    key_only = labels[-2] is None and size_hint(shape[-2]) == 1
    lengths_ok = size_hint(shape[-1]) == seq_length and (key_only or size_hint(shape[-2]) == seq_length)
    if labels[-1] is None or not (key_only or labels[-2] is not None) or not lengths_ok:
        raise CannotChunk(Reason.MASK_UNSUPPORTED, f"{mask.name} {tuple(shape)}: not a (.., T, T) mask nor a (.., 1, T) key bias")
    graph = fx.Graph()
    whole = placeholders_for(graph, [mask])[mask]
    _full_len, q_start, q_len, kv_len = (graph.placeholder(n) for n in ("full_len", "q_start", "q_len", "kv_len"))
    rows = whole if key_only else graph.call_function(torch.narrow, (whole, -2, q_start, q_len))
    graph.output(graph.call_function(torch.narrow, (rows, -1, 0, kv_len)))
    return MaskBuilder(fx.GraphModule({}, graph), [mask], [] if key_only else [mask.name], [mask.name], given=True)
