"""passes/gradient_in_place.py: each layer's input gradient written over its incoming gradient.

Exactness of the rewritten backward is what every exactness test checks (the pass is on by
default); here: that it is applied where it should be and left out where it must be, that the
gradients stay exact where the incoming gradient has several sources, the bookkeeping of a
gradient summed into a buffer that still holds other data, and that the peak drops by one
hidden state per token."""
import pytest
import torch

import sbp_compiler
from models import assert_exact, batch, build_model, float64_throughout, max_relative_error, peak_growth_in_hidden_states
from sbp_compiler.chunked_autograd import InputGradients

ALL_REWRITTEN = "2 of 2 layer backward(s) write their input gradient over the incoming gradient"


def test_every_layer_backward_writes_over_its_incoming_gradient():
    model = float64_throughout(build_model("llama"))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    assert_exact(model, compiled, batch(11, pad=2), 1e-10)
    report = sbp_compiler.last_report()
    assert report.gradients_in_place == ALL_REWRITTEN, report
    assert f"backward: {ALL_REWRITTEN}" in str(report)


def test_disabled_by_name():
    model = float64_throughout(build_model("llama"))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4, "disable_passes": ["gradient_in_place"]})
    assert_exact(model, compiled, batch(9), 1e-10)
    assert sbp_compiler.last_report().gradients_in_place == ""


def test_exact_where_the_incoming_gradient_has_other_sources():
    """A loss that also reads every layer's output: each incoming gradient is the layer above's
    input gradient plus that term's, and the layer's own output is read by the loss too."""
    model = float64_throughout(build_model("qwen3", num_hidden_layers=3))

    def loss_fn(input_ids, attention_mask):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, output_hidden_states=True)
        return out.loss + sum((h * h).mean() for h in out.hidden_states[1:])

    inputs = batch(13, pad=3)
    inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    compiled = torch.compile(loss_fn, backend="streambp", options={"chunk_size": 4})
    names = [name for name, _ in model.named_parameters()]
    reference = dict(zip(names, torch.autograd.grad(loss_fn(**inputs), list(model.parameters()))))
    result = dict(zip(names, torch.autograd.grad(compiled(**inputs), list(model.parameters()))))
    assert max_relative_error(reference, result) <= 1e-10
    assert sbp_compiler.last_report().layers, "no layer chunked: the test checks nothing"


def test_left_out_for_low_precision_sums():
    """bfloat16 input gradients are summed in float32 beside the bfloat16 incoming gradient:
    nothing to write over."""
    model = build_model("llama", dtype=torch.bfloat16)
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    compiled(**batch(9)).loss.backward()
    assert sbp_compiler.last_report().gradients_in_place.startswith("0 of 2"), sbp_compiler.last_report()


def test_sum_into_a_buffer_holding_other_data():
    """Chunks in order: the first gradient of a slice replaces what was there, a second adds,
    and a slice no gradient reached is zeroed when its chunk ends."""
    like = torch.zeros(2, 6)
    buffer = torch.full((2, 6), 7.0)  # stands for the incoming gradient
    grads = InputGradients([like], [True])
    grads.sum_into(0, buffer, 1)
    one = torch.ones(2, 2)
    grads.add(0, one, 1, 0, 2)
    grads.add(0, one, 1, 0, 2)  # a second layer input with the same tensor: adds
    grads.end_chunk(2)
    grads.add(0, None, 1, 2, 4)  # no gradient reached chunk [2, 4)
    grads.end_chunk(4)
    grads.add(0, 3 * one, 1, 4, 6)
    grads.end_chunk(6)
    grads.add(0, torch.ones(2, 6), 1, 0, 6)  # the K/V pass, after every chunk: adds
    expected = torch.tensor([[3.0, 3, 1, 1, 4, 4]] * 2)
    torch.testing.assert_close(buffer, expected)
    result = grads.result()
    assert result[0].shape == (), "the gradient is in the buffer; a placeholder is returned"


def test_lowers_the_peak_by_one_hidden_state_per_token():
    """Four layers, hidden 64, vocabulary 1024 (so the head's chunks are small and a layer's
    backward is the peak): the peak's growth from 1024 to 2048 tokens, with and without the
    pass, differs by at least 0.9 hidden states."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(config).train()
    growth = {disabled: peak_growth_in_hidden_states(model, {"disable_passes": disabled})
              for disabled in ((), ("gradient_in_place",))}
    saved = growth[("gradient_in_place",)] - growth[()]
    assert saved >= 0.9, growth
