"""Where a training step spends its time: the PyTorch profiler's table of ops by self CPU time.

    python benchmarks/profile_step.py --method streambp --length 4096
    python benchmarks/profile_step.py --method checkpointing --length 4096
    python benchmarks/profile_step.py --hidden-size 1024 --layers 2 --length 2048 --matmuls   # GFLOP/s per shape

Same model, data and methods as ``memory_and_time.py`` (SFT objective). One warm-up step, then one
profiled step. The shares of the total are what to read: this machine's absolute times are noisy.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_and_time as bench  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", type=bench.method_name, default="streambp")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--rows", type=int, default=20, help="ops to list")
    parser.add_argument("--matmuls", action="store_true",
                        help="also list the matmuls by shape: GFLOP, seconds and GFLOP/s (profiler's FLOP counts)")
    args = parser.parse_args(argv)

    model_args = argparse.Namespace(hidden_size=args.hidden_size, layers=args.layers,
                                    vocab_size=args.vocab_size, lengths=[args.length])
    model = bench.build_model(model_args)
    inputs = bench.make_inputs("sft", args.length, args.vocab_size, torch.Generator().manual_seed(0))
    with bench.method_context(args.method, model):
        step_loss = bench.step_function(args.method, "sft", model)

        def step():
            model.zero_grad(set_to_none=True)
            step_loss(inputs).backward()

        step()  # warm-up: compilation
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=args.matmuls,
                                    record_shapes=args.matmuls) as prof:
            step()
    print(f"{args.method}, SFT step at T={args.length} ({bench.describe(model_args)}):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.matmuls:
        print(matmul_table(prof, args.rows))


def matmul_table(prof, rows: int) -> str:
    """Matmuls grouped by operand shapes: where the arithmetic runs below the machine's rate."""
    by_shape = collections.defaultdict(lambda: [0, 0.0, 0])
    for event in prof.events():
        if event.name in ("aten::mm", "aten::addmm", "aten::bmm"):
            entry = by_shape[(event.name, str(event.input_shapes))]
            entry[0] += event.flops
            entry[1] += event.self_cpu_time_total / 1e6
            entry[2] += 1
    flops = sum(e[0] for e in by_shape.values())
    seconds = sum(e[1] for e in by_shape.values())
    lines = [f"matmuls: {flops / 1e9:.1f} GFLOP in {seconds:.2f} s ({flops / 1e9 / max(seconds, 1e-9):.1f} GFLOP/s)",
             "| GFLOP | s | GFLOP/s | calls | op, operand shapes |", "|---:|---:|---:|---:|---|"]
    for (name, shapes), (f, s, n) in sorted(by_shape.items(), key=lambda kv: -kv[1][1])[:rows]:
        lines.append(f"| {f / 1e9:.1f} | {s:.2f} | {f / 1e9 / max(s, 1e-9):.1f} | {n} | {name} {shapes} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
