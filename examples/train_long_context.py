"""Train a small byte-level Llama on long sequences with the streambp backend.

Needs no download: the training text is the source code of Python's own
standard library (or the files given with --text-files), one token per byte,
and the model is built from a config with random weights. After training, one
step at the same sequence length is compared with eager PyTorch and with
activation checkpointing (peak memory and time), and the peak memory of each
method is plotted against the sequence length.

    python examples/train_long_context.py                 # a few minutes on 2 CPU cores
    python examples/train_long_context.py --skip-compare --steps 200
    python examples/train_long_context.py --config my_config.json --seq-len 16384
"""

import argparse
import json
import os
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from sbp_compiler.profiling import measure_peak_memory, time_step

MB = 2**20
VOCAB_SIZE = 256  # one token per byte
STDLIB_CORPUS_BYTES = 8 * MB
# Installed packages may live inside the stdlib directory; they are not stdlib text.
SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}

# The built-in model: small enough that the default run (30 steps of 8192
# tokens, then the comparison) takes a few minutes on a 2-core CPU.
DEFAULT_MODEL_SIZES = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 344,
}

EAGER = "eager"
CHECKPOINTING = "checkpointing"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Peak memory is what one training step allocates on top of the model, "
        "measured exactly from the allocator events recorded by the PyTorch profiler.",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--text-files",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="train on these files instead of the standard library sources",
    )

    model = parser.add_argument_group(
        "model", "The size flags default to the built-in model; --config replaces them."
    )
    model.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="a transformers config.json (Llama if it names no model_type)",
    )
    size_flags = [
        ("--hidden-size", "hidden_size", "model width"),
        ("--layers", "num_hidden_layers", "decoder layers"),
        ("--heads", "num_attention_heads", "attention heads"),
        ("--kv-heads", "num_key_value_heads", "key/value heads (grouped-query attention)"),
        ("--intermediate-size", "intermediate_size", "MLP width"),
    ]
    for flag, key, meaning in size_flags:
        model.add_argument(
            flag, dest=key, type=int, metavar="N", help=f"{meaning} (default: {DEFAULT_MODEL_SIZES[key]})"
        )

    training = parser.add_argument_group("training")
    for flag, default, meaning in [
        ("--seq-len", 8192, "tokens per sequence"),
        ("--batch-size", 1, "sequences per step"),
        ("--steps", 30, "training steps"),
        ("--seed", 0, "seed of the weights and the data"),
    ]:
        training.add_argument(
            flag, type=int, metavar="N", default=default, help=f"{meaning} (default: %(default)s)"
        )
    training.add_argument(
        "--chunk-size",
        type=lambda text: text if text == "auto" else int(text),
        metavar="N",
        default="auto",
        help="streambp chunk length in tokens, or 'auto' (from the hidden size) (default: %(default)s)",
    )
    training.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")

    compare = parser.add_argument_group("comparison")
    compare.add_argument("--skip-compare", action="store_true", help="only train")
    compare.add_argument(
        "--compare-lengths",
        nargs="+",
        type=int,
        default=[1024, 2048, 4096, 8192],
        metavar="N",
        help="sequence lengths of the memory plot (default: %(default)s)",
    )
    compare.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        default=3,
        help="timed steps per method, of which the median is shown (default: %(default)s)",
    )
    compare.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        default=Path("streambp_memory.png"),
        help="PNG file of the memory plot (default: %(default)s)",
    )

    parser.add_argument(
        "--quiet", action="store_true", help="print only the results, without progress or setup details"
    )
    # For developing this script without the streambp backend (e.g. --backend aot_eager).
    parser.add_argument("--backend", default="streambp", help=argparse.SUPPRESS)

    args = parser.parse_args(argv)
    size_overrides = {key: getattr(args, key) for _, key, _ in size_flags if getattr(args, key) is not None}
    if args.config and size_overrides:
        parser.error("--config and the model size flags are mutually exclusive")
    args.model_sizes = DEFAULT_MODEL_SIZES | size_overrides
    if args.chunk_size != "auto" and args.chunk_size < 1:
        parser.error("--chunk-size must be at least 1 or 'auto'")
    for name in ("seq_len", "batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.compare_lengths) < 2 or args.seq_len < 2:
        parser.error("sequence lengths must be at least 2 (a token and its successor)")
    return args


def status(args, message):
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


# --- data -------------------------------------------------------------------


def stdlib_sources():
    """Yield the standard library's .py files in sorted, hence reproducible, order."""
    root = sysconfig.get_paths()["stdlib"]
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(name for name in subdirs if name not in SKIPPED_STDLIB_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(directory, name)


def load_corpus(text_files, min_bytes):
    """Return the training text as a 1-D uint8 tensor, and a description of it.

    User files are read whole; standard library files are read until the
    corpus holds at least ``min_bytes``.
    """
    if text_files:
        chunks = [path.read_bytes() for path in text_files]
        origin = "given"
    else:
        chunks, size = [], 0
        for path in stdlib_sources():
            if size >= min_bytes:
                break
            chunks.append(path.read_bytes())
            size += len(chunks[-1])
        origin = "Python standard library"
    corpus = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return corpus, f"{corpus.numel():,} bytes from {len(chunks)} {origin} files"


def sample_windows(corpus, seq_len, batch_size, generator):
    """Random contiguous windows of the corpus, as a (batch_size, seq_len) batch of token ids."""
    starts = torch.randint(0, corpus.numel() - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([corpus[start : start + seq_len] for start in starts.tolist()]).long()


# --- model ------------------------------------------------------------------


def build_config(args, max_seq_len):
    """The model config: the --config file, else the built-in Llama with the size flags."""
    if args.config:
        fields = json.loads(args.config.read_text())
        config = AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
        if config.vocab_size < VOCAB_SIZE:
            raise SystemExit(f"{args.config}: vocab_size must be at least {VOCAB_SIZE} for byte tokens")
        return config
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=max_seq_len,
        attention_dropout=0.0,
        # Raw bytes have no special tokens.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **args.model_sizes,
    )


def build_model(config, seed):
    """A freshly initialized model in training mode; the same seed gives the same weights."""
    # Seed a forked RNG so that calling main() leaves the caller's global RNG alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.train()


def compile_streambp(model, args):
    """The model's training call under streambp, compiled as a function that returns only the loss:
    the logits then never exist at full length (compiling the model itself would return them)."""

    def loss(input_ids, labels, use_cache):
        return model(input_ids=input_ids, labels=labels, use_cache=use_cache).loss

    compiled = torch.compile(loss, backend=args.backend, options={"chunk_size": args.chunk_size})
    return lambda **inputs: SimpleNamespace(loss=compiled(**inputs))


def enable_activation_checkpointing(model):
    # The non-reentrant implementation is the one PyTorch recommends.
    kwargs = {"use_reentrant": False}
    # transformers 5 renamed gradient_checkpointing_enable, keeping the old name as a deprecated alias.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def describe_model(model, config):
    n_params = sum(p.numel() for p in model.parameters())
    return (
        f"{config.model_type} model, {n_params / 1e6:.2f}M parameters: hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads "
        f"({getattr(config, 'num_key_value_heads', config.num_attention_heads)} KV), "
        f"intermediate {config.intermediate_size}"
    )


# --- training ---------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on stderr; one plain line per update when stderr is not a terminal."""

    WIDTH = 30

    def __init__(self, total, enabled):
        self.total = total
        self.enabled = enabled
        self.interactive = sys.stderr.isatty()
        self._last_width = 0

    def update(self, done, text):
        if not self.enabled:
            return
        filled = round(self.WIDTH * done / self.total)
        line = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total}  {text}"
        if self.interactive:
            # Pad so that a shorter line fully overwrites the previous one.
            end = "\n" if done == self.total else ""
            sys.stderr.write("\r" + line.ljust(self._last_width) + end)
            self._last_width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def train(args, config, corpus):
    """Train a fresh model with the compiled step, showing the loss as it goes down."""
    model = build_model(config, args.seed)
    status(args, describe_model(model, config))
    step = compile_streambp(model, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    progress = ProgressBar(args.steps, enabled=not args.quiet)

    status(
        args,
        f"training {args.steps} steps of {args.batch_size} x {args.seq_len} tokens "
        f"(backend {args.backend}, chunk size {args.chunk_size}); the first step compiles",
    )
    # Single-step losses vary with the text of each window, so averages over a few steps are shown too.
    window = max(1, min(5, args.steps // 4))
    losses = []
    start = time.perf_counter()
    for index in range(1, args.steps + 1):
        ids = sample_windows(corpus, args.seq_len, args.batch_size, generator)
        out = step(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        elapsed = time.perf_counter() - start
        recent = statistics.mean(losses[-window:])
        progress.update(index, f"loss {losses[-1]:.3f} (last {window}: {recent:.3f})  {elapsed:.0f} s")

    first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
    print(
        f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s: loss {first:.3f} -> {last:.3f} "
        f"(mean of the first and last {window} steps)"
    )


# --- comparison -------------------------------------------------------------


@dataclass
class MethodResult:
    name: str
    step_seconds: float
    peak_bytes: dict[int, int] = field(default_factory=dict)  # by sequence length


def prepare_method(method, config, args):
    """Return (model, forward) for one method, with the same weights for every method."""
    model = build_model(config, args.seed)
    if method == EAGER:
        return model, model
    if method == CHECKPOINTING:
        enable_activation_checkpointing(model)
        return model, model
    return model, compile_streambp(model, args)


def benchmark_method(method, config, args, batches):
    """Time one step at --seq-len and measure its peak memory at every length of ``batches``."""
    model, forward = prepare_method(method, config, args)

    def training_step(ids):
        # Clearing the gradients inside the step makes every run start from the same state.
        model.zero_grad(set_to_none=True)
        forward(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    result = MethodResult(name=method, step_seconds=0.0)
    for length, ids in batches.items():
        status(args, f"measuring {method} at {length} tokens")
        # Warm-up outside the measurements: compilation, lazy initialization, one-time caches.
        training_step(ids)
        if length == args.seq_len:
            seconds = time_step(lambda: training_step(ids), args.repeats)
            result.step_seconds = statistics.median(seconds)
        _, result.peak_bytes[length] = measure_peak_memory(lambda: training_step(ids))
    return result


def compare_methods(args, config, corpus):
    generator = torch.Generator().manual_seed(args.seed + 1)
    lengths = sorted(set(args.compare_lengths) | {args.seq_len})
    # One window of text, cut to each length, so that all methods see the same tokens.
    longest = sample_windows(corpus, lengths[-1], args.batch_size, generator)
    batches = {length: longest[:, :length].contiguous() for length in lengths}
    methods = [EAGER, CHECKPOINTING, args.backend]
    return [benchmark_method(method, config, args, batches) for method in methods]


def print_step_table(results, args):
    reference = next(result for result in results if result.name == CHECKPOINTING)
    reference_bytes = reference.peak_bytes[args.seq_len]
    print(f"\nOne training step (forward + backward), batch {args.batch_size} x {args.seq_len} tokens:")
    print(
        f"{'method':<15} {'peak memory MB':>15} {'step time s':>12} "
        f"{'memory vs ckpt':>15} {'time vs ckpt':>13}"
    )
    for result in results:
        peak = result.peak_bytes[args.seq_len]
        print(
            f"{result.name:<15} {peak / MB:>15.1f} {result.step_seconds:>12.3f} "
            f"{peak / reference_bytes:>14.2f}x {result.step_seconds / reference.step_seconds:>12.2f}x"
        )


def print_memory_table(results, lengths):
    print("\nPeak memory (MB) of one step by sequence length:")
    print(f"{'tokens':>8} " + " ".join(f"{result.name:>15}" for result in results))
    for length in lengths:
        print(f"{length:>8} " + " ".join(f"{result.peak_bytes[length] / MB:>15.1f}" for result in results))


def plot_memory(results, lengths, path, title):
    """Write the peak-memory-versus-length plot; return False when matplotlib is missing.

    ``results`` have a ``name`` and ``peak_bytes`` by length; each is drawn at those of
    ``lengths`` it was measured at (``benchmarks/plot_memory.py`` reuses this)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    # A bare Figure on the Agg canvas leaves pyplot's global state and backend alone.
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for result in results:
        measured = [length for length in lengths if length in result.peak_bytes]
        axes.plot(measured, [result.peak_bytes[length] / MB for length in measured], marker="o", label=result.name)
    axes.set_xscale("log", base=2)
    axes.minorticks_off()
    axes.set_xticks(lengths, labels=[str(length) for length in lengths])
    axes.set_ylim(bottom=0)
    axes.set_xlabel("sequence length (tokens)")
    axes.set_ylabel("peak memory of one training step (MB)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)
    return True


def main(argv=None):
    args = parse_args(argv)
    lengths = sorted(set(args.compare_lengths))
    longest = max(args.seq_len, *lengths) if not args.skip_compare else args.seq_len

    corpus, corpus_description = load_corpus(args.text_files, max(STDLIB_CORPUS_BYTES, 2 * longest))
    if corpus.numel() < longest:
        raise SystemExit(f"the text has {corpus.numel()} bytes, fewer than the {longest} of one sequence")
    status(args, f"corpus: {corpus_description}")
    config = build_config(args, longest)

    train(args, config, corpus)
    if args.skip_compare:
        return

    results = compare_methods(args, config, corpus)
    print_step_table(results, args)
    print_memory_table(results, lengths)
    title = f"{config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}"
    if plot_memory(results, lengths, args.plot, title):
        print(f"\nwrote {args.plot}")
    else:
        print("\nmatplotlib is not installed, so no plot was written (pip install matplotlib)")


if __name__ == "__main__":
    main()
