"""Sequence rules for mixture-of-experts dispatch: tokens sorted by expert, run in groups, put back.

Transformers' grouped experts (``integrations/moe.py``, ``grouped_mm_experts_forward``, the
default ``experts_implementation``) flatten the (token, k) pairs of a router's top-k, sort them
by expert id, gather the tokens' rows in that order, multiply each contiguous group of rows by
its expert's weights (``grouped_mm`` with offsets counted from the sorted ids), and put the rows
back in token order with the inverse permutation. Every op of that sorts, gathers or counts
along the sequence, yet each token's result depends on that token only: the dispatch is
token-wise, and a chunk of tokens run through it alone gives the same rows.

The rules here prove it op by op, by following what the values of the integer tensors are:

- ``sort`` of a 1-d vector along its sequence dim: the sorted dim is the same positions in
  another order, labelled ``Permuted(axis, sort)``; the sort's indices hold positions along
  the axis (``PositionsOf``), the sorted values are that sort's keys (``SortKeys``, bounded by
  the top-k that produced them);
- ``perm // k``: positions of (token, k) pairs -> positions of tokens;
- gathering rows along a sequence dim by an index that holds positions along that very axis
  moves whole positions (``SeqDimAnalysis._gathers_by_position``);
- ``histc`` of the sorted keys over exactly their range counts each group, ``cumsum`` of the
  counts gives the groups' offsets (``GroupCounts``, ``GroupOffsets``);
- a grouped matmul of rows in the sort's order with that sort's offsets multiplies each row by
  its own expert's weights: row-wise;
- ``argsort`` of the sort's indices is the inverse permutation: gathering by it puts the rows
  back at their positions (``passes/functionalize.py`` turns ``inv[perm] = arange(n)`` into it).

The batched experts (``batched_mm``: ``repeat_interleave``, per-token weights gathered by expert
id, ``bmm``) need no rule of their own.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .errors import CannotChunk, Reason
from .seq_dims import example, layout, op_name, register_rule, same_axis, shape_of, size_hint, with_layout


@dataclasses.dataclass(frozen=True)
class PositionsOf:
    """The tensor's values are flat positions along a dim labelled ``axis`` (with its layout)."""

    axis: object


@dataclasses.dataclass(frozen=True)
class Bounded:
    """Integer values in ``[0, bound)`` (top-k indices over a dim of that size)."""

    bound: int


@dataclasses.dataclass(frozen=True)
class SortKeys:
    sort: fx.Node
    bound: object  # int, or None if unknown


@dataclasses.dataclass(frozen=True)
class GroupCounts:
    sort: fx.Node
    bins: int


@dataclasses.dataclass(frozen=True)
class GroupOffsets:
    sort: fx.Node
    bins: int


class Permuted(str):
    """Label of a dim that holds the positions of ``base`` reordered by the data-dependent
    permutation of ``sort``. Never equal to a plain axis: it meets one only through a gather by
    positions."""

    base: object
    sort: fx.Node

    def __new__(cls, base, sort: fx.Node):
        label = str.__new__(cls, f"{base}~{sort.name}")
        label.base, label.sort = base, sort
        label.outer, label.inner = layout(base)
        return label

    def __repr__(self):
        return f"Permuted({self.base!r} by {self.sort.name})"


def base_axis(label):
    """The axis a label stands for: itself, or the axis a permuted dim reorders."""
    return label.base if isinstance(label, Permuted) else label


@register_rule("topk")
def _topk(analysis, node):
    labels = analysis._rule_topk(node)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    analysis.facts[node] = [None, Bounded(size_hint(shape_of(node.args[0])[dim]))]
    return labels


@register_rule("sort")
def _sort(analysis, node):
    x = node.args[0]
    labels = analysis.of(x)
    if analysis.source_mode or not isinstance(labels, tuple) or len(labels) != 1 or labels[0] is None:
        return NotImplemented
    if node.kwargs.get("descending") or (len(node.args) > 2 and node.args[2]):
        return NotImplemented
    permuted = Permuted(labels[0], node)
    fact = analysis.facts.get(x)
    analysis.facts[node] = [SortKeys(node, fact.bound if isinstance(fact, Bounded) else None), PositionsOf(labels[0])]
    return [(permuted,), (permuted,)]


@register_rule("argsort")
def _inverse_permutation(analysis, node):
    """``argsort`` of a sort's indices: the inverse permutation."""
    p = node.args[0]
    labels, fact = analysis.of(p), analysis.facts.get(p)
    if (analysis.source_mode or not isinstance(labels, tuple) or len(labels) != 1
            or not isinstance(labels[0], Permuted) or not isinstance(fact, PositionsOf)
            or not same_axis(fact.axis, labels[0].base)):
        return NotImplemented
    analysis.facts[node] = PositionsOf(labels[0])
    return (labels[0].base,)


@register_rule("floordiv")
def _floordiv(analysis, node):
    """``positions // k``: a position of a (token, k) pair -> its token's position."""
    if node.target is not operator.floordiv and op_name(node) != "floordiv":
        return NotImplemented
    x, k = node.args[0], node.args[1]
    fact = analysis.facts.get(x) if isinstance(x, fx.Node) else None
    labels = analysis._broadcast(node, analysis._tensor_args(node))
    if isinstance(fact, PositionsOf) and isinstance(k, int) and k > 0:
        outer, inner = layout(fact.axis)
        if inner % k == 0:
            analysis.facts[node] = PositionsOf(with_layout(fact.axis, outer, inner // k))
    return labels


@register_rule("histc")
def _group_counts(analysis, node):
    keys = node.args[0]
    fact = analysis.facts.get(keys)
    bins = node.kwargs.get("bins", node.args[1] if len(node.args) > 1 else 100)
    low = node.kwargs.get("min", node.args[2] if len(node.args) > 2 else 0)
    high = node.kwargs.get("max", node.args[3] if len(node.args) > 3 else 0)
    if not isinstance(fact, SortKeys) or analysis.source_mode:
        return NotImplemented
    # Every key lies in [0, bins): each group's count is exact, and the groups are the keys'.
    if not (fact.bound == bins and low == 0 and high == bins - 1):
        raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name}: histc over [{low}, {high}] of keys in [0, {fact.bound})")
    analysis.facts[node] = GroupCounts(fact.sort, bins)
    return (None,)


@register_rule("cumsum")
def _group_offsets(analysis, node):
    counts = node.args[0]
    fact = analysis.facts.get(counts)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if not isinstance(fact, GroupCounts) or dim not in (0, -1):
        return NotImplemented
    analysis.facts[node] = GroupOffsets(fact.sort, fact.bins)
    return (None,)


@register_rule("grouped_mm_fallback", "_grouped_mm", "grouped_mm")
def _grouped_matmul(analysis, node):
    """Rows in a sort's order times each group's expert weights, the groups given by that
    sort's offsets: row-wise."""
    x, weight = node.args[0], node.args[1]
    offsets = node.kwargs.get("offs", node.args[2] if len(node.args) > 2 else None)
    x_labels, weight_labels = analysis.of(x), analysis.of(weight)
    fact = analysis.facts.get(offsets) if isinstance(offsets, fx.Node) else None
    if analysis.source_mode:
        return (x_labels[0], None) if isinstance(x_labels, tuple) else NotImplemented
    if (isinstance(x_labels, tuple) and len(x_labels) == 2 and isinstance(x_labels[0], Permuted)
            and x_labels[1] is None and isinstance(fact, GroupOffsets) and fact.sort is x_labels[0].sort
            and isinstance(weight_labels, tuple) and not any(weight_labels)
            and size_hint(shape_of(weight)[0]) == fact.bins):
        return (x_labels[0], None)
    raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name}: a grouped matmul whose groups are not a sort's expert groups")
