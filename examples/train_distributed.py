"""Data-parallel long-sequence training with streambp: FSDP2 (default) or DDP, under torchrun.

    torchrun --nproc_per_node 2 examples/train_distributed.py                 # FSDP2
    torchrun --nproc_per_node 2 examples/train_distributed.py --ddp           # DDP
    torchrun --nproc_per_node 8 examples/train_distributed.py --length 32768  # on a GPU node (NCCL)

A small Qwen3-shaped model from its config (random weights, no download), each rank its own
random sequence. What each rank holds and what is reduced when:

- FSDP2: ``fully_shard`` on every decoder layer and on the root. FSDP2's hooks break Dynamo's
  graph around each unit, so every layer is a graph of its own and streambp chunks it there: the
  layer's weights are gathered once for all its chunks in forward and once in backward, its
  gradients (summed over all chunks inside the layer's op) are reduce-scattered once. The root
  unit (embedding, final norm, LM head) is gathered once; the head is chunked in its graph.
- DDP: Dynamo's DDPOptimizer would cut the graph at DDP's bucket boundaries, through layers; set
  ``torch._dynamo.config.optimize_ddp = False`` (this script does, as its own setting) and
  streambp compiles one piece per layer, so DDP all-reduces a layer's gradients (in its buckets)
  as soon as that layer's backward returns, while the earlier layers' backward runs.

Every step prints the loss; the last one also the collectives it ran (counted by the profiler)
and rank 0 streambp's report of each compiled graph.
"""
from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Qwen3Config

import sbp_compiler
from sbp_compiler.collectives import summarize_collectives


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ddp", action="store_true", help="DistributedDataParallel instead of FSDP2")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    config = Qwen3Config(vocab_size=32768, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, use_cache=False,
                         max_position_embeddings=1 << 20)
    model = AutoModelForCausalLM.from_config(config).to(device).train()
    if args.ddp:
        from torch.nn.parallel import DistributedDataParallel

        torch._dynamo.config.optimize_ddp = False  # whole graphs to streambp, cut per layer (see above)
        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)

    def loss_fn(input_ids, labels):
        return wrapped(input_ids=input_ids, labels=labels, use_cache=False).loss

    step = torch.compile(loss_fn, backend="streambp", options={"skip_logits": True})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for index in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (1, args.length), generator=g).to(device)
        last = index == args.steps - 1
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        with profiler if last else contextlib.nullcontext():
            loss = step(ids, ids)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        if rank == 0:
            print(f"step {index + 1}/{args.steps}: loss {mean.item():.4f}", flush=True)
    summary = summarize_collectives(profiler)
    print(f"rank {rank}: {summary}", flush=True)
    if rank == 0:
        for report in sbp_compiler.reports():
            print(report)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
