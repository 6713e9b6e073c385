"""Deterministic CPU memory measurement and step timing.

Peak memory is computed from the allocator events that the PyTorch profiler
records, not from the process RSS: it counts exactly the bytes requested by
tensor allocations, so a deterministic function gives the same number on
every run, which makes it usable in tests.
"""

import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")


@dataclass(frozen=True)
class MemoryTrace:
    """CPU memory activity of one call, relative to the memory alive before it.

    ``peak_bytes`` is the highest point reached by the running sum of the
    bytes allocated during the call minus those of them freed during the call.
    Freeing memory that existed before the call does not lower it.
    ``allocations`` lists the size of every allocation, in order; ``live_at_peak`` the sizes of
    the allocations alive at the peak, largest first (what to cut to lower it).
    """

    peak_bytes: int
    allocations: tuple[int, ...]
    live_at_peak: tuple[int, ...] = ()


def _allocation_events(prof):
    """The profiler's allocator events, from the tree of events of every thread."""
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation:
            yield event


def trace_memory(fn: Callable[[], T]) -> tuple[T, MemoryTrace]:
    """Run ``fn()`` under the profiler; return its result and its memory trace."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # profile_memory also records accelerator allocators; only host memory is summed.
    events = [event for event in _allocation_events(prof) if event.extra_fields.device.type == "cpu"]
    events.sort(key=lambda event: event.start_time_ns)

    # Frees are matched to allocations by address: the plain "[memory]" events
    # carry no address, and the allocator remembers the size of every block
    # allocated under any earlier profiler session, so their frees would be
    # subtracted and make the peak depend on what was profiled before.
    live = set()
    current = peak = 0
    allocations, counted, peak_at = [], [], 0
    for event in events:
        ptr, nbytes = event.extra_fields.ptr, event.extra_fields.alloc_size
        if nbytes > 0:
            live.add(ptr)
            allocations.append(nbytes)
        elif ptr in live:
            live.remove(ptr)
        else:
            continue  # a block allocated before the call
        counted.append((ptr, nbytes))
        current += nbytes
        if current > peak:
            peak, peak_at = current, len(counted)
    # What was alive at the peak: replay once up to it (copying the live set at every new peak
    # would be quadratic on long traces).
    alive = {}
    for ptr, nbytes in counted[:peak_at]:
        if nbytes > 0:
            alive[ptr] = nbytes
        else:
            del alive[ptr]
    return result, MemoryTrace(peak_bytes=peak, allocations=tuple(allocations),
                               live_at_peak=tuple(sorted(alive.values(), reverse=True)))


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
