"""The Hugging Face Trainer as shipped, with the model compiled by streambp before it is handed
over (``model.compile(backend="streambp", options={"skip_logits": True})``; the Trainer's own
``torch_compile_backend`` accepts only the backends of a fixed list).

Against the same Trainer on the uncompiled model (float32, <= 1e-5): the losses it logs and the
gradients it hands the optimizer under gradient accumulation (the summed loss over
``num_items_in_batch``), evaluation and prediction (logits, under ``torch.no_grad()``), and a run
resumed from a checkpoint.
"""
import torch

import sbp_compiler
from models import Gradients, batch, build_model, max_relative_error

from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

OPTIONS = {"chunk_size": 8, "head_chunk_size": 8, "skip_logits": True}
TOLERANCE = 1e-5


class Rows(torch.utils.data.Dataset):
    """Rows of 24 tokens: a masked prompt, and 0, 2 or 4 padded tokens at the end."""

    def __init__(self, count, seed=10, length=24):
        self.rows = []
        for i in range(count):
            row = batch(length, batch_size=1, pad=(i % 3) * 2, seed=seed + i)
            self.rows.append({k: v[0] for k, v in row.items() if k != "use_cache"})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def arguments(output_dir, **overrides):
    fields = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  per_device_eval_batch_size=2, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    return TrainingArguments(**dict(fields, **overrides))


def trainer_for(output_dir, compiled, model=None, **overrides):
    model = model or build_model("llama", dtype=torch.float32)
    if compiled:
        model.compile(backend="streambp", options=OPTIONS)
    trainer = Trainer(model=model, args=arguments(output_dir, **overrides), train_dataset=Rows(16), eval_dataset=Rows(4, seed=40))
    gradients = Gradients(model)
    trainer.add_callback(gradients)
    return trainer, gradients


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_close(reference, candidate):
    assert len(reference) == len(candidate), (reference, candidate)
    for ref, got in zip(reference, candidate):
        assert abs(got - ref) <= TOLERANCE * abs(ref), (reference, candidate)


def training_reports(start):
    return [r for r in sbp_compiler.reports()[start:] if r.head.skipped_logits]


def test_trainer_with_gradient_accumulation_matches_the_uncompiled_trainer(tmp_path):
    reference, reference_grads = trainer_for(tmp_path / "eager", compiled=False)
    reference.train()
    start = len(sbp_compiler.reports())
    trainer, grads = trainer_for(tmp_path / "streambp", compiled=True)
    trainer.train()

    assert_close(logged_losses(reference), logged_losses(trainer))
    assert len(grads.steps) == 3
    # The first optimizer step's gradients (two micro-batches over num_items_in_batch), from equal
    # weights; later steps start from weights AdamW has moved by sign-like updates, so rounding
    # differences in near-zero gradients are no longer comparable at 1e-5 (their losses are).
    assert max_relative_error(reference_grads.steps[0], grads.steps[0]) <= TOLERANCE
    # The training graph: both layers and the head chunked, the logits never returned.
    (report, *_) = training_reports(start)
    assert len(report.chunked_layers) == 2 and report.head.chunked and not report.head.whole_outputs, str(report)

    # Evaluation and prediction run under no_grad: the compiled model returns its logits there.
    assert_close([reference.evaluate()["eval_loss"]], [trainer.evaluate()["eval_loss"]])
    expected, predicted = reference.predict(Rows(4, seed=40)), trainer.predict(Rows(4, seed=40))
    assert predicted.predictions.shape == (4, 24, 96)
    assert abs(predicted.predictions - expected.predictions).max() <= TOLERANCE * abs(expected.predictions).max()


def test_a_run_resumed_from_a_checkpoint_continues_as_the_uninterrupted_one(tmp_path):
    uninterrupted, _ = trainer_for(tmp_path / "whole", compiled=True)
    uninterrupted.train()

    first, _ = trainer_for(tmp_path / "parts", compiled=True, max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "parts" / "checkpoint-2"
    # The compiled model saves the plain model's weights: no wrapper prefix in the names.
    saved = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert saved.state_dict().keys() == first.model.state_dict().keys()

    resumed, _ = trainer_for(tmp_path / "parts", compiled=True)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # The resumed history holds the checkpoint's two entries, then the step it ran.
    assert_close(logged_losses(uninterrupted), logged_losses(resumed))
    assert resumed.state.global_step == 3
