"""Functionalization: in-place writes to tensors the graph creates itself become out-of-place ops.

Dynamo graphs keep the program's mutations: ``key_states[..., :n].copy_(k_nope)`` after
``new_empty`` (multi-head latent attention), ``out.add_(bias)`` in batched experts,
``mask.scatter_(1, index, 1)`` in group routing, ``x[:, 1:] = y``, ``weights /= total``. A value
written that way is read later through other nodes than the write, so FX's data flow does not
show where it comes from, and no analysis or extraction of a region can be trusted around it.

This pass rewrites each such write, in graph order, the way torch's functionalization does:
the written view gets its new value out of place (``copy_`` becomes a broadcast of the source,
``add_`` becomes ``add``, ...), the new value is scattered back into a new copy of the tensor
the view was taken from (``slice_scatter``, ``select_scatter``, ... through the chain of views),
and every later read of that tensor or of one of its views reads the new copy (views replayed
on it). Aliasing is read from the fake tensors Dynamo recorded: a node aliases its input when
their example values share storage.

What it cannot rewrite stays as it is and is returned, so that the passes refuse any region
that contains such a write or reads a value it writes: writes into graph inputs (parameters,
buffers, user tensors: the caller sees those), through views it cannot invert (advanced
indexing, ``expand``, split pieces, ``as_strided``), shape-changing in-place ops
(``unsqueeze_``) and random in-place draws (``exponential_``).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from .fx_utils import (
    _inplace_flag, _inplace_position, compute_example, eliminate_dead_code, example, fake_mode_of, is_random, mutated_argument, op_name,
)

_OUT_OF_PLACE_OPERATOR = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
    operator.imatmul: operator.matmul,
}
# View ops whose effect on a written view can be undone by reshaping or re-permuting it.
_RESHAPES = frozenset("view reshape flatten unflatten view_as reshape_as squeeze unsqueeze".split())
# In-place ops that change the tensor's shape or metadata, not (only) its values.
_METADATA_WRITES = frozenset("unsqueeze_ squeeze_ t_ transpose_ resize_ resize_as_ as_strided_ set_ detach_ swapdims_ swapaxes_".split())


class Unsupported(Exception):
    pass


@dataclasses.dataclass
class Functionalized:
    rewritten: list[str]  # names of the writes turned out-of-place
    remaining: dict  # write node -> why it stays in place
    mutated: set  # every node that aliases a value a remaining write touches


def _storage(value):
    if isinstance(value, torch.Tensor):
        try:
            return StorageWeakRef(value.untyped_storage())
        except Exception:  # noqa: BLE001 - a tensor without a storage (sparse, a subclass) aliases nothing we track
            return None
    return None


def _same(a, b) -> bool:
    return a is not None and b is not None and a == b


class _Aliases:
    """Which node each tensor node is a view (or alias) of, from the recorded fake storages."""

    def __init__(self, graph: fx.Graph):
        self.parent: dict[fx.Node, Optional[fx.Node]] = {}
        for node in graph.nodes:
            self.parent[node] = self._find_parent(node)

    @staticmethod
    def _find_parent(node: fx.Node) -> Optional[fx.Node]:
        if node.op in ("placeholder", "get_attr", "output"):
            return None
        value = example(node)
        storage = _storage(value)
        if storage is None:
            return None
        for arg in node.all_input_nodes:
            arg_value = example(arg)
            if isinstance(arg_value, (list, tuple)):
                # A piece of split/chunk/unbind is a view of their input; the outputs of topk,
                # sort, max, ... are tensors of their own (the piece is its own root).
                source = arg.args[0] if arg.args and isinstance(arg.args[0], fx.Node) else None
                if any(_same(_storage(v), storage) for v in arg_value) and source is not None \
                        and _same(_storage(example(source)), storage):
                    return arg
            elif _same(_storage(arg_value), storage):
                return arg
        return None

    def chain(self, node: fx.Node) -> list[fx.Node]:
        """[root, ..., node]: the views from the tensor that owns the storage down to ``node``."""
        chain = [node]
        while self.parent.get(chain[-1]) is not None:
            chain.append(self.parent[chain[-1]])
        chain.reverse()
        # A tuple (split/chunk) shares no storage itself: step over it to its input.
        return chain

    def root(self, node: fx.Node) -> fx.Node:
        return self.chain(node)[0]


def functionalize(gm: fx.GraphModule) -> Functionalized:
    """Rewrite ``gm`` in place; returns what was rewritten and what stays."""
    graph = gm.graph
    writes = [n for n in graph.nodes if mutated_argument(n) is not None]
    result = Functionalized([], {}, set())
    if not writes:
        return result
    aliases = _Aliases(graph)
    fake_mode = fake_mode_of(graph)
    for write in writes:
        try:
            _rewrite(graph, write, aliases, fake_mode)
        except Unsupported as why:
            result.remaining[write] = str(why)
        except Exception as error:  # noqa: BLE001 - a form we cannot compute out of place
            result.remaining[write] = f"{write.name} ({op_name(write)}): {type(error).__name__}: {error}"[:300]
        else:
            result.rewritten.append(write.name)
    if result.rewritten:
        eliminate_dead_code(graph)
        graph.lint()
        gm.recompile()
    roots = {aliases.root(mutated_argument(w)) for w in result.remaining}
    result.mutated = {n for n in graph.nodes if n in aliases.parent and aliases.root(n) in roots}
    return result


class _Builder:
    """Inserts new nodes at one point of the graph, with the write's metadata (its module path,
    so the nodes belong to the same layer) and fake example values."""

    def __init__(self, graph: fx.Graph, write: fx.Node, fake_mode):
        self.graph, self.write, self.fake_mode = graph, write, fake_mode
        self.last = write.prev

    def __call__(self, op: str, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_after(self.last):
            node = self.graph.create_node(op, target, args, kwargs)
        node.meta = {k: v for k, v in self.write.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        compute_example(node, self.fake_mode)
        self.last = node
        return node

    def method(self, name, *args, **kwargs):
        return self("call_method", name, *args, **kwargs)

    def function(self, target, *args, **kwargs):
        return self("call_function", target, *args, **kwargs)

    def copy(self, node: fx.Node, replace: dict) -> fx.Node:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: replace.get(n, n))
        return self(node.op, node.target, *args, **kwargs)


def _rewrite(graph: fx.Graph, write: fx.Node, aliases: _Aliases, fake_mode) -> None:
    name = op_name(write)
    if is_random(write):
        raise Unsupported(f"{write.name} ({name}) draws random numbers in place")
    if name in _METADATA_WRITES:
        raise Unsupported(f"{write.name} ({name}) changes a tensor's shape in place")
    target = mutated_argument(write)
    chain = aliases.chain(target)
    root = chain[0]
    if root.op in ("placeholder", "get_attr"):
        raise Unsupported(f"{write.name} ({name}) writes into {root.name}, an input of the graph")
    build = _Builder(graph, write, fake_mode)
    if write.op == "call_function" and write.target is operator.setitem:
        view = build.function(operator.getitem, target, write.args[1])
        if aliases._find_parent(view) is None:
            new_root = _index_put(build, chain, target, write.args[1], write.args[2], aliases)
        else:
            aliases.parent[view] = target
            chain = chain + [view]
            new_root = _scatter_back(build, chain, _broadcast_value(build, write.args[2], view))
    else:
        new_root = _scatter_back(build, chain, _new_value(build, write, target))
    _redirect(graph, write, root, new_root, aliases, build)
    graph.erase_node(write)


def _broadcast_value(build: _Builder, value, like: fx.Node) -> fx.Node:
    """``value`` (a tensor node or a number) as ``like`` holds it after ``like.copy_(value)``."""
    dtype = example(like).dtype
    if isinstance(value, fx.Node) and isinstance(example(value), torch.Tensor):
        return build.method("expand_as", build.method("to", value, dtype), like)
    return build.function(torch.full_like, like, value)


def _new_value(build: _Builder, write: fx.Node, target: fx.Node) -> fx.Node:
    """The value ``target`` holds after the write, computed out of place."""
    name = op_name(write)
    args, kwargs = write.args, dict(write.kwargs)
    if name == "copy_":
        return _broadcast_value(build, args[1], target)
    if name == "zero_":
        return build.function(torch.zeros_like, target)
    if name == "fill_":
        return _broadcast_value(build, args[1], target)
    if write.op == "call_function" and write.target in _OUT_OF_PLACE_OPERATOR:
        value = build.function(_OUT_OF_PLACE_OPERATOR[write.target], *args, **kwargs)
    elif write.op == "call_function" and _inplace_flag(write):
        if kwargs.get("inplace") is True:
            kwargs["inplace"] = False
        else:
            args = list(args)
            args[_inplace_position(write.target)] = False
        value = build.function(write.target, *args, **kwargs)
    elif name.endswith("_") and hasattr(torch.Tensor, name[:-1]):
        value = build.method(name[:-1], *args, **kwargs)
    else:
        raise Unsupported(f"{write.name} ({name}) has no out-of-place form here")
    got, want = example(value), example(target)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise Unsupported(f"{write.name} ({name}) out of place has another shape")
    if got.dtype != want.dtype:
        value = build.method("to", value, want.dtype)
    return value


def _is_sort_indices(node: fx.Node) -> bool:
    """``torch.sort(x)[1]`` or ``torch.argsort(x)``: a permutation of ``0 .. n-1``."""
    if op_name(node) == "argsort":
        return True
    return (node.op == "call_function" and node.target is operator.getitem and node.args[1] == 1
            and op_name(node.args[0]) == "sort")


def _inverse_permutation(target: fx.Node, chain, items, value) -> bool:
    """``inv = empty_like(perm); inv[perm] = arange(len(perm))`` (grouped experts putting rows
    back in token order): every element written once, with its position in ``perm``."""
    if len(chain) != 1 or len(items) != 1 or not isinstance(value, fx.Node):
        return False
    (perm,) = items
    if op_name(target) != "empty_like" or target.args[0] is not perm or not _is_sort_indices(perm):
        return False
    if op_name(value) != "arange" or value.kwargs.get("step", 1) != 1:
        return False
    bounds = [a for a in value.args]
    start, end = (0, bounds[0]) if len(bounds) == 1 else (bounds[0], bounds[1]) if len(bounds) >= 2 else (None, None)
    length = example(perm).shape[0] if example(perm).dim() == 1 else None
    return start == 0 and length is not None and (end is length or end == length)


def _index_put(build: _Builder, chain, target, index, value, aliases) -> fx.Node:
    """``target[index] = value`` with tensor indices: ``index_put`` on the whole tensor."""
    items = index if isinstance(index, tuple) else (index,)
    if _inverse_permutation(target, chain, items, value):
        # The inverse of a permutation is its argsort: the analysis can follow that.
        inverse = build.function(torch.argsort, items[0])
        return build.method("to", inverse, example(target).dtype)
    if len(items) == 1 and isinstance(items[0], fx.Node) and example(items[0]).dtype == torch.bool:
        # x[mask] = v: where() for a number, masked_scatter() for the selected values in order
        # (no data-dependent shapes, unlike index_put with a mask).
        mask = items[0]
        if isinstance(value, fx.Node) and isinstance(example(value), torch.Tensor) and example(value).numel() != 1:
            new = build.method("masked_scatter", target, _broadcast_mask(build, mask, target), value)
        else:
            fill = value if isinstance(value, fx.Node) else build.method("new_tensor", target, value)
            new = build.function(torch.where, _broadcast_mask(build, mask, target), fill, target)
            new = build.method("to", new, example(target).dtype)
        return _scatter_back(build, chain, new)
    if not all(isinstance(i, fx.Node) and isinstance(example(i), torch.Tensor) for i in items):
        raise Unsupported(f"setitem with a mixed index {index!r}")
    if not (isinstance(value, fx.Node) and isinstance(example(value), torch.Tensor)):
        value = build.method("new_tensor", target, value)
    value = build.method("to", value, example(target).dtype)
    return _scatter_back(build, chain, build.method("index_put", target, tuple(items), value))


def _broadcast_mask(build: _Builder, mask: fx.Node, target: fx.Node) -> fx.Node:
    """A boolean index over the leading dims of ``target``, as a mask of its full shape."""
    missing = example(target).dim() - example(mask).dim()
    for _ in range(missing):
        mask = build.method("unsqueeze", mask, -1)
    return build.method("expand_as", mask, target)


def _basic_index_steps(index, ndim: int):
    """``x[index]`` (slices, ints, None, Ellipsis) as ("slice", dim, start, stop, step),
    ("select", dim, i) and ("unsqueeze", dim) steps applied one after another."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) and isinstance(example(i), torch.Tensor) for i in items):
        raise Unsupported("write through an advanced index")
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    steps, dim = [], 0
    for item in items:
        if item is Ellipsis:
            dim += ndim - consumed
        elif item is None:
            steps.append(("unsqueeze", dim))
            dim += 1
        elif isinstance(item, slice):
            if not (item.start is None and item.stop is None and item.step in (None, 1)):
                steps.append(("slice", dim, item.start, item.stop, 1 if item.step is None else item.step))
            dim += 1
        elif isinstance(item, (int, fx.Node)):
            steps.append(("select", dim, item))
        else:
            raise Unsupported(f"write through index {item!r}")
    return steps


def _step_forward(build: _Builder, step, base: fx.Node) -> fx.Node:
    kind, dim, *rest = step
    if kind == "unsqueeze":
        return build.method("unsqueeze", base, dim)
    if kind == "select":
        return build.method("select", base, dim, rest[0])
    start, stop, stride = rest
    return build.function(operator.getitem, base, (slice(None),) * dim + (slice(start, stop, stride),))


def _step_backward(build: _Builder, step, base: fx.Node, new: fx.Node) -> fx.Node:
    kind, dim, *rest = step
    if kind == "unsqueeze":
        return build.method("squeeze", new, dim)
    if kind == "select":
        return build.function(torch.select_scatter, base, new, dim, rest[0])
    start, stop, stride = rest
    return build.function(torch.slice_scatter, base, new, dim, start, stop, stride)


def _undo_view(build: _Builder, parent: fx.Node, child: fx.Node, new_child: fx.Node) -> fx.Node:
    """``parent``'s value once its view ``child`` holds ``new_child``."""
    name = op_name(child)
    args = child.args
    if child.op == "call_function" and child.target is operator.getitem:
        if isinstance(example(parent), (list, tuple)):
            raise Unsupported(f"write into a piece of {parent.name} ({op_name(parent)})")
        steps = _basic_index_steps(args[1], example(parent).dim())
        values = [parent]
        for step in steps[:-1]:
            values.append(_step_forward(build, step, values[-1]))
        new = new_child
        for step, base in zip(reversed(steps), reversed(values)):
            new = _step_backward(build, step, base, new)
        return new
    if example(child).shape == example(parent).shape and name in (
            "to", "contiguous", "detach", "type_as", "float", "double", "half", "bfloat16", "type", "alias"
    ) or mutated_argument(child) is parent:
        return new_child  # the same tensor under another node
    if name in _RESHAPES:
        return build.method("reshape_as", new_child, parent)
    if name in ("transpose", "swapaxes", "swapdims"):
        dims = args[1:3] if len(args) >= 3 else (child.kwargs["dim0"], child.kwargs["dim1"])
        return build.method("transpose", new_child, *dims)
    if name == "t":
        return build.method("t", new_child)
    if name == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        inverse = [0] * len(dims)
        for position, d in enumerate(dims):
            inverse[d % len(dims)] = position
        return build.method("permute", new_child, inverse)
    if name == "narrow":
        dim, start, length = args[1:4]
        end = build.function(operator.add, start, length) if isinstance(start, fx.Node) or isinstance(length, fx.Node) else start + length
        return build.function(torch.slice_scatter, parent, new_child, dim, start, end)
    if name == "select":
        return build.function(torch.select_scatter, parent, new_child, *args[1:3])
    if name == "diagonal":
        return build.function(torch.diagonal_scatter, parent, new_child, *args[1:], **child.kwargs)
    raise Unsupported(f"write through a view made by {child.name} ({name})")


def _scatter_back(build: _Builder, chain: list[fx.Node], new_value: fx.Node) -> fx.Node:
    """The root of ``chain`` once its last view holds ``new_value``: a new tensor."""
    new = new_value
    for parent, child in reversed(list(zip(chain, chain[1:]))):
        new = _undo_view(build, parent, child, new)
    if len(chain) == 1 or new is new_value:
        # The whole root was written: own storage, so that no later write can reach its source.
        new = build.method("clone", new)
    return new


def _redirect(graph: fx.Graph, write: fx.Node, root: fx.Node, new_root: fx.Node, aliases: _Aliases, build: _Builder):
    """Every read after ``write`` of ``root`` or a view of it reads ``new_root`` (views replayed)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    at = order[write]
    replayed = {root: new_root}
    aliases.parent[new_root] = None

    def replay(node: fx.Node) -> fx.Node:
        if node not in replayed:
            parent = aliases.parent[node]
            if node is write or mutated_argument(node) is parent:
                replayed[node] = replay(parent)
            else:
                replayed[node] = build.copy(node, {parent: replay(parent)})
                aliases.parent[replayed[node]] = replayed[parent]
        return replayed[node]

    # Every replayed view is built first (building may fail): only then is any read redirected,
    # so a write that cannot be rewritten leaves the graph as it was.
    later = [n for n in graph.nodes if order.get(n, -1) > at]
    redirects = [
        (user, arg, replay(arg)) for user in later for arg in list(user.all_input_nodes)
        if order.get(arg, at + 1) <= at and arg in aliases.parent and aliases.root(arg) is root
    ]
    for user, arg, replacement in redirects:
        user.replace_input_with(arg, replacement)
        if aliases.parent.get(user) is arg:
            aliases.parent[user] = replacement
