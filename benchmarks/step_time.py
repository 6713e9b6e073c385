"""Step time against activation checkpointing, interleaved in one process, at widths where the
matmuls dominate.

    python benchmarks/step_time.py                                   # hidden 1024, 2 layers, 4096 tokens
    python benchmarks/step_time.py --hidden-size 256 --layers 4
    python benchmarks/step_time.py --methods checkpointing streambp streambp_budget:512 --objectives sft dpo grpo

Same models, objectives and methods as ``memory_and_time.py`` (``--help`` there lists them). Every
method is compiled and warmed up first; then ``--rounds`` rounds each run one step of every
method in turn, so a slow spell of this noisy machine falls on all of them alike. Reported: the
median step time and its ratio to checkpointing's, and each method's peak memory (profiler
method, one more step) against checkpointing's. Each method has its own model (same weights).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_and_time as bench  # noqa: E402
from sbp_compiler.profiling import measure_peak_memory  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", type=bench.method_name,
                        default=["checkpointing", "streambp", "streambp_budget:512"])
    parser.add_argument("--objectives", nargs="+", choices=bench.OBJECTIVES, default=["sft"])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model_args = argparse.Namespace(hidden_size=args.hidden_size, layers=args.layers, vocab_size=args.vocab_size,
                                    lengths=[args.length])
    started = time.perf_counter()
    results = {}
    for objective in args.objectives:
        inputs = bench.make_inputs(objective, args.length, args.vocab_size, torch.Generator().manual_seed(0))
        steps = {}
        for method in args.methods:
            # A model per method (same seed, same weights): switching checkpointing on and off
            # on a model another method compiled would be measured with that method.
            model = bench.build_model(model_args)
            loss_fn = bench.step_function(method, objective, model)

            def step(loss_fn=loss_fn, method=method, model=model):
                with bench.method_context(method, model):
                    model.zero_grad(set_to_none=True)
                    loss_fn(inputs).backward()

            print(f"  warm-up {objective} {method}", file=sys.stderr, flush=True)
            step()
            steps[method] = step
        times = {m: [] for m in args.methods}
        for round_ in range(args.rounds):
            for method, step in steps.items():
                began = time.perf_counter()
                step()
                times[method].append(time.perf_counter() - began)
            print(f"  round {round_ + 1}: " + ", ".join(f"{m} {t[-1]:.2f} s" for m, t in times.items()),
                  file=sys.stderr, flush=True)
        peaks = {m: measure_peak_memory(step)[1] for m, step in steps.items()}
        results[objective] = {m: {"seconds": times[m], "peak_bytes": peaks[m]} for m in args.methods}
    print(markdown(args, results))
    print(f"(measured in {time.perf_counter() - started:.0f} s; command: python benchmarks/step_time.py "
          + " ".join(sys.argv[1:] if argv is None else argv) + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": bench.describe(model_args), "length": args.length, "results": results}, f, indent=2)


def markdown(args, results) -> str:
    model_args = argparse.Namespace(hidden_size=args.hidden_size, layers=args.layers, vocab_size=args.vocab_size)
    lines = [f"Step time and peak memory at T={args.length}, {args.rounds} interleaved rounds; "
             f"{bench.describe(model_args)}", "",
             "| objective | method | median step (s) | vs checkpointing | peak (MB) | vs checkpointing |",
             "|---|---|---:|---:|---:|---:|"]
    for objective, by_method in results.items():
        base = by_method.get("checkpointing")
        for method, r in by_method.items():
            median = statistics.median(r["seconds"])
            time_ratio = f"{median / statistics.median(base['seconds']):.2f}x" if base else "-"
            memory_ratio = f"{r['peak_bytes'] / base['peak_bytes']:.3f}x" if base else "-"
            lines.append(f"| {objective} | {method} | {median:.2f} | {time_ratio} | {r['peak_bytes'] / 2 ** 20:.1f} | "
                         f"{memory_ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
