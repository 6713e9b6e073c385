"""Compile time of a training step, cold and with the caches warm.

    python benchmarks/compile_time.py
    python benchmarks/compile_time.py --methods streambp streambp_inductor --length 2048

Each measurement runs in a fresh Python process (Dynamo's in-memory caches start empty), on the
small Qwen3-shaped model of ``memory_and_time.py``, SFT objective. Compile time is the first
step's time minus the median of the following steps. "cold" uses an empty Inductor cache
directory (``TORCHINDUCTOR_CACHE_DIR``, a temporary one); "warm" is a second process on the same
directory, as when a user re-runs a training script. Methods:

  streambp            the default: AOTAutograd without code generation (no Inductor cache involved)
  streambp_inductor   ``inner_compiler="inductor"``: Inductor for the outer graph and every chunk
                      subgraph
  inductor            plain ``torch.compile(step)`` (Inductor), for reference
  budget0             Inductor with ``activation_memory_budget = 0``

Output: a markdown table on stdout and, with ``--json``, the measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("streambp", "streambp_inductor", "inductor", "budget0")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=3, help="steps after the first (median)")
    parser.add_argument("--json", default=None, help="write the measurements to this file")
    parser.add_argument("--child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args) -> None:
    """One process, one method: print the first step's time and the later steps' median."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import memory_and_time as bench

    model_args = argparse.Namespace(hidden_size=args.hidden_size, layers=args.layers,
                                    vocab_size=args.vocab_size, lengths=[args.length])
    model = bench.build_model(model_args)
    inputs = bench.make_inputs("sft", args.length, args.vocab_size, torch.Generator().manual_seed(0))
    method = {"inductor": "eager"}.get(args.child, args.child)
    with bench.method_context(method, model):
        step_loss = bench.step_function(method, "sft", model)
        if args.child == "inductor":
            step_loss = torch.compile(step_loss, backend="inductor", dynamic=True)

        def step():
            model.zero_grad(set_to_none=True)
            step_loss(inputs).backward()

        times = []
        for _ in range(1 + args.steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    print(json.dumps({"first": times[0], "steady": statistics.median(times[1:])}))


def run_child(args, method: str, cache_dir: str) -> dict:
    command = [sys.executable, __file__, "--child", method, "--length", str(args.length),
               "--hidden-size", str(args.hidden_size), "--layers", str(args.layers),
               "--vocab-size", str(args.vocab_size), "--steps", str(args.steps)]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    rows = {}
    started = time.perf_counter()
    for method in args.methods:
        with tempfile.TemporaryDirectory(prefix="streambp_cache_") as cache_dir:
            runs = {}
            for state in ("cold", "warm"):
                print(f"  {method} {state}", file=sys.stderr, flush=True)
                runs[state] = run_child(args, method, cache_dir)
            rows[method] = runs
    lines = [f"Compile time of an SFT step, T={args.length}, Qwen3-shaped, {args.layers} layers, hidden "
             f"{args.hidden_size}, vocabulary {args.vocab_size}; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores", "",
             "| method | cold: first step | cold: compile | warm: first step | warm: compile | later steps |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, runs in rows.items():
        cold, warm = runs["cold"], runs["warm"]
        lines.append(f"| {method} | {cold['first']:.1f} s | {cold['first'] - cold['steady']:.1f} s | "
                     f"{warm['first']:.1f} s | {warm['first'] - warm['steady']:.1f} s | {cold['steady']:.2f} s |")
    print("\n".join(lines))
    print(f"\n(measured in {time.perf_counter() - started:.0f} s; command: python benchmarks/compile_time.py "
          + " ".join(sys.argv[1:] if argv is None else argv) + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
