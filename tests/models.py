"""Small Hugging Face causal decoders built from configs (random weights, no download), and the
helpers the exactness tests share."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

VOCAB = 96

# Small configs in each model family's own field names; dropout off (it cannot be replayed).
# The small shape shared by the Llama-family configs below.
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

ARCHITECTURES = {
    "llama": SMALL,
    "mistral": dict(SMALL, sliding_window=4),
    "qwen2": SMALL,
    "qwen3": dict(SMALL, head_dim=8),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, attn_pdrop=0.0, resid_pdrop=0.0,
                 embd_pdrop=0.0),
}


# Further causal decoders, in their own field names; the pass knows none of them by name.
MORE_ARCHITECTURES = {
    "gemma": dict(SMALL, head_dim=8),
    "gemma2": dict(SMALL, head_dim=8, sliding_window=4),  # eager attention only, soft-capping
    "gemma3_text": dict(SMALL, head_dim=8, sliding_window=4),  # sliding and full layers alternate
    "phi": dict(SMALL),
    "phi3": dict(SMALL, pad_token_id=0),
    "olmo2": dict(SMALL),
    "stablelm": dict(SMALL),
    "gpt_neox": dict(SMALL),
    "starcoder2": dict(SMALL),
    "granite": dict(SMALL),
    "cohere": dict(SMALL),
    "helium": dict(SMALL, head_dim=8),
    "opt": dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32),
    "mixtral": dict(SMALL, num_local_experts=4, num_experts_per_tok=2),
    "smollm3": dict(SMALL, pad_token_id=0),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128),
    "codegen": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128, n_ctx=128),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, time_step_rank=4),
}
SDPA_UNSUPPORTED = {"gemma2", "gptj", "codegen", "bloom", "mamba"}


def build_model(arch: str, dtype=torch.float64, attn_implementation="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(ARCHITECTURES.get(arch) or MORE_ARCHITECTURES[arch], vocab_size=VOCAB, **overrides)
    config = AutoConfig.for_model(arch, **fields)
    for name in list(config.to_dict()):  # dropout cannot be replayed: off unless asked for
        if name in overrides:
            continue
        if ("dropout" in name or "pdrop" in name) and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    config._attn_implementation = "eager" if arch in SDPA_UNSUPPORTED else attn_implementation
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if hasattr(model, "loss_type"):
        model.loss_type = "ForCausalLM"  # avoids a graph break on a one-time warning (DESIGN §2)
    model.train()
    return model


class ExactRMSNorm(nn.Module):
    """RMSNorm computed in the input dtype: HF upcasts to float32 even in a float64 model."""

    def __init__(self, weight: nn.Parameter, eps: float, unit_offset: bool):
        super().__init__()
        self.weight, self.eps, self.unit_offset = weight, eps, unit_offset

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * (1.0 + self.weight if self.unit_offset else self.weight)


def _rms_norm_variant(module: nn.Module):
    """(eps, unit_offset) of an RMSNorm module, told apart by what it computes."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    x = torch.randn(3, module.weight.shape[-1], dtype=module.weight.dtype)
    with torch.no_grad():
        reference = module(x)
        for unit_offset in (False, True):
            if torch.allclose(ExactRMSNorm(module.weight, eps, unit_offset)(x), reference, rtol=1e-5, atol=1e-6):
                return eps, unit_offset
    raise AssertionError(f"unrecognised RMSNorm {type(module).__name__}")


def causal_lm_loss_in_logits_dtype(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                                   shift_labels=None, **kwargs):
    """HF's ``ForCausalLMLoss`` step by step, without its cast of the logits to float32."""
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, vocab_size)
    shift_labels = shift_labels.view(-1)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = nn.functional.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def float64_throughout(model: nn.Module) -> nn.Module:
    """Make this model compute in float64 everywhere (test-local, no global patch): RMSNorms that
    stay in the input dtype, and a loss without HF's float32 cast of the logits."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child).__name__.endswith("RMSNorm"):
                eps, unit_offset = _rms_norm_variant(child)
                setattr(module, child_name, ExactRMSNorm(child.weight, eps, unit_offset))
    model.loss_function = causal_lm_loss_in_logits_dtype  # this instance only
    return model


def batch(length: int, batch_size: int = 2, pad: int = 0, seed: int = 1):
    """input_ids, right-padded attention_mask (last ``pad`` tokens of the last row), labels with -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    labels = ids.clone()
    labels[:, : max(1, length // 4)] = -100  # a masked prompt
    if pad:
        mask[-1, length - pad:] = 0
        labels[-1, length - pad:] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)


def loss_and_grads(model, fn, inputs):
    model.zero_grad(set_to_none=True)
    loss = fn(**inputs).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def max_relative_error(reference: dict, candidate: dict) -> float:
    """Largest per-tensor error relative to that tensor's largest entry.

    A gradient that is zero in exact arithmetic (a key-projection bias: softmax ignores a
    constant added to a row of scores) is pure rounding noise in both runs; its scale is floored
    at 1e-6 of the largest gradient of the model, so noise is not divided by noise.
    """
    assert reference.keys() == candidate.keys(), set(reference) ^ set(candidate)
    floor = 1e-6 * max(ref.abs().max().item() for ref in reference.values())
    worst = 0.0
    for name, ref in reference.items():
        scale = max(ref.abs().max().item(), floor, torch.finfo(ref.dtype).tiny)
        worst = max(worst, (candidate[name] - ref).abs().max().item() / scale)
    return worst


def assert_exact(model, compiled, inputs, tolerance, reference=None):
    """Loss and every parameter gradient of ``compiled`` equal eager autograd's (of ``reference``,
    by default the model itself) within ``tolerance``."""
    ref_loss, ref_grads = loss_and_grads(model, reference or model, inputs)
    loss, grads = loss_and_grads(model, compiled, inputs)
    assert torch.allclose(loss, ref_loss, rtol=tolerance, atol=0), (loss, ref_loss)
    error = max_relative_error(ref_grads, grads)
    assert error <= tolerance, f"max relative gradient error {error:.3e}"


class Gradients(TrainerCallback):
    """A Trainer callback keeping the gradients each optimizer step is about to apply."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None})


def peak_growth_in_hidden_states(model, options: dict, lengths=(1024, 2048)) -> float:
    """How much the peak of a compiled SFT step (loss only, batch 1) grows from the first length
    to the second, in hidden states of the growth (``(T2 - T1) x hidden`` floats): per token of
    sequence, so the fixed costs (parameter gradients) cancel. Compiled dynamic, once for both
    lengths, outside the measurement."""
    from sbp_compiler.profiling import trace_memory

    torch._dynamo.reset()

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    compiled = torch.compile(loss_fn, backend="streambp", options=options, dynamic=True)
    peaks = []
    for index, length in enumerate(lengths):
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))

        def step():
            compiled(ids).backward()
            model.zero_grad(set_to_none=True)

        if index == 0:
            step()
        peaks.append(trace_memory(step)[1].peak_bytes)
    hidden_state = (lengths[1] - lengths[0]) * model.config.hidden_size * next(model.parameters()).element_size()
    return (peaks[1] - peaks[0]) / hidden_state
