"""The `dlm` command, run as a real subprocess on real text with the real GPT-2 tokenizer."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from .conftest import shared_data


def run_dlm(*args: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "trainers.cli", *args], capture_output=True, text=True,
                            timeout=timeout, env=env)
    if check and result.returncode != 0:
        pytest.fail(f"dlm {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    text = shared_data("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:60_000]
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_console_script_and_help(tmp_path):
    exe = shutil.which("dlm", path=os.path.dirname(sys.executable)) or shutil.which("dlm")
    assert exe, "the `dlm` console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("quickstart", "train", "distill", "eval", "generate", "push"):
        assert command in out.stdout
    flags = {
        "train": ("--variant", "--size", "--config", "--dataset", "--dataset_config", "--tokenizer", "--seq_len",
                  "--max_steps", "--output_dir", "--learning_rate", "--ema_decay"),
        "eval": ("--dataset", "--seq_len", "--max_eval_samples", "--num_time_samples"),
        "generate": ("--num_steps", "--sampler", "--final_step", "--num_samples", "--prompt", "--top_p"),
        "push": ("model_dir", "repo_id"),
        "quickstart": ("--output_dir", "--max_steps"),
        "distill": ("--teacher", "--distill_round_steps", "--distill_num_steps", "--seq_len", "--max_steps"),
    }
    # the subcommands' help, in one process (each `--help` ends in SystemExit(0))
    script = ("import sys, trainers.cli as c\n"
              "for name in sys.argv[1:]:\n"
              "    print('=====', name)\n"
              "    try:\n"
              "        c.main([name, '--help'])\n"
              "    except SystemExit as e:\n"
              "        assert e.code in (0, None), e.code\n")
    out = subprocess.run([sys.executable, "-c", script, *flags], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DLM_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    sections = dict(part.split("\n", 1) for part in out.stdout.split("===== ")[1:])
    for command, expected in flags.items():
        for flag in expected:
            assert flag in sections[command], (command, flag)


HEAVY = ("datasets", "accelerate", "peft", "matplotlib", "evaluate", "lm_eval", "deepspeed")


def help_run(command: str, cache) -> tuple[str, list[str]]:
    """`dlm COMMAND --help` in a fresh interpreter: (its help text, the heavy libraries it imported)."""
    script = ("import sys\nfrom trainers.cli import main\ntry:\n    main(sys.argv[1:] + ['--help'])\n"
              "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
              f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", script, *command.split()], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "DLM_CACHE": str(cache), "COLUMNS": "100"})
    assert out.returncode == 0, out.stderr[-2000:]
    line = [row for row in out.stderr.splitlines() if row.startswith("HEAVY=")][-1]
    return out.stdout, [m for m in line[len("HEAVY="):].split(",") if m]


def test_help_imports_no_heavy_library_and_the_training_help_is_cached(tmp_path):
    """`dlm --help` and the commands' --help load none of datasets/accelerate/peft/...; `dlm train --help` needs
    TrainingArguments (which imports peft and accelerate) once, then prints the same text from $DLM_CACHE/help."""
    for command in ("", "eval", "generate", "quickstart", "push", "convert"):
        text, heavy = help_run(command, tmp_path)
        assert heavy == [], (command, heavy)
        assert "usage:" in text
    for command in ("train", "distill"):
        cold, heavy_cold = help_run(command, tmp_path)
        warm, heavy_warm = help_run(command, tmp_path)
        assert "peft" in heavy_cold and heavy_warm == [], (command, heavy_cold, heavy_warm)
        assert warm == cold and "--max_steps" in warm and "--learning_rate" in warm
    assert len(list((tmp_path / "help").glob("dlm-*.txt"))) == 2
    # another terminal width is another text, built by the real parser again
    wide = subprocess.run([sys.executable, "-m", "trainers.cli", "train", "--help"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DLM_CACHE": str(tmp_path), "COLUMNS": "200"})
    assert wide.returncode == 0 and len(list((tmp_path / "help").glob("dlm-train-*.txt"))) == 2


def test_train_eval_generate_roundtrip(tmp_path, text_file):
    out = tmp_path / "sddlm"
    gpt2 = str(shared_data("tokenizers", "gpt2"))
    result = run_dlm("train", "--variant", "sddlm", "--size", "tiny", "--dataset", str(text_file), "--tokenizer", gpt2,
                     "--seq_len", "32", "--max_steps", "6", "--per_device_train_batch_size", "4",
                     "--max_eval_samples", "8", "--output_dir", str(out), "--report_to", "none", "--use_cpu",
                     "--save_strategy", "no", "--disable_tqdm", "true")
    metrics = last_json(result.stdout)
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_nelbo"])
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "modeling_dlm.py",
                 "configuration_dlm.py", "scheduling_uniform.py"):
        assert (out / name).is_file(), name
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "SDDLMForDiffusionLM"
    assert model.config.vocab_size == len(tokenizer) == 50258
    assert type(model.generation_config).__name__ == "SDDLMGenerationConfig"

    result = run_dlm("eval", str(out), "--dataset", str(text_file), "--seq_len", "32", "--max_eval_samples", "8",
                     "--num_time_samples", "2")
    report = last_json(result.stdout)
    assert {"nelbo", "ppl_bound", "tokens"} <= set(report)
    assert report["tokens"] == 8 * 32
    assert report["ppl_bound"] == pytest.approx(math.exp(report["nelbo"]), rel=1e-6)
    assert 0 < report["nelbo"] < 2 * math.log(50258)
    assert report["split"] == "whole file" and report["rows"] == 8 and report["max_eval_samples"] == 8

    # a file given to eval is scored whole: every line, every token (the last, short block padded, not dropped)
    small = tmp_path / "small.txt"
    lines = text_file.read_text(encoding="utf-8").splitlines()[:40]
    small.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = last_json(run_dlm("eval", str(out), "--dataset", str(small), "--seq_len", "32").stdout)
    documents = [line for line in lines if line.strip()]
    text_tokens = sum(len(tokenizer(line, add_special_tokens=False)["input_ids"]) + 1 for line in documents)
    assert report["split"] == "whole file" and report["max_eval_samples"] is None
    assert (report["lines"], report["documents"], report["text_tokens"]) == (len(lines), len(documents), text_tokens)
    assert report["rows"] == report["rows_total"] == math.ceil(text_tokens / 30)
    assert report["tokens"] == text_tokens + 2 * report["rows"]  # every text token plus each row's BOS and EOS
    refused = run_dlm("eval", str(out), "--dataset", str(small), "--split", "validation", check=False)
    assert refused.returncode != 0 and "is scored whole" in refused.stderr

    result = run_dlm("generate", str(out), "--num_samples", "2", "--max_new_tokens", "12", "--num_steps", "4",
                     "--prompt", "ROMEO:", "--sampler", "greedy_tail", "--final_step", "noise_removal",
                     "--show_progress", "false")
    assert result.stdout.count("--- sample") == 2
    assert result.stdout.count("ROMEO:") == 2
    refused = run_dlm("generate", str(out), "--num_steps", "2", "--final_step", "last", check=False)
    assert refused.returncode == 2 and "final_step" in refused.stderr


def test_train_ar_baseline_and_eval(tmp_path, text_file):
    out = tmp_path / "ar"
    gpt2 = str(shared_data("tokenizers", "gpt2"))
    run_dlm("train", "--variant", "ar", "--size", "tiny", "--dataset", str(text_file), "--tokenizer", gpt2,
            "--seq_len", "32", "--max_steps", "4", "--per_device_train_batch_size", "4", "--max_eval_samples", "8",
            "--output_dir", str(out), "--report_to", "none", "--use_cpu", "--save_strategy", "no")
    report = last_json(run_dlm("eval", str(out), "--dataset", str(text_file), "--seq_len", "32",
                               "--max_eval_samples", "8").stdout)
    assert report["exact_nll"] is True and report["tokens"] == 8 * 31
    assert report["nelbo"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", "--variant", "gpt5"), "--variant must be one of"),
        (("train", "--variant", "duo", "--size", "huge"), "--size must be one of"),
        (("train", "--config", "/nonexistent.json"), "not found"),
        (("eval", "/nonexistent-dir"), "nonexistent"),
        (("push", "/nonexistent-dir", "me/repo"), "config.json is missing"),
        (("distill", "--teacher", "/nonexistent-teacher"), "nonexistent-teacher"),
        (("frobnicate",), "unknown command"),
        # a name that is no folder, offline (run_dlm sets HF_HUB_OFFLINE=1): one line at once, no Hub retries
        (("eval", "no_such_model"), "'no_such_model' is not a local folder, and HF_HUB_OFFLINE is set"),
        (("generate", "no_such_model"), "'no_such_model' is not a local folder, and HF_HUB_OFFLINE is set"),
        (("eval", "some_model", "--tokenizer", "gpt2"), "dlm eval always uses the checkpoint's own tokenizer"),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(args, message):
    result = run_dlm(*args, check=False, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if "no_such_model" in args:  # nothing but the error line: no retry warnings, no line printed twice
        assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]], result.stderr


def settings(stderr: str) -> dict[str, tuple[str, str]]:
    """The `settings` block that `dlm train` logs first: {name: (value, where it came from)}."""
    rows = {}
    for line in stderr.split("settings (where each comes from in brackets):", 1)[1].splitlines()[1:]:
        if not line.split("dlm:", 1)[-1].startswith("   "):
            break
        body = line.split("dlm:", 1)[1].strip()
        name, rest = body[:14].strip(), body[14:].strip()
        value, source = rest.rsplit("  [", 1)
        rows[name] = (value.strip(), source.rstrip("]"))
    return rows


def test_train_needs_a_tokenizer_for_a_dataset_and_checks_its_path_first(tmp_path, text_file):
    result = run_dlm("train", "--dataset", str(text_file), "--output_dir", str(tmp_path / "x"), check=False)
    assert result.returncode == 2
    assert f"--dataset {text_file} needs --tokenizer" in result.stderr and "'train'" in result.stderr
    assert "Builtin corpus" not in result.stderr and "Loading" not in result.stderr  # nothing was built
    for missing in (tmp_path / "nowhere" / "corpus.txt", tmp_path / "no_folder/"):
        result = run_dlm("train", "--dataset", f"{missing}/" if missing.suffix == "" else str(missing),
                         "--tokenizer", "builtin", check=False)
        assert result.returncode == 2 and "does not exist" in result.stderr, result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr  # one line: no corpus, no tokenizer built


def test_train_from_scratch_defaults_train_and_init_from_reuses_the_checkpoint(tmp_path, text_file):
    """No --learning_rate: the papers' 3e-4, constant after a warm-up of a tenth of a short run; `--tokenizer train`
    fits a BPE to the dataset. The loss falls within 30 steps. --init_from then takes the checkpoint's variant,
    tokenizer, sequence length and learning rate, and says so."""
    out = tmp_path / "scratch"
    result = run_dlm("train", "--dataset", str(text_file), "--tokenizer", "train",
                     "--tokenizer_vocab_size", "1024", "--seq_len", "64", "--max_steps", "30",
                     "--per_device_train_batch_size", "8", "--logging_steps", "5", "--max_eval_samples", "16",
                     "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
                     "--output_dir", str(out))
    rows = settings(result.stderr)
    assert rows["variant"] == ("duo", "default") and rows["model"] == ("hub_configs size tiny", "default")
    assert rows["learning rate"][0] == "0.0003" and rows["learning rate"][1].startswith("default for training")
    assert rows["lr schedule"] == ("constant_with_warmup", "default") and rows["warm-up"][0] == "3 steps"
    assert rows["tokenizer"] == ("train", "given") and rows["seq len"] == ("64", "given")
    # the settings come first: before the data, the tokenizer and the model are built
    assert result.stderr.index("settings (") < result.stderr.index("trained a byte-level BPE tokenizer of")
    # no log line twice (issue 21): fitting the tokenizer loads the dataset quietly, the training data logs it
    logged = [line[9:] for line in result.stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d \S+: ", line)]
    assert sorted({line for line in logged if logged.count(line) > 1}) == [], result.stderr[-3000:]
    # an untrained model's bound is about log V; 30 steps at the defaults take it well below (6.45 against 6.93 on
    # the 2-core machine; transformers' 5e-5 reaches 6.77)
    assert last_json(result.stdout)["eval_nelbo"] < math.log(1024) - 0.3, result.stdout[-500:]
    assert len(AutoTokenizer.from_pretrained(out)) == 1024
    record = json.loads((out / "dlm_training.json").read_text())
    assert record["learning_rate"] == 3e-4 and record["lr_scheduler_type"] == "constant_with_warmup"
    assert record["warmup_steps"] == 3 and record["tokenizer"] == "train" and record["tokenizer_vocab_size"] == 1024

    result = run_dlm("train", "--init_from", str(out), "--dataset", str(text_file), "--max_steps", "2",
                     "--per_device_train_batch_size", "4", "--max_eval_samples", "4", "--save_strategy", "no",
                     "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "tuned"))
    rows = settings(result.stderr)
    assert rows["variant"] == ("duo", f"from --init_from {out}")
    assert rows["tokenizer"] == (str(out), "the checkpoint's own")
    assert rows["seq len"] == ("64", f"from --init_from {out}")
    assert rows["learning rate"] == ("0.0003", f"from --init_from {out}/dlm_training.json")
    assert rows["warm-up"][0] == "1 step"


@pytest.mark.slow
def test_quickstart_runs_offline_and_saves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "qs"
    result = run_dlm("quickstart", "--output_dir", str(out), "--max_steps", "30", "--seq_len", "32",
                     "--num_samples", "2")
    summary = last_json(result.stdout)
    assert summary["nelbo"] < summary["nelbo_before"] <= summary["log_vocab"] + 0.5
    assert result.stdout.count("--- sample") == 2
    # issue 21, item 7: early on, how long the rest takes here, and what a shorter run would take
    eta = re.search(r"dlm: (\d+\.\d\d) s per step here: the remaining (\d+) steps and the final evaluation take "
                    r"about (.+?)\. --max_steps 10 would take about (.+?); Ctrl-C saves a checkpoint and "
                    r"`dlm quickstart --resume` continues it", result.stderr)
    assert eta, result.stderr[-3000:]
    assert float(eta.group(1)) > 0 and int(eta.group(2)) == 30 - 5  # logged at the end of step 5 (steps 2-5 timed)
    assert re.fullmatch(r"\d+ s|\d+ min \d\d s", eta.group(3)) and re.fullmatch(r"\d+ s|\d+ min \d\d s", eta.group(4))
    assert summary["python"] == platform.python_version() and re.fullmatch(r"[0-9a-f]{16}", summary["corpus"])
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "DuoForDiffusionLM"
    ids = model.generate(batch_size=1, max_new_tokens=8, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (1, 8)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sddlm", "mdlm"])
def test_cli_training_lowers_the_bound_well_below_log_v(variant, tmp_path, text_file):
    out = tmp_path / variant
    gpt2 = str(shared_data("tokenizers", "gpt2"))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": variant, "hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "cond_dim": 16, "hidden_dropout_prob": 0.0}))
    common = ("--dataset", str(text_file), "--seq_len", "32", "--max_eval_samples", "16")
    run_dlm("train", "--variant", variant, "--config", str(config), "--tokenizer", gpt2, *common, "--max_steps", "80",
            "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",
            "--output_dir", str(out), "--report_to", "none", "--use_cpu", "--save_strategy", "no",
            "--disable_tqdm", "true")
    after = last_json(run_dlm("eval", str(out), *common).stdout)["nelbo"]
    log_v = math.log(50258 + (variant == "mdlm"))  # an untrained dlm model predicts uniformly: its bound is ~log V
    assert after < log_v - 2.0, (variant, after, log_v)


def test_distill_a_duo_teacher_into_a_few_step_student(tmp_path, text_file):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    gpt2 = str(shared_data("tokenizers", "gpt2"))
    common = ("--dataset", str(text_file), "--seq_len", "32", "--max_eval_samples", "8", "--report_to", "none",
              "--use_cpu", "--save_strategy", "no", "--per_device_train_batch_size", "4")
    run_dlm("train", "--variant", "duo", "--size", "tiny", "--tokenizer", gpt2, "--max_steps", "3",
            "--output_dir", str(teacher), *common)
    metrics = last_json(run_dlm("distill", "--teacher", str(teacher), "--distill_round_steps", "2",
                                "--distill_num_steps", "8", "--max_steps", "4", "--output_dir", str(student),
                                *common).stdout)
    assert math.isfinite(metrics["eval_nelbo"])
    model = AutoModel.from_pretrained(student, trust_remote_code=True)
    assert type(model).__name__ == "DuoForDiffusionLM"
    assert model.generation_config.num_steps == 8 and model.generation_config.sampler == "greedy_tail"
    assert (student / "tokenizer.json").is_file()
    # few-step samples of the student, judged by an AR model trained on the same pipeline
    judge = tmp_path / "judge"
    run_dlm("train", "--variant", "ar", "--size", "tiny", "--tokenizer", gpt2, "--max_steps", "2",
            "--output_dir", str(judge), *common)
    report = last_json(run_dlm("eval", str(student), "--dataset", str(text_file), "--seq_len", "32",
                               "--max_eval_samples", "8", "--judge", str(judge), "--num_samples", "4",
                               "--gen_num_steps", "4").stdout)
    assert math.isfinite(report["gen_ppl"]) and report["gen_ppl"] > 1
    assert 0 < report["entropy"] <= math.log(32) + 1e-6
    assert report["gen_num_steps"] == 4 and report["sampler"] == "greedy_tail" and report["gen_num_samples"] == 4
    result = run_dlm("distill", "--teacher", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "x"),
                     check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
