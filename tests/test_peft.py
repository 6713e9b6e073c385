"""PEFT LoRA models compiled by streambp: the LoRA adapters of every linear of the layers, and of
the LM head (an adapter, or a trained copy through ``modules_to_save``), chunked and exact.

The base weights are frozen (``requires_grad=False``, as in QLoRA): they get no gradient, and
the step allocates none for them. Float64 throughout: <= 1e-10 against eager autograd of the
same PEFT model. Adapters start random (``init_lora_weights=False``): with PEFT's zero-initialised
B, every A would get a zero gradient and the comparison would prove little.
"""
import pytest
import torch

import sbp_compiler
from models import assert_exact, batch, build_model, float64_throughout, loss_and_grads
from peft import LoraConfig, get_peft_model
from sbp_compiler.profiling import measure_peak_memory

OPTIONS = {"chunk_size": 4, "head_chunk_size": 3, "skip_logits": True}


def linear_names(model):
    """The names of every linear of the model (GPT-2's are ``Conv1D``), LM head included."""
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"})


def lora_model(arch, head):
    model = float64_throughout(build_model(arch))
    if head == "modules_to_save":  # adapters on every linear of the layers, a trained copy of the head
        config = LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"], r=4, lora_alpha=8,
                            lora_dropout=0.0, init_lora_weights=False)
    else:  # an adapter on the head too
        config = LoraConfig(target_modules=linear_names(model), r=4, lora_alpha=8, lora_dropout=0.0,
                            init_lora_weights=False)
    return get_peft_model(model, config).to(torch.float64)


@pytest.mark.parametrize("arch, head", [("llama", "modules_to_save"), ("llama", "lora"), ("qwen3", "modules_to_save"),
                                        ("gpt2", "lora")])
def test_lora_gradients_are_exact_and_frozen_weights_get_none(arch, head):
    model = lora_model(arch, head)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trained) and any("lm_head" in name for name in trained)
    compiled = torch.compile(model, backend="streambp", options=OPTIONS)
    for length in (13, 7):
        inputs = batch(length, pad=3)
        assert_exact(model, compiled, inputs, 1e-10)
        report = sbp_compiler.last_report()
        assert report.chunked_layers[0].path.startswith("base_model.model."), str(report)  # PEFT's wrapping, named plainly
        assert len(report.chunked_layers) == 2 and report.head.chunked and report.head.skipped_logits, str(report)

        model.zero_grad(set_to_none=True)
        compiled(**inputs).loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (name in trained), name


def test_frozen_weights_cost_no_gradient_memory():
    """The LoRA step's peak is below full fine-tuning's by at least the frozen weights' bytes:
    full fine-tuning holds a gradient for each of them at the end of backward, LoRA none."""
    model = lora_model("llama", "modules_to_save")
    compiled = torch.compile(model, backend="streambp", options=OPTIONS)
    inputs = batch(13, pad=3)
    loss_and_grads(model, compiled, inputs)  # compile first
    _, lora_peak = measure_peak_memory(lambda: loss_and_grads(model, compiled, inputs))

    frozen = [p for p in model.parameters() if not p.requires_grad]
    frozen_bytes = sum(p.numel() * p.element_size() for p in frozen)
    for p in frozen:
        p.requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="streambp", options=OPTIONS)
    loss_and_grads(model, compiled, inputs)
    _, full_peak = measure_peak_memory(lambda: loss_and_grads(model, compiled, inputs))
    assert full_peak - lora_peak >= frozen_bytes, (full_peak, lora_peak, frozen_bytes)
