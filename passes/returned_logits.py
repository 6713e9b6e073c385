"""Logits a training step returns beside its loss, not returned (the ``skip_logits`` option).

``model(input_ids=ids, labels=ids)`` returns the loss and the ``[batch, seq, vocab]`` logits.
The head pass keeps every value of the LM head one chunk at a time, except what leaves the graph:
returned logits have to exist whole (1 GiB in float32 at 8k tokens and a 32k vocabulary), which
is most of such a step's peak. Liger Kernel's convention (``skip_logits``) is to return no logits
in training steps that compute a loss; the option does the same here, in the compiled graph: the
graph output slot of such a value becomes ``None``, so ``outputs.logits is None`` (a clear
failure for code that reads them, never values that differ from eager's).

Only in a graph that returns a loss with autograd on (a scalar computed after the layers that
requires grad): graphs traced under ``torch.no_grad()`` (evaluation, ``prediction_step``,
generation) or without a loss (the caller computes it from the logits) keep their logits.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .fx_utils import descendants, eliminate_dead_code, example
from .seq_dims import size_hint


def _per_token_elements(value: torch.Tensor, full_length: int) -> int:
    return math.prod(size_hint(s) for s in value.shape) // max(1, full_length)


def skip_returned_logits(gm: fx.GraphModule, last_layer_output: fx.Node, full_length: int) -> list[str]:
    """Replace by ``None`` every graph output computed after ``last_layer_output`` that is wider
    per token than the hidden state (the logits, their float copy), if the graph also returns a
    loss that requires grad. Returns the names and shapes of the outputs dropped."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned = output.args[0]
    if not isinstance(returned, (tuple, list)):
        return []
    after = descendants(last_layer_output)
    hidden = example(last_layer_output)
    if not isinstance(hidden, torch.Tensor):
        return []
    width = _per_token_elements(hidden, full_length)

    computed = {v: example(v) for v in returned
                if isinstance(v, fx.Node) and v in after and isinstance(example(v), torch.Tensor)}
    if not any(t.dim() == 0 and t.is_floating_point() and t.requires_grad for t in computed.values()):
        return []  # no loss to train with: the caller needs the logits
    wide = {v for v, t in computed.items() if t.dim() >= 2 and _per_token_elements(t, full_length) > width}
    if not wide:
        return []
    output.args = (type(returned)(None if v in wide else v for v in returned),)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    return [f"{v.name} {tuple(example(v).shape)}" for v in returned if v in wide]
