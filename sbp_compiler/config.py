"""Options of the ``streambp`` backend, as passed through ``torch.compile(..., options={...})``."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

INNER_COMPILERS = ("eager", "inductor")


@dataclasses.dataclass(frozen=True)
class StreamBPConfig:
    """
    chunk_size:     query tokens per chunk, in forward and backward. Smaller chunks hold less
                    memory per chunk and run more, smaller matmuls; 1024 keeps the per-chunk
                    working set small next to the O(T) saved layer inputs at long lengths.
    inner_compiler: "eager" runs the non-layer graph through AOTAutograd without code
                    generation (exact, no compile time); "inductor" generates code for it.
                    The chunk subgraphs run eagerly in both cases (for now).
    debug_dir:      if set, every graph after every pass is written there as readable Python
                    (NNN_<name>.py), plus ``report.txt``. Defaults to $STREAMBP_DEBUG_DIR.
    """

    chunk_size: int = 1024
    inner_compiler: str = "eager"
    debug_dir: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"streambp option chunk_size must be a positive int, got {self.chunk_size!r}")
        if self.inner_compiler not in INNER_COMPILERS:
            raise ValueError(
                f"streambp option inner_compiler must be one of {INNER_COMPILERS}, got {self.inner_compiler!r}"
            )
        if self.debug_dir is not None and not isinstance(self.debug_dir, (str, os.PathLike)):
            raise ValueError(f"streambp option debug_dir must be a path, got {self.debug_dir!r}")

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
