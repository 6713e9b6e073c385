"""Smoke tests of the examples (the long-context training demo, the DPO and GRPO steps), at sizes
that run in seconds."""

import importlib.util
import re
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    # examples/ is not a package, so the script is loaded from its path.
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_demo():
    return load_example("train_long_context")


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


def test_dpo_and_grpo_steps(capsys):
    load_example("preference_and_rl").main(
        ["--seq-len", "96", "--vocab-size", "512", "--hidden-size", "64", "--layers", "2"]
    )
    out = capsys.readouterr().out
    # Both objectives ran under streambp and eagerly, with equal losses (the script checks).
    assert out.count("streambp   loss") == 2 and out.count("eager      loss") == 2, out
    assert out.count("streambp / eager: memory") == 2, out
