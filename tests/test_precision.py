"""Mixed precision: the chunk subgraphs run under the autocast state the graph was traced with,
and bfloat16 gradients summed over chunks are as accurate as eager's, whatever the chunk size."""
import pytest
import torch

import sbp_compiler
from models import batch, build_model, loss_and_grads


def layer_weight_error(reference: dict, candidate: dict) -> float:
    """Worst relative (Frobenius) error over the decoder layers' weight matrices."""
    return max(
        ((candidate[name].double() - ref.double()).norm() / ref.double().norm()).item()
        for name, ref in reference.items() if "layers" in name and ref.dim() >= 2
    )


def float64_gradients(model, inputs) -> dict:
    """The gradients of the same weights computed in float64 (batched experts where the
    default grouped ones have no float64 kernel)."""
    kw = {"experts_implementation": "batched_mm"} if getattr(model.config, "num_local_experts", 0) else {}
    twin = build_model(model.config.model_type, dtype=torch.float64, **kw)
    twin.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    _, grads = loss_and_grads(twin, twin, inputs)
    return grads


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_autocast_bfloat16_on_cpu(arch):
    """Under torch.autocast the loss is eager autocast's and the gradients are as far from
    float64 as eager autocast's are: the layers really ran in bfloat16 (a float32 run is a
    thousand times closer to float64)."""
    model = build_model(arch, dtype=torch.float32)
    inputs = batch(13, pad=3)
    exact = float64_gradients(model, inputs)

    def under_autocast(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_and_grads(model, fn, inputs)

    eager_loss, eager = under_autocast(model)
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    loss, grads = under_autocast(compiled)
    report = sbp_compiler.last_report()
    assert len(report.chunked_layers) == 2 and report.autocast == "cpu bfloat16", str(report)
    assert torch.allclose(loss, eager_loss, rtol=1e-4, atol=0), (loss, eager_loss)
    eager_error, error = layer_weight_error(exact, eager), layer_weight_error(exact, grads)
    assert 0.5 * eager_error <= error <= 1.5 * eager_error, (error, eager_error)
    _, float32 = loss_and_grads(model, compiled, inputs)  # autocast off: another graph
    assert layer_weight_error(exact, float32) < 0.01 * eager_error
    assert sbp_compiler.last_report().autocast == "off"


@pytest.mark.parametrize("chunk_size", [1, 16])
def test_bfloat16_weights_error_independent_of_chunk_size(chunk_size):
    """Chunk gradients are summed in float32: with bfloat16 weights the error against float64
    stays within 1.25x eager's, for one-token chunks as for larger ones."""
    model = build_model("llama", dtype=torch.bfloat16)
    inputs = batch(256, pad=3)
    exact = float64_gradients(model, inputs)
    _, eager = loss_and_grads(model, model, inputs)
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": chunk_size})
    _, grads = loss_and_grads(model, compiled, inputs)
    assert len(sbp_compiler.last_report().chunked_layers) == 2
    assert layer_weight_error(exact, grads) <= 1.25 * layer_weight_error(exact, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cuda_with_a_grad_scaler(arch, dtype):
    """CUDA autocast in bfloat16, and in float16 with a GradScaler as people train: the scaled
    loss's gradients, unscaled, are as far from float64 as eager autocast's."""
    model = build_model(arch, dtype=torch.float32)
    exact = float64_gradients(model, batch(64, pad=5))  # on the CPU
    model.cuda()
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch(64, pad=5).items()}
    scale = 1024.0 if dtype == torch.float16 else 1.0  # GradScaler's scale, fixed for a comparison

    def step(fn):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            loss = fn(**inputs).loss
        (loss * scale).backward()
        grads = {n: (p.grad / scale).cpu() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    eager_loss, eager = step(model)
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 16})
    loss, grads = step(compiled)
    report = sbp_compiler.last_report()
    assert len(report.chunked_layers) == 2 and report.autocast.startswith("cuda"), str(report)
    assert torch.allclose(loss, eager_loss, rtol=1e-2, atol=0), (loss, eager_loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    eager_error, error = layer_weight_error(exact, eager), layer_weight_error(exact, grads)
    assert error <= 1.5 * eager_error, (error, eager_error)

    scaler = torch.amp.GradScaler("cuda")  # and the scaler's own loop runs and steps
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with torch.autocast("cuda", dtype=dtype):
        loss = compiled(**inputs).loss
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
