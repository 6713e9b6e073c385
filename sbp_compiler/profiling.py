"""Deterministic CPU memory measurement and step timing.

Peak memory is computed from the allocator events that the PyTorch profiler
records (``[memory]`` events), not from the process RSS: it counts exactly the
bytes requested by tensor allocations, so a deterministic function gives the
same number on every run and on every machine, which makes it usable in tests.
"""

import gc
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")

_MEMORY_EVENT_NAME = "[memory]"
_CPU = torch._C._autograd.DeviceType.CPU


@dataclass(frozen=True)
class MemoryTrace:
    """CPU memory activity of one call, relative to the memory alive before it.

    ``peak_bytes`` is the highest point reached by the running sum of
    allocations minus frees. Memory that was allocated before the call is not
    counted, and neither is its release during the call (the profiler cannot
    attribute a size to it), so the peak is never lowered by freeing old
    tensors. ``allocations`` lists the size of every allocation, in order.
    """

    peak_bytes: int
    allocations: tuple[int, ...]


def trace_memory(fn: Callable[[], T]) -> tuple[T, MemoryTrace]:
    """Run ``fn()`` under the profiler; return its result and its memory trace."""
    # Start from empty garbage-collector generations, so that any collection of
    # reference cycles (which frees their tensors) happens at the same point of
    # fn on every call.
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # profile_memory also records accelerator allocators; only host memory is summed.
    events = [
        event
        for event in prof.profiler.kineto_results.events()
        if event.name() == _MEMORY_EVENT_NAME and event.device_type() == _CPU
    ]
    # The profiler does not return events in time order.
    events.sort(key=lambda event: event.start_ns())

    current = peak = 0
    allocations = []
    for event in events:
        nbytes = event.nbytes()  # positive for an allocation, negative for a free
        current += nbytes
        peak = max(peak, current)
        if nbytes > 0:
            allocations.append(nbytes)
    return result, MemoryTrace(peak_bytes=peak, allocations=tuple(allocations))


def measure_peak_memory(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn()``; return its result and the peak CPU memory it allocated, in bytes."""
    result, trace = trace_memory(fn)
    return result, trace.peak_bytes


def allocation_sizes(fn: Callable[[], object]) -> list[int]:
    """Run ``fn()``; return the size in bytes of each CPU allocation it made, in order.

    Lets a test assert that a tensor of a given size (say, the full-sequence
    logits) was never materialized.
    """
    _, trace = trace_memory(fn)
    return list(trace.allocations)


def time_step(fn: Callable[[], object], repeats: int) -> list[float]:
    """Run ``fn()`` ``repeats`` times; return the wall-clock seconds of each run.

    No warm-up is done here: the caller runs ``fn`` once beforehand when the
    first call is special (compilation, lazy initialization).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds
