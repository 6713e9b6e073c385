"""Memory of one training step, measured with the profiler method of DESIGN §2.

Issue 2 asks for at most half of HF activation checkpointing at T=8192; with the default
options the backend reaches 0.57 on this model today (the LM head and loss are not chunked yet;
a layer's backward holds its K/V, dK/dV, the input gradient and the chunk's float mask). The
bound below is what is achieved, so a regression fails; the issue's target stays open until it
can be asserted.
"""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sbp_compiler.profiling import trace_memory

ACHIEVED_RATIO_TO_CHECKPOINTING = 0.60


def four_layer_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=16384,
                         attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config).train()
    return model


def step_fn(model, fn, length):
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))

    def step():
        fn(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def test_below_activation_checkpointing_at_8192_and_linear_growth():
    model = four_layer_model()
    compiled = torch.compile(model, backend="streambp", dynamic=True)  # default options: chunk "auto"
    peaks = {}
    for length in (2048, 4096, 8192):
        step = step_fn(model, compiled, length)
        step()  # compile (first length) and warm up outside the measurement
        _, trace = trace_memory(step)
        peaks[length] = trace.peak_bytes
    # No tensor with two full-length sequence dims (mask, scores) is ever allocated: any such
    # tensor has at least T*T bytes, while a chunk's mask/scores have chunk*T elements.
    assert max(trace.allocations) < 8192 * 8192, max(trace.allocations)

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, checkpointed = trace_memory(step_fn(model, model, 8192))
    model.gradient_checkpointing_disable()

    ratio = peaks[8192] / checkpointed.peak_bytes
    assert ratio <= ACHIEVED_RATIO_TO_CHECKPOINTING, (peaks[8192], checkpointed.peak_bytes)
    # Linear in T: doubling the length adds the same amount again (within 10%).
    first, second = peaks[4096] - peaks[2048], peaks[8192] - peaks[4096]
    assert first > 0 and abs(second - 2 * first) <= 0.1 * 2 * first, peaks
