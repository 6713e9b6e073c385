"""One rank of a distributed test, run by tests/test_distributed.py under
``torchrun --nproc_per_node 2`` (gloo, CPU).

    distributed_worker.py <mode> <arch> <result.json>

Modes: ddp (Dynamo's DDPOptimizer off, as the README says), ddp_optimizer (left on), fsdp
(``fully_shard`` per layer and on the root), fsdp_mixed (bfloat16 parameters, float32
reduction), fsdp_fail (rank 1 raises in step 2), ddp_mismatch (rank 1 builds another model).

Each rank holds two rows of a four-row batch with padding; the reference is the same model in one
process, eager, over the whole batch. Rank 0 writes what was measured to the JSON file; the
assertions are in the test.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from models import batch, build_model, float64_throughout  # noqa: E402

import sbp_compiler  # noqa: E402
from sbp_compiler.collectives import summarize_collectives  # noqa: E402

STEPS = 3
GROUPED_MM = {"mixtral"}  # experts through torch._grouped_mm: float32 at least, no float64
SIZES = dict(hidden_size=128, intermediate_size=256)  # a layer's weights (1.2 MB in float64) fill one of DDP's 1 MB buckets


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _starts(prof, prefix: str) -> list[int]:
    return sorted(e.start_ns() for e in prof.profiler.kineto_results.events() if e.name().startswith(prefix))


def _wrap(mode: str, model: torch.nn.Module, world: int):
    if mode.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, bucket_cap_mb=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mode == "fsdp_mixed" else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _run(mode: str, arch: str, dtype, chunk_size: int, backend, rank: int, world: int, full: dict, items: int):
    """Three SGD steps of the wrapped model on this rank's rows: the losses (summed over ranks),
    the first step's gradients (whole tensors) and the second step's collectives."""
    torch._dynamo.reset()
    sizes = dict(SIZES, hidden_size=64) if mode == "ddp_mismatch" and rank == 1 else SIZES  # another model
    model = float64_throughout(build_model(arch, dtype=dtype, **sizes))
    if backend == "model":  # the model compiled in place, then wrapped
        model.compile(backend="streambp", options={"chunk_size": chunk_size})
    wrapped = _wrap(mode, model, world)
    rows = slice(2 * rank, 2 * rank + 2)
    local = {k: v[rows] if torch.is_tensor(v) else v for k, v in full.items()}

    def loss_fn(**inputs):
        # DDP and FSDP average gradients over ranks: the sum over this rank's tokens, divided by
        # the global count of tokens, times the world size, gives the global mean's gradients.
        return wrapped(**inputs, num_items_in_batch=items).loss * world

    step = loss_fn if backend in (None, "model") else torch.compile(loss_fn, backend=backend,
                                                                      options={"chunk_size": chunk_size})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads, summary = [], None, None
    for index in range(STEPS):
        if index == 1:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
            profiler.__enter__()
        if mode == "fsdp_fail" and rank == 1 and index == 1:
            raise RuntimeError("rank 1 fails on purpose in step 2")
        loss = step(**local)
        loss.backward()
        if index == 1:
            profiler.__exit__(None, None, None)
            summary = summarize_collectives(profiler)
            # When each layer's gradients went out: the first reduction against the last layer's
            # backward (DDP reduces them as each layer's piece returns, while the next one runs).
            reductions = _starts(profiler, "c10d::allreduce_") + _starts(profiler, "c10d::_reduce_scatter_base_")
            backwards = _starts(profiler, "streambp::layer_backward")
            summary.layer_backwards = len(backwards)
            summary.first_reduction_before_last_layer_backward = bool(
                reductions and backwards and min(reductions) < max(backwards))
        total = loss.detach().double() / world
        dist.all_reduce(total)
        losses.append(total.item())
        if index == 0:
            grads = {name: _full(p.grad).detach().double().clone() for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, losses, grads, summary


def main():
    mode, arch, out = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode != "ddp_optimizer":
        # Dynamo's DDPOptimizer cuts a DDP model's graph at bucket boundaries, through layers
        # (this process's own setting, as a user sets it; see the README).
        torch._dynamo.config.optimize_ddp = False
    full = batch(20, batch_size=2 * world, pad=5)
    items = int((full["labels"][:, 1:] != -100).sum())

    # The reference: one process, eager, the whole batch, the same SGD steps.
    dtype = torch.float32 if arch in GROUPED_MM else torch.float64
    reference = float64_throughout(build_model(arch, dtype=dtype, **SIZES))
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    ref_losses, ref_grads = [], None
    for index in range(STEPS):
        loss = reference(**full, num_items_in_batch=items).loss
        loss.backward()
        ref_losses.append(loss.item())
        if index == 0:
            ref_grads = {name: p.grad.detach().clone() for name, p in reference.named_parameters()}
        ref_optimizer.step()
        ref_optimizer.zero_grad(set_to_none=True)

    result = {"reference_losses": ref_losses, "runs": {}}
    run_dtype = torch.float32 if mode == "fsdp_mixed" else dtype  # bfloat16 parameters under the policy
    configurations = [("streambp", "streambp", 4), ("streambp_chunk8", "streambp", 8)]
    if mode == "fsdp_mixed":
        configurations.append(("eager", None, 0))
    if mode == "ddp" and arch == "llama":
        configurations.append(("model_compiled_then_wrapped", "model", 4))
    for name, backend, chunk_size in configurations:
        before = len(sbp_compiler.reports())
        _, losses, grads, summary = _run(mode, arch, run_dtype, chunk_size, backend, rank, world, full, items)
        errors = [(grads[k] - ref_grads[k]).abs().max().item() / max(ref_grads[k].abs().max().item(), 1e-300)
                  for k in ref_grads]
        reports = sbp_compiler.reports()[before:] if backend else []
        result["runs"][name] = {
            "losses": losses,
            "max_relative_error": max(errors),
            "collectives": {kind: dataclasses.asdict(k) for kind, k in summary.kinds.items()},
            "summary": str(summary),
            "first_reduction_before_last_layer_backward": summary.first_reduction_before_last_layer_backward,
            "layer_backwards": summary.layer_backwards,
            "graphs": len(reports),
            "chunked_layers": sum(len(r.chunked_layers) for r in reports),
            "chunked_heads": sum(r.head.chunked for r in reports),
            "pieces": max([r.pieces for r in reports], default=0),
            "reports": [str(r) for r in reports],
        }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
