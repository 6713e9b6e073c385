"""The autocast state a graph was traced with, re-entered around every chunk subgraph.

Under ``torch.autocast`` Dynamo traces the user's ops with their autocast casts, and
AOTAutograd runs the compiled graphs with autocast switched off (the casts are in the graph).
Our chunk subgraphs are torch-level copies of the user's ops that run inside our custom ops, so
they would run in full precision: they are run under the traced state instead, in forward and
in backward's recomputation, as eager autocast would run them. Dynamo guards on the global
autocast state, so a different state at a later call compiles a new graph (and new plans).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")


@dataclasses.dataclass(frozen=True)
class AutocastState:
    enabled: tuple  # (device type, dtype) of every device type with autocast on
    cache_enabled: bool = True

    @classmethod
    def current(cls) -> "AutocastState":
        enabled = []
        for device_type in _DEVICE_TYPES:
            try:
                if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
                    enabled.append((device_type, torch.get_autocast_dtype(device_type)))
            except (RuntimeError, ValueError):  # a device type this build does not know
                continue
        return cls(tuple(enabled), torch.is_autocast_cache_enabled())

    def __str__(self):
        if not self.enabled:
            return "off"
        return ", ".join(f"{device} {str(dtype).replace('torch.', '')}" for device, dtype in self.enabled)

    @contextlib.contextmanager
    def entered(self):
        with contextlib.ExitStack() as stack:
            for device_type, dtype in self.enabled:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=self.cache_enabled))
            yield

    def wrap(self, run: Callable) -> Callable:
        if not self.enabled:
            return run

        def under_autocast(*args):
            with self.entered():
                return run(*args)

        return under_autocast
