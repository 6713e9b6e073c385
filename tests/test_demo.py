"""Smoke test of the long-context training demo, at a size that runs in seconds."""

import importlib.util
import re
from pathlib import Path

DEMO_PATH = Path(__file__).resolve().parents[1] / "examples" / "train_long_context.py"


def load_demo():
    # examples/ is not a package, so the script is loaded from its path.
    spec = importlib.util.spec_from_file_location("train_long_context", DEMO_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_trains_compares_and_plots(tmp_path, capsys):
    plot_path = tmp_path / "memory.png"
    load_demo().main(
        [
            "--hidden-size", "32",
            "--layers", "2",
            "--heads", "2",
            "--kv-heads", "1",
            "--intermediate-size", "64",
            "--seq-len", "64",
            "--chunk-size", "16",  # several chunks per sequence, so the chunked path is exercised
            "--steps", "2",
            "--compare-lengths", "32", "64",
            "--repeats", "1",
            "--plot", str(plot_path),
            "--quiet",
        ]
    )

    out = capsys.readouterr().out
    assert "trained 2 steps" in out
    for method in ("eager", "checkpointing", "streambp"):
        # A table row: the method name followed by its peak memory.
        assert re.search(rf"^{method}\s+\d+\.\d", out, re.MULTILINE), f"no {method} row in:\n{out}"
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot_path.read_bytes().startswith(b"\x89PNG")
    else:
        assert "matplotlib is not installed" in out
