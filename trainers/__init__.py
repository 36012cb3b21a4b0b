"""dlm trainers: `transformers.Trainer` subclasses, one per objective, with the losses as pure functions.

Importing the package is free: every name below is imported from its module on first use (PEP 562), so that
`dlm --help` and the commands that train nothing never load accelerate, peft or datasets.
"""

from __future__ import annotations

import importlib


#: public name -> the submodule that defines it
_EXPORTS = {
    "DiffusionTrainingArguments": "arguments",
    "DiffusionTrainer": "base",
    "EMACallback": "callbacks",
    "NonFiniteGuardCallback": "callbacks",
    "DuoDistillationTrainer": "duo",
    "DuoTrainer": "duo",
    "apply_lora": "lora",
    "default_lora_config": "lora",
    "merge_lora": "lora",
    "MDLMTrainer": "mdlm",
    "RePlaidTrainer": "replaid",
    "SDDLMTrainer": "sddlm",
    "DLM_VARIANTS": "variants",
    "REGISTRY": "variants",
}

__all__ = ["TRAINERS", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name == "TRAINERS":  # the Trainer of each diffusion variant, read from `trainers.variants.REGISTRY`
        from .variants import DLM_VARIANTS, REGISTRY

        value = {variant: REGISTRY[variant].trainer_class() for variant in DLM_VARIANTS}
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
