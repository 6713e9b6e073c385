"""One AOTAutograd graph per chunked layer, for DistributedDataParallel.

DDP reduces a parameter's gradient when autograd hands it over. One compiled graph is one
autograd node: every gradient of the model would be handed over at once, after the whole
backward, and no reduction could overlap it. Cut at layer boundaries (each piece ends with one
``streambp::layer`` op), each layer's weight gradients are final when its piece's backward
returns (the op has summed them over all its chunks), so DDP's reducer starts their all-reduce
then, while the earlier layers' backward runs. This is what Dynamo's DDPOptimizer does at DDP's
bucket boundaries, which cut through layers; its own splitting and submodule compiler are
reused here, at the layers' boundaries.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

DDP_OPTIMIZER_PIECE = "DDPOptimizer intentional graph-break"
DDP_OPTIMIZER_HINT = (
    "Dynamo's DDPOptimizer cut this model's graph at DDP's bucket boundaries, through its decoder layers, "
    "and a layer cut in two runs unchunked; set torch._dynamo.config.optimize_ddp = False before the first "
    "compiled call: streambp then cuts the graph itself, one piece per layer, so that DDP reduces each "
    "layer's gradients as soon as its backward returns"
)


def active_ddp_module() -> Optional[torch.nn.Module]:
    """The DistributedDataParallel module whose forward is being compiled, if any."""
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module()


def is_ddp_optimizer_piece(gm: fx.GraphModule) -> bool:
    """``gm`` is one of the pieces Dynamo's DDPOptimizer cut a graph into (it marks them)."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    return DDP_OPTIMIZER_PIECE in str(getattr(reason, "reason", ""))


def wants_layer_pieces(gm: fx.GraphModule) -> bool:
    """Under DDP with Dynamo's DDPOptimizer off, a graph with two or more chunked layers is cut
    into one piece per layer."""
    from torch._dynamo.utils import get_optimize_ddp_mode

    if active_ddp_module() is None or get_optimize_ddp_mode() == "ddp_optimizer":
        return False
    return len(layer_ops(gm)) >= 2


def layer_ops(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.streambp.layer.default]


def compile_layer_pieces(gm: fx.GraphModule, example_inputs, compile_piece: Callable) -> fx.GraphModule:
    """``gm`` cut after every ``streambp::layer`` op (what follows the last layer, the head and
    loss, is the last piece), each piece compiled by ``compile_piece(piece, fake_inputs)``."""
    from torch._dynamo.backends.distributed import SubmodCompiler, propagate_dynamo_source, propagate_metadata
    from torch._guards import detect_fake_mode
    from torch.fx.passes.split_module import split_module

    ends = set(layer_ops(gm))
    partition, piece = {}, 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        partition[node] = piece
        piece += node in ends
    pieces = split_module(gm, None, lambda node: partition[node])
    propagate_dynamo_source(gm, pieces)
    propagate_metadata(gm, pieces)
    fake_mode = detect_fake_mode(example_inputs) or torch._subclasses.fake_tensor.FakeTensorMode()
    with torch._dynamo.utils._disable_saved_tensors_hooks_during_tracing():
        SubmodCompiler(pieces, compile_piece, fake_mode).run(*example_inputs)
    pieces.recompile()
    log.info("streambp: graph cut into %d pieces, one per chunked layer, for DDP", len(pieces.meta["partition_names"]))
    return pieces
