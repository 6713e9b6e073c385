"""The same pass on many more Hugging Face causal decoders than the issue names.

None of these is known to the backend by name: each is chunked because the analysis proves its
layers token-wise apart from causal attention, or refused with a typed reason.
"""
import pytest
import torch

import sbp_compiler
from models import assert_exact, batch, build_model, float64_throughout
from passes.errors import Reason

# sdpa models, float64 throughout: <= 1e-10.
FLOAT64 = ["gemma", "gemma3_text", "phi", "phi3", "olmo2", "stablelm", "gpt_neox", "starcoder2", "granite",
           "helium", "opt", "smollm3"]
# Models that compute in float32 inside (eager-only attention, whose softmax upcasts; Cohere's
# LayerNorm upcasts), and Mixtral with transformers' default grouped experts (no float64
# kernel); BLOOM (ALiBi scores through baddbmm, a key bias rebuilt per chunk; a custom
# autograd GELU): float32 at <= 1e-5.
FLOAT32 = ["gemma2", "gptj", "codegen", "cohere", "mixtral", "bloom"]
# Layers the analysis cannot prove chunkable, with the reason and the mixer it names. Each layer
# is refused on its own, not because the one before was.
REFUSED = {"mamba": (Reason.NO_ATTENTION, "MambaMixer")}


def check(model, tolerance):
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    assert_exact(model, compiled, batch(13, pad=3), tolerance)
    return sbp_compiler.last_report()


@pytest.mark.parametrize("arch", FLOAT64)
def test_float64(arch):
    report = check(float64_throughout(build_model(arch)), 1e-10)
    assert report.layers and all(layer.chunked for layer in report.layers), str(report)


@pytest.mark.parametrize("arch", FLOAT32)
def test_float32(arch):
    report = check(build_model(arch, dtype=torch.float32), 1e-5)
    assert report.layers and all(layer.chunked for layer in report.layers), str(report)


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_refused_with_reason(arch):
    report = check(build_model(arch, dtype=torch.float32), 1e-5)
    assert report.layers and not report.chunked_layers
    reason, mixer = REFUSED[arch]
    assert set(report.reasons) == {reason}, str(report)
    assert all(mixer in layer.detail for layer in report.layers), str(report)
