"""The architecture sweep (benchmarks/architecture_sweep.py) on one architecture per family of
mechanism, as the full sweep runs them: tiny configs derived from transformers' defaults,
float64, batch 2 with padding, -100 labels, T=50 then T=37 on one compiled model, chunk 16."""
import pytest

from test_demo import EXAMPLES, load_script

SWEEP = load_script(EXAMPLES.parent / "benchmarks" / "architecture_sweep.py")

# architecture: what it stands for, and which layers must chunk (all, or the attention ones)
FAMILIES = {
    "mistral": "dense with a sliding window",
    "gemma2": "soft-capped scores and logits, eager attention, alternating sliding/full layers",
    "opt": "tied embeddings",
    # Qwen3.5-MoE's linear-attention layers fail under aot_eager itself (upstream): its attention
    # layers, with gated attention output and experts with a gated shared expert
    "qwen3_5_moe_text[attention layers]": "mixture of experts with a shared expert, gated attention",
    "deepseek_v3": "latent attention (MLA) and group-routed experts with a dense first layer",
    "gpt_oss": "attention sinks, experts with biases, sliding/full layers",
    "lfm2_moe": "hybrid: a short convolution mixer and attention layers",
    "gpt_neo": "causal and local-window masks sliced from a buffer inside the layer",
    "mpt": "an ALiBi bias sliced inside the layer from a table over the longest sequence",
    "xglm": "scores clamped from below by an elementwise torch.max",
    "gpt_neox_japanese": "scores through baddbmm on zeros made from sizes (symbolic at the second length)",
    "phimoe": "random Gumbel sampling of experts in the layer (replayed), a router with a custom backward",
    "deepseek_v32": "a sparse-attention indexer's top-k keys under no_grad (every key in every chunk)",
    "openai-gpt": "a soft -1e4 mask computed in the layer (every key in every chunk)",
}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_family(arch):
    row = SWEEP.check_architecture(arch, always_aot=False)
    assert row["status"] in ("chunked", "partly chunked"), row
    assert row["error"] <= SWEEP.TOLERANCE, row
    assert row["head_chunked"], row
    if arch == "lfm2_moe":  # the convolution layers are refused naming their mixer, the others chunk
        refused = [path for path, reason in row["layer_reasons"].items() if reason]
        assert row["chunked_layers"] >= 1 and refused, row
        assert all(reason == "NO_ATTENTION" for reason in row["layer_reasons"].values() if reason), row
        assert "Lfm2MoeShortConv" in str(row["reasons"]), row
    else:
        assert row["chunked_layers"] == row["layers"] > 0, row
