"""dlm trainers: `transformers.Trainer` subclasses, one per objective, with the losses as pure functions."""

from .arguments import DiffusionTrainingArguments
from .base import DiffusionTrainer
from .callbacks import EMACallback, NonFiniteGuardCallback
from .duo import DuoDistillationTrainer, DuoTrainer
from .lora import apply_lora, default_lora_config, merge_lora
from .mdlm import MDLMTrainer
from .replaid import RePlaidTrainer
from .sddlm import SDDLMTrainer
from .variants import DLM_VARIANTS, REGISTRY


#: the Trainer of each diffusion variant, read from `trainers.variants.REGISTRY`
TRAINERS = {name: REGISTRY[name].trainer_class() for name in DLM_VARIANTS}

__all__ = [
    "TRAINERS",
    "DiffusionTrainer",
    "DiffusionTrainingArguments",
    "DuoDistillationTrainer",
    "DuoTrainer",
    "EMACallback",
    "NonFiniteGuardCallback",
    "MDLMTrainer",
    "RePlaidTrainer",
    "SDDLMTrainer",
    "apply_lora",
    "default_lora_config",
    "merge_lora",
]
