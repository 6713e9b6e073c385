"""The ``streambp`` torch.compile backend.

    torch.compile(model, backend="streambp", options={"chunk_size": 1024})

Dynamo graph -> pass pipeline (decoder layers become chunked custom ops) -> AOTAutograd with the
inner compiler. Found through the ``torch_dynamo_backends`` entry point, so users need no import.
"""
from __future__ import annotations

import itertools
import logging
import os
from typing import Callable, Optional

import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop

from passes.errors import CannotChunk
from passes.head import outline_head
from passes.outline import GraphContext, outline_layers
from passes.token_losses import split_token_losses

from .chunk_compiler import compiled_chunk_graph
from .config import StreamBPConfig
from .report import GraphReport, new_report

log = logging.getLogger(__name__)
graph_log = logging.getLogger(__name__ + ".graphs")


class _Dumper:
    """Writes each graph as ``NNN_<name>.py`` into the debug directory, and logs it."""

    def __init__(self, config: StreamBPConfig, report: GraphReport):
        self.directory = None
        if config.debug_dir:
            self.directory = os.path.join(os.fspath(config.debug_dir), f"graph_{report.graph_id:03d}")
            os.makedirs(self.directory, exist_ok=True)
        self.counter = itertools.count()

    def __call__(self, name: str, gm: fx.GraphModule) -> None:
        code = gm.print_readable(print_output=False)
        graph_log.debug("streambp %s:\n%s", name, code)
        if self.directory:
            path = os.path.join(self.directory, f"{next(self.counter):03d}_{name.replace('/', '_')}.py")
            with open(path, "w") as f:
                f.write(code)

    def text(self, name: str, text: str) -> None:
        if self.directory:
            with open(os.path.join(self.directory, name), "w") as f:
                f.write(text + "\n")


def _inner_compile(config: StreamBPConfig, dump: _Dumper, gm: fx.GraphModule, example_inputs):
    if config.inner_compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    def keep(name):
        def compiler(graph: fx.GraphModule, inputs):
            dump(name, graph)
            # Boxed calling convention: the graph clears its argument list, so each saved tensor
            # (a layer's input, the head's gradients) is freed after its last use in backward,
            # not when the whole backward returns.
            return boxed_nop(graph, inputs)

        return compiler

    return aot_autograd(fw_compiler=keep("aot_forward"), bw_compiler=keep("aot_backward"))(gm, example_inputs)


def _subgraph_runner(config: StreamBPConfig, dump: _Dumper) -> Callable[[str, fx.GraphModule], Callable]:
    def wrap(name: str, gm: fx.GraphModule) -> Callable:
        dump(name, gm)
        if config.inner_compiler == "inductor":
            return compiled_chunk_graph(name, gm)
        return gm

    return wrap


def _outline_head(config: StreamBPConfig, report: GraphReport, graph: GraphContext) -> None:
    if graph.last_layer_output is None:
        return
    try:
        outline_head(graph, config.head_chunk_size, report.head)
    except CannotChunk as refusal:
        report.head.reason, report.head.detail = refusal.reason, refusal.detail
        log.info("streambp: head not chunked: %s", refusal)


def streambp(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None):
    """The backend: rewrite the decoder layers of ``gm`` for chunked backward, then compile."""
    config = StreamBPConfig.from_options(options)
    report = new_report(config.chunk_size)
    dump = _Dumper(config, report)
    dump("dynamo", gm)
    wrap = _subgraph_runner(config, dump)
    report.head.split_losses = split_token_losses(gm)
    if report.head.split_losses:
        dump("token_losses", gm)
    try:
        graph = outline_layers(gm, example_inputs, config.chunk_size, report, wrap)
    except CannotChunk as refusal:
        report.fallback, report.fallback_detail = refusal.reason, refusal.detail
    else:
        dump("layers", gm)
        _outline_head(config, report, graph)
    dump("streambp", gm)
    dump.text("report.txt", str(report))
    log.info("%s", report)
    return _inner_compile(config, dump, gm, example_inputs)
