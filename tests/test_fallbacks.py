"""What the passes cannot prove chunkable runs with ordinary autograd, with a recorded reason,
and its gradients stay exact."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM

import sbp_compiler
from models import VOCAB, assert_exact, batch, build_model, float64_throughout, loss_and_grads, max_relative_error
from passes.errors import Reason


class Block(nn.Module):
    """A causal block that is no Hugging Face model: detection must not depend on names."""

    def __init__(self, width=32, heads=4, mixing=False):
        super().__init__()
        self.heads, self.mixing = heads, mixing
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, d))
        if self.mixing:
            x = x + 0.1 * torch.cumsum(x, dim=1)  # a sequence-mixing op that is not attention
        return x


class TinyDecoder(nn.Module):
    def __init__(self, mixing=False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.blocks = nn.ModuleList([Block(mixing=mixing) for _ in range(2)])
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny_grads(model, fn, ids):
    model.zero_grad(set_to_none=True)
    fn(ids).pow(2).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mixing", [False, True])
def test_custom_decoder_chunked_or_refused_by_its_ops(mixing):
    torch.manual_seed(0)
    model = TinyDecoder(mixing).double()
    ids = torch.randint(0, VOCAB, (2, 11))
    reference = tiny_grads(model, model, ids)
    grads = tiny_grads(model, torch.compile(model, backend="streambp", options={"chunk_size": 3}), ids)
    assert max_relative_error(reference, grads) <= 1e-10
    report = sbp_compiler.last_report()
    assert len(report.layers) == 2
    if mixing:
        assert all(not layer.chunked for layer in report.layers)
        assert set(report.reasons) == {Reason.SEQUENCE_MIXING}
        assert "cumsum" in report.layers[0].detail
    else:
        assert all(layer.chunked for layer in report.layers)
        assert report.layers[0].mask.startswith("lower-right causal")


def test_bidirectional_encoder_is_left_unchunked():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(config).double().train()
    inputs = batch(10, pad=2)
    del inputs["use_cache"]
    reference_loss, reference = loss_and_grads(model, model, inputs)
    loss, grads = loss_and_grads(model, torch.compile(model, backend="streambp", options={"chunk_size": 4}), inputs)
    assert max_relative_error(reference, grads) <= 1e-10
    report = sbp_compiler.last_report()
    assert report.layers and not report.chunked_layers
    assert set(report.reasons) == {Reason.NOT_CAUSAL}


def test_attention_dropout_is_refused():
    model = build_model("llama", attention_dropout=0.1)
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    loss_and_grads(model, compiled, batch(9))
    report = sbp_compiler.last_report()
    assert report.layers and not report.chunked_layers
    assert set(report.reasons) == {Reason.DROPOUT}


def test_eval_mode_dropout_is_chunked():
    """Attention dropout is off in eval mode (HF passes p=0), so the layers chunk."""
    model = build_model("llama", attention_dropout=0.1).eval()
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    inputs = batch(9)
    with torch.no_grad():
        expected = model(**inputs).logits
        got = compiled(**inputs).logits
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert len(sbp_compiler.last_report().chunked_layers) == 2


def test_use_cache_true_is_refused_with_a_hint():
    """HF's default use_cache=True makes every layer return its K/V: not a training call."""
    model = build_model("llama")
    inputs = batch(9)
    del inputs["use_cache"]
    reference_loss, reference = loss_and_grads(model, model, inputs)
    loss, grads = loss_and_grads(model, torch.compile(model, backend="streambp", options={"chunk_size": 4}), inputs)
    assert max_relative_error(reference, grads) <= 1e-10
    report = sbp_compiler.last_report()
    assert report.fallback == Reason.LAYER_OUTPUTS
    assert "use_cache=False" in report.fallback_detail


def test_generate_on_the_compiled_model_then_train():
    """GRPO's loop on one model object compiled in place: greedy ``generate()`` (K/V cache,
    autograd off) runs as traced and equals eager's tokens, its report says why nothing was
    chunked; the training step after it is chunked and exact."""
    import copy

    model = float64_throughout(build_model("llama"))
    reference = copy.deepcopy(model)
    model.compile(backend="streambp", options={"chunk_size": 4})
    prompt = batch(6, batch_size=2)["input_ids"]
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        generated, expected = model.generate(prompt, **settings), reference.generate(prompt, **settings)
    assert torch.equal(generated, expected)
    assert any("an inference step" in r.fallback_detail for r in sbp_compiler.reports()), sbp_compiler.last_report()
    inputs = batch(11, pad=2)
    _, reference_grads = loss_and_grads(reference, reference, inputs)
    _, grads = loss_and_grads(model, model, inputs)
    assert max_relative_error(reference_grads, grads) <= 1e-10
    assert len(sbp_compiler.last_report().chunked_layers) == 2, str(sbp_compiler.last_report())


# transformers >= 5.25 sets a Python variable in every attention call (the ``kernels`` package),
# a side effect Dynamo refuses under torch.utils.checkpoint unless told it need not replay it in
# backward; the user's setting, made here for these tests only.
SIDE_EFFECTS_UNDER_CHECKPOINT = torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_is_looked_through(use_reentrant):
    """``gradient_checkpointing_enable()`` (TRL's default) wraps each layer in one checkpoint call
    that hides its attention; a chunked layer recomputes itself anyway, so the call's body is
    chunked as the layer, exactly."""
    model = float64_throughout(build_model("llama"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    with SIDE_EFFECTS_UNDER_CHECKPOINT:
        for length in (13, 7):
            assert_exact(model, compiled, batch(length, pad=3), 1e-10)
            assert len(sbp_compiler.last_report().chunked_layers) == 2, str(sbp_compiler.last_report())


def test_a_checkpointed_layer_that_is_refused_keeps_its_checkpoint(tmp_path):
    """A layer refused for another reason (dropout > 0) stays checkpointed in the model's graph,
    with the memory saving the user asked for."""
    model = float64_throughout(build_model("llama", attention_dropout=0.1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4, "debug_dir": str(tmp_path)})
    torch.manual_seed(0)
    with SIDE_EFFECTS_UNDER_CHECKPOINT:
        compiled(**batch(9)).loss.backward()
    report = sbp_compiler.last_report()
    assert not report.chunked_layers and report.layers[0].reason == Reason.DROPOUT, str(report)
    (rewritten,) = tmp_path.glob("graph_*/*_streambp.py")
    assert rewritten.read_text().count("tag_activation_checkpoint(") == 2


def test_a_graph_break_inside_checkpoint_names_what_to_switch_off():
    """Without that setting, transformers' side effect breaks the graph in every checkpointed
    layer: the layers run in eager, checkpointed and exact, and the report of the pieces says
    what to switch off. (On a transformers without the side effect, the layers simply chunk.)"""
    model = float64_throughout(build_model("llama"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    inputs = batch(9, pad=2)
    _, reference = loss_and_grads(model, model, inputs)
    before = len(sbp_compiler.reports())
    _, grads = loss_and_grads(model, compiled, inputs)
    assert max_relative_error(reference, grads) <= 1e-10
    reports = sbp_compiler.reports()[before:]
    if any(report.chunked_layers for report in reports):
        return  # no graph break: looked through, as in the tests above
    assert any("gradient_checkpointing_disable()" in report.fallback_detail for report in reports), \
        "\n".join(map(str, reports))
