"""Smoke tests of the examples (the long-context training demo, the DPO and GRPO steps), at sizes
that run in seconds."""

import importlib.util
import json
import re
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_script(path):
    # examples/ and benchmarks/ are not packages, so a script is loaded from its path (and
    # registered, as dataclasses look their module up).
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def load_example(name):
    return load_script(EXAMPLES / f"{name}.py")


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


def test_benchmark_script(tmp_path, capsys):
    module = load_script(EXAMPLES.parent / "benchmarks" / "memory_and_time.py")
    json_path = tmp_path / "points.json"
    module.main(["--lengths", "64", "128", "--methods", "eager", "checkpointing", "streambp",
                 "--objectives", "sft", "grpo", "--hidden-size", "64", "--layers", "2", "--vocab-size", "512",
                 "--budget-mb", "32", "--json", str(json_path)])
    out = capsys.readouterr().out
    assert "| 128 |" in out and "Longest sequence under 32 MB" in out, out
    points = json.loads(json_path.read_text())["points"]
    assert len(points) == 2 * 3 * 2 and all(p["peak_bytes"] > 0 for p in points)


def test_trainer_benchmark_script(tmp_path, capsys):
    module = load_script(EXAMPLES.parent / "benchmarks" / "trainer_memory.py")
    json_path = tmp_path / "trainer.json"
    module.main(["--length", "96", "--methods", "checkpointing", "streambp", "--hidden-size", "64", "--layers", "2",
                 "--vocab-size", "2048", "--json", str(json_path)])
    out = capsys.readouterr().out
    assert "| checkpointing |" in out and "| streambp |" in out, out
    results = json.loads(json_path.read_text())["results"]
    # The logits (96 x 2048 floats) are the largest activation here: streambp keeps none whole.
    assert results["streambp"]["peak_bytes"] < results["checkpointing"]["peak_bytes"], results


def test_benchmark_confirmation_run(capsys):
    module = load_script(EXAMPLES.parent / "benchmarks" / "memory_and_time.py")
    module.main(["--lengths", "64", "128", "--methods", "checkpointing", "streambp", "--objectives", "sft",
                 "--hidden-size", "64", "--layers", "2", "--vocab-size", "512", "--budget-mb", "24", "--confirm"])
    out = capsys.readouterr().out
    confirmed = re.findall(r"(\w+) at (\d+): ([\d.]+) MB \((within|OVER) budget\)", out)
    assert [m for m, *_ in confirmed] == ["checkpointing", "streambp"], out
    # The fit is a straight line through two points; the confirmation checks it at a longer length.
    assert all(float(mb) <= 24 * 1.05 for _, _, mb, _ in confirmed), out


def test_real_shapes_script(capsys):
    module = load_script(EXAMPLES.parent / "benchmarks" / "real_shapes.py")
    # A tiny stand-in for the real widths (this module's own table, not global state).
    module.SHAPES["tiny"] = dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=4096, tie_word_embeddings=False,
                                 full_depth=8)
    module.main(["--shapes", "tiny", "--layers", "1", "2", "--check-layers", "3", "--lengths", "256", "512",
                 "--chunk-size", "32", "--budget-gb", "0.1"])
    out = capsys.readouterr().out
    assert out.count("| checkpointing |") == 4 and out.count("| streambp |") == 4, out
    # The 3-layer peaks are printed against the fit's prediction, not fitted.
    checks = re.findall(r"- (\w+), 3 layers, T=(\d+): measured .*\(([\d.]+)x\)", out)
    assert len(checks) == 4, out
    # Checkpointing holds the logits of every token (4096 floats and their gradients); streambp a
    # chunk's worth, so its longest sequence is several times longer.
    ratio = float(re.search(r"longest sequence: \*\*([\d.]+)x\*\*", out).group(1))
    assert ratio > 4, out
    # Per layer_inputs mode, from streambp's fit: 8, 4 and 2 of the 8 inputs on the device, so
    # each mode reaches further than the one before, for both kinds of fixed cost.
    rows = re.findall(r"\| tiny, float32 \| (weights and their gradients|frozen weights)[^|]*\| `(\w+)` \| "
                      r"(\d+) of 8 \| [\d.]+ kB \| ([\d,]+) \|", out)
    assert [(mode, alive) for _, mode, alive, _ in rows] == [("keep", "8"), ("recompute", "4"), ("offload", "2")] * 2, out
    for holds in ("weights and their gradients", "frozen weights"):
        longest = [int(n.replace(",", "")) for what, _, _, n in rows if what == holds]
        assert longest[0] < longest[1] < longest[2], (holds, longest)


def test_compile_time_script(capsys):
    module = load_script(EXAMPLES.parent / "benchmarks" / "compile_time.py")
    module.main(["--methods", "streambp", "--length", "64", "--hidden-size", "64", "--layers", "1",
                 "--vocab-size", "256", "--steps", "1"])
    out = capsys.readouterr().out
    assert re.search(r"\| streambp \| [\d.]+ s \| -?[\d.]+ s \| [\d.]+ s \|", out), out


def test_profile_script(capsys):
    module = load_script(EXAMPLES.parent / "benchmarks" / "profile_step.py")
    module.main(["--method", "streambp", "--length", "64", "--hidden-size", "64", "--layers", "2",
                 "--vocab-size", "256", "--rows", "200"])
    out = capsys.readouterr().out
    # The table lists the chunked ops of the profiled step.
    assert "Self CPU" in out and "streambp::layer_backward" in out and "streambp::head_backward" in out, out


def test_plot_script_merges_runs_by_method(tmp_path):
    module = load_script(EXAMPLES.parent / "benchmarks" / "plot_memory.py")

    def run(name, points):
        path = tmp_path / name
        path.write_text(json.dumps({"setup": "tiny; torch", "points": [
            {"method": m, "objective": o, "length": t, "peak_bytes": b} for m, o, t, b in points]}))
        return str(path)

    short = run("short.json", [("streambp", "sft", 1024, 10), ("checkpointing", "sft", 1024, 40),
                               ("budget0", "sft", 1024, None), ("streambp", "dpo", 1024, 99)])
    long = run("long.json", [("streambp", "sft", 1024, 11), ("streambp", "sft", 2048, 12)])
    assert module.peaks_by_method([short, long], "sft") == {"streambp": {1024: 11, 2048: 12}, "checkpointing": {1024: 40}}
