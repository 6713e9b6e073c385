"""Options, the per-graph report, TORCH_LOGS and the debug directory."""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import sbp_compiler
from models import batch, build_model, loss_and_grads, max_relative_error
from sbp_compiler import StreamBPConfig
from sbp_compiler.config import auto_chunk_size


def test_defaults():
    config = StreamBPConfig.from_options(None)
    assert config.chunk_size == "auto" and config.inner_compiler == "eager"


@pytest.mark.parametrize("hidden, chunk", [(32, 64), (256, 256), (300, 256), (512, 512), (1024, 1024), (4096, 1024), (8192, 1024)])
def test_auto_chunk_size(hidden, chunk):
    assert auto_chunk_size(hidden) == chunk


def test_auto_chunk_size_in_report():
    model = build_model("llama")
    loss_and_grads(model, torch.compile(model, backend="streambp"), batch(9))
    assert sbp_compiler.last_report().chunk_size == 64


@pytest.mark.parametrize("options, message", [
    ({"chunk": 4}, "valid options are ['chunk_size', 'head_chunk_size', 'memory_budget', 'inner_compiler', 'debug_dir', "
                   "'skip_logits', 'layer_inputs', 'disable_passes']"),
    ({"skip_logits": "yes"}, "skip_logits must be True or False"),
    ({"chunk_size": 0}, "chunk_size must be a positive int or 'auto'"),
    ({"chunk_size": "8"}, "chunk_size must be a positive int or 'auto'"),
    ({"inner_compiler": "tvm"}, "inner_compiler must be one of ('eager', 'inductor')"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError) as error:
        StreamBPConfig.from_options(options)
    assert message in str(error.value)


def test_bad_option_through_torch_compile():
    model = build_model("llama")
    compiled = torch.compile(model, backend="streambp", options={"chunk_sizes": 4})
    with pytest.raises(Exception, match="unknown streambp option"):
        compiled(**batch(5))


def test_report_and_debug_directory(tmp_path):
    model = build_model("qwen3")
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4, "debug_dir": str(tmp_path)})
    loss_and_grads(model, compiled, batch(9, pad=2))
    report = sbp_compiler.last_report()
    assert report.chunk_size == 4 and report.sequence_length == "9" and not report.dynamic
    assert [layer.path for layer in report.layers] == ["model.layers.0", "model.layers.1"]
    assert "2/2 layers chunked" in str(report)
    files = sorted(os.listdir(tmp_path / f"graph_{report.graph_id:03d}"))
    assert files[0] == "000_dynamo.py" and "report.txt" in files
    for expected in ("model.layers.0.kv.py", "model.layers.0.query.py",
                     "streambp.py", "aot_forward.py", "aot_backward.py"):
        assert any(name.endswith(expected) for name in files), (expected, files)
    # one mask builder per mask the layer uses, named after the mask's node
    assert any("_model.layers.0.mask." in name and name.endswith(".py") for name in files), files
    rewritten = (tmp_path / f"graph_{report.graph_id:03d}" / next(f for f in files if f.endswith("_streambp.py"))).read_text()
    assert "torch.ops.streambp.layer.default" in rewritten
    assert "scaled_dot_product_attention" not in rewritten  # the layers are gone from the outer graph


def test_torch_logs_shows_report_and_graphs():
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, %r)
        from models import batch, build_model
        model = build_model("llama")
        torch.compile(model, backend="streambp", options={"chunk_size": 4})(**batch(6)).loss.backward()
    """ % os.path.dirname(__file__))
    env = dict(os.environ, TORCH_LOGS="+sbp_compiler")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2/2 layers chunked" in result.stderr
    assert "streambp model.layers.0.query" in result.stderr


def test_tlparse_artifacts(tmp_path):
    """``TORCH_TRACE`` (what tlparse reads) holds every graph after every pass and the report."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, %r)
        from models import batch, build_model
        model = build_model("llama")
        torch.compile(model, backend="streambp", options={"chunk_size": 4})(**batch(6)).loss.backward()
    """ % os.path.dirname(__file__))
    env = dict(os.environ, TORCH_TRACE=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    trace = "".join(path.read_text() for path in tmp_path.iterdir())
    names = re.findall(r'"name": "(streambp_graph_[^"]+)"', trace)
    assert names[0].endswith("_000_dynamo"), names
    for expected in ("_model.layers.0.kv", "_model.layers.0.query", "_streambp", "_aot_forward", "_aot_backward",
                     "_report.txt"):
        assert any(name.endswith(expected) for name in names), (expected, names)
    assert len(set(names)) == len(names)  # tlparse lists artifacts by name
    assert "2/2 layers chunked" in trace  # the report's text is the payload
    assert "torch.ops.streambp.layer.default" in trace


def test_backend_found_through_entry_point_without_import():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("streambp") == "sbp_compiler.backend:streambp"
    assert "streambp" in torch._dynamo.list_backends()


def test_inductor_inner_compiler():
    """Inductor compiles the non-layer graph and, through torch.compile, every chunk subgraph
    (K/V, query chunk, mask, head): gradients stay exact through the first chunk (static), the
    growing prefix (dynamic) and a shorter last chunk."""
    from torch._dynamo.utils import counters

    model = build_model("llama", dtype=torch.float32)
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4, "inner_compiler": "inductor"})
    graphs_before = counters["stats"]["unique_graphs"]
    inputs = batch(11, pad=2)
    reference_loss, reference = loss_and_grads(model, model, inputs)
    loss, grads = loss_and_grads(model, compiled, inputs)
    assert torch.allclose(loss, reference_loss, rtol=1e-5, atol=0)
    assert max_relative_error(reference, grads) <= 1e-5
    assert len(sbp_compiler.last_report().chunked_layers) == 2
    assert sbp_compiler.last_report().head.chunked
    # Dynamo compiled the chunk subgraphs, not only the user's graph.
    assert counters["stats"]["unique_graphs"] - graphs_before > 2


def test_plans_are_freed_with_their_compiled_graph():
    """The chunked ops' plans live as long as the compiled code: a pending backward still runs
    after Dynamo drops that code, and then nothing of the compile stays behind."""
    import gc

    from sbp_compiler.runtime import PLANS

    model = build_model("llama")
    inputs = batch(13, pad=3)
    before = set(PLANS)
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    loss = compiled(**inputs).loss
    assert len(set(PLANS) - before) == 3  # two layers and the head
    torch._dynamo.reset()
    del compiled
    gc.collect()
    loss.backward()  # the autograd graph keeps the plans of its pending backward
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    del loss
    gc.collect()
    assert set(PLANS) - before == set()
