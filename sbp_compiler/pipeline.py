"""The pass pipeline: a visible list of named passes with one signature, and the runner.

Each pass is ``(gm, state) -> None``: it rewrites ``gm`` in place and records what it decided
in ``state.report``. The runner times every pass, dumps the graph after it (``debug_dir``,
``TORCH_LOGS="+sbp_compiler"``), skips the passes named in the ``disable_passes`` option, and is
the safety net: an exception a pass did not turn into a typed refusal puts the graph back as
Dynamo handed it over, records the error as the reason, and the graph runs with ordinary
autograd. The backend never fails where ``aot_eager`` would run.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from passes.constant_sizes import fold_constant_sizes
from passes.errors import CannotChunk, Reason
from passes.functionalize import Functionalized, functionalize
from passes.fx_utils import restore_graph, snapshot_graph
from passes.head import outline_head
from passes.layer_inputs import tag_recomputed_layers
from passes.find_layers import WHOLE_GRAPH_LAYER
from passes.outline import GraphContext, head_only_context, outline_layers
from passes.returned_logits import skip_returned_logits
from passes.token_losses import split_token_losses

from .autocast import AutocastState
from .config import StreamBPConfig
from .head_runtime import HeadPlan
from .layer_pieces import wants_layer_pieces
from .runtime import LayerPlan
from .graph_breaks import CHECKPOINT_SIDE_EFFECT_HINT, checkpoint_side_effect_breaks
from .report import GraphReport

log = logging.getLogger("sbp_compiler.pipeline")


@dataclasses.dataclass
class PassState:
    """What the passes share while one graph is compiled."""

    config: StreamBPConfig
    report: GraphReport
    example_inputs: list
    wrap_subgraph: Callable[[str, fx.GraphModule], Callable]
    autocast: AutocastState
    functionalized: Optional[Functionalized] = None
    graph: Optional[GraphContext] = None  # set by the layer pass, read by the head pass
    plans: list = dataclasses.field(default_factory=list)  # the plans of the chunked ops: owned by the compiled graph
    offload_layer_inputs: bool = False  # set by the layer_inputs pass, done after AOTAutograd's partition

    @property
    def mutated(self) -> set:
        """Values an in-place write left in the graph touches (a region reading one is refused)."""
        return self.functionalized.mutated if self.functionalized else set()


def constant_sizes_pass(gm: fx.GraphModule, state: PassState) -> None:
    state.report.folded_sizes = fold_constant_sizes(gm)


def functionalize_pass(gm: fx.GraphModule, state: PassState) -> None:
    state.functionalized = functionalize(gm)
    state.report.functionalized = state.functionalized.rewritten
    state.report.in_place = {n.name: why for n, why in state.functionalized.remaining.items()}


def token_losses_pass(gm: fx.GraphModule, state: PassState) -> None:
    state.report.head.split_losses = split_token_losses(gm)


def layers_pass(gm: fx.GraphModule, state: PassState) -> None:
    try:
        state.graph = outline_layers(gm, state.example_inputs, state.config.chunk_size, state.report,
                                     state.wrap_subgraph, mutated=state.mutated, autocast=state.autocast,
                                     plans=state.plans)
    except CannotChunk as refusal:
        if refusal.reason is Reason.NO_REPEATED_LAYERS and _head_only(gm, state):
            return
        detail = refusal.detail
        if refusal.reason is Reason.NO_REPEATED_LAYERS and checkpoint_side_effect_breaks():
            detail = f"{detail}; {CHECKPOINT_SIDE_EFFECT_HINT}"
            warn_once(CHECKPOINT_SIDE_EFFECT_HINT)
        state.report.fallback, state.report.fallback_detail = refusal.reason, detail
        return
    if [layer.path for layer in state.report.layers] == [WHOLE_GRAPH_LAYER]:
        state.report.add_scope("one decoder layer (each layer is a graph of its own: FSDP2 units, or layers compiled one by one)")
        state.report.head.absent = True
        state.graph = None  # the head is in another graph


def _head_only(gm: fx.GraphModule, state: PassState) -> bool:
    """A graph without layers that starts from a hidden state (an FSDP2 root's loss, after the
    layers' own graphs): the head pass runs from that input."""
    try:
        context = head_only_context(gm, state.example_inputs, state.config.chunk_size, state.report,
                                    state.wrap_subgraph, mutated=state.mutated, autocast=state.autocast, plans=state.plans)
    except CannotChunk:
        return False
    if context is None:
        return False
    state.graph = context
    state.report.add_scope(f"no decoder layers; the head starts at the graph input {context.last_layer_output.name} "
                           "(hidden states computed by an earlier graph)")
    return True


_WARNED: set = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("streambp: %s", message)


def skip_logits_pass(gm: fx.GraphModule, state: PassState) -> None:
    if not state.config.skip_logits or state.graph is None or state.graph.last_layer_output is None:
        return
    state.report.head.skip_logits = True
    state.report.head.skipped_logits = skip_returned_logits(gm, state.graph.last_layer_output, state.graph.full_length)


def head_pass(gm: fx.GraphModule, state: PassState) -> None:
    if state.graph is None or state.graph.last_layer_output is None:
        return
    try:
        outline_head(state.graph, state.config.head_chunk_size, state.report.head)
    except CannotChunk as refusal:
        state.report.head.reason, state.report.head.detail = refusal.reason, refusal.detail
        log.info("streambp: head not chunked: %s", refusal)


def memory_budget_pass(gm: fx.GraphModule, state: PassState) -> None:
    """Option memory_budget: the plans whose chunk size is "auto" take it from the budget."""
    budget = state.config.memory_budget
    if budget is None:
        return
    device = next((x.device for x in state.example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    for plan in state.plans:
        if isinstance(plan, LayerPlan) and state.config.chunk_size == "auto":
            plan.memory_budget = budget
        elif isinstance(plan, HeadPlan) and state.config.head_chunk_size == "auto":
            plan.memory_budget = budget
    layers = [p for p in state.plans if isinstance(p, LayerPlan) and p.memory_budget is not None]
    full = state.graph.full_length if state.graph is not None else None
    if layers and full:
        state.report.chunk_size = (f"from memory_budget={budget!r} (now {layers[0].chunk_length(full, device)} of "
                                   f"{full} tokens)")
    head = next((p for p in state.plans if isinstance(p, HeadPlan) and p.memory_budget is not None), None)
    if head is not None and full:
        state.report.head.chunk_size = (f"from memory_budget={budget!r} (now {head.chunk_length(full, device)} of "
                                        f"{full} tokens)")


def layer_inputs_pass(gm: fx.GraphModule, state: PassState) -> None:
    mode = state.config.layer_inputs
    if mode == "keep" or not state.report.chunked_layers:
        return
    if wants_layer_pieces(gm):
        state.report.layer_inputs = (f"all saved (option layer_inputs={mode!r}: under DDP the layers are compiled "
                                     "as pieces of their own, and a piece's input is saved by its piece)")
        return
    if mode == "offload":
        # Done after AOTAutograd's partition (passes/offload.py), which says what forward saves.
        state.report.layer_inputs = "all saved on the device (option layer_inputs='offload': no graph needing backward)"
        state.offload_layer_inputs = True
        return
    plan = tag_recomputed_layers(gm)
    if plan.reason:
        state.report.layer_inputs = f"all saved (option layer_inputs='recompute': {plan.reason})"
        return
    state.report.layer_inputs = (
        f"{len(plan.saved)} of {len(plan.saved) + len(plan.recomputed)} saved (layers {plan.saved}), the others "
        f"recomputed in backward from the one below (option layer_inputs='recompute'); at most {plan.peak_inputs} "
        "exist at once in backward"
    )


PASSES: list[tuple[str, Callable[[fx.GraphModule, PassState], None]]] = [
    ("functionalize", functionalize_pass),  # in-place writes out of place, so the analyses see the data flow
    # After functionalize, which tells aliases apart by the fake values' storages (made anew here).
    ("constant_sizes", constant_sizes_pass),  # sizes Dynamo's guards pin to a value -> ints, as in a static graph
    ("token_losses", token_losses_pass),  # cross_entropy(reduction=sum|mean) -> per-token losses + sum
    ("layers", layers_pass),  # each decoder layer -> streambp::layer
    ("skip_logits", skip_logits_pass),  # option skip_logits: returned logits -> None beside a loss
    ("head", head_pass),  # LM head and loss -> streambp::head
    ("memory_budget", memory_budget_pass),  # option memory_budget: chunk sizes from a budget
    ("layer_inputs", layer_inputs_pass),  # layer_inputs="recompute": layer ops tagged for recompute ("offload":
    # after AOTAutograd's partition, passes/offload.py)
]
# Passes on AOTAutograd's backward graph, run by the eager inner compiler (not by Inductor, which
# compiles the joint graph itself): named here so that ``disable_passes`` can skip them too.
BACKWARD_PASSES = ("gradient_in_place",)  # passes/gradient_in_place.py: dx written over dy
PASS_NAMES = tuple(name for name, _ in PASSES) + BACKWARD_PASSES


def run_passes(gm: fx.GraphModule, state: PassState, dump: Callable[[str, fx.GraphModule], None]) -> None:
    """Run every enabled pass on ``gm``; on an unexpected error, restore ``gm`` as it came."""
    original = snapshot_graph(gm)
    timings = state.report.pass_seconds
    for name, run in PASSES:
        if name in state.config.disable_passes:
            timings[name] = None
            continue
        started = time.perf_counter()
        try:
            run(gm, state)
        except Exception as error:  # the safety net: a bug of ours must not fail the user's step
            restore_graph(gm, original)
            state.report.layers.clear()
            state.report.head = type(state.report.head)()
            state.report.fallback = Reason.INTERNAL_ERROR
            state.report.fallback_detail = f"pass {name}: {type(error).__name__}: {error}"[:800]
            log.warning("streambp: pass %s failed, the graph runs unchunked: %s", name, error)
            log.debug("%s", traceback.format_exc())
            return
        finally:
            timings[name] = time.perf_counter() - started
        dump(name, gm)
