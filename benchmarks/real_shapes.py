"""Longest trainable sequence at real model widths, extrapolated from a few layers to full depth.

    python benchmarks/real_shapes.py                                   # Qwen3-4B and Llama-3.1-8B
    python benchmarks/real_shapes.py --shapes qwen3-4b --layers 1 2 --check-layers 4 --lengths 512 1024

A small config with a huge vocabulary flatters streambp (its head is nearly all of the memory),
so this script builds models with the real widths of Qwen3-4B, Llama-3.1-8B and Qwen3-8B (hidden,
heads, KV heads, head dim, intermediate, vocabulary, tied or untied embeddings) but only a few
layers, random weights, float32 (or ``--dtype bfloat16``). For each method (HF activation checkpointing, streambp) it
measures the peak memory of one SFT step (the HF ``labels=`` path, the profiler method of DESIGN
§2) at every (layers, length), and fits

    peak(L, T) = fixed + L * fixed_per_layer + T * (head_per_token + L * layer_per_token)

by least squares: the bytes per token of the head and embedding, and of each layer. The
embedding and LM-head weights are frozen while measuring: at the lengths a CPU can run, the
computation of their gradient (1.5 GB for a 150k vocabulary at width 2560, independent of T) sets
the peak of both methods and hides the per-token terms. The measured peaks are of what a step
allocates (the profiler method counts from the memory alive before the call); the parameters and
the embedding gradients are added to the fixed terms afterwards, from the config; they do not
grow with T. With the fitted terms the script extrapolates the peak
at full depth and the longest sequence under ``--budget-gb`` (80 GB: the GPUs of the
StreamBP paper, which reports Qwen3-4B SFT at 28.5k tokens with gradient checkpointing against
200k with StreamBP, and Qwen3-8B backward at 20k against 110k, in bfloat16).

The fit models the phase of the step that sets the peak at long sequences (for checkpointing,
the head's backward, with its whole-sequence logits). A step peaks in whichever phase is larger,
so at a short length and more layers checkpointing's peak can move into the layers' backward,
where every layer's weight gradient is alive. ``--check-layers`` measures more layer counts
without fitting them and prints the fit's prediction beside each measured peak.

streambp runs with ``chunk_size`` 128 here so that the measured lengths hold several chunks and
the per-token costs are those of long sequences (at the default chunk size, 1024 for these widths,
a 1024-token sequence is one chunk). Its LM head is chunked as ``head_chunk_size="auto"`` chunks
long sequences (logits as large as one hidden state), not at auto's 128-token floor, which
would be a constant here and understate the head's per-token cost at the extrapolated lengths.

Output: markdown on stdout and, with ``--json``, everything.
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GB = 1e9


def size(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if abs(nbytes) >= 0.1 * GB else f"{nbytes / 1e6:.1f} MB"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=["qwen3-4b", "llama3.1-8b"])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2],
                        help="layer counts to measure (at least two; memory grows with the model)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], help="at least two")
    parser.add_argument("--check-layers", type=int, nargs="*", default=[],
                        help="layer counts measured to check the fit's prediction, not fitted")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--chunk-size", type=int, default=128, help="streambp chunk_size (see the module docstring)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="of the parameters and activations (the HF loss computes in float32 either way)")
    parser.add_argument("--budget-gb", type=float, default=80.0)
    parser.add_argument("--json", default=None, help="write all measurements to this file")
    parser.add_argument("--points", default=None,
                        help="a --json file of an earlier run: its measurements are reused, not repeated")
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


def sft_step(method: str, model, chunk_size: int, length: int):
    def loss(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    if method == "streambp":
        options = {"chunk_size": chunk_size, "head_chunk_size": long_sequence_head_chunk(model, length)}
        return torch.compile(loss, backend="streambp", options=options)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return loss


def long_sequence_head_chunk(model, length: int) -> int:
    """The LM-head chunk that ``head_chunk_size="auto"`` picks at long lengths: float32 logits (HF's
    loss upcasts) as large as one hidden state, in a power of two. At the short lengths measured
    here "auto" would pick its floor of 128 tokens, a constant that the fit would put in the fixed
    bytes instead of the per-token ones, and so understate the head at the extrapolated lengths."""
    hidden_bytes = model.config.hidden_size * next(model.parameters()).element_size()
    tokens = max(1, length * hidden_bytes // (4 * model.config.vocab_size))
    return 1 << (tokens.bit_length() - 1)


def measure(args, shape: str, layers: int, method: str) -> list[Point]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(shape, layers)).to(DTYPES[args.dtype]).train()
    for weight in embedding_weights(model):
        weight.requires_grad_(False)
    vocab = model.config.vocab_size

    def step(step_loss, length):
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length))
        model.zero_grad(set_to_none=True)
        step_loss(ids).backward()

    points = []
    for length in args.lengths:
        started = time.perf_counter()
        step_loss = sft_step(method, model, args.chunk_size, length)
        if method == "streambp":
            # Compile on short sequences: one step at these widths takes minutes. Two lengths,
            # so that the graph for dynamic lengths is compiled (and its layers probed) too,
            # before the long step is measured.
            step(step_loss, 2 * args.chunk_size)
            step(step_loss, 2 * args.chunk_size + 1)
        _, peak = measure_peak_memory(lambda: step(step_loss, length))
        print(f"  {shape} {method:<13} layers={layers} T={length}: {size(peak)} "
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


def embedding_weights(model) -> list[torch.nn.Parameter]:
    """The input embedding and the LM head weight (once if tied)."""
    weights = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    return list({id(w): w for w in weights}.values())


def embedding_gradient_bytes(shape: str, itemsize: int) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape, 1))
    return sum(w.numel() * itemsize for w in embedding_weights(model))


def with_resident_bytes(shape: str, measured: "Fit", itemsize: int) -> "Fit":
    """The fit of what a step allocates, plus what exists before it: every parameter, and the
    embedding and LM-head gradients that were not computed (see the module docstring)."""
    embedding = embedding_gradient_bytes(shape, itemsize)
    return Fit(measured.fixed + 2 * embedding, measured.fixed_per_layer + layer_parameter_bytes(shape, itemsize),
               measured.head_per_token, measured.layer_per_token)


def layer_parameter_bytes(shape: str, itemsize: int) -> int:
    """Bytes of one layer's parameters (float32), from the config: for comparison with the fitted
    fixed bytes per layer, which hold the parameters and whichever gradients exist at the peak."""
    return (parameter_count(model_config(shape, 2)) - parameter_count(model_config(shape, 1))) * itemsize


PAPER = {  # StreamBP paper, 80 GB GPU: (gradient checkpointing, StreamBP) longest tokens
    "qwen3-4b": ("SFT", 28_500, 200_000),
    "qwen3-8b": ("backward only", 20_000, 110_000),
}


def markdown(args, points, fits) -> str:
    itemsize = DTYPES[args.dtype].itemsize
    lines = [f"Real widths, SFT step, {args.dtype}; {describe()}", ""]
    for shape in args.shapes:
        depth = SHAPES[shape]["full_depth"]
        lines += [f"**{shape}** (full depth {depth} layers)", "",
                  "| method | layers | " + " | ".join(f"T={t}" for t in args.lengths) + " |",
                  "|---|---:|" + "---:|" * len(args.lengths)]
        for method in args.methods:
            for layers in args.layers + args.check_layers:
                row = [next(size(p.peak_bytes) for p in points
                            if (p.shape, p.method, p.layers, p.length) == (shape, method, layers, t)) for t in args.lengths]
                lines.append(f"| {method} | {layers} | " + " | ".join(row) + " |")
        lines += ["", f"Fit of the measured peaks, plus what a step does not allocate: every parameter (one layer: "
                  f"{size(layer_parameter_bytes(shape, itemsize))}) and the embedding and LM-head weights' gradients "
                  f"({size(embedding_gradient_bytes(shape, itemsize))}), which were frozen while measuring:", "",
                  "| method | fixed | fixed per layer | head + embedding, per token | per layer, per token | "
                  f"peak at {depth} layers, 32k tokens | longest under {args.budget_gb:g} GB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        longest = {}
        for method in args.methods:
            f = fits[shape][method][1]
            longest[method] = f.longest(depth, args.budget_gb * GB)
            lines.append(f"| {method} | {size(f.fixed)} | {size(f.fixed_per_layer)} | "
                         f"{f.head_per_token / 1e3:.1f} kB | {f.layer_per_token / 1e3:.1f} kB | "
                         f"{size(f.peak(depth, 32768))} | {longest[method]:,} |")
        if longest.get("checkpointing") and "streambp" in longest:
            lines += ["", f"streambp / checkpointing, longest sequence: **{longest['streambp'] / longest['checkpointing']:.1f}x**"]
        if args.check_layers:
            lines += ["", f"Check: peaks measured at {', '.join(map(str, args.check_layers))} layers against the fit "
                      f"through {', '.join(map(str, args.layers))} layers:", ""]
            for method in args.methods:
                for p in points:
                    if (p.shape, p.method) == (shape, method) and p.layers in args.check_layers:
                        predicted = fits[shape][method][0].peak(p.layers, p.length)
                        lines.append(f"- {method}, {p.layers} layers, T={p.length}: measured {size(p.peak_bytes)}, "
                                     f"predicted {size(predicted)} ({p.peak_bytes / predicted:.2f}x)")
            lines.append("")
        if shape in PAPER:
            what, ckpt, sbp = PAPER[shape]
            lines.append(f"(StreamBP paper, {what}, bfloat16 on 80 GB: {ckpt:,} against {sbp:,}, {sbp / ckpt:.1f}x)")
        lines.append("")
    return "\n".join(lines)


# Published longest single-GPU (80 GB) training lengths, as reported (not re-run here), with what
# each keeps on the device.
PUBLISHED = [
    ("StreamBP paper", "qwen3-4b", 200_000, "SFT in bfloat16, weights and gradients on the device, layer-wise "
     "chunked backward (its gradient checkpointing: 28.5k)"),
    ("Unsloth", "llama3.1-8b", 342_000, "QLoRA: 4-bit frozen weights and the LoRA adapters on the device, "
     "checkpointed layer inputs offloaded to host memory"),
    ("Arctic Long Sequence Training", "llama3.1-8b", 500_000, "full fine-tuning with the weights and optimizer "
     "state offloaded to host memory (ZeRO-3 offload), checkpointed layer inputs offloaded, MLP and loss tiled"),
]
LAYER_INPUTS_MODES = ("keep", "recompute", "offload")


def inputs_on_device(mode: str, layers: int) -> int:
    """Layer inputs on the device at once, at most: every one ("keep"), the segment boundaries
    and one segment's recomputed inputs ("recompute", ``passes/layer_inputs.segment_lengths``),
    or two ("offload": one being copied out while the next layer runs, one reloaded ahead)."""
    from passes.layer_inputs import segment_lengths

    if mode == "keep" or layers <= 2:
        return layers
    if mode == "recompute":
        return max(i + n - 1 for i, n in enumerate(segment_lengths(layers), start=1))
    return 2


def layer_inputs_markdown(args, fits) -> str:
    """The longest sequence under the budget per ``layer_inputs`` mode, from streambp's fit: per
    token, the head-and-working-set term plus one saved layer input per input on the device."""
    itemsize = DTYPES[args.dtype].itemsize
    lines = [f"Longest sequence under {args.budget_gb:g} GB per `layer_inputs` mode, extrapolated from the "
             f"{args.dtype} fit of streambp's peaks above (per token: head and one layer's working set, plus one "
             "saved layer input per input on the device):", "",
             "| model | device holds | mode | inputs on device | per token | longest | host memory at that length |",
             "|---|---|---|---:|---:|---:|---:|"]
    for shape in args.shapes:
        if "streambp" not in fits.get(shape, {}):
            continue
        measured, f = fits[shape]["streambp"]
        depth = SHAPES[shape]["full_depth"]
        variants = [(args.dtype, f, itemsize, measured.fixed)]
        if args.dtype == "float32":
            # Not measured (bfloat16 matmuls are too slow on this CPU): weights, gradients and the
            # saved inputs halve; the head's per-token term is kept (HF's loss upcasts the logits
            # to float32), so this overstates the bfloat16 peak.
            variants.append(("bfloat16, estimated from float32", Fit(f.fixed / 2, f.fixed_per_layer / 2,
                                                                      f.head_per_token, f.layer_per_token / 2), 2,
                             measured.fixed / 2))
        for dtype, g, nbytes, allocated in variants:
            holds = {
                "weights and their gradients": g.fixed + depth * g.fixed_per_layer,
                # The weights, and what the step allocates whatever the length (no weight gradients).
                "frozen weights (LoRA: adapters negligible)":
                    parameter_count(model_config(shape, depth)) * nbytes + max(0.0, allocated),
            }
            for what, fixed in holds.items():
                for mode in LAYER_INPUTS_MODES:
                    alive = inputs_on_device(mode, depth)
                    per_token = g.head_per_token + alive * g.layer_per_token
                    longest = max(0, int((args.budget_gb * GB - fixed) / per_token))
                    host = size(longest * depth * g.layer_per_token) if mode == "offload" else "-"
                    lines.append(f"| {shape}, {dtype} | {what} ({size(fixed)}) | `{mode}` | {alive} of {depth} | "
                                 f"{per_token / 1e3:.1f} kB | {longest:,} | {host} |")
    lines += ["", "Published (not re-run here), on one 80 GB GPU:", ""]
    lines += [f"- {who}: {model}, {tokens:,} tokens; {what}" for who, model, tokens, what in PUBLISHED
              if model in args.shapes]
    return "\n".join(lines) + "\n"


def describe():
    return f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    points, fits = [], {}
    saved = [Point(**p) for p in json.load(open(args.points))["points"]] if args.points else []
    for shape in args.shapes:
        fits[shape] = {}
        for method in args.methods:
            measured = []
            for layers in args.layers + args.check_layers:
                again = [p for p in saved if (p.shape, p.method, p.layers) == (shape, method, layers)
                         and p.length in args.lengths]
                measured += again if len(again) == len(args.lengths) else measure(args, shape, layers, method)
            points += measured
            fitted = fit([p for p in measured if p.layers in args.layers])
            fits[shape][method] = fitted, with_resident_bytes(shape, fitted, DTYPES[args.dtype].itemsize)
    print(markdown(args, points, fits))
    if "streambp" in args.methods:
        print(layer_inputs_markdown(args, fits))
    print(f"(measured in {time.perf_counter() - started:.0f} s; command: python benchmarks/real_shapes.py "
          + " ".join(sys.argv[1:] if argv is None else argv) + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": describe(), "arguments": vars(args), "points": [asdict(p) for p in points],
                       "fits_bytes": {s: {m: asdict(f[1]) for m, f in fs.items()} for s, fs in fits.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
