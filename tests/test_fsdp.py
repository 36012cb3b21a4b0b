"""FSDP2 through the Trainer on CPU (issue 19): a real 2-process gloo job started with `accelerate launch`
(`tests/fsdp_train_script.py`), for the MDLM, SDDLM, Duo (curriculum), DCD and RePlaid trainers with EMA on.

accelerate 1.16 enables the Trainer's FSDP settings only for accelerator device types; `DiffusionTrainer` turns such a
multi-process CPU job into FSDP2 (`create_accelerator_and_postprocess`). The job checks that the model really is
sharded (torch's `FSDP<Model>` class), that resuming from the sharded checkpoint continues the identical loss
trajectory, that the losses equal those of DDP from the same seed, and that the export is one ordinary checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_dlm import VARIANTS

from .conftest import free_port, run_two_processes


REPO = Path(__file__).resolve().parents[1]
CASES = ("mdlm", "sddlm", "duo-curriculum", "dcd", "replaid")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp")
    return out, run_two_processes(REPO / "tests" / "fsdp_train_script.py", out, launcher="accelerate")


@pytest.mark.parametrize("case", CASES)
def test_the_trainer_shards_with_fsdp2_on_cpu(fsdp_run, case):
    _, reports = fsdp_run
    for report in reports:
        runs = report[case]
        assert runs["fsdp"]["fsdp"] and runs["fsdp"]["wrapped"].startswith("FSDP"), runs["fsdp"]
        assert runs["ddp"]["wrapped"] == "DistributedDataParallel" and not runs["ddp"]["fsdp"]


@pytest.mark.parametrize("case", CASES)
def test_resume_from_the_sharded_checkpoint_continues_the_same_losses(fsdp_run, case):
    out, reports = fsdp_run
    checkpoint = out / case / "fsdp" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and not (checkpoint / "model.safetensors").exists()
    marker = json.loads((checkpoint / "dlm_checkpoint.json").read_text())
    assert any(name.startswith("pytorch_model_fsdp_0/") for name in marker["files"])  # the shards are counted
    for report in reports:
        full, resumed = report[case]["fsdp"]["losses"], report[case]["resume"]["losses"]
        assert sorted(full) == sorted(resumed) == ["1", "2", "3", "4"]
        for step in ("3", "4"):  # computed after the resume
            assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (case, step)


@pytest.mark.parametrize("case", CASES)
def test_fsdp_losses_equal_ddp_losses_from_the_same_seed(fsdp_run, case):
    _, reports = fsdp_run
    for report in reports:
        fsdp, ddp = report[case]["fsdp"]["losses"], report[case]["ddp"]["losses"]
        assert len(set(fsdp.values())) == 4  # the losses move, so equality can fail
        for step in fsdp:
            assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-6), (case, step, fsdp, ddp)


@pytest.mark.parametrize("case", CASES)
def test_the_export_is_one_ordinary_checkpoint_with_the_ema_weights(fsdp_run, case):
    out, _ = fsdp_run
    export = out / case / "fsdp" / "export"
    config = json.loads((export / "config.json").read_text())
    model_class = VARIANTS[config["model_type"]][1]
    assert config["auto_map"]["AutoModel"] == f"modeling_dlm.{model_class.__name__}"
    assert not list(export.glob("_fsdp*.py"))  # torch's FSDP class must not ship as the model code
    model = model_class.from_pretrained(export)
    weights = load_file(export / "model.safetensors")
    assert set(weights) == set(model.state_dict()) and all(torch.isfinite(w).all() for w in weights.values())
    ema = load_file(out / case / "fsdp" / "checkpoint-4" / "ema.safetensors")
    for name, value in ema.items():  # full tensors, not rank 0's shard; exported = the EMA weights
        assert value.shape == weights[name].shape, name
        assert torch.allclose(value, weights[name].float(), atol=1e-6), name


def test_readme_fsdp_command_runs_on_cpu(tmp_path):
    """The README's FSDP2 command, as written (with `--output_dir` under tmp_path): sharded checkpoints and one
    ordinary export, the FSDP2 switch logged once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    dlm = Path(sys.executable).with_name("dlm")
    port = free_port()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(dlm), "train", "--variant",
               "duo", "--size", "tiny", "--dataset", "builtin", "--seq_len", "32", "--max_steps", "4",
               "--per_device_train_batch_size", "4", "--fsdp", "--fsdp_config", str(REPO / "examples" /
                                                                                   "fsdp_config.json"),
               "--max_eval_samples", "8", "--save_steps", "2", "--logging_steps", "2", "--report_to", "none",
               "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("FSDP2 on 2 CPU processes (gloo), wrapping DiTBlock") == 1, result.stderr[-3000:]
    for step in (2, 4):
        assert (tmp_path / "out" / f"checkpoint-{step}" / "pytorch_model_fsdp_0").is_dir()
    model = VARIANTS["duo"][1].from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 4 and json.loads(result.stdout.strip().splitlines()[-1])["eval_loss"] > 0



def test_replaid_keeps_its_schedule_and_embeddings_whole_and_the_export_keeps_their_shapes(fsdp_run):
    """RePlaid's learned schedule (0-d gamma_0, gamma_1, which fully_shard cannot shard) and its embedding table stay
    whole on each rank; the export keeps the ordinary (0-d) shapes, so it loads like any RePlaid checkpoint."""
    out, reports = fsdp_run
    export = load_file(out / "replaid" / "fsdp" / "export" / "model.safetensors")
    assert export["noise_schedule.gamma_0"].shape == () and export["noise_schedule.gamma_1"].shape == ()
    for report in reports:
        assert all(report[case]["fsdp"]["replicated"] == [] for case in CASES if case != "replaid")  # all sharded
        assert report["replaid"]["fsdp"]["replicated"] == ["embed_tokens.weight", "noise_schedule.W1_raw",
                                                   "noise_schedule.W2_raw", "noise_schedule.b1",
                                                   "noise_schedule.gamma_0", "noise_schedule.gamma_1"]
    # both ranks hold the same replicated values after training (their gradients were averaged)
    assert reports[0]["replaid"]["fsdp"]["replicated_sums"] == reports[1]["replaid"]["fsdp"]["replicated_sums"]
