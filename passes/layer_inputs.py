"""Which layer inputs stay saved for backward: option ``layer_inputs="recompute"``.

Each chunked layer op saves only its input, so after forward the graph holds L layer inputs
(``B x T x hidden`` each). With "recompute" only some of them (the segment boundaries) are
saved; the others are recomputed in backward from the nearest saved one below, by the same
chunked forward op (two-level checkpointing: bitwise the forward's values, so the gradients are
those of "keep").

The rewrite is a tag, not new code: the layer ops whose outputs are not saved get
``node.meta["recompute"] = MUST_RECOMPUTE``, the policy of PyTorch's own selective activation
checkpointing. AOTAutograd copies the tag onto the ops it traces from the node and its
partitioner leaves those outputs out of the saved tensors, recomputing them in backward where
they are first needed (``reordering_to_mimic_autograd_engine``), so a segment's inputs exist only
while its layers' backward runs.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from sbp_compiler.layer_pieces import layer_ops


@dataclasses.dataclass
class RecomputePlan:
    saved: list[int]  # layers (graph order) whose inputs stay saved
    recomputed: list[int]  # layers whose inputs are recomputed in backward
    peak_inputs: int  # layer inputs alive at once in backward, at most
    reason: Optional[str] = None  # why nothing is recomputed, if so


def segment_lengths(layers: int) -> list[int]:
    """Segment lengths, bottom (first layer) to top, that least the layer inputs alive at once.

    Backward runs the top segment first, while every boundary below it is still saved: segment i
    (from the bottom, 1-based) holds i boundaries plus its own len_i - 1 recomputed inputs at its
    top layer's backward. With at most P alive, len_i <= P - i + 1, so the smallest P has
    P (P + 1) / 2 >= L, about sqrt(2 L) (16 layers: 6 alive instead of 16; a uniform split into
    sqrt(L) segments of sqrt(L) layers holds 2 sqrt(L) - 1 = 7). Each layer outside the first of
    its segment runs its forward once more.
    """
    if layers <= 2:
        return [layers] if layers else []
    peak = 1
    while peak * (peak + 1) // 2 < layers:
        peak += 1
    lengths, left = [], layers
    for i in range(1, peak + 1):
        length = min(peak - i + 1, left)
        lengths.append(length)
        left -= length
        if not left:
            break
    return lengths


def _chain(calls: list[fx.Node]) -> bool:
    """Each layer's output is an input of the next one (directly: a node between them would be
    saved by the partitioner as the input of a recomputed region)."""
    for below, above in zip(calls, calls[1:]):
        tensors = above.args[1]
        if below not in tensors:
            return False
    return True


def tag_recomputed_layers(gm: fx.GraphModule) -> RecomputePlan:
    calls = layer_ops(gm)
    if len(calls) < 3:
        return RecomputePlan(list(range(len(calls))), [], len(calls), f"{len(calls)} chunked layer(s): nothing to gain")
    if not _chain(calls):
        return RecomputePlan(list(range(len(calls))), [], len(calls),
                             "the chunked layers do not feed each other directly")
    saved, start = [], 0
    for length in segment_lengths(len(calls)):
        saved.append(start)
        start += length
    recomputed = [j for j in range(len(calls)) if j not in saved]
    for j in recomputed:
        # Layer j's input is the output of layer j - 1: that op is recomputed, not saved.
        calls[j - 1].meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    peak = max(i + length - 1 for i, length in enumerate(segment_lengths(len(calls)), start=1))
    return RecomputePlan(saved, recomputed, peak)
