"""Crash and resume (issue 7): SIGKILL a real `dlm train` mid-run, resume, and match an uninterrupted run.

The run is a tiny Duo model on the built-in corpus with EMA on and the Gaussian curriculum spanning the crash, so the
resumed run must restore the weights, optimizer, LR schedule, RNG/data order, EMA shadow and curriculum phase. A
planted half-written checkpoint (no completion marker, truncated weights) must be skipped with a warning, and an
explicit resume from it refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.base import CHECKPOINT_MARKER, checkpoint_problem, last_complete_checkpoint


REPO = Path(__file__).resolve().parents[1]
MAX_STEPS, SAVE_STEPS = 16, 4
pytestmark = pytest.mark.slow


def _config(tmp: Path) -> Path:
    path = tmp / "tiny.json"
    path.write_text(json.dumps({"model_type": "duo", "hidden_size": 32, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "cond_dim": 16, "hidden_dropout_prob": 0.0}))
    return path


def _cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainers.cli", "train", "--variant", "duo", "--config", str(config),
            "--dataset", "builtin", "--seq_len", "32", "--max_train_samples", "256", "--max_eval_samples", "8",
            "--output_dir", str(out), "--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS),
            "--save_strategy", "steps", "--logging_steps", "1", "--per_device_train_batch_size", "4",
            "--learning_rate", "3e-3", "--ema_decay", "0.9", "--curriculum_steps", "10", "--seed", "0",
            "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--dataloader_num_workers", "0", *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _losses(folder: Path) -> dict[int, tuple[float, float]]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: (h["loss"], h.get("curriculum", -1.0)) for h in history if "loss" in h}


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    config = _config(tmp_path)
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    done = subprocess.run(_cmd(config, reference), env=_env(), cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # the run to kill: SIGKILL as soon as the step-8 checkpoint is complete (steps 9.. are under way)
    proc = subprocess.Popen(_cmd(config, crashed), env=_env(), cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    marker = crashed / "checkpoint-8" / CHECKPOINT_MARKER
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (crashed / "checkpoint-16").exists(), "the killed run must not have finished"

    # a save cut short: weights truncated, no completion marker, at a step newer than any real checkpoint
    broken = crashed / "checkpoint-15"
    shutil.copytree(crashed / "checkpoint-8", broken)
    (broken / CHECKPOINT_MARKER).unlink()
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "interrupted" in checkpoint_problem(str(broken))
    resume_from = Path(last_complete_checkpoint(str(crashed)))
    assert resume_from.name in {"checkpoint-8", "checkpoint-12"}, resume_from

    refused = subprocess.run(_cmd(config, crashed, "--resume_from_checkpoint", str(broken)), env=_env(),
                             cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "incomplete or corrupt" in refused.stderr, refused.stderr[-2000:]
    assert len(refused.stderr.strip().splitlines()) <= 40  # a clear error line, not a traceback

    resumed = subprocess.run(_cmd(config, crashed, "--resume_from_checkpoint", "last"), env=_env(),
                             cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping incomplete checkpoint {broken}" in resumed.stderr
    assert f"resuming from {resume_from}" in resumed.stderr

    expected, got = _losses(reference / "checkpoint-16"), _losses(crashed / "checkpoint-16")
    assert sorted(got) == list(range(1, MAX_STEPS + 1)) == sorted(expected)
    for step in range(1, MAX_STEPS + 1):
        assert got[step][1] == expected[step][1], f"curriculum phase differs at step {step}"
        assert got[step][0] == pytest.approx(expected[step][0], rel=1e-5, abs=1e-6), f"loss differs at step {step}"
    assert [s for s in range(1, MAX_STEPS + 1) if expected[s][1] == 1.0] == list(range(1, 11))

    # the exported (EMA) weights and the EMA shadow in the last checkpoint match too
    for name in ("model.safetensors", "checkpoint-16/ema.safetensors"):
        a, b = load_file(reference / name), load_file(crashed / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")


def test_ctrl_c_saves_a_complete_checkpoint_and_says_how_to_resume(tmp_path):
    """The first SIGINT finishes the step in flight, saves a complete checkpoint and exits 130 with one line naming
    it and the command to resume (no traceback); that command continues from it."""
    config, out = _config(tmp_path), tmp_path / "run"
    command = _cmd(config, out, "--max_steps", "100000", "--save_strategy", "no")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, env=_env(), cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=stderr,
                                text=True)
        deadline = time.monotonic() + 600
        for line in proc.stdout:  # wait until training is under way (a logged loss)
            if "'loss'" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        proc.stdout.read()
        proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text
    stopped = [line for line in text.splitlines() if "stopped at step" in line]
    assert len(stopped) == 1, text[-3000:]
    step = int(stopped[0].split("stopped at step ")[1].split()[0])
    checkpoint = out / f"checkpoint-{step}"
    assert f"checkpoint saved to {checkpoint}" in stopped[0] and checkpoint_problem(str(checkpoint)) is None
    assert stopped[0].rstrip().endswith("--resume_from_checkpoint last") and " train --variant duo" in stopped[0]

    resumed = subprocess.run(_cmd(config, out, "--max_steps", str(step + 2), "--save_strategy", "no",
                                  "--resume_from_checkpoint", "last"),
                             env=_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint}" in resumed.stderr
    assert (out / "model.safetensors").is_file()


def test_ctrl_c_in_quickstart_then_resume(tmp_path):
    out = tmp_path / "qs"
    base = [sys.executable, "-m", "trainers.cli", "quickstart", "--output_dir", str(out), "--seq_len", "32",
            "--batch_size", "4", "--num_samples", "1"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([*base, "--max_steps", "100000"], env=_env(), cwd=str(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        deadline = time.monotonic() + 300
        while "3/5 training" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # a few optimizer steps
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode == 130 and "Traceback" not in text, text[-3000:]
    stopped = next(line for line in text.splitlines() if "stopped at step" in line)
    assert stopped.rstrip().endswith("--resume")
    step = int(stopped.split("stopped at step ")[1].split()[0])
    resumed = subprocess.run([*base, "--max_steps", str(step + 2), "--resume"], env=_env(), cwd=str(tmp_path),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / f'checkpoint-{step}'}" in resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["nelbo"] > 0
