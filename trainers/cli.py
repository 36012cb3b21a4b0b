"""The `dlm` command: quickstart, train, distill, eval, generate, push, convert and lm-eval.

Built on `HfArgumentParser`, so every `TrainingArguments` field is a flag of `dlm train` (`--max_steps`,
`--output_dir`, `--learning_rate`, ...). Errors in user input print one line (`dlm: error: ...`) and exit with
status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .checkpoints import build_model, dlm_cache_dir, has_accelerator, load_config, load_model, load_tokenizer
from .variants import REGISTRY


logger = logging.getLogger("dlm")

VARIANT_NAMES = tuple(REGISTRY)  # ("sddlm", "duo", "replaid", "mdlm", "ar")
SIZES = ("tiny", "small", "medium")


# ---- argument groups ------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    variant: str | None = field(
        default=None, metadata={"help": f"Model family, one of {VARIANT_NAMES} (default: duo; with --init_from, the "
                                        "checkpoint's)."})
    size: str | None = field(default=None, metadata={"help": f"Preset from hub_configs/, one of {SIZES}."})
    config: str | None = field(default=None, metadata={"help": "A config JSON file (overrides --size)."})
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer name or folder; 'train': a byte-level BPE trained on --dataset's train split "
                          "(--tokenizer_vocab_size; cached, saved with the model); 'builtin': dlm's offline BPE of "
                          "Python's documentation. Default: 'builtin' for --dataset builtin, the checkpoint's own "
                          "with --init_from; any other dataset requires it."})
    tokenizer_vocab_size: int = field(default=8192, metadata={"help": "--tokenizer train: the BPE's vocabulary."})
    init_from: str | None = field(default=None, metadata={"help": "Start from the weights of a saved checkpoint."})


@dataclass
class DataArguments:
    dataset: str = field(
        default="builtin",
        metadata={"help": "'builtin' (offline corpus), a Hub dataset name, or a local .txt/.jsonl/.parquet/.arrow "
                          "file or folder."},
    )
    task: str = field(
        default="lm",
        metadata={"help": "'lm': model whole texts; 'sft': prompt -> response rows (`prompt` and `response` "
                          "columns, or `messages` rendered with the tokenizer's chat template): the prompt stays "
                          "clean, the loss and the bound count the response (and its trailing EOS) only."},
    )
    sft_fill: str = field(
        default="eos",
        metadata={"help": "--task sft: what fills the canvas after the response's EOS: 'eos' (trained, LLaDA's "
                          "recipe) or 'pad' (masked out)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    seq_len: int = field(default=128, metadata={"help": "Sequence length of every training example."})
    mode: str = field(default="wrap", metadata={"help": "'wrap' (concatenate + [BOS] block [EOS]) or 'pad'."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation examples."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (corpora too large for disk)."})


@dataclass
class LoraArguments:
    lora_r: int = field(
        default=0,
        metadata={"help": "LoRA rank (0 = full fine-tuning). With r > 0, --init_from's weights stay frozen, the "
                          "per-variant defaults of trainers/lora.py train, and --output_dir receives the adapter."},
    )
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scale numerator (updates scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA adapters' input."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names to adapt (or 'all-linear'), replacing the variant's "
                          "default (attn_qkv,attn_out,fc1,fc2,adaLN_modulation; RePlaid adds its input projections)."},
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "Also save the merged full model (adapters folded into the base weights) to "
                          "OUTPUT_DIR/merged; it loads with AutoModel.from_pretrained(..., trust_remote_code=True)."},
    )


def _positionals(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """Let `dlm eval DIR` mean `dlm eval --model_dir DIR` (HfArgumentParser only knows flags)."""
    argv = list(argv)
    out = []
    for name in names:
        if argv and not argv[0].startswith("-"):
            out += [f"--{name}", argv.pop(0)]
    return out + argv


TASKS = ("lm", "sft")


def _check_task(data_args: DataArguments) -> None:
    if data_args.task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {data_args.task!r}")
    if data_args.task == "sft" and data_args.streaming:
        raise ValueError("--task sft reads map-style data (dropped rows are counted); drop --streaming")


def _datasets(data_args: DataArguments, tokenizer, **overrides):
    """(train, eval) datasets from the data flags; `overrides` replace individual build_datasets arguments."""
    from trainers.data import build_datasets, build_sft_datasets

    _check_task(data_args)
    if data_args.task == "sft":
        return build_sft_datasets(data_args.dataset, tokenizer, data_args.seq_len,
                                  dataset_config=data_args.dataset_config, fill=data_args.sft_fill,
                                  num_proc=data_args.num_proc, max_train_samples=data_args.max_train_samples,
                                  max_eval_samples=data_args.max_eval_samples)

    kwargs = dict(dataset_config=data_args.dataset_config, text_column=data_args.text_column,
                  num_proc=data_args.num_proc, streaming=data_args.streaming,
                  max_train_samples=data_args.max_train_samples, max_eval_samples=data_args.max_eval_samples)
    kwargs.update(overrides)
    return build_datasets(data_args.dataset, tokenizer, data_args.seq_len, data_args.mode, **kwargs)


def _hf_parser(*dataclass_types):
    """An `HfArgumentParser` whose usage errors (a missing required flag, a value of the wrong type, a bad choice)
    raise ValueError, so that `main` prints them as one line instead of argparse's multi-line usage."""
    from transformers import HfArgumentParser

    class OneLineErrorParser(HfArgumentParser):
        def error(self, message):
            raise ValueError(f"{message} (see `{self.prog} --help`)")

    return OneLineErrorParser(dataclass_types)


def _default_to_cpu(argv: list[str]) -> list[str]:
    """Without CUDA or another accelerator, `--use_cpu true` unless the flag is given (otherwise every rank of a
    `torchrun` launch on CPU would train alone instead of joining one gloo process group)."""
    given = any(a.split("=", 1)[0] in ("--use_cpu", "--use-cpu") for a in argv)
    return argv if given or has_accelerator() else [*argv, "--use_cpu", "true"]


def _hub_config_path(variant: str, size: str) -> Path:
    if variant not in VARIANT_NAMES:
        raise ValueError(f"--variant must be one of {VARIANT_NAMES}, got {variant!r}")
    if size not in SIZES:
        raise ValueError(f"--size must be one of {SIZES}, got {size!r}")
    name = f"{REGISTRY[variant].hub_config_stem}-{size}.json"
    try:
        path = Path(str(resources.files("dlm_hub_configs").joinpath(name)))
    except ModuleNotFoundError:
        path = Path(__file__).resolve().parents[1] / "hub_configs" / name
    if not path.is_file():
        raise OSError(f"missing hub config {path}")
    return path


def _load_config_dict(model_args: ModelArguments) -> dict:
    if model_args.config:
        path = Path(model_args.config)
        if not path.is_file():
            raise OSError(f"--config file not found: {path}")
        try:
            body = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path} is not valid JSON: {err}") from None
    else:
        body = json.loads(_hub_config_path(model_args.variant, model_args.size or "tiny").read_text())
    expected = "llama" if model_args.variant == "ar" else model_args.variant
    if body.get("model_type", expected) != expected:
        raise ValueError(f"config model_type {body.get('model_type')!r} does not match --variant {model_args.variant}")
    body.pop("model_type", None)
    return body


def _load_tokenizer(name: str | None, variant: str):
    from trainers.data import builtin_tokenizer, prepare_tokenizer

    if name is None or name == "builtin":
        tokenizer = builtin_tokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    return prepare_tokenizer(tokenizer, need_pad=True, need_mask=REGISTRY[variant].needs_mask_token)


def _print_cached_help(prog: str, build_parser) -> None:
    """`--help` of a command whose flags include `TrainingArguments`: importing `transformers.training_args` costs
    about 5 s (it imports peft, accelerate and torch.distributed), so the text that the real parser formats is kept
    under `$DLM_CACHE/help/` and printed from there by later calls. The key holds everything the text depends on: the
    versions of Python and transformers, the terminal width, and the source of this file and of arguments.py."""
    import hashlib
    import shutil
    from importlib import metadata

    digest = hashlib.sha256()
    for part in (sys.version, metadata.version("transformers"), str(shutil.get_terminal_size().columns), prog):
        digest.update(part.encode() + b"\0")
    for name in ("cli.py", "arguments.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    path = dlm_cache_dir() / "help" / f"{prog.replace(' ', '-')}-{digest.hexdigest()[:16]}.txt"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        text = build_parser().format_help()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:  # a read-only home: the help still prints, only slower next time
            logger.debug("help text not cached in %s: %s", path.parent, err)
    sys.stdout.write(text)


# ---- resolved settings ----------------------------------------------------------------------------------------------
#: from-scratch optimisation of the MDLM/Duo/UDLM papers (methods.md B.3.4): AdamW 3e-4, constant after a warm-up of
#: 2,500 steps (of 1M; here at most a tenth of the run)
SCRATCH_LR, SCRATCH_SCHEDULE, SCRATCH_WARMUP = 3e-4, "constant_with_warmup", 2500
#: Discrete Consistency Distillation (distil_owt.sh): 6e-5, constant after 500 warm-up steps
DISTILL_LR, DISTILL_WARMUP = 6e-5, 500


def _given_flags(argv: list[str]) -> set[str]:
    """The dataclass fields named on the command line (`--learning_rate 1e-3`, `--learning-rate=1e-3`)."""
    return {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}


def _warmup_for(training_args, cap: int) -> float:
    """`cap` warm-up steps, or a tenth of a shorter run (a float < 1 is transformers' fraction of the run)."""
    if training_args.max_steps > 0:
        return min(cap, max(1, math.ceil(training_args.max_steps / 10)))
    return 0.1


def _resolve_schedule(training_args, given: set[str], *, lr: float, schedule: str, warmup_cap: int,
                      source: str) -> list[tuple[str, object, str]]:
    """Set the learning rate, its schedule and the warm-up that were not given; the rows say where each came from."""
    from transformers.trainer_utils import SchedulerType

    defaults = {"learning_rate": lr, "lr_scheduler_type": SchedulerType(schedule),
                "warmup_steps": _warmup_for(training_args, warmup_cap)}
    for key, value in defaults.items():
        if key not in given:
            setattr(training_args, key, value)
    warmup = training_args.warmup_steps
    warmup_text = f"{warmup:.0%} of the run" if 0 < warmup < 1 else f"{int(warmup)} step{'s' * (int(warmup) != 1)}"
    return [("learning rate", training_args.learning_rate, _source("learning_rate", given, source)),
            ("lr schedule", SchedulerType(training_args.lr_scheduler_type).value,
             _source("lr_scheduler_type", given)),
            ("warm-up", warmup_text,
             _source("warmup_steps", given, f"default: {warmup_cap} steps, at most a tenth of the run"))]


def _source(key: str, given: set[str], default: str = "default") -> str:
    return "given" if key in given else default


def _log_settings(rows: list[tuple[str, object, str]], training_args) -> None:
    """The resolved choices, one per line, before anything is built (rank 0 only)."""
    if training_args.process_index != 0:
        return
    logger.info("settings (where each comes from in brackets):")
    for name, value, source in rows:
        logger.info("  %-14s %s  [%s]", name, value, source)


def _resolve_train(model_args: ModelArguments, data_args: DataArguments, training_args,
                   given: set[str] | None) -> tuple[list[tuple[str, object, str]], object]:
    """Fill what the command line left open, so that `dlm train` trains: the variant and the tokenizer (from
    --init_from's checkpoint, else duo and, for --dataset builtin only, the built-in BPE), the optimisation (from
    scratch: the papers' 3e-4, constant after a warm-up; with --init_from: the checkpoint's recorded settings) and,
    with --init_from, its sequence length. `given=None` (a call from Python) changes nothing but the variant.
    Returns the rows to log and --init_from's config (None without it)."""
    from trainers.model_card import TRAINING_RECORD

    record, config = {}, None
    if model_args.init_from:
        config = load_config(model_args.init_from)
        path = Path(model_args.init_from) / TRAINING_RECORD
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
    checkpoint = f"from --init_from {model_args.init_from}"
    rows = []
    if model_args.variant is None:
        model_args.variant = ("ar" if config.model_type == "llama" else config.model_type) if config else "duo"
        rows.append(("variant", model_args.variant, checkpoint if config else "default"))
    else:
        rows.append(("variant", model_args.variant, "given"))
    if config is not None:
        rows.append(("model", f"--init_from {model_args.init_from} ({config.model_type}, vocab {config.vocab_size})",
                     "given"))
    else:
        rows.append(("model", model_args.config or f"hub_configs size {model_args.size or 'tiny'}",
                     "given" if model_args.config or model_args.size else "default"))
    if given is None:
        return rows, config
    if model_args.tokenizer is not None:
        rows.append(("tokenizer", model_args.tokenizer, "given"))
    elif config is not None:
        model_args.tokenizer = model_args.init_from
        rows.append(("tokenizer", model_args.init_from, "the checkpoint's own"))
    elif data_args.dataset == "builtin":
        model_args.tokenizer = "builtin"
        rows.append(("tokenizer", "builtin (dlm's BPE of the built-in corpus)", "default for --dataset builtin"))
    else:
        raise ValueError(f"--dataset {data_args.dataset} needs --tokenizer: a tokenizer name or folder (e.g. gpt2), "
                         "'train' to train a byte-level BPE on this dataset, or 'builtin' for dlm's BPE, which was "
                         "trained on Python's documentation")
    rows.append(("dataset", f"{data_args.dataset} (--task {data_args.task})", _source("dataset", given)))
    for key in ("seq_len", "mode"):
        from_record = key not in given and key in record
        if from_record:
            setattr(data_args, key, record[key])
        rows.append((key.replace("_", " "), getattr(data_args, key),
                     checkpoint if from_record else _source(key, given)))
    if config is not None and record.get("learning_rate") is not None:
        rows += _resolve_schedule(training_args, given, lr=record["learning_rate"],
                                  schedule=record.get("lr_scheduler_type", SCRATCH_SCHEDULE),
                                  warmup_cap=SCRATCH_WARMUP, source=f"{checkpoint}/{TRAINING_RECORD}")
    else:
        source = f"no {TRAINING_RECORD} in --init_from: the papers' 3e-4" if config is not None else \
            "default for training from scratch (MDLM/Duo/UDLM: AdamW 3e-4, constant after warm-up)"
        rows += _resolve_schedule(training_args, given, lr=SCRATCH_LR, schedule=SCRATCH_SCHEDULE,
                                  warmup_cap=SCRATCH_WARMUP, source=source)
    steps = training_args.max_steps if training_args.max_steps > 0 else f"{training_args.num_train_epochs} epochs"
    rows += [("steps", steps, "given" if {"max_steps", "num_train_epochs"} & given else "default"),
             ("EMA decay", getattr(training_args, "ema_decay", 0.0) or "off", _source("ema_decay", given)),
             ("seed", training_args.seed, _source("seed", given)),
             ("output dir", training_args.output_dir, _source("output_dir", given))]
    return rows, config


# ---- train ----------------------------------------------------------------------------------------------------------
def _parse_training_command(prog: str, dataclass_types: tuple, argv: list[str]) -> tuple | None:
    """The dataclasses of a command whose flags end with `DiffusionTrainingArguments` (train, distill); None after
    printing its (cached) `--help`."""

    def parser():
        from trainers import DiffusionTrainingArguments

        built = _hf_parser(*dataclass_types, DiffusionTrainingArguments)
        built.prog = prog
        return built

    if any(arg in ("-h", "--help") for arg in argv):
        _print_cached_help(prog, parser)
        return None
    return parser().parse_args_into_dataclasses(_default_to_cpu(argv))


def cmd_train(argv: list[str]) -> int:
    parsed = _parse_training_command("dlm train", (ModelArguments, DataArguments, LoraArguments), argv)
    if parsed is None:
        return 0
    model_args, data_args, lora_args, training_args = parsed
    return train(model_args, data_args, training_args, lora_args, given=_given_flags(argv))


def _check_lora_args(lora_args: LoraArguments | None, variant: str, model_args: ModelArguments, training_args) -> bool:
    """Whether LoRA is on; raises on flag combinations that cannot work."""
    if lora_args is None or (lora_args.lora_r == 0 and not lora_args.merge_lora):
        return False
    if lora_args.lora_r < 1:
        raise ValueError(f"--lora_r must be >= 0, got {lora_args.lora_r}" if lora_args.lora_r < 0
                         else "--merge_lora needs --lora_r > 0")
    if variant == "ar":
        raise ValueError("--lora_r applies to the diffusion variants; for --variant ar wrap the Llama model with peft")
    if not model_args.init_from:
        raise ValueError("--lora_r adapts a trained model: pass --init_from CHECKPOINT (a fresh model's random base "
                         "weights would not be saved with the adapter)")
    deepspeed = getattr(training_args, "hf_deepspeed_config", None)
    if lora_args.merge_lora and (training_args.fsdp or (deepspeed is not None and deepspeed.is_zero3())):
        raise ValueError("--merge_lora needs the full weights on one process, not --fsdp or ZeRO-3 shards; merge the "
                         "saved adapter afterwards with trainers.merge_lora(PeftModel.from_pretrained(base, adapter))")
    return True


def _save_merged_lora(trainer, tokenizer, directory: str) -> None:
    """Save the adapters folded into the base weights (the EMA adapters when EMA is on) as a full model."""
    import contextlib

    from trainers import merge_lora

    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    ema = getattr(trainer, "ema", None)
    with ema.swapped(peft_model) if ema is not None else contextlib.nullcontext():
        merged = merge_lora(peft_model)
    merged.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    logger.info("saved the merged model to %s", directory)


def _record_run(trainer, training_args, data_args, **fields) -> None:
    """`dlm_training.json` beside the weights: what the model card reports about the run (dataset, tokenizer, ...)."""
    if trainer.is_world_process_zero():
        from trainers.model_card import write_training_record

        write_training_record(training_args.output_dir, dataset=data_args.dataset,
                              dataset_config=data_args.dataset_config, seq_len=data_args.seq_len, mode=data_args.mode,
                              learning_rate=training_args.learning_rate,
                              lr_scheduler_type=getattr(training_args.lr_scheduler_type, "value",
                                                        training_args.lr_scheduler_type),
                              warmup_steps=training_args.warmup_steps,
                              ema_decay=getattr(training_args, "ema_decay", None) or None,
                              max_steps=trainer.state.global_step, **fields)


def _resume_hint() -> str:
    """This command line with `--resume_from_checkpoint last` instead of any resume flag it had."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--resume_from_checkpoint", "--resume-from-checkpoint"):
            skip = True
        elif not arg.startswith(("--resume_from_checkpoint=", "--resume-from-checkpoint=")):
            argv.append(arg)
    return "dlm " + " ".join(argv) + " --resume_from_checkpoint last"


def _run_training(trainer, training_args, resume=None, resume_hint: str | None = None) -> bool:
    """Log the process count and global batch, then `trainer.train`, where the first Ctrl-C saves a complete
    checkpoint and stops (single process; see `InterruptCallback`). Returns True when interrupted, after one log line
    that says how to resume."""
    from trainers.callbacks import InterruptCallback

    world = training_args.world_size
    if training_args.process_index == 0:
        logger.info("%d process%s on %s, global batch %d (%d per device x %d accumulation steps x %d)", world,
                    "es" if world > 1 else "", training_args.device.type,
                    world * training_args.gradient_accumulation_steps * training_args.per_device_train_batch_size,
                    training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps, world)
    if resume is None:
        resume = _resume_target(training_args.resume_from_checkpoint)
    interrupt = InterruptCallback()
    if world == 1 and interrupt.install():
        trainer.add_callback(interrupt)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        interrupt.uninstall()
    if not interrupt.requested:
        return False
    folder = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
    logger.warning("stopped at step %d of %d; checkpoint saved to %s. Resume with: %s", trainer.state.global_step,
                   trainer.state.max_steps, folder, resume_hint or _resume_hint())
    return True


def _resume_target(value: str | None) -> str | bool | None:
    """`--resume_from_checkpoint last` (or `true`) means the newest complete checkpoint in --output_dir."""
    if isinstance(value, str) and value.lower() in ("last", "true"):
        return True
    return value


def _prepare_for_task(model, data_args: DataArguments) -> None:
    """SFT of RePlaid trains prompts as clean latents, so its checkpoint samples with `given_latent="clean"`."""
    config = model.config
    if data_args.task == "sft" and getattr(config, "model_type", None) == "replaid" and \
            config.given_latent != "clean":
        logger.info("--task sft: RePlaid's given tokens become clean latents in sampling (config.given_latent)")
        config.given_latent = "clean"


def train(model_args: ModelArguments, data_args: DataArguments, training_args,
          lora_args: LoraArguments | None = None, given: set[str] | None = None) -> int:
    """`dlm train`. `given`: the flags named on the command line; those left out get the defaults that
    `_resolve_train` prints (None: a call from Python, which keeps every value it passes)."""
    from transformers import Trainer, TrainingArguments, set_seed

    from trainers import TRAINERS
    from trainers.data import check_dataset_source

    if model_args.variant is not None and model_args.variant not in VARIANT_NAMES:
        raise ValueError(f"--variant must be one of {VARIANT_NAMES}, got {model_args.variant!r}")
    check_dataset_source(data_args.dataset)  # a missing file fails before anything is built
    _check_task(data_args)
    _check_lora_args(lora_args, model_args.variant, model_args, training_args)  # before a tokenizer is demanded
    settings, config = _resolve_train(model_args, data_args, training_args, given)
    variant = model_args.variant
    if variant not in VARIANT_NAMES:
        raise ValueError(f"--init_from {model_args.init_from} holds a {variant!r} model, not one of {VARIANT_NAMES}")
    use_lora = _check_lora_args(lora_args, variant, model_args, training_args)
    body = None if model_args.init_from else _load_config_dict(model_args)  # a bad --size/--config fails first
    if given is not None:
        _log_settings(settings, training_args)
    set_seed(training_args.seed)  # the same --seed gives the same initial weights, and so the same run
    if model_args.tokenizer == "train":
        from trainers.data import dataset_tokenizer, prepare_tokenizer

        if data_args.streaming:
            raise ValueError("--tokenizer train reads the whole train split; drop --streaming or pass a tokenizer")
        tokenizer = prepare_tokenizer(dataset_tokenizer(data_args.dataset, data_args.dataset_config,
                                                        vocab_size=model_args.tokenizer_vocab_size,
                                                        text_column=data_args.text_column,
                                                        sft=data_args.task == "sft"),
                                      need_pad=True, need_mask=REGISTRY[variant].needs_mask_token)
        logger.info("trained a byte-level BPE tokenizer of %d tokens on %s (saved with the model)", len(tokenizer),
                    data_args.dataset)
    else:
        tokenizer = _load_tokenizer(model_args.tokenizer, variant)
    if config is not None:  # check the checkpoint against --variant and the tokenizer before loading any data
        expected = "llama" if variant == "ar" else variant
        if config.model_type != expected:
            raise ValueError(f"--init_from {model_args.init_from} is a {config.model_type!r} checkpoint but --variant "
                             f"is {variant!r} (expects model_type {expected!r})")
        if config.vocab_size != len(tokenizer):
            raise ValueError(f"--init_from {model_args.init_from} has vocab_size {config.vocab_size} but the "
                             f"tokenizer has {len(tokenizer)} tokens")
    if data_args.task == "sft" and variant == "ar":
        raise ValueError("--task sft is for the diffusion variants (the AR baseline trains on whole texts here)")
    train_ds, eval_ds = _datasets(data_args, tokenizer)
    if model_args.init_from:
        model = load_model(model_args.init_from)
    else:
        model = build_model(variant, tokenizer=tokenizer, seq_len=data_args.seq_len, **body)
    _prepare_for_task(model, data_args)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("variant %s: %.2fM parameters, %d train / %s eval examples of %d tokens", variant, n_params / 1e6,
                len(train_ds) if hasattr(train_ds, "__len__") else -1,
                len(eval_ds) if hasattr(eval_ds, "__len__") else "?", data_args.seq_len)
    if use_lora:
        from trainers import apply_lora

        targets = lora_args.lora_target_modules
        if targets is not None and targets != "all-linear":
            targets = [name.strip() for name in targets.split(",") if name.strip()]
        model = apply_lora(model, r=lora_args.lora_r, alpha=lora_args.lora_alpha, dropout=lora_args.lora_dropout,
                           target_modules=targets)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("LoRA r=%d: %.3fM trainable parameters (%.2f%%)", lora_args.lora_r, trainable / 1e6,
                    100 * trainable / n_params)
    if variant == "ar":
        from transformers import DataCollatorForLanguageModeling

        ar_args = TrainingArguments(**{k: v for k, v in training_args.to_dict().items()
                                       if k in TrainingArguments.__dataclass_fields__ and not k.startswith("_")})
        trainer = Trainer(model=model, args=ar_args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    else:
        trainer = TRAINERS[variant](model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                                    processing_class=tokenizer)
    if _run_training(trainer, training_args):
        return 130  # interrupted: a complete checkpoint was saved
    trainer.save_model(training_args.output_dir)
    _record_run(trainer, training_args, data_args, variant=variant, tokenizer=model_args.tokenizer or "builtin",
                tokenizer_vocab_size=model_args.tokenizer_vocab_size if model_args.tokenizer == "train" else None,
                size=model_args.size, init_from=model_args.init_from)
    metrics = trainer.evaluate() if eval_ds is not None else {}
    if trainer.is_world_process_zero():
        if metrics:
            trainer.save_metrics("eval", metrics)
        logger.info("saved %s%s to %s", variant, " LoRA adapter" if use_lora else "", training_args.output_dir)
        if use_lora and lora_args.merge_lora:
            _save_merged_lora(trainer, tokenizer, os.path.join(training_args.output_dir, "merged"))
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    return 0


# ---- eval -----------------------------------------------------------------------------------------------------------
@dataclass
class EvalArguments:
    model_dir: str = field(metadata={"help": "Checkpoint folder (or Hub repo id) to evaluate."})
    split: str | None = field(
        default=None,
        metadata={"help": "Split of a dataset that has splits (default: validation, else valid, else test; any split "
                          "name the dataset has). A file given with --dataset is scored whole and takes no --split."},
    )
    batch_size: int = field(default=16, metadata={"help": "Evaluation batch size."})
    num_time_samples: int = field(default=1, metadata={"help": "Time samples per sequence (lowers variance)."})
    sampling_eps: float = field(default=1e-3, metadata={"help": "Smallest t drawn: t ~ U[eps, 1]."})
    seed: int = field(default=0, metadata={"help": "Seed of the time and noise draws."})
    device: str | None = field(default=None, metadata={"help": "torch device, e.g. cpu or cuda:0 (default: auto)."})
    judge: str | None = field(
        default=None, metadata={"help": "Causal LM folder (e.g. from `dlm train --variant ar`) to score samples: adds "
                                        "gen_ppl and entropy to the report."}
    )
    num_samples: int = field(default=16, metadata={"help": "Samples scored by the judge."})
    gen_num_steps: int | None = field(default=None, metadata={"help": "Denoising steps of the judged samples."})
    sampler: str | None = field(default=None, metadata={"help": "Sampler of the judged samples."})
    final_step: str | None = field(default=None, metadata={"help": "grid | noise_removal: where the last call of "
                                                                   "the judged samples decodes."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus filtering of the judged samples."})
    suite: str | None = field(default=None, metadata={
        "help": "'zero-shot': the MDLM/UDLM/Duo papers' zero-shot likelihood suite over seven corpora (PTB, "
                "WikiText-103, LM1B, LAMBADA, AG News, PubMed, arXiv): a table and a JSON of every setting."})
    corpora: str | None = field(default=None, metadata={
        "help": "--suite: comma-separated corpora (default: the seven; also wikitext2)."})
    data_dir: str | None = field(default=None, metadata={
        "help": "--suite: local copies laid out like ../shared/data (ptb/ptb.valid.txt, wikitext-2-raw/, "
                "lambada/lambada_test.jsonl, ag_news/test.csv, lm1b/test.txt, scientific_papers/{pubmed,arxiv}/); "
                "default: the Hub."})
    splits: str | None = field(default=None, metadata={
        "help": "--suite: split overrides, e.g. 'ptb=test' (recorded; the table marks non-paper splits)."})
    block_size: int | None = field(default=None, metadata={
        "help": "--suite: block length (default: 1024, or the model's length when shorter)."})
    group_rows: int = field(default=1000, metadata={
        "help": "--suite: rows concatenated per group before blocking, each group's remainder dropped (the "
                "reference's batched map: 1000); 0: the whole split as one group."})
    insert_eos: bool = field(default=False, metadata={
        "help": "--suite: put EOS between rows (Duo's zero-shot script: False)."})
    min_coverage: float = field(default=0.5, metadata={
        "help": "--suite: fail when the blocks cover less than this share of a corpus' tokens."})
    output_json: str | None = field(default=None, metadata={"help": "--suite: also write the JSON report here."})


def cmd_zero_shot(eval_args: EvalArguments, data_args: DataArguments) -> int:
    from trainers.zero_shot import DEFAULT_CORPORA, SUITE_NAME, format_table, run_suite

    if eval_args.suite != SUITE_NAME:
        raise ValueError(f"unknown --suite {eval_args.suite!r}; the suite is {SUITE_NAME!r}")
    if data_args.dataset != "builtin" or eval_args.split is not None or eval_args.judge is not None:
        raise ValueError("--suite zero-shot reads its own corpora and splits: drop --dataset, --split and --judge "
                         "(use --corpora, --splits, --data_dir)")
    corpora = tuple(c.strip() for c in eval_args.corpora.split(",") if c.strip()) if eval_args.corpora \
        else DEFAULT_CORPORA
    splits = {}
    for item in (eval_args.splits.split(",") if eval_args.splits else []):
        corpus, sep, split = item.partition("=")
        if not sep or not corpus.strip() or not split.strip():
            raise ValueError(f"--splits takes CORPUS=SPLIT items, got {item!r}")
        splits[corpus.strip()] = split.strip()
    model = load_model(eval_args.model_dir, eval_args.device)  # a causal LM (the AR baseline) gets its exact NLL
    tokenizer = load_tokenizer(eval_args.model_dir, model)
    report = run_suite(model, tokenizer, corpora=corpora, data_dir=eval_args.data_dir, splits=splits,
                       block_size=eval_args.block_size, batch_size=eval_args.batch_size,
                       num_time_samples=eval_args.num_time_samples, eps=eval_args.sampling_eps, seed=eval_args.seed,
                       insert_eos=eval_args.insert_eos, group_rows=eval_args.group_rows or None,
                       min_coverage=eval_args.min_coverage, max_eval_samples=data_args.max_eval_samples,
                       model_dir=eval_args.model_dir)
    print(format_table(report))
    if eval_args.output_json:
        Path(eval_args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


def cmd_eval(argv: list[str]) -> int:
    if any(arg == "--tokenizer" or arg.startswith("--tokenizer=") for arg in argv):
        raise ValueError("dlm eval always uses the checkpoint's own tokenizer (saved next to its weights), so it "
                         "takes no --tokenizer; --tokenizer is for dlm train")
    parser = _hf_parser(EvalArguments, DataArguments)
    parser.prog = "dlm eval"
    eval_args, data_args = parser.parse_args_into_dataclasses(_positionals(argv, ("model_dir",)))
    if eval_args.suite is not None:
        return cmd_zero_shot(eval_args, data_args)
    from trainers.data import load_eval_text, tokenize_for_eval
    from trainers.evaluation import evaluate_likelihood

    model = load_model(eval_args.model_dir, eval_args.device)
    tokenizer = load_tokenizer(eval_args.model_dir, model)
    kind = None
    if hasattr(model, "nelbo_per_token"):
        from trainers.evaluation import announce_checkpoint

        kind = announce_checkpoint(model, eval_args.model_dir)
    max_len = getattr(model.config, "max_position_embeddings", data_args.seq_len)
    if data_args.seq_len > max_len:
        raise ValueError(f"--seq_len {data_args.seq_len} exceeds the model's max_position_embeddings {max_len}")
    _check_task(data_args)
    if data_args.task == "sft":
        from trainers.data import load_sft_eval

        if not hasattr(model, "nelbo_per_token"):
            raise ValueError("--task sft evaluates the conditional bound of a diffusion model")
        dataset, sft_counts = load_sft_eval(data_args.dataset, tokenizer, data_args.seq_len, split=eval_args.split,
                                            fill=data_args.sft_fill)
        split = eval_args.split or "whole file"
        counts = {"lines": sft_counts["rows"], "documents": sft_counts["kept"], "rows": sft_counts["kept"],
                  "text_tokens": sft_counts["response_tokens"]}
    else:
        text, split = load_eval_text(data_args.dataset, data_args.dataset_config, split=eval_args.split,
                                     text_column=data_args.text_column)
        dataset, counts = tokenize_for_eval(text, tokenizer, data_args.seq_len, data_args.mode,
                                            text_column=data_args.text_column)
    if data_args.max_eval_samples is not None:
        if data_args.max_eval_samples < 1:
            raise ValueError(f"--max_eval_samples must be >= 1, got {data_args.max_eval_samples}")
        dataset = dataset.select(range(min(data_args.max_eval_samples, len(dataset))))
    logger.info("evaluating %s (%s): %d lines, %d documents, %d text tokens in %d rows of %d%s", data_args.dataset,
                split, counts["lines"], counts["documents"], counts["text_tokens"], counts["rows"], data_args.seq_len,
                f"; only the first {len(dataset)} rows (--max_eval_samples)" if len(dataset) < counts["rows"] else "")
    start = time.time()
    result = evaluate_likelihood(model, dataset, batch_size=eval_args.batch_size,
                                 num_time_samples=eval_args.num_time_samples, eps=eval_args.sampling_eps,
                                 seed=eval_args.seed, show_progress=True)
    if eval_args.judge:
        from trainers.evaluation import generative_perplexity

        judge = load_model(eval_args.judge, eval_args.device)
        if hasattr(judge, "nelbo_per_token"):
            raise ValueError(f"--judge {eval_args.judge} must be a causal LM, got a diffusion model")
        judge_tokenizer = load_tokenizer(eval_args.judge, judge)
        settings = {k: v for k, v in (("num_steps", eval_args.gen_num_steps), ("sampler", eval_args.sampler),
                                      ("final_step", eval_args.final_step), ("top_p", eval_args.top_p))
                    if v is not None}
        result.update(generative_perplexity(model, tokenizer, judge, judge_tokenizer,
                                            num_samples=eval_args.num_samples, seq_len=data_args.seq_len,
                                            batch_size=eval_args.batch_size, seed=eval_args.seed, **settings))
        gen = model.generation_config
        result.update({"gen_num_steps": settings.get("num_steps", gen.num_steps),
                       "sampler": settings.get("sampler", gen.sampler),
                       "final_step": settings.get("final_step", gen.final_step),
                       "top_p": settings.get("top_p", gen.top_p)})
    result.update({"model": eval_args.model_dir, "dataset": data_args.dataset, "split": split,
                   "lines": counts["lines"], "documents": counts["documents"], "text_tokens": counts["text_tokens"],
                   "rows": len(dataset), "rows_total": counts["rows"], "max_eval_samples": data_args.max_eval_samples,
                   "seq_len": data_args.seq_len, "mode": data_args.mode, "task": data_args.task,
                   "num_time_samples": eval_args.num_time_samples, "checkpoint_kind": kind,
                   "seconds": round(time.time() - start, 2)})
    print(json.dumps(result))
    return 0


# ---- generate -------------------------------------------------------------------------------------------------------
@dataclass
class GenerateArguments:
    model_dir: str = field(metadata={"help": "Checkpoint folder (or Hub repo id)."})
    prompt: str | None = field(default=None, metadata={"help": "Text prefix (default: unconditional)."})
    chat: bool = field(default=False, metadata={"help": "Send --prompt as a user turn: rendered with the tokenizer's "
                                                         "chat template (with the assistant cue) when it has one, "
                                                         "else in the plain 'role: content' form SFT uses."})
    stop_at_eos: bool | None = field(default=None, metadata={"help": "End each sample at its first generated EOS "
                                                                      "(default: on when the model has an EOS id)."})
    num_samples: int = field(default=1, metadata={"help": "Number of samples."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens to generate per sample."})
    num_steps: int | None = field(default=None, metadata={"help": "Denoising steps (default: generation config)."})
    sampler: str | None = field(default=None, metadata={"help": "ancestral | greedy_tail | entropy_bound (SDDLM, Duo, "
                                                               "MDLM) | confidence (MDLM); RePlaid: ancestral|ddim."})
    confidence_threshold: float | None = field(default=None, metadata={
        "help": "sampler=confidence: commit every masked position whose top probability is >= this."})
    entropy_bound: float | None = field(default=None, metadata={
        "help": "sampler=entropy_bound: commit the lowest-entropy positions while their summed entropy (nats) stays "
                "<= this."})
    allow_revision: bool | None = field(default=None, metadata={
        "help": "sampler=entropy_bound (SDDLM, Duo): committed tokens may be re-drawn."})
    stability_steps: int | None = field(default=None, metadata={
        "help": "Steps without a change before a row ends (revision; RePlaid's --stop_when_stable)."})
    stop_when_stable: bool | None = field(default=None, metadata={
        "help": "RePlaid: end a sample once its argmax decode is stable for --stability_steps steps."})
    block_size: int | None = field(default=None, metadata={
        "help": "Semi-autoregressive blocks of this many tokens, decoded left to right (default: off)."})
    torch_compile: bool | None = field(default=None, metadata={
        "help": "Compile the network call of each sampling step with torch.compile (default: generation config)."})
    final_step: str | None = field(default=None, metadata={"help": "grid (decode at t = 1/num_steps) | noise_removal "
                                                                   "(step to t = 1e-5, then decode: the reference "
                                                                   "loop). Default: generation config."})
    temperature: float | None = field(default=None, metadata={"help": "Temperature on x_hat."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus filtering of x_hat."})
    top_k: int | None = field(default=None, metadata={"help": "Top-k filtering of x_hat."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampler."})
    show_progress: bool = field(default=True, metadata={"help": "tqdm bar over the denoising steps."})
    device: str | None = field(default=None, metadata={"help": "torch device (default: auto)."})


def cmd_generate(argv: list[str]) -> int:
    parser = _hf_parser(GenerateArguments)
    parser.prog = "dlm generate"
    (args,) = parser.parse_args_into_dataclasses(_positionals(argv, ("model_dir",)))
    import torch

    if args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.num_steps is not None and args.num_steps < 1:
        raise ValueError(f"--num_steps must be >= 1, got {args.num_steps}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    model = load_model(args.model_dir, args.device)
    tokenizer = load_tokenizer(args.model_dir, model)
    kwargs = {k: getattr(args, k) for k in ("num_steps", "sampler", "final_step", "temperature", "top_p", "top_k",
                                            "stop_at_eos", "confidence_threshold", "entropy_bound", "allow_revision",
                                            "stability_steps", "stop_when_stable", "block_size", "torch_compile")
              if getattr(args, k) is not None}
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    input_ids = None
    if args.chat and not args.prompt:
        raise ValueError("--chat needs --prompt (the user's turn)")
    if args.prompt:
        from trainers.data import render_chat

        text = render_chat([{"role": "user", "content": args.prompt}], tokenizer) if args.chat else args.prompt
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
            ids = [tokenizer.bos_token_id] + ids
        input_ids = torch.tensor([ids] * args.num_samples, device=model.device)
    out = model.generate(input_ids=input_ids, batch_size=None if args.prompt else args.num_samples,
                         max_new_tokens=args.max_new_tokens, generator=generator, show_progress=args.show_progress,
                         return_dict_in_generate=True, **kwargs)
    calls = out.num_forward_passes_per_sequence.tolist()
    logger.info("%d network calls (per sample: %s)", out.num_forward_passes,
                calls if len(set(calls)) > 1 else calls[0])
    out = out.sequences
    for i, row in enumerate(out):
        text = tokenizer.decode(row, skip_special_tokens=True)
        print(f"--- sample {i}\n{text}")
    return 0


# ---- push -----------------------------------------------------------------------------------------------------------
@dataclass
class PushArguments:
    model_dir: str = field(metadata={"help": "Checkpoint folder written by dlm train / save_pretrained."})
    repo_id: str = field(metadata={"help": "Target Hub repo, e.g. my-org/duo-small."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    commit_message: str = field(default="Upload dlm model", metadata={"help": "Commit message."})
    revision: str | None = field(default=None, metadata={"help": "Branch to commit to (default: main)."})
    no_card: bool = field(default=False, metadata={"help": "Push no README.md model card."})
    card_template: str | None = field(
        default=None, metadata={"help": "Jinja template for the generated card (default: dlm's, in model_cards/)."}
    )
    regenerate_card: bool = field(
        default=False, metadata={"help": "Generate the card even if the folder already holds a README.md."}
    )
    eval_json: list[str] = field(
        default_factory=list, metadata={"help": "Evaluation JSON files (the last line of `dlm eval`) for the card; "
                                                "eval_results.json and dlm_eval*.json in the folder are found "
                                                "automatically."}
    )
    license: str | None = field(default=None, metadata={"help": "License id for the card metadata, e.g. apache-2.0."})
    dry_run: bool = field(default=False, metadata={"help": "List the files that would be pushed; send nothing."})


def cmd_push(argv: list[str]) -> int:
    """Push a checkpoint as one commit: safetensors weights, config + code for trust_remote_code, generation config,
    tokenizer and a model card; never optimizer state, training args, pickles or credentials (trainers/hub.py)."""
    parser = _hf_parser(PushArguments)
    parser.prog = "dlm push"
    for name in ("httpx", "httpx2"):  # one INFO line per HTTP request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    (args,) = parser.parse_args_into_dataclasses(_positionals(argv, ("model_dir", "repo_id")))
    from trainers.hub import push_checkpoint

    if args.card_template is not None and not Path(args.card_template).is_file():
        raise OSError(f"--card_template file not found: {args.card_template}")
    for path in args.eval_json:
        if not Path(path).is_file():
            raise OSError(f"--eval_json file not found: {path}")
    card = "none" if args.no_card else "generate" if (args.regenerate_card or args.card_template) else "auto"
    result = push_checkpoint(args.model_dir, args.repo_id, private=args.private or None,
                             commit_message=args.commit_message, revision=args.revision, card=card,
                             card_template=args.card_template, eval_files=args.eval_json, license=args.license,
                             dry_run=args.dry_run)
    if args.dry_run:
        logger.info("dry run: would push %d files to %s: %s", len(result.files), args.repo_id,
                    ", ".join(result.files))
    else:
        logger.info("pushed %d files to %s (commit %s)", len(result.files), result.repo_id, result.commit)
    print(json.dumps(result.to_dict()))
    return 0


# ---- convert --------------------------------------------------------------------------------------------------------
@dataclass
class ConvertArguments:
    src: str = field(metadata={"help": "Hub repo id, local snapshot folder, or training checkpoint file (.ckpt/.pt)."})
    output_dir: str = field(metadata={"help": "Folder for the converted dlm checkpoint."})
    source_format: str = field(
        default=None, metadata={"aliases": ["--from"], "help": "What SRC is: 'duo' (Duo, Duo-distilled) or 'mdlm'."}
    )
    prefix: str | None = field(default=None, metadata={"help": "Backbone key prefix (detected when omitted)."})
    no_ema: bool = field(default=False, metadata={"help": "Use a training checkpoint's raw weights, not its EMA."})
    distilled: bool | None = field(
        default=None, metadata={"help": "Few-step generation defaults (8 steps, greedy tail); default: when SRC's "
                                        "name contains 'distill'."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer to save with the model (e.g. a gpt2 folder); special tokens are "
                                        "added to fill the vocabulary ([PAD], and [MASK] at vocab_size-1 for mdlm)."})
    num_attention_heads: int | None = field(
        default=None, metadata={"help": "Heads, for a bare state dict whose config and rotary buffer are absent."})
    max_position_embeddings: int | None = field(
        default=None, metadata={"help": "Longest sequence (default: the source's model_length, else 1024)."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of SRC."})


def _converted_tokenizer(name: str, fmt: str, vocab_size: int):
    """The tokenizer for a converted model, with the special tokens the reference run added (GPT-2: [PAD] 50257 for
    Duo; [MASK] at vocab_size - 1 for MDLM); ValueError if it cannot fill the model's vocabulary exactly."""
    from transformers import AutoTokenizer

    from trainers.data import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    need_mask = fmt == "mdlm" and tokenizer.mask_token is None
    need_pad = tokenizer.pad_token is None and len(tokenizer) + int(need_mask) < vocab_size
    prepare_tokenizer(tokenizer, need_pad=need_pad, need_mask=need_mask)
    if len(tokenizer) != vocab_size:
        raise ValueError(f"the tokenizer {name!r} has {len(tokenizer)} tokens (special tokens included) but the "
                         f"converted model's vocab_size is {vocab_size}")
    if fmt == "mdlm" and tokenizer.mask_token_id != vocab_size - 1:
        raise ValueError(f"the tokenizer's mask token has id {tokenizer.mask_token_id}, the model's mask id is "
                         f"{vocab_size - 1}")
    if tokenizer.pad_token is None:  # no free row for a new token: pad with eos (wrap-mode data never pads)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def cmd_convert(argv: list[str]) -> int:
    """Convert the authors' released MDLM / Duo / Duo-distilled weights into a dlm checkpoint folder."""
    parser = _hf_parser(ConvertArguments)
    parser.prog = "dlm convert"
    (args,) = parser.parse_args_into_dataclasses(_positionals(argv, ("src", "output_dir")))
    import torch
    from transformers import AutoModel

    from modeling_dlm import DuoForDiffusionLM, MDLMForDiffusionLM

    from .convert import from_reference

    classes = {"duo": DuoForDiffusionLM, "mdlm": MDLMForDiffusionLM}
    if args.source_format not in classes:
        raise ValueError(f"--from must be one of {tuple(classes)}, got {args.source_format!r}")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir} exists and is not empty")
    model = from_reference(
        classes[args.source_format], args.src, prefix=args.prefix, use_ema=not args.no_ema,
        distilled=args.distilled, revision=args.revision, num_attention_heads=args.num_attention_heads,
        max_position_embeddings=args.max_position_embeddings)
    tokenizer = None
    if args.tokenizer is not None:
        tokenizer = _converted_tokenizer(args.tokenizer, args.source_format, model.config.vocab_size)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(model.config, key, getattr(tokenizer, key))
            setattr(model.generation_config, key, getattr(tokenizer, key))
    model.save_pretrained(args.output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output_dir)
    # the saved folder must reproduce the converted model's logits exactly
    reloaded = AutoModel.from_pretrained(args.output_dir, trust_remote_code=True).eval()
    g = torch.Generator().manual_seed(0)
    length = min(16, model.config.max_position_embeddings)
    ids = torch.randint(0, model.config.vocab_size - 1, (2, length), generator=g)
    sigma = torch.tensor([0.1, 2.0])
    with torch.no_grad():
        diff = (model(input_ids=ids, sigma=sigma).logits - reloaded(input_ids=ids, sigma=sigma).logits).abs().max()
    if float(diff) != 0.0:
        raise RuntimeError(f"the saved checkpoint in {args.output_dir} does not reproduce the converted logits "
                           f"(max abs diff {float(diff):.3g})")
    info = dict(model.config.reference_source)
    info.update(output_dir=args.output_dir, model_type=model.config.model_type,
                parameters=sum(p.numel() for p in model.parameters()), vocab_size=model.config.vocab_size,
                hidden_size=model.config.hidden_size, num_hidden_layers=model.config.num_hidden_layers,
                num_attention_heads=model.config.num_attention_heads, tokenizer=args.tokenizer,
                generation={"num_steps": model.generation_config.num_steps,
                            "sampler": model.generation_config.sampler})
    logger.info("saved %s (%.1fM parameters) to %s; reload check passed", type(model).__name__,
                info["parameters"] / 1e6, args.output_dir)
    print(json.dumps(info))
    return 0


# ---- distill --------------------------------------------------------------------------------------------------------
@dataclass
class DistillArguments:
    teacher: str = field(metadata={"help": "Trained Duo checkpoint; the student starts from it."})


def cmd_distill(argv: list[str]) -> int:
    parsed = _parse_training_command("dlm distill", (DistillArguments, DataArguments), argv)
    if parsed is None:
        return 0
    distill_args, data_args, training_args = parsed
    from trainers import DuoDistillationTrainer
    from trainers.data import check_dataset_source

    check_dataset_source(data_args.dataset)
    given = _given_flags(argv)
    rows = [("teacher", distill_args.teacher, "given"), ("dataset", data_args.dataset, _source("dataset", given))]
    rows += _resolve_schedule(training_args, given, lr=DISTILL_LR, schedule="constant_with_warmup",
                              warmup_cap=DISTILL_WARMUP,
                              source="default for DCD (distil_owt.sh: 6e-5, constant after warm-up)")
    _log_settings(rows, training_args)
    student = load_model(distill_args.teacher, "cpu")
    if student.config.model_type != "duo":
        raise ValueError(f"--teacher must be a Duo checkpoint, got model_type {student.config.model_type!r}")
    student.train()
    tokenizer = load_tokenizer(distill_args.teacher, student)
    if data_args.seq_len > student.config.max_position_embeddings:
        raise ValueError(f"--seq_len {data_args.seq_len} exceeds the teacher's max_position_embeddings "
                         f"{student.config.max_position_embeddings}")
    train_ds, eval_ds = _datasets(data_args, tokenizer)
    trainer = DuoDistillationTrainer(model=student, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                                     processing_class=tokenizer)
    if _run_training(trainer, training_args):
        return 130  # interrupted: a complete checkpoint was saved
    trainer.save_model(training_args.output_dir)
    _record_run(trainer, training_args, data_args, variant="duo", teacher=distill_args.teacher)
    metrics = trainer.evaluate() if eval_ds is not None else {}
    if trainer.is_world_process_zero():
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    return 0


# ---- quickstart -----------------------------------------------------------------------------------------------------
@dataclass
class QuickstartArguments:
    output_dir: str = field(default="dlm-quickstart", metadata={"help": "Where to save the trained checkpoint."})
    max_steps: int = field(default=500, metadata={"help": "Training steps (the default takes a few minutes)."})
    seq_len: int = field(default=64, metadata={"help": "Sequence length."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    num_samples: int = field(default=3, metadata={"help": "Samples to print at the end."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    resume: bool = field(
        default=False,
        metadata={"help": "Continue an interrupted quickstart (Ctrl-C saves a checkpoint in --output_dir) from its "
                          "last complete checkpoint (optimizer, schedule, data order and EMA restored)."},
    )


def cmd_quickstart(argv: list[str]) -> int:
    parser = _hf_parser(QuickstartArguments)
    parser.prog = "dlm quickstart"
    (args,) = parser.parse_args_into_dataclasses(argv)
    import torch
    from transformers import AutoModel

    from trainers import DiffusionTrainingArguments, DuoTrainer
    from trainers.callbacks import ETACallback, duration
    from trainers.data import build_datasets, builtin_corpus_fingerprint, builtin_tokenizer, prepare_tokenizer

    start = time.time()
    logger.info("1/5 built-in corpus and tokenizer (offline)")
    tokenizer = prepare_tokenizer(builtin_tokenizer())
    train_ds, eval_ds = build_datasets("builtin", tokenizer, args.seq_len, "wrap")
    logger.info("    %d training and %d validation blocks of %d tokens, vocabulary %d", len(train_ds), len(eval_ds),
                args.seq_len, len(tokenizer))
    corpus = builtin_corpus_fingerprint()
    logger.info("    (the corpus comes from Python %s's standard library: fingerprint %s)", platform.python_version(),
                corpus)
    logger.info("2/5 a tiny Duo model")
    body = _load_config_dict(ModelArguments(variant="duo", size="tiny"))
    model = build_model("duo", tokenizer=tokenizer, seq_len=args.seq_len, seed=args.seed, **body)
    logger.info("    %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    training_args = DiffusionTrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, learning_rate=2e-3, warmup_steps=min(50, args.max_steps // 10),
        lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=max(1, args.max_steps // 10),
        eval_strategy="no", save_strategy="no", report_to=[], seed=args.seed, ema_decay=0.99,
        use_cpu=not has_accelerator(), dataloader_num_workers=0,
    )
    trainer = DuoTrainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer)
    eval_start = time.perf_counter()
    before = trainer.evaluate()["eval_nelbo"]
    eval_seconds = time.perf_counter() - eval_start
    logger.info("3/5 training %d steps (validation bound before: %.3f nats/token, log V = %.3f)", args.max_steps,
                before, math.log(len(tokenizer)))
    hint = "dlm " + " ".join(["quickstart", *[a for a in argv if a != "--resume"], "--resume"])
    shorter = max(10, args.max_steps // 5)

    def eta_hint(per_step: float) -> str:
        if args.max_steps <= shorter:
            return "Ctrl-C saves a checkpoint; `dlm quickstart --resume` continues it"
        return (f"--max_steps {shorter} would take about {duration(per_step * shorter + 2 * eval_seconds)}; Ctrl-C "
                f"saves a checkpoint and `dlm quickstart --resume` continues it")

    # + evaluation and sampling
    trainer.add_callback(ETACallback(hint=eta_hint, extra_seconds=2 * eval_seconds, log=logger))
    if _run_training(trainer, training_args, resume=True if args.resume else None, resume_hint=hint):
        return 130  # interrupted: a complete checkpoint was saved
    metrics = trainer.evaluate()
    logger.info("4/5 validation NELBO %.3f nats/token (perplexity bound %.1f)", metrics["eval_nelbo"],
                metrics["eval_ppl_bound"])
    trainer.save_model(args.output_dir)
    logger.info("5/5 saved to %s; reloading with AutoModel.from_pretrained(..., trust_remote_code=True)",
                args.output_dir)
    reloaded = AutoModel.from_pretrained(args.output_dir, trust_remote_code=True).eval()
    generator = torch.Generator().manual_seed(args.seed)
    samples = reloaded.generate(batch_size=args.num_samples, max_new_tokens=args.seq_len, num_steps=64,
                                generator=generator)
    for i, row in enumerate(samples):
        print(f"--- sample {i}\n{tokenizer.decode(row, skip_special_tokens=True).strip()}")
    summary = {"nelbo_before": round(before, 4), "nelbo": round(metrics["eval_nelbo"], 4),
               "ppl_bound": round(metrics["eval_ppl_bound"], 2), "log_vocab": round(math.log(len(tokenizer)), 4),
               "output_dir": args.output_dir, "python": platform.python_version(), "corpus": corpus,
               "seconds": round(time.time() - start, 1)}
    print(json.dumps(summary))
    return 0


def cmd_lm_eval(argv: list[str]) -> int:
    """`lm_eval ARGS` with `--model dlm` available (lm-eval 0.4 has no plugin entry points; the import registers
    it)."""
    try:
        from trainers.lm_eval_dlm import main as lm_eval_main
    except ImportError as err:
        raise ImportError(f"dlm lm-eval needs lm-eval 0.4 (pip install 'dlm[eval]'): {err}") from None
    return lm_eval_main(argv)


COMMANDS = {
    "quickstart": (cmd_quickstart, "train a tiny Duo model offline, sample, save and reload it"),
    "train": (cmd_train, "train a model (every TrainingArguments field is a flag)"),
    "distill": (cmd_distill, "Discrete Consistency Distillation of a Duo teacher"),
    "eval": (cmd_eval, "NELBO / perplexity bound of a checkpoint over a dataset split (JSON on the last line)"),
    "generate": (cmd_generate, "sample text from a checkpoint"),
    "push": (cmd_push, "upload a checkpoint folder to the Hub (safetensors, code, tokenizer, configs)"),
    "convert": (cmd_convert, "import the authors' released Duo / Duo-distilled / MDLM weights (--from duo|mdlm)"),
    "lm-eval": (cmd_lm_eval, "lm-evaluation-harness's own command line with the `dlm` model registered"),
}


def _usage() -> str:
    lines = ["usage: dlm [--debug] <command> [<args>]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `dlm <command> --help` for the flags of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # huggingface_hub prints through a handler of its own: propagating to ours as well printed each line twice
    logging.getLogger("huggingface_hub").propagate = False
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dlm: error: unknown command {command!r}; choose from {', '.join(COMMANDS)} (see `dlm --help`)",
              file=sys.stderr)
        return 2
    launched = False
    try:
        code = COMMANDS[command][0](rest)
    except (ValueError, TypeError, OSError, NotImplementedError, KeyError, FloatingPointError, ImportError) as err:
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"dlm {command}: error: {message}", file=sys.stderr)
        code = 2
    finally:
        launched = _close_process_group()
    if launched and "TORCHELASTIC_RUN_ID" in os.environ:
        # A worker of torchrun / accelerate launch whose command finished: its output is written and its files
        # saved. Interpreter finalization can still abort it (SIGABRT, "terminate called without an active
        # exception": gloo worker threads holding tensors while Python is torn down, even after
        # destroy_process_group; a known torch problem), which fails the whole job. So it leaves without it.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code


def _close_process_group() -> bool:
    """Tear down a launched run's process group before the interpreter exits (left to interpreter shutdown, gloo's
    threads were destroyed while still joinable). True when there was one."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
