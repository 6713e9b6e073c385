"""Training objectives written so that, under ``torch.compile(..., backend="streambp")``, the
``[B, T, vocab]`` logits exist one chunk at a time.

Plain PyTorch: they run eagerly too, with the same results. What makes them chunkable is that
every vocabulary-wide step is token-wise (the next token is gathered at the logits' own position,
the shift by one happens afterwards on ``[B, T]`` values), and that only the loss and per-token
or per-sequence values leave the model's head. Compile the function that calls them (or the
training step around it); compiling only the model returns the logits, which then must exist.

Conventions. ``input_ids``, ``attention_mask`` and ``completion_mask`` are ``[B, T]`` and aligned
with each other. Per-token log-probabilities are aligned with the tokens:
``logps[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`` at temperature ``temperature``, and
``logps[:, 0] = 0`` (nothing predicts the first token). A mask selects the tokens a loss is
taken over; position 0 is never selected. Semantics follow TRL's trainers; each function states
its formula.

    step = torch.compile(lambda batch: sft_loss(model, **batch), backend="streambp")
    step(batch).backward()
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES_DPO = ("sigmoid", "ipo", "hinge", "robust")
LOSS_TYPES_GRPO = ("grpo", "bnpo", "dr_grpo", "dapo")


def logprobs_of(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)[..., targets]``, per position, without a ``[.., vocab]``
    log-softmax: ``logits[target] - logsumexp(logits)``. Half-precision logits are upcast to
    float32 (as TRL does); float32 and float64 stay as they are."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - logits.logsumexp(-1)


def entropy_of(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position: ``-sum_v p_v log p_v``."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def _model_logits(model, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def token_logprobs(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, temperature: float = 1.0) -> Tensor:
    """``[B, T]``: ``logps[:, t] = log p(input_ids[:, t] | input_ids[:, :t])``, ``logps[:, 0] = 0``.

    The building block of every RL objective. The next token is gathered at the logits' own
    position (``logits[:, t]`` predicts ``input_ids[:, t + 1]``) and the result is shifted by one
    afterwards, so the vocabulary-wide part stays token-wise (chunkable)."""
    logits = _model_logits(model, input_ids, attention_mask)
    next_tokens = F.pad(input_ids[:, 1:], (0, 1))  # the last position predicts nothing
    predicted = logprobs_of(logits, next_tokens, temperature)
    return F.pad(predicted[:, :-1], (1, 0))


def _selected(mask: Optional[Tensor], attention_mask: Optional[Tensor], like: Tensor) -> Tensor:
    """The tokens a loss is taken over: ``mask & attention_mask``, never position 0."""
    selected = torch.ones_like(like, dtype=torch.bool) if mask is None else mask.bool()
    if attention_mask is not None:
        selected = selected & attention_mask.bool()
    return F.pad(selected[:, 1:], (1, 0), value=False)


def sequence_logprobs(
    model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, completion_mask: Optional[Tensor] = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(``[B]`` sum of ``token_logprobs`` over the selected tokens, ``[B]`` their number)."""
    selected = _selected(completion_mask, attention_mask, input_ids)
    logps = token_logprobs(model, input_ids, attention_mask, temperature)
    return (logps * selected).sum(-1), selected.sum(-1)


def sft_loss(
    model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, completion_mask: Optional[Tensor] = None,
    num_items_in_batch: Optional[Tensor] = None,
) -> Tensor:
    """Cross-entropy of the selected tokens (``completion_mask``: 0 on the prompt, for prompt
    masking), summed and divided by ``num_items_in_batch`` if given (gradient accumulation: the
    number of selected tokens over all micro-batches), else by the number selected here.

    Equal to Hugging Face's ``model(..., labels=labels).loss`` with ``labels = input_ids`` where
    selected and -100 elsewhere."""
    selected = _selected(completion_mask, attention_mask, input_ids)
    logps = token_logprobs(model, input_ids, attention_mask)
    total = -(logps * selected).sum()
    return total / (num_items_in_batch if num_items_in_batch is not None else selected.sum())


# -- DPO --------------------------------------------------------------------------------------

@dataclasses.dataclass
class DPOOutput:
    loss: Tensor  # mean over pairs
    chosen_rewards: Tensor  # [B]: beta * (policy - reference) log-probability of the chosen completion
    rejected_rewards: Tensor  # [B]
    chosen_logps: Tensor  # [B]: policy log-probabilities (summed over the completion)
    rejected_logps: Tensor


def _pad_to(x: Tensor, length: int, value=0) -> Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value)


def preference_logprobs(
    model, chosen_ids: Tensor, rejected_ids: Tensor, chosen_completion_mask: Tensor, rejected_completion_mask: Tensor,
    chosen_attention_mask: Optional[Tensor] = None, rejected_attention_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths), each ``[B]``.

    Chosen and rejected sequences (prompt + completion, right-padded, possibly of different
    lengths) are padded to one length and run as one batch of ``2B``, as TRL does; streambp
    then chunks that batch along the sequence."""
    length = max(chosen_ids.shape[1], rejected_ids.shape[1])

    def mask_or_ones(mask, ids):
        return torch.ones_like(ids) if mask is None else mask

    input_ids = torch.cat([_pad_to(chosen_ids, length), _pad_to(rejected_ids, length)])
    attention_mask = torch.cat([
        _pad_to(mask_or_ones(chosen_attention_mask, chosen_ids), length),
        _pad_to(mask_or_ones(rejected_attention_mask, rejected_ids), length),
    ])
    completion_mask = torch.cat([_pad_to(chosen_completion_mask, length), _pad_to(rejected_completion_mask, length)])
    logps, lengths = sequence_logprobs(model, input_ids, attention_mask, completion_mask)
    pairs = chosen_ids.shape[0]
    return logps[:pairs], logps[pairs:], lengths[:pairs], lengths[pairs:]


def dpo_loss(
    model, chosen_ids: Tensor, rejected_ids: Tensor, chosen_completion_mask: Tensor, rejected_completion_mask: Tensor,
    chosen_attention_mask: Optional[Tensor] = None, rejected_attention_mask: Optional[Tensor] = None, *,
    ref_chosen_logps: Optional[Tensor] = None, ref_rejected_logps: Optional[Tensor] = None,
    reference_model=None, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
) -> DPOOutput:
    """Direct Preference Optimization on chosen/rejected pairs (TRL ``DPOTrainer``).

    With ``pi_c, pi_r`` the policy's and ``ref_c, ref_r`` the reference's completion
    log-probabilities (IPO: divided by the completion lengths) and
    ``h = (pi_c - pi_r) - (ref_c - ref_r)``, per pair:

    - ``sigmoid``: ``-log sigmoid(beta h)``;
    - ``ipo``: ``(h - 1 / (2 beta))^2``;
    - ``hinge``: ``relu(1 - beta h)``;
    - ``robust``: ``(-(1 - s) log sigmoid(beta h) + s log sigmoid(-beta h)) / (1 - 2 s)``,
      ``s = label_smoothing`` (robust DPO: preference labels flipped with probability ``s``);

    and the loss is the mean over pairs: TRL 1.16's formulas. TRL's ``sigmoid`` has no label
    smoothing (older TRL's conservative DPO did), so ``label_smoothing`` is accepted only with
    ``robust``; TRL's other loss types run through its own ``DPOTrainer`` on a model compiled
    by streambp (README, "TRL"). Reference log-probabilities are taken as given, or
    computed here from ``reference_model`` under ``torch.no_grad()`` (compile that call too, e.g.
    ``torch.compile(preference_logprobs, backend="streambp")``, to keep its logits chunked)."""
    if loss_type not in LOSS_TYPES_DPO:
        raise ValueError(f"dpo_loss: loss_type must be one of {LOSS_TYPES_DPO}, got {loss_type!r} (TRL's other "
                         "loss types: its DPOTrainer on the model compiled by streambp)")
    if label_smoothing != 0.0 and loss_type != "robust":
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} has no meaning for loss_type={loss_type!r} "
                         "(TRL 1.16's sigmoid has no smoothing): use loss_type='robust'")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    masks = (chosen_completion_mask, rejected_completion_mask, chosen_attention_mask, rejected_attention_mask)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        if reference_model is None:
            raise ValueError("dpo_loss needs ref_chosen_logps and ref_rejected_logps, or a reference_model")
        with torch.no_grad():
            ref_chosen_logps, ref_rejected_logps, _, _ = preference_logprobs(
                reference_model, chosen_ids, rejected_ids, *masks)
    chosen, rejected, chosen_lengths, rejected_lengths = preference_logprobs(model, chosen_ids, rejected_ids, *masks)
    policy_c, policy_r, ref_c, ref_r = chosen, rejected, ref_chosen_logps, ref_rejected_logps
    if loss_type == "ipo":
        policy_c, ref_c = policy_c / chosen_lengths, ref_c / chosen_lengths
        policy_r, ref_r = policy_r / rejected_lengths, ref_r / rejected_lengths
    h = (policy_c - policy_r) - (ref_c - ref_r)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "robust":
        s = label_smoothing
        losses = (-(1 - s) * F.logsigmoid(beta * h) + s * F.logsigmoid(-beta * h)) / (1 - 2 * s)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return DPOOutput(
        loss=losses.mean(),
        chosen_rewards=beta * (chosen - ref_chosen_logps).detach(),
        rejected_rewards=beta * (rejected - ref_rejected_logps).detach(),
        chosen_logps=chosen.detach(),
        rejected_logps=rejected.detach(),
    )


# -- GRPO -------------------------------------------------------------------------------------

def grpo_loss(
    model, input_ids: Tensor, completion_mask: Tensor, advantages: Tensor, attention_mask: Optional[Tensor] = None, *,
    old_logps: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None, beta: float = 0.0,
    epsilon_low: float = 0.2, epsilon_high: Optional[float] = None, temperature: float = 1.0,
    loss_type: str = "dapo", max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[Tensor] = None, use_bias_correction_kl: bool = True,
    gradient_accumulation_steps: int = 1,
) -> Tensor:
    """Group Relative Policy Optimization (TRL ``GRPOTrainer``, token-level importance sampling).

    ``input_ids`` are prompt + completion, ``completion_mask`` is 1 on the completion tokens,
    ``advantages`` is ``[B]``; ``old_logps`` and ``ref_logps`` are ``[B, T]`` per-token
    log-probabilities aligned like ``token_logprobs`` (``old_logps`` defaults to the current ones,
    detached: the on-policy case). With ``logp`` the policy's per-token log-probabilities at
    ``temperature``, per selected token:

        ratio = exp(logp - old_logps)
        kl_t = exp(ref_logps - logp) - (ref_logps - logp) - 1, times ratio if use_bias_correction_kl
        loss_t = -min(ratio * A, clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * kl_t

    aggregated by ``loss_type``, with ``m`` the selected tokens and ``G`` the
    ``gradient_accumulation_steps`` of a training step:

    - ``grpo``: mean over sequences of ``sum_t(loss_t m) / max(1, sum_t m)``, over ``G``;
    - ``bnpo``: ``sum(loss_t m) / max(1, sum(m))``, over ``G``;
    - ``dr_grpo``: ``sum(loss_t m) / (B * max_completion_length)``, over ``G`` (the generation's
      ``max_completion_length``, required);
    - ``dapo``: ``sum(loss_t m) / num_items_in_batch`` (the selected tokens of the whole
      accumulated batch; default: ``sum(m)``).

    TRL 1.16's ``GRPOTrainer`` formulas for these types, its defaults included
    (``use_bias_correction_kl=True``: the KL term weighted by the importance ratio, the unbiased
    reverse-KL gradient); its other loss types run through its own trainer on a model compiled
    by streambp (README, "TRL")."""
    if loss_type not in LOSS_TYPES_GRPO:
        raise ValueError(f"grpo_loss: loss_type must be one of {LOSS_TYPES_GRPO}, got {loss_type!r}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("grpo_loss: beta != 0 needs ref_logps")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("grpo_loss: dr_grpo divides by B x max_completion_length: pass the generation's "
                         "max_completion_length")
    if not (isinstance(gradient_accumulation_steps, int) and gradient_accumulation_steps >= 1):
        raise ValueError(f"grpo_loss: gradient_accumulation_steps must be a positive int, got {gradient_accumulation_steps!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    selected = _selected(completion_mask, attention_mask, input_ids).to(advantages.dtype)
    logps = token_logprobs(model, input_ids, attention_mask, temperature)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    if beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * (kl * ratio if use_bias_correction_kl else kl)
    masked = per_token * selected
    if loss_type == "grpo":
        return (masked.sum(-1) / selected.sum(-1).clamp(min=1.0)).mean() / gradient_accumulation_steps
    if loss_type == "bnpo":
        return masked.sum() / selected.sum().clamp(min=1.0) / gradient_accumulation_steps
    if loss_type == "dr_grpo":
        return masked.sum() / (input_ids.shape[0] * max_completion_length) / gradient_accumulation_steps
    return masked.sum() / (num_items_in_batch if num_items_in_batch is not None else selected.sum())
