"""``sbp_compiler.objectives`` under streambp against straightforward full-logits references.

The references below are written the way TRL's trainers compute them: the whole logits,
``logits[:, :-1]`` against ``input_ids[:, 1:]``, log-softmax and gather, masks over the
completion tokens. The objectives are compiled with the backend (head chunked, logits never
whole) and compared in float64 (<= 1e-10): loss and every parameter gradient.
"""
import pytest
import torch
import torch.nn.functional as F

import sbp_compiler
from models import VOCAB, build_model, float64_throughout, max_relative_error
from sbp_compiler import objectives

OPTIONS = {"chunk_size": 4, "head_chunk_size": 3}
TOLERANCE = 1e-10


# -- references ---------------------------------------------------------------------------------

def reference_token_logps(model, input_ids, attention_mask, temperature=1.0):
    """[B, T-1]: log p(input_ids[:, t+1] | ...), TRL style."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, :-1] / temperature
    return logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def reference_dpo(model, chosen, rejected, ref_c, ref_r, beta, loss_type, label_smoothing):
    def logps(ids, attention, completion):
        mask = (attention * completion)[:, 1:]
        return (reference_token_logps(model, ids, attention) * mask).sum(-1), mask.sum(-1)

    pc, lc = logps(*chosen)
    pr, lr = logps(*rejected)
    if loss_type == "ipo":
        pc, pr, ref_c, ref_r = pc / lc, pr / lr, ref_c / lc, ref_r / lr
    h = (pc - pr) - (ref_c - ref_r)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * h)
        flipped = -label_smoothing * F.logsigmoid(-beta * h)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return losses.mean()


def reference_grpo(model, ids, attention, completion, advantages, old, ref, beta, eps_low, eps_high, temperature,
                   loss_type, max_completion_length, num_items, accumulation=1, bias_correction=True):
    logps = reference_token_logps(model, ids, attention, temperature)
    mask = (attention * completion)[:, 1:].to(logps.dtype)
    old = logps.detach() if old is None else old[:, 1:]
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    if beta:
        delta = ref[:, 1:] - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * (kl * ratio if bias_correction else kl)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length) / accumulation
    return (per_token * mask).sum() / num_items


# -- data ---------------------------------------------------------------------------------------

def sequences(lengths, prompt, seed):
    """Right-padded prompt + completion sequences of the given total lengths."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, VOCAB, (len(lengths), width), generator=g)
    attention = torch.zeros(len(lengths), width, dtype=torch.long)
    completion = torch.zeros_like(attention)
    for row, length in enumerate(lengths):
        attention[row, :length] = 1
        completion[row, prompt:length] = 1
    return ids, attention, completion


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_matches(model, reference, candidate):
    ref_loss, ref_grads = loss_and_grads(model, reference)
    loss, grads = loss_and_grads(model, candidate)
    assert torch.allclose(loss, ref_loss, rtol=TOLERANCE, atol=0), (loss, ref_loss)
    error = max_relative_error(ref_grads, grads)
    assert error <= TOLERANCE, f"max relative gradient error {error:.3e}"
    report = sbp_compiler.last_report()
    assert report.head.chunked and not report.head.whole_outputs, report
    assert all(layer.chunked for layer in report.layers), report


@pytest.fixture(scope="module")
def model():
    return float64_throughout(build_model("qwen3"))


# -- tests --------------------------------------------------------------------------------------

def test_token_logprobs_alignment(model):
    ids, attention, _ = sequences([11, 8], prompt=3, seed=0)
    ours = torch.compile(objectives.token_logprobs, backend="streambp", options=OPTIONS)(model, ids, attention)
    reference = reference_token_logps(model, ids, attention)
    assert ours.shape == ids.shape and torch.all(ours[:, 0] == 0)
    assert torch.allclose(ours[:, 1:], reference, rtol=TOLERANCE, atol=1e-12)


@pytest.mark.parametrize("num_items", [None, 17])
def test_sft_matches_the_hf_labels_path(model, num_items):
    """Prompt masking and padding; with ``num_items_in_batch`` the sum is divided by it."""
    ids, attention, completion = sequences([13, 9], prompt=4, seed=1)
    labels = torch.where((attention * completion).bool(), ids, -100)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    items = None if num_items is None else torch.tensor(num_items)
    step = torch.compile(
        lambda: objectives.sft_loss(model, ids, attention, completion, num_items_in_batch=items),
        backend="streambp", options=OPTIONS)
    assert_matches(model, lambda: model(input_ids=ids, attention_mask=attention, labels=labels, use_cache=False,
                                        **extra).loss, step)


@pytest.mark.parametrize("loss_type, label_smoothing", [("sigmoid", 0.0), ("robust", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo(model, loss_type, label_smoothing):
    """Batch of 2 pairs; chosen and rejected of unequal lengths, with padding."""
    chosen = sequences([13, 10], prompt=4, seed=2)
    rejected = sequences([9, 11], prompt=4, seed=3)
    ref_c, ref_r = torch.tensor([-40.0, -31.0], dtype=torch.float64), torch.tensor([-27.0, -38.5], dtype=torch.float64)
    beta = 0.1

    def ours():
        return objectives.dpo_loss(
            model, chosen[0], rejected[0], chosen[2], rejected[2], chosen[1], rejected[1],
            ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=beta, loss_type=loss_type,
            label_smoothing=label_smoothing).loss

    step = torch.compile(ours, backend="streambp", options=OPTIONS)
    assert_matches(model, lambda: reference_dpo(model, chosen, rejected, ref_c, ref_r, beta, loss_type,
                                                label_smoothing), step)


def test_dpo_with_a_reference_model(model):
    """Reference log-probabilities computed from a frozen model equal the ones passed in."""
    reference_model = float64_throughout(build_model("qwen3", seed=5)).requires_grad_(False)
    chosen = sequences([12, 9], prompt=3, seed=4)
    rejected = sequences([10, 12], prompt=3, seed=5)
    masks = (chosen[2], rejected[2], chosen[1], rejected[1])
    ref_c, ref_r, _, _ = objectives.preference_logprobs(reference_model, chosen[0], rejected[0], *masks)
    given = objectives.dpo_loss(model, chosen[0], rejected[0], *masks, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    computed = objectives.dpo_loss(model, chosen[0], rejected[0], *masks, reference_model=reference_model)
    assert torch.allclose(given.loss, computed.loss, rtol=TOLERANCE, atol=0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_with_its_reference_pass_in_the_same_graph(model, loss_type):
    """``dpo_loss(..., reference_model=ref)`` compiled as one step: one graph runs the reference
    (under no_grad) and the policy, two models with the same layer paths; the layers of both
    passes are chunked, named from their models, and the policy's head too; exact."""
    reference_model = float64_throughout(build_model("qwen3", seed=5)).requires_grad_(False)
    chosen = sequences([13, 10], prompt=4, seed=2)
    rejected = sequences([9, 11], prompt=4, seed=3)

    def step():
        return objectives.dpo_loss(model, chosen[0], rejected[0], chosen[2], rejected[2], chosen[1], rejected[1],
                                   reference_model=reference_model, loss_type=loss_type).loss

    assert_matches(model, step, torch.compile(step, backend="streambp", options=OPTIONS))
    paths = [layer.path for layer in sbp_compiler.last_report().layers]
    assert paths == ["reference_model.model.layers.0", "reference_model.model.layers.1",
                     "model.model.layers.0", "model.model.layers.1"], paths


@pytest.mark.parametrize("loss_type, beta, off_policy, accumulation, bias_correction", [
    ("grpo", 0.0, False, 1, True), ("bnpo", 0.04, True, 2, True), ("dr_grpo", 0.0, True, 2, True),
    ("dapo", 0.04, True, 1, True), ("grpo", 0.04, True, 2, False),
])
def test_grpo(model, loss_type, beta, off_policy, accumulation, bias_correction):
    """Batch 2 with unequal completion lengths and padding; separate low/high epsilons,
    temperature, KL to reference log-probs (importance-weighted, TRL's default, or not), old
    log-probs (off-policy) or none (on-policy), gradient accumulation."""
    ids, attention, completion = sequences([13, 9], prompt=5, seed=6)
    g = torch.Generator().manual_seed(7)
    advantages = torch.randn(2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        current = F.pad(reference_token_logps(model, ids, attention, 0.7), (1, 0))
    old = current + 0.3 * torch.randn(current.shape, generator=g, dtype=torch.float64) if off_policy else None
    ref = current + 0.2 * torch.randn(current.shape, generator=g, dtype=torch.float64)
    settings = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, temperature=0.7, loss_type=loss_type)
    num_items = torch.tensor(15.0, dtype=torch.float64)

    def ours():
        return objectives.grpo_loss(model, ids, completion, advantages, attention, old_logps=old, ref_logps=ref,
                                    max_completion_length=10, num_items_in_batch=num_items,
                                    gradient_accumulation_steps=accumulation, use_bias_correction_kl=bias_correction,
                                    **settings)

    step = torch.compile(ours, backend="streambp", options=OPTIONS)
    assert_matches(model, lambda: reference_grpo(
        model, ids, attention, completion, advantages, old, ref, beta, 0.2, 0.28, 0.7, loss_type, 10, num_items,
        accumulation, bias_correction), step)


def test_bad_loss_types_are_clear_errors(model):
    ids, attention, completion = sequences([5, 5], prompt=2, seed=8)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        objectives.grpo_loss(model, ids, completion, torch.zeros(2), attention, loss_type="ppo")
    with pytest.raises(ValueError, match="needs ref_logps"):
        objectives.grpo_loss(model, ids, completion, torch.zeros(2), attention, beta=0.1)
    with pytest.raises(ValueError, match="reference_model"):
        objectives.dpo_loss(model, ids, ids, completion, completion)
    with pytest.raises(ValueError, match="use loss_type='robust'"):
        objectives.dpo_loss(model, ids, ids, completion, completion, reference_model=model, label_smoothing=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        objectives.grpo_loss(model, ids, completion, torch.zeros(2), attention, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        objectives.grpo_loss(model, ids, completion, torch.zeros(2), attention, gradient_accumulation_steps=0)


def test_dpo_without_attention_masks_on_new_lengths(model):
    """No attention masks (``ones_like``), and new lengths on the same compiled step: the padded
    common length is then ``Max`` of two dynamic sizes, which the analysis follows."""
    step = torch.compile(
        lambda c, r: objectives.dpo_loss(model, c[0], r[0], c[2], r[2], ref_chosen_logps=ref, ref_rejected_logps=ref).loss,
        backend="streambp", options=OPTIONS)
    ref = torch.tensor([-30.0, -35.0], dtype=torch.float64)
    for seed, (chosen_length, rejected_length) in enumerate([(13, 9), (11, 12), (10, 10)]):
        chosen = sequences([chosen_length] * 2, prompt=3, seed=10 + seed)
        rejected = sequences([rejected_length] * 2, prompt=3, seed=20 + seed)
        ones = (torch.ones_like(chosen[0]), torch.ones_like(rejected[0]))
        assert_matches(model, lambda: reference_dpo(model, (chosen[0], ones[0], chosen[2]), (rejected[0], ones[1], rejected[2]),
                                                    ref, ref, 0.1, "sigmoid", 0.0),
                       lambda: step(chosen, rejected))
