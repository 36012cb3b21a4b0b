"""dlm: diffusion language models as Hugging Face models.

Public exports of the model package. This `__init__.py` is the only file of the folder that is not shipped inside
checkpoints; it also registers the dlm configs and models with transformers' Auto classes (idempotently) so that an
installed dlm loads dlm checkpoints without `trust_remote_code`.
"""

from .configuration_dlm import DiffusionLMConfig, DuoConfig, MDLMConfig, RePlaidConfig, SDDLMConfig
from .generation_dlm import (
    DiffusionGenerateOutput,
    DiffusionGenerationConfig,
    DraftStreamer,
    DuoGenerationConfig,
    MDLMGenerationConfig,
    RePlaidGenerationConfig,
    SDDLMGenerationConfig,
)
from .modeling_dlm import (
    DiffusionLMOutput,
    DiffusionLMPreTrainedModel,
    DuoForDiffusionLM,
    MDLMForDiffusionLM,
    RePlaidForDiffusionLM,
    SDDLMForDiffusionLM,
)


VARIANTS = {
    "sddlm": (SDDLMConfig, SDDLMForDiffusionLM),
    "duo": (DuoConfig, DuoForDiffusionLM),
    "mdlm": (MDLMConfig, MDLMForDiffusionLM),
    "replaid": (RePlaidConfig, RePlaidForDiffusionLM),
}


def register_auto_classes() -> None:
    """Register every variant with AutoConfig, AutoModel and AutoModelForMaskedLM (safe to call repeatedly)."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for model_type, (config_class, model_class) in VARIANTS.items():
        if model_type in CONFIG_MAPPING:
            continue
        AutoConfig.register(model_type, config_class)
        AutoModel.register(config_class, model_class)
        AutoModelForMaskedLM.register(config_class, model_class)


register_auto_classes()

# The pipeline module imports transformers' pipeline machinery: loaded on first use, not by `import modeling_dlm`.
_LAZY_PIPELINE_EXPORTS = ("DLMTextGenerationPipeline", "PIPELINE_TASK", "register_pipeline")


def __getattr__(name: str):
    if name in _LAZY_PIPELINE_EXPORTS:
        from .pipeline_dlm import PIPELINE_TASK, DLMTextGenerationPipeline, register_pipeline

        exports = (DLMTextGenerationPipeline, PIPELINE_TASK, register_pipeline)
        return dict(zip(_LAZY_PIPELINE_EXPORTS, exports))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DiffusionGenerateOutput",
    "DiffusionGenerationConfig",
    "DiffusionLMConfig",
    "DiffusionLMOutput",
    "DiffusionLMPreTrainedModel",
    "DLMTextGenerationPipeline",
    "DraftStreamer",
    "DuoConfig",
    "DuoForDiffusionLM",
    "DuoGenerationConfig",
    "MDLMConfig",
    "MDLMForDiffusionLM",
    "MDLMGenerationConfig",
    "PIPELINE_TASK",
    "RePlaidConfig",
    "RePlaidForDiffusionLM",
    "RePlaidGenerationConfig",
    "SDDLMConfig",
    "SDDLMForDiffusionLM",
    "SDDLMGenerationConfig",
    "VARIANTS",
    "register_auto_classes",
    "register_pipeline",
]
