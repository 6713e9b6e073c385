"""Rewrite shape arguments so a graph traced at the full sequence length runs at chunk lengths.

A ``view``/``reshape``/``expand`` states its output sizes as arguments: literal ints in a static
graph, sequence symbols in a dynamic one. For every output dim the sequence-dimension analysis
labelled with a chunk axis, the argument is replaced by ``rescale_size(arg, full, new)``: the same
size with the full length swapped for the chunk's (``B*T`` becomes ``B*c``; ``-1`` stays).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .seq_dims import example, op_name

SHAPE_ARGUMENT_OPS = frozenset({"view", "reshape", "expand"})


def rescale_size(size, full, new):
    """``size`` measured at sequence length ``full``, restated at length ``new``."""
    if size == -1 or full == new:
        return size
    if size % full:
        raise RuntimeError(f"streambp: size {size} is not a multiple of the sequence length {full}")
    return size // full * new


def rescale_shape_arguments(gm: fx.GraphModule, labels: dict, lengths: dict) -> int:
    """Rescale shape arguments; ``lengths`` maps a label to (full-length node, new-length node).

    Returns how many arguments were rewritten.
    """
    rewritten = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op not in ("call_method", "call_function") or op_name(node) not in SHAPE_ARGUMENT_OPS:
            continue
        out = labels.get(node)
        if not isinstance(out, tuple):
            continue
        positions = {i: lengths[label] for i, label in enumerate(out) if label in lengths}
        if not positions:
            continue
        base, *rest = node.args
        with graph.inserting_before(node):
            if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
                elements, packed = list(rest[0]), True
            elif len(rest) == 1 and isinstance(rest[0], fx.Node) and not isinstance(example(rest[0]), torch.Tensor):
                whole = rest[0]  # a torch.Size value: take it apart
                elements = [graph.call_function(operator.getitem, (whole, i)) for i in range(len(out))]
                packed = True
            else:
                elements, packed = list(rest), False
            if len(elements) != len(out):
                raise RuntimeError(f"streambp: {node.name} has {len(elements)} sizes for {len(out)} dims")
            for i, (full, new) in positions.items():
                elements[i] = graph.call_function(rescale_size, (elements[i], full, new))
                rewritten += 1
        node.args = (base, tuple(elements)) if packed else (base, *elements)
    graph.lint()
    gm.recompile()
    return rewritten
