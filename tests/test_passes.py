"""The passes on small hand-built graphs."""
import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from passes.errors import CannotChunk, Reason
from passes.rescale import rescale_shape_arguments, rescale_size
from passes.seq_dims import SeqDimAnalysis, UNKNOWN, layout, seq_sized_predicate


def traced(fn, *shapes):
    """A torch-level FX graph of ``fn`` with example values on every node (as Dynamo gives)."""
    gm = fx.symbolic_trace(fn)
    fake = FakeTensorMode()
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, fake).propagate(*[fake.from_tensor(torch.zeros(s)) for s in shapes])
    for node in gm.graph.nodes:
        node.meta["example_value"] = node.meta.get("val")
    return gm


def labels_of(gm, initial_by_name, **kwargs):
    nodes = list(gm.graph.nodes)
    initial = {n: initial_by_name[n.name] for n in nodes if n.name in initial_by_name}
    result = SeqDimAnalysis(**kwargs).run(nodes, initial)
    return {n.name: result.get(n) for n in nodes}


def test_labels_follow_linear_view_transpose_and_broadcast():
    def f(x, w, scale):
        y = torch.nn.functional.linear(x, w).view(2, 7, 4, 8).transpose(1, 2)
        return (y * scale).sum(-1)

    gm = traced(f, (2, 7, 16), (32, 16), (8,))
    labels = labels_of(gm, {"x": (None, "S", None)})
    assert labels["linear"] == (None, "S", None)
    assert labels["view"] == (None, "S", None, None)
    assert labels["transpose"] == (None, None, "S", None)
    assert labels["sum_1"] == (None, None, "S")


def test_flatten_to_rows_and_back_keeps_the_sequence():
    """GPT-2's Conv1D: view(-1, d) -> addmm -> view(B, T, n)."""
    def f(x, w, b):
        return torch.addmm(b, x.view(-1, 16), w).view(2, 7, 24)

    gm = traced(f, (2, 7, 16), (16, 24), (24,))
    labels = labels_of(gm, {"x": (None, "S", None)}, is_seq_sized=seq_sized_predicate(7), seq_length=7)
    assert labels["view"] == ("S", None) and layout(labels["view"][0]) == (2, 1)
    assert labels["addmm"] == ("S", None)
    assert labels["view_1"] == (None, "S", None)


@pytest.mark.parametrize("op", [lambda x: torch.cumsum(x, 1), lambda x: x.mean(1), lambda x: x[:, 1:],
                                lambda x: torch.softmax(x, dim=1)])
def test_mixing_along_the_sequence_is_refused(op):
    gm = traced(op, (2, 7, 16))
    with pytest.raises(CannotChunk) as refusal:
        labels_of(gm, {"x": (None, "S", None)})
    assert refusal.value.reason == Reason.SEQUENCE_MIXING


def test_mixing_over_an_allowed_axis_passes():
    def f(scores):
        return torch.softmax(scores, dim=-1)

    gm = traced(f, (2, 4, 7, 7))
    softmax = next(n for n in gm.graph.nodes if n.op == "call_function")
    labels = labels_of(gm, {"scores": (None, None, "Q", "K")}, mixing_allowed=lambda n, l: n is softmax and l == "K")
    assert labels[softmax.name] == (None, None, "Q", "K")


def test_unknown_op_is_refused_strictly_and_marked_leniently():
    def f(x):
        return torch.fft.fft(x, dim=1).real

    gm = traced(f, (2, 7, 16))
    with pytest.raises(CannotChunk) as refusal:
        labels_of(gm, {"x": (None, "S", None)})
    assert refusal.value.reason == Reason.UNKNOWN_OP
    lenient = labels_of(gm, {"x": (None, "S", None)}, lenient=True)
    assert lenient["fft_fft"] == UNKNOWN


def test_rescale_shape_arguments_restates_view_sizes():
    def f(x):
        return x.view(2, 7, 4, 4).reshape(14, 16)

    gm = traced(f, (2, 7, 16))
    labels = SeqDimAnalysis(is_seq_sized=seq_sized_predicate(7)).run(
        list(gm.graph.nodes), {next(iter(gm.graph.nodes)): (None, "Q", None)}
    )
    graph = gm.graph
    x = next(iter(graph.nodes))
    with graph.inserting_after(x):
        full = graph.placeholder("full")
    with graph.inserting_after(full):
        new = graph.placeholder("new")
    assert rescale_shape_arguments(gm, labels, {"Q": (full, new)}) == 2
    out = gm(torch.randn(2, 3, 16), 7, 3)
    assert out.shape == (6, 16)


def test_rescale_size():
    assert rescale_size(-1, 10, 3) == -1
    assert rescale_size(20, 10, 3) == 6
    with pytest.raises(RuntimeError):
        rescale_size(15, 10, 3)


@pytest.mark.parametrize("source", [
    "L['self'].model.layers.3",
    "L['args'][0].model.layers.3",  # transformers >= 5.24 wraps the model's forward
    "L['self']._modules['model']._modules['layers']._modules['3']",
    "L['self'].model.layers[3]",
])
def test_module_paths_from_every_dynamo_source_form(source):
    from passes.find_layers import _clean_path
    assert _clean_path(source) == "model.layers.3"
