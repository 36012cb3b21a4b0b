"""The training step reads no tensor value on the host (issue 19): no sync per step, only at logging steps.

`trainers.profiling.HostSyncCounter` records every value read (`bool`, `float`, `.item()`, `.tolist()`, value-dependent
shapes) made while the Trainer runs optimizer steps 2 and 3 of a real run of each variant's trainer (with EMA, the
Duo curriculum and DCD; RePlaid not yet, see CASES), with logging only at the end.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import TrainerCallback

from modeling_dlm import VARIANTS
from modeling_dlm.scheduling_absorbing import AbsorbingStateScheduler
from trainers import TRAINERS, DiffusionTrainingArguments, DuoDistillationTrainer
from trainers.profiling import HostSyncCounter

from .conftest import VOCAB, tiny_model


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class _Window(TrainerCallback):
    """Counts from the end of optimizer step `first` to the end of step `last` (batch fetch, micro-batches, clipping,
    optimizer, EMA, scheduler: everything between two non-logging steps)."""

    def __init__(self, counter: HostSyncCounter, first: int = 1, last: int = 3):
        self.counter, self.first, self.last = counter, first, last

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            self.counter.enabled = True
        elif state.global_step == self.last:
            self.counter.enabled = False


def _dataset(rows: int = 32, seq: int = 7, padded: bool = False) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB - 1, (rows, seq), generator=g)
    data = {"input_ids": ids.tolist()}
    if padded:
        mask = torch.ones(rows, seq, dtype=torch.long)
        mask[::2, -2:] = 0
        data["attention_mask"] = mask.tolist()
    return datasets.Dataset.from_dict(data)


def _args(tmp_path, **overrides) -> DiffusionTrainingArguments:
    kwargs = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  learning_rate=1e-3, logging_steps=100, report_to=[], save_strategy="no", use_cpu=True,
                  disable_tqdm=True, seed=0, ema_decay=0.99, max_grad_norm=1.0)
    kwargs.update(overrides)
    return DiffusionTrainingArguments(**kwargs)


# RePlaid has its own tests below: with Plaid's exact split (lag 0) it reads the loss moments once per step.
CASES = {variant: {} for variant in VARIANTS if variant != "replaid"}
CASES["duo-curriculum"] = {"curriculum_steps": 10}
CASES["duo-curriculum-top-k"] = {"curriculum_steps": 10, "curriculum_top_k": 3}
CASES["padded"] = {}


def _run(trainer) -> HostSyncCounter:
    counter = HostSyncCounter(enabled=False)
    trainer.add_callback(_Window(counter))
    with counter:
        trainer.train()
    return counter


@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_read_no_value_on_the_host(case, tmp_path, monkeypatch):
    variant = case.split("-")[0] if case != "padded" else "mdlm"
    model = tiny_model(variant).train()
    # MDLM's accelerator path (on the CPU, "auto" selects the masked rows: there is no device to wait for)
    monkeypatch.setattr(AbsorbingStateScheduler, "row_selection", "fixed")
    trainer = TRAINERS[variant](model=model, args=_args(tmp_path, **CASES[case]),
                                train_dataset=_dataset(padded=case == "padded"))
    counter = _run(trainer)
    assert trainer.state.global_step == 4
    assert counter.events == [], "\n".join(f"{e.op} at {e.where}" for e in counter.events)


def test_replaid_reads_once_per_step_for_its_adaptive_split(tmp_path):
    """RePlaid's plan is drawn on the host (which entries reconstruct, which self-condition), so the loss selects its
    rows without reading the device; what remains is Plaid's adaptive split: the loss moments, summed on the device,
    are read once per optimizer step to size the next step's reconstruction share."""
    trainer = TRAINERS["replaid"](model=tiny_model("replaid").train(), args=_args(tmp_path),
                                  train_dataset=_dataset())
    counter = _run(trainer)
    assert [e.op for e in counter.events] == ["tolist", "tolist"], "\n".join(f"{e.op} at {e.where}"
                                                                            for e in counter.events)
    assert all(e.where.endswith(" in update") for e in counter.events)  # two steps, one read each


def test_replaid_with_a_lagged_split_reads_nothing(tmp_path):
    """`replaid_split_lag=1` (the default on accelerators): each step's moments are copied to the host without
    waiting and size the split one step later, so RePlaid's step reads no device value either."""
    trainer = TRAINERS["replaid"](model=tiny_model("replaid").train(), args=_args(tmp_path, replaid_split_lag=1),
                                  train_dataset=_dataset())
    counter = _run(trainer)
    assert trainer.state.global_step == 4 and trainer.split.lag == 1 and trainer.split.updates == 3
    assert counter.events == [], "\n".join(f"{e.op} at {e.where}" for e in counter.events)


def test_distillation_steps_read_no_value_on_the_host(tmp_path):
    trainer = DuoDistillationTrainer(model=tiny_model("duo").train(),
                                  args=_args(tmp_path, distill_round_steps=2, distill_num_steps=8),
                                  train_dataset=_dataset())
    counter = _run(trainer)
    assert counter.events == [], "\n".join(f"{e.op} at {e.where}" for e in counter.events)


def test_the_counter_sees_what_would_sync():
    x = torch.ones(3)
    with HostSyncCounter() as counter:
        bool(x.all()), float(x.sum()), x.tolist(), x[x > 0], x.sum().item(), x * 2
    assert [e.op for e in counter.events] == ["__bool__", "__float__", "tolist", "__getitem__", "item"]
    assert all("test_step_syncs.py" in e.where for e in counter.events)
