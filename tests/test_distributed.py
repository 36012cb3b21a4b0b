"""Several processes: a real 2-process DDP job on CPU (gloo), and the FSDP / DeepSpeed example configs that
`dlm train` takes on GPUs (parsed here; sharded training itself needs GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_dlm import VARIANTS
from trainers import DiffusionTrainingArguments

from .conftest import free_port, run_two_processes, tiny_model


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def ddp_reports(tmp_path_factory) -> list[dict]:
    return run_two_processes(REPO / "tests" / "distributed_train_script.py", tmp_path_factory.mktemp("ddp"))


def test_readme_accelerate_launch_starts_two_processes_on_cpu(tmp_path):
    """The README's command: `accelerate launch --multi_gpu --num_processes 2 dlm train ...` starts two processes on
    a CPU machine (accelerate's `--multi_gpu` is its torch.distributed launcher; `--cpu` would start one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    dlm = Path(sys.executable).with_name("dlm")
    port = free_port()  # the torchrun job beside it uses the default one
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(dlm), "train", "--variant",
               "duo", "--size", "tiny", "--dataset", "builtin", "--seq_len", "32", "--max_steps", "2",
               "--per_device_train_batch_size", "4",
               "--max_eval_samples", "8", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
               "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("2 processes on cpu, global batch 8") == 1, result.stderr[-4000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads(result.stdout.strip().splitlines()[-1])["epoch"] > 0


def test_ranks_end_with_identical_weights(ddp_reports):
    first, second = ddp_reports
    assert first["final_hash"] != first["initial_hash"]  # training moved the weights
    assert first["final_hash"] == second["final_hash"]
    # LoRA under DDP: the adapters agree across ranks, moved, and the frozen base did not move
    assert first["lora_adapter_hash"] == second["lora_adapter_hash"] != first["lora_initial_adapter_hash"]
    assert first["lora_base_unchanged"] and second["lora_base_unchanged"]


def test_ranks_see_disjoint_data(ddp_reports):
    for step in (1, 2, 3):
        rows = [tuple(row) for report in ddp_reports for rec in report["records"] if rec["step"] == step
                for row in rec["rows"]]
        assert len(rows) == 2 * 2 * 4 and len(set(rows)) == len(rows)  # world x accumulation x batch, no repeats


def test_logged_loss_is_the_mean_over_ranks(ddp_reports):
    logged = {h["step"]: h for h in ddp_reports[0]["log_history"] if "loss" in h}
    assert sorted(logged) == [1, 2, 3]
    for step, entry in logged.items():
        per_rank = [[rec["loss"] for rec in report["records"] if rec["step"] == step] for report in ddp_reports]
        assert [len(losses) for losses in per_rank] == [2, 2]  # two accumulation micro-batches per rank
        # each micro-batch's loss is its token mean scaled by its share of the step's tokens (here 1/4) times the 2
        # ranks that average gradients: a rank's two values sum to its share of the global token mean
        rank_sums = [sum(losses) for losses in per_rank]
        assert abs(rank_sums[0] - rank_sums[1]) > 1e-3  # the ranks' losses differ, so the check below can fail
        expected = sum(rank_sums) / 2
        assert entry["loss"] == pytest.approx(expected, rel=1e-5)
        assert entry["nelbo"] == pytest.approx(expected, abs=1e-4)  # loss components: averaged across ranks too
    # every rank logged the same (reduced) values
    assert [h for h in ddp_reports[1]["log_history"] if "loss" in h] == list(logged.values())


def test_antithetic_times_cover_the_global_batch_across_ranks(ddp_reports):
    eps = DiffusionTrainingArguments.__dataclass_fields__["sampling_eps"].default
    total = 2 * 2 * 4  # ranks x accumulation micro-batches x per-device batch
    for step in (1, 2, 3):
        per_rank = [torch.tensor([t for rec in report["records"] if rec["step"] == step for t in rec["t"]],
                                 dtype=torch.float64) for report in ddp_reports]
        assert not torch.equal(per_rank[0], per_rank[1])
        u = (torch.cat(per_rank) - eps) / (1 - eps)  # back to the unit interval
        strata = torch.floor(u * total).long()
        assert sorted(strata.tolist()) == list(range(total))  # exactly one t per stratum of the global batch
        offsets = u * total - strata  # one shared offset inside every stratum
        assert torch.allclose(offsets, offsets[0].expand_as(offsets), atol=1e-4)


# ---- FSDP and DeepSpeed: the example configs, parsed the way `dlm train` parses its flags ---------------------------
def train_parser():
    from trainers.cli import DataArguments, LoraArguments, ModelArguments, _hf_parser

    return _hf_parser(ModelArguments, DataArguments, LoraArguments, DiffusionTrainingArguments)


def test_fsdp_example_config_parses_and_wraps_the_dit_blocks(tmp_path):
    from accelerate.utils import FullyShardedDataParallelPlugin

    argv = ["--variant", "duo", "--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu",
            "--fsdp", "--fsdp_config", str(EXAMPLES / "fsdp_config.json")]
    _, _, _, args = train_parser().parse_args_into_dataclasses(argv)
    assert args.fsdp is True
    plugin_args = args.fsdp_plugin_args
    assert plugin_args["fsdp_version"] == 2 and plugin_args["transformer_cls_names_to_wrap"] == "DiTBlock"
    for variant, (_, model_class) in VARIANTS.items():
        assert model_class._no_split_modules == ["DiTBlock"]
        model = tiny_model(variant)
        plugin = FullyShardedDataParallelPlugin(**plugin_args)
        plugin.set_auto_wrap_policy(model)  # raises if no module class has the configured name
        wrapped = [name for name, module in model.named_modules() if plugin.auto_wrap_policy(module, False, 0)]
        assert wrapped == [f"backbone.blocks.{i}" for i in range(model.config.num_hidden_layers)], variant
    wrong = FullyShardedDataParallelPlugin(**{**plugin_args, "transformer_cls_names_to_wrap": "DuoBlock"})
    with pytest.raises(ValueError, match="DuoBlock"):
        wrong.set_auto_wrap_policy(tiny_model("duo"))


def test_deepspeed_example_config(tmp_path):
    """The ZeRO-2 example leaves every batch, clipping and precision value on "auto", so the TrainingArguments fill
    them in; `dlm train --deepspeed FILE` accepts the flag, and the filled config is checked (deepspeed is a dev
    dependency; tests/test_deepspeed.py runs the config)."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    path = EXAMPLES / "deepspeed_zero2.json"
    config = HfDeepSpeedConfig(str(path))
    assert config.is_zero2() and not config.is_zero3() and not config.is_offload()
    autos = {key for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                             "gradient_clipping", "bf16.enabled", "fp16.enabled") if config.get_value(key) == "auto"}
    assert len(autos) == 6
    argv = ["--variant", "duo", "--output_dir", str(tmp_path), "--report_to", "none", "--deepspeed", str(path),
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5"]
    namespace = train_parser().parse_args(argv)
    assert namespace.deepspeed == str(path) and namespace.per_device_train_batch_size == 8
    _, _, _, args = train_parser().parse_args_into_dataclasses(argv)
    filled = args.hf_deepspeed_config
    filled.trainer_config_finalize(args, tiny_model("duo"), num_training_steps=100)
    assert (filled.get_value("train_micro_batch_size_per_gpu"), filled.get_value("gradient_accumulation_steps"),
            filled.get_value("train_batch_size"), filled.get_value("gradient_clipping")) == (8, 2, 16, 0.5)
    assert filled.get_value("zero_optimization.reduce_bucket_size") == 32 * 32  # hidden_size^2 of the tiny model
    assert args.deepspeed_plugin.zero_stage == 2
