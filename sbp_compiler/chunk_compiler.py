"""Inductor for the chunk subgraphs (``inner_compiler="inductor"``).

Each chunk subgraph (a layer's K/V, query-chunk and mask graphs, the head's chunk graph) is
wrapped in ``torch.compile``. Dynamo's automatic dynamic shapes settle on the chunk shapes by
themselves: the first chunk compiles static, the second marks the growing key/value prefix
dynamic, the last (shorter) chunk may add one more graph; grad mode (forward under no_grad,
backward with grad) is guarded too. A graph whose recompile limit is reached runs eagerly, so a
result never depends on compilation.
"""
from __future__ import annotations

import types
from typing import Callable

import torch
import torch.fx as fx


def compiled_chunk_graph(name: str, gm: fx.GraphModule) -> Callable:
    def run(*args):
        return gm(*args)

    # Dynamo keeps its cache and recompile limit per code object: a code object of its own per
    # subgraph keeps one subgraph's recompilations from using up another's.
    code = run.__code__.replace(co_name="streambp_" + "".join(c if c.isalnum() else "_" for c in name))
    run = types.FunctionType(code, run.__globals__, code.co_name, None, run.__closure__)
    compiled = torch.compile(run, backend="inductor")

    def call(*args):
        # While the backend itself runs (the probes, inside Dynamo's compilation of the user's
        # graph), the subgraph runs as it is.
        if torch.compiler.is_compiling():
            return gm(*args)
        return compiled(*args)

    return call
