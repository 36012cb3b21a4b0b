"""The trainer-side registry of dlm variants (architecture.md §2b): one entry per variant holds its Trainer, its LoRA
targets, its model-card text, its tokenizer needs and the stem of its `hub_configs/` files. The model side is
`modeling_dlm.VARIANTS` (config and model classes). `cli`, `lora`, `hub` and `model_card` read this table, so a new
variant is one entry here (plus its config, model class and trainer file).

Nothing heavy is imported here (the CLI reads this table before it decides what to load): a Trainer is named by its
module and class, and `VariantSpec.trainer_class()` imports it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class VariantSpec:
    """Everything outside `modeling_dlm/` that depends on the variant.

    trainer: its `DiffusionTrainer` subclass as "module:Class" under `trainers` (None: the AR baseline, trained by the
        stock `Trainer`).
    title, papers, limitations: the model card's heading, references and variant-specific caveats.
    lora_targets, lora_modules_to_save: LoRA targets besides the DiT's, and modules trained in full (see `lora.py`).
    needs_mask_token: the tokenizer must have a [MASK] token (its id becomes the model's `mask_token_id`).
    hub_config_stem: `hub_configs/{stem}-{size}.json`.
    """

    trainer: str | None
    title: str
    papers: tuple[dict, ...]
    limitations: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()
    lora_modules_to_save: tuple[str, ...] = ()
    needs_mask_token: bool = False
    hub_config_stem: str | None = None

    def trainer_class(self) -> type:
        if self.trainer is None:
            raise ValueError(f"{self.title} has no dlm Trainer (train it with transformers.Trainer)")
        module, name = self.trainer.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)


# Paper references (titles and arXiv ids as recorded in ../shared/docs/methods.md §A-§C).
_SDDLM = {"authors": "H. Zhu et al., 2025", "title": "Simple Denoising Diffusion Language Models",
          "arxiv": "2510.22926"}
_DUO = {"authors": "S. S. Sahoo et al.", "title": "The Diffusion Duality", "venue": "ICML 2025", "arxiv": "2506.10892"}
_DUO2 = {"authors": "J. Deschenaux, C. Gulcehre, S. S. Sahoo",
         "title": "The Diffusion Duality, Chapter II: Ψ-Samplers and Efficient Curriculum", "venue": "ICLR 2026",
         "arxiv": "2602.21185"}
_UDLM = {"authors": "Y. Schiff et al.", "title": "Simple Guidance Mechanisms for Discrete Diffusion Models",
         "venue": "ICLR 2025", "arxiv": "2412.10193"}
_MDLM = {"authors": "S. S. Sahoo et al. (MDLM)", "venue": "NeurIPS 2024", "arxiv": "2406.07524"}
_REPLAID = {"authors": "Z. Yang et al., 2026",
            "title": "Continuous Diffusion Scales Competitively with Discrete Diffusion for Language",
            "arxiv": "2605.18530"}
_PLAID = {"authors": "I. Gulrajani, T. Hashimoto", "title": "Likelihood-Based Diffusion Language Models",
          "venue": "NeurIPS 2023"}

#: every variant the `dlm` CLI trains, in the CLI's order; "ar" is the autoregressive baseline
REGISTRY: dict[str, VariantSpec] = {
    "sddlm": VariantSpec(
        trainer="sddlm:SDDLMTrainer", title="SDDLM (simple denoising loss, uniform-state diffusion)",
        papers=(_SDDLM, _UDLM, _DUO),
        limitations=("The SDDLM paper's code is not public: the loss follows a third-party transcription of the "
                     "paper's v1 and the v2 abstract, and the exact form and weight of the v2 regularizer are "
                     "unverified (they are config options). The small NELBO term (`elbo_weight`) is dlm's addition, "
                     "chosen by measurement; set it to 0 for the paper's loss alone.",),
        lora_modules_to_save=("sigma_map",), hub_config_stem="sddlm"),
    "duo": VariantSpec(
        trainer="duo:DuoTrainer", title="Duo (uniform-state diffusion, the Diffusion Duality)",
        papers=(_DUO, _DUO2, _UDLM),
        limitations=("Few-step sampling quality relies on Discrete Consistency Distillation; an undistilled "
                     "checkpoint needs many steps.",),
        lora_modules_to_save=("sigma_map",), hub_config_stem="duo"),
    "replaid": VariantSpec(
        trainer="replaid:RePlaidTrainer", title="RePlaid (continuous embedding diffusion)", papers=(_REPLAID, _PLAID),
        limitations=("The variance-reduction tricks of the RePlaid objective (adaptive loss split, "
                     "variance-minimising schedule gradient) are not implemented in this release.",),
        lora_targets=("input_proj", "self_cond_proj"), lora_modules_to_save=("sigma_map", "noise_schedule"),
        hub_config_stem="replaid"),
    "mdlm": VariantSpec(
        trainer="mdlm:MDLMTrainer", title="MDLM (masked diffusion baseline)", papers=(_MDLM,),
        limitations=("Masked diffusion never revises a token once it is unmasked.",),
        needs_mask_token=True, hub_config_stem="mdlm"),
    "ar": VariantSpec(trainer=None, title="autoregressive baseline (Llama architecture)", papers=(),
                      hub_config_stem="ar"),
}

#: the diffusion variants (every entry with a dlm Trainer)
DLM_VARIANTS: tuple[str, ...] = tuple(name for name, spec in REGISTRY.items() if spec.trainer is not None)
