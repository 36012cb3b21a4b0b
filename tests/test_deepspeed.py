"""DeepSpeed ZeRO-2 through the Trainer on CPU (issue 19): the README's ZeRO-2 command, as written, on 2 gloo processes
(`accelerate launch`, deepspeed's CPU accelerator), resumed from its step-2 checkpoint, and the same command without
`--deepspeed` (DDP). deepspeed is a dev dependency: a missing package fails here, it does not skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_dlm import VARIANTS

from .conftest import free_port


REPO = Path(__file__).resolve().parents[1]


def readme_command(output_dir: Path, *extra: str, deepspeed: bool = True) -> list[str]:
    """The README's ZeRO-2 CPU command (section "FSDP2 and DeepSpeed") with `--output_dir` under tmp_path."""
    dlm = Path(sys.executable).with_name("dlm")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), str(dlm), "train",
               "--variant", "duo", "--size", "tiny", "--dataset", "builtin", "--seq_len", "32", "--max_steps", "4",
               "--per_device_train_batch_size", "4"]
    if deepspeed:
        command += ["--deepspeed", str(REPO / "examples" / "deepspeed_zero2.json")]
    return [*command, "--max_eval_samples", "8", "--save_steps", "2", "--logging_steps", "1", "--report_to", "none",
            "--disable_tqdm", "true", "--output_dir", str(output_dir), *extra]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=500, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def logged_losses(folder: Path) -> dict[int, float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_readme_deepspeed_zero2_command_trains_resumes_and_matches_ddp_on_cpu(tmp_path):
    import deepspeed  # noqa: F401  (a dev dependency: its absence is a failure)

    zero2 = run(readme_command(tmp_path / "zero2"), tmp_path)
    for step in (2, 4):  # DeepSpeed's own partitioned optimizer states, counted by the completion marker
        checkpoint = tmp_path / "zero2" / f"checkpoint-{step}"
        states = sorted(p.name for p in (checkpoint / f"global_step{step}").iterdir())
        assert states == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                          "zero_pp_rank_1_mp_rank_00_optim_states.pt"], states
        marker = json.loads((checkpoint / "dlm_checkpoint.json").read_text())
        assert {f"global_step{step}/{name}" for name in states} <= set(marker["files"])
    # the guard checks on the host, and says so once (not once per rank)
    assert zero2.stderr.count("DeepSpeedZeroOptimizer cannot skip a step on the device") == 1, zero2.stderr[-3000:]
    full = logged_losses(tmp_path / "zero2" / "checkpoint-4")
    assert sorted(full) == [1, 2, 3, 4] and len(set(full.values())) == 4

    # resume from the step-2 checkpoint in a fresh job: steps 3 and 4 come out the same
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    os.symlink(tmp_path / "zero2" / "checkpoint-2", resumed_dir / "checkpoint-2")
    run(readme_command(resumed_dir, "--resume_from_checkpoint", str(resumed_dir / "checkpoint-2")), tmp_path)
    resumed = logged_losses(resumed_dir / "checkpoint-4")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, resumed, full)

    # ZeRO-2 partitions optimizer state and gradients only: the losses equal DDP's from the same seed
    run(readme_command(tmp_path / "ddp", deepspeed=False), tmp_path)
    ddp = logged_losses(tmp_path / "ddp" / "checkpoint-4")
    for step in full:
        assert full[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-6), (step, full, ddp)

    model = VARIANTS["duo"][1].from_pretrained(tmp_path / "zero2")  # the final save is one ordinary checkpoint
    assert model.config.num_hidden_layers == 4 and json.loads(zero2.stdout.strip().splitlines()[-1])["eval_loss"] > 0


def test_replaid_refuses_deepspeed_with_a_clear_error(tmp_path):
    """DeepSpeed's engine broadcasts every parameter as bytes, which fails on RePlaid's 0-d gamma_0/gamma_1 deep inside
    `deepspeed.initialize`; RePlaidTrainer says so up front and names the engines that work."""
    import datasets
    import torch

    from trainers import TRAINERS, DiffusionTrainingArguments

    from .conftest import tiny_model

    args = DiffusionTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1,
                                      deepspeed=str(REPO / "examples" / "deepspeed_zero2.json"))
    dataset = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 60, (4, 7)).tolist()})
    with pytest.raises(ValueError, match=r"RePlaidTrainer does not support DeepSpeed: .*0-d parameters gamma_0.*"
                                         r"DDP or FSDP2"):
        TRAINERS["replaid"](model=tiny_model("replaid"), args=args, train_dataset=dataset)
    from accelerate.state import AcceleratorState

    assert AcceleratorState._shared_state.get("distributed_type") is None  # refused before accelerate was set up
