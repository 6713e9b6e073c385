"""Options of the ``streambp`` backend, as passed through ``torch.compile(..., options={...})``."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

INNER_COMPILERS = ("eager", "inductor")
LAYER_INPUTS = ("keep", "recompute", "offload")


@dataclasses.dataclass(frozen=True)
class StreamBPConfig:
    """
    chunk_size:     query tokens per chunk, in forward and backward, or "auto" (default):
                    the largest power of two <= hidden, within [64, 1024]. A causal chunk runs
                    without its mask (``prefix_attention``); the chunk's boolean mask, rebuilt
                    per chunk, holds chunk x T bytes (a quarter of a float32 hidden state at
                    most), and a padded one is converted to float for the attention kernel (4
                    bytes per element: up to one hidden state). Smaller chunks hold less memory
                    and run more, smaller matmuls (at hidden 1024, 1024-token chunks made the
                    SFT step 0.93x checkpointing's, 512-token ones 1.00x).
    head_chunk_size: tokens per chunk of the LM head and loss, or "auto" (default): a
                    chunk's widest value (its logits) holds about as many bytes as one
                    full-length hidden state, in a power of two, and at least half the hidden
                    size in rows of logits (batch x tokens), within [128, 512] (fewer spend
                    their time reading the LM-head weight).
                    At batch 1, hidden 256 and vocabulary 32768 in float32 that is 128 tokens
                    up to T=16384, then T/128; at Qwen3-4B's widths, 512 up to about 30k
                    tokens, then about T/59; at batch 4 and hidden 256, 32 tokens up to T=4096.
    memory_budget:  None (default): chunk sizes from the widths, as above. Otherwise the bytes
                    one chunk's working set may take, and each chunked op whose chunk size is
                    "auto" takes the largest power-of-two chunk whose estimated working set fits,
                    at the length of each call (fewer, larger chunks: larger matmuls, fewer
                    passes over the LM-head weight): an int (bytes), a float in (0, 1] (that
                    share of the device's memory: the GPU's, or the host's on the CPU), or
                    "auto" (half the free GPU memory at each call; on the CPU the same as None).
                    The estimate: the head holds 3 copies of its logits per chunk, a layer 4 of
                    its widest token-wise value plus 5 bytes per (query, key) pair of its mask.
                    The saved layer inputs, K/V and gradients come on top of it.
    inner_compiler: "eager" runs the non-layer graph through AOTAutograd without code
                    generation and the chunk subgraphs as they are (exact, no compile time);
                    "inductor" generates code for the non-layer graph and, through
                    torch.compile, for every chunk subgraph (a few compilations per subgraph
                    on the first step, as the chunk shapes settle).
    debug_dir:      if set, every graph after every pass is written there as readable Python
                    (NNN_<name>.py), plus ``report.txt``. Defaults to $STREAMBP_DEBUG_DIR.
    skip_logits:    False (default): the logits a model returns beside its loss are returned,
                    so they exist whole (the head's other values stay chunked). True: in a
                    graph that returns a loss requiring grad (a training step with
                    ``labels=``), outputs of the head wider per token than the hidden state
                    (the logits) come back as None and never exist whole, as with Liger
                    Kernel's ``skip_logits``; graphs under no_grad (evaluation, generation)
                    and graphs without a loss keep them. The report lists what was dropped.
    layer_inputs:   what backward finds of each chunked layer's input (B x T x hidden, the one
                    term of the method's memory that grows with the layer count): "keep"
                    (default) saves every layer's input; "recompute" saves only the inputs of
                    segment boundaries and recomputes the others in backward with the same
                    chunked forward (exact: the same values; one more forward of most layers):
                    with L layers about sqrt(2 L) inputs exist at once instead of L (16 layers:
                    6). "offload" saves every input in host memory: copied out after the layer's
                    forward (on CUDA on a side stream into pinned memory), reloaded during the
                    backward of the layer above, so the device holds about two at a time (on
                    CPU the same copies run host to host, saving nothing). Both apply to the
                    layers of one graph (not to layers compiled as graphs of their own: FSDP2
                    units, DDP's per-layer pieces).
    disable_passes: names of passes of ``sbp_compiler.pipeline.PASSES`` (or of its
                    ``BACKWARD_PASSES``) to skip, for debugging (``("head",)`` keeps the LM head
                    unchunked).
    """

    chunk_size: Union[int, str] = "auto"
    head_chunk_size: Union[int, str] = "auto"
    memory_budget: Union[None, int, float, str] = None
    inner_compiler: str = "eager"
    debug_dir: Optional[str] = None
    skip_logits: bool = False
    layer_inputs: str = "keep"
    disable_passes: tuple = ()

    def __post_init__(self):
        for name in ("chunk_size", "head_chunk_size"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"streambp option {name} must be a positive int or 'auto', got {value!r}")
        from .memory_budget import check_budget

        check_budget(self.memory_budget)
        if self.inner_compiler not in INNER_COMPILERS:
            raise ValueError(
                f"streambp option inner_compiler must be one of {INNER_COMPILERS}, got {self.inner_compiler!r}"
            )
        if self.layer_inputs not in LAYER_INPUTS:
            raise ValueError(f"streambp option layer_inputs must be one of {LAYER_INPUTS}, got {self.layer_inputs!r}")
        if self.layer_inputs == "offload" and self.inner_compiler == "inductor":
            raise ValueError("streambp option layer_inputs='offload' needs inner_compiler='eager': Inductor partitions "
                             "the graph itself, and its own offloading does not know the layer inputs")
        if not isinstance(self.skip_logits, bool):
            raise ValueError(f"streambp option skip_logits must be True or False, got {self.skip_logits!r}")
        if self.debug_dir is not None and not isinstance(self.debug_dir, (str, os.PathLike)):
            raise ValueError(f"streambp option debug_dir must be a path, got {self.debug_dir!r}")
        from .pipeline import PASS_NAMES

        if isinstance(self.disable_passes, str) or not all(isinstance(p, str) for p in self.disable_passes):
            raise ValueError(f"streambp option disable_passes must be a list of pass names, got {self.disable_passes!r}")
        unknown = sorted(set(self.disable_passes) - set(PASS_NAMES))
        if unknown:
            raise ValueError(f"streambp option disable_passes: unknown pass(es) {unknown}; the passes are {list(PASS_NAMES)}")
        object.__setattr__(self, "disable_passes", tuple(self.disable_passes))

    @classmethod
    def from_options(cls, options: Optional[dict]) -> "StreamBPConfig":
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown streambp option(s) {unknown}; valid options are {valid}")
        if options.get("debug_dir") is None and os.environ.get("STREAMBP_DEBUG_DIR"):
            options["debug_dir"] = os.environ["STREAMBP_DEBUG_DIR"]
        return cls(**options)


def auto_chunk_size(hidden_size: int) -> int:
    """The "auto" chunk size for a model of this width (see ``StreamBPConfig``)."""
    return min(1024, max(64, 1 << (max(1, hidden_size).bit_length() - 1)))
