"""Random numbers drawn inside a layer, replayed exactly: drawn once before the layer, and read
by every chunk as a sequence input.

A layer that draws random numbers (PhiMoE's Gumbel sampling of experts, ``randn_like`` noise)
cannot be recomputed chunk by chunk as it is: each chunk, and backward's recompute, would draw
other numbers. A draw whose values depend on its shape alone — ``torch.rand_like(x)``,
``torch.randn(h.shape)``, ``torch.empty_like(x).exponential_()``, and random fills in place of
such a value (``rand_like(x).uniform_()``) — is made before the layer instead, as one tensor laid
out ``(outer, T, inner, rest)`` around the sequence axis of ``x``; inside the layer a reshape
gives it back its shape. Every draw of the layer moves, in its order, so the random stream is consumed
in the same amounts and order as in eager: the layer sees eager's numbers, not merely numbers of
the same distribution. A layer with any other draw keeps them all in place (and is refused).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx

from .find_layers import LayerRegion, region_of
from .fx_utils import is_random
from .seq_dims import SeqDimAnalysis, example, layout, op_name, size_hint

# A fresh value to fill, its values unread: ``torch.empty_like(x)`` and such.
_FRESH_LIKE = frozenset("empty_like zeros_like ones_like".split())
# Draws of a new tensor shaped like another, or by a size.
_DRAW_LIKE = frozenset("rand_like randn_like".split())
_DRAW_NEW = frozenset("rand randn".split())
# Random fills in place; their arguments are distribution parameters (plain numbers).
_FILLS = frozenset("exponential_ uniform_ normal_ cauchy_ log_normal_ geometric_".split())
_PLAIN_KWARGS = frozenset({"dtype", "device", "layout", "memory_format", "pin_memory", "requires_grad"})


@dataclasses.dataclass
class _Draw:
    nodes: list[fx.Node]  # creation, then its fills in place, in graph order
    value: fx.Node  # the last of them: what the layer reads


def _chain(start: fx.Node) -> Optional[_Draw]:
    """The creation ``start`` and the random fills applied to it in place, each the only user
    of the one before; None if ``start`` does not begin a draw of shape-only values."""
    name = op_name(start)
    kwargs = start.kwargs
    if set(kwargs) - _PLAIN_KWARGS or kwargs.get("requires_grad") or kwargs.get("memory_format") not in (
            None, torch.contiguous_format, torch.preserve_format, torch.legacy_contiguous_format):
        return None
    if name in _FRESH_LIKE | _DRAW_LIKE:
        like = start.args[0] if start.args else None
        value = example(like) if isinstance(like, fx.Node) else None
        # ``*_like`` lays values out in the strides of ``x``: only a contiguous ``x`` puts them
        # in the order of a new contiguous tensor.
        if not isinstance(value, torch.Tensor) or len(start.args) != 1 or (
                kwargs.get("memory_format") in (None, torch.preserve_format) and not value.is_contiguous()):
            return None
    elif name not in _DRAW_NEW:
        return None
    nodes = [start]
    while len(nodes[-1].users) == 1:
        user = next(iter(nodes[-1].users))
        if op_name(user) not in _FILLS or user.args[0] is not nodes[-1] or any(
                isinstance(a, fx.Node) for a in list(user.args[1:]) + list(user.kwargs.values())):
            break
        nodes.append(user)
    if name in _FRESH_LIKE and len(nodes) == 1:
        return None  # not a draw at all
    return _Draw(nodes, nodes[-1])


def _size_nodes(gm: fx.GraphModule) -> dict:
    """Size symbol -> the placeholder that holds it (dynamic shapes)."""
    found = {}
    for node in gm.graph.nodes:
        value = example(node) if node.op == "placeholder" else None
        if isinstance(value, torch.SymInt):
            found.setdefault(value.node.expr, node)
    return found


def _shape_around_sequence(shape, labels, length, size_nodes) -> Optional[tuple[list, list]]:
    """(the draw's shape with its token dim split into outer, the sequence and inner; the labels
    of that shape), with every size an int or a size placeholder; None if not possible."""
    if not isinstance(labels, tuple) or len(labels) != len(shape):
        return None
    sequence_dims = [i for i, label in enumerate(labels) if label is not None]
    if len(sequence_dims) != 1:
        return None
    out_shape, out_labels = [], []
    for i, size in enumerate(shape):
        if i == sequence_dims[0]:
            outer, inner = layout(labels[i])
            if outer * size_hint(length) * inner != size_hint(size):
                return None
            pieces = ([outer] if outer > 1 else []) + [length] + ([inner] if inner > 1 else [])
            out_shape += pieces
            out_labels += [None] * (outer > 1) + ["S"] + [None] * (inner > 1)
            continue
        out_shape.append(size)
        out_labels.append(None)
    sizes = [_size_spec(size, size_nodes) for size in out_shape]
    if any(spec is None or isinstance(spec, tuple) for spec in sizes):  # ints and size placeholders only
        return None
    return sizes, out_labels


def replay_random_draws(gm: fx.GraphModule, region: LayerRegion, labels: dict, length, is_seq_sized) -> LayerRegion:
    """Move every draw of ``region`` before it (see the module's docstring), or none; returns
    the region's new boundary. ``labels``: the whole graph's sequence labels, read for the
    region's inputs and updated for the new nodes; ``length``: the sequence length (an int, or
    the SymInt of a dynamic graph); ``is_seq_sized``: see ``SeqDimAnalysis``."""
    random = [n for n in region.nodes if is_random(n)]
    if not random:
        return region
    members = set(region.nodes)
    draws, seen = [], set()
    for node in random:
        if node in seen:
            continue
        start = node
        if op_name(node) in _FILLS and isinstance(node.args[0], fx.Node) and \
                op_name(node.args[0]) in _FRESH_LIKE | _DRAW_LIKE | _DRAW_NEW:
            start = node.args[0]
        draw = _chain(start)
        if draw is None or not set(draw.nodes) <= members or node not in draw.nodes:
            return region  # some draw stays (dropout too): the layer is refused for it
        draws.append(draw)
        seen.update(draw.nodes)
    # Plan every draw before changing the graph: all move, or none. Where each runs along the
    # sequence, from the layer's inputs (the whole graph's labels inside it may predate an
    # earlier layer's rewrite), through the attention and whatever else mixes positions: only
    # the draws' layouts are wanted here, the layer's own analysis decides the rest.
    initial = {n: labels[n] for n in region.inputs if isinstance(labels.get(n), tuple)}
    local = SeqDimAnalysis(is_seq_sized=is_seq_sized, lenient=True, seq_length=size_hint(length),
                           creation_label="S", mixing_allowed=lambda node, label: True).run(
        list(region.nodes), initial)
    size_nodes = _size_nodes(gm)
    plans = []
    for draw in draws:
        value = example(draw.value)
        start = draw.nodes[0]
        # Laid out like the tensor it is made like; a draw by size, by its own sizes.
        draw_labels = local.get(start.args[0] if op_name(start) in _FRESH_LIKE | _DRAW_LIKE else start)
        around = _shape_around_sequence(tuple(value.shape), draw_labels, length, size_nodes)
        view_shape = [_size_spec(s, size_nodes) for s in value.shape]
        if around is None or any(spec is None for spec in view_shape):
            return region
        plans.append((around, view_shape, draw_labels))

    graph, first = gm.graph, region.nodes[0]
    new_members = [n for n in region.nodes if n not in seen]
    for draw, ((sizes, outside_labels), view_shape, inside_labels) in zip(draws, plans):
        value = example(draw.value)
        fake = value.new_empty([example(s) if isinstance(s, fx.Node) else s for s in sizes])
        name = op_name(draw.nodes[0])
        factory = torch.randn if name in ("randn_like", "randn") else torch.rand if name in ("rand_like", "rand") \
            else torch.empty
        with graph.inserting_before(first):
            outside = graph.call_function(factory, (tuple(sizes),), {"dtype": value.dtype, "device": value.device})
            outside.meta = {"example_value": fake}
            labels[outside] = tuple(outside_labels)
            for fill in draw.nodes[1:]:
                outside = graph.call_method(op_name(fill), (outside, *fill.args[1:]), dict(fill.kwargs))
                outside.meta = {"example_value": fake}
                labels[outside] = tuple(outside_labels)
        with graph.inserting_before(draw.value):
            shape = []
            for spec in view_shape:
                if isinstance(spec, tuple):  # coefficient x size placeholder
                    spec = graph.call_function(operator.mul, spec)
                    spec.meta = {"example_value": example(spec.args[1]) * spec.args[0]}
                    labels[spec] = None  # a size, not a tensor
                shape.append(spec)
            inside = graph.call_method("reshape", (outside, *shape))  # a chunk of it is not contiguous
        inside.meta = dict(draw.value.meta)
        labels[inside] = inside_labels
        draw.value.replace_all_uses_with(inside)
        for node in reversed(draw.nodes):
            graph.erase_node(node)
        new_members.append(inside)
    order = {n: i for i, n in enumerate(graph.nodes)}
    return region_of(region.path, sorted(new_members, key=order.__getitem__))


def _size_spec(size, size_nodes: dict):
    """How to state ``size`` in the graph: an int, a size placeholder, (coefficient, placeholder)
    for ``2*s16``; None if it is none of these."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    expr = size.node.expr
    if expr in size_nodes:
        return size_nodes[expr]
    coefficient, rest = expr.as_coeff_Mul()
    if rest in size_nodes and coefficient.is_Integer:
        return int(coefficient), size_nodes[rest]
    return None
