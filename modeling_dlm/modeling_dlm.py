"""dlm models: one `PreTrainedModel` per variant, all on the shared DiT backbone (`modeling_dit.py`).

- `SDDLMForDiffusionLM`   uniform-state diffusion, simple denoising loss (arXiv 2510.22926); ELBO for likelihood.
- `DuoForDiffusionLM`     uniform-state diffusion, Duo (arXiv 2506.10892).
- `MDLMForDiffusionLM`    absorbing-state diffusion with SUBS (arXiv 2406.07524), the masked baseline.
- `RePlaidForDiffusionLM` Gaussian diffusion on learned unit-norm embeddings (arXiv 2605.18530; Plaid).

A variant class adds only what differs: its config, its noise process, its `nelbo` and its generation mixin. The
forward pass is the network alone: (token ids | soft token weights | embeddings, noise level) -> logits. Training
objectives live in `trainers/`; sampling lives in `generation_dlm.py`.

`model.nelbo(input_ids, attention_mask=None, prompt_mask=None, num_time_samples=1, generator=None, reduction="mean")`
returns the per-sequence NELBO in nats per token (`reduction="sum"`: nats per sequence), an unbiased Monte Carlo
estimate of an upper bound on the NLL (one stratified t per sequence, averaged over `num_time_samples` draws). With
`prompt_mask` (1 on prompt tokens) the prompt is clean context in every network call and the bound is on
-log p(response | prompt), over the response tokens: conditional (SFT) models are evaluated, and multiple-choice
answers scored, with it. It keeps the autograd graph; wrap it in `torch.no_grad()` to evaluate, and
call `model.eval()` first so that dropout is off.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_dlm import DiffusionLMConfig, DuoConfig, MDLMConfig, RePlaidConfig, SDDLMConfig
from .functional_dlm import Noised, row_stopped_matmul
from .generation_dlm import (
    DiffusionLMGenerationMixin,
    DuoGenerationMixin,
    MDLMGenerationMixin,
    RePlaidGenerationMixin,
    SDDLMGenerationMixin,
    _is_compiling,
    check_token_ids,
)
from .modeling_dit import DiTModel, init_dit_module
from .noise_schedules import LearnedGammaSchedule, antithetic_times, gaussian_alpha_sigma, get_schedule
from .scheduling_absorbing import AbsorbingStateProcess
from .scheduling_gaussian import GaussianEmbeddingProcess
from .scheduling_uniform import UniformStateProcess


@dataclass
class DiffusionLMOutput(ModelOutput):
    """logits (B, L, V) over clean tokens; hidden_states (the input embeddings and each block's output, B, L, d) and
    attentions (each block's attention weights, B, H, L, L; eager attention only) if requested."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class DiffusionLMPreTrainedModel(PreTrainedModel):
    config_class = DiffusionLMConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True  # `attn_implementation="flash_attention_2"` with flash-attn installed (optional)
    _supports_flex_attn = False
    _supports_attention_backend = True
    _auto_class = "AutoModel"  # makes save_pretrained copy this folder's code next to the weights
    _token_ids_checked = False  # True inside `ids_checked()`: the entry point has range-checked the ids

    def __init_subclass__(cls, **kwargs):
        """A variant's generation mixin names its generation config class; `PreTrainedModel` (earlier in the MRO)
        sets transformers' `GenerationConfig`, so take the mixin's unless the class body sets one."""
        super().__init_subclass__(**kwargs)
        mixin = next((base for base in cls.__mro__[1:] if issubclass(base, DiffusionLMGenerationMixin)), None)
        if mixin is not None and "generation_config_class" not in vars(cls):
            cls.generation_config_class = mixin.generation_config_class  # the mixin's MRO holds only mixins

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a truncated or corrupt safetensors file raises an `OSError` naming the
        checkpoint (instead of safetensors' own exception type)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as err:
            if type(err).__name__ != "SafetensorError":
                raise
            raise OSError(f"the weights of {str(pretrained_model_name_or_path)!r} cannot be read: {err}; the "
                          f".safetensors file is truncated or corrupt (download or save it again)") from err

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with an `auto_map` for AutoConfig, AutoModel and AutoModelForMaskedLM,
        and the `dlm-text-generation` pipeline in `custom_pipelines`, so that `pipeline(model=checkpoint,
        trust_remote_code=True)` infers the task. Save the tokenizer into the same folder for the pipeline to work."""
        # A relative import in this file makes transformers ship `pipeline_dlm.py` with the model code (on save, and
        # into the module cache when this file is loaded as remote code, so re-saving a Hub model keeps it too).
        from .pipeline_dlm import PIPELINE_TASK, DLMTextGenerationPipeline

        # FSDP2 (`fully_shard`) gives the module a class of its own, defined in torch: save as the dlm class, so
        # that auto_map and the shipped code name this package's files
        model_class = unsharded_class(self)
        if model_class is not type(self):
            sharded_class, self.__class__ = type(self), model_class
            try:
                return self.save_pretrained(save_directory, *args, **kwargs)
            finally:
                self.__class__ = sharded_class
        module = model_class.__module__.rsplit(".", 1)[-1]
        config_module = type(self.config).__module__.rsplit(".", 1)[-1]
        name = f"{module}.{model_class.__name__}"
        self.config.auto_map = {
            "AutoConfig": f"{config_module}.{type(self.config).__name__}",
            "AutoModel": name,
            "AutoModelForMaskedLM": name,
        }
        pipeline_class = DLMTextGenerationPipeline
        self.config.custom_pipelines = {
            PIPELINE_TASK: {
                "impl": f"{pipeline_class.__module__.rsplit('.', 1)[-1]}.{pipeline_class.__name__}",
                "pt": ["AutoModel"],  # names of transformers Auto classes, resolved with getattr(transformers, ...)
                "type": "text",
            }
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, LearnedGammaSchedule):
            init.normal_(module.W1_raw, mean=0.0, std=1.0)
            init.normal_(module.b1, mean=0.0, std=1.0)
            init.normal_(module.W2_raw, mean=0.0, std=1.0)
            init.constant_(module.gamma_0, float(self.config.gamma_0))
            init.constant_(module.gamma_1, float(self.config.gamma_1))
        else:  # Linear (zero_init aware), Embedding, DiTLayerNorm, the rotary table: as in the backbone
            init_dit_module(module, self.config.initializer_range)

    # ---- shared helpers --------------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.backbone.output_layer.linear

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.backbone.output_layer.linear = value

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """`PreTrainedModel.resize_token_embeddings`, with every vocabulary-sized part following the new size V':
        the input embeddings (RePlaid: E (V, d_e), so its output prior follows too), the output layer (weight and
        bias), `config.vocab_size`, and the noise process (`noise_process` is built from the config: uniform
        noise and the ELBO use V'). Rows are kept or cut at the end. Added rows: with `mean_resizing=True` (default)
        transformers' mean init (embeddings and output rows near the old rows' mean, so new tokens start with an
        average logit); with `mean_resizing=False` normal(0, initializer_range) embedding rows and zero output rows
        (as the zero-initialised output layer). For RePlaid prefer `mean_resizing=False`: mean-initialised rows of
        E are nearly identical directions, so the new tokens start indistinguishable in the Gaussian latent.
        Special ids are never moved: MDLM keeps its configured `mask_token_id` (V - 1 of the old vocabulary, so
        added tokens come after it); a size that would cut `mask_token_id`, `pad_token_id`, `bos_token_id` or
        `eos_token_id` raises a ValueError before anything changes."""
        if new_num_tokens is None and pad_to_multiple_of is None:
            return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        target = self.get_input_embeddings().weight.shape[0] if new_num_tokens is None else new_num_tokens
        if not isinstance(target, int) or isinstance(target, bool) or target < 2:
            raise ValueError(f"`new_num_tokens` must be an integer >= 2, got {new_num_tokens!r}")
        if pad_to_multiple_of is not None:
            multiple = pad_to_multiple_of
            if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
                raise ValueError(f"`pad_to_multiple_of` must be a positive integer, got {pad_to_multiple_of!r}")
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        for name in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self.config, name, None)
            if value is not None and value >= target:
                raise ValueError(f"cannot resize the vocabulary to {target}: `config.{name}` = {value} would fall "
                                 f"outside it (ids are kept, never moved); resize to more than {value} tokens, or "
                                 f"set `config.{name}` to an id below {target} first")
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.get_output_embeddings().zero_init = True  # a later init_weights zeroes it like the original layer
        return embeddings  # `noise_process` is built from the config: uniform noise, the ELBO and SUBS use V'

    @property
    def noise_process(self):
        """The variant's noise process (`functional_dlm` lists its interface): built from the config (and, for
        RePlaid, the learned schedule and embeddings) on every access, so it follows `resize_token_embeddings`, a
        LoRA wrapper and a deep copy without any state of its own. Building it costs microseconds."""
        return self._build_noise_process()

    def _build_noise_process(self):
        raise NotImplementedError

    def _get_resized_lm_head(self, old_lm_head, new_num_tokens=None, transposed=False, mean_resizing=True):
        old = old_lm_head.weight.shape[1 if transposed else 0]
        new_lm_head = super()._get_resized_lm_head(old_lm_head, new_num_tokens, transposed, mean_resizing)
        if not mean_resizing and new_num_tokens is not None and new_num_tokens > old:
            with torch.no_grad():  # zero rows, as the zero-initialised output layer (not normal(0, std))
                (new_lm_head.weight[:, old:] if transposed else new_lm_head.weight[old:]).zero_()
                if new_lm_head.bias is not None:
                    new_lm_head.bias[old:].zero_()
        return new_lm_head

    def _check_batch(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must be a 2-D tensor (batch, seq_len), got shape "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}")
        if 0 in input_ids.shape:
            raise ValueError(f"`input_ids` must hold at least one sequence of at least one token, got shape "
                             f"{tuple(input_ids.shape)}")
        if not self._token_ids_checked:
            check_token_ids(input_ids, self.config.vocab_size, "input_ids")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"`attention_mask` must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"`attention_mask` must have shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")

    def _backbone_output(self, inputs_embeds, time_input, attention_mask, output_attentions, output_hidden_states,
                         return_dict) -> DiffusionLMOutput | tuple:
        """The backbone's logits (and hidden states / attentions) as a `DiffusionLMOutput` or a tuple; None flags
        read the config, as transformers models do."""
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        if attention_mask is not None and not self.training and not _is_compiling() and bool(attention_mask.all()):
            # no padding: the unmasked fast path (a data-dependent branch: eager inference only; in training the
            # Trainer drops all-ones masks on the host, so the step reads nothing on the device)
            attention_mask = None
        logits, hidden_states, attentions = self.backbone(
            inputs_embeds, time_input, attention_mask, bool(output_hidden_states), bool(output_attentions)
        )
        output = DiffusionLMOutput(logits=logits, hidden_states=hidden_states, attentions=attentions)
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _reduce_per_sequence(per_token: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return per_token.mean(-1)
        mask = attention_mask.to(per_token.dtype)
        return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    @contextmanager
    def ids_checked(self):
        """Inside this block the forward skips its token-id range check (one host sync per call): for internal calls
        on ids an entry point has checked, or on the process's own draws from them."""
        previous, self._token_ids_checked = self._token_ids_checked, True
        try:
            yield
        finally:
            self._token_ids_checked = previous

    def noised_forward(
        self,
        input_ids: torch.LongTensor,
        t: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        network: nn.Module | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> Noised:
        """z_t ~ q(z_t | x) at times t (B,) (`noise_process.add_noise`), then the network's logits on it: the one
        "noise, then network" path that `nelbo` and the Trainers share. `network` is the module to call (the Trainer
        passes its wrapped model, so that DDP / FSDP see the forward); None: this model. `prompt_mask` (B, L): given
        positions, kept clean (conditional training). Returns the `Noised` draw with `logits` (B, L, V) set."""
        noised = self.noise_process.add_noise(input_ids, t, generator=generator, fixed=_as_fixed(prompt_mask))
        network = self if network is None else network
        with self.ids_checked():  # z_t is drawn from ids the entry point checked: no range check per training step
            noised.logits = network(**noised.model_inputs, attention_mask=attention_mask).logits
        return noised

    def nelbo_per_token(
        self,
        input_ids: torch.LongTensor,
        t: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        network: nn.Module | None = None,
        return_noised: bool = False,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Noised]:
        """NELBO integrand at times t (B,), per position (B, L): the process's bound at one `noised_forward` draw.
        Training (the Trainer's default objective) and `nelbo` both compute the bound here. With `prompt_mask`, the
        prompt stays clean and its positions are 0: the bound on -log p(response | prompt). `return_noised`: also
        return the `Noised` draw (the Trainer logs from it)."""
        noised = self.noised_forward(input_ids, t, attention_mask, generator, network, prompt_mask)
        per_token = _zero_given(self.noise_process.nelbo_per_token(noised.logits, input_ids, noised), prompt_mask)
        return (per_token, noised) if return_noised else per_token

    def check_clean_ids(self, input_ids: torch.LongTensor) -> None:
        """Variant-specific checks of clean data at the entry points (`nelbo`, the Trainer's first batch and each
        evaluation batch), never inside a training step; the base class has none."""

    def nelbo(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        num_time_samples: int = 1,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Per-sequence NELBO, shape (B,); see the module docstring. `prompt_mask` (B, L), 1 on prompt tokens: the
        prompt stays clean context and the bound is on -log p(response | prompt), over the response tokens (the
        positions with attention_mask 1 and prompt_mask 0). `reduction`: `"mean"` nats per (response) token,
        `"sum"` nats per sequence (the log-likelihood bound that multiple-choice scoring compares)."""
        if not isinstance(num_time_samples, int) or isinstance(num_time_samples, bool) or num_time_samples < 1:
            raise ValueError(f"`num_time_samples` must be a positive integer, got {num_time_samples!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            attention_mask = torch.as_tensor(attention_mask)
        self._check_batch(input_ids, attention_mask)
        prompt_mask = check_prompt_mask(prompt_mask, input_ids)
        self.check_clean_ids(input_ids)
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if prompt_mask is not None:
            prompt_mask = prompt_mask.to(self.device)
        scored = response_mask(attention_mask, prompt_mask)
        if prompt_mask is not None and not bool(scored.any(-1).all()):
            row = int((~scored.any(-1)).nonzero()[0])
            raise ValueError(f"sequence {row} has no response tokens: `prompt_mask` covers all of its real tokens")
        total = None
        with self.ids_checked():  # the network only sees noised versions of the checked ids below
            for _ in range(num_time_samples):
                t = antithetic_times(input_ids.shape[0], generator=generator, device=self.device)
                per_token = self.nelbo_per_token(input_ids, t, attention_mask=attention_mask, generator=generator,
                                                 prompt_mask=prompt_mask)
                total = per_token if total is None else total + per_token
        per_token = total / num_time_samples
        if reduction == "sum":
            return per_token.sum(-1) if scored is None else (per_token * scored.to(per_token.dtype)).sum(-1)
        return self._reduce_per_sequence(per_token, scored)


def _as_fixed(prompt_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if prompt_mask is None else prompt_mask.bool()


def _zero_given(per_token: torch.Tensor, prompt_mask: torch.Tensor | None) -> torch.Tensor:
    """Per-position values (B, L) with the prompt's positions set to 0 (they carry no loss)."""
    return per_token if prompt_mask is None else per_token.masked_fill(prompt_mask.bool(), 0)


def unsharded_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 (`fully_shard`) swaps in a subclass of its own, defined in torch."""
    return next(c for c in type(model).__mro__ if not c.__module__.startswith("torch."))


def embedding_matrix(embedding: nn.Embedding) -> torch.Tensor:
    """The whole (V, d) table of `embedding`, read through the module's call (a lookup of every id) rather than as
    `embedding.weight`: under FSDP2 (`fully_shard`) a bare parameter read sees this rank's shard, while the call goes
    the way a lookup of token ids goes, with the same gradient."""
    return embedding(torch.arange(embedding.num_embeddings, device=embedding.weight.device))


def response_mask(attention_mask: torch.Tensor | None, prompt_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The positions that carry a loss and a bound, (B, L) bool: real tokens (attention_mask 1) outside the prompt;
    None when both masks are None (every position)."""
    if prompt_mask is None:
        return None if attention_mask is None else attention_mask.bool()
    response = ~prompt_mask.bool()
    return response if attention_mask is None else response & attention_mask.bool()


def check_prompt_mask(prompt_mask, input_ids: torch.Tensor) -> torch.Tensor | None:
    """`prompt_mask` as a (B, L) bool tensor of the shape of `input_ids` (ValueError otherwise); None stays None."""
    if prompt_mask is None:
        return None
    prompt_mask = torch.as_tensor(prompt_mask, device=input_ids.device)
    if tuple(prompt_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"`prompt_mask` must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(prompt_mask.shape)}")
    if prompt_mask.is_floating_point():
        raise TypeError(f"`prompt_mask` must hold 0/1 or bool values, got dtype {prompt_mask.dtype}")
    return prompt_mask.bool()


class DiscreteDiffusionLM(DiffusionLMPreTrainedModel):
    """Token-id DiT shared by the uniform-state and absorbing-state variants."""

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.backbone = DiTModel(config, init_weights=False)  # initialised by post_init below, in module order
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> DiffusionLMOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): noisy token ids z_t.
            attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 for real tokens, 0 for padding (keys).
            sigma (`torch.Tensor` of shape `(B,)`, *optional*): noise level -log alpha_t (zeros if omitted; ignored
                without time conditioning).
            token_weights (`torch.Tensor` of shape `(B, L, V)`, *optional*): soft inputs (rows of probabilities); the
                input embedding is `token_weights @ E` (Duo's relaxed curriculum input).
            inputs_embeds (`torch.Tensor` of shape `(B, L, hidden_size)`, *optional*): embeddings given directly.
            output_attentions, output_hidden_states, return_dict: as in transformers; None reads the config.
        Exactly one of input_ids, token_weights and inputs_embeds must be given. Returns logits (B, L, V).
        """
        given = [x is not None for x in (input_ids, token_weights, inputs_embeds)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of `input_ids`, `token_weights` or `inputs_embeds`")
        if input_ids is not None:
            self._check_batch(input_ids, attention_mask)
            inputs_embeds = self.embed_tokens(input_ids)  # (B, L, d)
        elif token_weights is not None:
            if token_weights.dim() != 3 or token_weights.shape[-1] != self.config.vocab_size:
                raise ValueError(f"`token_weights` must have shape (B, L, {self.config.vocab_size}), got "
                                 f"{tuple(token_weights.shape)}")
            weight = embedding_matrix(self.embed_tokens)  # (V, d)
            inputs_embeds = token_weights.to(weight.dtype) @ weight  # (B, L, d)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"`inputs_embeds` must have shape (B, L, {self.config.hidden_size}), got "
                             f"{tuple(inputs_embeds.shape)}")
        B, L, _ = inputs_embeds.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if sigma is not None:
            sigma = torch.as_tensor(sigma, device=inputs_embeds.device, dtype=torch.float32)
            sigma = sigma.expand(B) if sigma.dim() == 0 else sigma
            if sigma.shape != (B,):
                raise ValueError(f"`sigma` must have shape ({B},), got {tuple(sigma.shape)}")
        return self._backbone_output(inputs_embeds, sigma, attention_mask, output_attentions, output_hidden_states,
                                     return_dict)


class UniformDiffusionLM(DiscreteDiffusionLM):
    """Uniform-state process (SDDLM, Duo): the network is conditioned on sigma = -log alpha_t."""

    def _build_noise_process(self) -> UniformStateProcess:
        return UniformStateProcess(self.config.vocab_size, get_schedule(self.config.noise_schedule,
                                                                        self.config.schedule_eps))


class SDDLMForDiffusionLM(UniformDiffusionLM, SDDLMGenerationMixin):
    """SDDLM: the network is trained on noise-replaced positions only (`trainers/sddlm.py`).

    A resampled token z_t^l is independent of x^l, so cross-entropy on every resampled position teaches the network
    p(x^l | z_t^{-l}), the clean token given the *rest* of the sequence: the leave-one-out predictive that minimises
    the uniform-state ELBO position by position (methods.md §A.3.7). Its softmax is therefore plugged into the ELBO
    and the sampler as is, exactly like Duo's; the reverse step q(z_s | z_t, x_hat) multiplies in the likelihood of
    z_t^l itself.
    """

    config_class = SDDLMConfig


class DuoForDiffusionLM(UniformDiffusionLM, DuoGenerationMixin):
    config_class = DuoConfig


class MDLMForDiffusionLM(DiscreteDiffusionLM, MDLMGenerationMixin):
    config_class = MDLMConfig

    def _build_noise_process(self) -> AbsorbingStateProcess:
        return AbsorbingStateProcess(self.config.vocab_size, self.config.mask_token_id,
                                     get_schedule(self.config.noise_schedule, self.config.schedule_eps))

    def check_clean_ids(self, input_ids: torch.LongTensor) -> None:
        """Clean data never holds the mask token (its NELBO integrand would be undefined). One device sync."""
        if bool((input_ids == self.config.mask_token_id).any()):
            raise ValueError(f"clean `input_ids` contain the mask token id {self.config.mask_token_id}")


class RePlaidForDiffusionLM(DiffusionLMPreTrainedModel, RePlaidGenerationMixin):
    """Gaussian diffusion on learned unit-norm embeddings E (V, d_e) with a learned monotone schedule gamma(t).

    forward(noisy_embeds z_t (B, L, d_e), t (B,), self_cond (B, L, d_e)) -> logits (B, L, V), where
        h = DiT(W_in z_t / sqrt(alpha^2 / d_e + sigma^2) + W_sc sqrt(d_e) self_cond, time = gamma(t) or t)
        logits = W_out h + b + output_prior_scale (alpha / sigma^2) <z_t, E_v>
    The last term is the v-dependent part of log N(z_t; alpha E_v, sigma^2 I) (||E_v|| = 1), so the network learns
    a correction to the likelihood-only posterior. x_hat = softmax(logits), e_hat = x_hat E.
    """

    config_class = RePlaidConfig

    def __init__(self, config):
        super().__init__(config)
        d_e = config.embedding_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, d_e)  # re-normalised to unit rows on every use
        self.input_proj = nn.Linear(d_e, config.hidden_size, bias=True)
        self.self_cond_proj = nn.Linear(d_e, config.hidden_size, bias=False)
        self.self_cond_proj.zero_init = True
        self.noise_schedule = LearnedGammaSchedule(config.schedule_hidden_size, config.gamma_0, config.gamma_1)
        self.backbone = DiTModel(config, init_weights=False)  # initialised by post_init below, in module order
        self.post_init()

    def _build_noise_process(self) -> GaussianEmbeddingProcess:
        return GaussianEmbeddingProcess(self.config.embedding_dim, self.noise_schedule, self.normalized_embeddings,
                                        bool(self.config.self_conditioning),
                                        self.config.given_latent)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is getattr(self, "embed_tokens", None) and self.config.embedding_init == "unit_norm":
            weight = module.weight
            init.copy_(weight, weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-12))  # Plaid's rows

    def normalized_embeddings(self) -> torch.Tensor:
        weight = self.embed_tokens.weight.float()
        return weight / (weight.norm(dim=-1, keepdim=True) + 1e-8)  # (V, d_e)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        noisy_embeds: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        self_cond: torch.Tensor | None = None,
        output_prior_scale: float = 1.0,
        gamma: torch.Tensor | None = None,
        output_prior_stop_gradient: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> DiffusionLMOutput | tuple:
        r"""
        Args:
            input_ids (`(B, L)`, *optional*): clean tokens; shorthand for `noisy_embeds = alpha_t E[input_ids]`
                without noise (at t, default 0).
            noisy_embeds (`(B, L, embedding_dim)`, *optional*): the latent z_t.
            t (`(B,)`, *optional*): diffusion time in [0, 1] (default 0).
            self_cond (`(B, L, embedding_dim)`, *optional*): previous estimate of the clean embeddings (zeros if None).
            output_prior_scale: weight of the output-prior logit term (trainers warm it up from 0 to 1).
            gamma (`(B,)`, *optional*): the log noise-to-signal ratio at t, used instead of `noise_schedule(t)` (the
                trainer passes it to control the schedule's gradients); `t` still feeds the adaLN when
                `config.time_input == "t"`.
            output_prior_stop_gradient (`(B,)` bool, *optional*): entries whose output-prior term sends no gradient to
                the embeddings E (the self-conditioning entries in training, methods.md §C.3).
            output_attentions, output_hidden_states, return_dict: as in transformers; None reads the config.
        """
        E = self.normalized_embeddings()
        if (input_ids is None) == (noisy_embeds is None):
            raise ValueError("pass exactly one of `input_ids` or `noisy_embeds`")
        ref = input_ids if input_ids is not None else noisy_embeds
        B, L = ref.shape[:2]
        if t is None:
            t = torch.zeros(B, device=self.device)
        t = torch.as_tensor(t, device=self.device, dtype=torch.float32)
        t = t.expand(B) if t.dim() == 0 else t
        if t.shape != (B,):
            raise ValueError(f"`t` must have shape ({B},), got {tuple(t.shape)}")
        if not self.training and not _is_compiling() and bool(((t < 0) | (t > 1)).any()):  # eager inference only
            raise ValueError(f"`t` must lie in [0, 1], got min {float(t.min())}, max {float(t.max())}")
        if gamma is None:
            gamma, _ = self.noise_schedule(t)  # (B,) float64
        elif tuple(gamma.shape) != (B,):
            raise ValueError(f"`gamma` must have shape ({B},), got {tuple(gamma.shape)}")
        gamma = gamma.double()
        alpha, sigma = gaussian_alpha_sigma(gamma)
        if input_ids is not None:
            self._check_batch(input_ids, attention_mask)
            noisy_embeds = alpha[:, None, None].float() * E[input_ids]
        elif noisy_embeds.dim() != 3 or noisy_embeds.shape[-1] != self.config.embedding_dim:
            raise ValueError(f"`noisy_embeds` must have shape (B, L, {self.config.embedding_dim}), got "
                             f"{tuple(noisy_embeds.shape)}")
        if L > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        d_e = self.config.embedding_dim
        z = noisy_embeds.float()
        scale = torch.rsqrt(alpha**2 / d_e + sigma**2).float()[:, None, None]  # unit variance per coordinate
        h = self.input_proj((z * scale).to(self.input_proj.weight.dtype))
        if self_cond is not None:
            h = h + self.self_cond_proj((self_cond.float() * d_e**0.5).to(self.self_cond_proj.weight.dtype))
        time_input = gamma.float() if self.config.time_input == "gamma" else t
        output = self._backbone_output(h, time_input, attention_mask, output_attentions, output_hidden_states, True)
        if self.config.output_prior and output_prior_scale:
            with torch.autocast(z.device.type, enabled=False):  # float32 under bf16 autocast: alpha/sigma^2 ~ 20
                scaled = z * (output_prior_scale * alpha / sigma**2).float()[:, None, None]  # (B, L, d_e)
                prior = row_stopped_matmul(scaled, E.T, output_prior_stop_gradient)  # (B, L, V)
            output.logits = output.logits.float() + prior
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _denoise(self, z, t, attention_mask, self_conditioning: bool, output_prior_scale: float = 1.0):
        """Logits at z_t, with a first no-grad pass producing the self-conditioning input when enabled."""
        self_cond = None
        if self_conditioning and self.config.self_conditioning:
            with torch.no_grad():
                first = self(noisy_embeds=z, t=t, attention_mask=attention_mask,
                             output_prior_scale=output_prior_scale).logits
                with torch.autocast(z.device.type, enabled=False):
                    self_cond = first.float().softmax(-1) @ self.normalized_embeddings()
        return self(noisy_embeds=z, t=t, self_cond=self_cond, attention_mask=attention_mask,
                    output_prior_scale=output_prior_scale).logits

    def nelbo_terms(
        self,
        input_ids: torch.LongTensor,
        t: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        self_conditioning: bool = True,
        prompt_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The three NELBO terms per position, (B, L) each (float64): prior, reconstruction (at t = 0) and the
        continuous-time diffusion term at t (B,). `prompt_mask`: the prompt holds its clean latent in both network
        calls, and its positions are 0 in every term."""
        B = input_ids.shape[0]
        process = self.noise_process
        fixed = _as_fixed(prompt_mask)
        zeros = torch.zeros(B, device=self.device)
        gamma_1, _ = self.noise_schedule(torch.ones(B, device=self.device))
        noised_0 = process.add_noise(input_ids, zeros, generator=generator, fixed=fixed)  # z_0 at gamma_0
        prior = process.scheduler.prior_kl(noised_0.aux["embeds"], gamma_1[:, None])
        logits_0 = self._denoise(noised_0.z_t, zeros, attention_mask, self_conditioning)
        recon = -logits_0.float().log_softmax(-1).gather(-1, input_ids[..., None]).squeeze(-1).double()
        noised_t = process.add_noise(input_ids, t, generator=generator, fixed=fixed)
        logits_t = self._denoise(noised_t.z_t, t, attention_mask, self_conditioning)
        diffusion = process.nelbo_per_token(logits_t, input_ids, noised_t)  # the diffusion term at t
        terms = {"prior": prior, "reconstruction": recon, "diffusion": diffusion}
        return {name: _zero_given(value, prompt_mask) for name, value in terms.items()}

    def nelbo_per_token(
        self,
        input_ids: torch.LongTensor,
        t: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """prior + reconstruction + diffusion per position (B, L), float64, self-conditioning on; 0 on the prompt."""
        terms = self.nelbo_terms(input_ids, t, attention_mask, generator, prompt_mask=prompt_mask)
        return terms["prior"] + terms["reconstruction"] + terms["diffusion"]
