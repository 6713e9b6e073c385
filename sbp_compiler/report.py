"""What the backend decided for each compiled graph, for people and for tests.

``reports()`` lists one ``GraphReport`` per graph compiled in this process; its ``str`` is what
``TORCH_LOGS="+sbp_compiler"`` prints. Every layer that is not chunked carries a typed reason.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from passes.errors import Reason


@dataclasses.dataclass
class LayerDecision:
    path: str
    chunked: bool
    reason: Optional[Reason] = None
    detail: str = ""
    attention: str = ""  # "sdpa" or "eager"
    mask: str = ""  # how the chunk mask is built
    rescaled_arguments: int = 0

    def __str__(self):
        if self.chunked:
            return (f"  {self.path}: chunked ({self.attention} attention, mask {self.mask}, "
                    f"{self.rescaled_arguments} shape arguments rescaled)")
        return f"  {self.path}: NOT chunked: {self.reason.value}: {self.detail}"


@dataclasses.dataclass
class GraphReport:
    graph_id: int
    chunk_size: object  # int once resolved; "auto" until the layers are known
    sequence_length: str = "?"  # the symbol (dynamic) or the value (static)
    dynamic: bool = False
    layers: list[LayerDecision] = dataclasses.field(default_factory=list)
    fallback: Optional[Reason] = None  # whole-graph fallback
    fallback_detail: str = ""

    @property
    def chunked_layers(self) -> list[LayerDecision]:
        return [layer for layer in self.layers if layer.chunked]

    @property
    def reasons(self) -> list[Reason]:
        found = [self.fallback] if self.fallback else []
        return found + [layer.reason for layer in self.layers if not layer.chunked]

    def __str__(self):
        head = (f"streambp graph {self.graph_id}: sequence length {self.sequence_length} "
                f"({'dynamic' if self.dynamic else 'static'}), chunk size {self.chunk_size}, "
                f"{len(self.chunked_layers)}/{len(self.layers)} layers chunked")
        lines = [head]
        if self.fallback:
            lines.append(f"  whole graph runs unchunked: {self.fallback.value}: {self.fallback_detail}")
        lines += [str(layer) for layer in self.layers]
        return "\n".join(lines)


_REPORTS: list[GraphReport] = []


def new_report(chunk_size) -> GraphReport:
    report = GraphReport(graph_id=len(_REPORTS), chunk_size=chunk_size)
    _REPORTS.append(report)
    return report


def reports() -> list[GraphReport]:
    """Reports of every graph compiled by the backend in this process, oldest first."""
    return list(_REPORTS)


def last_report() -> Optional[GraphReport]:
    return _REPORTS[-1] if _REPORTS else None
