"""The `dlm_nelbo` evaluate metric (metrics/dlm_nelbo): loads offline by path, pools per-sequence NELBO sums exactly as
`dlm eval` and `DiffusionTrainer.evaluate` do, and plugs into the Trainer through `predict` and `compute_metrics`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import evaluate
import pytest
import torch
from transformers import EvalPrediction

from trainers import DiffusionTrainingArguments, MDLMTrainer
from trainers.evaluation import nelbo_batch_sums

from .conftest import SEQ, VOCAB, gen, tiny_model


METRIC_DIR = Path(__file__).resolve().parents[1] / "metrics" / "dlm_nelbo"


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


def padded_batch(rows: int = 5):
    ids = torch.randint(0, VOCAB - 1, (rows, SEQ), generator=gen(2))
    lengths = torch.tensor([SEQ, SEQ - 2, 3, SEQ, 1])[:rows]
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    return ids, mask


def test_offline_load_by_path_in_a_fresh_process(tmp_path):
    """A cold cache, HF_HUB_OFFLINE=1 and an unreachable endpoint: the metric loads from its folder alone."""
    script = ("import json, sys, evaluate\n"
              "m = evaluate.load(sys.argv[1])\n"
              "print(json.dumps(m.compute(nelbo_sums=[10.0, 3.5, 0.25], token_counts=[4, 2, 1])))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("HF_EVALUATE_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script, str(METRIC_DIR)], capture_output=True, text=True,
                            timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    values = json.loads(result.stdout.strip().splitlines()[-1])
    nelbo = 13.75 / 7
    assert values == pytest.approx({"nelbo": nelbo, "ppl_bound": math.exp(nelbo), "bpd": nelbo / math.log(2),
                                    "tokens": 7}, rel=1e-12)
    assert (tmp_path / "modules").is_dir()  # it really went through evaluate's module loader


def test_metric_matches_direct_computation_from_nelbo_batch_sums(metric):
    model = tiny_model("duo")
    ids, mask = padded_batch()
    sums, counts = nelbo_batch_sums(model, ids, mask, generator=gen(0), per_sequence=True)
    assert counts.tolist() == [7, 5, 3, 7, 1]
    # streamed in two batches, as an evaluation loop would
    metric.add_batch(nelbo_sums=sums[:2].tolist(), token_counts=counts[:2].tolist())
    metric.add_batch(nelbo_sums=sums[2:].tolist(), token_counts=counts[2:].tolist())
    values = metric.compute()
    nelbo = float(sums.sum() / counts.sum())
    assert values["nelbo"] == pytest.approx(nelbo, rel=1e-12)
    assert values["ppl_bound"] == pytest.approx(math.exp(nelbo), rel=1e-12)
    assert values["bpd"] == pytest.approx(nelbo / math.log(2), rel=1e-12)
    assert values["tokens"] == 23
    # token-weighted, not a mean of per-sequence means
    assert values["nelbo"] != pytest.approx(float((sums / counts).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="no tokens"):
        metric.compute(nelbo_sums=[0.0], token_counts=[0])
    with pytest.raises(ValueError, match="non-finite"):
        metric.compute(nelbo_sums=[float("nan")], token_counts=[3])


def test_trainer_predict_and_compute_metrics(metric, tmp_path):
    """`DiffusionTrainer` reports eval_nelbo itself, and the Trainer never calls a `compute_metrics` on it (its
    prediction_step returns no labels). Its predictions are the per-sequence [NELBO sum, tokens] pairs, gathered
    across ranks, so the metric (here inside a compute_metrics-style function) applies to `trainer.predict(...)`."""
    ids, mask = padded_batch()
    eval_ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        sums = eval_pred.predictions  # (N, 2): NELBO sum in nats, real tokens
        return metric.compute(nelbo_sums=sums[:, 0], token_counts=sums[:, 1])

    args = DiffusionTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[],
                                      use_cpu=True, disable_tqdm=True, eval_num_time_samples=2)
    trainer = MDLMTrainer(model=tiny_model("mdlm"), args=args, eval_dataset=eval_ds)
    prediction = trainer.predict(eval_ds)
    assert prediction.predictions.shape == (5, 2)
    assert prediction.predictions[:, 1].tolist() == [7, 5, 3, 7, 1]
    values = compute_metrics(EvalPrediction(predictions=prediction.predictions, label_ids=None))
    for key in ("nelbo", "ppl_bound", "bpd", "tokens"):
        assert values[key] == pytest.approx(prediction.metrics[f"test_{key}"], rel=1e-12), key
    assert prediction.metrics["test_loss"] == pytest.approx(values["nelbo"], rel=1e-12)
    # evaluate() draws the same times (per-batch generators) and reports the same pooled bound
    assert trainer.evaluate()["eval_nelbo"] == pytest.approx(values["nelbo"], rel=1e-12)
