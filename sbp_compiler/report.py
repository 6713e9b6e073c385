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
    keys: str = "prefix"  # what a chunk attends to: its key prefix, or "all" keys
    keys_reason: str = ""  # why all: keys selected by top-k, a mask computed in the layer

    def __str__(self):
        if self.chunked:
            keys = f", every key in every chunk: {self.keys_reason}" if self.keys == "all" else ""
            return (f"  {self.path}: chunked ({self.attention} attention{keys}, mask {self.mask}, "
                    f"{self.rescaled_arguments} shape arguments rescaled)")
        return f"  {self.path}: NOT chunked: {self.reason.value}: {self.detail}"


@dataclasses.dataclass
class HeadDecision:
    """The LM head and loss after the last layer: chunked along the sequence, or why not."""

    chunked: bool = False
    reason: Optional[Reason] = None
    detail: str = ""
    chunk_size: object = None
    split_losses: list[str] = dataclasses.field(default_factory=list)  # losses made per-token
    nodes: list[str] = dataclasses.field(default_factory=list)  # the token-wise ops
    widest: str = ""  # the widest value inside, with its shape
    outputs: list[tuple] = dataclasses.field(default_factory=list)  # (name, shape, as wide as the widest)
    stops: list[tuple] = dataclasses.field(default_factory=list)  # (op, why it stays outside)
    rescaled_arguments: int = 0
    gradients_in_forward: bool = False  # the loss sums the output: forward computes the head's gradients
    skip_logits: bool = False  # the option was set
    skipped_logits: list[str] = dataclasses.field(default_factory=list)  # outputs returned as None (skip_logits)
    absent: bool = False  # the graph is one decoder layer: its model's head is in another graph

    @property
    def whole_outputs(self) -> list[str]:
        """Outputs as wide as the widest value (returned logits): they exist whole."""
        return [name for name, _, wide in self.outputs if wide]

    def __str__(self):
        skipped = [f"    not returned (option skip_logits): {name}, None in its place" for name in self.skipped_logits]
        if not self.chunked:
            first = (f"  head: NOT chunked: {self.reason.value}: {self.detail}" if self.reason
                     else "  head: none in this graph" if self.absent else "  head: not analysed")
            return "\n".join([first] + skipped)
        lines = [
            f"  head: chunked along the sequence, chunk size {self.chunk_size}; {len(self.nodes)} token-wise ops, "
            f"widest {self.widest}, {self.rescaled_arguments} shape arguments rescaled"
        ]
        if self.split_losses:
            lines.append(f"    losses split into per-token losses and a sum: {', '.join(self.split_losses)}")
        lines.append("    outputs: " + ", ".join(f"{name} {shape}" for name, shape, _ in self.outputs))
        if self.gradients_in_forward:
            lines.append("    gradients computed in forward: the loss sums the output, so backward scales them "
                         "instead of recomputing the head")
        lines += [f"    ends at {name}: {why}" for name, why in self.stops]
        lines += skipped
        if self.skip_logits:
            remedy = ("option skip_logits left it: this graph returns no loss that requires grad (evaluation, "
                      "generation, or a loss computed outside the compiled code)")
        else:
            remedy = ("options={'skip_logits': True} returns None in its place in training steps that compute a "
                      "loss, or return only the loss (see sbp_compiler.objectives)")
        for name in self.whole_outputs:
            lines.append(
                f"    WHOLE: {name} is the head's widest value and leaves it (returned to the caller, or used "
                f"by an op that is not token-wise), so it exists at full length; {remedy}"
            )
        return "\n".join(lines)


@dataclasses.dataclass
class GraphReport:
    graph_id: int
    chunk_size: object  # int once resolved; "auto" until the layers are known
    sequence_length: str = "?"  # the symbol (dynamic) or the value (static)
    dynamic: bool = False
    layers: list[LayerDecision] = dataclasses.field(default_factory=list)
    head: HeadDecision = dataclasses.field(default_factory=HeadDecision)
    fallback: Optional[Reason] = None  # whole-graph fallback
    scope: str = ""  # what the graph holds, when it is not a whole model (one layer, or the head only)
    hints: list[str] = dataclasses.field(default_factory=list)  # what the user can change to chunk more
    pieces: int = 1  # AOTAutograd graphs it was compiled into (one per layer under DDP)
    layer_inputs: str = ""  # option layer_inputs="recompute": which layer inputs stay saved
    gradients_in_place: str = ""  # passes/gradient_in_place.py: which layer backwards write dx over dy
    fallback_detail: str = ""
    folded_sizes: list[str] = dataclasses.field(default_factory=list)  # size nodes pinned to a value, made ints
    functionalized: list[str] = dataclasses.field(default_factory=list)  # in-place writes made out of place
    in_place: dict = dataclasses.field(default_factory=dict)  # writes left in place -> why
    autocast: str = "off"  # the autocast state the chunk subgraphs run under
    pass_seconds: dict = dataclasses.field(default_factory=dict)  # pass -> seconds (None: disabled)

    def add_scope(self, text: str) -> None:
        self.scope = f"{self.scope}; {text}" if self.scope else text

    @property
    def chunked_layers(self) -> list[LayerDecision]:
        return [layer for layer in self.layers if layer.chunked]

    @property
    def reasons(self) -> list[Reason]:
        """Why layers (or the whole graph) run unchunked; the head's reason is ``head.reason``."""
        found = [self.fallback] if self.fallback else []
        return found + [layer.reason for layer in self.layers if not layer.chunked]

    def timings(self) -> str:
        return ", ".join(f"{name} {'off' if t is None else f'{t:.2f} s'}" for name, t in self.pass_seconds.items())

    def __str__(self):
        head = (f"streambp graph {self.graph_id}: sequence length {self.sequence_length} "
                f"({'dynamic' if self.dynamic else 'static'}), chunk size {self.chunk_size}, "
                f"{len(self.chunked_layers)}/{len(self.layers)} layers chunked")
        lines = [head]
        if self.scope:
            lines.append(f"  this graph holds {self.scope}")
        if self.fallback:
            lines.append(f"  whole graph runs unchunked: {self.fallback.value}: {self.fallback_detail}")
        if self.autocast != "off":
            lines.append(f"  autocast: {self.autocast} (chunk subgraphs run under it)")
        if self.folded_sizes:
            lines.append(f"  sizes Dynamo traced as symbols but pinned to one value, folded to ints: {len(self.folded_sizes)}")
        if self.functionalized:
            lines.append(f"  in-place writes made out of place: {', '.join(self.functionalized)}")
        for name, why in self.in_place.items():
            lines.append(f"  left in place: {name}: {why}")
        lines += [str(layer) for layer in self.layers]
        lines.append(str(self.head))
        if self.layer_inputs:
            lines.append(f"  layer inputs: {self.layer_inputs}")
        if self.gradients_in_place:
            lines.append(f"  backward: {self.gradients_in_place}")
        lines += [f"  hint: {hint}" for hint in self.hints]
        if self.pieces > 1:
            lines.append(f"  compiled as {self.pieces} pieces, one per chunked layer (then the head): under DDP each "
                         "layer's gradients are handed to DDP's reducer as soon as its backward returns")
        if self.pass_seconds:
            lines.append(f"  passes: {self.timings()}")
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
