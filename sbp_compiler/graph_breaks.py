"""What Dynamo's graph breaks mean for streambp, read from Dynamo's own record of them.

A graph without decoder layers is often a piece of a model that Dynamo split at a graph break.
One cause is common enough to name: a side effect inside a checkpointed layer (transformers
>= 5.25 routes every attention call through the ``kernels`` package, which sets a Python
variable), which Dynamo refuses to trace under ``torch.utils.checkpoint``. Every checkpointed
layer then runs in eager, checkpointed, unchunked: exact, without streambp's saving.
"""
from __future__ import annotations

import torch

CHECKPOINT_SIDE_EFFECT_HINT = (
    "Dynamo broke the graph inside torch.utils.checkpoint (a side effect in a checkpointed layer), so "
    "the checkpointed layers run outside any graph, unchunked. Switch gradient checkpointing off "
    "(model.gradient_checkpointing_disable(), TrainingArguments/SFTConfig(gradient_checkpointing=False)): "
    "streambp recomputes each layer in backward anyway; or let Dynamo skip replaying the side effect "
    "with torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True"
)


def checkpoint_side_effect_breaks() -> int:
    """How many graph breaks of this process Dynamo recorded for a side effect under checkpoint."""
    breaks = torch._dynamo.utils.counters.get("graph_break", {})
    return sum(count for reason, count in breaks.items()
               if "Unsafe side effect" in reason and "torch.utils.checkpoint" in reason)
