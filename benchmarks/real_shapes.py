"""Longest trainable sequence at real model widths, extrapolated from a few layers to full depth.

    python benchmarks/real_shapes.py                                   # Qwen3-4B and Llama-3.1-8B
    python benchmarks/real_shapes.py --shapes qwen3-4b --layers 1 2 4 --lengths 512 1024

A small config with a huge vocabulary flatters streambp (its head is nearly all of the memory),
so this script builds models with the real widths of Qwen3-4B, Llama-3.1-8B and Qwen3-8B (hidden,
heads, KV heads, head dim, intermediate, vocabulary, tied or untied embeddings) but only a few
layers, random weights, float32. For each method (HF activation checkpointing, streambp) it
measures the peak memory of one SFT step (the HF ``labels=`` path, the profiler method of DESIGN
§2) at every (layers, length), and fits

    peak(L, T) = fixed + L * fixed_per_layer + T * (head_per_token + L * layer_per_token)

by least squares: the bytes per token of the head and embedding, and of each layer. With the
fitted terms it extrapolates the peak at full depth and the longest sequence under ``--budget-gb`` (80 GB: the GPUs of the
StreamBP paper, which reports Qwen3-4B SFT at 28.5k tokens with gradient checkpointing against
200k with StreamBP, and Qwen3-8B backward at 20k against 110k; its runs are in bfloat16, these are
float32, so every byte count here is about twice theirs and the ratios are what compare).

streambp runs with ``chunk_size`` 128 here so that the measured lengths hold several chunks and
the per-token costs are those of long sequences (at the default chunk size, 1024 for these widths,
a 1024-token sequence is one chunk). Output: markdown on stdout and, with ``--json``, everything.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sbp_compiler.profiling import measure_peak_memory

# Published configs (hidden, heads, KV heads, head dim, intermediate, vocabulary, embeddings).
SHAPES = {
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                     full_depth=36),
    "llama3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                        full_depth=32),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                     full_depth=36),
}
METHODS = ("checkpointing", "streambp")
GB = 1e9


def size(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if abs(nbytes) >= 0.1 * GB else f"{nbytes / 1e6:.1f} MB"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=["qwen3-4b", "llama3.1-8b"])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2],
                        help="layer counts to measure (at least two; memory grows with the model)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], help="at least two")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--chunk-size", type=int, default=128, help="streambp chunk_size (see the module docstring)")
    parser.add_argument("--budget-gb", type=float, default=80.0)
    parser.add_argument("--json", default=None, help="write all measurements to this file")
    args = parser.parse_args(argv)
    if len(set(args.layers)) < 2 or len(set(args.lengths)) < 2:
        parser.error("the fit needs at least two layer counts and two lengths")
    return args


def model_config(shape: str, layers: int):
    fields = {k: v for k, v in SHAPES[shape].items() if k not in ("model_type", "full_depth")}
    config = AutoConfig.for_model(SHAPES[shape]["model_type"], num_hidden_layers=layers, **fields)
    config._attn_implementation = "sdpa"
    return config


def parameter_count(config) -> int:
    """Parameters of a model built from ``config``, without building it."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@dataclass
class Point:
    shape: str
    method: str
    layers: int
    length: int
    peak_bytes: int


def sft_step(method: str, model, chunk_size: int):
    def loss(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    if method == "streambp":
        return torch.compile(loss, backend="streambp", options={"chunk_size": chunk_size})
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return loss


def measure(args, shape: str, layers: int, method: str) -> list[Point]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(shape, layers)).train()
    step_loss = sft_step(method, model, args.chunk_size)
    points = []
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))

        def step():
            model.zero_grad(set_to_none=True)
            step_loss(ids).backward()

        started = time.perf_counter()
        step()  # warm-up (compilation)
        _, peak = measure_peak_memory(step)
        print(f"  {shape} {method:<13} layers={layers} T={length}: {peak / GB:.2f} GB "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        points.append(Point(shape, method, layers, length, peak))
    del model, step_loss
    return points


def least_squares(rows, targets):
    """Solve rows @ x = targets in the least-squares sense (float64)."""
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(targets, dtype=torch.float64)[:, None]
    return torch.linalg.lstsq(a, b).solution[:, 0].tolist()


@dataclass
class Fit:
    fixed: float
    fixed_per_layer: float
    head_per_token: float
    layer_per_token: float

    def peak(self, layers: int, length: int) -> float:
        return self.fixed + layers * self.fixed_per_layer + length * (self.head_per_token + layers * self.layer_per_token)

    def longest(self, layers: int, budget: float) -> int:
        room = budget - self.fixed - layers * self.fixed_per_layer
        return max(0, int(room / (self.head_per_token + layers * self.layer_per_token)))


def fit(points: list[Point]) -> Fit:
    rows = [[1.0, p.layers, p.length, p.layers * p.length] for p in points]
    return Fit(*least_squares(rows, [p.peak_bytes for p in points]))


def layer_parameter_bytes(shape: str) -> int:
    """Bytes of one layer's parameters (float32), from the config: for comparison with the fitted
    fixed bytes per layer, which hold the parameters and whichever gradients exist at the peak."""
    return (parameter_count(model_config(shape, 2)) - parameter_count(model_config(shape, 1))) * 4


PAPER = {  # StreamBP paper, 80 GB GPU: (gradient checkpointing, StreamBP) longest tokens
    "qwen3-4b": ("SFT", 28_500, 200_000),
    "qwen3-8b": ("backward only", 20_000, 110_000),
}


def markdown(args, points, fits) -> str:
    lines = [f"Real widths, SFT step, float32; {describe()}", ""]
    for shape in args.shapes:
        depth = SHAPES[shape]["full_depth"]
        lines += [f"**{shape}** (full depth {depth} layers)", "",
                  "| method | layers | " + " | ".join(f"T={t}" for t in args.lengths) + " |",
                  "|---|---:|" + "---:|" * len(args.lengths)]
        for method in args.methods:
            for layers in args.layers:
                row = [next(size(p.peak_bytes) for p in points
                            if (p.shape, p.method, p.layers, p.length) == (shape, method, layers, t)) for t in args.lengths]
                lines.append(f"| {method} | {layers} | " + " | ".join(row) + " |")
        lines += ["", f"Fit (one layer's parameters: {size(layer_parameter_bytes(shape))}):", "",
                  "| method | fixed | fixed per layer | head + embedding, per token | per layer, per token | "
                  f"peak at {depth} layers, 32k tokens | longest under {args.budget_gb:.0f} GB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        longest = {}
        for method in args.methods:
            f = fits[shape][method]
            longest[method] = f.longest(depth, args.budget_gb * GB)
            lines.append(f"| {method} | {size(f.fixed)} | {size(f.fixed_per_layer)} | "
                         f"{f.head_per_token / 1e3:.1f} kB | {f.layer_per_token / 1e3:.1f} kB | "
                         f"{size(f.peak(depth, 32768))} | {longest[method]:,} |")
        if longest.get("checkpointing") and "streambp" in longest:
            lines += ["", f"streambp / checkpointing, longest sequence: **{longest['streambp'] / longest['checkpointing']:.1f}x**"]
        if shape in PAPER:
            what, ckpt, sbp = PAPER[shape]
            lines.append(f"(StreamBP paper, {what}, bfloat16 on 80 GB: {ckpt:,} against {sbp:,}, {sbp / ckpt:.1f}x)")
        lines.append("")
    return "\n".join(lines)


def describe():
    return f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    points, fits = [], {}
    for shape in args.shapes:
        fits[shape] = {}
        for method in args.methods:
            measured = []
            for layers in args.layers:
                measured += measure(args, shape, layers, method)
            points += measured
            fits[shape][method] = fit(measured)
    print(markdown(args, points, fits))
    print(f"(measured in {time.perf_counter() - started:.0f} s; command: python benchmarks/real_shapes.py "
          + " ".join(sys.argv[1:] if argv is None else argv) + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": describe(), "points": [asdict(p) for p in points],
                       "fits_bytes": {s: {m: asdict(f) for m, f in fs.items()} for s, fs in fits.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
