"""Decoders written to break the analysis: every way a value can cross positions that is not the
causal attention. Each layer is either chunked with exact gradients or refused with its reason;
never a wrong gradient, never a crash where eager PyTorch runs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sbp_compiler
from models import VOCAB, max_relative_error
from passes.errors import Reason

WIDTH, HEADS, LENGTH, CHUNK = 16, 2, 11, 4


def _attention(block, h, mask=None):
    b, t, d = h.shape
    q, k, v = block.qkv(h).view(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
    if block.variant == "masked_fill hides where the mask is True":
        scores = (q @ k.transpose(-1, -2)) / (d // HEADS) ** 0.5
        return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
    if block.variant == "key permuted, mask compared with a tensor":  # GPT-1's keys, CPM-Ant's mask
        key = k.transpose(-1, -2).contiguous().permute(0, 1, 2, 3)  # [b, heads, head_dim, t], no transpose
        scores = (q @ key) / (d // HEADS) ** 0.5
        return scores.masked_fill(mask == torch.tensor(False), float("-inf")).softmax(-1) @ v
    if block.variant == "differential attention":  # DiffLlama: one query and key, two values
        v1, v2 = v.chunk(2, dim=-1)
        first = F.scaled_dot_product_attention(q, k, v1.repeat(1, 1, 1, 2), attn_mask=mask, is_causal=mask is None)
        second = F.scaled_dot_product_attention(q, k, v2.repeat(1, 1, 1, 2), attn_mask=mask, is_causal=mask is None)
        return first - 0.3 * second
    if block.variant == "top-k key selection":  # a sparse-attention indexer (DeepSeek-V3.2's DSA)
        # ReLU'd scores tie at zero: top-k breaks the ties by where the keys lie in the row.
        index_scores = torch.relu(q[:, 0] @ k[:, 0].transpose(-1, -2)).masked_fill(~mask, float("-inf"))
        top = index_scores.topk(min(3, t), dim=-1).indices
        not_chosen = torch.ones(b, t, t, dtype=torch.bool).scatter(-1, top, False)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(mask & ~not_chosen)[:, None])
    if block.variant == "soft mask":  # GPT-1: masked scores become -1e4, not -inf
        keep = mask.to(q.dtype)
        scores = (q @ k.transpose(-1, -2)) / (d // HEADS) ** 0.5
        return (scores * keep + -1e4 * (1 - keep)).softmax(-1) @ v
    if block.variant == "a second attention that is not causal":
        causal = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return causal + F.scaled_dot_product_attention(q, k, v)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out  # [b, heads, t, head_dim]


def _merge_heads(out):
    b, h, t, hd = out.shape
    return out.transpose(1, 2).reshape(b, t, h * hd)


class Block(nn.Module):
    """A pre-norm causal block; ``variant`` adds one adversarial operation."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.norm = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Linear(WIDTH, WIDTH)

    def forward(self, x, mask):
        v = self.variant
        if v == "writes its input in place":
            x.mul_(1.5)
        h = self.norm(x)
        if v == "randn_like noise":
            h = h + 0.1 * torch.randn_like(h)
        if v == "rand noise":
            h = h * (1 + 0.1 * torch.rand(h.shape))
        if v == "exponential_ jitter":
            h = h * torch.empty_like(h).exponential_()
        if v == "draws from its own data":
            h = h * torch.bernoulli(torch.sigmoid(h))
        if v == "no_grad block":  # a gate eager treats as a constant
            with torch.no_grad():
                gate = self.mlp(h).sigmoid()
            h = h * gate
        attended = _attention(self, h, mask)
        if v == "reshape without transpose":
            merged = attended.reshape(x.shape)
        else:
            merged = _merge_heads(attended)
        y = x + self.out(merged)
        if v == "slice assignment shift":
            y = y * 1
            y[:, 1:] = y[:, 1:] + x[:, :-1]
        if v == "roll":
            y = y + torch.roll(y, 1, dims=1)
        if v == "cumsum":
            y = y + 0.1 * torch.cumsum(y, dim=1)
        if v == "conv along the sequence":
            y = y + F.conv1d(F.pad(y.transpose(1, 2), (2, 0)), self.mlp.weight[:, :, None].repeat(1, 1, 3)).transpose(1, 2)
        if v == "flip":
            y = y + y.flip(1)
        if v == "gather by position":
            y = y + y[:, torch.arange(y.shape[1] - 1, -1, -1)]
        if v == "sort along the sequence":
            y = y + y.sort(dim=1).values
        if v == "in-place on a view of a fresh value":
            z = self.mlp(y)
            flat = z.view(-1)
            flat.mul_(2)
            return y + z
        if v == "scrambling view":
            b, t, d = y.shape
            y = y + self.mlp(y).transpose(0, 1).reshape(b * t, d).view(b, t, d)
        return y + self.mlp(y)


class Decoder(nn.Module):
    def __init__(self, variant="", mask="causal"):
        super().__init__()
        self.mask_kind = mask
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList([Block(variant) for _ in range(2)])
        self.head = nn.Linear(WIDTH, VOCAB)
        if mask == "learned bias":
            self.slopes = nn.Parameter(torch.tensor([0.3, -0.2]))

    def mask(self, t):
        q = torch.arange(t)[:, None]
        k = torch.arange(t)[None, :]
        kind = self.mask_kind
        if kind == "causal":
            return None
        if kind == "bool causal":
            return k <= q
        if kind == "look-ahead beyond a chunk":
            return k <= q + CHUNK + 1
        if kind == "look-ahead of one key":
            return k <= q + 1
        if kind == "hide later keys":  # True hides: causal when applied with masked_fill
            return k > q
        if kind == "hide the first key only":  # True hides: every later key visible
            return (k == 0) & (q > 0)
        if kind == "float causal expanded":
            return torch.zeros(t, 1).masked_fill(torch.ones(1, 1, dtype=torch.bool), 0.0).expand(t, t) + \
                torch.where(k <= q, 0.0, float("-inf"))
        if kind == "bias from the last position":
            position = torch.arange(t, dtype=torch.float32)
            bias = (position[-1] - position)[None, :] * -0.1
            return torch.where(k <= q, bias, float("-inf"))
        if kind == "bias normalised by the largest key":
            position = torch.arange(t, dtype=torch.float32)
            bias = (position / position.max())[None, :]
            return torch.where(k <= q, bias, float("-inf"))
        if kind == "learned bias":  # trained ALiBi slopes, one per head
            bias = self.slopes[:, None, None] * (k - q).to(self.slopes.dtype)
            return torch.where(k <= q, bias, float("-inf"))
        raise ValueError(kind)

    def forward(self, ids, loops=1):
        x = self.embed(ids)
        mask = self.mask(ids.shape[1])
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(x.dtype)
        first = None
        for _ in range(loops):  # loops > 1: the same blocks again, fed their own output (Dory)
            x = x if first is None else x + first
            for block in self.blocks:
                x = block(x, mask)
            first = x if first is None else first
        return self.head(x)


def _grads(model, fn, ids):
    model.zero_grad(set_to_none=True)
    logits = fn(ids)
    loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def check(variant="", mask="causal", seed=0):
    """Exact against eager (the same random draws where the model draws), and the report."""
    torch.manual_seed(seed)
    model = Decoder(variant, mask).double()
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": CHUNK})
    for _ in range(2):  # the second step runs the compiled code without compiling
        torch.manual_seed(5)
        ref_loss, reference = _grads(model, model, ids)
        torch.manual_seed(5)
        loss, grads = _grads(model, compiled, ids)
        assert torch.allclose(loss, ref_loss, rtol=1e-10, atol=0), (loss, ref_loss)
        assert max_relative_error(reference, grads) <= 1e-10
    return sbp_compiler.last_report()


REFUSED = {
    # variant: (reasons allowed, a word the detail names)
    "draws from its own data": ({Reason.RANDOM}, "bernoulli"),
    "a second attention that is not causal": ({Reason.MULTIPLE_ATTENTION}, "masked differently"),
    "reshape without transpose": ({Reason.SEQUENCE_MIXING}, "view"),
    "slice assignment shift": ({Reason.SEQUENCE_MIXING}, "slice"),
    "roll": ({Reason.SEQUENCE_MIXING}, "roll"),
    "cumsum": ({Reason.SEQUENCE_MIXING}, "cumsum"),
    "conv along the sequence": ({Reason.SEQUENCE_MIXING, Reason.UNKNOWN_OP}, ""),
    "flip": ({Reason.UNKNOWN_OP}, "flip"),
    "gather by position": ({Reason.SEQUENCE_MIXING}, "gathers"),
    "sort along the sequence": ({Reason.UNKNOWN_OP, Reason.SEQUENCE_MIXING}, "sort"),
    "scrambling view": ({Reason.SEQUENCE_MIXING}, ""),
}


@pytest.mark.parametrize("variant", sorted(REFUSED))
def test_refused_with_its_reason(variant):
    report = check(variant)
    reasons, word = REFUSED[variant]
    assert report.layers and not report.chunked_layers, str(report)
    first = report.layers[0]
    assert first.reason in reasons, str(report)
    assert word in first.detail, str(report)


@pytest.mark.parametrize("variant", ["randn_like noise", "rand noise", "exponential_ jitter"])
def test_random_draws_are_replayed_exactly(variant):
    """Draws of shape-only values are made before the layer and read by every chunk: the layer
    sees eager's own numbers (``check`` compares with eager under the same seed, twice)."""
    report = check(variant)
    assert len(report.chunked_layers) == 2, str(report)


def test_a_no_grad_block_inside_a_layer_stays_one_in_forward_and_recompute():
    """Dynamo records ``with torch.no_grad()`` as switches no value depends on; the chunk graphs
    switch as eager did, so the gate passes no gradient (a chunk recomputed with autograd through
    it gave 0.6% errors)."""
    report = check("no_grad block")
    assert len(report.chunked_layers) == 2, str(report)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("mask", ["bool causal", "look-ahead beyond a chunk"])
def test_keys_selected_by_top_k_are_chunked_over_every_key(mask):
    """An indexer's top-k over a shorter row picks other tied keys: such a layer is chunked with
    every key in every chunk, giving eager's rows whatever the mask (a look-ahead one too)."""
    report = check("top-k key selection", mask=mask)
    assert len(report.chunked_layers) == 2, str(report)
    assert all(layer.keys == "all" and "top-k" in layer.keys_reason for layer in report.layers), str(report)


@pytest.mark.parametrize("mask", ["bool causal", "look-ahead beyond a chunk"])
def test_a_mask_computed_in_the_layer_is_chunked_over_every_key(mask):
    """Which keys GPT-1's ``w * b - 1e4 * (1 - b)`` hides is not proven, and -1e4 hides nothing
    exactly: every chunk sees every key, so the rows are eager's whatever the mask."""
    report = check("soft mask", mask=mask)
    assert len(report.chunked_layers) == 2, str(report)
    assert all(layer.keys == "all" and "mask computed in the layer" in layer.keys_reason
               for layer in report.layers), str(report)


@pytest.mark.parametrize("variant", ["in-place on a view of a fresh value", "writes its input in place"])
def test_in_place_writes_to_values_of_the_graph_are_made_functional_and_chunked(variant):
    report = check(variant)
    assert len(report.chunked_layers) == 2, str(report)
    assert report.functionalized and not report.in_place


def test_layer_writing_into_a_graph_input_is_refused():
    """The caller sees a write into its own tensor: it stays in place, the layer is refused."""
    torch.manual_seed(0)
    model = Decoder("writes its input in place").double()

    def run_blocks(x):
        for block in model.blocks:
            x = block(x, None)
        return x.square().sum()

    x = torch.randn(2, LENGTH, WIDTH, dtype=torch.float64)
    a, b = x.clone(), x.clone()
    model.zero_grad()
    run_blocks(a).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.compile(run_blocks, backend="streambp", options={"chunk_size": CHUNK})(b).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(a, b)  # the caller's tensor was written the same way
    assert max_relative_error(reference, grads) <= 1e-10
    report = sbp_compiler.last_report()
    assert report.in_place and report.layers[0].reason == Reason.MUTATION, str(report)


@pytest.mark.parametrize("mask", ["bool causal", "float causal expanded"])
def test_causal_masks_built_outside_the_layers_are_chunked(mask):
    report = check(mask=mask)
    assert len(report.chunked_layers) == 2, str(report)


@pytest.mark.parametrize("mask", ["look-ahead beyond a chunk", "look-ahead of one key"])
def test_masks_that_see_later_keys_are_refused_at_compile(mask):
    report = check(mask=mask)
    assert report.layers and not report.chunked_layers, str(report)
    assert {layer.reason for layer in report.layers} == {Reason.NOT_CAUSAL}, str(report)


@pytest.mark.parametrize("mask", ["bias from the last position", "bias normalised by the largest key"])
def test_mask_values_computed_over_all_keys_are_refused(mask):
    report = check(mask=mask)
    assert report.layers and not report.chunked_layers, str(report)
    assert {layer.reason for layer in report.layers} <= {Reason.MASK_UNSUPPORTED, Reason.SEQUENCE_MIXING}, str(report)


@pytest.mark.parametrize("mask", ["causal", "bool causal"])
def test_several_attentions_in_a_layer_are_chunked(mask):
    """Differential attention: two softmaxes of one query and key, each with its value; the K/V
    graph computes the shared key once and both values."""
    report = check("differential attention", mask=mask)
    assert len(report.chunked_layers) == 2, str(report)
    assert report.layers[0].attention == "sdpa + sdpa", str(report)


def test_keys_in_other_layouts_and_masks_compared_with_tensors_are_chunked():
    report = check("key permuted, mask compared with a tensor", mask="bool causal")
    assert len(report.chunked_layers) == 2, str(report)


def test_a_mask_made_from_trained_parameters_is_refused():
    """Masks are rebuilt per chunk without autograd: a learned bias would get no gradient."""
    report = check(mask="learned bias")
    assert report.layers and not report.chunked_layers, str(report)
    assert {layer.reason for layer in report.layers} == {Reason.MASK_UNSUPPORTED}, str(report)
    assert "trained parameters" in report.layers[0].detail


def test_mask_polarity_follows_its_use():
    """A mask applied with masked_fill hides where it is True: hiding the later keys is causal
    (chunked, exact); hiding only the first key lets every later key through (refused), although
    the same values passed to sdpa would be a causal mask."""
    report = check("masked_fill hides where the mask is True", mask="hide later keys")
    assert len(report.chunked_layers) == 2, str(report)
    report = check("masked_fill hides where the mask is True", mask="hide the first key only")
    assert report.layers and not report.chunked_layers, str(report)
    assert {layer.reason for layer in report.layers} == {Reason.NOT_CAUSAL}, str(report)


def test_look_ahead_seen_only_by_a_larger_chunk_does_not_fail_in_training():
    """The mask lets a query see the key CHUNK + 1 positions ahead: no small probe chunk holds
    it, the whole row of keys is checked."""
    report = check(mask="look-ahead beyond a chunk")
    assert all(layer.reason == Reason.NOT_CAUSAL for layer in report.layers)


def test_only_some_weights_train():
    """LoRA-like: the K/V weights and the norms are frozen, the rest trains."""
    torch.manual_seed(0)
    model = Decoder().double()
    for block in model.blocks:
        block.norm.requires_grad_(False)
        block.qkv.requires_grad_(False)
        block.qkv.weight.requires_grad_(False)
        block.out.requires_grad_(True)
    model.embed.requires_grad_(False)
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": CHUNK})
    _, reference = _grads(model, model, ids)
    _, grads = _grads(model, compiled, ids)
    assert max_relative_error(reference, grads) <= 1e-10
    assert len(sbp_compiler.last_report().chunked_layers) == 2


class LongPaths(nn.Module):
    """The decoder's blocks under module names hundreds of characters long in all."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        inner = nn.Module()
        inner.blocks = nn.ModuleList([Block("") for _ in range(2)])
        for level in range(4):
            outer = nn.Module()
            setattr(outer, f"a_rather_long_module_name_at_level_{level}_of_the_hierarchy_" + "x" * 20, inner)
            inner = outer
        self.nest = inner
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        stack = self.nest
        for level in reversed(range(4)):
            stack = getattr(stack, f"a_rather_long_module_name_at_level_{level}_of_the_hierarchy_" + "x" * 20)
        for block in stack.blocks:
            x = block(x, None)
        return self.head(x)


def test_debug_dir_with_long_module_paths(tmp_path):
    torch.manual_seed(0)
    model = LongPaths().double()
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": CHUNK, "debug_dir": str(tmp_path)})
    _, reference = _grads(model, model, torch.randint(0, VOCAB, (2, LENGTH)))
    _, grads = _grads(model, compiled, torch.randint(0, VOCAB, (2, LENGTH)))
    report = sbp_compiler.last_report()
    assert len(report.chunked_layers) == 2
    assert len(report.layers[0].path) > 255
    written = list((tmp_path / f"graph_{report.graph_id:03d}").iterdir())
    assert any(path.name.endswith(".kv.py") for path in written)


def test_blocks_called_several_times_are_one_layer_per_call():
    """A looped (weight-shared) stack: each call of a block is a layer of its own, chunked, and
    the shared weights get the sum of every call's gradients."""
    torch.manual_seed(0)
    model = Decoder().double()
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    looped = lambda ids: model(ids, loops=3)  # noqa: E731
    compiled = torch.compile(looped, backend="streambp", options={"chunk_size": CHUNK})
    ref_loss, reference = _grads(model, looped, ids)
    loss, grads = _grads(model, compiled, ids)
    report = sbp_compiler.last_report()
    assert [layer.path for layer in report.chunked_layers] == [
        "blocks.0", "blocks.1", "blocks.0@1", "blocks.1@1", "blocks.0@2", "blocks.1@2"], str(report)
    assert torch.allclose(loss, ref_loss, rtol=1e-10, atol=0)
    assert max_relative_error(reference, grads) <= 1e-10


class _DoubledGradient(torch.autograd.Function):
    """y = x, with a backward that writes its result in place and returns the written tensor:
    the in-place op's own value is unused (as PhiMoE's router backward's ``scatter_add_``)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        result = torch.zeros_like(grad)
        result.add_(grad * 2)
        return result


class _CustomBackwardDecoder(Decoder):
    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(_DoubledGradient.apply(x), None)
        return self.head(x)


def test_in_place_writes_in_a_custom_backward_are_kept():
    """Dead-code elimination must keep writes inside the subgraphs a graph calls (a custom
    autograd function's backward body), whether or not the layers around them chunk."""
    torch.manual_seed(0)
    assert_exact_once(_CustomBackwardDecoder().double())


def assert_exact_once(model):
    """One step of ``model`` compiled against eager: loss and gradients in float64."""
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": CHUNK})
    ref_loss, reference = _grads(model, model, ids)
    loss, grads = _grads(model, compiled, ids)
    assert torch.allclose(loss, ref_loss, rtol=1e-10, atol=0)
    assert max_relative_error(reference, grads) <= 1e-10


class CheckpointedBlock(Block):
    """A block that checkpoints itself from inside its own call, as transformers' layers do."""

    def forward(self, x, mask):
        return torch.utils.checkpoint.checkpoint(super().forward, x, mask, use_reentrant=False)


def test_a_no_grad_block_inside_a_checkpointed_layer_stays_one():
    """The checkpoint's body is copied into the layer with the grad mode of each of its ops."""
    torch.manual_seed(0)
    model = Decoder("no_grad block").double()
    for i, block in enumerate(model.blocks):
        checkpointed = CheckpointedBlock("no_grad block").double()
        checkpointed.load_state_dict(block.state_dict())
        model.blocks[i] = checkpointed
    assert_exact_once(model)
    assert len(sbp_compiler.last_report().chunked_layers) == 2, str(sbp_compiler.last_report())


@pytest.mark.parametrize("dtype,how,hidden,open_", [
    (torch.bool, "above_min", False, True), (torch.bool, "zero", True, False),
    (torch.float32, "above_min", torch.finfo(torch.float32).min, 0.0), (torch.long, "nonzero", 0, 1),
])
def test_run_time_causality_check_sees_every_key_after_the_chunk(monkeypatch, dtype, how, hidden, open_):
    """The check of a chunk's masks over the keys after the chunk goes block by block: a later
    key let through in the last block, or on the diagonal, is still refused, for each kind of
    mask; a causal one passes."""
    from sbp_compiler import runtime

    monkeypatch.setattr(runtime, "CHECK_BLOCK_KEYS", 3)
    start, end, full = 4, 8, 17

    def mask(*seen):
        m = torch.full((2, 1, end - start, full), hidden, dtype=dtype)
        for j in range(end - start):
            m[..., j, : start + j + 1] = open_
        for j, key in seen:
            m[1, 0, j, key] = open_
        return m

    runtime.check_lower_right_causal([mask()], start, end, "a causal mask", [how])
    for seen in ((0, 16), (2, 7), (3, 9)):
        with pytest.raises(runtime.NotCausalError):
            runtime.check_lower_right_causal([mask(seen)], start, end, "a mask seeing ahead", [how])
    # Two masks: a key is visible only if both let it through.
    runtime.check_lower_right_causal([mask((0, 16)), mask()], start, end, "two masks", [how, how])
    with pytest.raises(runtime.NotCausalError):
        runtime.check_lower_right_causal([mask((0, 16)), mask((0, 16))], start, end, "two masks", [how, how])
