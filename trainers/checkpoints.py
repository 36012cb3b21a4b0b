"""The model and checkpoint factory that the `dlm` CLI, the benchmarks and the tests share (architecture.md §2b).

- `model_config(variant, *, tokenizer=None, seq_len=None, **fields)`: the variant's config from its fields; with a
  tokenizer, the vocabulary size and the special ids (and, for a variant that needs one, the mask id) follow it;
  `seq_len` raises `max_position_embeddings` to at least that.
- `build_model(variant, *, tokenizer=None, seq_len=None, seed=None, **fields)`: a fresh model of that config (the AR
  baseline is transformers' Llama), seeded when `seed` is given, with the tokenizer's ids in its generation config.
- `load_config(path)`, `load_model(path, device=None)` and `load_tokenizer(path, model)`: a saved checkpoint (a
  folder or a Hub repo id) with its remote code, failing with an `OSError` / `ValueError` that names what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

from .variants import REGISTRY


SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def has_accelerator() -> bool:
    """Whether torch sees CUDA or another accelerator on this machine."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


def dlm_cache_dir() -> Path:
    """dlm's cache (the built-in tokenizer, cached help texts): `$DLM_CACHE`, else `~/.cache/dlm`."""
    return Path(os.environ.get("DLM_CACHE") or Path.home() / ".cache" / "dlm")


def model_config(variant: str, *, tokenizer=None, seq_len: int | None = None, **fields):
    if variant not in REGISTRY:
        raise ValueError(f"unknown variant {variant!r}; expected one of {tuple(REGISTRY)}")
    body = dict(fields)
    if tokenizer is not None:
        body["vocab_size"] = len(tokenizer)
        body.update({key: getattr(tokenizer, key) for key in SPECIAL_IDS})
        if REGISTRY[variant].needs_mask_token:
            body["mask_token_id"] = tokenizer.mask_token_id
    if seq_len is not None:
        body["max_position_embeddings"] = max(int(body.get("max_position_embeddings", seq_len)), seq_len)
    if variant == "ar":
        from transformers import LlamaConfig

        return LlamaConfig(**body)
    from modeling_dlm import VARIANTS

    return VARIANTS[variant][0](**body)


def build_model(variant: str, *, tokenizer=None, seq_len: int | None = None, seed: int | None = None, **fields):
    import torch

    config = model_config(variant, tokenizer=tokenizer, seq_len=seq_len, **fields)
    if seed is not None:
        torch.manual_seed(seed)
    if variant == "ar":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(config)
    from modeling_dlm import VARIANTS

    model = VARIANTS[variant][1](config)
    if tokenizer is not None:
        for key in SPECIAL_IDS:
            setattr(model.generation_config, key, getattr(tokenizer, key))
    return model


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_config(path: str):
    """The config of checkpoint `path` (a folder, or a Hub repo id); OSError naming `path` if there is none."""
    from transformers import AutoConfig

    import modeling_dlm  # noqa: F401  (registers the dlm Auto classes)

    local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path
    if not os.path.exists(path) and local:
        raise OSError(f"checkpoint folder not found: {path}")
    if not os.path.exists(path) and _hub_offline():  # fail at once: no Hub lookup (and no retries) to wait for
        raise OSError(f"{path!r} is not a local folder, and HF_HUB_OFFLINE is set, so it is not looked up on the Hub")
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"{path} is not a checkpoint folder (it is a file)")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise OSError(f"{path} is not a checkpoint folder: config.json is missing")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=True)
    except OSError as err:
        if os.path.isdir(path):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"{path!r} is neither a local checkpoint folder nor a reachable Hub repo: {first}") from err


def load_model(path: str, device: str | None = None):
    """The checkpoint's model (AutoModel with its remote code; the AR baseline as AutoModelForCausalLM) on `device`
    (default: the machine's accelerator if it has one, else the CPU), in eval mode."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if device is not None:
        try:
            kind = torch.device(device).type
        except RuntimeError as err:
            raise ValueError(f"--device {device!r} is not a torch device: {str(err).splitlines()[0]}") from None
        accelerator = torch.accelerator.current_accelerator()  # None on a CPU-only machine
        if kind not in ("cpu", "meta") and (accelerator is None or accelerator.type != kind):
            raise ValueError(f"--device {device!r}: this machine has no {kind} device (use --device cpu)")
    config = load_config(path)
    auto = AutoModelForCausalLM if config.model_type == "llama" else AutoModel
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar would break one-line errors and JSON-only stdout
    try:
        model = auto.from_pretrained(path, trust_remote_code=True)
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise OSError(f"the weights in {path} cannot be read ({err}): truncated or corrupt safetensors") from err
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    device = device or torch.accelerator.current_accelerator() or "cpu"
    return model.to(device).eval()


def load_tokenizer(path: str, model):
    """The checkpoint's tokenizer; ValueError if its size is not the model's vocabulary."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    except (OSError, ValueError) as err:
        raise OSError(f"no tokenizer in {path}: {err}") from None
    if len(tokenizer) != model.config.vocab_size:
        raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    return tokenizer
