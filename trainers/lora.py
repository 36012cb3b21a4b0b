"""LoRA for dlm models with `peft`: a default `LoraConfig` per variant, wrapping and merging.

peft has no built-in target map for dlm's model types, so `default_lora_config` names the modules. Every variant
runs the same DiT backbone (`modeling_dlm/modeling_dit.py`), so the low-rank adapters always go on:

- `attn_qkv`, `attn_out`: the packed q/k/v and output projections of each `DiTAttention`;
- `fc1`, `fc2`: the two Linears of each `DiTMLP`;
- `adaLN_modulation`: the Linear from the time conditioning c to each block's (shift, scale, gate) x 2, and to the
  final layer's (shift, scale). It decides how strongly every block acts at every noise level. A rank-r update costs
  r (cond_dim + 6 d) weights per block; training these Linears in full (7.3M weights in the small preset, 4% of the
  model) would make the adapter five times larger: the defaults train 1.7M weights (1%) at r = 8 on `small`.

Left frozen on purpose: the token embeddings and the output projection to the vocabulary (V-sized, and the usual
LoRA practice), and the weight-only LayerNorms.

`modules_to_save` (trained in full, saved with the adapter) differs by variant:

- SDDLM, Duo (and its DCD student): `sigma_map`, the timestep embedder that maps sigma = -log alpha_t to c. It is
  small (256 c + c^2 weights, so a low-rank update would save almost nothing), and training it lets the adapted
  model change how it responds to each noise level beyond the rank-r adaLN updates (DCD's few-step student is
  asked to do exactly that).
- MDLM: nothing. MDLM embeds a constant zero time, so c is a constant and the adaLN LoRA already adapts every
  block's shift, scale and gate. Given a model with `time_conditioning=True`, `sigma_map` is trained as above.
- RePlaid: `sigma_map` as above, and `noise_schedule`, the learned gamma(t) (3 x schedule_hidden_size + 2 weights
  and no Linear for LoRA to reach). Its endpoints gamma_0 and gamma_1 set the prior/reconstruction balance of the
  NELBO on the new data. RePlaid also adapts `input_proj` and `self_cond_proj`, the DiT's input layers from the
  diffusion embeddings, with LoRA.

RePlaid's embeddings stay frozen: they *are* the diffusion space, and moving them under a frozen denoiser would
undo what the base model learned about that space.

Leave `task_type` unset: peft's task types assume a causal or seq2seq LM (`CAUSAL_LM` fails on a model without
`prepare_inputs_for_generation`). With no task type, `PeftModel(...)` forwards every keyword to the dlm model, and
`generate`, `nelbo` and the trainers work through it.
"""

from __future__ import annotations

import copy

from peft import LoraConfig, PeftModel, get_peft_model

from .variants import DLM_VARIANTS, REGISTRY


#: LoRA targets of the DiT backbone, shared by every variant
DIT_TARGET_MODULES = ("attn_qkv", "attn_out", "fc1", "fc2", "adaLN_modulation")

def _variant_of(variant_or_model) -> tuple[str, bool]:
    """(variant name, whether the model conditions on time)."""
    if isinstance(variant_or_model, str):
        variant = variant_or_model
        time_conditioning = variant != "mdlm"  # MDLM's default: no time conditioning
    else:
        config = getattr(variant_or_model, "config", None)
        variant = getattr(config, "model_type", None)
        time_conditioning = bool(getattr(config, "time_conditioning", True))
    if variant not in DLM_VARIANTS:
        raise ValueError(f"no default LoRA targets for {variant!r}; expected a dlm model or one of {DLM_VARIANTS}")
    return variant, time_conditioning


def default_lora_config(
    variant_or_model,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    *,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
) -> LoraConfig:
    """The default `peft.LoraConfig` of a dlm variant ("sddlm", "duo", "mdlm", "replaid") or model.

    `r` is the rank, `alpha` the LoRA scale numerator (the update is scaled by alpha / r), `dropout` the dropout on
    the adapter input. `target_modules` (a list of module-name suffixes, a regex, or "all-linear") and
    `modules_to_save` replace the defaults of the table in the module docstring. Given a model, MDLM with
    `time_conditioning=True` also trains its timestep embedder in full."""
    variant, time_conditioning = _variant_of(variant_or_model)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"the LoRA rank `r` must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"`alpha` must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
    spec = REGISTRY[variant]
    extra_targets, saved = spec.lora_targets, spec.lora_modules_to_save
    if target_modules is None:
        target_modules = [*DIT_TARGET_MODULES, *extra_targets]
    if modules_to_save is None:
        modules_to_save = list(saved)
        if variant == "mdlm" and time_conditioning:
            modules_to_save.append("sigma_map")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=target_modules,
                      modules_to_save=list(modules_to_save) or None)


def apply_lora(model, config: LoraConfig | None = None, **kwargs) -> PeftModel:
    """Wrap a dlm model with LoRA adapters: `config`, or `default_lora_config(model, **kwargs)`. The base weights
    are frozen; only the adapters and `modules_to_save` train."""
    if config is None:
        config = default_lora_config(model, **kwargs)
    elif kwargs:
        raise TypeError(f"pass either `config` or default_lora_config arguments, not both: {sorted(kwargs)}")
    return get_peft_model(model, config)


def is_peft_model(model) -> bool:
    return isinstance(model, PeftModel)


def merge_lora(model):
    """A merged copy of a LoRA-wrapped model: the adapters folded into the base weights and `modules_to_save`
    copies put in place, returned as the plain dlm model class (it saves and loads with
    `AutoModel.from_pretrained(..., trust_remote_code=True)`). `model` itself is left wrapped and unchanged."""
    if not is_peft_model(model):
        raise TypeError(f"merge_lora needs a peft.PeftModel, got {type(model).__name__}")
    return copy.deepcopy(model).merge_and_unload()
