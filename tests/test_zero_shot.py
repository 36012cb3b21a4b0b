"""`dlm eval DIR --suite zero-shot` (trainers/zero_shot.py, issue 20): the papers' zero-shot likelihood protocol,
offline on the corpora in ../shared/data, run as a user runs it (a subprocess), checked against the bound computed
here from blocks built by hand; the detokenisers; and the errors for empty, short and missing corpora."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from trainers.checkpoints import build_model, load_model, load_tokenizer
from trainers.data import builtin_tokenizer
from trainers.evaluation import evaluate_likelihood
from trainers.zero_shot import (
    CORPORA,
    lm1b_detokenize,
    ptb_detokenize,
    run_suite,
    wikitext_detokenize,
    wrap_blocks,
)

from .conftest import SHARED_DATA, shared_data


BLOCK = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zero_shot") / "duo"
    tokenizer = builtin_tokenizer(384)
    model = build_model("duo", tokenizer=tokenizer, seq_len=BLOCK, seed=0, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, cond_dim=16, hidden_dropout_prob=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "output_layer" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_dlm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(Path(sys.executable).with_name("dlm")), *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_the_suite_command_scores_wikitext2_offline_as_the_protocol_says(checkpoint, tmp_path):
    out = tmp_path / "zero_shot.json"
    result = run_dlm("eval", str(checkpoint), "--suite", "zero-shot", "--data_dir", str(SHARED_DATA), "--corpora",
                     "wikitext2,lambada", "--block_size", str(BLOCK), "--max_eval_samples", "24", "--batch_size", "8",
                     "--seed", "5", "--output_json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == report
    table = result.stdout.splitlines()
    assert table[0].split() == ["corpus", "split", "blocks", "tokens", "nelbo", "ppl", "bound"]
    assert table[1].startswith("wikitext2") and "(first 24 of" in table[1] and "PARTIAL" in table[3]
    settings = report["settings"]
    assert settings["max_eval_samples"] == 24 and settings["partial"] and settings["block_size"] == BLOCK
    assert settings["insert_eos"] is False and settings["group_rows"] == 1000 and settings["num_time_samples"] == 1
    assert len(settings["config_sha256"]) == 64 and settings["dlm_version"] and settings["model_type"] == "duo"
    wiki = report["rows"][0]
    assert (wiki["corpus"], wiki["split"], wiki["blocks"]) == ("wikitext2", "validation", 24)
    assert wiki["tokens"] == 24 * BLOCK
    assert wiki["sha256"] == "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"  # the README's hash

    # the same number from blocks built here: HF rows of wiki.valid.raw, detokenised, tokenised without specials,
    # groups of 1000 rows concatenated and cut into [BOS] 62 tokens [EOS], the first 24 blocks, the bound at seed 5
    model = load_model(str(checkpoint), "cpu")
    tokenizer = load_tokenizer(str(checkpoint), model)
    text = shared_data("wikitext-2-raw", "wiki.valid.raw").read_text(encoding="utf-8")
    rows = [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]
    encoded = tokenizer([wikitext_detokenize(row) for row in rows[:1000]], add_special_tokens=False)["input_ids"]
    stream = [t for ids in encoded for t in ids]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    blocks = [[bos, *stream[i:i + BLOCK - 2], eos] for i in range(0, 24 * (BLOCK - 2), BLOCK - 2)]
    expected = evaluate_likelihood(model, datasets.Dataset.from_dict({"input_ids": blocks}), batch_size=8, seed=5)
    assert wiki["nelbo"] == pytest.approx(expected["nelbo"], rel=1e-12)
    assert wiki["ppl_bound"] == pytest.approx(expected["ppl_bound"], rel=1e-12)
    assert report["rows"][1]["corpus"] == "lambada" and report["rows"][1]["nelbo"] != wiki["nelbo"]


def test_empty_short_and_missing_corpora_are_errors_that_name_them(checkpoint, tmp_path):
    model = load_model(str(checkpoint), "cpu")
    tokenizer = load_tokenizer(str(checkpoint), model)
    # a corpus too short for one block (duo#9's empty PTB at L = 1024): the first short PTB sentences
    short = tmp_path / "short"
    (short / "ptb").mkdir(parents=True)
    lines = shared_data("ptb", "ptb.test.txt").read_text(encoding="utf-8").splitlines()
    (short / "ptb" / "ptb.valid.txt").write_text("\n".join([line for line in lines if len(line) < 30][:3]) + "\n")
    with pytest.raises(ValueError, match=r"ptb: no block of 64 tokens \(3 rows"):
        run_suite(model, tokenizer, corpora=["ptb"], data_dir=str(short), block_size=BLOCK)
    # groups of 2 rows: blocks are cut, but much of the text falls into the remainders each group drops
    with pytest.raises(ValueError, match=r"ptb: the blocks cover .* < min_coverage 95%"):
        run_suite(model, tokenizer, corpora=["ptb"], data_dir=str(SHARED_DATA), splits={"ptb": "test"},
                  block_size=BLOCK, group_rows=2, min_coverage=0.95, max_eval_samples=1)
    with pytest.raises(ValueError, match=r"ptb: no local copy .*ptb\.valid\.txt"):  # the papers' split is not here
        run_suite(model, tokenizer, corpora=["ptb"], data_dir=str(SHARED_DATA), block_size=BLOCK)
    with pytest.raises(ValueError, match=r"unknown corpora \['wiki'\]"):
        run_suite(model, tokenizer, corpora=["wiki"], data_dir=str(SHARED_DATA))
    with pytest.raises(ValueError, match="block_size 65 exceeds the model's max_position_embeddings 64"):
        run_suite(model, tokenizer, corpora=["wikitext2"], data_dir=str(SHARED_DATA), block_size=65)
    result = run_dlm("eval", str(checkpoint), "--suite", "zero-shot", "--dataset", "some.txt")
    assert result.returncode == 2 and "--suite zero-shot reads its own corpora" in result.stderr
    result = run_dlm("eval", str(checkpoint), "--suite", "few-shot")
    assert result.returncode == 2 and "unknown --suite 'few-shot'" in result.stderr


def test_wrap_blocks_frames_and_drops_each_groups_remainder():
    encoded = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    blocks, total = wrap_blocks(encoded, 4, bos=0, eos=99, insert_eos=False, group_rows=2)
    assert total == 9 and blocks == [[0, 1, 2, 99], [0, 3, 4, 99], [0, 6, 7, 99], [0, 8, 9, 99]]  # 5 dropped
    blocks, total = wrap_blocks(encoded, 4, bos=0, eos=99, insert_eos=True, group_rows=None)
    assert total == 12 and blocks[0] == [0, 1, 2, 99] and blocks[1] == [0, 3, 99, 99] and len(blocks) == 6


def test_detokenisers_undo_each_corpus_tokenisation():
    assert wikitext_detokenize(" = = Career = = \n") == " == Career ==\n"
    assert wikitext_detokenize("in 1 @,@ 000 ( about 3 @.@ 5 % ) , the \" club \" said .") == \
        'in 1,000 (about 3.5 %), the "club" said .'
    assert ptb_detokenize(" he does n't pay $ N or N N <unk> \n next") == " he doesn't pay $1 or 1 1 ?\nnext"
    assert lm1b_detokenize("Visit http : / / example.com , he said .") == "Visit http://example.com, he said."
    assert lm1b_detokenize("It 's ( very ) good !") == "It's (very) good!"
    assert set(CORPORA) == {"ptb", "wikitext103", "wikitext2", "lm1b", "lambada", "ag_news", "pubmed", "arxiv"}
    assert (CORPORA["ptb"].hub, CORPORA["ptb"].split, CORPORA["ptb"].column) == ("ptb_text_only", "validation",
                                                                                 "sentence")
    assert (CORPORA["ag_news"].split, CORPORA["lm1b"].split, CORPORA["pubmed"].column) == ("test", "test", "article")


def test_dlm_eval_says_when_it_scores_a_distilled_student(checkpoint, tmp_path):
    model = load_model(str(checkpoint), "cpu")
    model.config.distillation = "dcd"  # what DuoDistillationTrainer writes
    model.save_pretrained(tmp_path / "student")
    load_tokenizer(str(checkpoint), model).save_pretrained(tmp_path / "student")
    result = run_dlm("eval", str(tmp_path / "student"), "--dataset", str(shared_data("ptb", "ptb.test.txt")),
                     "--seq_len", str(BLOCK), "--max_eval_samples", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "is a DCD-distilled (few-step) student: its bound is the ELBO of the distilled network" in result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["checkpoint_kind"] == "DCD-distilled few-step student"
