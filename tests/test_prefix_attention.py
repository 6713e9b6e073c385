"""A query chunk's attention over its prefix (``sbp_compiler/prefix_attention.py``): with a
causal mask, the prefix and the diagonal block run without a mask and are merged by their
log-sum-exps; outputs and gradients equal sdpa's with the chunk's mask, and the models that take
that path keep eager's gradients."""
import collections

import pytest
import torch
import torch.nn.functional as F

import sbp_compiler
import sbp_compiler.prefix_attention as prefix_attention
from models import assert_exact, batch, build_model, float64_throughout
from sbp_compiler.prefix_attention import is_lower_right_causal, prefix_sdpa, takes_flash_path


def causal(q_len, kv_len):
    return torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)


def operands(q_len, kv_len, heads=4, kv_heads=2, dtype=torch.float64, batch_size=2, width=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda h, t: torch.randn(batch_size, h, t, width, dtype=dtype, generator=generator).requires_grad_()
    return make(heads, q_len), make(kv_heads, kv_len), make(kv_heads, kv_len)


def output_and_grads(fn, q, k, v, grad):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def padded(q_len, kv_len, batch_size=2):
    mask = causal(q_len, kv_len)[None, None].expand(batch_size, 1, q_len, kv_len).clone()
    mask[1, ..., :3] = False  # row 1: its first three keys are padding
    return mask


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("q_len,kv_len", [(5, 13), (4, 4), (1, 9), (7, 8)])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "padded"])
def test_outputs_and_gradients_equal_sdpa_with_the_chunk_mask(dtype, tolerance, q_len, kv_len, mask_kind):
    q, k, v = operands(q_len, kv_len, dtype=dtype)
    mask = {"none": None, "causal": causal(q_len, kv_len)[None, None].expand(2, 1, q_len, kv_len),
            "padded": padded(q_len, kv_len)}[mask_kind]
    reference_mask = causal(q_len, kv_len) if mask is None else mask
    assert takes_flash_path(q, k, v, mask, 0.0, True)
    grad = torch.randn(2, 4, q_len, 8, dtype=dtype, generator=torch.Generator().manual_seed(1))
    expected = output_and_grads(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask, enable_gqa=True), q, k, v, grad)
    got = output_and_grads(lambda q, k, v: prefix_sdpa(q, k, v, attn_mask=mask, enable_gqa=True), q, k, v, grad)
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert (a - b).abs().max() <= tolerance * b.abs().max(), name


def test_which_masks_count_as_lower_right_causal():
    assert is_lower_right_causal(None, 3, 7)
    assert is_lower_right_causal(causal(3, 7), 3, 7)
    assert is_lower_right_causal(causal(3, 7)[None, None].expand(2, 1, 3, 7), 3, 7)
    assert not is_lower_right_causal(padded(3, 7), 3, 7)
    assert not is_lower_right_causal(torch.ones(3, 7, dtype=torch.bool).tril(0), 3, 7)  # upper-left aligned
    assert not is_lower_right_causal(causal(3, 7).float(), 3, 7)  # additive masks: left to the mask path
    window = causal(3, 7) & ~torch.ones(3, 7, dtype=torch.bool).tril(7 - 3 - 3)
    assert not is_lower_right_causal(window, 3, 7)


@pytest.mark.parametrize("case", ["dropout", "autocast", "value_width", "no_gqa_flag"])
def test_other_operands_run_plain_sdpa_with_the_chunk_mask(case):
    q, k, v = operands(3, 7, heads=2 if case != "no_gqa_flag" else 4)
    if case == "value_width":
        v = torch.randn(2, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    dropout = 0.5 if case == "dropout" else 0.0
    enable_gqa = case != "no_gqa_flag"
    assert not takes_flash_path(q, k, v, None, dropout, enable_gqa) if case != "autocast" else True
    if case == "dropout":
        torch.manual_seed(3)
        got = prefix_sdpa(q, k, v, dropout_p=dropout, enable_gqa=enable_gqa)
        torch.manual_seed(3)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal(3, 7), dropout_p=dropout)
        assert torch.equal(got, expected)
    elif case == "autocast":
        q, k, v = (t.float() for t in (q, k, v))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not takes_flash_path(q, k, v, None, 0.0, True)
            got = prefix_sdpa(q, k, v, enable_gqa=True)
            expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal(3, 7), enable_gqa=True)
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    elif case == "value_width":
        assert torch.equal(prefix_sdpa(q, k, v, enable_gqa=True),
                           F.scaled_dot_product_attention(q, k, v, attn_mask=causal(3, 7), enable_gqa=True))
    else:  # sdpa itself refuses unequal head counts without enable_gqa
        with pytest.raises(RuntimeError):
            prefix_sdpa(q, k, v)


@pytest.fixture
def mask_checks(monkeypatch):
    """How many chunk masks the op found lower-right causal (True) or not (False)."""
    seen = collections.Counter()
    original = prefix_attention.is_lower_right_causal

    def counting(mask, q_len, kv_len):
        result = original(mask, q_len, kv_len)
        seen[result] += 1
        return result

    monkeypatch.setattr(prefix_attention, "is_lower_right_causal", counting)
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_models_take_the_mask_free_path_and_keep_eager_gradients(arch, mask_checks):
    """Unpadded batches: every chunk of the (full-attention) layers runs without its mask;
    padding and Mistral's window run the mask path; gradients equal eager's either way."""
    model = float64_throughout(build_model(arch, **({"sliding_window": 4} if arch == "mistral" else {})))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    assert_exact(model, compiled, batch(13), 1e-10)
    assert all(layer.chunked for layer in sbp_compiler.last_report().layers)
    if arch == "mistral":
        assert mask_checks[False] > 0  # chunks past the window: keys hidden before the diagonal
    else:
        assert mask_checks[True] > 0 and mask_checks[False] == 0
    mask_checks.clear()
    assert_exact(model, compiled, batch(13, pad=3), 1e-10)
    assert mask_checks[False] > 0


def test_is_causal_layer_needs_no_mask_at_all(mask_checks):
    """A layer calling sdpa with is_causal=True: its query-chunk graph has no mask input, the
    report says so, and the gradients equal eager's over chunks that do and do not divide T."""
    from test_fallbacks import TinyDecoder, tiny_grads

    torch.manual_seed(0)
    model = TinyDecoder().double()
    ids = torch.randint(0, 96, (2, 11))
    reference = tiny_grads(model, model, ids)
    grads = tiny_grads(model, torch.compile(model, backend="streambp", options={"chunk_size": 3}), ids)
    for name in reference:
        assert torch.allclose(grads[name], reference[name], rtol=1e-10, atol=1e-12), name
    report = sbp_compiler.last_report()
    assert report.layers[0].mask == "lower-right causal, no mask (prefix and diagonal block merged by log-sum-exp)"
    assert mask_checks[True] > 0 and mask_checks[False] == 0


@pytest.mark.parametrize("mask_kind", ["none", "padded"])
def test_custom_op_passes_torch_opcheck(mask_kind):
    """Fake (meta) kernel, schema and autograd registration agree with the real kernel."""
    q, k, v = operands(5, 13)
    q = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # a transposed layout, as models pass
    mask = None if mask_kind == "none" else padded(5, 13)
    torch.library.opcheck(torch.ops.streambp.prefix_attention.default, (q, k, v, mask, None))


@pytest.mark.parametrize("q_len,kv_len", [(5, 13), (4, 4), (3, 11)])
@pytest.mark.parametrize("mask_kind", ["none", "padded"])
def test_prefix_gradients_summed_in_place_block_by_block(monkeypatch, q_len, kv_len, mask_kind):
    """Key and value as views of leaves registered with ``gradients_into`` (the layer's K/V
    prefix and its dK/dV sums): causal, their gradients are added into the sums in blocks of
    ``PREFIX_BLOCK_KEYS`` keys (2 here, so the prefix takes several) and none comes back through
    autograd; padded, the kernel runs once and they come back as usual. Either way the sums plus
    what comes back equal sdpa's gradients; dQ too."""
    monkeypatch.setattr(prefix_attention, "PREFIX_BLOCK_KEYS", 2)
    q, k, v = operands(q_len, kv_len)
    mask = None if mask_kind == "none" else padded(q_len, kv_len)
    grad = torch.randn(2, 4, q_len, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = output_and_grads(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal(q_len, kv_len) if mask is None else mask, enable_gqa=True), q, k, v, grad)
    # The layer's K/V over the whole sequence, laid out (B, T, H, D) and seen (B, H, T, D) by the
    # attention: a narrowed, transposed view, as a chunk's prefix is.
    whole = [t.detach().transpose(1, 2).contiguous() for t in (k, v)]
    sums = [torch.full_like(w, 0.5) for w in whole]  # other chunks' gradients, already summed
    leaves = [w.detach().requires_grad_() for w in whole]
    with prefix_attention.gradients_into(list(zip(leaves, sums))):
        out = prefix_sdpa(q, leaves[0].transpose(1, 2), leaves[1].transpose(1, 2), attn_mask=mask, enable_gqa=True)
    dq, *leaf_grads = torch.autograd.grad(out, (q, *leaves), grad, allow_unused=True)
    if mask is None:
        assert leaf_grads == [None, None], "the gradients went into the sums, not through autograd"
    for name, total, leaf_grad, reference in zip(("dk", "dv"), sums, leaf_grads, expected[2:]):
        got = (total - 0.5 + (0 if leaf_grad is None else leaf_grad)).transpose(1, 2)
        assert (got - reference).abs().max() <= 1e-12 * reference.abs().max(), name
    assert (out - expected[0]).abs().max() <= 1e-12 * expected[0].abs().max()
    assert (dq - expected[1]).abs().max() <= 1e-12 * expected[1].abs().max()


def test_models_sum_prefix_gradients_in_place_and_keep_eager_gradients(monkeypatch):
    """Unpadded (causal) chunks of a model add their prefix dK/dV into the layer's sums, in
    blocks smaller than the prefix; the gradients stay eager's."""
    monkeypatch.setattr(prefix_attention, "PREFIX_BLOCK_KEYS", 3)
    summed = collections.Counter()
    backward_into = prefix_attention._backward_into

    def counting(*args):
        summed[args[2].shape[-2]] += 1
        return backward_into(*args)

    monkeypatch.setattr(prefix_attention, "_backward_into", counting)
    model = float64_throughout(build_model("qwen3"))
    compiled = torch.compile(model, backend="streambp", options={"chunk_size": 4})
    inputs = batch(13)
    inputs.pop("attention_mask")
    assert_exact(model, compiled, inputs, 1e-10)
    assert summed == {4: 2, 8: 2, 12: 2, 13: 2}, summed  # every chunk of both layers
