"""The LM head and loss, chunked along the sequence: exact against eager autograd.

Compiled functions here return only the loss, so the logits never leave the head and no
``[B, T, vocab]`` value has to exist; the report says which ops were chunked and where the head
ends. Float64 throughout (the test models' loss keeps float64, see ``float64_throughout``):
<= 1e-10; float32: <= 1e-5.
"""
import pytest
import torch
import torch.nn.functional as F

import sbp_compiler
from models import ARCHITECTURES, assert_exact, batch, build_model, float64_throughout
from passes.errors import Reason

OPTIONS = {"chunk_size": 4, "head_chunk_size": 3}


class LossOnly:
    """``fn(**inputs)`` returning an object with ``.loss``, as ``assert_exact`` expects."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, **inputs):
        return type("Output", (), {"loss": self.fn(**inputs)})


def eager_and_compiled(fn):
    return LossOnly(fn), LossOnly(torch.compile(fn, backend="streambp", options=OPTIONS))


def compiled_loss(model, **extra):
    def loss(**inputs):
        return model(**inputs, **extra).loss

    return eager_and_compiled(loss)


def assert_head_chunked(report, whole=(), gradients_in_forward=None):
    assert report.head.chunked, report
    assert report.head.whole_outputs == list(whole), report
    if gradients_in_forward is not None:
        assert report.head.gradients_in_forward is gradients_in_forward, report


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_labels_path_with_prompt_masking_padding_and_lengths(arch):
    """HF's ``labels=`` path: label shift, -100 on the prompt and the padding, mean over valid
    tokens; lengths 13 and 7 (not multiples of the head chunk) on one compiled function."""
    model = float64_throughout(build_model(arch))
    eager, compiled = compiled_loss(model)
    for length in (13, 7):
        assert_exact(model, compiled, batch(length, pad=3), 1e-10, eager)
        # The loss sums the per-token losses: forward computes the head's gradients.
        assert_head_chunked(sbp_compiler.last_report(), gradients_in_forward=True)
    assert sbp_compiler.last_report().head.split_losses  # the mean was split into a per-token sum


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_num_items_in_batch(arch):
    """Gradient accumulation: the summed loss divided by the tokens of all micro-batches."""
    model = float64_throughout(build_model(arch))
    eager, compiled = compiled_loss(model, num_items_in_batch=torch.tensor(31))
    assert_exact(model, compiled, batch(13, pad=3), 1e-10, eager)
    assert_head_chunked(sbp_compiler.last_report())


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_tied_embeddings(arch):
    """lm_head shares the input embedding: the weight's gradient gets both contributions."""
    model = float64_throughout(build_model(arch))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    eager, compiled = compiled_loss(model)
    assert_exact(model, compiled, batch(13, pad=3), 1e-10, eager)
    assert_head_chunked(sbp_compiler.last_report())


def test_final_logit_soft_capping_float64():
    """Gemma-style ``tanh(logits / cap) * cap`` before the loss (Gemma 3 runs sdpa in float64)."""
    model = float64_throughout(build_model("gemma3_text", final_logit_softcapping=2.0))
    eager, compiled = compiled_loss(model)
    assert_exact(model, compiled, batch(13, pad=3), 1e-10, eager)
    assert_head_chunked(sbp_compiler.last_report())  # no whole output: the capping is inside


@pytest.mark.parametrize("arch, overrides", [("gemma2", dict(final_logit_softcapping=2.0)), ("cohere", dict(logit_scale=0.5))])
def test_soft_capping_and_logit_scale_float32(arch, overrides):
    model = build_model(arch, dtype=torch.float32, **overrides)
    eager, compiled = compiled_loss(model)
    assert_exact(model, compiled, batch(13, pad=3), 1e-5, eager)
    assert_head_chunked(sbp_compiler.last_report())


def per_token_objective(model, input_ids, attention_mask, labels, use_cache):
    """A user objective from the logits by per-token reductions over the vocabulary: temperature,
    log-softmax + gather, logsumexp and entropy, combined over the valid tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache).logits / 0.7
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    valid = targets != -100
    log_p = logits.log_softmax(-1)
    picked = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    z = logits.logsumexp(-1)
    per_token = -picked + 0.1 * entropy + 1e-3 * z ** 2
    return (per_token * valid).sum() / valid.sum()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_user_objective_from_logits(arch):
    model = float64_throughout(build_model(arch))

    eager, compiled = eager_and_compiled(lambda **inputs: per_token_objective(model, **inputs))
    assert_exact(model, compiled, batch(13, pad=3), 1e-10, eager)
    assert_head_chunked(sbp_compiler.last_report())


def no_grad_weighted_objective(model, input_ids, attention_mask, labels, use_cache):
    """Per-token weights made under ``torch.no_grad()`` from the logits (confidence weighting),
    and the label mask made under it after them: neither may pass a gradient."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache).logits
    with torch.no_grad():
        confidence = logits.softmax(-1).amax(-1)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none").view_as(targets)
    with torch.no_grad():
        valid = (targets != -100).to(logits.dtype)
    return (confidence * per_token * valid).sum() / valid.sum()


def test_no_grad_blocks_in_the_loss_pass_no_gradient():
    model = float64_throughout(build_model("llama"))
    eager, compiled = eager_and_compiled(lambda **inputs: no_grad_weighted_objective(model, **inputs))
    assert_exact(model, compiled, batch(13, pad=3), 1e-10, eager)
    assert_head_chunked(sbp_compiler.last_report())


def test_returned_logits_exist_and_the_report_says_so():
    """Compiling the model itself returns the logits: they are made whole (the report says so),
    the rest of the head stays chunked, and everything is exact."""
    model = float64_throughout(build_model("llama"))
    compiled = torch.compile(model, backend="streambp", options=OPTIONS)
    assert_exact(model, compiled, batch(13, pad=3), 1e-10)
    report = sbp_compiler.last_report()
    assert_head_chunked(report, whole=["logits"], gradients_in_forward=False)  # two outputs
    assert "WHOLE: logits" in str(report)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_skip_logits_returns_none_beside_the_loss_and_keeps_gradients_exact(arch):
    """``options={"skip_logits": True}``: the compiled model called with ``labels=`` returns its
    loss and ``logits=None``; the head is chunked with no whole output; loss and gradients equal
    eager's (batch 2, padding, lengths 13 and 7 on one compiled model)."""
    model = float64_throughout(build_model(arch))
    compiled = torch.compile(model, backend="streambp", options=dict(OPTIONS, skip_logits=True))
    for length in (13, 7):
        inputs = batch(length, pad=3)
        assert_exact(model, compiled, inputs, 1e-10)
        report = sbp_compiler.last_report()
        assert_head_chunked(report, whole=[])
        assert [name.split()[0] for name in report.head.skipped_logits] == ["logits"], report
        assert "not returned (option skip_logits): logits" in str(report)
        assert compiled(**inputs).logits is None


def test_skip_logits_keeps_the_logits_without_grad_and_without_a_loss():
    """Evaluation (``torch.no_grad()``) and a call without ``labels=`` return the logits, equal
    to eager's: only a training step that computes a loss drops them."""
    model = float64_throughout(build_model("llama"))
    compiled = torch.compile(model, backend="streambp", options=dict(OPTIONS, skip_logits=True))
    inputs = batch(13, pad=3)
    with torch.no_grad():
        evaluated = compiled(**inputs)
        reference = model(**inputs)
    assert torch.allclose(evaluated.logits, reference.logits, rtol=1e-12, atol=1e-12)
    assert torch.allclose(evaluated.loss, reference.loss, rtol=1e-12, atol=0)
    unlabelled = {k: v for k, v in inputs.items() if k != "labels"}
    logits = compiled(**unlabelled).logits
    assert logits is not None and not sbp_compiler.last_report().head.skipped_logits
    assert "option skip_logits left it: this graph returns no loss" in str(sbp_compiler.last_report())
    assert torch.allclose(logits, model(**unlabelled).logits, rtol=1e-12, atol=1e-12)


def test_slicing_the_logits_along_the_sequence_keeps_them_whole():
    """``logits[:, :-1]`` (the usual shift) slices along the sequence: the head ends at the
    logits, which are made whole; the slice and what follows run unchunked, exactly."""
    model = float64_throughout(build_model("llama"))

    def fn(input_ids, attention_mask, labels, use_cache):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    eager, compiled = eager_and_compiled(fn)
    assert_exact(model, compiled, batch(13, pad=3), 1e-10, eager)
    report = sbp_compiler.last_report()
    assert_head_chunked(report, whole=["logits"])
    assert any("slices" in why for _, why in report.head.stops), report


def test_head_with_nothing_inside_is_left_alone():
    """The head's only computed value is its output: chunking would keep nothing off full length."""
    model = float64_throughout(build_model("llama"))
    model.model.norm = torch.nn.Identity()  # this instance only: no final norm

    def fn(input_ids, attention_mask, labels, use_cache):
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache).last_hidden_state
        return (hidden * 2.0).mean()

    eager, compiled = eager_and_compiled(fn)
    assert_exact(model, compiled, batch(13, pad=3), 1e-10, eager)
    report = sbp_compiler.last_report()
    assert not report.head.chunked and report.head.reason is Reason.HEAD_NOTHING_INSIDE, report


def test_dynamic_lengths_and_batch():
    model = float64_throughout(build_model("qwen3"))
    eager, compiled = compiled_loss(model)
    for length, batch_size in ((13, 2), (9, 3), (6, 1)):
        assert_exact(model, compiled, batch(length, batch_size=batch_size, pad=2), 1e-10, eager)
        assert_head_chunked(sbp_compiler.last_report())


def test_auto_head_chunk_grows_with_the_hidden_state_above_a_floor_of_rows():
    from sbp_compiler.head_runtime import AUTO_HEAD_MIN_ROWS, HeadPlan

    # hidden 256 and vocabulary 32768 in float32: logits as large as the hidden state at T/128 tokens.
    plan = HeadPlan(name="head", graph=None, inputs=[], input_seq_dims=[], outputs=[], output_shapes=[],
                    output_dtypes=[], symbol_sources={}, seq_input=0, chunk_size="auto",
                    token_bytes_in=256 * 4, token_bytes_widest=32768 * 4)
    assert AUTO_HEAD_MIN_ROWS == 128
    assert plan.chunk_length(100) == 100  # shorter than the floor: one chunk
    assert plan.chunk_length(8192) == 128  # T/128 = 64: the floor
    assert plan.chunk_length(65536) == 512  # T/128
    assert plan.chunk_length(100_000) == 512  # 781, rounded down to a power of two
    assert list(plan.chunks(300)) == [(0, 128), (128, 256), (256, 300)]
    # Batch 4 (DPO's chosen and rejected pairs): the floor is 128 rows, 32 tokens.
    batched = HeadPlan(**{**plan.__dict__, "token_bytes_in": 4 * 256 * 4, "token_bytes_widest": 4 * 32768 * 4,
                          "rows_per_token": 4})
    assert batched.chunk_length(1024) == 32 and batched.chunk_length(65536) == 512
    assert HeadPlan(**{**batched.__dict__, "rows_per_token": 3}).chunk_length(1024) == 32  # 43, rounded down
    fixed = HeadPlan(**{**plan.__dict__, "chunk_size": 3})
    assert fixed.chunk_length(100) == 3 and fixed.chunk_length(2) == 2


def test_gradients_from_forward_are_scaled_or_recomputed_exactly():
    """``streambp::head_with_gradients`` on a hand-made head (per-token logsumexp of the logits):
    an output gradient of one repeated value scales what forward computed; any other gradient
    (per-token weights, a non-finite value) makes backward recompute. Both equal autograd's."""
    import sympy

    from sbp_compiler.head_runtime import HeadPlan, OutputLayout, head_forward_with_gradients, uniform_value
    from sbp_compiler.runtime import InputRef, register_plan

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 11, 8, dtype=torch.float64, generator=generator)
    weight = torch.randn(20, 8, dtype=torch.float64, generator=generator)
    plan = HeadPlan(
        name="head", graph=lambda h, w, full, length: (torch.logsumexp(h @ w.T, -1),),
        inputs=[InputRef("tensor", 0), InputRef("tensor", 1)], input_seq_dims=[1, None],
        outputs=[OutputLayout(1, sympy.Integer(1), sympy.Integer(1))], output_shapes=[(2, 11)],
        output_dtypes=[torch.float64], symbol_sources={}, seq_input=0, chunk_size=4,
        token_bytes_in=64, token_bytes_widest=160, gradients_in_forward=[0, 1],
    )
    plan_id = register_plan(plan, owner=[])
    output, forward_grads = head_forward_with_gradients(plan, [hidden, weight], [])

    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    expected_output = torch.logsumexp(leaves[0] @ leaves[1].T, -1)
    torch.testing.assert_close(output, expected_output.detach(), rtol=1e-12, atol=0)
    uniform = torch.full((2, 11), 0.37, dtype=torch.float64).expand(2, 11)
    weighted = torch.randn(2, 11, dtype=torch.float64, generator=generator)
    infinite = uniform.clone()
    infinite[0, 0] = float("inf")
    assert uniform_value(uniform) == 0.37 and uniform_value(weighted) is None and uniform_value(infinite) is None
    for grad_output in (uniform, weighted, infinite):
        expected = torch.autograd.grad(expected_output, leaves, grad_output, retain_graph=True)
        got = torch.ops.streambp.head_backward_from_forward(
            plan_id, [hidden, weight], [], grad_output, forward_grads, [True, True]
        )
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=0, equal_nan=True)
