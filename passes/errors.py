"""The typed "can't chunk" reason every analysis raises.

The backend catches it and runs the region with ordinary autograd, so a pass that is unsure
never produces a wrong gradient: it raises, and the reason lands in the report.
"""
from __future__ import annotations

import enum


class Reason(enum.Enum):
    NO_SEQUENCE_DIM = "no sequence dimension found"
    NO_REPEATED_LAYERS = "no repeated decoder layers found"
    LAYER_OUTPUTS = "layer does not have exactly one output"
    LAYER_INPUT_UNKNOWN = "layer input with unknown sequence layout"
    NO_ATTENTION = "no attention found in layer"
    MULTIPLE_ATTENTION = "more than one attention in layer"
    SEQUENCE_MIXING = "sequence-mixing operation other than attention"
    UNKNOWN_OP = "operation without a sequence-dimension rule"
    NOT_CAUSAL = "attention is not causal"
    MASK_UNSUPPORTED = "attention mask construction not understood"
    DROPOUT = "dropout with p > 0 (random masks cannot be replayed exactly)"
    SHAPE_PROBE = "chunked layer failed the shape probe"
    PROBE_MISMATCH = "the chunked layer computed other values than the original on a probe"
    SHORT_SEQUENCE = "sequence not longer than one chunk"
    SEQUENCE_UNALIGNED = "a value meets the sequence axis without being known to run along it"
    HEAD_NOT_FOUND = "no token-wise head after the decoder layers"
    HEAD_NOTHING_INSIDE = "the head computes no value that its outputs do not already hold"
    HEAD_LAYOUT = "a head input or output whose sequence layout is not understood"
    RANDOM = "draws random numbers (a recomputed chunk would draw different ones)"
    MUTATION = "writes a tensor in place that the analysis cannot follow"
    INTERNAL_ERROR = "an error inside streambp (please report it); ordinary autograd runs instead"


class CannotChunk(Exception):
    """A region cannot be chunked; ``reason`` is machine-readable, ``detail`` says where."""

    def __init__(self, reason: Reason, detail: str = ""):
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
