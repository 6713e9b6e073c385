"""FSDP2 across N processes: eager with activation checkpointing against streambp, per rank.

    python benchmarks/distributed.py                       # 2 processes (gloo on CPU), 8192 tokens
    python benchmarks/distributed.py --nproc 2 --length 2048 --json out.json

Launches itself under ``torch.distributed.run``. Each rank trains a Qwen3-shaped model (4 layers,
hidden 256, vocabulary 32768, float32) with ``fully_shard`` on every decoder layer and on the root,
on its own batch of one ``--length``-token sequence:

  checkpointing  eager FSDP2, every layer under activation checkpointing (non-reentrant)
  streambp       ``torch.compile(loss_fn, backend="streambp", options={"skip_logits": True})``

After a warm-up step, one step (forward, backward) is measured for peak memory (the profiler's
allocator events, DESIGN §2: what the step allocates, not the sharded parameters), one for time,
and one for its collectives (``sbp_compiler.collectives``): calls and bytes per kind, and how much
of their time overlapped streambp's compute. Rank 0 prints every rank's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.distributed as dist

METHODS = ("checkpointing", "streambp")


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--json")
    return parser.parse_args(argv)


def _build(args, method):
    from torch.distributed.fsdp import fully_shard
    from trainer_memory import build_model  # the same Qwen3-shaped model as the Trainer benchmark

    model = build_model(args)
    if method == "checkpointing":  # transformers 5 renamed gradient_checkpointing_enable
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _rank_figures(args, method, rank) -> dict:
    from sbp_compiler.collectives import summarize_collectives
    from sbp_compiler.profiling import measure_peak_memory

    torch._dynamo.reset()
    model = _build(args, method)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, args.vocab_size, (1, args.length), generator=g)
    labels = ids.clone()
    labels[:, : args.length // 4] = -100

    def loss_fn(input_ids, labels):
        return model(input_ids=input_ids, labels=labels, use_cache=False).loss

    run = loss_fn if method == "checkpointing" else torch.compile(
        loss_fn, backend="streambp", options={"skip_logits": True})

    def step():
        run(ids, labels).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: compilation, FSDP's lazy initialisation
    dist.barrier()
    _, peak = measure_peak_memory(step)
    dist.barrier()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    dist.barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    summary = summarize_collectives(prof)
    return dict(
        peak_bytes=peak, seconds=seconds, collectives={k: vars(v) for k, v in summary.kinds.items()},
        collective_bytes=summary.total_bytes, overlapped=summary.overlapped_seconds / summary.seconds if summary.seconds else 0.0,
        summary=str(summary),
        sharded_parameter_bytes=sum(p.to_local().numel() * p.element_size() for p in model.parameters()),
    )


def _worker(args):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for method in args.methods:
        if rank == 0:
            print(f"  {method} ...", file=sys.stderr, flush=True)
        mine = _rank_figures(args, method, rank)
        every = [None] * world
        dist.all_gather_object(every, mine)
        results[method] = every
    if rank == 0:
        _print(args, results, world)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(args=vars(args), world=world, results=results), f, indent=2)
    dist.destroy_process_group()


def _print(args, results, world):
    mib = 1 << 20
    print(f"FSDP2 over {world} processes (gloo, CPU), one step of 1 x {args.length} tokens per rank, Qwen3-shaped, "
          f"{args.layers} layers, hidden {args.hidden_size}, vocabulary {args.vocab_size}, float32; "
          f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s) per rank\n")
    print("| method | rank | peak MiB | ratio to checkpointing | step s | collectives per step | MiB moved | overlapped |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    baseline = results.get("checkpointing")
    for method, ranks in results.items():
        for rank, r in enumerate(ranks):
            ratio = f"{r['peak_bytes'] / baseline[rank]['peak_bytes']:.3f}x" if baseline else "-"
            calls = ", ".join(f"{k} x{v['calls']}" for k, v in sorted(r["collectives"].items()))
            print(f"| {method} | {rank} | {r['peak_bytes'] / mib:.1f} | {ratio} | {r['seconds']:.2f} | {calls} | "
                  f"{r['collective_bytes'] / mib:.2f} | {r['overlapped']:.0%} |")
    print(f"\n(command: python benchmarks/distributed.py {' '.join(sys.argv[1:])})")


def main(argv=None):
    args = _parse(argv)
    if "RANK" in os.environ:
        _worker(args)
        return
    # Not launched by torchrun: launch this script under it, one process per rank.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]
    sys.exit(subprocess.call(command, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))))


if __name__ == "__main__":
    main()
