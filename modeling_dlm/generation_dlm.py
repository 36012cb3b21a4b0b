"""Generation for dlm models: generation configs, per-variant `...GenerationMixin`s and one shared sampling loop.

The loop (`DiffusionLMGenerationMixin._sampling_loop`) is the only place where the network and the noise process
meet at inference. It walks the time grid from t = 1 to 0, one network call per step, and hands the step to the
model's `noise_process` (the interface in `functional_dlm.py`):
    z = fix(prior_sample());  for t, s in grid:  z = fix(step(filter(x_hat logits at (z, t)), z, t, s))
    - uniform state (SDDLM, Duo): ancestral posterior step of `scheduling_uniform` (methods.md §B.4); at the last step
      either the posterior with alpha_s = 1 (`sampler="ancestral"`) or argmax of x_hat (`sampler="greedy_tail"`).
    - absorbing state (MDLM): ancestral unmasking; the model hook `_sampling_logits` reuses each sequence's x_hat
      while its z_t is unchanged (the caching sampler), since MDLM has no time conditioning.
    - Gaussian (RePlaid): VDM ancestral step (or `sampler="ddim"`, the hook `_step_options`), score temperature,
      self-conditioning on the previous step's e_hat (carried in the latent), tokens by argmax (methods.md §C.4).
Temperature, top-k and top-p act on the denoiser's x_hat, never on the posterior (Duo issue #29). Given tokens (a
prompt prefix, or everything outside `infill_mask`) are clamped once per step (`fix`) and never change.

`num_steps` is always exactly the number of network calls; the last call decodes (the noise removal). Where it
decodes is `final_step`:
    - `"grid"`: on the even grid t_k = 1 - k / num_steps, so the last call decodes at t = 1 / num_steps;
    - `"noise_removal"`: the first num_steps - 1 calls step along linspace(1, eps, num_steps) down to
      t = eps = `noise_removal_eps` (1e-5), and the last call decodes there. This is the reference loop (Duo, MDLM,
      Plaid): their `steps` posterior steps on linspace(1, 1e-5, steps + 1) plus one noise-removal call are
      `num_steps = steps + 1` here, draw for draw.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput

from .functional_dlm import RowGenerators


logger = logging.getLogger(__name__)

# Keys that stock pipelines pass to every `generate`; they do not apply to diffusion sampling and are ignored.
_IGNORED_GENERATE_KWARGS = ("do_sample", "num_beams", "use_cache", "output_scores", "output_logits")


class DiffusionGenerationConfig(GenerationConfig):
    r"""Generation settings of a dlm model (saved as `generation_config.json`).

    Args:
        num_steps: number of denoising steps, i.e. network calls (>= 1).
        sampler: one of `SAMPLERS` of the class (`"ancestral"`, `"greedy_tail"`; RePlaid: `"ancestral"`, `"ddim"`).
        final_step: where the last network call decodes (argmax for `"greedy_tail"` and RePlaid, the posterior to
            t = 0 for `"ancestral"`): `"grid"` at t = 1 / num_steps, or `"noise_removal"` at t = `noise_removal_eps`
            after num_steps - 1 steps down to it (the reference loop). See the module docstring.
        noise_removal_eps: the time of the noise-removal call with `final_step="noise_removal"` (1e-5, the
            reference's).
        stop_at_eos: after sampling, the new tokens that follow the first generated `eos_token_id` become
            `pad_token_id` (EOS if there is none) in the returned ids, so a conditional model's answer ends at its EOS;
            None (default) = on when the config has an `eos_token_id`. Appended tokens only (not infilling).
        show_progress: draw a tqdm bar over the steps (off by default).
        output_trajectory: with `return_dict_in_generate`, also return the token draft after every step.
        max_new_tokens, temperature, top_k, top_p, return_dict_in_generate, pad/bos/eos ids: as in transformers.
    """

    SAMPLERS: tuple[str, ...] = ("ancestral", "greedy_tail")
    DEFAULT_NUM_STEPS = 128
    DEFAULT_SAMPLER = "ancestral"
    FINAL_STEPS: tuple[str, ...] = ("grid", "noise_removal")
    DEFAULT_FINAL_STEP = "noise_removal"

    def __init__(self, **kwargs):
        self.num_steps = kwargs.pop("num_steps", self.DEFAULT_NUM_STEPS)
        self.sampler = kwargs.pop("sampler", self.DEFAULT_SAMPLER)
        self.final_step = kwargs.pop("final_step", self.DEFAULT_FINAL_STEP)
        self.noise_removal_eps = kwargs.pop("noise_removal_eps", 1e-5)
        self.show_progress = kwargs.pop("show_progress", False)
        self.stop_at_eos = kwargs.pop("stop_at_eos", None)
        self.output_trajectory = kwargs.pop("output_trajectory", False)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config):
        """The defaults, with the model config's pad, BOS and EOS ids (as transformers' models take them), so that
        a model built from a config with an `eos_token_id` stops at EOS. (transformers' own version compares
        subclass-only attributes against a plain GenerationConfig and fails on this class.)"""
        source = model_config if isinstance(model_config, dict) else model_config.to_dict()
        ids = {key: source[key] for key in ("pad_token_id", "bos_token_id", "eos_token_id")
               if source.get(key) is not None}
        return cls(**ids)

    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None):
        # The base checks target autoregressive decoding flags; dlm validates its own knobs only.
        def bad(name, allowed):
            raise ValueError(f"`{name}` must be {allowed}, got {getattr(self, name)!r}")

        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 1:
            bad("num_steps", "an integer >= 1")
        if self.sampler not in self.SAMPLERS:
            bad("sampler", f"one of {self.SAMPLERS}")
        if self.final_step not in self.FINAL_STEPS:
            bad("final_step", f"one of {self.FINAL_STEPS}")
        if self.stop_at_eos is not None and not isinstance(self.stop_at_eos, bool):
            bad("stop_at_eos", "True, False or None (on when eos_token_id is set)")
        if not (_is_number(self.noise_removal_eps) and 0 < self.noise_removal_eps < 1):
            bad("noise_removal_eps", "a number in (0, 1)")
        if self.temperature is not None and not (_is_number(self.temperature) and self.temperature > 0):
            bad("temperature", "a number > 0")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            bad("top_p", "a number in (0, 1]")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 0):
            bad("top_k", "a non-negative integer (0 disables it)")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int)
                                                or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 0):
            bad("max_new_tokens", "a non-negative integer")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class UniformGenerationConfig(DiffusionGenerationConfig):
    """Uniform-state sampling (SDDLM, Duo): ancestral or greedy-tail."""


class SDDLMGenerationConfig(UniformGenerationConfig):
    pass


class DuoGenerationConfig(UniformGenerationConfig):
    """Duo; distilled checkpoints save few-step greedy-tail defaults (e.g. num_steps=8, sampler="greedy_tail")."""


class MDLMGenerationConfig(DiffusionGenerationConfig):
    r"""MDLM. `cache_predictions` (default True) is MDLM's caching sampler, per sequence: a sequence whose z_t did not
    change in a step keeps its x_hat, and the network runs only on the sequences that changed (no call at all when
    none did). Exact, because the network ignores time: the samples are those of plain ancestral sampling with the
    same generator. False calls the network on the whole batch at every step."""

    def __init__(self, **kwargs):
        self.cache_predictions = kwargs.pop("cache_predictions", True)
        super().__init__(**kwargs)

    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None):
        super().validate(strict, user_set_attributes)
        if not isinstance(self.cache_predictions, bool):
            raise ValueError(f"`cache_predictions` must be True or False, got {self.cache_predictions!r}")


class RePlaidGenerationConfig(DiffusionGenerationConfig):
    r"""RePlaid sampling. `score_temperature` (Plaid default 0.9 in its sampler, 1.0 here = plain VDM) divides the
    predicted noise; `sampler` is `"ancestral"` (VDM/DDPM) or `"ddim"`."""

    SAMPLERS = ("ancestral", "ddim")

    def __init__(self, **kwargs):
        self.score_temperature = kwargs.pop("score_temperature", 1.0)
        super().__init__(**kwargs)

    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None):
        super().validate(strict, user_set_attributes)
        if not (_is_number(self.score_temperature) and self.score_temperature > 0):
            raise ValueError(f"`score_temperature` must be a number > 0, got {self.score_temperature!r}")


@dataclass
class DiffusionGenerateOutput(ModelOutput):
    """`sequences` (B, L) token ids; `trajectory` (num_steps, B, L) drafts if requested; `num_forward_passes`: network
    calls; `num_forward_sequences`: sequences those calls ran on in total (num_steps x B without MDLM's cache)."""

    sequences: torch.LongTensor | None = None
    trajectory: torch.LongTensor | None = None
    num_forward_passes: int | None = None
    num_forward_sequences: int | None = None


def filter_logits(
    logits: torch.Tensor, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Temperature, top-k and nucleus filtering of (..., V) logits (float32); filtered entries become -inf."""
    logits = logits.float()
    if temperature is not None and temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers' usual installs, but is not required to load a model
        logger.warning("show_progress=True needs tqdm; continuing without a progress bar")
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


class DiffusionLMGenerationMixin:
    """The shared sampling loop (`generate`, `_sampling_loop`) over the model's `noise_process`. Variant mixins may
    override two hooks: `_sampling_logits` (MDLM's per-sequence cache) and `_step_options` (RePlaid's sampler)."""

    generation_config_class = DiffusionGenerationConfig

    def adjust_generation_fn(
        self,
        generation_config,
        from_auto_class,
        from_pipeline,
        pretrained_model_name_or_path,
        cache_dir=None,
        force_download=False,
        proxies=None,
        local_files_only=False,
        token=None,
        revision=None,
        subfolder="",
        trust_remote_code=None,
        **kwargs,
    ):
        """Called by `from_pretrained`: load `generation_config.json` as this model's generation config class."""
        if generation_config is not None:
            self.generation_config = self.generation_config_class.from_dict(generation_config.to_dict())
            return
        if pretrained_model_name_or_path is None:
            return
        try:
            self.generation_config = self.generation_config_class.from_pretrained(
                pretrained_model_name_or_path,
                cache_dir=cache_dir,
                force_download=force_download,
                proxies=proxies,
                local_files_only=local_files_only,
                token=token,
                revision=revision,
                subfolder=subfolder,
            )
        except OSError:
            logger.info("no generation_config.json in %s; using the defaults", pretrained_model_name_or_path)

    # ---- argument checking ------------------------------------------------------------------------------------------
    def _prepare_canvas(self, input_ids, attention_mask, infill_mask, batch_size, max_new_tokens):
        """Returns canvas ids (B, L), given-token mask (B, L) and the attention mask (B, L) or None."""
        config = self.config
        device = self.device
        if input_ids is None:
            if infill_mask is not None:
                raise ValueError("`infill_mask` needs `input_ids` holding the canvas")
            batch_size = 1 if batch_size is None else batch_size
            if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
                raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
            if not max_new_tokens:
                raise ValueError(f"unconditional generation needs `max_new_tokens` >= 1, got {max_new_tokens!r}")
            input_ids = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        else:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                raise ValueError(
                    f"`input_ids` must be a 2-D LongTensor (batch, prompt_len), got "
                    f"{type(input_ids).__name__} of shape {tuple(getattr(input_ids, 'shape', ()))}"
                )
            if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
                raise TypeError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}")
            if batch_size is not None and batch_size != input_ids.shape[0]:
                raise ValueError(f"`batch_size`={batch_size} disagrees with input_ids of batch {input_ids.shape[0]}")
            input_ids = input_ids.to(device=device, dtype=torch.long)
        check_token_ids(input_ids, config.vocab_size, "input_ids")
        B, P = input_ids.shape
        if infill_mask is not None:
            if max_new_tokens:
                raise ValueError("pass either `infill_mask` (positions of input_ids to fill) or `max_new_tokens`")
            infill_mask = torch.as_tensor(infill_mask, device=device)
            if infill_mask.shape != input_ids.shape or infill_mask.dtype != torch.bool:
                raise ValueError(
                    f"`infill_mask` must be a bool tensor of shape {tuple(input_ids.shape)}, got "
                    f"{infill_mask.dtype} {tuple(infill_mask.shape)}"
                )
            canvas, given = input_ids.clone(), ~infill_mask
        else:
            n = max_new_tokens or 0
            canvas = torch.cat([input_ids, torch.zeros(B, n, dtype=torch.long, device=device)], dim=1)
            given = torch.zeros_like(canvas, dtype=torch.bool)
            given[:, :P] = True
        L = canvas.shape[1]
        if L > config.max_position_embeddings:
            raise ValueError(
                f"prompt length {P} + max_new_tokens {max_new_tokens or 0} = {L} exceeds the model's "
                f"max_position_embeddings={config.max_position_embeddings}"
            )
        if L == 0:
            raise ValueError("nothing to generate: the canvas is empty")
        full_mask = None
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=device)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"`attention_mask` must have the shape of input_ids {tuple(input_ids.shape)}, got "
                    f"{tuple(attention_mask.shape)}"
                )
            full_mask = torch.ones(B, L, dtype=torch.long, device=device)
            full_mask[:, :P] = attention_mask.long()
            if bool((full_mask == 1).all()):
                full_mask = None
        return canvas, given, full_mask

    # ---- the loop ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        generation_config: DiffusionGenerationConfig | None = None,
        streamer=None,
        **kwargs,
    ) -> torch.LongTensor | DiffusionGenerateOutput:
        """Sample token ids: (B, prompt_len + max_new_tokens), prompt tokens unchanged.

        Without `input_ids`, `batch_size` and `max_new_tokens` define an unconditional canvas. Keyword arguments
        update the generation config (`num_steps`, `sampler`, `temperature`, `top_p`, `top_k`, `max_new_tokens`,
        `return_dict_in_generate`, `output_trajectory`, `show_progress`, `stop_at_eos`, ...); `generator` (a
        torch.Generator) makes sampling reproducible, and a list of B generators gives each row its own stream over
        its real (un-padded) positions, so a row of a left-padded batch samples exactly what it samples alone with its
        generator; `infill_mask` (B, L) bool marks positions of `input_ids` to fill instead of appending. With
        `stop_at_eos` (on when the generation config has an `eos_token_id`), new tokens after the first generated EOS
        are returned as pad.
        A `streamer` receives the prompt via `put`, each step's draft (the whole (1, L) canvas, prompt included) via
        `put_draft` (if it has it), the final new tokens via `put`, then `end()`; when infilling, the prompt is empty
        and the final `put` carries the whole canvas. `TextStreamer` prints the final text; `DraftStreamer` collects
        (and can print) the text of every step.
        """
        generator = kwargs.pop("generator", None)
        batch_size = kwargs.pop("batch_size", None)
        infill_mask = kwargs.pop("infill_mask", None)
        for key in _IGNORED_GENERATE_KWARGS:
            kwargs.pop(key, None)
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise TypeError(f"`generation_config` must be a GenerationConfig, got {type(generation_config).__name__}; "
                            f"pass generation settings as keyword arguments")
        gen = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        if not hasattr(gen, "num_steps"):  # a plain GenerationConfig: lift it into this model's class
            gen = self.generation_config_class.from_dict(gen.to_dict())
        unknown = gen.update(**kwargs)
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments: {sorted(unknown)}")
        gen.validate()
        per_row = isinstance(generator, (list, tuple))
        if generator is not None and not per_row and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or a list of them (one per row), got "
                            f"{type(generator).__name__}")

        canvas, given, mask = self._prepare_canvas(input_ids, attention_mask, infill_mask, batch_size,
                                                   gen.max_new_tokens)
        B, L = canvas.shape
        if per_row:
            generator = _row_generators(generator, B, L, mask)
        # The streamer's "prompt": the given prefix; when infilling, nothing (the final put carries the whole canvas).
        prompt_len = input_ids.shape[1] if (input_ids is not None and infill_mask is None) else 0
        if streamer is not None:
            if B != 1:
                raise ValueError(f"streamers support batch size 1 only, got batch size {B}")
            streamer.put(canvas[:, :prompt_len].cpu())

        was_training = self.training
        self.eval()
        try:
            with self.ids_checked():  # the loop feeds the network only ids it sampled: no per-step range check
                draft, trajectory, state = self._sampling_loop(canvas, given, mask, gen, generator, streamer)
        finally:
            self.train(was_training)

        if infill_mask is None and self._stops_at_eos(gen):
            draft = pad_after_eos(draft, canvas.shape[1] - (gen.max_new_tokens or 0), gen.eos_token_id,
                                  gen.pad_token_id)
        if streamer is not None:
            streamer.put(draft[:, prompt_len:].cpu())
            streamer.end()
        if gen.return_dict_in_generate:
            return DiffusionGenerateOutput(
                sequences=draft,
                trajectory=torch.stack(trajectory) if trajectory else None,
                num_forward_passes=state["forward_passes"],
                num_forward_sequences=state["forward_sequences"],
            )
        return draft


    def _sampling_loop(self, canvas, given, mask, gen, generator, streamer):
        """The one sampling loop: from the process's prior, one network call and one process step per time step;
        given tokens are clamped once per step (`process.fix`). Returns (draft (B, L), trajectory, state)."""
        process = self.noise_process
        options = self._step_options(gen)
        state = {"mask": mask, "forward_passes": 0, "forward_sequences": 0}
        ts = sampling_time_grid(gen, canvas.device)
        z = process.fix(process.prior_sample(canvas.shape, generator, canvas.device), canvas, given)
        draft, trajectory = canvas, []
        for k in _progress(range(gen.num_steps), gen.show_progress, f"{type(self).__name__} sampling"):
            final = k == gen.num_steps - 1  # s = 0 exactly: a flag, not a comparison of tensors (no host sync)
            logits = self._sampling_logits(process, z, ts[k], state, gen)  # filtered x_hat logits (B, L, V)
            z = process.step(logits, z, ts[k], ts[k + 1], generator=generator, final=final, **options)
            z = process.fix(z, canvas, given, ts[k + 1], generator=generator, final=final)
            draft = process.tokens(z)
            if gen.output_trajectory:
                trajectory.append(draft)
            if streamer is not None and hasattr(streamer, "put_draft"):
                streamer.put_draft(draft.cpu())
        return draft, trajectory, state

    @staticmethod
    def _stops_at_eos(gen: DiffusionGenerationConfig) -> bool:
        stop = getattr(gen, "stop_at_eos", None)
        if stop and gen.eos_token_id is None:
            raise ValueError("`stop_at_eos=True` needs an `eos_token_id` in the generation config")
        return gen.eos_token_id is not None if stop is None else stop

    def _step_options(self, gen: DiffusionGenerationConfig) -> dict:
        """The process step's sampler options (hook: RePlaid's DDIM and score temperature)."""
        return {"greedy": gen.sampler == "greedy_tail"}

    def _sampling_logits(self, process, z, t, state: dict, gen: DiffusionGenerationConfig) -> torch.Tensor:
        """The filtered logits of x_hat at (z, t) (hook: MDLM reuses each row's logits while its z is unchanged)."""
        return self._network_logits(process, z, t, state["mask"], state, gen)

    def _network_logits(self, process, z, t, mask, state: dict, gen: DiffusionGenerationConfig) -> torch.Tensor:
        """One network call at (z, t), counted in `state`; the process's x_hat logits (SUBS for MDLM), then
        temperature, top-k and top-p (float32, (n, L, V))."""
        logits = self(**process.model_inputs(z, t), attention_mask=mask).logits
        state["forward_passes"] += 1
        state["forward_sequences"] += logits.shape[0]
        return filter_logits(process.denoise_logits(logits), gen.temperature, gen.top_k, gen.top_p)


def pad_after_eos(ids: torch.Tensor, start: int, eos_token_id, pad_token_id) -> torch.Tensor:
    """`ids` (B, L) with every position after the first EOS at or after `start` (the first new token) set to
    `pad_token_id` (the first EOS id when None); the EOS itself and everything before `start` stay. No host sync:
    the ids are config values, made tensors here."""
    eos = torch.as_tensor(eos_token_id).reshape(-1)  # on the CPU: reading the pad id from it syncs nothing
    pad = int(eos[0]) if pad_token_id is None else int(torch.as_tensor(pad_token_id).reshape(-1)[0])
    new = ids[:, start:]
    is_eos = torch.isin(new, eos.to(ids.device))
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # an EOS strictly before this position
    return torch.cat([ids[:, :start], new.masked_fill(after, pad)], dim=1)


def _row_generators(generators, batch: int, width: int, mask: torch.Tensor | None) -> RowGenerators:
    """`RowGenerators` for a canvas (batch, width): each row draws over its positions from its first real one."""
    if len(generators) != batch or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(f"a list of generators needs one torch.Generator per row: {batch} rows, got "
                         f"{[type(g).__name__ for g in generators]}")
    if mask is None:
        return RowGenerators(list(generators), [width] * batch)
    first = mask.long().argmax(-1)  # (B,) the first real position (left padding before it)
    return RowGenerators(list(generators), (width - first).tolist())


def sampling_time_grid(gen: DiffusionGenerationConfig, device=None) -> torch.Tensor:
    """The times of the loop, (num_steps + 1,) float64 from 1 to 0: call k runs at ts[k] and steps to ts[k + 1]; the
    last call (ts[-2] -> 0) decodes. `final_step="grid"`: 1 - k / num_steps; `"noise_removal"`:
    linspace(1, eps, num_steps) then 0."""
    if gen.final_step == "grid":
        return torch.linspace(1.0, 0.0, gen.num_steps + 1, dtype=torch.float64, device=device)
    ts = torch.linspace(1.0, gen.noise_removal_eps, gen.num_steps, dtype=torch.float64, device=device)
    return torch.cat([ts, ts.new_zeros(1)])


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling()) or torch.jit.is_tracing()


def check_token_ids(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    """ValueError if `ids` holds an id outside [0, vocab_size). One device sync; skipped (as a data-dependent check)
    while torch.compile or torch.jit traces."""
    if not ids.numel() or _is_compiling():
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"`{name}` holds token ids outside [0, {vocab_size}): min {low}, max {high}; "
            f"does the tokenizer match the checkpoint?"
        )


class UniformGenerationMixin(DiffusionLMGenerationMixin):
    """Ancestral / greedy-tail sampling of the uniform-state process (SDDLM, Duo)."""

    generation_config_class = UniformGenerationConfig


class SDDLMGenerationMixin(UniformGenerationMixin):
    generation_config_class = SDDLMGenerationConfig


class DuoGenerationMixin(UniformGenerationMixin):
    generation_config_class = DuoGenerationConfig


class MDLMGenerationMixin(DiffusionLMGenerationMixin):
    """Ancestral unmasking for the absorbing process, reusing each sequence's x_hat while its z_t is unchanged."""

    generation_config_class = MDLMGenerationConfig

    def _sampling_logits(self, process, z, t, state, gen):
        """MDLM's caching sampler, per row: without time conditioning the network's output depends on z_t only, so
        a sequence whose z_t did not change since its last call keeps its (filtered) logits exactly, and only the
        changed rows are recomputed (their count is one host sync per step)."""
        logits = state.get("logits")
        if logits is None or self.config.time_conditioning or not getattr(gen, "cache_predictions", True):
            logits = self._network_logits(process, z, t, state["mask"], state, gen)
        else:
            stale = (z != state["last_z"]).any(-1)  # (B,)
            rows = stale.nonzero().squeeze(-1)  # (n,)
            if rows.numel() == z.shape[0]:
                logits = self._network_logits(process, z, t, state["mask"], state, gen)
            elif rows.numel():
                mask = None if state["mask"] is None else state["mask"][rows]
                logits[rows] = self._network_logits(process, z[rows], t, mask, state, gen)
        # no carry-over needed: the step only ever changes masked positions, and softmaxes only the rows it unmasks
        state["logits"], state["last_z"] = logits, z
        return logits


class RePlaidGenerationMixin(DiffusionLMGenerationMixin):
    """VDM ancestral (or DDIM) sampling in embedding space with self-conditioning; tokens by argmax."""

    generation_config_class = RePlaidGenerationConfig

    def _step_options(self, gen):
        return {"ddim": gen.sampler == "ddim", "score_temperature": gen.score_temperature}


class DraftStreamer(BaseStreamer):
    r"""A streamer for `generate` (batch size 1) that decodes the draft of every denoising step.

    `generate` sends the prompt (`put`), the whole canvas after each step (`put_draft`), the final new tokens (`put`),
    then calls `end()`. This streamer keeps, for the latest call:
        drafts: the decoded text after each step (`len(drafts) == num_steps`); the last one is the output's text.
        draft_ids: the token ids (1-D LongTensor) after each step.
        text: the final text (prompt and completion; only the completion with `skip_prompt`), set by `end()`.
    Args:
        tokenizer: decodes the ids.
        stream (*optional*): a text stream such as `sys.stdout`; if given, one line per step, `[k] text`, is written to
            it as sampling runs (newlines in drafts are written as `\n`, so each step stays on one line).
        skip_prompt: decode only what follows the prompt (drafts and final text).
        decode_kwargs: passed to `tokenizer.decode` (e.g. `skip_special_tokens=True` hides MDLM's mask tokens).
    """

    def __init__(self, tokenizer, stream=None, skip_prompt: bool = False, **decode_kwargs):
        self.tokenizer = tokenizer
        self.stream = stream
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.prompt_ids = torch.zeros(0, dtype=torch.long)
        self.new_ids = torch.zeros(0, dtype=torch.long)
        self.draft_ids: list[torch.Tensor] = []
        self.drafts: list[str] = []
        self.text: str | None = None
        self._next_is_prompt = True

    @staticmethod
    def _row(value) -> torch.Tensor:
        value = torch.as_tensor(value)
        if value.dim() > 1:
            if value.shape[0] != 1:
                raise ValueError(f"DraftStreamer supports batch size 1 only, got a batch of {value.shape[0]}")
            value = value[0]
        return value.long().cpu()

    def _decode(self, ids: torch.Tensor) -> str:
        if self.skip_prompt:
            ids = ids[len(self.prompt_ids):]
        return self.tokenizer.decode(ids.tolist(), **self.decode_kwargs)

    def put(self, value) -> None:
        ids = self._row(value)
        if self._next_is_prompt:  # a new generate call: forget the previous one
            self.prompt_ids, self.new_ids = ids, torch.zeros(0, dtype=torch.long)
            self.draft_ids, self.drafts, self.text = [], [], None
            self._next_is_prompt = False
        else:
            self.new_ids = torch.cat([self.new_ids, ids])

    def put_draft(self, value) -> None:
        ids = self._row(value)
        self.draft_ids.append(ids)
        self.drafts.append(self._decode(ids))
        if self.stream is not None:
            self.stream.write(f"[{len(self.drafts)}] {self.drafts[-1]}".replace("\n", "\\n") + "\n")
            self.stream.flush()

    def end(self) -> None:
        self.text = self._decode(torch.cat([self.prompt_ids, self.new_ids]))
        self._next_is_prompt = True
