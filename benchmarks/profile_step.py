"""Where a training step spends its time: the PyTorch profiler's table of ops by self CPU time.

    python benchmarks/profile_step.py --method streambp --length 4096
    python benchmarks/profile_step.py --method checkpointing --length 4096
    python benchmarks/profile_step.py --hidden-size 1024 --layers 2 --length 2048 --matmuls   # GFLOP/s per shape
    python benchmarks/profile_step.py --live-at-peak   # the tensors alive at the step's memory peak

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
    parser.add_argument("--live-at-peak", action="store_true",
                        help="instead of the time table: the allocations alive at the step's memory peak, in "
                             "units of one tokens x hidden activation")
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
        if args.live_at_peak:
            print(live_at_peak_table(step, args, model))
            return
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=args.matmuls,
                                    record_shapes=args.matmuls) as prof:
            step()
    print(f"{args.method}, SFT step at T={args.length} ({bench.describe(model_args)}):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.matmuls:
        print(matmul_table(prof, args.rows))


def live_at_peak_table(step, args, model) -> str:
    """The allocations alive at the peak, grouped by size, each size also in units of one
    ``tokens x hidden`` activation (a layer input, a gradient of one): what the peak is made of."""
    from sbp_compiler.profiling import trace_memory

    _, trace = trace_memory(step)
    unit = args.length * args.hidden_size * next(model.parameters()).element_size()
    by_size = collections.Counter(trace.live_at_peak)
    lines = [f"peak {trace.peak_bytes / 2**20:.1f} MB = {trace.peak_bytes / unit:.2f} units of tokens x hidden "
             f"({unit / 2**20:.2f} MB); parameters (resident before the step) not counted",
             "| bytes | count | units each | MB in all |", "|---:|---:|---:|---:|"]
    for size, count in sorted(by_size.items(), key=lambda item: -item[0] * item[1]):
        if size * count < unit / 64:
            continue
        lines.append(f"| {size} | {count} | {size / unit:.3f} | {size * count / 2**20:.2f} |")
    small = sum(size * count for size, count in by_size.items() if size * count < unit / 64)
    lines.append(f"(the rest, {small / 2**20:.2f} MB, in allocations of under 1/64 unit each size)")
    return "\n".join(lines)


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
