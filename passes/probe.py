"""Values to probe a rewritten region with before it replaces the original ops, and the
comparison of a chunked result with the original one."""
from __future__ import annotations

import torch
import torch.fx as fx

from .seq_dims import example, size_hint

_SEED = 0x5eed


def probe_generator() -> torch.Generator:
    """Random probe data comes from a generator of its own: the user's random stream (dropout
    elsewhere, data order) must not depend on whether streambp compiled the graph."""
    return torch.Generator().manual_seed(_SEED)


def fabricate(node: fx.Node, real: dict, generator: torch.Generator = None):
    """A real value to probe with: the example input if there is one, else random data."""
    value = real[node] if node in real else example(node)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
        return value
    if isinstance(value, torch.SymInt):
        return size_hint(value)
    if not isinstance(value, torch.Tensor):
        return value
    shape = [size_hint(s) for s in value.shape]
    generator = generator or probe_generator()
    if value.is_floating_point():
        return torch.randn(shape, dtype=value.dtype, generator=generator, device=value.device)
    if value.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool, device=value.device)
    return torch.zeros(shape, dtype=value.dtype, device=value.device)


def tolerance(dtype: torch.dtype) -> float:
    """Largest difference, relative to the largest value, between a chunked and an unchunked
    run that is rounding: orders of magnitude below what a wrong rewrite gives (O(1))."""
    return 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4 if dtype == torch.float32 else 1e-6


def scale_floor(values, dtype: torch.dtype, autocast=None) -> float:
    """The smallest scale to measure one of ``values`` (gradients of one op) against: a
    gradient that is zero in exact arithmetic (a key bias: softmax ignores a constant added to
    a row of scores) is rounding noise of the others' size, not to be divided by itself."""
    largest = max((v.detach().abs().max().item() for v in values if v is not None and v.numel()), default=0.0)
    dtypes = [dtype] + [d for _, d in (autocast.enabled if autocast else ())]
    low = any(d in (torch.bfloat16, torch.float16) for d in dtypes)
    return largest * (1.0 if low else 1e-2 if torch.float32 in dtypes else 1e-6)


def differs(expected: torch.Tensor, got: torch.Tensor, floor: float = 0.0, autocast=None) -> str:
    """Why ``got`` is not ``expected`` (shape, or values beyond rounding, relative to the
    largest expected value or ``floor`` if that is larger), or ''. Under ``autocast`` (an
    ``AutocastState``) the rounding is that of its dtype."""
    if expected.shape != got.shape:
        return f"shape {list(got.shape)} instead of {list(expected.shape)}"
    limit = max([tolerance(got.dtype)] + [tolerance(dtype) for _, dtype in (autocast.enabled if autocast else ())])
    expected, got = expected.detach().double(), got.detach().double()
    if not torch.equal(torch.isfinite(expected), torch.isfinite(got)):
        return "non-finite values in other places"
    finite = torch.isfinite(expected)
    if not bool(finite.any()):
        return ""
    scale = max(expected[finite].abs().max().item(), floor) or 1.0
    error = (expected[finite] - got[finite]).abs().max().item() / scale
    return f"relative difference {error:.2e}" if error > limit else ""
