"""Peak memory of a Hugging Face Trainer step: gradient checkpointing against streambp.

    python benchmarks/trainer_memory.py                   # 4096 tokens
    python benchmarks/trainer_memory.py --length 8192 --json out.json

The same Qwen3-shaped model as ``memory_and_time.py`` (4 layers, hidden 256, vocabulary 32768,
float32), trained by ``transformers.Trainer`` as shipped: one optimizer step of two micro-batches
of ``--length`` tokens (gradient accumulation 2, AdamW). Methods:

  eager          the plain Trainer
  checkpointing  ``TrainingArguments(gradient_checkpointing=True)``
  streambp       ``model.compile(backend="streambp", options={"skip_logits": True})`` before the
                 Trainer is built

Each method trains one step first (compilation, checkpointing set-up, AdamW's state), then the
peak of a second ``trainer.train()`` of one step is measured with the profiler's allocator events
(DESIGN §2): everything that step allocates (gradients, activations, logits, the update), as in
every step after the first; not the parameters and AdamW's state, which exist before it.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Trainer, TrainingArguments

from sbp_compiler.profiling import measure_peak_memory

METHODS = ("eager", "checkpointing", "streambp")


class Rows(torch.utils.data.Dataset):
    def __init__(self, count, length, vocab):
        g = torch.Generator().manual_seed(0)
        self.rows = []
        for _ in range(count):
            ids = torch.randint(0, vocab, (length,), generator=g)
            labels = ids.clone()
            labels[: length // 4] = -100  # a masked prompt
            self.rows.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def build_model(args):
    torch.manual_seed(0)
    heads = max(1, args.hidden_size // 64)
    config = Qwen3Config(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=64, max_position_embeddings=1 << 20, attn_implementation="sdpa", use_cache=False,
    )
    return AutoModelForCausalLM.from_config(config).train()


def trainer_step_peak(args, method, output_dir) -> tuple[int, float, int]:
    """(peak bytes of one measured Trainer step, its seconds, parameter bytes)."""
    model = build_model(args)
    if method == "streambp":
        model.compile(backend="streambp", options={"skip_logits": True})
    training = TrainingArguments(
        output_dir=output_dir, max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        gradient_checkpointing=method == "checkpointing", save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, logging_strategy="no",
    )
    trainer = Trainer(model=model, args=training, train_dataset=Rows(2, args.length, args.vocab_size))
    trainer.train()  # warm-up: compilation, checkpointing set-up
    start = time.perf_counter()
    _, peak = measure_peak_memory(trainer.train)
    seconds = time.perf_counter() - start
    return peak, seconds, sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for method in args.methods:
            print(f"  {method} ...", file=sys.stderr, flush=True)
            peak, seconds, parameters = trainer_step_peak(args, method, output_dir)
            results[method] = dict(peak_bytes=peak, seconds=seconds)
    mib = 1 << 20
    print(f"Trainer step (gradient accumulation 2, 1 x {args.length} tokens per micro-batch, AdamW), Qwen3-shaped, "
          f"{args.layers} layers, hidden {args.hidden_size}, vocabulary {args.vocab_size}, float32 "
          f"(parameters {parameters / mib:.1f} MiB, not counted); torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print("| method | peak MiB | ratio to checkpointing | step s (profiled) |")
    print("|---|---:|---:|---:|")
    baseline = results.get("checkpointing", {}).get("peak_bytes")
    for method, r in results.items():
        ratio = f"{r['peak_bytes'] / baseline:.3f}x" if baseline else "-"
        print(f"| {method} | {r['peak_bytes'] / mib:.1f} | {ratio} | {r['seconds']:.1f} |")
    print(f"\n(command: python benchmarks/trainer_memory.py {' '.join(sys.argv[1:] if argv is None else argv)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(length=args.length, results=results, parameter_bytes=parameters), f, indent=2)


if __name__ == "__main__":
    main()
