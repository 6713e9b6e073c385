"""Options ``layer_inputs="recompute"`` (segment boundaries' layer inputs saved, the others
recomputed in backward), ``layer_inputs="offload"`` (every input saved in host memory, reloaded
one layer ahead) and ``memory_budget`` (chunk sizes from a budget): gradients equal eager
autograd's, fewer layer inputs are saved (or they are saved where the rewritten graphs say), and
the chunk sizes follow the budget."""
import pytest
import torch

import sbp_compiler
from models import (
    assert_exact, batch, build_model, float64_throughout, loss_and_grads, max_relative_error, peak_growth_in_hidden_states,
)
from passes.layer_inputs import segment_lengths
from sbp_compiler.memory_budget import largest_chunk

FLOAT64_TOLERANCE = 1e-10


@pytest.mark.parametrize("layers", range(0, 40))
def test_segments_cover_the_layers_and_bound_what_is_alive(layers):
    lengths = segment_lengths(layers)
    assert sum(lengths) == layers and all(n >= 1 for n in lengths)
    alive = max([i + n - 1 for i, n in enumerate(lengths, start=1)] or [0])
    peak = 1
    while peak * (peak + 1) // 2 < layers:
        peak += 1
    assert alive <= max(peak, min(layers, 2)), (lengths, alive)


# What the report says of a five-layer model's inputs, per mode.
EXPECTED_LAYER_INPUTS = {"recompute": "2 of 5 saved (layers [0, 3])", "offload": "5 of 5 offloaded to host memory"}


@pytest.mark.parametrize("mode,arch", [
    *[("recompute", arch) for arch in ("llama", "mistral", "gpt2", "qwen3", "gemma3_text", "mixtral")],
    *[("offload", arch) for arch in ("llama", "gpt2", "gemma3_text", "mixtral")],
])
def test_layer_inputs_modes_are_exact(mode, arch):
    """Five layers; "recompute" saves layers 0 and 3, "offload" saves every input as a host copy
    (on CPU host to host: the graph CUDA runs) reloaded in backward. Lengths that are and are
    not multiples of the chunk, a second length (dynamic), right padding, batch 2; mistral and
    gemma3_text have sliding windows. Mixtral: float32 (its grouped matmul has no float64) and
    one length (its dispatch is refused under dynamic shapes)."""
    layers = dict(n_layer=5) if arch == "gpt2" else dict(num_hidden_layers=5)
    if arch == "mixtral":
        model, tolerance, lengths = build_model(arch, dtype=torch.float32, **layers), 1e-5, (13,)
    else:
        model, tolerance, lengths = float64_throughout(build_model(arch, **layers)), FLOAT64_TOLERANCE, (13, 8)
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4, "layer_inputs": mode})
    for length in lengths:
        assert_exact(model, compiled, batch(length, pad=3), tolerance)
        report = sbp_compiler.last_report()
        assert report.layers and all(layer.chunked for layer in report.layers), report
        assert report.layer_inputs.startswith(EXPECTED_LAYER_INPUTS[mode]), report
        assert "kept" not in report.layer_inputs, report


def hidden_sized_saved_tensors(fn, inputs, hidden_shape) -> int:
    """How many tensors of the hidden state's shape the compiled step saves for backward."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += tuple(tensor.shape) == hidden_shape
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(**inputs).loss
    loss.backward()
    return count


def test_recompute_saves_only_segment_boundaries():
    model = build_model("llama", dtype=torch.float32, num_hidden_layers=8)
    inputs = batch(19, pad=2)
    shape = (2, 19, 32)
    saved = {}
    for mode in ("keep", "recompute"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4, "layer_inputs": mode})
        saved[mode] = hidden_sized_saved_tensors(compiled, inputs, shape)
    report = sbp_compiler.last_report()
    assert report.layer_inputs.startswith("3 of 8 saved (layers [0, 4, 7])"), report
    assert "at most 4 exist at once" in report.layer_inputs
    assert saved["keep"] - saved["recompute"] == 5, saved


def test_recompute_lowers_the_peak_by_the_inputs_not_saved():
    """8 layers: "keep" holds 8 layer inputs when backward starts, "recompute" at most 4 at any
    time (saved: layers 0, 4, 7; segment 0-3 recomputed). Per token of sequence (the peak's
    increase from 1024 to 2048 tokens, so the parameter gradients cancel) that is 4 hidden states
    fewer; at least 3.5 are asked for."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(config).train()
    growth = {mode: peak_growth_in_hidden_states(model, {"layer_inputs": mode}) for mode in ("keep", "recompute")}
    saved = growth["keep"] - growth["recompute"]
    assert saved >= 3.5, growth


def test_recompute_with_too_few_layers_keeps_every_input():
    model = build_model("llama")  # 2 layers
    compiled = torch.compile(model, backend="streambp", options={"layer_inputs": "recompute"})
    compiled(**batch(9)).loss.backward()
    assert sbp_compiler.last_report().layer_inputs == (
        "all saved (option layer_inputs='recompute': 2 chunked layer(s): nothing to gain)")


@pytest.mark.parametrize("budget, per_token, full, chunk", [
    (1000, 10, 4096, 64), (1000, 10, 50, 50), (1000, 10, 100, 100), (5, 10, 64, 1), (1 << 30, 1, 8192, 8192),
])
def test_largest_chunk(budget, per_token, full, chunk):
    assert largest_chunk(budget, per_token, full) == chunk


def test_memory_budget_sets_the_chunk_sizes_and_stays_exact():
    """A budget bigger than the widths' defaults gives larger chunks, a small one smaller chunks;
    an explicit chunk size wins; gradients are eager's either way."""
    model = float64_throughout(build_model("llama", dtype=torch.float64))
    inputs = batch(37, pad=5)
    seen = {}
    for budget in (1 << 30, 20_000):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="streambp", options={"memory_budget": budget})
        assert_exact(model, compiled, inputs, FLOAT64_TOLERANCE)
        report = sbp_compiler.last_report()
        seen[budget] = (report.chunk_size, report.head.chunk_size)
    assert seen[1 << 30] == ("from memory_budget=1073741824 (now 37 of 37 tokens)",) * 2, seen
    small_layer, small_head = seen[20_000]
    assert "now 37 of" not in small_layer and "now 37 of" not in small_head, seen
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="streambp", options={"memory_budget": 1 << 30, "chunk_size": 4})
    assert_exact(model, compiled, inputs, FLOAT64_TOLERANCE)
    assert sbp_compiler.last_report().chunk_size == 4


@pytest.mark.parametrize("value, message", [
    ("lots", "memory_budget must be bytes"), (1.5, "in (0, 1]"), (0, "must be positive"), (True, "memory_budget must be bytes"),
])
def test_bad_memory_budget(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        sbp_compiler.StreamBPConfig.from_options({"memory_budget": value})


def test_bad_layer_inputs():
    with pytest.raises(ValueError, match="layer_inputs must be one of"):
        sbp_compiler.StreamBPConfig.from_options({"layer_inputs": "host"})
    with pytest.raises(ValueError, match="'offload' needs inner_compiler='eager'"):
        sbp_compiler.StreamBPConfig.from_options({"layer_inputs": "offload", "inner_compiler": "inductor"})


def _code_lines(directory, suffix):
    (path,) = [p for p in directory.rglob(f"*_{suffix}.py")]
    return path.read_text().splitlines()


def test_offload_copies_out_after_forward_and_prefetches_one_layer_ahead(tmp_path):
    """The rewritten graphs: forward copies each layer input out and waits for the copy after
    the next layer's op, and saves the host copy; backward starts each reload before the
    backward of the layer above and waits for it just before the layer's own."""
    model = build_model("llama", dtype=torch.float32, num_hidden_layers=4)
    compiled = torch.compile(model, backend="streambp",
                             options={"chunk_size": 4, "layer_inputs": "offload", "debug_dir": str(tmp_path)})
    compiled(**batch(9)).loss.backward()
    forward, backward = _code_lines(tmp_path, "aot_forward"), _code_lines(tmp_path, "aot_backward")

    def lines_with(lines, text):
        return [i for i, line in enumerate(lines) if text in line]

    layer_calls = lines_with(forward, "torch.ops.streambp.layer.default(")
    offloads = lines_with(forward, "torch.ops.streambp.offload.default(")
    waits = lines_with(forward, "torch.ops.streambp.transfer_wait.default(")
    assert len(layer_calls) == len(offloads) == len(waits) == 4, forward
    for k in range(4):
        assert layer_calls[k] < offloads[k] < waits[k]
        if k + 1 < 4:
            assert layer_calls[k + 1] < waits[k], "the wait comes after the next layer's op"
    returned = forward[lines_with(forward, "return (")[0]]
    assert returned.count("offloaded_") == 4, returned
    # (each written over its incoming gradient, passes/gradient_in_place.py)
    backward_calls = lines_with(backward, "torch.ops.streambp.layer_backward_into_grad_output.default(")
    reloads = lines_with(backward, "torch.ops.streambp.reload.default(")
    assert len(backward_calls) == len(reloads) == 4, backward
    for k, call in enumerate(backward_calls):
        name = backward[call].split("(", 1)[1].split("[", 1)[1].split(",", 1)[0]  # the layer input it reads
        assert name.startswith("reloaded_offloaded_"), backward[call]
        reload_name = "reload_" + name[len("reloaded_"):] + ":"
        reload = next(i for i in reloads if backward[i].lstrip().startswith(reload_name))
        assert reload < call
        assert k == 0 or backward_calls[k - 1] > reload, "the reload starts before the layer above's backward"


def test_offload_keeps_a_layer_input_that_is_the_graph_input():
    """A layer compiled on its own (FSDP2's units): its input belongs to the caller, so it stays."""
    model = float64_throughout(build_model("llama"))
    reference = float64_throughout(build_model("llama"))
    reference.load_state_dict(model.state_dict())
    for block in model.model.layers:
        block.compile(backend="streambp", options={"chunk_size": 4, "layer_inputs": "offload"})
    inputs = batch(11, pad=2)
    ref_loss, ref_grads = loss_and_grads(reference, reference, inputs)
    loss, grads = loss_and_grads(model, model, inputs)
    assert torch.allclose(loss, ref_loss, rtol=FLOAT64_TOLERANCE, atol=0)
    assert max_relative_error(ref_grads, grads) <= FLOAT64_TOLERANCE
    assert sbp_compiler.last_report().layer_inputs == (
        "0 of 1 offloaded to host memory after their layer's forward, each reloaded during the backward of the "
        "layer above it (option layer_inputs='offload'); kept: layer 0 (an input of the graph, held by its caller)")
