"""Option ``memory_budget``: chunk sizes chosen from the bytes a chunk's working set may take.

Fewer, larger chunks run larger matmuls (the LM head's weight is read once per chunk and per
matmul); smaller ones hold less. Without a budget the chunk sizes follow the model's widths (see
``StreamBPConfig``); with one, each chunked op takes the largest power-of-two chunk whose
estimated working set fits, at the length of the call. An explicit ``chunk_size`` /
``head_chunk_size`` wins over the budget.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

Budget = Union[None, int, float, str]

# Estimated live copies of a chunk's widest token-wise value while its backward runs: the head's
# logits, their float32 softmax and their gradient; a layer's MLP intermediates (gate, up, their
# product) and their gradients.
HEAD_COPIES = 3
LAYER_COPIES = 4
# Bytes per (query, key) pair of a chunk's attention mask: the bool mask and the float one SDPA
# turns it into.
MASK_PAIR_BYTES = 5
# "auto" on CUDA: this share of the free memory at the call (the rest of the step allocates too).
AUTO_SHARE = 0.5


def check_budget(value: Budget) -> None:
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"streambp option memory_budget must be bytes (int), a fraction of the device's memory "
                         f"(float in (0, 1]), 'auto' or None, got {value!r}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"streambp option memory_budget as a fraction must be in (0, 1], got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"streambp option memory_budget in bytes must be positive, got {value!r}")


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget_bytes(value: Budget, device: torch.device) -> Optional[int]:
    """The budget in bytes on ``device``, or None (chunk sizes from the widths). "auto" reads the
    free memory on CUDA; on the CPU it is None (host memory is not what long sequences exhaust,
    and its free figure says little)."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if value == "auto":
        return int(torch.cuda.mem_get_info(device)[0] * AUTO_SHARE) if cuda else None
    total = torch.cuda.get_device_properties(device).total_memory if cuda else _host_memory()
    return int(value * total)


def largest_chunk(budget: int, bytes_per_token: float, full: int) -> int:
    """The largest power of two of tokens (at most ``full``, at least 1) whose working set,
    ``bytes_per_token`` each, fits in ``budget``."""
    tokens = int(budget // max(1.0, bytes_per_token))
    if tokens >= full:
        return full
    return 1 << (max(1, tokens).bit_length() - 1)
