"""Sequence-dimension analysis: which dimension of every tensor in an FX graph is a sequence axis.

Each tensor-valued node gets a tuple with one entry per dimension: ``None`` or a label naming the
sequence axis the dimension runs along (``"S"`` for the sequence, ``"Q"``/``"K"`` for the query
and key axes of a chunk, or a set of source names when tracing where an axis comes from). The
labels are propagated forward with one rule per operation, Inductor auto_chunker style:
elementwise ops broadcast, ``linear`` keeps all but the last dim, views regroup dims, and so on.

The analysis is also the proof that a region is token-wise: an op that reduces or contracts over
a labelled dim mixes positions, and is refused unless the caller allows it (attention over the
key axis). An op without a rule is refused too. Refusals raise ``CannotChunk``; in lenient mode
the node is marked ``UNKNOWN`` instead, so a caller can analyse a whole graph and only fail where
an unknown value actually matters.

Static graphs bake the sequence length into literal shape arguments; dynamic graphs use a sympy
symbol. Labels come from propagation, never from matching sizes, so both work the same way; sizes
are only used to recognise where a sequence axis is created (``arange(T)``) in ``source_mode``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Hashable, Optional, Sequence

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.functions import Min as SymMin

from .errors import CannotChunk, Reason
from .fx_utils import example, op_name  # noqa: F401  (the analysis's vocabulary; passes import them from here too)

UNKNOWN = "<unknown>"  # label value for a node lenient analysis could not explain


class Axis(str):
    """A sequence-axis label (``"S"``, ``"Q"``, ``"K"``) on a dim that holds the axis merged with
    other dims by a view: the dim's size is ``outer x length x inner`` and position ``t`` of the
    axis sits at stride ``inner`` (``[B, T, d] -> [B*T, d]``: outer B, inner 1). It equals (and
    hashes as) its name, so code that asks "is this dim the sequence" sees it; merging two
    labels elementwise also compares the layouts (``same_axis``), so ``[B*T]`` never meets
    ``[T*B]`` unnoticed."""

    outer: int
    inner: int

    def __new__(cls, name, outer: int = 1, inner: int = 1):
        label = str.__new__(cls, name)
        label.outer, label.inner = outer, inner
        return label

    def __repr__(self):
        return f"{str.__str__(self)}[{self.outer}x..x{self.inner}]"

    def __reduce__(self):
        return Axis, (str.__str__(self), self.outer, self.inner)


class Sources(frozenset):
    """Source labels (``source_mode``) on a merged dim, with its layout as in ``Axis``."""

    outer: int
    inner: int

    def __new__(cls, names, outer: int = 1, inner: int = 1):
        label = frozenset.__new__(cls, names)
        label.outer, label.inner = outer, inner
        return label

    def __repr__(self):
        return f"{set(self)}[{self.outer}x..x{self.inner}]"


class Broadcast:
    """Label of a dim an ``expand`` grew from size 1 to the sequence's length (GPT-OSS's sinks
    ``expand(b, -1, q_len, -1)``): its values do not depend on the position, so it takes the
    axis it first meets elementwise; the expand's size argument is then restated per chunk."""

    __slots__ = ("node", "dim")

    def __init__(self, node, dim):
        self.node, self.dim = node, dim

    def __repr__(self):
        return f"Broadcast({self.node.name}, {self.dim})"


def layout(label) -> tuple[int, int]:
    """(outer, inner) of a label; (1, 1) for a dim that is the axis itself."""
    return getattr(label, "outer", 1), getattr(label, "inner", 1)


def with_layout(label, outer: int, inner: int):
    """``label`` on a dim with that layout (the plain label when it is the axis itself)."""
    if label is None:
        return None
    if isinstance(label, Broadcast):
        if (outer, inner) != (1, 1):
            raise CannotChunk(Reason.SEQUENCE_MIXING, f"a broadcast dim ({label!r}) merged with others by a view")
        return label
    base = frozenset(label) if isinstance(label, frozenset) else str.__str__(label)
    if (outer, inner) == (1, 1):
        return base
    return Sources(base, outer, inner) if isinstance(base, frozenset) else Axis(base, outer, inner)


def is_plain(label) -> bool:
    return layout(label) == (1, 1)


def same_axis(a, b) -> bool:
    return a == b and layout(a) == layout(b)

# Ops that act elementwise with broadcasting (method names, function __name__s).
POINTWISE = frozenset(
    """add sub mul truediv div floordiv mod neg pos pow rsqrt sqrt exp exp2 log log2 log1p expm1
    tanh sigmoid logsigmoid silu gelu relu relu6 leaky_relu elu selu celu mish softplus hardswish hardsigmoid
    sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh erf erfc abs sign sgn reciprocal square
    floor ceil round trunc frac nan_to_num logit hypot fmod remainder xlogy copysign clamp clamp_min clamp_max clip maximum minimum
    to float double half bfloat16 long int short bool byte char type_as type contiguous clone
    detach where masked_fill
    and_ or_ xor invert logical_and logical_or logical_not logical_xor bitwise_and bitwise_or
    bitwise_not le lt ge gt eq ne iadd isub imul itruediv add_ sub_ mul_ div_ dropout
    _to_copy lerp addcmul addcdiv fill_ zero_ exponential_ uniform_ normal_ cauchy_ log_normal_ geometric_ polar real imag conj angle complex wrapped_sqrt""".split()
)
REDUCTIONS = frozenset("mean sum amax amin var std norm logsumexp prod all any argmax argmin".split())
# Same-shape ops that mix positions along one dim.
ALONG_DIM = frozenset("softmax log_softmax cumsum cumprod logcumsumexp".split())
CREATION = frozenset("arange ones zeros full empty rand randn new_ones new_zeros new_full new_empty tensor as_tensor "
                     "scalar_tensor new_tensor".split())
# New tensors whose values do not depend on the position.
CONSTANT_CREATION = frozenset("zeros ones full new_zeros new_ones new_full".split())
# Ops that can grow a size-1 dim to the sequence's length (a mask's ``.expand(t, t)``).
BROADCASTS = frozenset("expand expand_as broadcast_to".split())
# Ops that take rows of a table (a buffer of positions, larger than the sequence).
TABLE_SLICES = frozenset("getitem narrow slice".split())
NON_TENSOR = frozenset("size dim item numel Size _sym_sqrt sym_sqrt sym_int sym_float sym_max sym_min".split())


# Rules registered by mechanism modules (``passes/dispatch.py``: mixture-of-experts dispatch),
# looked up by op name before the built-in ones. A rule gets (analysis, node) and returns the
# node's labels, or ``NotImplemented`` to leave the node to the built-in rule.
RULES: dict[str, Callable] = {}


def register_rule(*names: str):
    def register(rule):
        for name in names:
            RULES[name] = rule
        return rule

    return register


# Ops that keep their input's values (only the shape or dtype changes): what is known about the
# values of a tensor (``facts``) carries over.
VALUE_PRESERVING = frozenset(
    "to long int float double contiguous clone detach view reshape flatten squeeze unsqueeze expand".split())


def size_hint(size) -> int:
    """A concrete value for a (possibly symbolic) size: the example the graph was traced with."""
    if isinstance(size, torch.SymInt):
        return size.node.require_hint() if hasattr(size.node, "require_hint") else int(size.node.hint)
    return int(size)


def shape_of(node_or_value) -> Optional[tuple]:
    value = example(node_or_value)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _normalise_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


class SeqDimAnalysis:
    """Forward label propagation over the given nodes of one graph.

    ``mixing_allowed(node, label)`` says whether ``node`` may reduce or contract over a dim with
    ``label`` (the attention's key axis); ``is_seq_sized(size)`` says whether a dim of that size
    is the sequence (used to find where sequence axes are created, and to refuse sequence-sized
    dims that no rule explains); ``source_mode`` turns such creations into fresh source labels
    (``frozenset({node.name})``) and merges labels by union, to find out which source reaches
    which axis of a value; ``refuse_unexplained`` refuses such creations instead (use it only
    where sizes identify the sequence exactly: a dynamic length); ``aligned_only`` refuses an
    operand dim that meets a sequence axis elementwise without being labelled with it (a region
    whose inputs are sliced by their labels needs every such operand labelled); ``seq_length``
    (the example's length) lets views split a merged sequence dim by its layout;
    ``creation_label`` labels the sequence-sized dims of new tensors (``new_empty(b, h, T, d)``)
    with that axis, where only one axis can be meant (a K/V graph); ``complete_axis`` is an axis
    present at its full length (the keys of a chunk that sees every key): any op may reduce,
    select or scatter along it, and a new tensor's sequence-sized dim written by a scatter is it.
    """

    def __init__(
        self,
        *,
        mixing_allowed: Callable[[fx.Node, Hashable], bool] = lambda node, label: False,
        is_seq_sized: Callable[[object], bool] = lambda size: False,
        source_mode: bool = False,
        refuse_unexplained: bool = False,
        lenient: bool = False,
        aligned_only: bool = False,
        seq_length: Optional[int] = None,
        creation_label: Optional[str] = None,
        complete_axis: Optional[str] = None,
    ):
        self.mixing_allowed = mixing_allowed
        self.is_seq_sized = is_seq_sized
        self.source_mode = source_mode
        self.refuse_unexplained = refuse_unexplained
        self.lenient = lenient
        self.aligned_only = aligned_only
        self.seq_length = seq_length  # the sequence's length (a hint where dynamic)
        self.creation_label = creation_label
        self.complete_axis = complete_axis
        self.labels: dict[fx.Node, object] = {}
        # What is known about a tensor's values (``passes/dispatch.py``: that they are positions
        # along an axis, sort keys, group offsets), set by registered rules.
        self.facts: dict[fx.Node, object] = {}
        self.bindings: dict = {}  # Broadcast -> the label it took
        self.unknown_causes: dict[fx.Node, str] = {}  # lenient mode: why a node is UNKNOWN
        self.unaligned: dict[fx.Node, tuple] = {}  # aligned_only: node -> (operand, dim) refused

    # -- public -----------------------------------------------------------------------------
    def run(self, nodes: Sequence[fx.Node], initial: dict[fx.Node, object]) -> dict[fx.Node, object]:
        """Labels of every node; broadcast dims resolved to the axis they met (see ``Broadcast``)."""
        self._propagate(nodes, initial)
        if self.bindings or any(isinstance(l, Broadcast) for v in self.labels.values() if isinstance(v, tuple) for l in v):
            for node, labels in list(self.labels.items()):
                self.labels[node] = self.resolved(labels)
        return self.labels

    def _propagate(self, nodes, initial):
        self.labels.update(initial)
        for node in nodes:
            if node in self.labels or node.op == "output":
                continue
            try:
                try:
                    labels = self._rule(node)
                    labels = self._check_unexplained_seq_dims(node, labels)
                except (TypeError, ValueError, IndexError, KeyError, AttributeError) as error:
                    # A call form a rule does not expect: refuse rather than guess.
                    raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name}: {op_name(node)}: {error!r}") from None
            except CannotChunk as refusal:
                if not self.lenient:
                    raise
                labels = UNKNOWN
                self.unknown_causes[node] = self._root_cause(node, refusal)
            self.labels[node] = labels
            self._carry_facts(node)
        return self.labels

    def _carry_facts(self, node):
        if node in self.facts or node.op not in ("call_function", "call_method") or not node.args:
            return
        source = node.args[0]
        if not isinstance(source, fx.Node) or source not in self.facts:
            return
        if op_name(node) in VALUE_PRESERVING:
            self.facts[node] = self.facts[source]
        elif op_name(node) == "getitem" and isinstance(self.facts[source], list) and isinstance(node.args[1], int):
            self.facts[node] = self.facts[source][node.args[1]]

    def _root_cause(self, node, refusal) -> str:
        for arg in node.all_input_nodes:
            if arg in self.unknown_causes:
                return self.unknown_causes[arg]
        return str(refusal)

    def of(self, value):
        """Labels of an argument: a node's labels, or ``None`` for constants."""
        if isinstance(value, fx.Node):
            if value not in self.labels:
                return self._default_labels(value)
            return self.labels[value]
        return None

    # -- helpers ----------------------------------------------------------------------------
    def _default_labels(self, node: fx.Node):
        shape = shape_of(node)
        return (None,) * len(shape) if shape is not None else None

    def _merge(self, a, b, node):
        if isinstance(a, Broadcast) or isinstance(b, Broadcast):
            return self._bind(a, b, node)
        if a is None:
            return b
        if b is None or same_axis(a, b):
            return a
        if layout(a) != layout(b):  # one position of one meets another position of the other
            raise CannotChunk(Reason.SEQUENCE_MIXING,
                              f"{node.name}: axes {a!r} and {b!r} meet elementwise with different layouts")
        if self.source_mode:
            return with_layout(a | b, *layout(a))
        raise CannotChunk(Reason.SEQUENCE_MIXING, f"{node.name}: axes {a} and {b} meet elementwise")

    def _tensor_args(self, node):
        flat, _ = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
        return [a for a in flat if isinstance(a, fx.Node) and isinstance(example(a), torch.Tensor)]

    def _any_unknown(self, node):
        flat, _ = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
        return any(isinstance(a, fx.Node) and self.labels.get(a) == UNKNOWN for a in flat)

    def _bind(self, a, b, node):
        """Merge where one side is a broadcast dim: it takes the other side's axis."""
        if isinstance(a, Broadcast) and isinstance(b, Broadcast):
            self.bindings.setdefault(b, a)
            return a
        var, label = (a, b) if isinstance(a, Broadcast) else (b, a)
        if label is None:
            return var
        bound = self.resolve(var)
        if isinstance(bound, Broadcast):
            self.bindings[bound] = label
            return label
        return self._merge(bound, label, node)

    def resolve(self, label):
        """The axis a broadcast dim took (itself if none yet); any other label unchanged."""
        while isinstance(label, Broadcast) and label in self.bindings:
            label = self.bindings[label]
        return label

    def resolved(self, labels):
        """``labels`` with broadcast dims replaced by the axis they took (None if none)."""
        if isinstance(labels, tuple):
            return tuple(None if isinstance(l, Broadcast) else l for l in map(self.resolve, labels))
        if isinstance(labels, list):
            return [self.resolved(l) for l in labels]
        return labels

    def _mix(self, node, label, what):
        label = self.resolve(label)
        if label is not None and label == self.complete_axis:
            return
        if isinstance(label, Broadcast):  # summing copies of a value along the sequence is not token-wise
            raise CannotChunk(Reason.SEQUENCE_MIXING, f"{node.name} ({op_name(node)}) {what} over a broadcast sequence dim")
        if label is None or self.source_mode or self.mixing_allowed(node, label):
            return
        raise CannotChunk(Reason.SEQUENCE_MIXING, f"{node.name} ({op_name(node)}) {what} over sequence axis {label}")

    def _check_unexplained_seq_dims(self, node, labels):
        """A sequence-sized dim that no rule labelled is a sequence axis made from nothing."""
        shape = shape_of(node)
        if shape is None or not isinstance(labels, tuple):
            return labels
        fresh = list(labels)
        created = [i for i, size in enumerate(shape) if fresh[i] is None and self.is_seq_sized(size)]
        for i in created:
            # A sequence axis starts here: at a creation (``arange(T)``), at rows of a table
            # (GPT-Neo's ``bias[:, :, :T, :T]``), or, where sizes are symbolic and so exact, at
            # any op (padding two batches to one length). Each created dim is a source of its
            # own (``name#dim`` where there are several): a mask's query and key axes.
            if self.source_mode and (op_name(node) in CREATION or op_name(node) in BROADCASTS
                                     or self._takes_rows_of_a_table(node, i) or isinstance(shape[i], torch.SymInt)):
                fresh[i] = frozenset({node.name if len(created) == 1 else f"{node.name}#{i}"})
            elif self.refuse_unexplained:
                raise CannotChunk(
                    Reason.UNKNOWN_OP,
                    f"{node.name} ({op_name(node)}) creates a sequence-sized dim {i} not derived from the input",
                )
        return tuple(fresh)

    @staticmethod
    def _takes_rows_of_a_table(node, dim) -> bool:
        """``table[..., :T, ...]``: a slice that shrinks ``dim`` of a longer tensor to the sequence."""
        if op_name(node) not in TABLE_SLICES or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        base, out = example(node.args[0]), example(node)
        return (isinstance(base, torch.Tensor) and isinstance(out, torch.Tensor) and base.dim() == out.dim()
                and size_hint(base.shape[dim]) > size_hint(out.shape[dim]))

    def _broadcast(self, node, args):
        out_shape = shape_of(node)
        out = [None] * len(out_shape)
        for arg in args:
            labels = self.of(arg)
            if not isinstance(labels, tuple):
                continue
            offset = len(out_shape) - len(labels)
            for i, label in enumerate(labels):
                if label is not None and offset + i >= 0:
                    out[offset + i] = self._merge(out[offset + i], label, node)
        if self.aligned_only:
            for arg in args:
                self._check_aligned(node, arg, out)
        return tuple(out)

    def _check_aligned(self, node, arg, out_labels):
        """An operand dim that meets a sequence axis must run along it too, or be broadcast (size
        1): otherwise chunking would slice one and not the other."""
        labels, shape = self.of(arg), shape_of(arg)
        if not isinstance(labels, tuple) or shape is None:
            return
        offset = len(out_labels) - len(labels)
        for i, label in enumerate(labels):
            if label is None and offset + i >= 0 and out_labels[offset + i] is not None and size_hint(shape[i]) != 1:
                self.unaligned[node] = (arg, i)
                raise CannotChunk(
                    Reason.SEQUENCE_UNALIGNED,
                    f"{node.name} ({op_name(node)}): {arg.name} dim {i} {shape[i]} meets sequence axis "
                    f"{out_labels[offset + i]} but is not known to run along it",
                )

    # -- rules ------------------------------------------------------------------------------
    def _rule(self, node: fx.Node):
        if node.op == "placeholder" or node.op == "get_attr":
            return self._default_labels(node)
        if self._any_unknown(node):
            raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name} depends on an unexplained value")
        name = op_name(node)
        value = example(node)
        if not isinstance(value, (torch.Tensor, list, tuple)) or name in NON_TENSOR:
            return None
        registered = RULES.get(name)
        if registered is not None:
            labels = registered(self, node)
            if labels is not NotImplemented:
                return labels
        rule = getattr(self, f"_rule_{name}", None)
        if rule is not None:
            return rule(node)
        if name in POINTWISE:
            return self._broadcast(node, self._tensor_args(node))
        if name in REDUCTIONS:
            return self._reduction(node)
        if name in ALONG_DIM:
            return self._along_dim(node)
        if name in CREATION:
            return self._creation(node)
        raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name}: no sequence-dimension rule for {name!r}")

    @staticmethod
    def _arg(node, position, name, default=None):
        if len(node.args) > position:
            return node.args[position]
        return node.kwargs.get(name, default)

    def _dim_arg(self, node, position, default=None):
        if len(node.args) > position:
            return node.args[position]
        return node.kwargs.get("dim", default)

    def _reduction(self, node):
        x = node.args[0]
        labels = self.of(x)
        ndim = len(labels)
        dims = self._dim_arg(node, 1)
        if isinstance(dims, fx.Node):  # torch.max(a, b) is elementwise
            return self._broadcast(node, self._tensor_args(node))
        if dims is None:
            dims = list(range(ndim))
        elif isinstance(dims, int):
            dims = [dims]
        dims = {_normalise_dim(d, ndim) for d in dims}
        for d in dims:
            self._mix(node, labels[d], f"reduces dim {d}")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if keepdim:
            return tuple(None if i in dims else l for i, l in enumerate(labels))
        return tuple(l for i, l in enumerate(labels) if i not in dims)

    def _along_dim(self, node):
        labels = self.of(node.args[0])
        dim = self._dim_arg(node, 1)
        if dim is None:
            raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name}: {op_name(node)} without dim")
        self._mix(node, labels[_normalise_dim(dim, len(labels))], f"runs along dim {dim}")
        return labels

    def _rule_max(self, node):
        labels = self._reduction(node)
        # With a dim, max/min return (values, indices), both shaped like the reduction.
        return [labels, labels] if isinstance(example(node), (list, tuple)) else labels

    _rule_min = _rule_median = _rule_mode = _rule_nanmedian = _rule_max

    def _rule_kthvalue(self, node):
        labels = list(self.of(node.args[0]))
        dim = _normalise_dim(self._arg(node, 2, "dim", -1), len(labels))
        self._mix(node, labels[dim], "selects the k-th value")
        keepdim = self._arg(node, 3, "keepdim", False)
        out = tuple(None if i == dim else l for i, l in enumerate(labels)) if keepdim else tuple(
            l for i, l in enumerate(labels) if i != dim)
        return [out, out]

    def _rule_topk(self, node):
        """(values, indices) of the k largest along a dim that must not run along the sequence
        (a router's top-k over experts), or along the keys where a chunk has all of them (a
        sparse-attention indexer); the selected dim is a rank then, no axis; the other dims keep
        their labels."""
        labels = self.of(node.args[0])
        dim = _normalise_dim(self._arg(node, 2, "dim", -1), len(labels))
        self._mix(node, labels[dim], "selects the top k")
        out = tuple(None if i == dim else l for i, l in enumerate(labels))
        return [out, out]

    def _rule_sort(self, node):
        labels = self.of(node.args[0])
        dim = _normalise_dim(self._arg(node, 1, "dim", -1), len(labels))
        self._mix(node, labels[dim], "sorts")
        return [labels, labels] if isinstance(example(node), (list, tuple)) else labels

    def _rule_argsort(self, node):
        return self._rule_sort(node)

    def _child(self):
        return SeqDimAnalysis(is_seq_sized=self.is_seq_sized, source_mode=self.source_mode,
                              refuse_unexplained=self.refuse_unexplained, aligned_only=self.aligned_only,
                              seq_length=self.seq_length, creation_label=self.creation_label)

    def _subgraph_outputs(self, body: fx.GraphModule, input_labels):
        """Labels of a subgraph's outputs (a nested tuple) given its inputs' labels."""
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        child = self._child()
        labels = child.run(list(body.graph.nodes), dict(zip(placeholders, input_labels)))
        for inner in body.graph.nodes:
            shaped = op_name(inner) in ("view", "reshape", "expand") or op_name(inner) in CREATION
            if shaped and isinstance(labels.get(inner), tuple) and any(labels[inner]):
                raise CannotChunk(Reason.UNKNOWN_OP, f"{inner.name} states sequence sizes inside a subgraph")
        output = next(n for n in body.graph.nodes if n.op == "output").args[0]
        return torch.utils._pytree.tree_map(lambda n: labels.get(n) if isinstance(n, fx.Node) else None, output,
                                            is_leaf=lambda n: isinstance(n, fx.Node))

    def _rule_autograd_function_apply(self, node):
        """A custom ``torch.autograd.Function`` (BLOOM's GELU, PhiMoE's router): its forward and
        its own backward are both analysed; each gradient must run along its input's dims."""
        forward_attr, backward_attr, *args = node.args
        root = node.graph.owning_module
        forward_body, backward_body = (root.get_submodule(a.target) for a in (forward_attr, backward_attr))
        arg_labels = [self.of(a) for a in args]
        outs, saved = self._subgraph_outputs(forward_body, arg_labels)
        grads = self._subgraph_outputs(backward_body, list(outs) + list(saved))
        grads = grads if isinstance(grads, (list, tuple)) else (grads,)
        for arg, grad in zip(args, grads):
            if isinstance(arg, fx.Node) and isinstance(grad, tuple) and grad != self.of(arg):
                raise CannotChunk(Reason.SEQUENCE_MIXING,
                                  f"{node.name}: the custom backward's gradient of {arg.name} runs along other dims")
        return list(outs)

    def _rule_getattr(self, node):
        """Tensor attributes Dynamo records as ``getattr(x, name)``: ``x.T`` (Falcon), ``x.mT``,
        ``x.real``, ``x.data``."""
        labels, name = self.of(node.args[0]), node.args[1]
        if not isinstance(labels, tuple):
            return None
        if name == "T":
            return tuple(reversed(labels))
        if name == "mT":
            return labels[:-2] + (labels[-1], labels[-2])
        if name in ("real", "imag", "data"):
            return labels
        raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name}: no sequence-dimension rule for attribute {name!r}")

    def _rule_view_as_complex(self, node):
        """Pairs of the last dim as complex numbers (complex rotary: Llama 4, DeepSeek-V2)."""
        labels = self.of(node.args[0])
        self._mix(node, labels[-1], "pairs up")
        return tuple(labels[:-1])

    def _rule_view_as_real(self, node):
        return tuple(self.of(node.args[0])) + (None,)

    def _rule_one_hot(self, node):
        return tuple(self.of(node.args[0])) + (None,)

    def _rule_index_select(self, node):
        labels = list(self.of(node.args[0]))
        dim = _normalise_dim(self._arg(node, 1, "dim"), len(labels))
        if not self._gathers_by_position(self._arg(node, 2, "index"), labels[dim]):
            self._mix(node, labels[dim], "gathers")
        (index_label,) = self.of(self._arg(node, 2, "index"))
        labels[dim] = index_label
        return tuple(labels)

    def _aligned_merge(self, node, operands, skip_dim):
        """Labels of same-rank operands merged dim by dim, except ``skip_dim``; a labelled dim
        must be labelled alike in every operand that is not of size 1 there (an index covering
        fewer rows than the tensor it writes into would write some positions only)."""
        shapes = [shape_of(o) for o in operands]
        labels = [self.of(o) for o in operands]
        ndim = len(labels[0])
        out = [None] * ndim
        for d in range(ndim):
            if d == skip_dim:
                continue
            present = [l[d] for l in labels if l[d] is not None]
            for l, shape in zip(labels, shapes):
                if present and l[d] is None and size_hint(shape[d]) != 1:
                    raise CannotChunk(Reason.SEQUENCE_UNALIGNED,
                                      f"{node.name} ({op_name(node)}): operand dim {d} meets sequence axis {present[0]} "
                                      "without running along it")
            for label in present:
                out[d] = self._merge(out[d], label, node)
        return tuple(out)

    def _rule_scatter(self, node):
        """``x.scatter(dim, index, src)`` (and scatter_add, scatter_reduce): writes along a dim
        that must not be the sequence; the other dims of x, index and src stay aligned."""
        x = node.args[0]
        dim = _normalise_dim(self._arg(node, 1, "dim"), len(self.of(x)))
        written = self.resolve(self.of(x)[dim])
        if isinstance(written, Broadcast) and self.complete_axis is not None:
            # A constant of the sequence's length written at positions (an indexer's top-k keys
            # into ``new_ones(b, q, T)``): only a dim that is all there keeps eager's values.
            self._bind(written, self.complete_axis, node)
        operands = [x, self._arg(node, 2, "index")]
        src = self._arg(node, 3, "src")
        if isinstance(src, fx.Node) and isinstance(example(src), torch.Tensor):
            operands.append(src)
        for operand in operands:
            self._mix(node, self.of(operand)[dim], "scatters")
        out = list(self._aligned_merge(node, operands, dim))
        if self.complete_axis is not None and self.resolve(self.of(x)[dim]) == self.complete_axis:
            out[dim] = self.complete_axis  # written along the keys, which stay the keys
        return tuple(out)

    # In place (inside a custom autograd function's backward: PhiMoE's router), labelled alike;
    # whether a write in place may be chunked is decided apart (``fx_utils.refuse_side_effects``).
    _rule_scatter_add = _rule_scatter_reduce = _rule_scatter_ = _rule_scatter_add_ = _rule_scatter

    def _rule_index_add(self, node):
        x, source = node.args[0], self._arg(node, 3, "source")
        dim = _normalise_dim(self._arg(node, 1, "dim"), len(self.of(x)))
        self._mix(node, self.of(x)[dim], "adds at indices")
        self._mix(node, self.of(source)[dim], "adds at indices")
        return self._aligned_merge(node, [x, source], dim)

    _rule_index_copy = _rule_index_fill = _rule_index_add_ = _rule_index_add

    def _rule_slice_scatter(self, node):
        """``slice_scatter(x, src, dim, ...)`` (functionalized ``x[..., a:b] = src``): a slice
        of a non-sequence dim written, elementwise everywhere else."""
        x, src = node.args[0], node.args[1]
        dim = _normalise_dim(self._arg(node, 2, "dim", 0), len(self.of(x)))
        self._mix(node, self.of(x)[dim], "writes a slice")
        return self._aligned_merge(node, [x, src], dim)

    def _rule_select_scatter(self, node):
        x, src = node.args[0], node.args[1]
        labels = self.of(x)
        dim = _normalise_dim(self._arg(node, 2, "dim"), len(labels))
        self._mix(node, labels[dim], "writes an index")
        src_labels = list(self.of(src))
        src_labels.insert(dim, None)
        out = []
        for d, (a, b) in enumerate(zip(labels, src_labels)):
            out.append(self._merge(a, b, node))
        return tuple(out)

    def _creation(self, node):
        """A new tensor of given sizes: in ``creation_label`` mode a dim of the sequence's
        length is that axis (its size argument is restated per chunk), else unlabelled."""
        shape = shape_of(node)
        if self.creation_label is not None:
            return tuple(self.creation_label if self._is_length(size) else None for size in shape)
        if op_name(node) in CONSTANT_CREATION and not self.source_mode:
            # Constant values along a dim of the sequence's length (a zero score bias): it takes
            # the axis it meets, like an expanded dim (see ``Broadcast``).
            return tuple(Broadcast(node, d) if self._is_length(size) else None for d, size in enumerate(shape))
        return (None,) * len(shape)

    def _is_length(self, size) -> bool:
        if self.seq_length is None or not self.is_seq_sized(size):
            return False
        return size_hint(size) == self.seq_length

    def _rule_layer_norm(self, node):
        labels = self.of(node.args[0])
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
        for label in labels[len(labels) - len(normalized):]:
            self._mix(node, label, "normalises")
        return labels

    _rule_rms_norm = _rule_layer_norm

    def _rule_linear(self, node):
        labels = self.of(node.args[0])
        self._mix(node, labels[-1], "contracts")
        return labels[:-1] + (None,)

    def _rule_embedding(self, node):
        return self.of(node.args[0]) + (None,)

    def _rule_addmm(self, node):
        m1, m2 = self.of(node.args[1]), self.of(node.args[2])
        self._mix(node, m1[1], "contracts")
        self._mix(node, m2[0], "contracts")
        return self._merge_pair(node, (m1[0], m2[1]), self.of(node.args[0]))

    def _merge_pair(self, node, labels, bias):
        if not isinstance(bias, tuple):
            return labels
        out = list(labels)
        for i, label in enumerate(bias):
            out[len(out) - len(bias) + i] = self._merge(out[len(out) - len(bias) + i], label, node)
        return tuple(out)

    def _rule_matmul(self, node):
        a, b = self.of(node.args[0]), self.of(node.args[1])
        if len(a) < 2 or len(b) < 2:
            raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name}: matmul with a 1-d operand")
        self._mix(node, a[-1], "contracts")
        self._mix(node, b[-2], "contracts")
        batch_ndim = len(shape_of(node)) - 2
        batch = [None] * batch_ndim
        for labels in (a[:-2], b[:-2]):
            for i, label in enumerate(labels):
                pos = batch_ndim - len(labels) + i
                batch[pos] = self._merge(batch[pos], label, node)
        return tuple(batch) + (a[-2], b[-1])

    _rule_bmm = _rule_mm = _rule_matmul

    def _rule_baddbmm(self, node):
        """``input + batch1 @ batch2`` (BLOOM's ALiBi bias added to the scores)."""
        batch1 = node.kwargs.get("batch1", node.args[1] if len(node.args) > 1 else None)
        batch2 = node.kwargs.get("batch2", node.args[2] if len(node.args) > 2 else None)
        bias = node.kwargs.get("input", node.args[0] if node.args else None)
        a, b = self.of(batch1), self.of(batch2)
        self._mix(node, a[-1], "contracts")
        self._mix(node, b[-2], "contracts")
        product = (self._merge(a[0], b[0], node), a[1], b[2])
        return self._merge_pair(node, product, self.of(bias))

    def _rule_scaled_dot_product_attention(self, node):
        q, k, v = (self.of(a) for a in node.args[:3])
        self._mix(node, k[-2], "attends")
        return q[:-1] + (v[-1],)

    def _rule_transpose(self, node):
        labels = list(self.of(node.args[0]))
        d0, d1 = (_normalise_dim(d, len(labels)) for d in node.args[1:3])
        labels[d0], labels[d1] = labels[d1], labels[d0]
        return tuple(labels)

    def _rule_t(self, node):
        return tuple(reversed(self.of(node.args[0])))

    def _rule_permute(self, node):
        labels = self.of(node.args[0])
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if "dims" in node.kwargs:
            dims = node.kwargs["dims"]
        return tuple(labels[_normalise_dim(d, len(labels))] for d in dims)

    def _rule_unsqueeze(self, node):
        labels = list(self.of(node.args[0]))
        dim = _normalise_dim(self._dim_arg(node, 1), len(labels) + 1)
        labels.insert(dim, None)
        return tuple(labels)

    def _rule_squeeze(self, node):
        labels = self.of(node.args[0])
        in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
        return self._regroup(node, labels, in_shape, out_shape)

    def _rule_expand(self, node):
        labels = self.of(node.args[0])
        out_shape, in_shape = shape_of(node), shape_of(node.args[0])
        out = list((None,) * (len(out_shape) - len(labels)) + tuple(labels))
        if not self.source_mode and self.seq_length is not None:
            offset = len(out_shape) - len(in_shape)
            for d, size in enumerate(out_shape):
                grown = d < offset or size_hint(in_shape[d - offset]) == 1
                if out[d] is None and grown and size_hint(size) == self.seq_length and self.is_seq_sized(size):
                    out[d] = Broadcast(node, d)
        return tuple(out)

    _rule_expand_as = _rule_expand

    def _rule_view(self, node):
        return self._regroup(node, self.of(node.args[0]), shape_of(node.args[0]), shape_of(node))

    _rule_reshape = _rule_flatten = _rule_unflatten = _rule_view_as = _rule_reshape_as = _rule_view

    def _regroup(self, node, labels, in_shape, out_shape):
        """Labels of a view. Dims are grouped where the running products of both shapes meet: a
        group of one input dim and one output dim keeps its label; several input dims merged
        into one output dim give it the label of their sequence dim, with the layout of the
        merge (``Axis``); one input dim split into several gives the label to the output dim
        that holds the whole axis by its layout, and is refused if none does (the sequence
        itself is split). Any other regrouping of a sequence dim (``[b, h, t, d] -> [b, t,
        h*d]`` without the transpose) mixes positions and is refused."""
        in_hint = [size_hint(s) for s in in_shape]
        out_hint = [size_hint(s) for s in out_shape]
        in_cum = [math.prod(in_hint[:i]) for i in range(len(in_hint) + 1)]
        out_cum = [math.prod(out_hint[:i]) for i in range(len(out_hint) + 1)]
        common = sorted(set(in_cum) & set(out_cum))
        self._out_shape = out_shape
        out = [None] * len(out_shape)
        for k, label in enumerate(labels):
            if label is None or in_hint[k] == 1:
                continue
            low = max(c for c in common if c <= in_cum[k])
            high = min(c for c in common if c >= in_cum[k + 1])
            group_in = [i for i in range(len(in_hint)) if in_hint[i] != 1 and in_cum[i] >= low and in_cum[i + 1] <= high]
            group_out = [m for m in range(len(out_hint)) if out_hint[m] != 1 and out_cum[m] >= low and out_cum[m + 1] <= high]
            outer, inner = layout(label)
            if len(group_out) == 1:
                (m,) = group_out
                before = math.prod(in_hint[i] for i in group_in if i < k)
                after = math.prod(in_hint[i] for i in group_in if i > k)
                new_label = with_layout(label, outer * before, inner * after)
            elif len(group_in) == 1 and group_out:
                m, new_label = self._split_target(node, label, in_hint[k], group_out, out_hint)
            else:
                raise CannotChunk(Reason.SEQUENCE_MIXING,
                                  f"{node.name}: a view regroups sequence axis {label} with other dims "
                                  f"({list(in_hint)} -> {list(out_hint)}), mixing positions")
            out[m] = self._merge(out[m], new_label, node)
        return tuple(out)

    def _split_target(self, node, label, size, group_out, out_hint):
        """(output dim, its label) for an input dim of ``size`` holding axis ``label`` that a view
        splits into the dims ``group_out``."""
        outer, inner = layout(label)
        length = size // (outer * inner)
        if self.seq_length is not None and (outer, inner) == (1, 1) and length != self.seq_length:
            # A plain label on a dim that is not the axis's length: its layout is unknown, as
            # for labels given from outside; the sequence-sized output dim is taken.
            seq_sized = [m for m in group_out if self.is_seq_sized(self._out_shape[m])]
            if len(seq_sized) != 1:
                raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name}: cannot follow sequence axis {label} through view")
            return seq_sized[0], label
        found = []
        for m in group_out:
            after = math.prod(out_hint[j] for j in group_out if j > m)
            if inner % after == 0 and (after * out_hint[m]) % (inner * length) == 0:
                new_inner = inner // after
                found.append((m, with_layout(label, out_hint[m] // (length * new_inner), new_inner)))
        if len(found) != 1:
            raise CannotChunk(Reason.SEQUENCE_MIXING,
                              f"{node.name}: a view splits sequence axis {label!r} ({size} -> "
                              f"{[out_hint[m] for m in group_out]})")
        return found[0]

    def _rule_getitem(self, node):
        base, index = node.args
        base_labels = self.of(base)
        if isinstance(example(base), (list, tuple)):  # a tuple output (split, chunk, unbind)
            return base_labels[index] if isinstance(base_labels, list) else self._default_labels(node)
        if not isinstance(base_labels, tuple):
            return None
        return self._index(node, base_labels, index if isinstance(index, tuple) else (index,))

    def _index(self, node, labels, index):
        ndim = len(labels)
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        out, dim, advanced = [], 0, []
        for item in index:
            if item is Ellipsis:
                for _ in range(ndim - consumed):
                    out.append(labels[dim])
                    dim += 1
            elif item is None:
                out.append(None)
            elif isinstance(item, slice):
                if not _is_whole(item, shape_of(node.args[0])[dim]):
                    self._mix(node, labels[dim], "slices")
                out.append(labels[dim])
                dim += 1
            elif isinstance(item, int):
                self._mix(node, labels[dim], "selects")
                dim += 1
            elif isinstance(item, fx.Node) and isinstance(example(item), torch.Tensor):
                if not self._gathers_by_position(item, labels[dim]):
                    self._mix(node, labels[dim], "gathers")
                advanced.append(item)
                out.append("<advanced>")
                dim += 1
            elif isinstance(item, (list, tuple)) and item and all(isinstance(i, int) for i in item) \
                    and sum(1 for i in index if isinstance(i, (list, tuple, fx.Node))) == 1:
                # A list of constant positions (Falcon's qkv[..., [-2], :]): the dim stays, picked.
                self._mix(node, labels[dim], "selects positions")
                out.append(None)
                dim += 1
            else:
                raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name}: unsupported index {item!r}")
        out.extend(labels[dim:])
        if advanced:
            # Advanced indices broadcast together; the result takes their place (torch puts it
            # first when the indexed dims are not adjacent).
            index_labels = self._broadcast_shapes(node, advanced)
            first = out.index("<advanced>")
            adjacent = out.count("<advanced>") == len(advanced) and all(
                out[first + i] == "<advanced>" for i in range(len(advanced))
            )
            rest = [l for l in out if l != "<advanced>"]
            if adjacent:
                out = rest[:first] + list(index_labels) + rest[first:]
            else:
                out = list(index_labels) + rest
        if len(out) != len(shape_of(node)):
            raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name}: indexing rule disagrees with the traced shape")
        return tuple(out)

    def _gathers_by_position(self, index: fx.Node, label) -> bool:
        """Whether ``index`` holds positions along the axis ``label`` (a permutation of it, say):
        gathering by it moves whole positions, each to where the index's own labels say."""
        fact = self.facts.get(index)
        return label is not None and getattr(fact, "axis", None) is not None and same_axis(fact.axis, label)

    def _broadcast_shapes(self, node, args):
        ndim = max(len(shape_of(a)) for a in args)
        out = [None] * ndim
        for arg in args:
            labels = self.of(arg)
            for i, label in enumerate(labels):
                pos = ndim - len(labels) + i
                if label is not None:
                    out[pos] = self._merge(out[pos], label, node)
        return out

    def _rule_diff(self, node):
        labels = self.of(node.args[0])
        dim = _normalise_dim(self._arg(node, 2, "dim", -1), len(labels))
        self._mix(node, labels[dim], "differences")
        return labels

    def _rule_gather(self, node):
        source = self.of(self._arg(node, 0, "input"))
        index = self.of(self._arg(node, 2, "index"))
        dim = _normalise_dim(self._arg(node, 1, "dim"), len(source))
        self._mix(node, source[dim], "gathers")
        if self.aligned_only:
            merged = tuple(self._merge(a, b, node) for a, b in zip(source, index))
            self._check_aligned(node, self._arg(node, 0, "input"), merged)
            self._check_aligned(node, self._arg(node, 2, "index"), merged)
        return tuple(
            self._merge(None if i == dim else source[i], index[i], node) for i in range(len(index))
        )

    def _rule_repeat_interleave(self, node):
        """Each position repeated ``r`` times in a row stays one block of rows: token-wise, with
        the axis's inner size times ``r`` (the batched experts' ``repeat_interleave(top_k, 0)``)."""
        labels = list(self.of(node.args[0]))
        dim = self._arg(node, 2, "dim")
        repeats = self._arg(node, 1, "repeats")
        if dim is None:
            raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name}: repeat_interleave without dim flattens")
        dim = _normalise_dim(dim, len(labels))
        if labels[dim] is not None:
            if not isinstance(repeats, (int, torch.SymInt)) or isinstance(repeats, bool):
                self._mix(node, labels[dim], "repeats by a tensor of counts")
            elif isinstance(repeats, torch.SymInt) and not self.source_mode:
                self._mix(node, labels[dim], "repeats by a symbolic count")
            else:
                outer, inner = layout(labels[dim])
                labels[dim] = with_layout(labels[dim], outer, inner * int(repeats))
        return tuple(labels)

    def _rule_repeat(self, node):
        """Tiling a dim ``r`` times puts the whole axis ``r`` times one after the other: token-wise,
        with the axis's outer size times ``r`` (Llama 4's experts: ``x.repeat(num_experts, 1)``
        on ``[B*T, d]`` tokens, then ``view(num_experts, -1, d)``)."""
        labels = self.of(node.args[0])
        repeats = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        out = list((None,) * (len(repeats) - len(labels)) + tuple(labels))
        for i, (label, count) in enumerate(zip(out, repeats)):
            if label is None or count == 1:
                continue
            if not isinstance(count, int) or isinstance(count, bool):
                self._mix(node, label, "repeats by a symbolic count")
            else:
                outer, inner = layout(label)
                out[i] = with_layout(label, outer * count, inner)
        return tuple(out)

    def _rule_split(self, node):
        labels = self.of(node.args[0])
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        self._mix(node, labels[_normalise_dim(dim, len(labels))], "splits")
        return [labels] * len(example(node))

    _rule_chunk = _rule_split

    def _rule_unbind(self, node):
        labels = self.of(node.args[0])
        dim = _normalise_dim(self._dim_arg(node, 1, 0), len(labels))
        self._mix(node, labels[dim], "unbinds")
        return [labels[:dim] + labels[dim + 1:]] * len(example(node))

    def _same_shape_inputs(self, node):
        """(merged labels of a list of same-rank tensors, dim) for cat and stack."""
        out = None
        for t in node.args[0]:
            labels = self.of(t)
            out = labels if out is None else tuple(self._merge(a, b, node) for a, b in zip(out, labels))
        return out, self._arg(node, 1, "dim", 0)

    def _rule_cat(self, node):
        out, dim = self._same_shape_inputs(node)
        self._mix(node, out[_normalise_dim(dim, len(out))], "concatenates")
        return out

    _rule_concat = _rule_concatenate = _rule_cat

    def _rule_ones_like(self, node):
        """A new tensor shaped like its input: its dims run where the input's do."""
        return self.of(node.args[0])

    _rule_zeros_like = _rule_full_like = _rule_empty_like = _rule_rand_like = _rule_randn_like = _rule_ones_like

    def _rule_cross_entropy(self, node):
        logits, target = self.of(self._arg(node, 0, "input")), self.of(self._arg(node, 1, "target"))
        if len(logits) != 2 or len(target) != 1:
            raise CannotChunk(Reason.UNKNOWN_OP, f"{node.name}: {op_name(node)} on {len(logits)}-d logits")
        self._mix(node, logits[1], "reduces over classes")
        weight = self._arg(node, 2, "weight")
        if isinstance(weight, fx.Node):
            self._mix(node, self.of(weight)[0], "weights classes")
        per_token = self._merge(logits[0], target[0], node)
        if self.aligned_only:
            self._check_aligned(node, self._arg(node, 0, "input"), (per_token, None))
            self._check_aligned(node, self._arg(node, 1, "target"), (per_token,))
        if self._arg(node, 6, "reduction", "mean") == "none":
            return (per_token,)
        self._mix(node, per_token, "reduces")
        return ()

    _rule_nll_loss = _rule_cross_entropy

    def _rule_pad(self, node):
        labels = self.of(node.args[0])
        amounts = self._arg(node, 1, "pad")
        for i in range(len(amounts) // 2):
            if amounts[2 * i] or amounts[2 * i + 1]:
                self._mix(node, labels[len(labels) - 1 - i], "pads")
        return labels

    def _rule_roll(self, node):
        labels = self.of(node.args[0])
        dims = self._arg(node, 2, "dims")
        if dims is None or dims == ():  # rolls the flattened tensor
            dims = range(len(labels))
        for d in [dims] if isinstance(dims, int) else dims:
            self._mix(node, labels[_normalise_dim(d, len(labels))], "rolls")
        return labels

    def _rule_stack(self, node):
        out, dim = self._same_shape_inputs(node)
        out = list(out)
        out.insert(_normalise_dim(dim, len(out) + 1), None)
        return tuple(out)


def _is_whole(item: slice, size) -> bool:
    """Whether a slice keeps a whole dim (``x[:, 0:]`` is how HF keeps all logits)."""
    if item.step not in (None, 1) or item.start not in (None, 0):
        return False
    if item.stop is None:
        return True
    return isinstance(item.stop, int) and not isinstance(size, torch.SymInt) and item.stop >= size


def seq_sized_predicate(seq_len) -> Callable[[object], bool]:
    """Whether a size is (a multiple of) the sequence length.

    With a dynamic length the sequence symbol identifies it exactly; with a static length only
    the value is known, which is why the caller uses this for sources and safety checks only.
    """
    if isinstance(seq_len, torch.SymInt):
        length = seq_len.node.expr
        if isinstance(length, sympy.Symbol):
            def is_seq_sized(size) -> bool:
                if not isinstance(size, torch.SymInt):
                    return False
                expr = size.node.expr
                # ``Min(8, s)`` (a top-k of at most 8) is bounded: no sequence axis.
                if isinstance(expr, (sympy.Min, SymMin)) and any(a.is_number for a in expr.args):
                    return False
                return length in expr.free_symbols

            return is_seq_sized

        # A length computed from sizes (``Max(s1, s2)`` after padding two batches to one length):
        # a size is sequence-sized if it is the length times a factor free of its symbols.
        @functools.lru_cache(maxsize=None)
        def is_multiple(expr) -> bool:
            return expr == length or not (sympy.simplify(expr / length).free_symbols & length.free_symbols)

        return lambda size: isinstance(size, torch.SymInt) and is_multiple(size.node.expr)
    return lambda size: isinstance(size, int) and size == seq_len and seq_len > 1


from . import dispatch  # noqa: E402,F401  (registers the mixture-of-experts dispatch rules)
