"""Sizes Dynamo traced as symbols but specialized to one value, folded to plain ints.

After ``generate()`` on a model compiled in place, Dynamo's automatic dynamic shapes trace the
next (training) call with size symbols that its guards then pin to this call's values: ``x.size(1)``
is a ``SymInt`` whose expression is the number 11. The graph is static in all but form, yet its
shape arguments are nodes read off tensors at run time, which the chunk rewrite must not mistake
for sizes of a chunk. Each such node is replaced by its value, as Dynamo writes sizes in a static
graph; the guards Dynamo installed keep the graph to that value. The fake values of tensors are
made anew with int sizes (fresh storages: run it after ``functionalize``, which reads aliasing
from the storages).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .fx_utils import eliminate_dead_code, fake_mode_of


def _constant(value):
    return isinstance(value, torch.SymInt) and value.node.expr.is_number


def _pinned_sizes(value) -> bool:
    return isinstance(value, torch.Tensor) and any(_constant(s) for s in (*value.shape, *value.stride()))


def _concrete(value, fake_mode):
    """The same fake tensor with its pinned sizes and strides as ints (a tuple of them, element-wise)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_concrete(v, fake_mode) for v in value)
    if not _pinned_sizes(value):
        return value

    def plain(size):  # a pinned size as an int; a real symbol (a dynamic dim) stays one
        return int(size) if _constant(size) else size

    with fake_mode:
        new = torch.empty_strided([plain(s) for s in value.shape], [plain(s) for s in value.stride()],
                                  dtype=value.dtype, device=value.device)
    return new.requires_grad_(value.requires_grad) if value.is_floating_point() or value.is_complex() else new


def fold_constant_sizes(gm: fx.GraphModule) -> list[str]:
    """Replace every node whose value is a ``SymInt`` of constant expression by that int, and
    restate the fake values of the others with int sizes; the names of the nodes folded."""
    folded = []
    fake_mode = fake_mode_of(gm.graph)
    for node in list(gm.graph.nodes):
        key = "example_value" if "example_value" in node.meta else "val"
        recorded = node.meta.get(key)
        if isinstance(recorded, (torch.Tensor, tuple, list)):
            node.meta[key] = _concrete(recorded, fake_mode)
        if node.op == "placeholder" or not _constant(recorded):
            continue
        size = int(recorded)
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n: size if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: size if n is node else n)
        folded.append(node.name)
    if folded:
        eliminate_dead_code(gm.graph)
        gm.recompile()
    return folded


def static_length(length):
    """A sequence length as the passes treat it: an int when its symbol is pinned to a value."""
    return int(length) if _constant(length) else length
