"""TRL's SFT, DPO and GRPO trainers with the model compiled by streambp: their own losses and
gradients, equal to the same trainers on the uncompiled model (TRL's code is the oracle).

The route: ``model.compile(backend="streambp")`` before the trainer is built, with
``gradient_checkpointing=False`` (TRL turns it on by default; streambp recomputes each layer
anyway). TRL scores tokens with its own fused LM head (``trl.trainer.utils.add_fused_lm_head``:
chunked log-probs, entropy and top-1 accuracy, never the whole logits); streambp chunks the
decoder layers under it, in the policy's pass and in the reference pass alike. Float64
throughout: <= 1e-10.
"""
import re

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

import sbp_compiler
from models import VOCAB, Gradients, build_model, float64_throughout, max_relative_error

OPTIONS = {"chunk_size": 4}
TOLERANCE = 1e-10
COMMON = dict(report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=0,
              gradient_checkpointing=False, logging_steps=1, learning_rate=1e-3)


def tokenizer():
    """A word-level tokenizer over the test vocabulary ("t0" .. "t95"), built offline."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t2", unk_token="t1")


def words(generator, count):
    return " ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB, (count,), generator=generator))


def policy(compiled, seed=0):
    model = float64_throughout(build_model("llama", seed=seed))
    if compiled:
        model.compile(backend="streambp", options=OPTIONS)
    return model


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def assert_close(reference, candidate, tolerance=TOLERANCE, floor=1e-12):
    """Relative to each value, or to ``floor`` where the value is about 0 (an on-policy GRPO loss
    is 0 up to rounding: its gradients are what is compared)."""
    assert len(reference) == len(candidate) > 0, (reference, candidate)
    for ref, got in zip(reference, candidate):
        assert abs(got - ref) <= tolerance * max(abs(ref), floor), (reference, candidate)


def chunked_training_graphs(start):
    return [r for r in sbp_compiler.reports()[start:] if len(r.chunked_layers) == 2]


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def trainer_step(trainer, inputs):
    """(loss, gradients) of the trainer's own ``compute_loss`` on ``inputs``."""
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.item(), grads_of(trainer.model)


def assert_equal_steps(reference, trainer, inputs, name):
    (reference_loss, reference_grads), (loss, grads) = trainer_step(reference, inputs), trainer_step(trainer, inputs)
    assert_close([reference_loss], [loss])
    error = max_relative_error(reference_grads, grads)
    assert error <= TOLERANCE, f"{name}: gradient error {error:.2e}"


# -- SFT -------------------------------------------------------------------------------------

def sft_data():
    g = torch.Generator().manual_seed(0)
    return Dataset.from_list([{"prompt": words(g, 4 + i % 3), "completion": " " + words(g, 6 + i % 4)}
                              for i in range(8)])


def sft_trainer(tmp_path, compiled):
    model = policy(compiled)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     **COMMON)
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=tokenizer())
    gradients = Gradients(model)
    trainer.add_callback(gradients)
    return trainer, gradients


def test_sft_trainer_losses_metrics_and_gradients(tmp_path):
    reference, reference_grads = sft_trainer(tmp_path / "eager", compiled=False)
    reference.train()
    start = len(sbp_compiler.reports())
    trainer, grads = sft_trainer(tmp_path / "streambp", compiled=True)
    trainer.train()
    for key in ("loss", "entropy", "mean_token_accuracy"):  # TRL's metrics come from its fused head
        assert_close(logged(reference, key), logged(trainer, key))
    for ref, got in zip(reference_grads.steps, grads.steps, strict=True):
        assert max_relative_error(ref, got) <= TOLERANCE
    assert chunked_training_graphs(start), "\n".join(map(str, sbp_compiler.reports()[start:]))


# -- DPO -------------------------------------------------------------------------------------

def dpo_loss_types():
    """Every loss type TRL's DPOConfig documents (15 in TRL 1.16)."""
    text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    return re.findall(r"`'(\w+)'`", text.partition("Possible values are:")[2].partition(". If")[0])


def dpo_data():
    g = torch.Generator().manual_seed(0)
    return Dataset.from_list([{"prompt": words(g, 4 + i), "chosen": " " + words(g, 6 + i % 3),
                               "rejected": " " + words(g, 3 + 2 * (i % 2))} for i in range(4)])


def dpo_trainer(tmp_path, compiled):
    model = policy(compiled)
    reference = float64_throughout(build_model("llama", seed=1))  # differs from the policy: log-ratios != 0
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, label_smoothing=0.1, **COMMON)
    return DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dpo_data(), processing_class=tokenizer())


def test_dpo_every_loss_type(tmp_path):
    types = dpo_loss_types()
    assert {"sigmoid", "ipo", "hinge", "robust", "exo_pair", "apo_zero", "discopop", "sigmoid_norm"} <= set(types), types
    reference, trainer = dpo_trainer(tmp_path / "eager", False), dpo_trainer(tmp_path / "streambp", True)
    inputs = next(iter(reference.get_train_dataloader()))
    start = len(sbp_compiler.reports())
    # sigmoid twice: TRL's sigmoid ignores label smoothing (robust and exo_pair use it)
    for loss_type, smoothing in [(t, 0.1) for t in types] + [("sigmoid", 0.0)]:
        for t in (reference, trainer):
            t.loss_types, t.loss_weights, t.label_smoothing = [loss_type], [1.0], smoothing
        assert_equal_steps(reference, trainer, inputs, loss_type)
    assert chunked_training_graphs(start), "\n".join(map(str, sbp_compiler.reports()[start:]))


def test_dpo_with_lora_and_the_adapter_off_as_reference(tmp_path):
    """The usual QLoRA-style DPO: a PEFT policy, no reference model (TRL disables the adapter for
    the reference pass); both passes chunked, loss and LoRA gradients equal."""
    from peft import LoraConfig, get_peft_model

    def lora_trainer(path, compiled):
        model = get_peft_model(float64_throughout(build_model("llama")), LoraConfig(
            target_modules="all-linear", r=4, lora_dropout=0.0, init_lora_weights=False)).to(torch.float64)
        if compiled:
            model.compile(backend="streambp", options=OPTIONS)
        args = DPOConfig(output_dir=str(path), per_device_train_batch_size=4, **COMMON)
        return DPOTrainer(model=model, args=args, train_dataset=dpo_data(), processing_class=tokenizer())

    reference, trainer = lora_trainer(tmp_path / "eager", False), lora_trainer(tmp_path / "streambp", True)
    assert trainer.ref_model is None
    start = len(sbp_compiler.reports())
    assert_equal_steps(reference, trainer, next(iter(reference.get_train_dataloader())), "lora")
    assert len(chunked_training_graphs(start)) >= 2  # the policy's pass and the reference's


# -- GRPO ------------------------------------------------------------------------------------

def reward(completions, **kwargs):
    return [float(len(c) % 7) for c in completions]


def grpo_data():
    g = torch.Generator().manual_seed(0)
    return Dataset.from_list([{"prompt": words(g, 4 + i % 3)} for i in range(8)])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """GRPO builds its reference model from the policy's path: a saved random model."""
    path = tmp_path_factory.mktemp("grpo") / "model"
    build_model("llama").save_pretrained(path)
    return path


def grpo_trainer(tmp_path, saved_model, compiled, **overrides):
    model = float64_throughout(AutoModelForCausalLM.from_pretrained(saved_model, dtype=torch.float64))
    if compiled:
        model.compile(backend="streambp", options=OPTIONS)
    fields = dict(COMMON, per_device_train_batch_size=4, num_generations=2, max_completion_length=6, max_steps=2,
                  gradient_accumulation_steps=2, beta=0.1)
    args = GRPOConfig(output_dir=str(tmp_path), **dict(fields, **overrides))
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=grpo_data(),
                          processing_class=tokenizer())
    gradients = Gradients(model)
    trainer.add_callback(gradients)
    return trainer, gradients


def test_grpo_generates_with_the_compiled_model_and_trains_exactly(tmp_path, saved_model):
    """Generation (``use_cache=True``, no grad) runs on the compiled model object; the training
    graphs after it are chunked; 2 steps, gradient accumulation 2, beta > 0 with TRL's default
    KL bias correction, the default loss (dapo)."""
    reference, reference_grads = grpo_trainer(tmp_path / "eager", saved_model, compiled=False)
    reference.train()
    start = len(sbp_compiler.reports())
    trainer, grads = grpo_trainer(tmp_path / "streambp", saved_model, compiled=True)
    trainer.train()
    assert trainer.args.use_bias_correction_kl and trainer.loss_type == "dapo"
    for key in ("loss", "kl", "entropy", "reward"):
        assert_close(logged(reference, key), logged(trainer, key))
    for ref, got in zip(reference_grads.steps, grads.steps, strict=True):
        assert max_relative_error(ref, got) <= TOLERANCE
    assert chunked_training_graphs(start), "\n".join(map(str, sbp_compiler.reports()[start:]))


def training_mode(trainer):
    """The state ``trainer.train()`` sets before its first step, for calling ``compute_loss``
    directly: the model in training mode (``from_pretrained`` returns it in eval mode, where
    TRL skips its gradient-accumulation scaling) and the accumulation steps of the step."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return trainer


GRPO_LOSS_TYPES = [("grpo", {}), ("bnpo", {}), ("dr_grpo", {}), ("dapo", {}), ("cispo", {}), ("sapo", {}),
                   ("luspo", {"importance_sampling_level": "sequence"}), ("vespo", {})]


def test_grpo_every_loss_type_on_one_generated_batch(tmp_path, saved_model):
    """Each loss type's loss and gradients on the same generated batch (generated once, by the
    uncompiled trainer), under gradient accumulation 2 (TRL divides grpo/bnpo/dr_grpo by it)."""
    reference = training_mode(grpo_trainer(tmp_path / "eager", saved_model, compiled=False)[0])
    trainer = training_mode(grpo_trainer(tmp_path / "streambp", saved_model, compiled=True)[0])
    rows = next(iter(reference.get_train_dataloader()))
    torch.manual_seed(0)
    inputs = reference._generate_and_score_completions(rows)
    start = len(sbp_compiler.reports())
    for loss_type, settings in GRPO_LOSS_TYPES:
        for t in (reference, trainer):
            t.loss_type = loss_type
            for name, value in dict({"importance_sampling_level": "token"}, **settings).items():
                setattr(t, name, value)
        assert_equal_steps(reference, trainer, inputs, loss_type)
    assert chunked_training_graphs(start), "\n".join(map(str, sbp_compiler.reports()[start:]))


# -- sbp_compiler.objectives against TRL's own loss code ---------------------------------------
# For a loop of one's own, ``sbp_compiler.objectives`` has the common loss types; on TRL's batch
# they equal TRL's trainers (eager both: the compiled objectives equal the eager ones,
# tests/test_objectives.py). TRL's fused head accumulates its log-softmax in float32 whatever the
# model's dtype, so these comparisons hold at float32 precision.
FLOAT32_TOLERANCE = 1e-5

@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_objectives_dpo_equals_trl(tmp_path, loss_type, smoothing):
    from sbp_compiler import objectives

    trainer = dpo_trainer(tmp_path, compiled=False)
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss_type], [1.0], smoothing
    inputs = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trl_loss = trainer.compute_loss(model, dict(inputs))
    trl_loss.backward()
    trl_grads = grads_of(model)

    pairs = inputs["input_ids"].shape[0] // 2
    ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    model.zero_grad(set_to_none=True)
    ours = objectives.dpo_loss(model, ids[:pairs], ids[pairs:], completion[:pairs], completion[pairs:],
                               attention[:pairs], attention[pairs:], reference_model=trainer.ref_model,
                               beta=trainer.beta, loss_type=loss_type, label_smoothing=smoothing).loss
    ours.backward()
    assert_close([trl_loss.item()], [ours.item()], FLOAT32_TOLERANCE)
    assert max_relative_error(trl_grads, grads_of(model)) <= FLOAT32_TOLERANCE


def test_objectives_grpo_equals_trl(tmp_path, saved_model):
    """grpo, bnpo, dr_grpo and dapo, beta > 0 with TRL's KL bias correction, gradient
    accumulation 2, on a batch TRL generated (left-padded prompts, completions of unequal length)."""
    from sbp_compiler import objectives

    trainer = training_mode(grpo_trainer(tmp_path, saved_model, compiled=False)[0])
    rows = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(rows)
    assert inputs.get("old_per_token_logps") is None  # on-policy: TRL uses the current log-probs, detached
    prompt, completion = inputs["prompt_mask"], inputs["completion_mask"]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([prompt, completion], dim=1)
    completion_mask = torch.cat([torch.zeros_like(prompt), completion], dim=1)
    ref_logps = torch.nn.functional.pad(inputs["ref_per_token_logps"], (prompt.shape[1], 0))  # aligned with ids
    accumulation = trainer.current_gradient_accumulation_steps
    assert accumulation == 2 and trainer.beta > 0 and trainer.args.use_bias_correction_kl
    model = trainer.model
    for loss_type in objectives.LOSS_TYPES_GRPO:
        trainer.loss_type = loss_type
        model.zero_grad(set_to_none=True)
        trl_loss = trainer.compute_loss(model, dict(inputs))
        trl_loss.backward()
        trl_grads = grads_of(model)
        model.zero_grad(set_to_none=True)
        ours = objectives.grpo_loss(
            model, ids, completion_mask, inputs["advantages"], attention, ref_logps=ref_logps, beta=trainer.beta,
            epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high, temperature=trainer.temperature,
            loss_type=loss_type, max_completion_length=trainer.max_completion_length,
            num_items_in_batch=inputs["num_items_in_batch"], gradient_accumulation_steps=accumulation)
        ours.backward()
        # On-policy, the loss is a sum of O(1) terms -A * ratio that cancel over each group (to
        # float32 rounding in TRL's value): compared at that scale; the gradients do not cancel.
        assert_close([trl_loss.item()], [ours.item()], FLOAT32_TOLERANCE, floor=1.0)
        error = max_relative_error(trl_grads, grads_of(model))
        assert error <= FLOAT32_TOLERANCE, f"{loss_type}: gradient error {error:.2e}"
