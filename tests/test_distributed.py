"""DDP and FSDP2 with streambp: ``torchrun --nproc_per_node 2`` on gloo (CPU), each run under a
timeout so that nothing hangs. The ranks' work is in ``distributed_worker.py``; here are the
assertions: gradients and losses equal one process over the whole batch, every layer chunked,
the collectives counted per step (independent of the number of chunks), and clear ends when
a rank fails."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT = 240
LAYERS = 2

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo")


def _run(command: list, what: str, env=None) -> tuple[int, str]:
    """(return code, output) of ``command``; past the timeout every process it started is killed."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{what} did not finish in {TIMEOUT} s:\n{output[-4000:]}")
    return process.returncode, output


def _torchrun(mode: str, arch: str, tmp_path):
    """(return code, output, rank 0's result) of one run of the worker on two ranks."""
    out = tmp_path / f"{mode}_{arch}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               WORKER, mode, arch, str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")]))
    code, output = _run(command, f"torchrun {mode} {arch}", env)
    return code, output, (json.loads(out.read_text()) if out.exists() else None)


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _check_exact(result: dict, tolerance: float) -> None:
    for name, run in result["runs"].items():
        assert run["max_relative_error"] <= tolerance, (name, run["max_relative_error"])
        for got, expected in zip(run["losses"], result["reference_losses"]):
            assert _relative(got, expected) <= tolerance, (name, run["losses"], result["reference_losses"])
        assert run["layer_backwards"] == LAYERS, run["reports"]  # both layers ran their chunked backward
        assert run["chunked_heads"] >= 1, run["reports"]


def _same_collectives(result: dict) -> dict:
    """Chunk sizes 4 and 8 (5 and 3 chunks of 20 tokens) send the same collectives."""
    runs = result["runs"]
    assert runs["streambp"]["collectives"] == runs["streambp_chunk8"]["collectives"]
    return runs["streambp"]["collectives"]


@pytest.mark.parametrize("arch,tolerance", [("llama", 1e-10), ("mixtral", 1e-5)])
def test_ddp_one_piece_per_layer(arch, tolerance, tmp_path):
    code, output, result = _torchrun("ddp", arch, tmp_path)
    assert code == 0, output[-4000:]
    _check_exact(result, tolerance)
    run = result["runs"]["streambp"]
    assert run["pieces"] == LAYERS + 1 and run["chunked_layers"] == LAYERS, run["reports"]
    collectives = _same_collectives(result)
    # DDP's buckets (1 MB; a layer holds 1.2 MB of weights): one all-reduce per layer and one for
    # the embedding's rest, whatever the number of chunks.
    assert 2 <= collectives["all_reduce"]["calls"] <= LAYERS + 1, collectives
    # The first reduction starts before the last layer's backward: it overlaps it.
    assert run["first_reduction_before_last_layer_backward"], run["summary"]
    if arch == "llama":  # DDP(model) of a model compiled in place: the same pieces
        assert result["runs"]["model_compiled_then_wrapped"]["pieces"] == LAYERS + 1


def test_ddp_optimizer_left_on_is_named(tmp_path):
    code, output, result = _torchrun("ddp_optimizer", "llama", tmp_path)
    assert code == 0, output[-4000:]
    run = result["runs"]["streambp"]
    assert run["max_relative_error"] <= 1e-10
    assert "optimize_ddp = False" in output
    assert any("hint: Dynamo's DDPOptimizer" in report for report in run["reports"]), run["reports"]


@pytest.mark.parametrize("arch,tolerance", [("llama", 1e-10), ("mixtral", 1e-5)])
def test_fsdp2_layers_chunked_one_gather_each_way(arch, tolerance, tmp_path):
    code, output, result = _torchrun("fsdp", arch, tmp_path)
    assert code == 0, output[-4000:]
    _check_exact(result, tolerance)
    run = result["runs"]["streambp"]
    assert any("layer (the whole graph): chunked" in report for report in run["reports"]), run["reports"]
    collectives = _same_collectives(result)
    units = LAYERS + 1  # fully_shard on each layer and on the root
    # Each layer's weights gathered once in forward and once in backward, for all its chunks;
    # the root's (embedding, norm, LM head) once, kept for backward.
    assert collectives["all_gather"]["calls"] == 2 * LAYERS + 1, collectives
    assert collectives["reduce_scatter"]["calls"] == units, collectives


def test_fsdp2_mixed_precision(tmp_path):
    """bfloat16 parameters, float32 reduction: against float64 truth, streambp's gradients are as
    close as eager FSDP2's with the same policy (its chunk sums are kept in float32)."""
    code, output, result = _torchrun("fsdp_mixed", "llama", tmp_path)
    assert code == 0, output[-4000:]
    runs = result["runs"]
    eager = runs["eager"]["max_relative_error"]
    for name in ("streambp", "streambp_chunk8"):
        assert runs[name]["max_relative_error"] <= 2 * eager, (name, runs[name]["max_relative_error"], eager)
        assert runs[name]["chunked_heads"] >= 1 and runs[name]["layer_backwards"] == LAYERS
    reduce = runs["streambp"]["collectives"]["reduce_scatter"]
    assert reduce["bytes"] == 4 * reduce["elements"]  # reduced in float32


def test_a_failing_rank_ends_the_run(tmp_path):
    code, output, _ = _torchrun("fsdp_fail", "llama", tmp_path)
    assert code != 0
    assert "rank 1 fails on purpose in step 2" in output


def test_ranks_with_other_models_end_with_a_clear_error(tmp_path):
    code, output, _ = _torchrun("ddp_mismatch", "llama", tmp_path)
    assert code != 0
    assert "appears not to match sizes of the same param in process 0" in output, output[-3000:]


def test_benchmark_runs_and_streambp_adds_no_collectives(tmp_path):
    """benchmarks/distributed.py at a tiny size: both methods on both ranks, and streambp's FSDP2
    step runs exactly the collectives of eager FSDP2 with activation checkpointing."""
    out = tmp_path / "distributed.json"
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "distributed.py")
    code, output = _run([sys.executable, script, "--length", "128", "--hidden-size", "64", "--layers", "2",
                         "--vocab-size", "512", "--json", str(out)], "benchmarks/distributed.py")
    assert code == 0, output[-4000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"checkpointing", "streambp"} and all(len(ranks) == 2 for ranks in results.values())
    for eager, mine in zip(results["checkpointing"], results["streambp"]):
        assert {k: v["calls"] for k, v in mine["collectives"].items()} == \
            {k: v["calls"] for k, v in eager["collectives"].items()}
        assert mine["collectives"]["all_gather"]["calls"] == 2 * 2 + 1
    assert "| streambp | 1 |" in output
