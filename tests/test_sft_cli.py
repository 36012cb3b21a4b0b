"""`dlm train --task sft`, `dlm eval --task sft`, `dlm generate --prompt/--chat`, LoRA and `dlm distill --task sft`,
as real subprocesses on the synthetic digit-mapping task with the real GPT-2 tokenizer (issue 17).

The MDLM run is the accuracy check: after 400 steps its answers to held-out prompts are several times better than
chance (0.1 per digit), against the same initial weights before fine-tuning. The other variants train a few steps
through the same commands (their accuracy at larger budgets is in bench/sft_task.py, recorded in bench/README.md)."""

from __future__ import annotations

import json

import datasets
import pytest
from transformers import set_seed

from trainers.checkpoints import build_model, load_model, load_tokenizer
from trainers.cli import _load_tokenizer
from trainers.data import digit_map_task
from trainers.evaluation import sft_accuracy

from .conftest import shared_data
from .test_cli import last_json, run_dlm


pytestmark = pytest.mark.slow
SEQ = 16
BODY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "cond_dim": 32,
        "max_position_embeddings": SEQ}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    datasets.Dataset.from_list(digit_map_task(3000, seed=1, min_digits=3, max_digits=3)).to_json(
        str(folder / "train.jsonl"))
    datasets.Dataset.from_list(digit_map_task(48, seed=2, min_digits=3, max_digits=3)).to_json(
        str(folder / "test.jsonl"))
    for variant in ("mdlm", "duo", "sddlm", "replaid"):
        (folder / f"{variant}.json").write_text(json.dumps({**BODY, **({"embedding_dim": 16}
                                                                        if variant == "replaid" else {})}))
    return folder


def sft_train(task, variant, steps, out, *extra):
    return run_dlm("train", "--variant", variant, "--config", str(task / f"{variant}.json"), "--task", "sft",
                   "--dataset", str(task / "train.jsonl"), "--tokenizer", str(shared_data("tokenizers", "gpt2")),
                   "--seq_len", str(SEQ), "--max_steps", str(steps), "--per_device_train_batch_size", "32",
                   "--learning_rate", "3e-3", "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "20",
                   "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
                   "--output_dir", str(out), *extra, timeout=900)


def test_mdlm_sft_through_the_cli_answers_far_above_chance(task, tmp_path):
    rows = [json.loads(line) for line in (task / "test.jsonl").read_text().splitlines()]
    tokenizer = _load_tokenizer(str(shared_data("tokenizers", "gpt2")), "mdlm")
    set_seed(0)  # the initial weights `dlm train --seed 0` starts from
    before = sft_accuracy(build_model("mdlm", tokenizer=tokenizer, seq_len=SEQ, **BODY), tokenizer, rows,
                          seq_len=SEQ, num_steps=16)
    # 1e-3, not the helper's 3e-3: at 3e-3 the run is on the edge of stability and whether it leaves the plateau at
    # chance within 400 steps depends on the data order (seed 0 stalled at 0.18 token accuracy after a dependency
    # update; 1e-3 reaches 0.82 with seed 0, and seed 1 at 3e-3 reaches 0.57)
    result = sft_train(task, "mdlm", 400, tmp_path / "mdlm", "--learning_rate", "1e-3")
    metrics = last_json(result.stdout)
    assert metrics["eval_tokens"] == 150 * (SEQ - 6)  # response tokens only: 150 held-out rows, 6 prompt tokens
    model = load_model(str(tmp_path / "mdlm"), "cpu")
    after = sft_accuracy(model, load_tokenizer(str(tmp_path / "mdlm"), model), rows, seq_len=SEQ, num_steps=16)
    assert before["token_accuracy"] <= 0.2 and before["exact_match"] == 0.0
    assert after["token_accuracy"] >= 0.35, after  # 3.5x chance at least (0.82 measured)
    assert after["exact_match"] >= 0.1, after  # chance: 0.001

    evaluated = last_json(run_dlm("eval", str(tmp_path / "mdlm"), "--task", "sft", "--dataset",
                                  str(task / "test.jsonl"), "--seq_len", str(SEQ)).stdout)
    assert evaluated["task"] == "sft" and evaluated["tokens"] == 48 * (SEQ - 6)
    assert 0 < evaluated["nelbo"] < metrics["eval_nelbo"] + 0.5
    generated = run_dlm("generate", str(tmp_path / "mdlm"), "--prompt", rows[0]["prompt"], "--max_new_tokens",
                        str(SEQ - 6), "--num_steps", "16", "--show_progress", "false").stdout
    text = generated.split("--- sample 0\n", 1)[1].strip()
    answer = text[len(rows[0]["prompt"]):].split()
    assert text.startswith(rows[0]["prompt"]) and 1 <= len(answer) <= 4, text  # the answer ends at its EOS
    chat = run_dlm("generate", str(tmp_path / "mdlm"), "--chat", "--prompt", "3 1 4", "--max_new_tokens", "4",
                   "--num_steps", "4", "--show_progress", "false").stdout
    assert "user: 3 1 4\nassistant: " in chat  # no chat template in GPT-2's tokenizer: the plain turns

    lora = sft_train(task, "mdlm", 10, tmp_path / "lora", "--init_from", str(tmp_path / "mdlm"), "--lora_r", "4",
                     "--merge_lora", "true")
    assert last_json(lora.stdout)["eval_tokens"] == 150 * (SEQ - 6)
    merged = load_model(str(tmp_path / "lora" / "merged"), "cpu")
    assert merged.config.model_type == "mdlm"


@pytest.mark.parametrize("variant", ["duo", "sddlm", "replaid"])
def test_every_variant_trains_and_evaluates_on_sft_rows(task, tmp_path, variant):
    metrics = last_json(sft_train(task, variant, 30, tmp_path / variant).stdout)
    assert metrics["eval_tokens"] == 150 * (SEQ - 6) and metrics["eval_nelbo"] > 0
    model = load_model(str(tmp_path / variant), "cpu")
    if variant == "replaid":
        assert model.config.given_latent == "clean"  # sampled the way it was trained
    if variant == "duo":  # DCD on the same rows, from the SFT checkpoint
        out = run_dlm("distill", "--teacher", str(tmp_path / variant), "--task", "sft", "--dataset",
                      str(task / "train.jsonl"), "--seq_len", str(SEQ), "--max_steps", "4",
                      "--distill_round_steps", "2", "--distill_num_steps", "64", "--report_to", "none",
                      "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "dcd"))
        assert last_json(out.stdout)["eval_tokens"] == 150 * (SEQ - 6)
