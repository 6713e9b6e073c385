"""Values to probe a rewritten region with before it replaces the original ops."""
from __future__ import annotations

import torch
import torch.fx as fx

from .seq_dims import example, size_hint


def fabricate(node: fx.Node, real: dict):
    """A real value to probe with: the example input if there is one, else random data."""
    value = real[node] if node in real else example(node)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
        return value
    if isinstance(value, torch.SymInt):
        return size_hint(value)
    if not isinstance(value, torch.Tensor):
        return value
    shape = [size_hint(s) for s in value.shape]
    if value.is_floating_point():
        return torch.randn(shape, dtype=value.dtype)
    if value.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.zeros(shape, dtype=value.dtype)
