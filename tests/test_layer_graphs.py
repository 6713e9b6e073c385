"""Graphs that hold one decoder layer, or only the head: what FSDP2 hands the backend (its hooks
break the graph around every ``fully_shard`` unit) and what a per-layer ``layer.compile()`` gives.
Each layer's graph gets the mask its model built before the layers, whole; the head's graph starts
at the hidden state an earlier graph computed. Gradients equal eager's, in one process (the
distributed runs are in test_distributed.py)."""
import pytest
import torch
import torch.nn.functional as F

import sbp_compiler
from models import batch, build_model, float64_throughout, loss_and_grads, max_relative_error

FLOAT64_TOLERANCE = 1e-10
FLOAT32_TOLERANCE = 1e-5


def _blocks(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float64), ("mistral", torch.float64), ("qwen3", torch.float64),
                                        ("gpt2", torch.float64), ("gemma3_text", torch.float64),
                                        ("mixtral", torch.float32)])
def test_each_layer_compiled_on_its_own(arch, dtype):
    before = len(sbp_compiler.reports())  # reports of this process's earlier graphs stay in the list
    model = float64_throughout(build_model(arch, dtype=dtype))
    reference = float64_throughout(build_model(arch, dtype=dtype))
    reference.load_state_dict(model.state_dict())
    for block in _blocks(model):
        block.compile(backend="streambp", options={"chunk_size": 4})
    tolerance = FLOAT64_TOLERANCE if dtype == torch.float64 else FLOAT32_TOLERANCE
    # Not a multiple of the chunk, a multiple, shorter than a chunk. Mixtral's dispatch is refused
    # once the length is dynamic (its arange over tokens x experts), so it runs one length.
    lengths = ((13, 3),) if arch == "mixtral" else ((13, 3), (8, 0), (3, 0))
    for length, pad in lengths:
        inputs = batch(length, pad=pad)
        ref_loss, ref_grads = loss_and_grads(reference, reference, inputs)
        loss, grads = loss_and_grads(model, model, inputs)
        assert torch.allclose(loss, ref_loss, rtol=tolerance, atol=0), (loss, ref_loss)
        assert max_relative_error(ref_grads, grads) <= tolerance, max_relative_error(ref_grads, grads)
    reports = sbp_compiler.reports()[before:]
    assert reports and all(r.layers and all(layer.chunked for layer in r.layers) for r in reports), reports
    assert all("one decoder layer" in r.scope and r.head.absent for r in reports)
    assert "one decoder layer" in str(reports[0]) and "head: none in this graph" in str(reports[0])


def test_a_mask_given_whole_must_be_causal():
    """A layer's graph whose mask (given whole) lets queries see later keys is not chunked: the
    probe runs the real mask; the layer then runs as traced, with eager's gradients."""
    model = float64_throughout(build_model("llama"))
    layer = model.model.layers[0]
    length = 10
    hidden = torch.randn(2, length, 32, dtype=torch.float64, requires_grad=True)
    position_ids = torch.arange(length)[None]
    cos_sin = model.model.rotary_emb(hidden, position_ids)
    bidirectional = torch.ones(2, 1, length, length, dtype=torch.bool)
    compiled = torch.compile(layer, backend="streambp", options={"chunk_size": 4})
    out = compiled(hidden, attention_mask=bidirectional, position_embeddings=cos_sin)
    expected = layer(hidden, attention_mask=bidirectional, position_embeddings=cos_sin)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    report = sbp_compiler.last_report()
    assert not report.layers[0].chunked and report.layers[0].reason.name == "NOT_CAUSAL", report


def test_static_length_equal_to_the_width():
    """A first (static) call at T = hidden (4096 tokens of a 4096-wide model): the layer's graph
    takes its hidden state's dim -2 for the sequence, not every dim of that size."""
    model = float64_throughout(build_model("llama"))  # hidden 32
    reference = float64_throughout(build_model("llama"))
    reference.load_state_dict(model.state_dict())
    for block in model.model.layers:
        block.compile(backend="streambp", options={"chunk_size": 8})
    inputs = batch(32, pad=3)
    _, ref_grads = loss_and_grads(reference, reference, inputs)
    _, grads = loss_and_grads(model, model, inputs)
    assert max_relative_error(ref_grads, grads) <= FLOAT64_TOLERANCE
    report = sbp_compiler.last_report()
    assert not report.dynamic and report.layers[0].chunked, report


@pytest.mark.parametrize("length", [13, 32])  # 32: the hidden size, static
def test_a_graph_of_the_head_alone(length):
    """norm -> lm_head -> cross-entropy from a hidden state made by another graph: the head is
    chunked from that input."""
    model = float64_throughout(build_model("llama"))
    ids = batch(length, pad=3)["labels"]

    def head_loss(hidden, labels):
        logits = model.lm_head(model.model.norm(hidden))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    compiled = torch.compile(head_loss, backend="streambp", options={"head_chunk_size": 4})
    hidden = torch.randn(2, length, 32, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (head_loss, compiled):
        model.zero_grad(set_to_none=True)
        hidden.grad = None
        loss = fn(hidden, ids)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), model.lm_head.weight.grad.clone()))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, rtol=FLOAT64_TOLERANCE, atol=0)
    report = sbp_compiler.last_report()
    assert report.head.chunked and "the head starts at the graph input" in report.scope, report
    assert report.fallback is None


def test_a_graph_of_a_final_norm_alone_is_left_as_it_is():
    """A graph that only normalises a hidden state (Dynamo split the final norm off) projects
    nothing: chunking it would save nothing, so it runs as traced."""
    model = float64_throughout(build_model("llama"))
    compiled = torch.compile(model.model.norm, backend="streambp")
    hidden = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(compiled(hidden), model.model.norm(hidden))
    report = sbp_compiler.last_report()
    assert not report.head.chunked and report.head.reason.name == "HEAD_NOTHING_INSIDE", report
