"""Gradients of every parameter and the loss equal eager autograd's, on real HF architectures.

float64 with the model in float64 throughout (HF RMSNorm upcasts to float32, see DESIGN §2):
relative error <= 1e-10; float32: <= 1e-5.
"""
import pytest
import torch

import sbp_compiler
from models import ARCHITECTURES, assert_exact, batch, build_model, float64_throughout

FLOAT64_TOLERANCE = 1e-10
FLOAT32_TOLERANCE = 1e-5


def compiled_frames() -> int:
    """Frames Dynamo compiled successfully (a restart inside one compilation does not count)."""
    return torch._dynamo.utils.counters["frames"]["ok"]


def assert_all_layers_chunked(report):
    assert report.fallback is None, report
    assert report.layers and all(layer.chunked for layer in report.layers), report


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_float64_lengths_padding_and_recompilation(arch):
    """Default torch.compile call: static first length, then at most one recompilation for any
    number of further lengths; batch 2 with right padding and -100 labels throughout."""
    model = float64_throughout(build_model(arch))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    # 13: not a multiple of the chunk; 7 and 21: new lengths; 3: chunk >= length.
    for length in (13, 7, 21, 3):
        assert_exact(model, compiled, batch(length, pad=3 if length > 4 else 0), FLOAT64_TOLERANCE)
        assert_all_layers_chunked(sbp_compiler.last_report())
    assert compiled_frames() <= 2, "more than one recompilation for new lengths"
    assert sbp_compiler.last_report().dynamic


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_float64_chunk_of_one_token(arch):
    model = float64_throughout(build_model(arch))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 1})
    assert_exact(model, compiled, batch(6, pad=2), FLOAT64_TOLERANCE)
    assert_all_layers_chunked(sbp_compiler.last_report())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_float32(arch):
    model = build_model(arch, dtype=torch.float32)
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 5})
    assert_exact(model, compiled, batch(17, pad=4), FLOAT32_TOLERANCE)
    assert_all_layers_chunked(sbp_compiler.last_report())


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_eager_attention_float32(arch):
    """Eager attention (matmul-softmax-matmul) is recognised too. It runs its softmax in float32
    even in a float64 model, so it is checked at the float32 tolerance."""
    model = build_model(arch, dtype=torch.float32, attn_implementation="eager")
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    assert_exact(model, compiled, batch(15, pad=3), FLOAT32_TOLERANCE)
    report = sbp_compiler.last_report()
    assert_all_layers_chunked(report)
    assert {layer.attention for layer in report.layers} == {"eager"}


def test_grouped_query_attention_keeps_key_value_heads():
    """repeat_kv before sdpa becomes sdpa's own enable_gqa: K/V stay at 2 heads, gradients exact."""
    model = float64_throughout(build_model("qwen2"))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    assert_exact(model, compiled, batch(10, pad=2), FLOAT64_TOLERANCE)
    assert {layer.attention for layer in sbp_compiler.last_report().layers} == {"sdpa grouped-query"}


def test_dynamic_from_the_start():
    model = float64_throughout(build_model("qwen3"))
    compiled = torch.compile(model, backend="streambp", dynamic=True, options={"chunk_size": 4})
    for length in (9, 16, 5):
        assert_exact(model, compiled, batch(length, pad=2), FLOAT64_TOLERANCE)
    assert compiled_frames() == 1
    report = sbp_compiler.last_report()
    assert report.dynamic and report.sequence_length.startswith("s")


def test_sliding_window_shorter_than_chunk_and_sequence():
    """Mistral's window (4) cuts through chunks (3) and the sequence (22): the mask is rebuilt
    per chunk from the window comparison, not sliced from a whole mask."""
    model = float64_throughout(build_model("mistral", sliding_window=4))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 3})
    assert_exact(model, compiled, batch(22, pad=5), FLOAT64_TOLERANCE)
    assert_all_layers_chunked(sbp_compiler.last_report())


def test_without_attention_mask_argument():
    model = float64_throughout(build_model("llama"))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    inputs = batch(11)
    del inputs["attention_mask"]
    assert_exact(model, compiled, inputs, FLOAT64_TOLERANCE)
    assert_all_layers_chunked(sbp_compiler.last_report())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding(arch):
    """Left padding leaves the first query rows of a sequence without any visible key."""
    model = float64_throughout(build_model(arch))
    inputs = batch(13)
    inputs["attention_mask"][1, :4] = 0
    inputs["labels"][1, :4] = -100
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 3})
    assert_exact(model, compiled, inputs, FLOAT64_TOLERANCE)
    assert_all_layers_chunked(sbp_compiler.last_report())


def test_packed_sequences():
    """Several documents in one row, told apart by position_ids restarting at 0: HF builds a
    block-diagonal causal mask from them, and the chunk masks are rebuilt from the same code."""
    model = float64_throughout(build_model("llama"))
    ids = torch.randint(0, 96, (1, 15), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    inputs = dict(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    assert_exact(model, compiled, inputs, FLOAT64_TOLERANCE)
    assert_all_layers_chunked(sbp_compiler.last_report())
    # The documents really are separated: the same tokens unpacked give the same loss terms.
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        first = model(input_ids=ids[:, :5], use_cache=False).logits
    assert torch.allclose(packed[:, :5], first, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_layer_model(arch):
    """A ModuleList of one block is a decoder stack too (nothing else repeats)."""
    overrides = {"n_layer": 1} if arch == "gpt2" else {"num_hidden_layers": 1}
    model = float64_throughout(build_model(arch, **overrides))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    assert_exact(model, compiled, batch(11, pad=2), FLOAT64_TOLERANCE)
    report = sbp_compiler.last_report()
    assert_all_layers_chunked(report)
    assert len(report.layers) == 1 and report.head.chunked
