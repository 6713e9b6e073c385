"""Every causal LM that transformers ships, through streambp: chunked, refused with a reason, or
where it goes wrong.

    python benchmarks/architecture_sweep.py                      # all of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    python benchmarks/architecture_sweep.py --archs llama mixtral deepseek_v3
    python benchmarks/architecture_sweep.py --memory-length 2048 --json sweep.json

For each architecture a tiny config is derived from the config class's own defaults (every
width, depth, head, expert and vocabulary field shrunk; dropout off; a short override table
only where a family needs it), random weights, float64. One training step, as a new user writes
it (``torch.compile(model, backend=...)`` then ``model(**batch).loss.backward()``), is compared
with eager autograd: batch 2, the second row right-padded, ``-100`` labels on a prompt, T=50
then T=37 on the same compiled object, ``chunk_size=16``. ``aot_eager`` runs the same steps:
where it differs from eager (a compile problem upstream), streambp is compared with it instead.
With ``--memory-length`` a loss-only step at that length is measured too (profiler peak, DESIGN
§2), streambp against eager.

``VARIANTS`` adds rows for hybrids whose non-attention layers fail under ``aot_eager`` itself:
the same config with every layer an attention layer, so that those can still be checked.

Each architecture runs in its own process with a timeout, so a crash or a hang is one row.
Rows: ``chunked`` (every layer and the head), ``partly chunked``, ``refused`` (no layer;
reasons given), ``eager fails`` (the model itself does not train at this config), ``compile
diverges`` (aot_eager differs from eager; streambp is held to aot_eager), ``RAISES`` (streambp
raises where aot_eager runs), ``WRONG`` (gradient error above the tolerance), ``TIMEOUT``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

TOLERANCE = 1e-6  # relative to the largest gradient of the model (float64)
FLOAT32_TOLERANCE = 1e-4  # for the few models that cannot run in float64
VOCAB = 96
LENGTHS = (50, 37)
CHUNK = 16

# Field name -> tiny value, applied wherever the config class has that field.
TINY = {
    **dict.fromkeys(["hidden_size", "n_embd", "d_model", "n_embed", "embed_dim", "dim", "emb_dim",
                     "embedding_size", "word_embed_proj_dim", "input_embedding_size",
                     "output_embedding_size"], 32),
    **dict.fromkeys(["num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers",
                     "num_decoder_layers"], 2),
    **dict.fromkeys(["num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
                     "attention_heads", "num_decoder_attention_heads"], 4),
    **dict.fromkeys(["num_key_value_heads", "num_kv_heads", "num_query_groups", "multi_query_group_num"], 2),
    **dict.fromkeys(["intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "d_inner", "ffn_hidden_size",
                     "feed_forward_size", "dff", "dim_ff", "intermediate_size_mlp", "dense_intermediate_size"], 48),
    **dict.fromkeys(["moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
                     "moe_shared_expert_intermediate_size", "shared_intermediate_size",
                     "shared_experts_intermediate_size"], 24),
    **dict.fromkeys(["head_dim", "attention_head_dim", "attention_head_size", "d_head", "kv_channels",
                     "dim_head", "swa_head_dim", "linear_head_dim", "linear_key_head_dim",
                     "linear_value_head_dim", "mamba_head_dim", "mamba_d_head", "mamba_headdim"], 8),
    **dict.fromkeys(["num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k"], 2),
    **dict.fromkeys(["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
                     "max_target_positions"], 4096),
    "vocab_size": VOCAB, "shape_vocab_size": VOCAB, "pronunciation_vocab_size": VOCAB,
    "shape_embed_dim": 32, "pronunciation_embed_dim": 32,
    "q_lora_rank": 16, "kv_lora_rank": 16, "o_lora_rank": 16,
    "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 8, "qk_head_dim": 12,
    "n_group": 2, "num_expert_group": 2, "topk_group": 1,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "sliding_window": 8, "sliding_window_size": 8, "attention_window_size": 8, "window_size": 8,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
    "linear_num_heads": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_num_heads": 4,
    "mamba_n_groups": 1, "n_groups": 1, "mamba_ngroups": 1, "mamba_expand": 2, "time_step_rank": 4,
    "mamba_dt_rank": 4, "conv_kernel": 4, "mamba_d_conv": 4, "linear_conv_kernel_dim": 4,
    "mamba_d_ssm": 32, "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB, "laurel_rank": 4,
    "lru_width": 32, "index_n_heads": 2, "index_head_dim": 8, "index_topk": 8,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
    "router_jitter_noise": 0.0, "input_jitter_noise": 0.0,
}
# Lists with one entry per layer: cut to the tiny depth, keeping one layer of each kind.
PER_LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "mlp_layer_types",
                   "no_rope_layers", "indexer_types", "layer_rope_theta", "num_attention_heads_per_layer",
                   "mlp_only_layers_types")
# A few families need more than the table (their own field names or constraints).
OVERRIDES: dict[str, dict] = {
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),  # a hybrid: a conv mixer and attention
    "gemma3n_text": dict(num_hidden_layers=4, num_kv_shared_layers=2,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                         activation_sparsity_pattern=[0.0] * 4),
    "gpt_neo": dict(num_layers=2, attention_types=[[["global", "local"], 1]], window_size=8),
    "dots3_note_text": dict(num_key_value_heads=4),
    "gemma4_assistant": dict(hidden_size_per_layer_input=0),
    "reformer": dict(axial_pos_embds_dim=[16, 16], axial_pos_shape=[8, 8], max_position_embeddings=64,
                     lsh_attn_chunk_length=8, local_attn_chunk_length=8, attn_layers=["local", "lsh"]),
    "zaya": dict(num_experts_per_tok=1),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),  # the default has no attention
    "qwen4_exp_text": dict(indexer_budget=16, indexer_compress_ratio=4),
    "qwen4_exp": dict(text_config=dict(indexer_budget=16, indexer_compress_ratio=4)),
}


def _layer_kinds_depth(defaults: dict) -> int:
    """Enough layers for one of each kind a per-layer list of the defaults names (at least 2)."""
    depth = 2
    for name in PER_LAYER_LISTS:
        value = defaults.get(name)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            kinds = list(dict.fromkeys(value))
            depth = max(depth, min(4, max(value.index(k) for k in kinds) + 1))
    return depth


def _tiny_fields(defaults: dict) -> dict:
    """Tiny values for the fields of one config (as a dict of its defaults); sub-configs
    (``text_config``, ``vision_config``, ``attn_config``, ...) are shrunk the same way."""
    depth = _layer_kinds_depth(defaults)
    fields = {}
    for name, value in TINY.items():
        if name in defaults and not isinstance(defaults[name], (dict, list)):
            fields[name] = value
    for name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"):
        if name in fields:
            fields[name] = depth
    for name in PER_LAYER_LISTS:
        value = defaults.get(name)
        if isinstance(value, list) and value:
            kinds = list(dict.fromkeys(value))
            first = sorted({value.index(k) for k in kinds})
            cut = [value[i] for i in first][:depth]
            fields[name] = (cut * depth)[:depth]
    for name, value in defaults.items():  # dropout cannot be replayed: off
        if isinstance(value, float) and ("dropout" in name or "pdrop" in name or name == "layerdrop"):
            fields[name] = 0.0
        elif isinstance(value, dict) and ("model_type" in value or name.endswith("_config")):
            fields[name] = {**value, **_tiny_fields(value)}
    if "qk_rope_head_dim" in fields and "head_dim" in fields:  # latent attention: rotary over the rope part
        fields["head_dim"] = fields["qk_rope_head_dim"]
    if "kv_lora_rank" in fields and "num_key_value_heads" in fields:  # latent K/V expand to every head
        fields["num_key_value_heads"] = fields.get("num_attention_heads", 4)
    if "rotary_dim" in defaults and isinstance(defaults["rotary_dim"], int):
        fields["rotary_dim"] = 4  # within the tiny head (GPT-J, CodeGen)
    for name in ("expand", "mamba_expand"):  # SSM heads x head dim = expand x width
        if name in defaults:
            fields[name] = 1
    if "is_decoder" in defaults:
        fields["is_decoder"] = True
    return fields


# Variants run as rows of their own: the attention layers of hybrids whose other layers fail
# under aot_eager itself (a compile problem upstream in their linear attention's backward), so
# that the attention layers can still be checked: name -> (architecture, config changes).
VARIANTS = {
    "qwen3_next[attention layers]": ("qwen3_next", {"layer_types": "full_attention"}),
    "qwen3_5_text[attention layers]": ("qwen3_5_text", {"layer_types": "full_attention"}),
    "qwen3_5_moe_text[attention layers]": ("qwen3_5_moe_text", {"layer_types": "full_attention"}),
}


def tiny_config(arch: str):
    from transformers import CONFIG_MAPPING

    arch, changes = VARIANTS.get(arch, (arch, {}))
    config_class = CONFIG_MAPPING[arch]
    fields = _tiny_fields(config_class().to_dict())
    fields.update(OVERRIDES.get(arch, {}))
    if changes.get("layer_types"):  # every layer of that one kind
        changes = dict(changes, layer_types=[changes["layer_types"]] * fields.get("num_hidden_layers", 2))
    fields.update(changes)
    return config_class(**fields)


# -- one architecture ------------------------------------------------------------------------

def _batch(length, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    labels = ids.clone()
    labels[:, : length // 4] = -100
    pad = max(1, length // 8)
    mask[-1, length - pad:] = 0
    labels[-1, length - pad:] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _accepts(model, name):
    """Whether ``forward`` takes ``name``, by name or through ``**kwargs`` (passed on to the
    decoder, as ``use_cache`` is in most models)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _step_inputs(model, length, seed):
    inputs = _batch(length, seed)
    if _accepts(model, "use_cache"):
        inputs["use_cache"] = False
    return inputs


def _grads(model, fn, inputs):
    import torch

    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same random draws (router jitter) in every backend's step
    out = fn(**inputs)
    loss = out.loss if getattr(out, "loss", None) is not None else out.logits.double().square().mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def gradient_error(reference, candidate) -> float:
    """Largest difference of any gradient entry, relative to the largest reference gradient.
    A gradient missing on one side, or not finite, is an infinite error."""
    import torch

    if reference.keys() != candidate.keys():
        return math.inf
    scale = max((g.abs().max().item() for g in reference.values()), default=0.0) or 1.0
    worst = 0.0
    for name, ref in reference.items():
        got = candidate[name]
        if not torch.isfinite(got).all():
            return math.inf
        worst = max(worst, (got - ref).abs().max().item() / scale)
    return worst


def _peak(model, fn, length):
    import torch
    from sbp_compiler.profiling import measure_peak_memory

    inputs = _step_inputs(model, length, seed=7)

    def step():
        model.zero_grad(set_to_none=True)
        fn(**inputs).backward()

    step()  # compile, warm up
    _, peak = measure_peak_memory(step)
    model.zero_grad(set_to_none=True)
    return peak


def _eager_model(arch: str):
    """The tiny model, its eager reference gradients at ``LENGTHS``, the experts implementation
    and the dtype used: float64 with the model's default experts, or "batched_mm" where the
    default (grouped_mm) has no float64 kernel, or float32 where the model cannot run in
    float64 at all (it mixes in float32 tensors of its own)."""
    import torch
    import transformers

    error = None
    for dtype, experts in ((torch.float64, None), (torch.float64, "batched_mm"), (torch.float32, None)):
        torch.manual_seed(0)
        config = tiny_config(arch)
        if experts:
            config._experts_implementation = experts
        model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).train()
        if hasattr(model, "loss_type"):
            model.loss_type = "ForCausalLM"
        try:
            references = [_grads(model, model, _step_inputs(model, t, seed=i)) for i, t in enumerate(LENGTHS)]
            if not all(torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
                       for loss, grads in references):
                raise FloatingPointError("eager loss or gradients are not finite at this config")
        except Exception as failure:
            error = error or failure
            continue
        return model, references, experts, dtype
    raise error


def check_architecture(arch: str, memory_length: int = 0, always_aot: bool = True) -> dict:
    """One row of the sweep (see the module's docstring)."""
    import torch
    import transformers

    import sbp_compiler

    row = {"arch": arch}
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    try:
        model, references, experts, dtype = _eager_model(arch)
    except Exception as error:
        row.update(status="eager fails", error=f"{type(error).__name__}: {error}"[:300])
        return row
    if experts:
        row["experts"] = experts
    tolerance = TOLERANCE if dtype == torch.float64 else FLOAT32_TOLERANCE
    if dtype != torch.float64:
        row["dtype"] = str(dtype).replace("torch.", "")

    def run(backend, options=None):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, options=options)
        results, started = [], time.perf_counter()
        first = None
        for i, t in enumerate(LENGTHS):
            results.append(_grads(model, compiled, _step_inputs(model, t, seed=i)))
            first = first or time.perf_counter() - started
        return results, first

    def run_aot_eager():
        try:
            results, _ = run("aot_eager")
            return results, max(gradient_error(r[1], a[1]) for r, a in zip(references, results))
        except Exception as error:
            row["aot_error_text"] = f"{type(error).__name__}: {error}"[:300]
            return None, math.inf

    # aot_eager tells a compile problem upstream from ours; without always_aot it only runs
    # when streambp raises or differs from eager.
    aot, aot_error = run_aot_eager() if always_aot else (None, None)

    before = len(sbp_compiler.reports())
    torch._dynamo.utils.counters.clear()
    try:
        ours, first_step = run("streambp", {"chunk_size": CHUNK})
    except Exception as error:
        if aot_error is None:
            aot, aot_error = run_aot_eager()
        row.update(status="RAISES" if aot is not None else "compile diverges", aot_eager_error=aot_error,
                   error=f"{type(error).__name__}: {error}"[:300], traceback=traceback.format_exc()[-2000:])
        return row
    row["first_step_s"] = round(first_step, 2)
    graph_reports = sbp_compiler.reports()[before:]
    row["error"] = max(gradient_error(r[1], o[1]) for r, o in zip(references, ours))
    if aot_error is None and row["error"] > tolerance:
        aot, aot_error = run_aot_eager()
    row["aot_eager_error"] = aot_error
    if aot is not None and aot_error > tolerance:
        row["error_vs_aot_eager"] = max(gradient_error(a[1], o[1]) for a, o in zip(aot, ours))
    # The last step's graph with the layers (after a graph break, the last graph may hold none).
    with_layers = [r for r in graph_reports if r.layers or r.fallback and r.fallback.name != "NO_REPEATED_LAYERS"]
    last = (with_layers or graph_reports or [None])[-1]
    layers = list(last.layers) if last else []
    row["graphs"] = len(graph_reports)
    row["layers"] = len(layers)
    row["chunked_layers"] = sum(l.chunked for l in layers)
    row["head_chunked"] = bool(last and last.head.chunked)
    reasons = {}
    # Graph breaks (a data-dependent op: ``.item()``, ``nonzero``) split the model into graphs
    # of their own, and its layers with them: say so first, with Dynamo's reason.
    breaks = sorted(torch._dynamo.utils.counters["graph_break"])
    if breaks and not (row["layers"] and row["chunked_layers"] == row["layers"]):
        reasons["graph breaks"] = f"{len(graph_reports)} graphs; Dynamo: " + "; ".join(b[:150] for b in breaks[:2])
    if last and last.fallback:
        reasons[last.fallback.value] = last.fallback_detail
    for layer in layers:
        if not layer.chunked:
            reasons.setdefault(layer.reason.value, f"{layer.path}: {layer.detail}")
    row["reasons"] = reasons
    row["layer_reasons"] = {l.path: (l.reason.name if l.reason else None) for l in layers}

    compared = row.get("error_vs_aot_eager", row["error"])
    if compared > tolerance:
        row["status"] = "WRONG"
    elif aot_error is not None and (aot is None or aot_error > tolerance):
        row["status"] = "compile diverges"
    elif row["layers"] and row["chunked_layers"] == row["layers"]:
        row["status"] = "chunked"
    elif row["chunked_layers"]:
        row["status"] = "partly chunked"
    else:
        row["status"] = "refused"

    if memory_length and row["chunked_layers"]:
        def loss_fn(**inputs):
            return model(**inputs).loss

        torch._dynamo.reset()
        eager_peak = _peak(model, loss_fn, memory_length)
        torch._dynamo.reset()
        ours_peak = _peak(model, torch.compile(loss_fn, backend="streambp"), memory_length)
        row["memory"] = {"length": memory_length, "eager_mb": eager_peak / 2**20, "streambp_mb": ours_peak / 2**20,
                         "ratio": ours_peak / eager_peak}
    return row


# -- the sweep -------------------------------------------------------------------------------

def all_architectures() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + list(VARIANTS)


def _run_in_subprocess(arch: str, memory_length: int, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        command = [sys.executable, os.path.abspath(__file__), "--one", arch, "--out", out.name,
                   "--memory-length", str(memory_length)]
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"arch": arch, "status": "TIMEOUT", "error": f"no result in {timeout:.0f} s"}
        try:
            row = json.load(out)
        except (json.JSONDecodeError, OSError):
            tail = (done.stderr or done.stdout)[-300:]
            return {"arch": arch, "status": "CRASH", "error": f"exit {done.returncode}: {tail}"}
    row["wall_s"] = round(time.perf_counter() - started, 1)
    return row


def _cell(row) -> str:
    status = row["status"]
    if "layers" in row and row.get("layers"):
        status += f" ({row['chunked_layers']}/{row['layers']} layers{', head' if row.get('head_chunked') else ''})"
    return status


def render(rows: list[dict]) -> str:
    lines = ["| architecture | result | gradient error | first step | memory vs eager | reasons |",
             "|---|---|---:|---:|---:|---|"]
    for row in rows:
        error = row.get("error_vs_aot_eager", row.get("error"))
        error_text = f"{error:.1e}" if isinstance(error, float) else ""
        memory = row.get("memory")
        reasons = "; ".join(f"{k}: {v}" for k, v in (row.get("reasons") or {}).items())
        if row["status"] in ("eager fails", "RAISES", "CRASH", "TIMEOUT") or (
                row["status"] == "compile diverges" and "reasons" not in row):
            reasons = row.get("error", "") if isinstance(row.get("error"), str) else reasons
            error_text = "" if isinstance(row.get("error"), str) else error_text
        reasons = reasons.replace("|", "\\|").replace("\n", " ")[:220]
        first = f"{row['first_step_s']} s" if "first_step_s" in row else ""
        ratio = f"{memory['ratio']:.2f}x" if memory else ""
        lines.append(f"| {row['arch']} | {_cell(row)} | {error_text} | {first} | {ratio} | {reasons} |")
    lines.append("")
    lines.extend(summary(rows))
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """The sweep's acceptance figures: counts per result, the share of architectures whose eager
    step works that chunk every layer, the slowest first step and the largest memory ratio."""
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = ["Totals: " + ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))]
    trainable = [row for row in rows if row["status"] != "eager fails"]
    chunked = [row for row in trainable if row["status"] == "chunked"]
    if trainable:
        lines.append(f"Every layer chunked: {len(chunked)} of the {len(trainable)} architectures whose eager "
                     f"step works ({100 * len(chunked) / len(trainable):.0f}%).")
    # The share among models whose layers streambp means to chunk today: without those with a
    # mixer that is not attention (SSM scans, convolutions, linear attention: carrying their state
    # across chunks is a later step) and those where compile itself diverges upstream.
    def attention_free(row):
        refused = [reason for reason in (row.get("layer_reasons") or {}).values() if reason]
        return (row["status"] in ("refused", "partly chunked") and refused
                and all(reason == "NO_ATTENTION" for reason in refused) and "softmax" not in str(row.get("reasons")))

    left_out = [row for row in trainable if attention_free(row) or row["status"] == "compile diverges"]
    meant = [row for row in trainable if row not in left_out]
    if meant:
        lines.append(f"Leaving out the {len(left_out)} with a mixer that is not attention or where compile "
                     f"diverges upstream: {len(chunked)} of {len(meant)} ({100 * len(chunked) / len(meant):.0f}%).")
    timed = [row for row in rows if "first_step_s" in row]
    if timed:
        slowest = max(timed, key=lambda row: row["first_step_s"])
        lines.append(f"Slowest first step (compile + probe + step): {slowest['first_step_s']} s ({slowest['arch']}).")
    measured = [row for row in rows if row.get("memory")]
    if measured:
        worst = max(measured, key=lambda row: row["memory"]["ratio"])
        lines.append(f"Peak memory of a loss-only step at T={worst['memory']['length']}, streambp / eager: at most "
                     f"{worst['memory']['ratio']:.2f}x ({worst['arch']}), over {len(measured)} architectures with a "
                     "chunked layer.")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=None, help="default: every causal LM of transformers")
    parser.add_argument("--jobs", type=int, default=2, help="architectures checked at once")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per architecture")
    parser.add_argument("--memory-length", type=int, default=0, help="also measure peak memory at this length")
    parser.add_argument("--json", default=None, help="write every row to this file")
    parser.add_argument("--render", default=None, metavar="JSON", help="print the table of an earlier --json file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:  # a child process: one architecture, its row to --out
        import torch

        torch.set_num_threads(1)
        with contextlib.redirect_stdout(io.StringIO()):
            row = check_architecture(args.one, args.memory_length)
        with open(args.out, "w") as f:
            json.dump(row, f)
        return

    if args.render:
        with open(args.render) as f:
            print(render(json.load(f)))
        return

    archs = args.archs or all_architectures()
    rows = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(_run_in_subprocess, a, args.memory_length, args.timeout): a for a in archs}
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            rows[row["arch"]] = row
            print(f"[{len(rows)}/{len(archs)}] {row['arch']}: {_cell(row)}", file=sys.stderr, flush=True)
            if args.json:  # as rows arrive, so a long sweep can be read while it runs
                with open(args.json + ".partial", "a") as f:
                    f.write(json.dumps(row) + "\n")
    ordered = [rows[a] for a in archs]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ordered, f, indent=1)
    print(render(ordered))


if __name__ == "__main__":
    main()
