"""What a training step sent between ranks, read from a ``torch.profiler`` trace.

    with torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    print(summarize_collectives(prof))   # calls, elements and bytes per kind; overlap with compute

Every collective a process group runs shows in the trace as an event of its backend (``gloo:all_gather``,
``nccl:reduce_scatter``...) with the tensor it moves (gloo runs a reduce-scatter as an all-reduce of
the whole tensor). Overlap is the share of the collectives' time during which the calling thread
was inside a streambp op (a layer's chunk loop, the head): communication hidden behind compute.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

BACKENDS = ("gloo:", "nccl:", "mpi:", "ucc:")
_BYTES = {"double": 8, "float": 4, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4,
          "signed char": 1, "unsigned char": 1, "bool": 1, "short int": 2}


@dataclasses.dataclass
class CollectiveKind:
    calls: int = 0
    elements: int = 0
    bytes: int = 0


@dataclasses.dataclass
class CollectiveSummary:
    kinds: dict  # kind (all_gather, all_reduce, ...) -> CollectiveKind
    seconds: float  # time the collectives ran
    overlapped_seconds: float  # of which a streambp op computed on the calling thread

    @property
    def total_bytes(self) -> int:
        return sum(k.bytes for k in self.kinds.values())

    def __str__(self):
        parts = [f"{name} x{k.calls} ({k.bytes / 2**20:.2f} MiB)" for name, k in sorted(self.kinds.items())]
        share = self.overlapped_seconds / self.seconds if self.seconds else 0.0
        return (f"collectives: {', '.join(parts) or 'none'}; {self.total_bytes / 2**20:.2f} MiB in all; "
                f"{share:.0%} of their {self.seconds * 1e3:.1f} ms overlapped with streambp compute")


def _merged(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _kind(c10d_name: str) -> str:
    """``all_gather`` from ``c10d::_allgather_base_``, ``reduce_scatter`` from
    ``c10d::_reduce_scatter_base_``, ``all_reduce`` from ``c10d::allreduce_``."""
    name = c10d_name.partition("::")[2].strip("_")
    name = name.removesuffix("_base").removesuffix("_into_tensor").removesuffix("_tensor_coalesced")
    for joined, spaced in (("allgather", "all_gather"), ("allreduce", "all_reduce"), ("alltoall", "all_to_all")):
        name = name.replace(joined, spaced)
    return name


def summarize_collectives(prof) -> CollectiveSummary:
    """Collectives of a finished ``torch.profiler.profile(..., record_shapes=True)``: each call
    of a ``c10d`` op, with the size of the tensor its backend then moved."""
    calls, backend_events, compute, callers = [], [], [], set()
    for event in prof.profiler.kineto_results.events():
        name = event.name()
        start, end = event.start_ns(), event.start_ns() + event.duration_ns()
        if name.startswith(BACKENDS):
            shapes, dtypes = event.shapes(), event.dtypes()
            elements = math.prod(shapes[0]) if shapes and shapes[0] else 0
            backend_events.append((start, end, elements, elements * _BYTES.get(dtypes[0] if dtypes else "", 0)))
        elif name.startswith("c10d::") and not name.startswith(("c10d::wait", "c10d::barrier", "c10d::monitored")):
            calls.append((start, _kind(name)))
            callers.add(event.start_thread_id())
        elif name.startswith("streambp::"):
            compute.append((event.start_thread_id(), start, end))
    kinds: dict = defaultdict(CollectiveKind)
    backend_events.sort()
    taken = 0
    for start, kind in sorted(calls):
        entry = kinds[kind]
        entry.calls += 1
        # The backend's own event of this call: the first one not taken that starts after it.
        while taken < len(backend_events) and backend_events[taken][0] < start:
            taken += 1
        if taken < len(backend_events):
            entry.elements += backend_events[taken][2]
            entry.bytes += backend_events[taken][3]
            taken += 1
    busy = _merged([(s, e) for thread, s, e in compute if not callers or thread in callers])
    comms = _merged([(s, e) for s, e, _, _ in backend_events])
    overlapped = sum(max(0, min(e, be) - max(s, bs)) for s, e in comms for bs, be in busy)
    return CollectiveSummary(dict(kinds), sum(e - s for s, e in comms) / 1e9, overlapped / 1e9)
