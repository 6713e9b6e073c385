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
# Ops that make a new tensor of sizes given as arguments: a method of a tensor (the sizes
# follow it) or a function (the sizes come first).
CREATION_METHODS = frozenset({"new_empty", "new_zeros", "new_ones", "new_full"})
CREATION_FUNCTIONS = frozenset({"empty", "zeros", "ones", "full"})


def rescale_size(size, full, new):
    """``size`` measured at sequence length ``full``, restated at length ``new``."""
    if size == -1 or full == new:
        return size
    if size % full:
        raise RuntimeError(f"streambp: size {size} is not a multiple of the sequence length {full}")
    return size // full * new


_RUNTIME_SIZES = frozenset({"size", "sym_size", "numel", "sym_numel", "dim"})


def _stated_at_full_length(value, memo: dict) -> bool:
    """Whether a size argument states the full length (a literal, or arithmetic on the graph's
    int inputs), rather than reading it off a tensor at run time (``x.size()`` of a chunk is the
    chunk's size already, and must not be rescaled)."""
    if not isinstance(value, fx.Node):
        return True
    if value not in memo:
        if value.op == "placeholder":
            memo[value] = not isinstance(example(value), torch.Tensor)
        elif op_name(value) in _RUNTIME_SIZES or (
                op_name(value) == "getitem" and isinstance(value.args[0], fx.Node) and op_name(value.args[0]) in _RUNTIME_SIZES):
            memo[value] = False
        else:
            found = {_stated_at_full_length(a, memo) for a in value.all_input_nodes}
            if len(found) > 1:
                raise RuntimeError(f"streambp: size {value.name} mixes stated sizes and sizes read at run time")
            memo[value] = found.pop() if found else True
    return memo[value]


def _split_size_arguments(node: fx.Node):
    """(arguments before the sizes, the sizes, arguments after them, sizes packed in a tuple)."""
    name = op_name(node)
    args = list(node.args)
    if node.op == "call_method" and name in SHAPE_ARGUMENT_OPS | (CREATION_METHODS - {"new_full"}):
        before, sizes = args[:1], args[1:]
        after = []
    elif name == "new_full":
        before, sizes, after = args[:1], args[1:2], args[2:]
    elif node.op == "call_function" and name in SHAPE_ARGUMENT_OPS:
        before, sizes, after = args[:1], args[1:], []
    elif node.op == "call_function" and name == "full":
        before, sizes, after = [], args[:1], args[1:]
    elif node.op == "call_function" and name in CREATION_FUNCTIONS:
        before, sizes, after = [], args, []
    else:
        return None
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        return before, list(sizes[0]), after, True
    return before, sizes, after, False


def rescale_shape_arguments(gm: fx.GraphModule, labels: dict, lengths: dict) -> int:
    """Rescale shape arguments; ``lengths`` maps a label to (full-length node, new-length node).

    Returns how many arguments were rewritten.
    """
    rewritten = 0
    graph = gm.graph
    stated: dict = {}
    for node in list(graph.nodes):
        if node.op not in ("call_method", "call_function"):
            continue
        split = _split_size_arguments(node)
        if split is None:
            continue
        out = labels.get(node)
        if not isinstance(out, tuple):
            continue
        # A permuted sequence dim (``passes/dispatch.Permuted``) has the length of the axis it reorders.
        positions = {i: lengths[getattr(label, "base", label)] for i, label in enumerate(out)
                     if getattr(label, "base", label) in lengths}
        if not positions:
            continue
        before, elements, after, packed = split
        with graph.inserting_before(node):
            if len(elements) == 1 and isinstance(elements[0], fx.Node) and not isinstance(example(elements[0]), torch.Tensor) \
                    and len(out) != 1:
                whole = elements[0]  # a torch.Size value: take it apart
                if not _stated_at_full_length(whole, stated):
                    continue  # read off a chunk-sized tensor at run time: already the chunk's
                elements = [graph.call_function(operator.getitem, (whole, i)) for i in range(len(out))]
                packed = True
            if len(elements) != len(out):
                raise RuntimeError(f"streambp: {node.name} has {len(elements)} sizes for {len(out)} dims")
            for i, (full, new) in positions.items():
                if not _stated_at_full_length(elements[i], stated):
                    continue
                elements[i] = graph.call_function(rescale_size, (elements[i], full, new))
                rewritten += 1
        sizes = [tuple(elements)] if packed else elements
        node.args = tuple(before + sizes + after)
    graph.lint()
    gm.recompile()
    return rewritten
