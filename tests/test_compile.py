"""torch.compile (issue 19): the Trainer's own `torch_compile` gives the eager losses, also under bf16 autocast, and
the compiled sampling step (`generate(torch_compile=True)`) gives the eager samples. CPU, inductor."""

from __future__ import annotations

import datasets
import pytest
import torch

from trainers import TRAINERS, DiffusionTrainingArguments

from .conftest import VOCAB, tiny_model


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_intra_op_thread")]


def _losses(variant: str, tmp_path, **overrides) -> tuple[list[float], object]:
    ids = torch.randint(0, VOCAB - 1, (24, 7), generator=torch.Generator().manual_seed(0))
    args = DiffusionTrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                      learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                      use_cpu=True, disable_tqdm=True, seed=0, **overrides)
    trainer = TRAINERS[variant](model=tiny_model(variant).train(), args=args,
                                train_dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


@pytest.mark.parametrize("variant", ["duo"])  # one variant: each compilation costs ~25 s on this CPU
def test_trainer_torch_compile_gives_the_eager_losses(variant, tmp_path):
    eager, _ = _losses(variant, tmp_path / "eager")
    compiled, trainer = _losses(variant, tmp_path / "compiled", torch_compile=True)
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"  # the Trainer really compiled the model
    assert len(set(eager)) == 3  # the losses move, so the comparison can fail
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


def test_compiled_bf16_losses_stay_finite_and_near_fp32(tmp_path):
    fp32, _ = _losses("duo", tmp_path / "fp32")
    bf16, _ = _losses("duo", tmp_path / "bf16", torch_compile=True, bf16=True)
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert bf16 == pytest.approx(fp32, rel=3e-2)


def test_compiled_sampling_step_gives_the_eager_samples():
    model = tiny_model("duo")
    kwargs = dict(batch_size=2, max_new_tokens=7, num_steps=6)
    eager = model.generate(**kwargs, generator=torch.Generator().manual_seed(4))
    compiled = model.generate(**kwargs, torch_compile=True, generator=torch.Generator().manual_seed(4))
    assert "_dlm_compiled_forward" in model.__dict__ and "_dlm_compiled_forward" not in dict(model.named_modules())
    assert torch.equal(compiled, eager)
    again = model.generate(**kwargs, torch_compile=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(again, eager)  # the compiled step is reused
    assert set(model.state_dict()) == set(tiny_model("duo").state_dict())
