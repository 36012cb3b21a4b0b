"""Reliability (issue 7): the NaN/inf guard, numerics at the ends of time, determinism.

The trainers run for real (`transformers.Trainer`) on tiny models and token ids generated here.
"""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from modeling_dlm import VARIANTS
from trainers import TRAINERS, DiffusionTrainingArguments

from .conftest import VOCAB, tiny_model


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _dataset(n: int = 48, seq: int = 7) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict({"input_ids": torch.randint(0, VOCAB - 1, (n, seq), generator=g).tolist()})


def _args(tmp_path, **overrides) -> DiffusionTrainingArguments:
    kwargs = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                  logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                  lr_scheduler_type="constant")
    kwargs.update(overrides)
    return DiffusionTrainingArguments(**kwargs)


class _PoisonAt(TrainerCallback):
    """Writes inf into one weight after optimizer step `step` (as a diverging run would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "vocab_embed" in n or "embed" in n).fill_(float("inf"))


@pytest.mark.parametrize("policy", ["skip", "stop"])
@pytest.mark.parametrize("variant", ["duo", "mdlm"])
def test_non_finite_loss_stops_training_with_the_step(variant, policy, tmp_path):
    args = _args(tmp_path, save_strategy="steps", save_steps=2, nan_guard_policy=policy)
    trainer = TRAINERS[variant](model=tiny_model(variant).train(), args=args, train_dataset=_dataset(),
                                callbacks=[_PoisonAt(3)])
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at step 4\b.*no NaN"):
        trainer.train()
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values()), "the checkpoint before the failure must be finite"
    assert not (tmp_path / "checkpoint-4").exists(), "no checkpoint may be written for the failed step"


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_gradient_stops_before_the_optimizer_step(policy, tmp_path):
    model = tiny_model("sddlm").train()
    # a finite loss with a NaN gradient
    model.backbone.output_layer.linear.weight.register_hook(lambda grad: grad * float("nan"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = TRAINERS["sddlm"](model=model, args=_args(tmp_path, nan_guard_policy=policy), train_dataset=_dataset())
    message = r"non-finite gradients at step 1 .*before the optimizer step" if policy == "stop" else \
        r"non-finite training loss or gradients at step 1: those optimizer steps were skipped"
    with pytest.raises(FloatingPointError, match=message):
        trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed although the step was refused"
    if policy == "skip":  # skipped on the device: the fused AdamW kept its moments and step count at zero
        state = trainer.optimizer.optimizer.state
        assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in state.values()), state


def test_skip_guard_skips_bad_steps_on_the_device_and_reports_them(tmp_path, caplog):
    """Steps 2 and 3 of 6 get a NaN gradient: they are skipped (weights as after step 1, then training goes on), the
    logging step reports them, and the logged loss is the mean of the applied steps."""
    weights = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            weights[state.global_step] = torch.cat([p.detach().flatten().clone() for p in model.parameters()])

    model = tiny_model("duo").train()
    trainer = TRAINERS["duo"](model=model, args=_args(tmp_path, logging_steps=3), train_dataset=_dataset(),
                              callbacks=[Snapshot()])
    # a NaN in one gradient at optimizer steps 2 and 3 (as a bad batch would give)
    model.backbone.output_layer.linear.weight.register_hook(
        lambda grad: grad * float("nan") if trainer.state.global_step + 1 in (2, 3) else grad)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert torch.equal(weights[1], weights[2]) and torch.equal(weights[2], weights[3])
    assert not torch.equal(weights[3], weights[4]) and all(torch.isfinite(w).all() for w in weights.values())
    first, second = [h for h in trainer.state.log_history if "loss" in h]
    assert first["skipped_steps"] == 2 and "skipped_steps" not in second
    assert math.isfinite(first["loss"]) and math.isfinite(second["loss"])
    assert "skipped 2 of 3 optimizer steps (from step 2)" in caplog.text


def test_nan_guard_can_be_turned_off(tmp_path):
    model = tiny_model("duo").train()
    args = _args(tmp_path, nan_guard=False, max_steps=4, logging_nan_inf_filter=False)
    trainer = TRAINERS["duo"](model=model, args=args,
                              train_dataset=_dataset(), callbacks=[_PoisonAt(2)])
    trainer.train()  # no guard: the run goes on (and the user gets NaN losses, as with a plain Trainer)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and not math.isfinite(logged[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_loss_is_finite_at_the_ends_of_time(variant, dtype):
    """The training objectives at t in {0, eps, 0.5, 1 - eps, 1}, in float32 and under bfloat16 autocast."""
    model = tiny_model(variant).train()
    trainer = TRAINERS[variant](model=model, args=_args("/tmp/dlm-unused-reliability"), train_dataset=_dataset())
    ids = _dataset(5)["input_ids"]
    x = torch.tensor(ids)
    t = torch.tensor([0.0, 1e-6, 0.5, 1 - 1e-6, 1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        loss, stats = trainer.diffusion_loss(model, model, x, None, t, torch.Generator().manual_seed(0))
        loss.backward()
    assert torch.isfinite(loss), f"{variant} loss {loss} at t = {t.tolist()}"
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.values()), stats
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_same_seed_same_first_losses_and_samples(tmp_path):
    def run(seed_dir):
        trainer = TRAINERS["duo"](model=tiny_model("duo", seed=3).train(), args=_args(tmp_path / seed_dir),
                                  train_dataset=_dataset())
        trainer.train()
        model = trainer.model.eval()
        samples = model.generate(batch_size=2, max_new_tokens=7, num_steps=5,
                                 generator=torch.Generator().manual_seed(9))
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], samples

    losses_a, samples_a = run("a")
    losses_b, samples_b = run("b")
    assert len(losses_a) == 6 and losses_a == losses_b
    assert torch.equal(samples_a, samples_b)
