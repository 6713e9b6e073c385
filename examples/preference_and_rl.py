"""One DPO step and one GRPO step at long sequence length with streambp, against eager PyTorch.

    python examples/preference_and_rl.py                    # 4096 tokens per sequence
    python examples/preference_and_rl.py --seq-len 8192 --vocab-size 65536

A small Qwen3-shaped model (random weights, built from a config: nothing is downloaded) with a
vocabulary large relative to its width, as in real models. Each step is the objective from
``sbp_compiler.objectives`` compiled with the streambp backend; the table shows its peak memory
(profiler method, DESIGN §2) and time next to the same objective run eagerly, and checks that the
losses agree. Sequences are random tokens: this example measures, it does not train.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from sbp_compiler import objectives
from sbp_compiler.profiling import measure_peak_memory, time_step


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: a quarter)")
    parser.add_argument("--pairs", type=int, default=2, help="DPO pairs / GRPO completions (default 2)")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per method (median)")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager comparison")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(args):
    torch.manual_seed(args.seed)
    heads = max(1, args.hidden_size // 64)
    config = Qwen3Config(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=64, max_position_embeddings=max(4096, 2 * args.seq_len), attn_implementation="sdpa",
    )
    return AutoModelForCausalLM.from_config(config).train()


def sequences(args, generator, length):
    """Prompt + completion tokens, right-padded: the second row is shorter by an eighth."""
    ids = torch.randint(0, args.vocab_size, (args.pairs, length), generator=generator)
    attention = torch.ones_like(ids)
    attention[1:, length - length // 8:] = 0
    completion = attention.clone()
    completion[:, : args.prompt_len] = 0
    return ids, attention, completion


def dpo_inputs(args, generator):
    chosen = sequences(args, generator, args.seq_len)
    rejected = sequences(args, generator, args.seq_len - args.seq_len // 16)  # unequal lengths
    ref_chosen = -torch.rand(args.pairs, generator=generator) * args.seq_len
    ref_rejected = -torch.rand(args.pairs, generator=generator) * args.seq_len
    return chosen, rejected, ref_chosen, ref_rejected


def dpo_objective(model, chosen, rejected, ref_chosen, ref_rejected):
    return objectives.dpo_loss(
        model, chosen[0], rejected[0], chosen[2], rejected[2], chosen[1], rejected[1],
        ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected, beta=0.1, loss_type="sigmoid",
    ).loss


def grpo_inputs(args, generator):
    ids, attention, completion = sequences(args, generator, args.seq_len)
    advantages = torch.randn(args.pairs, generator=generator)
    ref_logps = -torch.rand(ids.shape, generator=generator) * 10
    return ids, attention, completion, advantages, ref_logps


def grpo_objective(model, ids, attention, completion, advantages, ref_logps):
    return objectives.grpo_loss(
        model, ids, completion, advantages, attention, ref_logps=ref_logps, beta=0.04,
        epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo",
    )


def measure(name, model, objective, inputs, repeats):
    """(loss, peak bytes, median seconds) of one training step."""

    def step():
        model.zero_grad(set_to_none=True)
        loss = objective(model, *inputs)
        loss.backward()
        return loss.detach()

    loss = step()  # warm-up: compilation, lazy initialisation
    seconds = statistics.median(time_step(step, repeats))
    _, peak = measure_peak_memory(step)
    print(f"  {name:<10} loss {loss.item():10.5f}   peak {peak / 2**20:9.1f} MB   step {seconds:7.2f} s", flush=True)
    return loss, peak, seconds


def run(title, model, objective, inputs, args):
    print(title)
    compiled = torch.compile(objective, backend="streambp")
    loss, peak, seconds = measure("streambp", model, compiled, inputs, args.repeats)
    if args.no_eager:
        return
    eager_loss, eager_peak, eager_seconds = measure("eager", model, objective, inputs, args.repeats)
    if not torch.allclose(loss, eager_loss, rtol=1e-4, atol=1e-5):
        sys.exit(f"{title}: streambp loss {loss.item()} differs from eager {eager_loss.item()}")
    print(f"  streambp / eager: memory {peak / eager_peak:.2f}x, time {seconds / eager_seconds:.2f}x")


def main(argv=None):
    args = parse_args(argv)
    if args.prompt_len is None:
        args.prompt_len = args.seq_len // 4
    model = build_model(args)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"Qwen3-shaped model: {args.layers} layers, hidden {args.hidden_size}, vocabulary {args.vocab_size}")
    shorter = args.seq_len - args.seq_len // 16
    run(f"DPO step: {args.pairs} pairs, chosen {args.seq_len} and rejected {shorter} tokens",
        model, dpo_objective, dpo_inputs(args, generator), args)
    run(f"GRPO step: {args.pairs} completions of {args.seq_len} tokens",
        model, grpo_objective, grpo_inputs(args, generator), args)


if __name__ == "__main__":
    main()
