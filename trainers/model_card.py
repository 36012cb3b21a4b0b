"""Model cards for dlm checkpoints, built with `huggingface_hub.ModelCard` from the templates in `model_cards/`
(installed as the `dlm_model_cards` package).

A card states the variant, its method with paper references, what is known about the training run, the evaluation
results that were *measured* and saved next to the checkpoint (never anything else: without results it says "not
evaluated"), usage with `trust_remote_code=True`, and limitations. Sources, all optional, read from the folder:

- `config.json`, `generation_config.json`, the safetensors headers (parameter count);
- `dlm_training.json` (written by `write_training_record`) and `trainer_state.json` (in the folder or in its latest
  `checkpoint-N/`) for the training run;
- evaluation results: `eval_results.json` as written by `Trainer.save_metrics("eval", ...)` (keys `eval_nelbo`, ...)
  and `dlm_eval*.json` holding the JSON line printed by `dlm eval` (keys `nelbo`, `ppl_bound`, `bpd`, and with
  `--judge` also `gen_ppl`, `entropy` and the sampler settings).
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from importlib import resources
from pathlib import Path
from typing import Any

from .variants import DLM_VARIANTS, REGISTRY


logger = logging.getLogger(__name__)

TEMPLATE_NAME = "model_card.md"
TRAINING_RECORD = "dlm_training.json"
_COMMON_LIMITATIONS = [
    "Diffusion NELBO values are upper bounds on the negative log-likelihood, estimated by Monte Carlo over noise "
    "levels; compare them with an autoregressive model's exact NLL only as bounds.",
    "Generative perplexity depends on the judge model, the sampler, the number of steps and top-p; always read it "
    "together with the entropy of the samples.",
    "The model reproduces the statistics of its training data, including its biases and errors, and is not "
    "instruction-tuned or safety-tuned; it should not be used for decisions about people.",
    "`trust_remote_code=True` runs the Python files of the repository: review them or pin a revision.",
]
# ---- reading a checkpoint folder --------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def count_parameters(folder: str | Path) -> int | None:
    """Number of weights in the folder's `model*.safetensors` files, read from their headers (no tensors loaded)."""
    total, found = 0, False
    for path in sorted(Path(folder).glob("model*.safetensors")):
        try:
            with open(path, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
        except (OSError, ValueError, struct.error):
            return None
        for name, info in header.items():
            if name != "__metadata__":
                total += math.prod(info.get("shape", []))
        found = True
    return total if found else None


def latest_trainer_state(folder: str | Path) -> tuple[dict | None, str | None]:
    """`trainer_state.json` of the folder, else of its highest `checkpoint-N/`; with the relative path read."""
    folder = Path(folder)
    state = _read_json(folder / "trainer_state.json")
    if state is not None:
        return state, "trainer_state.json"
    checkpoints = []
    for path in folder.glob("checkpoint-*/trainer_state.json"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.parent.name)
        if match:
            checkpoints.append((int(match.group(1)), path))
    for _, path in sorted(checkpoints, reverse=True):
        state = _read_json(path)
        if state is not None:
            return state, f"{path.parent.name}/trainer_state.json"
    return None, None


def _normalise_eval(data: dict, source: str) -> dict | None:
    """One evaluation report -> {"source", likelihood fields..., generation fields...}; None if it holds neither."""
    if "eval_nelbo" in data:  # Trainer.evaluate() / save_metrics("eval")
        data = {key[len("eval_"):] if key.startswith("eval_") else key: value for key, value in data.items()}
    if not isinstance(data.get("nelbo"), (int, float)) and not isinstance(data.get("gen_ppl"), (int, float)):
        return None
    return {"source": source, **data}


def find_eval_results(folder: str | Path, extra_files: list[str | Path] | tuple = ()) -> list[dict]:
    """Measured evaluation reports saved next to the checkpoint (and in `extra_files`), normalised."""
    folder = Path(folder)
    paths = [folder / "eval_results.json", *sorted(folder.glob("dlm_eval*.json")), *map(Path, extra_files)]
    results, seen = [], set()
    for path in paths:
        if path.resolve() in seen or not path.is_file():
            continue
        seen.add(path.resolve())
        data = _read_json(path)
        if data is None:
            try:  # `dlm eval ... > file` may hold log lines before the JSON line
                data = json.loads(path.read_text(encoding="utf-8").strip().splitlines()[-1])
            except (OSError, ValueError, IndexError):
                data = None
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold an evaluation JSON object")
        entry = _normalise_eval(data, path.name)
        if entry is None:
            raise ValueError(f"{path} holds no `nelbo`/`eval_nelbo` or `gen_ppl`; not an evaluation report")
        results.append(entry)
    return results


def write_training_record(output_dir: str | Path, **fields: Any) -> Path:
    """Save what a card needs to know about a run and cannot read elsewhere (`dataset`, `dataset_config`,
    `tokenizer`, `seq_len`, `mode`, `size`, `init_from`, `teacher`, ...) as `dlm_training.json`."""
    path = Path(output_dir) / TRAINING_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {key: value for key, value in fields.items() if value is not None}
    path.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return path


# ---- formatting -------------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        if abs(value) >= 1e6 or (value != 0 and abs(value) < 10 ** -digits):
            return f"{value:.{digits}e}"
        return f"{value:.{digits}f}"
    return str(value)


def _params(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 1e6:.2f}M ({n:,})" if n >= 1e5 else f"{n:,}"


def _network(config: dict, variant: str) -> str:
    hidden, layers, heads = (config.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    if variant == "ar":
        return f"Llama decoder, {hidden} wide x {layers} layers x {heads} heads"
    text = f"bidirectional DiT (adaLN time conditioning), {hidden} wide x {layers} layers x {heads} heads"
    if variant == "replaid":
        text += f", diffusion embeddings of width {config.get('embedding_dim')}"
    elif config.get("noise_schedule"):
        text += f", {config['noise_schedule']} noise schedule"
    return text


def _is_hub_dataset(name: Any) -> bool:
    """Whether a dataset string names a Hub dataset (not a local path, not the built-in corpus)."""
    if not isinstance(name, str) or not name or name == "builtin" or name.startswith((".", "/", "~")):
        return False
    if Path(name).exists() or re.search(r"\.(txt|raw|jsonl?|parquet|arrow|csv)$", name):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None


def _training_rows(record: dict | None, state: dict | None) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    record = record or {}
    if record.get("dataset"):
        dataset = record["dataset"]
        if record.get("dataset_config"):
            dataset += f" ({record['dataset_config']})"
        rows.append(("dataset", f"`{dataset}`"))
    for key, label in (("tokenizer", "tokenizer"), ("seq_len", "sequence length"), ("mode", "packing mode"),
                       ("size", "size preset"), ("init_from", "initialised from"), ("teacher", "distilled from"),
                       ("learning_rate", "learning rate"), ("ema_decay", "EMA decay")):
        if record.get(key) not in (None, ""):
            value = record[key]
            rows.append((label, f"`{value}`" if isinstance(value, str) else _fmt(value, 6)))
    if state:
        steps = state.get("global_step")
        max_steps = state.get("max_steps")
        if steps is not None:
            rows.append(("optimizer steps", f"{steps}" + (f" (of max_steps {max_steps})" if max_steps else "")))
        if state.get("train_batch_size"):
            rows.append(("per-device batch size", str(state["train_batch_size"])))
        losses = [entry for entry in state.get("log_history", []) if "loss" in entry]
        if losses:
            last = losses[-1]
            rows.append(("last logged training loss", f"{_fmt(float(last['loss']))} (step {last.get('step')})"))
    elif record.get("max_steps"):
        rows.append(("max_steps", str(record["max_steps"])))
    return rows


def _eval_rows(results: list[dict], record: dict | None = None) -> tuple[list[dict], list[dict], bool]:
    likelihood, generation, exact = [], [], False
    for result in results:
        source = result["source"]
        if isinstance(result.get("nelbo"), (int, float)):
            nelbo = float(result["nelbo"])
            ppl = result.get("ppl_bound", math.exp(min(nelbo, 700.0)))
            bpd = result.get("bpd", nelbo / math.log(2))
            is_exact = bool(result.get("exact_nll"))
            trainer_eval = "dataset" not in result  # Trainer.evaluate(): the held-out split of the training data
            seq_len = result.get("seq_len", (record or {}).get("seq_len") if trainer_eval else None)
            exact |= is_exact
            dataset = f"`{result['dataset']}`" if result.get("dataset") else "held-out part of the training data"
            likelihood.append({
                "source": f"`{source}`", "dataset": dataset,
                "split": result.get("split", "validation" if trainer_eval else "—"), "seq_len": _fmt(seq_len),
                "num_time_samples": _fmt(result.get("num_time_samples")),
                "nelbo": _fmt(nelbo), "ppl_bound": _fmt(float(ppl), 2), "bpd": _fmt(float(bpd)),
                "tokens": _fmt(result.get("tokens")), "exact": is_exact,
            })
        if isinstance(result.get("gen_ppl"), (int, float)):
            generation.append({
                "source": f"`{source}`", "gen_ppl": _fmt(float(result["gen_ppl"]), 2),
                "entropy": _fmt(result.get("entropy"), 3), "num_samples": _fmt(result.get("gen_num_samples")),
                "num_steps": _fmt(result.get("gen_num_steps")), "sampler": _fmt(result.get("sampler")),
                "top_p": "—" if result.get("top_p") is None else f"{result['top_p']:g}",
            })
    return likelihood, generation, exact


# ---- the card ---------------------------------------------------------------------------------------------------
def template_dir() -> Path:
    """The folder of the card templates: the installed `dlm_model_cards` package, else the repo's `model_cards/`."""
    try:
        path = Path(str(resources.files("dlm_model_cards")))
        if (path / TEMPLATE_NAME).is_file():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[1] / "model_cards"


def _variant_of(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type in DLM_VARIANTS:
        return model_type
    if model_type == "llama":
        return "ar"
    raise ValueError(f"not a dlm checkpoint: config.json has model_type {model_type!r} (expected one of "
                     f"{DLM_VARIANTS} or 'llama' for the AR baseline)")


def build_model_card(
    folder: str | Path,
    repo_id: str | None = None,
    *,
    template_path: str | Path | None = None,
    config: dict | None = None,
    generation_config: dict | None = None,
    training_record: dict | None = None,
    trainer_state: dict | None = None,
    eval_results: list[dict] | None = None,
    eval_files: list[str | Path] | tuple = (),
    license: str | None = None,  # noqa: A002 (the Hub metadata field's name)
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    model_name: str | None = None,
):
    """A `huggingface_hub.ModelCard` for the checkpoint in `folder`. Arguments override what is read from the folder;
    `eval_results` are already-normalised reports (see `find_eval_results`)."""
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = config if config is not None else _read_json(folder / "config.json")
    if config is None:
        raise OSError(f"{folder} is not a checkpoint folder: config.json is missing or invalid")
    variant = _variant_of(config)
    generation = generation_config if generation_config is not None else (
        _read_json(folder / "generation_config.json") or {})
    record = training_record if training_record is not None else _read_json(folder / TRAINING_RECORD)
    state, state_source = (trainer_state, "the trainer state") if trainer_state is not None else \
        latest_trainer_state(folder)
    results = eval_results if eval_results is not None else find_eval_results(folder, eval_files)
    likelihood_rows, generation_rows, exact = _eval_rows(results, record)
    repo_id = repo_id or f"<user>/{folder.resolve().name}"
    name = model_name or repo_id.split("/")[-1]
    info = REGISTRY[variant]

    hub_datasets = list(datasets or [])
    if not hub_datasets and record and _is_hub_dataset(record.get("dataset")):
        hub_datasets = [record["dataset"]]
    card_tags = ["dlm", variant]
    card_tags += ["diffusion", "text-diffusion", "custom_code"] if variant != "ar" else ["autoregressive-baseline"]
    card_tags += [f"arxiv:{paper['arxiv']}" for paper in info.papers if paper.get("arxiv")]
    for tag in tags or []:
        if tag not in card_tags:
            card_tags.append(tag)
    card_data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=card_tags,
                              license=license or (record or {}).get("license"), datasets=hub_datasets or None)

    templates = template_dir()
    context = {"config": config, "generation": generation, "variant": variant}
    method_path = templates / f"method_{variant}.md"
    method = jinja2.Template(method_path.read_text(encoding="utf-8")).render(**context).strip()
    sources = [f"`{TRAINING_RECORD}`"] if record is not None else []
    if state is not None:
        sources.append(f"`{state_source}`" if str(state_source).endswith(".json") else str(state_source))
    training_source = ", ".join(sources) or None
    has_pipeline = "dlm-text-generation" in (config.get("custom_pipelines") or {})
    summary = (f"Variant: **{info.title}**, packaged as a Hugging Face `transformers` model by dlm (diffusion "
               f"language models as Hugging Face models).")
    if variant != "ar":
        summary += (" It generates all positions of a sequence in parallel by iterative denoising, not left to "
                    "right.")
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or templates / TEMPLATE_NAME),
        model_name=name, repo_id=repo_id, summary=summary, variant=variant,
        architecture=(config.get("architectures") or ["?"])[0], parameters=_params(count_parameters(folder)),
        network=_network(config, variant), config=config, generation=generation, method=method,
        papers=info.papers, training_rows=_training_rows(record, state), training_source=training_source,
        likelihood_rows=likelihood_rows, generation_rows=generation_rows, exact_nll=exact,
        trust_remote_code=variant != "ar", has_pipeline=has_pipeline,
        limitations=[*info.limitations, *_COMMON_LIMITATIONS],
    )


def write_trainer_model_card(trainer, license: str | None = None, tags=None, model_name: str | None = None,  # noqa: A002
                             dataset=None, **_ignored) -> Path | None:
    """README.md for `Trainer.push_to_hub`/`create_model_card`: the dlm card of the model the trainer holds, with the
    run's steps and its last evaluation from `trainer.state` (measured by the trainer, not invented)."""
    folder = Path(trainer.args.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = model.config.to_dict()
    generation = model.generation_config.to_dict() if getattr(model, "generation_config", None) is not None else {}
    state = {"global_step": trainer.state.global_step, "max_steps": trainer.state.max_steps,
             "train_batch_size": trainer.state.train_batch_size, "log_history": list(trainer.state.log_history)}
    evals = [entry for entry in trainer.state.log_history if "eval_nelbo" in entry]
    results = []
    if evals:
        last = _normalise_eval(evals[-1], f"Trainer.evaluate() at step {evals[-1].get('step')}")
        if last is not None:
            last.setdefault("num_time_samples", getattr(trainer.args, "eval_num_time_samples", None))
            results.append(last)
    results += [r for r in find_eval_results(folder) if r["source"] != "eval_results.json" or not results]
    if isinstance(tags, str):
        tags = [tags]
    datasets = [dataset] if isinstance(dataset, str) else list(dataset) if dataset else None
    card = build_model_card(folder, trainer.args.hub_model_id, config=config, generation_config=generation,
                            trainer_state=state, eval_results=results, license=license, tags=tags,
                            model_name=model_name, datasets=[d for d in datasets or [] if _is_hub_dataset(d)] or None)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "README.md"
    card.save(path)
    return path
