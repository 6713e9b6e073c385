"""Peak memory and step time against sequence length, per training method and objective.

    python benchmarks/memory_and_time.py                         # defaults: 1k..8k tokens
    python benchmarks/memory_and_time.py --lengths 1024 2048 4096 8192 16384 --objectives sft
    python benchmarks/memory_and_time.py --budget-mb 1024        # + longest length under 1 GiB

Methods, on the same model and data:
  eager           plain PyTorch autograd
  checkpointing   HF activation checkpointing (``activation_checkpointing_enable``, non-reentrant)
  budget0         ``torch._functorch.config.activation_memory_budget = 0`` with Inductor
                  (set for this run only, restored afterwards)
  streambp        ``torch.compile(step, backend="streambp")``
  streambp_inductor  the same with ``options={"inner_compiler": "inductor"}`` (chunk subgraphs
                  compiled too)
  streambp:N      streambp with ``options={"chunk_size": N}`` (the default is "auto")
  streambp_budget:M  streambp with ``options={"memory_budget": M MiB}`` (chunk sizes from the budget)
  streambp_recompute  streambp with ``options={"layer_inputs": "recompute"}`` (only segment
                  boundaries' layer inputs saved, the others recomputed in backward)
  streambp_offload  streambp with ``options={"layer_inputs": "offload"}`` (layer inputs saved in
                  host memory; on a CPU the host is the device, so it saves nothing there)
  streambp_model  the model itself compiled, ``torch.compile(model, backend="streambp",
                  options={"skip_logits": True})``, called with ``labels=`` (SFT only): the
                  line a Hugging Face user writes

Objectives (``sbp_compiler.objectives``): ``sft`` (the HF ``labels=`` path), ``dpo`` (pairs of
sequences of the given length) and ``grpo`` (completions of the given length). The model is a
small Qwen3-shaped config with a vocabulary large relative to its width, as in real models.

Peak memory: the profiler method of DESIGN §2 (deterministic). Step time: the median of
``--repeats`` timed steps after a warm-up; ratios are taken within this run. Memory grows
linearly in T for every method, so the longest length under a budget is extrapolated from a
least-squares line through the measured peaks (``--budget-mb``), and the ratio of each method's
longest length to checkpointing's is reported; ``--confirm`` then runs each method once at its
predicted length and reports the measured peak against the budget. Output: a markdown table on stdout and, with
``--json``, every measurement as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from sbp_compiler import objectives
from sbp_compiler.profiling import measure_peak_memory, time_step

METHODS = ("eager", "checkpointing", "budget0", "streambp", "streambp_inductor", "streambp_model", "streambp_recompute",
           "streambp_offload")
OBJECTIVES = ("sft", "dpo", "grpo")


def method_name(text: str) -> str:
    base, _, number = text.partition(":")
    if not (base in METHODS and not number or base in ("streambp", "streambp_budget") and number.isdigit()):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected one of {METHODS}, streambp:<chunk size> or streambp_budget:<MiB>")
    return text


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--methods", nargs="+", type=method_name,
                        default=[m for m in METHODS if m not in ("streambp_inductor", "streambp_model", "streambp_recompute",
                                                                 "streambp_offload")],
                        help=f"of {METHODS}; streambp:N runs streambp with chunk_size N")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per point (median)")
    parser.add_argument("--time-at", type=int, default=None, help="time steps only at this length (default: the shortest)")
    parser.add_argument("--budget-mb", type=float, default=None, help="report the longest length under this peak")
    parser.add_argument("--confirm", action="store_true",
                        help="with --budget-mb: measure each method once more at its predicted longest length")
    parser.add_argument("--json", default=None, help="write all measurements to this file")
    return parser.parse_args(argv)


def build_model(args, seed=0):
    torch.manual_seed(seed)
    heads = max(1, args.hidden_size // 64)
    config = Qwen3Config(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=64, max_position_embeddings=1 << 20, attn_implementation="sdpa",
    )
    return AutoModelForCausalLM.from_config(config).train()


# -- objectives: (inputs for a length) and (loss from model and inputs) -----------------------------

def make_inputs(objective, length, vocab, generator):
    ids = torch.randint(0, vocab, (2 if objective != "sft" else 1, length), generator=generator)
    completion = torch.ones_like(ids)
    completion[:, : length // 4] = 0
    if objective == "sft":
        return dict(input_ids=ids, labels=torch.where(completion.bool(), ids, -100))
    if objective == "dpo":
        rejected = torch.randint(0, vocab, ids.shape, generator=generator)
        return dict(chosen=ids, rejected=rejected, completion=completion,
                    ref_c=-torch.rand(2, generator=generator) * length, ref_r=-torch.rand(2, generator=generator) * length)
    return dict(input_ids=ids, completion=completion, advantages=torch.randn(2, generator=generator),
                ref_logps=-torch.rand(ids.shape, generator=generator) * 10)


def loss_of(objective, model, inputs):
    if objective == "sft":
        return model(input_ids=inputs["input_ids"], labels=inputs["labels"], use_cache=False).loss
    if objective == "dpo":
        return objectives.dpo_loss(
            model, inputs["chosen"], inputs["rejected"], inputs["completion"], inputs["completion"],
            ref_chosen_logps=inputs["ref_c"], ref_rejected_logps=inputs["ref_r"]).loss
    return objectives.grpo_loss(model, inputs["input_ids"], inputs["completion"], inputs["advantages"],
                                ref_logps=inputs["ref_logps"], beta=0.04)


@contextlib.contextmanager
def method_context(method, model):
    """Set a method up on ``model`` for the duration, and restore everything afterwards."""
    if method == "checkpointing":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        try:
            yield
        finally:
            model.activation_checkpointing_disable()
    elif method == "budget0":
        import torch._functorch.config as functorch_config

        with functorch_config.patch(activation_memory_budget=0.0):
            yield
    else:
        yield


def step_function(method, objective, model):
    def loss(inputs):
        return loss_of(objective, model, inputs)

    if method == "streambp_model":
        compiled = torch.compile(model, backend="streambp", options={"skip_logits": True})

        def model_loss(inputs):
            if objective != "sft":
                raise ValueError("streambp_model runs the labels= path: SFT only")
            return loss_of(objective, compiled, inputs)

        return model_loss
    if method.startswith("streambp_budget:"):
        budget = int(method.partition(":")[2]) * 2 ** 20
        return torch.compile(loss, backend="streambp", options={"memory_budget": budget})
    if method.startswith("streambp:"):
        return torch.compile(loss, backend="streambp", options={"chunk_size": int(method.partition(":")[2])})
    if method == "streambp":
        return torch.compile(loss, backend="streambp")
    if method in ("streambp_recompute", "streambp_offload"):
        return torch.compile(loss, backend="streambp", options={"layer_inputs": method.partition("_")[2]})
    if method == "streambp_inductor":
        return torch.compile(loss, backend="streambp", options={"inner_compiler": "inductor"})
    if method == "budget0":
        return torch.compile(loss, backend="inductor", dynamic=True)
    return loss


@dataclass
class Point:
    method: str
    objective: str
    length: int
    peak_bytes: int | None
    step_seconds: float | None
    failure: str | None = None
    floor_bytes: int | None = None  # see ``physical_floor``
    parameter_bytes: int | None = None  # resident before the step, so not in ``peak_bytes``
    gradient_bytes: int | None = None  # one B x T x hidden gradient: see ``incoming_gradient``

    def total_bytes(self) -> int:
        """The step's peak with the parameters counted: what compares with the floor."""
        return self.peak_bytes + self.parameter_bytes


def physical_floor(model, sequences: int, length: int) -> int:
    """What any exact method must hold at the peak of a step: parameters, their gradients, the
    saved layer inputs (layers x B x T x hidden) and one layer's K/V with their gradients."""
    config = model.config
    itemsize = next(model.parameters()).element_size()
    parameters = sum(p.numel() for p in model.parameters()) * itemsize
    tokens = sequences * length
    layer_inputs = config.num_hidden_layers * tokens * config.hidden_size * itemsize
    key_value = 4 * tokens * config.num_key_value_heads * config.head_dim * itemsize
    return 2 * parameters + layer_inputs + key_value


def incoming_gradient(model, sequences: int, length: int) -> int:
    """The gradient a layer's backward receives (B x T x hidden): held by any exact method while
    it computes the gradient of the layer's input, and not in ``physical_floor``."""
    return sequences * length * model.config.hidden_size * next(model.parameters()).element_size()


def measure(args, method, objective, lengths=None) -> list[Point]:
    model = build_model(args)
    points = []
    time_at = args.time_at or min(args.lengths)
    with method_context(method, model):
        step_loss = step_function(method, objective, model)
        for length in lengths or args.lengths:
            inputs = make_inputs(objective, length, args.vocab_size, torch.Generator().manual_seed(length))

            def step():
                model.zero_grad(set_to_none=True)
                step_loss(inputs).backward()

            print(f"  {method:<13} {objective:<5} T={length}", file=sys.stderr, flush=True)
            try:
                # Warm-up: compilation, lazy initialisation. Compiled chunk subgraphs settle their
                # dynamic shapes over the first two steps.
                for _ in range(2 if method == "streambp_inductor" else 1):
                    step()
            except Exception as error:  # a method that cannot run this objective: reported, not fatal
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120]}"
                print(f"    failed: {reason}", file=sys.stderr, flush=True)
                return [Point(method, objective, length, None, None, reason)]
            seconds = statistics.median(time_step(step, args.repeats)) if length == time_at else None
            _, peak = measure_peak_memory(step)
            sequences = next(iter(inputs.values())).shape[0] * (2 if objective == "dpo" else 1)
            parameters = sum(p.numel() * p.element_size() for p in model.parameters())
            points.append(Point(method, objective, length, peak, seconds, None,
                                physical_floor(model, sequences, length), parameters,
                                incoming_gradient(model, sequences, length)))
    return points


def linear_fit(points):
    """(bytes per token, bytes at T=0) by least squares over the measured peaks."""
    xs = [p.length for p in points]
    ys = [p.peak_bytes for p in points]
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x


def longest_lengths(args, objective_fits) -> dict[str, int]:
    """Per method, the longest length whose fitted peak stays under ``--budget-mb``, rounded down
    to a multiple of 64 tokens."""
    budget = args.budget_mb * 2 ** 20
    return {m: int((budget - b) / a) // 64 * 64 for m, (a, b) in objective_fits.items() if a > 0}


def markdown(args, points, fits, confirmations=()):
    mb = 2 ** 20
    lines = [f"Peak memory (MB) allocated by one training step (the parameters, resident before and after, "
             f"are not counted); {describe(args)}", ""]
    for objective in args.objectives:
        lines += [f"**{objective}**", "", "| tokens | " + " | ".join(args.methods) + " |",
                  "|---:|" + "---:|" * len(args.methods)]
        for length in args.lengths:
            row = [next((f"{p.peak_bytes / mb:.1f}" if p.peak_bytes else "failed" for p in points
                         if p.method == m and p.objective == objective and p.length == length), "-") for m in args.methods]
            lines.append(f"| {length} | " + " | ".join(row) + " |")
        floors = {p.length: p.floor_bytes for p in points if p.objective == objective and p.floor_bytes}
        measured = [p for p in points if p.objective == objective and p.peak_bytes and p.floor_bytes]
        lines += ["", "Physical floor (parameters, gradients, saved layer inputs, one layer's K/V and their "
                  "gradients), MB: " + ", ".join(f"{floors[t] / mb:.1f} at {t}" for t in sorted(floors)),
                  "", "Measured / physical floor (the peak above plus the parameters, "
                  f"{measured[0].parameter_bytes / mb if measured else 0:.1f} MB, which exist before the step): " + "; ".join(
            f"{m} " + ", ".join(f"{p.total_bytes() / p.floor_bytes:.2f} at {p.length}" for p in measured if p.method == m)
            for m in args.methods if any(p.method == m for p in measured))]
        if any(p.gradient_bytes for p in measured):
            lines += ["", "Measured / (physical floor + the incoming gradient of a layer's backward, one tokens x "
                      "hidden tensor): " + "; ".join(
                f"{m} " + ", ".join(f"{p.total_bytes() / (p.floor_bytes + p.gradient_bytes):.2f} at {p.length}"
                                    for p in measured if p.method == m and p.gradient_bytes)
                for m in args.methods if any(p.method == m for p in measured))]
        slopes = fits.get(objective, {})
        if slopes:
            base = slopes.get("streambp", (None,))[0]
            lines += ["", "Per-token memory (slope of a least-squares line through the peaks), kB per token: " + ", ".join(
                f"{m} {a / 1000:.2f}" + (f" ({base / a:.2f}x less than streambp)" if base and m != "streambp" and a < base else "")
                for m, (a, _) in slopes.items())]
        lines += [f"{p.method} failed: {p.failure}" for p in points if p.objective == objective and p.failure]
        timed = {p.method: p.step_seconds for p in points if p.objective == objective and p.step_seconds}
        if timed:
            reference = "checkpointing" if "checkpointing" in timed else next(iter(timed))
            base = timed[reference]
            lines += ["", f"Step time at T={args.time_at or min(args.lengths)} (ratio to {reference}): " + ", ".join(
                f"{m} {timed[m]:.2f} s ({timed[m] / base:.2f}x)" for m in args.methods if m in timed)]
        if args.budget_mb and objective in fits:
            longest = longest_lengths(args, fits[objective])
            base = longest.get("checkpointing")
            lines += ["", f"Longest sequence under {args.budget_mb:.0f} MB (linear fit of the peaks): " + ", ".join(
                f"{m} {t}" + (f" ({t / base:.1f}x checkpointing)" if base else "") for m, t in longest.items())]
            confirmed = [p for p in confirmations if p.objective == objective]
            if confirmed:
                lines += ["", "Confirmation, one step at the predicted length: " + "; ".join(
                    f"{p.method} at {p.length}: " + (f"{p.peak_bytes / mb:.1f} MB ("
                    + ("within" if p.peak_bytes <= args.budget_mb * mb else "OVER") + " budget)" if p.peak_bytes else "failed")
                    for p in confirmed)]
        lines.append("")
    return "\n".join(lines)


def describe(args):
    return (f"Qwen3-shaped, {args.layers} layers, hidden {args.hidden_size}, vocabulary {args.vocab_size}; "
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads")


def main(argv=None):
    args = parse_args(argv)
    points = []
    started = time.perf_counter()
    for objective in args.objectives:
        for method in args.methods:
            points += measure(args, method, objective)
    fits = {}
    for objective in args.objectives:
        fits[objective] = {}
        for method in args.methods:
            measured = [p for p in points if p.method == method and p.objective == objective and p.peak_bytes]
            if len(measured) >= 2:
                fits[objective][method] = linear_fit(measured)
    confirmations = []
    if args.confirm and args.budget_mb:
        for objective in args.objectives:
            for method, length in longest_lengths(args, fits[objective]).items():
                confirmations += measure(args, method, objective, lengths=[length])
    print(markdown(args, points, fits, confirmations))
    print(f"(measured in {time.perf_counter() - started:.0f} s; command: python benchmarks/memory_and_time.py "
          + " ".join(sys.argv[1:] if argv is None else argv) + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": describe(args), "points": [asdict(p) for p in points],
                       "confirmations": [asdict(p) for p in confirmations],
                       "fits_bytes_per_token_and_intercept": fits}, f, indent=2)


if __name__ == "__main__":
    main()
