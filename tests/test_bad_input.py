"""Bad input fails clearly everywhere (issue 7).

One table of cases: each does one bad thing through a public entry point (a config, `forward`, `nelbo`, `generate`,
`from_pretrained`, the training arguments, a Trainer, the data pipeline, or the `dlm` command) and names the exception
type and a regex its message must match; the regex holds the bad value and, where there is one, the allowed range.
Library cases must raise exactly a ValueError/TypeError/OSError family error (never torch's IndexError/RuntimeError);
CLI cases run `trainers.cli.main` in-process and must return 2 with exactly one stderr line, `dlm ...: error: ...`,
and no traceback.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

from modeling_dlm import SDDLMConfig
from trainers import TRAINERS, DiffusionTrainingArguments, cli
from trainers.data import build_datasets

from .conftest import VOCAB, tiny_config, tiny_model


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

MAX_POS = 16  # tiny_config's max_position_embeddings


def word_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of exactly `size` tokens: "<|endoftext|>" (bos/eos/unk), "[PAD]", then w0, w1, ..."""
    vocab = {"<|endoftext|>": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(size - 2)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="[PAD]")
    assert len(tokenizer) == size
    return tokenizer


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    """Tiny models, checkpoints (good, corrupt, without config, with a mismatched tokenizer) and data files."""
    root = tmp_path_factory.mktemp("bad_input")
    tokenizer, small_tokenizer = word_tokenizer(VOCAB), word_tokenizer(50)
    e = SimpleNamespace(root=root, models={v: tiny_model(v) for v in ("sddlm", "duo", "mdlm", "replaid")})
    e.ids = torch.randint(0, VOCAB - 1, (2, 5), generator=torch.Generator().manual_seed(0))
    e.tok_dir, e.small_tok_dir = root / "tok", root / "tok50"
    tokenizer.save_pretrained(e.tok_dir)
    small_tokenizer.save_pretrained(e.small_tok_dir)

    def checkpoint(name, model, tok):
        path = root / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        return path

    e.ckpt = checkpoint("duo", e.models["duo"], tokenizer)
    e.sddlm_ckpt = checkpoint("sddlm", e.models["sddlm"], tokenizer)
    e.mismatched = checkpoint("duo-tok50", e.models["duo"], small_tokenizer)
    e.corrupt = root / "corrupt"
    shutil.copytree(e.ckpt, e.corrupt)
    weights = e.corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    e.no_config = root / "no-config"
    shutil.copytree(e.ckpt, e.no_config)
    (e.no_config / "config.json").unlink()
    e.missing = root / "does-not-exist"

    e.empty_txt = root / "empty.txt"
    e.empty_txt.write_text("")
    e.no_text_jsonl = root / "no_text.jsonl"
    e.no_text_jsonl.write_text("\n".join(json.dumps({"body": "w1 w2 w3"}) for _ in range(6)) + "\n")
    e.short_txt = root / "short.txt"
    e.short_txt.write_text("w1 w2\nw3 w4\nw5\n")
    e.saved_empty = root / "saved-empty"
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(e.saved_empty))
    e.tokenizer = tokenizer
    return e


def args(tmp, **overrides) -> DiffusionTrainingArguments:
    kwargs = dict(output_dir=str(tmp / "out"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                  save_strategy="no", use_cpu=True, disable_tqdm=True)
    kwargs.update(overrides)
    return DiffusionTrainingArguments(**kwargs)


def train_on(e, variant: str, dataset, **overrides):
    model = tiny_model(variant).train()
    TRAINERS[variant](model=model, args=args(e.root, **overrides), train_dataset=dataset).train()


def llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def with_id(ids: torch.Tensor, value: int) -> torch.Tensor:
    ids = ids.clone()
    ids[1, 2] = value
    return ids


def gen(e, variant="duo", prompt=None, **kwargs):
    kwargs = {"max_new_tokens": 3, "num_steps": 2, **kwargs}
    return e.models[variant].generate(input_ids=e.ids if prompt is None else prompt, **kwargs)


@dataclass
class Case:
    id: str
    error: type[BaseException] | None  # None: a CLI case (return code 2, one stderr line)
    match: str
    call: Callable[[Any], Any]


C = Case
CASES = [
    # ---- configs --------------------------------------------------------------------------------------------------
    C("config-vocab-zero", ValueError, r"`vocab_size` must be a positive integer, got 0",
      lambda e: tiny_config("sddlm", vocab_size=0)),
    C("config-vocab-string", ValueError, r"`vocab_size` must be a positive integer, got '61'",
      lambda e: tiny_config("mdlm", vocab_size="61")),
    C("config-hidden-negative", ValueError, r"`hidden_size` must be a positive integer, got -32",
      lambda e: tiny_config("duo", hidden_size=-32)),
    C("config-layers-zero", ValueError, r"`num_hidden_layers` must be a positive integer, got 0",
      lambda e: tiny_config("mdlm", num_hidden_layers=0)),
    C("config-max-positions-zero", ValueError, r"`max_position_embeddings` must be a positive integer, got 0",
      lambda e: tiny_config("sddlm", max_position_embeddings=0)),
    C("config-hidden-not-divisible-by-heads", ValueError,
      r"`hidden_size` \(30\) must be divisible by `num_attention_heads` \(4\)",
      lambda e: tiny_config("replaid", hidden_size=30)),
    C("config-unknown-noise-schedule", ValueError,
      r"`noise_schedule` must be one of \('loglinear', 'cosine'\), got 'linear'",
      lambda e: tiny_config("duo", noise_schedule="linear")),
    C("config-sddlm-unknown-loss-mask", ValueError, r"`loss_mask` must be 'changed' or 'resampled', got 'all'",
      lambda e: tiny_config("sddlm", loss_mask="all")),
    C("config-sddlm-unknown-regularizer", ValueError,
      r"`regularizer` must be 'hinge', 'mean', 'sampled' or 'none', got 'l2'",
      lambda e: tiny_config("sddlm", regularizer="l2")),
    C("config-sddlm-negative-samples-zero", ValueError, r"`num_negative_samples` must be a positive integer, got 0",
      lambda e: tiny_config("sddlm", num_negative_samples=0)),
    C("config-mdlm-mask-id-too-large", ValueError, r"`mask_token_id` must be None or in \[0, vocab_size=61\), got 61",
      lambda e: tiny_config("mdlm", mask_token_id=VOCAB)),
    C("config-mdlm-mask-id-negative", ValueError, r"`mask_token_id` must be None or in \[0, vocab_size=61\), got -1",
      lambda e: tiny_config("mdlm", mask_token_id=-1)),
    C("config-pad-id-too-large", ValueError, r"`pad_token_id` must be None or in \[0, vocab_size=61\), got 99",
      lambda e: tiny_config("duo", pad_token_id=99)),
    C("config-duo-gamma-min-not-below-max", ValueError,
      r"`gamma_min` \(-1\.0\) must be smaller than `gamma_max` \(-2\.0\)",
      lambda e: tiny_config("duo", gamma_min=-1.0, gamma_max=-2.0)),
    C("config-replaid-gamma-0-not-below-gamma-1", ValueError,
      r"`gamma_0` \(6\.0\) must be smaller than `gamma_1` \(-3\.0\)",
      lambda e: tiny_config("replaid", gamma_0=6.0, gamma_1=-3.0)),
    C("config-dropout-one", ValueError, r"`hidden_dropout_prob` must be in \[0, 1\), got 1\.0",
      lambda e: tiny_config("sddlm", hidden_dropout_prob=1.0)),
    C("config-attention-dropout-negative", ValueError, r"`attention_dropout` must be in \[0, 1\), got -0\.1",
      lambda e: tiny_config("duo", attention_dropout=-0.1)),
    C("config-dropout-string", ValueError, r"`hidden_dropout_prob` must be a number, got '0\.1'",
      lambda e: tiny_config("duo", hidden_dropout_prob="0.1")),
    C("config-schedule-eps-zero", ValueError, r"`schedule_eps` must be in \(0, 1\), got 0\.0",
      lambda e: tiny_config("mdlm", schedule_eps=0.0)),
    C("config-replaid-embedding-dim-zero", ValueError, r"`embedding_dim` must be a positive integer, got 0",
      lambda e: tiny_config("replaid", embedding_dim=0)),
    C("config-replaid-unknown-time-input", ValueError, r"`time_input` must be 'gamma' or 't', got 'sigma'",
      lambda e: tiny_config("replaid", time_input="sigma")),
    C("config-duo-without-time-conditioning", ValueError, r"`time_conditioning=False` is not allowed for Duo",
      lambda e: tiny_config("duo", time_conditioning=False)),
    # ---- forward --------------------------------------------------------------------------------------------------
    C("forward-id-equal-to-vocab", ValueError, r"token ids outside \[0, 61\): min \d+, max 61",
      lambda e: e.models["duo"](input_ids=with_id(e.ids, VOCAB))),
    C("forward-negative-id", ValueError, r"token ids outside \[0, 61\): min -1",
      lambda e: e.models["mdlm"](input_ids=with_id(e.ids, -1))),
    C("forward-replaid-id-too-large", ValueError, r"token ids outside \[0, 61\): min \d+, max 500",
      lambda e: e.models["replaid"](input_ids=with_id(e.ids, 500))),
    C("forward-float-ids", TypeError, r"`input_ids` must hold integer token ids, got dtype torch\.float32",
      lambda e: e.models["sddlm"](input_ids=e.ids.float())),
    C("forward-1d-ids", ValueError, r"`input_ids` must be a 2-D tensor \(batch, seq_len\), got shape \(5,\)",
      lambda e: e.models["sddlm"](input_ids=e.ids[0])),
    C("forward-mask-wrong-shape", ValueError, r"`attention_mask` must have shape \(2, 5\), got \(2, 4\)",
      lambda e: e.models["duo"](input_ids=e.ids, attention_mask=torch.ones(2, 4))),
    C("forward-too-long", ValueError, r"sequence length 17 exceeds max_position_embeddings=16",
      lambda e: e.models["sddlm"](input_ids=torch.zeros(1, MAX_POS + 1, dtype=torch.long))),
    C("forward-empty-sequence", ValueError, r"at least one token, got shape \(2, 0\)",
      lambda e: e.models["duo"](input_ids=torch.zeros(2, 0, dtype=torch.long))),
    C("forward-sigma-wrong-shape", ValueError, r"`sigma` must have shape \(2,\), got \(3,\)",
      lambda e: e.models["duo"](input_ids=e.ids, sigma=torch.zeros(3))),
    # ---- nelbo ----------------------------------------------------------------------------------------------------
    C("nelbo-id-too-large", ValueError, r"token ids outside \[0, 61\): min \d+, max 61",
      lambda e: e.models["sddlm"].nelbo(with_id(e.ids, VOCAB))),
    C("nelbo-replaid-negative-id", ValueError, r"token ids outside \[0, 61\): min -7",
      lambda e: e.models["replaid"].nelbo(with_id(e.ids, -7))),
    C("nelbo-float-ids", TypeError, r"integer token ids, got dtype torch\.float64",
      lambda e: e.models["mdlm"].nelbo(e.ids.double())),
    C("nelbo-num-time-samples-zero", ValueError, r"`num_time_samples` must be a positive integer, got 0",
      lambda e: e.models["duo"].nelbo(e.ids, num_time_samples=0)),
    C("nelbo-num-time-samples-float", ValueError, r"`num_time_samples` must be a positive integer, got 2\.5",
      lambda e: e.models["replaid"].nelbo(e.ids, num_time_samples=2.5)),
    C("nelbo-mask-wrong-shape", ValueError, r"`attention_mask` must have shape \(2, 5\), got \(2, 6\)",
      lambda e: e.models["mdlm"].nelbo(e.ids, attention_mask=torch.ones(2, 6))),
    C("nelbo-generator-not-a-generator", TypeError, r"`generator` must be a torch\.Generator, got int",
      lambda e: e.models["duo"].nelbo(e.ids, generator=3)),
    C("nelbo-mdlm-mask-token-in-clean-ids", ValueError, r"mask token id 60",
      lambda e: e.models["mdlm"].nelbo(with_id(e.ids, VOCAB - 1))),
    C("nelbo-empty-batch", ValueError, r"got shape \(0, 5\)",
      lambda e: e.models["sddlm"].nelbo(torch.zeros(0, 5, dtype=torch.long))),
    C("nelbo-too-long", ValueError, r"sequence length 20 exceeds max_position_embeddings=16",
      lambda e: e.models["replaid"].nelbo(torch.zeros(1, 20, dtype=torch.long))),
    # ---- generate -------------------------------------------------------------------------------------------------
    C("generate-prompt-id-too-large", ValueError, r"token ids outside \[0, 61\): min \d+, max 61",
      lambda e: gen(e, prompt=with_id(e.ids, VOCAB))),
    C("generate-replaid-prompt-negative-id", ValueError, r"token ids outside \[0, 61\): min -1",
      lambda e: gen(e, "replaid", prompt=with_id(e.ids, -1))),
    C("generate-float-prompt", TypeError, r"integer token ids, got dtype torch\.float32",
      lambda e: gen(e, "mdlm", prompt=e.ids.float())),
    C("generate-mask-wrong-shape", ValueError,
      r"`attention_mask` must have the shape of input_ids \(2, 5\), got \(2, 3\)",
      lambda e: gen(e, attention_mask=torch.ones(2, 3))),
    C("generate-canvas-too-long", ValueError,
      r"prompt length 5 \+ max_new_tokens 12 = 17 exceeds the model's max_position_embeddings=16",
      lambda e: gen(e, "sddlm", max_new_tokens=12)),
    C("generate-num-steps-zero", ValueError, r"`num_steps` must be an integer >= 1, got 0",
      lambda e: gen(e, num_steps=0)),
    C("generate-unknown-sampler", ValueError,
      r"`sampler` must be one of \('ancestral', 'greedy_tail', 'entropy_bound'\), got 'beam'",
      lambda e: gen(e, sampler="beam")),
    C("generate-bad-entropy-bound", ValueError, r"`entropy_bound` must be a finite number of nats > 0, got 0",
      lambda e: gen(e, sampler="entropy_bound", entropy_bound=0)),
    C("generate-bad-block-size", ValueError, r"`block_size` must be None \(off\) or an integer >= 1, got -4",
      lambda e: gen(e, block_size=-4)),
    C("generate-replaid-sampler", ValueError, r"`sampler` must be one of \('ancestral', 'ddim'\), got 'greedy_tail'",
      lambda e: gen(e, "replaid", sampler="greedy_tail")),
    C("generate-top-p-above-one", ValueError, r"`top_p` must be a number in \(0, 1\], got 1\.5",
      lambda e: gen(e, top_p=1.5)),
    C("generate-top-p-zero", ValueError, r"`top_p` must be a number in \(0, 1\], got 0",
      lambda e: gen(e, "mdlm", top_p=0)),
    C("generate-temperature-zero", ValueError, r"`temperature` must be a number > 0, got 0\.0",
      lambda e: gen(e, temperature=0.0)),
    C("generate-temperature-string", ValueError, r"`temperature` must be a number > 0, got 'hot'",
      lambda e: gen(e, "sddlm", temperature="hot")),
    C("generate-top-k-negative", ValueError, r"`top_k` must be a non-negative integer .*, got -1",
      lambda e: gen(e, top_k=-1)),
    C("generate-top-k-float", ValueError, r"`top_k` must be a non-negative integer .*, got 2\.5",
      lambda e: gen(e, "replaid", top_k=2.5)),
    C("generate-max-new-tokens-negative", ValueError, r"`max_new_tokens` must be a non-negative integer, got -2",
      lambda e: gen(e, max_new_tokens=-2)),
    C("generate-infill-mask-wrong-shape", ValueError,
      r"`infill_mask` must be a bool tensor of shape \(2, 5\), got torch\.bool \(2, 4\)",
      lambda e: gen(e, max_new_tokens=None, infill_mask=torch.ones(2, 4, dtype=torch.bool))),
    C("generate-infill-mask-not-bool", ValueError, r"`infill_mask` must be a bool tensor .*got torch\.int64",
      lambda e: gen(e, "mdlm", max_new_tokens=None, infill_mask=torch.ones(2, 5, dtype=torch.long))),
    C("generate-batch-size-zero", ValueError, r"`batch_size` must be a positive integer, got 0",
      lambda e: e.models["duo"].generate(batch_size=0, max_new_tokens=3, num_steps=2)),
    C("generate-unconditional-without-length", ValueError, r"needs `max_new_tokens` >= 1, got None",
      lambda e: e.models["duo"].generate(batch_size=2, num_steps=2)),
    C("generate-config-not-a-config", TypeError, r"`generation_config` must be a GenerationConfig, got dict",
      lambda e: gen(e, generation_config={"num_steps": 2})),
    C("generate-unknown-kwarg", TypeError, r"unexpected keyword arguments: \['beams'\]", lambda e: gen(e, beams=4)),
    C("generate-replaid-score-temperature", ValueError, r"`score_temperature` must be a number > 0, got -1",
      lambda e: gen(e, "replaid", score_temperature=-1)),
    # ---- loading checkpoints --------------------------------------------------------------------------------------
    C("from-pretrained-missing-dir", OSError, r"does-not-exist",
      lambda e: AutoModel.from_pretrained(str(e.missing), trust_remote_code=True)),
    C("from-pretrained-no-config", ValueError, r"no-config.*config\.json",
      lambda e: AutoModel.from_pretrained(str(e.no_config), trust_remote_code=True)),
    C("from-pretrained-corrupt-safetensors", OSError, r"corrupt.* cannot be read: .*truncated or corrupt",
      lambda e: AutoModel.from_pretrained(str(e.corrupt), trust_remote_code=True)),
    # ---- training arguments ---------------------------------------------------------------------------------------
    C("args-sampling-eps-one", ValueError, r"`sampling_eps` must be in \[0, 1\), got 1\.0",
      lambda e: args(e.root, sampling_eps=1.0)),
    C("args-sampling-eps-negative", ValueError, r"`sampling_eps` must be in \[0, 1\), got -0\.1",
      lambda e: args(e.root, sampling_eps=-0.1)),
    C("args-sampling-eps-string", TypeError, r"`sampling_eps` must be a number, got '1e-3'",
      lambda e: args(e.root, sampling_eps="1e-3")),
    C("args-ema-decay-one", ValueError, r"`ema_decay` must be in \[0, 1\), got 1\.0",
      lambda e: args(e.root, ema_decay=1.0)),
    C("args-distill-num-steps-zero", ValueError, r"`distill_num_steps` must be >= 1, got 10000 and 0",
      lambda e: args(e.root, distill_num_steps=0)),
    C("args-distill-gamma-order", ValueError, r"`distill_gamma_min` \(0\.0\) must be smaller than `distill_gamma_max`"
      r" \(-1\.0\)", lambda e: args(e.root, distill_gamma_min=0.0)),
    C("args-distill-divergence", ValueError, r"`distill_divergence` must be 'kl-bwd' or 'kl-fwd', got 'js'",
      lambda e: args(e.root, distill_divergence="js")),
    C("args-curriculum-steps-negative", ValueError, r"`curriculum_steps` must be >= 0, got -1",
      lambda e: args(e.root, curriculum_steps=-1)),
    C("args-curriculum-tau-zero", ValueError, r"`curriculum_tau` must be > 0, got 0\.0",
      lambda e: args(e.root, curriculum_tau=0.0)),
    C("args-curriculum-top-k-negative", ValueError, r"`curriculum_top_k` must be >= 0, got -3",
      lambda e: args(e.root, curriculum_top_k=-3)),
    C("args-curriculum-top-k-float", TypeError, r"`curriculum_top_k` must be an integer, got 2\.5",
      lambda e: args(e.root, curriculum_top_k=2.5)),
    C("args-eval-time-samples-zero", ValueError, r"`eval_num_time_samples` must be >= 1, got 0",
      lambda e: args(e.root, eval_num_time_samples=0)),
    # ---- trainers -------------------------------------------------------------------------------------------------
    C("trainer-non-dlm-model", TypeError, r"DuoTrainer needs a dlm diffusion model, got LlamaForCausalLM",
      lambda e: TRAINERS["duo"](model=llama(), args=args(e.root))),
    C("trainer-plain-training-arguments", TypeError,
      r"SDDLMTrainer needs `args` of type DiffusionTrainingArguments, got TrainingArguments",
      lambda e: TRAINERS["sddlm"](model=tiny_model("sddlm"), args=TrainingArguments(
          output_dir=str(e.root / "plain"), report_to=[], use_cpu=True))),
    C("trainer-raw-text-dataset", ValueError, r"train_dataset has no `input_ids` column \(columns: \['text'\]\)",
      lambda e: TRAINERS["mdlm"](model=tiny_model("mdlm"), args=args(e.root),
                                 train_dataset=datasets.Dataset.from_dict({"text": ["w1 w2"] * 4}))),
    C("trainer-empty-dataset", ValueError, r"train_dataset is empty \(0 rows\)",
      lambda e: TRAINERS["duo"](model=tiny_model("duo"), args=args(e.root),
                                train_dataset=datasets.Dataset.from_dict({"input_ids": []}))),
    C("trainer-replaid-ids-outside-vocab", ValueError, r"token ids outside \[0, 61\): min \d+, max 75",
      lambda e: train_on(e, "replaid", datasets.Dataset.from_dict({"input_ids": [[3, 4, 75, 5]] * 4}))),
    C("trainer-duo-ids-outside-vocab", ValueError, r"token ids outside \[0, 61\): min -2",
      lambda e: train_on(e, "duo", datasets.Dataset.from_dict({"input_ids": [[3, -2, 4, 5]] * 4}))),
    # ---- data pipeline --------------------------------------------------------------------------------------------
    C("data-empty-file", ValueError, r"The data files at '.*empty\.txt' are all empty",
      lambda e: build_datasets(str(e.empty_txt), e.tokenizer, 8)),
    C("data-no-text-column", ValueError, r"no text column 'text'; available columns: \['body'\]",
      lambda e: build_datasets(str(e.no_text_jsonl), e.tokenizer, 8)),
    C("data-saved-empty-dataset", ValueError, r"saved dataset at '.*saved-empty' is empty",
      lambda e: build_datasets(str(e.saved_empty), e.tokenizer, 8)),
    C("data-missing-path", ValueError, r"Local dataset path '.*nowhere\.txt' does not exist",
      lambda e: build_datasets(str(e.root / "nowhere.txt"), e.tokenizer, 8)),
    C("data-seq-len-too-small", ValueError, r"seq_len must be an int >= 3 for mode 'wrap', got 2",
      lambda e: build_datasets(str(e.short_txt), e.tokenizer, 2)),
    C("data-unknown-mode", ValueError, r"mode must be one of \('wrap', 'pad'\), got 'chunk'",
      lambda e: build_datasets(str(e.short_txt), e.tokenizer, 8, mode="chunk")),
    C("data-text-shorter-than-a-block", ValueError, r"produced no training examples with seq_len=64",
      lambda e: build_datasets(str(e.short_txt), e.tokenizer, 64)),
    # ---- the dlm command: return code 2, one stderr line ----------------------------------------------------------
    C("cli-unknown-command", None, r"^dlm: error: unknown command 'frobnicate'; choose from quickstart, train",
      lambda e: ["frobnicate"]),
    C("cli-unknown-variant", None, r"^dlm train: error: --variant must be one of \(.*'ar'\), got 'gpt5'",
      lambda e: ["train", "--variant", "gpt5"]),
    C("cli-bad-size", None, r"^dlm train: error: --size must be one of \('tiny', 'small', 'medium'\), got 'huge'",
      lambda e: ["train", "--variant", "duo", "--size", "huge", "--tokenizer", str(e.tok_dir)]),
    C("cli-distill-without-teacher", None, r"^dlm distill: error: the following arguments are required: --teacher",
      lambda e: ["distill", "--seq_len", "8"]),
    C("cli-eval-without-model-dir", None, r"^dlm eval: error: the following arguments are required: --model_dir",
      lambda e: ["eval"]),
    C("cli-flag-of-wrong-type", None, r"^dlm train: error: argument --seq_len.*invalid int value: 'abc'",
      lambda e: ["train", "--seq_len", "abc"]),
    C("cli-unknown-flag", None, r"^dlm train: error: .*not used .*'--bogus'", lambda e: ["train", "--bogus", "1"]),
    C("cli-max-steps-zero", None, r"^dlm train: error: `max_steps` must be a positive number of optimizer steps",
      lambda e: ["train", "--max_steps", "0"]),
    C("args-output-prior-warmup-too-long", ValueError,
      r"`output_prior_warmup_steps`=5000 must be smaller than `max_steps`=240",
      lambda e: args(e.root, max_steps=240, output_prior_warmup_steps=5000)),
    C("config-sddlm-bayes-denoiser", ValueError, r"`elbo_denoiser='bayes'` is no longer supported",
      lambda e: SDDLMConfig(elbo_denoiser="bayes")),
    C("config-sddlm-negative-margin", ValueError, r"`regularizer_margin` must be >= 0, got -0\.1",
      lambda e: SDDLMConfig(regularizer_margin=-0.1)),
    C("cli-bad-training-argument", None, r"^dlm train: error: `ema_decay` must be in \[0, 1\), got 1\.5",
      lambda e: ["train", "--ema_decay", "1.5"]),
    C("cli-missing-config-file", None, r"^dlm train: error: --config file not found: .*nope\.json",
      lambda e: ["train", "--config", str(e.root / "nope.json"), "--tokenizer", str(e.tok_dir)]),
    C("cli-nonexistent-dataset", None, r"^dlm train: error: Local dataset path '.*nowhere\.txt' does not exist",
      lambda e: ["train", "--dataset", str(e.root / "nowhere.txt"), "--tokenizer", str(e.tok_dir)]),
    C("cli-unknown-mode", None, r"^dlm train: error: mode must be one of \('wrap', 'pad'\), got 'chunk'",
      lambda e: ["train", "--mode", "chunk", "--dataset", str(e.short_txt), "--tokenizer", str(e.tok_dir)]),
    C("cli-init-from-other-variant", None,
      r"^dlm train: error: --init_from .*duo is a 'duo' checkpoint but --variant is 'sddlm'",
      lambda e: ["train", "--variant", "sddlm", "--init_from", str(e.ckpt), "--tokenizer", str(e.tok_dir)]),
    C("cli-init-from-tokenizer-size-mismatch", None,
      r"^dlm train: error: --init_from .* has vocab_size 61 but the tokenizer has 50 tokens",
      lambda e: ["train", "--variant", "duo", "--init_from", str(e.ckpt), "--tokenizer", str(e.small_tok_dir)]),
    C("cli-lora-without-init-from", None, r"^dlm train: error: --lora_r adapts a trained model",
      lambda e: ["train", "--variant", "duo", "--lora_r", "4"]),
    C("cli-eval-missing-dir", None, r"^dlm eval: error: checkpoint folder not found: .*does-not-exist",
      lambda e: ["eval", str(e.missing)]),
    C("cli-eval-dir-without-config", None, r"^dlm eval: error: .*no-config is not a checkpoint folder: config\.json",
      lambda e: ["eval", str(e.no_config)]),
    C("cli-eval-tokenizer-size-mismatch", None,
      r"^dlm eval: error: the tokenizer in .*duo-tok50 has 50 tokens but the model's vocab_size is 61",
      lambda e: ["eval", str(e.mismatched)]),
    C("cli-eval-unknown-split", None,
      r"^dlm eval: error: Dataset 'builtin' has no split 'test' \(splits: \['train', 'validation'\]\)",
      lambda e: ["eval", str(e.ckpt), "--split", "test", "--seq_len", "8"]),
    C("cli-eval-seq-len-too-long", None, r"^dlm eval: error: --seq_len 64 exceeds the model's max_position_emb",
      lambda e: ["eval", str(e.ckpt), "--seq_len", "64"]),
    C("cli-generate-num-steps-zero", None, r"^dlm generate: error: --num_steps must be >= 1, got 0",
      lambda e: ["generate", str(e.ckpt), "--num_steps", "0"]),
    C("cli-generate-unknown-sampler", None, r"^dlm generate: error: `sampler` must be one of .*, got 'beam'",
      lambda e: ["generate", str(e.ckpt), "--sampler", "beam", "--show_progress", "false"]),
    C("cli-generate-top-p", None, r"^dlm generate: error: `top_p` must be a number in \(0, 1\], got 1\.5",
      lambda e: ["generate", str(e.ckpt), "--top_p", "1.5", "--show_progress", "false"]),
    C("cli-generate-too-long", None, r"^dlm generate: error: prompt length 6 \+ max_new_tokens 12 = 18 exceeds",
      lambda e: ["generate", str(e.ckpt), "--prompt", "w1 w2 w3 w4 w5", "--max_new_tokens", "12"]),
    C("cli-generate-tokenizer-size-mismatch", None, r"^dlm generate: error: the tokenizer in .*duo-tok50 has 50",
      lambda e: ["generate", str(e.mismatched)]),
    C("cli-generate-corrupt-weights", None, r"^dlm generate: error: .*corrupt.* cannot be read",
      lambda e: ["generate", str(e.corrupt)]),
    C("cli-generate-device-unavailable", None, r"^dlm generate: error: --device 'banana' is not a torch device",
      lambda e: ["generate", str(e.ckpt), "--device", "banana"]),
    C("cli-distill-non-duo-teacher", None, r"^dlm distill: error: --teacher must be a Duo checkpoint, got model_type "
      r"'sddlm'", lambda e: ["distill", "--teacher", str(e.sddlm_ckpt), "--output_dir", str(e.root / "distilled")]),
]
assert len({case.id for case in CASES}) == len(CASES)
assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_clearly(case: Case, env, capsys):
    if case.error is None:  # the dlm command, in-process
        code = cli.main(case.call(env))
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, err
        assert "Traceback" not in err
        assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
        assert lines[0].startswith("dlm"), lines[0]
        assert re.search(case.match, lines[0]), lines[0]
        return
    with pytest.raises(case.error) as info:
        case.call(env)
    assert not isinstance(info.value, (IndexError, RuntimeError, KeyError, AttributeError)), repr(info.value)
    assert re.search(case.match, str(info.value)), str(info.value)


def test_debug_flag_shows_the_traceback(env, capsys):
    with pytest.raises(ValueError, match=r"--variant must be one of .* got 'gpt5'"):
        cli.main(["--debug", "train", "--variant", "gpt5"])
    with pytest.raises(ValueError, match=r"the following arguments are required: --teacher"):
        cli.main(["distill", "--debug"])
    assert capsys.readouterr().err == ""


def test_training_defaults_to_cpu_without_an_accelerator():
    argv = ["--max_steps", "1"]
    no_accelerator = not (torch.cuda.is_available() or torch.accelerator.is_available())
    assert cli._default_to_cpu(argv) == (argv + ["--use_cpu", "true"] if no_accelerator else argv)
    for given in (["--use_cpu", "false"], ["--use-cpu"], ["--use_cpu=true"]):
        assert cli._default_to_cpu(given) == given


def test_valid_input_still_works(env):
    """The checks reject only bad input: the same entry points accept the edge of every range."""
    model = env.models["duo"]
    edge = with_id(with_id(env.ids, VOCAB - 1)[[1, 0]], 0)  # ids 0 and V - 1 are valid
    out = model.generate(input_ids=edge, max_new_tokens=MAX_POS - 5, num_steps=1, top_p=1.0, top_k=0,
                         temperature=1e-3)
    assert out.shape == (2, MAX_POS) and torch.equal(out[:, :5], edge)
    assert torch.isfinite(model.nelbo(edge, attention_mask=[[1] * 5, [1, 1, 1, 0, 0]])).all()
    assert model(input_ids=edge).logits.shape == (2, 5, VOCAB)
    assert args(Path(env.root), sampling_eps=0.0, ema_decay=0.0).sampling_eps == 0.0
    assert cli._hf_parser(cli.GenerateArguments).parse_args_into_dataclasses(["--model_dir", "x"])[0].model_dir == "x"
