"""The ``streambp`` torch.compile backend.

    torch.compile(model, backend="streambp", options={"chunk_size": 1024})

Dynamo graph -> pass pipeline (decoder layers become chunked custom ops) -> AOTAutograd with the
inner compiler. Found through the ``torch_dynamo_backends`` entry point, so users need no import.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
from typing import Callable, Optional

import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._logging import trace_structured

from passes.fx_utils import restore_graph, snapshot_graph
from passes.gradient_in_place import write_gradients_over_incoming
from passes.offload import offload_layer_inputs

from .autocast import AutocastState
from .chunk_compiler import compiled_chunk_graph
from .config import StreamBPConfig
from .layer_pieces import DDP_OPTIMIZER_HINT, compile_layer_pieces, is_ddp_optimizer_piece, wants_layer_pieces
from .pipeline import PassState, run_passes, warn_once
from .report import GraphReport, new_report

log = logging.getLogger(__name__)
graph_log = logging.getLogger(__name__ + ".graphs")


def _file_name(name: str, limit: int = 120) -> str:
    """A file name for a graph name: safe characters, and short (module paths can be long)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    if len(safe) <= limit:
        return safe
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{safe[:limit // 2]}_{digest}_{safe[-(limit // 2 - 12):]}"


class _Dumper:
    """Every graph after every pass, and the report, for people debugging: as tlparse artifacts
    (``TORCH_TRACE=/dir``, ``torch._logging.trace_structured``), in the ``sbp_compiler.graphs``
    log (``TORCH_LOGS="+sbp_compiler"``), and as ``NNN_<name>.py`` in the debug directory."""

    def __init__(self, config: StreamBPConfig, report: GraphReport):
        self.directory = None
        if config.debug_dir:
            self.directory = os.path.join(os.fspath(config.debug_dir), f"graph_{report.graph_id:03d}")
            os.makedirs(self.directory, exist_ok=True)
        self.counter = itertools.count()
        self.graph_id = report.graph_id

    def _artifact(self, name: str, payload: Callable[[], str]) -> None:
        # The payload is only computed when a structured trace is being written.
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": f"streambp_graph_{self.graph_id:03d}_{name}", "encoding": "string"},
            payload_fn=payload,
        )

    def __call__(self, name: str, gm: fx.GraphModule) -> None:
        code = None

        def readable() -> str:
            nonlocal code
            if code is None:
                code = gm.print_readable(print_output=False)
            return code

        index = next(self.counter)  # a pass and a subgraph may share a name ("head")
        self._artifact(f"{index:03d}_{name}", readable)
        if graph_log.isEnabledFor(logging.DEBUG):
            graph_log.debug("streambp %s:\n%s", name, readable())
        if self.directory:
            path = os.path.join(self.directory, f"{index:03d}_{_file_name(name)}.py")
            with open(path, "w") as f:
                f.write(readable())

    def text(self, name: str, text: str) -> None:
        self._artifact(name, lambda: text)
        if self.directory:
            with open(os.path.join(self.directory, name), "w") as f:
                f.write(text + "\n")


# Plans of compiled code that cannot hold attributes: kept for the process's life.
_UNOWNED_PLANS: list = []


def _owned(compiled, plans: list):
    """``compiled`` holding ``plans``: the chunked ops' plans live as long as the code that calls
    them (Dynamo drops it on recompilation or ``torch._dynamo.reset()``). Dynamo keeps the
    innermost function of a ``torch._dynamo.disable`` chain (Inductor returns one), so every
    function of the chain holds them."""
    target, seen = compiled, set()
    while target is not None and id(target) not in seen:
        seen.add(id(target))
        try:
            target._streambp_plans = plans
        except AttributeError:
            _UNOWNED_PLANS.append(plans)
            break
        target = getattr(target, "_torchdynamo_orig_callable", None)
    return compiled


def _offloading_partition(report: GraphReport):
    """AOTAutograd's default partition, then the saved layer inputs moved to host memory
    (``passes/offload.py``): only the partitioned graphs say what forward saves."""

    def partition(joint, joint_inputs, *args, num_fwd_outputs, **kwargs):
        def default():
            return min_cut_rematerialization_partition(joint, joint_inputs, *args, num_fwd_outputs=num_fwd_outputs,
                                                       **kwargs)

        fw, bw = default()
        try:
            report.layer_inputs = offload_layer_inputs(fw, bw, num_fwd_outputs).describe()
        except Exception as error:  # the safety net: partly rewritten graphs are dropped, nothing offloaded
            log.warning("streambp: layer inputs not offloaded: %s: %s", type(error).__name__, error)
            report.layer_inputs = f"all saved on the device (option layer_inputs='offload' failed: {error})"
            fw, bw = default()
        return fw, bw

    return partition


def _write_gradients_over_incoming(bw: fx.GraphModule, report: GraphReport) -> None:
    """``passes/gradient_in_place.py`` on a backward graph; on an error of ours, the graph as it was."""
    original = snapshot_graph(bw)
    try:
        result = write_gradients_over_incoming(bw)
    except Exception as error:  # the safety net: the layers' backward as AOTAutograd made it
        restore_graph(bw, original)
        log.warning("streambp: pass gradient_in_place failed, backward left as it was: %s: %s",
                    type(error).__name__, error)
        return
    if result.layers:
        text = result.describe()
        report.gradients_in_place = f"{report.gradients_in_place}; {text}" if report.gradients_in_place else text


def _compile_graph(config: StreamBPConfig, dump: _Dumper, gm: fx.GraphModule, example_inputs, plans: list,
                   piece: str = "", offload_report: Optional[GraphReport] = None,
                   report: Optional[GraphReport] = None):
    """``gm`` through AOTAutograd with the inner compiler; its compiled code owns ``plans``.
    With ``offload_report``, the saved layer inputs go to host memory (``layer_inputs="offload"``)
    and the report says which."""
    if config.inner_compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return _owned(compile_fx(gm, example_inputs), plans)

    def keep(name):
        def compiler(graph: fx.GraphModule, inputs):
            if report is not None and name.startswith("aot_backward") and "gradient_in_place" not in config.disable_passes:
                _write_gradients_over_incoming(graph, report)
            dump(name, graph)
            # The forward and backward graphs own the plans too: a backward still pending
            # when Dynamo drops the forward's code can run.
            graph._streambp_plans = plans
            # Boxed calling convention: the graph clears its argument list, so each saved tensor
            # (a layer's input, the head's gradients) is freed after its last use in backward,
            # not when the whole backward returns.
            return boxed_nop(graph, inputs)

        return compiler

    extra = {}
    if offload_report is not None:
        extra["partition_fn"] = _offloading_partition(offload_report)
    compiled = aot_autograd(fw_compiler=keep(f"aot_forward{piece}"), bw_compiler=keep(f"aot_backward{piece}"),
                            **extra)(gm, example_inputs)
    return _owned(compiled, plans)


def _inner_compile(config: StreamBPConfig, dump: _Dumper, gm: fx.GraphModule, example_inputs, state: PassState):
    plans, report = state.plans, state.report
    if not wants_layer_pieces(gm):
        return _compile_graph(config, dump, gm, example_inputs, plans,
                              offload_report=report if state.offload_layer_inputs else None, report=report)
    counter = itertools.count()

    def compile_piece(piece: fx.GraphModule, inputs):
        return _compile_graph(config, dump, piece, inputs, plans, piece=f"_piece_{next(counter)}", report=report)

    pieces = compile_layer_pieces(gm, example_inputs, compile_piece)
    report.pieces = len(pieces.meta["partition_names"])
    dump("pieces", pieces)
    return _owned(pieces, plans)


def _subgraph_runner(config: StreamBPConfig, dump: _Dumper, autocast: AutocastState) -> Callable[[str, fx.GraphModule], Callable]:
    """How every chunk subgraph (K/V, query chunk, mask, head) runs: Inductor-compiled or as it
    is, under the autocast state the graph was traced with (AOTAutograd runs its graphs with
    autocast off, and our ops run inside them)."""

    def wrap(name: str, gm: fx.GraphModule) -> Callable:
        dump(name, gm)
        run = compiled_chunk_graph(name, gm) if config.inner_compiler == "inductor" else gm
        return autocast.wrap(run)

    return wrap


def streambp(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None):
    """The backend: rewrite the decoder layers and the head of ``gm`` for chunked backward
    (``pipeline.PASSES``), then compile with AOTAutograd."""
    config = StreamBPConfig.from_options(options)
    report = new_report(config.chunk_size)
    dump = _Dumper(config, report)
    dump("dynamo", gm)
    autocast = AutocastState.current()
    report.autocast = str(autocast)
    ddp_optimizer_piece = is_ddp_optimizer_piece(gm)
    if ddp_optimizer_piece:
        report.add_scope("a piece of a graph cut by Dynamo's DDPOptimizer at DDP's bucket boundaries")
    state = PassState(config, report, list(example_inputs), _subgraph_runner(config, dump, autocast), autocast)
    run_passes(gm, state, dump)
    if ddp_optimizer_piece and (report.fallback or len(report.chunked_layers) < len(report.layers)):
        report.hints.append(DDP_OPTIMIZER_HINT)
        warn_once(DDP_OPTIMIZER_HINT)
    dump("streambp", gm)
    compiled = _inner_compile(config, dump, gm, example_inputs, state)
    dump.text("report.txt", str(report))
    log.info("%s", report)
    return compiled
