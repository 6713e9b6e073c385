"""The argument lists of a streambp custom op: the region's inputs sorted into tensors and ints."""
from __future__ import annotations

import torch
import torch.fx as fx

from sbp_compiler.runtime import InputRef

from .errors import CannotChunk, Reason
from .seq_dims import example


class OpArguments:
    """``tensors`` and ``ints``: the values a ``streambp::layer``/``head`` call passes; ``ref``
    says where an input sits in them. A value used twice (by a layer and its mask builder) is
    passed once."""

    def __init__(self, refusal: Reason):
        self.tensors: list[fx.Node] = []
        self.ints: list[fx.Node] = []
        self.refusal = refusal  # the reason for an input that is neither

    def ref(self, node: fx.Node) -> InputRef:
        value = example(node)
        if isinstance(value, torch.Tensor):
            kind, values = "tensor", self.tensors
        elif isinstance(value, (int, torch.SymInt)):
            kind, values = "int", self.ints
        else:
            raise CannotChunk(self.refusal, f"{node.name} is a {type(value).__name__}")
        if node not in values:
            values.append(node)
        return InputRef(kind, values.index(node))
