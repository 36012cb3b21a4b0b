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
import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput

from .functional_dlm import RowGenerators, sample_at, softmax_stats


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
            None (default) = on when the config has an `eos_token_id`. Appended tokens only (not infilling). Without
            a prompt, when `bos_token_id` is also an EOS id (GPT-2-style tokenizers), the EOS tokens that open the
            sample are its document start and do not stop it.
        block_size: semi-autoregressive decoding (None = off, the default): the generated region is split into
            blocks of `block_size` columns, decoded left to right with any sampler; each block is decoded with the
            earlier ones fixed as context and the later ones not yet in the canvas (the network sees the prefix up
            to the block's end). `num_steps` is shared evenly between the blocks (the first ones take the
            remainder), so it must be at least the number of blocks. With `stop_at_eos`, blocks after one in which
            every row has generated EOS are not decoded (they would be padding).
        show_progress: draw a tqdm bar over the steps (off by default).
        torch_compile: run the network call of every sampling step through `torch.compile` (off by default; compiled
            once per model and reused by later `generate` calls; a batch whose rows leave early, or blocks of other
            lengths, recompile once for dynamic shapes). Same samples as eager up to float rounding.
        output_trajectory: with `return_dict_in_generate`, also return the token draft after every step.
        max_new_tokens, temperature, top_k, top_p, return_dict_in_generate, pad/bos/eos ids: as in transformers.

    The adaptive samplers (`ADAPTIVE_SAMPLERS`; see `DiffusionLMGenerationMixin._commit_step`) decide per step which
    positions to commit; `num_steps` is then an upper bound on the network calls (of each block). Their settings,
    present on the classes whose samplers use them (`ADAPTIVE_FIELDS`):
        confidence_threshold (MDLM, `sampler="confidence"`): commit every masked position whose top probability
            under x_hat is >= this; in (0, 1].
        entropy_bound (`sampler="entropy_bound"`): commit the lowest-entropy positions while their summed entropy
            (nats) stays <= this; > 0.
        allow_revision (SDDLM, Duo): with `"entropy_bound"`, a committed token that ranks under the bound again is
            corrected to x_hat's mode (the self-correction of uniform-state models); False: committed tokens stay.
        stability_steps: with revision, a row ends once every position is committed and nothing changed for this
            many steps (RePlaid's `stop_when_stable`: once its argmax decode did not change for this many steps).
        stop_when_stable (RePlaid): end a row early when its argmax decode is stable (`stability_steps`).
    """

    SAMPLERS: tuple[str, ...] = ("ancestral", "greedy_tail")
    ADAPTIVE_SAMPLERS: tuple[str, ...] = ()
    ADAPTIVE_FIELDS: dict = {}
    DEFAULT_NUM_STEPS = 128
    DEFAULT_SAMPLER = "ancestral"
    FINAL_STEPS: tuple[str, ...] = ("grid", "noise_removal")
    DEFAULT_FINAL_STEP = "noise_removal"

    def __init__(self, **kwargs):
        self.num_steps = kwargs.pop("num_steps", self.DEFAULT_NUM_STEPS)
        self.sampler = kwargs.pop("sampler", self.DEFAULT_SAMPLER)
        self.final_step = kwargs.pop("final_step", self.DEFAULT_FINAL_STEP)
        self.noise_removal_eps = kwargs.pop("noise_removal_eps", 1e-5)
        self.block_size = kwargs.pop("block_size", None)
        for name, default in self.ADAPTIVE_FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        self.show_progress = kwargs.pop("show_progress", False)
        self.torch_compile = kwargs.pop("torch_compile", False)
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
        if self.block_size is not None and not _is_positive_int(self.block_size):
            bad("block_size", "None (off) or an integer >= 1")
        if hasattr(self, "confidence_threshold") and not (_is_number(self.confidence_threshold)
                                                          and 0 < self.confidence_threshold <= 1):
            bad("confidence_threshold", "a probability in (0, 1]")
        if hasattr(self, "entropy_bound") and not (_is_number(self.entropy_bound) and self.entropy_bound > 0
                                                   and math.isfinite(self.entropy_bound)):
            bad("entropy_bound", "a finite number of nats > 0")
        if not isinstance(self.torch_compile, bool):
            bad("torch_compile", "True or False")
        for flag in ("allow_revision", "stop_when_stable"):
            if hasattr(self, flag) and not isinstance(getattr(self, flag), bool):
                bad(flag, "True or False")
        if hasattr(self, "stability_steps") and not _is_positive_int(self.stability_steps):
            bad("stability_steps", "an integer >= 1")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class UniformGenerationConfig(DiffusionGenerationConfig):
    """Uniform-state sampling (SDDLM, Duo): ancestral, greedy-tail, or the adaptive `"entropy_bound"` sampler (from a
    uniform canvas; uncommitted positions are re-noised with uniform tokens every step, committed ones may be revised
    with `allow_revision`)."""

    SAMPLERS = ("ancestral", "greedy_tail", "entropy_bound")
    ADAPTIVE_SAMPLERS = ("entropy_bound",)
    ADAPTIVE_FIELDS = {"entropy_bound": 0.1, "allow_revision": False, "stability_steps": 1}


class SDDLMGenerationConfig(UniformGenerationConfig):
    pass


class DuoGenerationConfig(UniformGenerationConfig):
    """Duo; distilled checkpoints save few-step greedy-tail defaults (e.g. num_steps=8, sampler="greedy_tail")."""


class MDLMGenerationConfig(DiffusionGenerationConfig):
    r"""MDLM. `cache_predictions` (default True) is MDLM's caching sampler, per sequence: a sequence whose z_t did not
    change in a step keeps its x_hat, and the network runs only on the sequences that changed (no call at all when
    none did). Exact, because the network ignores time: the samples are those of plain ancestral sampling with the
    same generator. False calls the network on the whole batch at every step.
    The adaptive samplers: `"confidence"` (Fast-dLLM's threshold rule, `confidence_threshold`) and `"entropy_bound"`
    (`entropy_bound`); both commit masked positions only (MDLM is not trained on unmasked ones, so there is no
    revision)."""

    SAMPLERS = ("ancestral", "greedy_tail", "confidence", "entropy_bound")
    ADAPTIVE_SAMPLERS = ("confidence", "entropy_bound")
    ADAPTIVE_FIELDS = {"confidence_threshold": 0.9, "entropy_bound": 0.1}

    def __init__(self, **kwargs):
        self.cache_predictions = kwargs.pop("cache_predictions", True)
        super().__init__(**kwargs)

    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None):
        super().validate(strict, user_set_attributes)
        if not isinstance(self.cache_predictions, bool):
            raise ValueError(f"`cache_predictions` must be True or False, got {self.cache_predictions!r}")


class RePlaidGenerationConfig(DiffusionGenerationConfig):
    r"""RePlaid sampling. `score_temperature` (Plaid default 0.9 in its sampler, 1.0 here = plain VDM) divides the
    predicted noise; `sampler` is `"ancestral"` (VDM/DDPM) or `"ddim"`. `stop_when_stable=True` is RePlaid's adaptive
    stop: a row ends (and leaves the network's batch) once its argmax decode has not changed for `stability_steps`
    consecutive steps; its tokens are that decode."""

    SAMPLERS = ("ancestral", "ddim")
    ADAPTIVE_FIELDS = {"stop_when_stable": False, "stability_steps": 8}

    def __init__(self, **kwargs):
        self.score_temperature = kwargs.pop("score_temperature", 1.0)
        super().__init__(**kwargs)

    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None):
        super().validate(strict, user_set_attributes)
        if not (_is_number(self.score_temperature) and self.score_temperature > 0):
            raise ValueError(f"`score_temperature` must be a number > 0, got {self.score_temperature!r}")


@dataclass
class DiffusionGenerateOutput(ModelOutput):
    """`sequences` (B, L) token ids; `trajectory` (steps run, B, L) drafts if requested; `num_forward_passes`: network
    calls; `num_forward_sequences`: sequences those calls ran on in total (num_steps x B without MDLM's cache or an
    adaptive sampler); `num_forward_passes_per_sequence` (B,) long: the network calls each sequence took part in
    (adaptive samplers and RePlaid's `stop_when_stable` end each row on its own)."""

    sequences: torch.LongTensor | None = None
    trajectory: torch.LongTensor | None = None
    num_forward_passes: int | None = None
    num_forward_sequences: int | None = None
    num_forward_passes_per_sequence: torch.LongTensor | None = None


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
        are returned as pad (without a prompt, leading EOS tokens that are also the BOS do not count).
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
                draft, trajectory, state = self._sampling_loop(canvas, given, mask, gen, generator, streamer,
                                                               appended=infill_mask is None)
        finally:
            self.train(was_training)

        if infill_mask is None and self._stops_at_eos(gen):
            start = canvas.shape[1] - (gen.max_new_tokens or 0)
            # Unconditional, with BOS == EOS (GPT-2-style tokenizers): a leading EOS is the document's start
            draft = pad_after_eos(draft, start, gen.eos_token_id, gen.pad_token_id,
                                  skip_leading=start == 0 and _bos_is_eos(gen))
        if streamer is not None:
            streamer.put(draft[:, prompt_len:].cpu())
            streamer.end()
        if gen.return_dict_in_generate:
            return DiffusionGenerateOutput(
                sequences=draft,
                trajectory=torch.stack(trajectory) if trajectory else None,
                num_forward_passes=state["forward_passes"],
                num_forward_sequences=state["forward_sequences"],
                num_forward_passes_per_sequence=state["row_passes"],
            )
        return draft


    def _sampling_loop(self, canvas, given, mask, gen, generator, streamer, appended: bool = True):
        """The one sampling loop. One prior draw for the whole canvas; then, block by block (one block, the whole
        canvas, without `block_size`), one network call and one step per iteration, on the rows still running.
        Fixed-grid samplers step the process along the time grid (`process.step`, then `process.fix` clamps the
        given tokens); adaptive samplers commit positions by their rule (`_commit_step`). Returns (draft (B, L),
        trajectory, state)."""
        process = self.noise_process
        B, L = canvas.shape
        device = canvas.device
        state = {"mask": mask, "forward_passes": 0, "forward_sequences": 0, "row_index": None,
                 "row_passes": torch.zeros(B, dtype=torch.long, device=device)}
        prior = process.prior_sample(canvas.shape, generator, device)  # (B, L): one draw, whatever the blocks
        blocks = _blocks(gen, given)
        if len(blocks) == 1 and blocks[0] == (0, L):
            budgets = [gen.num_steps]
        else:
            if gen.num_steps < len(blocks):
                raise ValueError(f"`num_steps`={gen.num_steps} is fewer than the {len(blocks)} blocks of "
                                 f"`block_size`={gen.block_size}: every block needs at least one step")
            share, extra = divmod(gen.num_steps, len(blocks))
            budgets = [share + (i < extra) for i in range(len(blocks))]
        prior_tokens = process.tokens(prior)
        out = canvas if prior_tokens is None else torch.where(given, canvas, prior_tokens)  # (B, L) the draft
        trajectory = []
        stop_ids = self._block_stop_ids(gen, given) if appended else None
        for (start, end), budget in zip(blocks, budgets):
            width_given = given[:, :end] | (torch.arange(end, device=device) < start)  # earlier blocks: context
            block_generator = generator.narrow(L - end) if isinstance(generator, RowGenerators) else generator
            state["mask"] = None if mask is None else mask[:, :end]
            state.pop("logits", None)  # MDLM's cache belongs to one block's canvas
            z = process.fix(_state_map(prior, lambda x, end=end: x[:, :end]), out[:, :end], width_given)

            def emit(z_block, end=end, out=out):
                draft = process.tokens(z_block)
                full = draft if end == L else torch.cat([draft, out[:, end:]], dim=1)
                if gen.output_trajectory:
                    trajectory.append(full)
                if streamer is not None and hasattr(streamer, "put_draft"):
                    streamer.put_draft(full.cpu())

            z = self._decode_block(process, z, out[:, :end], width_given, gen, block_generator, budget, state, emit)
            out = process.tokens(z) if end == L else torch.cat([process.tokens(z), out[:, end:]], dim=1)
            if stop_ids is not None and end < L and bool(_eos_stops(out[:, stop_ids[1]:end], stop_ids[0],
                                                                    stop_ids[2]).any(-1).all()):
                break  # every row has generated EOS: the later blocks would be padding
        state["mask"] = mask
        return out, trajectory, state

    def _block_stop_ids(self, gen, given):
        """(EOS ids tensor, first generated column, whether a leading EOS run is a document start rather than a stop)
        when semi-AR blocks may stop at EOS, else None."""
        if gen.block_size is None or not self._stops_at_eos(gen):
            return None
        first = int(given.long().sum(-1).min())  # appended generation: every row's prompt spans this many columns
        return torch.as_tensor(gen.eos_token_id, device=given.device).reshape(-1), first, \
            first == 0 and _bos_is_eos(gen)

    def _decode_block(self, process, z, x0, given, gen, generator, num_steps, state, emit):
        """Up to `num_steps` iterations on the canvas prefix z (B, W): the network on the rows still running, then
        the sampler's step. Fixed grid: every row runs every step (no host sync) unless RePlaid's
        `stop_when_stable`; adaptive samplers: a row ends when its rule says so (one host sync per step)."""
        adaptive = gen.sampler in getattr(gen, "ADAPTIVE_SAMPLERS", ())
        stable_stop = bool(getattr(gen, "stop_when_stable", False))
        options = self._step_options(gen)
        B = x0.shape[0]
        ts = sampling_time_grid(gen, x0.device, num_steps)
        commit = _CommitState(given) if adaptive or stable_stop else None  # per-row commitments, unchanged-counts
        # the rows still running: None = every row, every step (the fixed grid: no host sync)
        running = (~given).any(-1) if adaptive else torch.ones(B, dtype=torch.bool, device=x0.device) \
            if stable_stop else None
        for k in _progress(range(num_steps), gen.show_progress, f"{type(self).__name__} sampling"):
            rows = None
            if running is not None:
                if not bool(running.any()):
                    break
                if not bool(running.all()):
                    rows = running.nonzero().squeeze(-1)
            sub = (lambda x: x) if rows is None else (lambda x, rows=rows: x[rows])
            z_rows, x0_rows, given_rows = _state_map(z, sub), sub(x0), sub(given)
            row_generator = generator
            if rows is not None and isinstance(generator, RowGenerators):
                row_generator = generator.select(rows.tolist())
            full_mask = state["mask"]
            state["mask"], state["row_index"] = (None if full_mask is None else sub(full_mask)), rows
            final = k == num_steps - 1  # s = 0 exactly: a flag, not a comparison of tensors (no host sync)
            if adaptive:
                t = commit.time(process, gen, rows)  # (n,) float64: the noise level of each row's canvas
                state["unfiltered"] = True
                logits = self._sampling_logits(process, z_rows, t, state, gen)  # x_hat logits (n, W, V), float32
                state["unfiltered"] = False
                z_new, done = self._commit_step(process, gen, logits, z_rows, commit, rows, num_steps - k,
                                                row_generator)
            else:
                logits = self._sampling_logits(process, z_rows, ts[k], state, gen)
                z_new = process.step(logits, z_rows, ts[k], ts[k + 1], generator=row_generator, final=final,
                                     **options)
                z_new = process.fix(z_new, x0_rows, given_rows, ts[k + 1], generator=row_generator, final=final)
                done = None
                if stable_stop and k > 0:  # the first step has no earlier decode to compare with
                    same = (process.tokens(z_new) == process.tokens(z_rows)).all(-1)  # (n,)
                    commit.update(rows, commit.accepted(rows), ~same)
                    done = commit.unchanged(rows) >= gen.stability_steps
            state["mask"], state["row_index"] = full_mask, None
            z = z_new if rows is None else _state_put(z, rows, z_new)
            if done is not None:
                if rows is None:
                    running = running & ~done
                else:
                    running[rows] = running[rows] & ~done
            emit(z)
        return z

    def _commit_step(self, process, gen, logits, z, commit, rows, steps_left, generator):
        """One step of an adaptive sampler on the running rows (n, W): which positions to commit, their tokens, and
        the re-noised rest. Returns (z (n, W), done (n,) bool).
        - `"confidence"` (MDLM): every open (masked) position whose top probability under x_hat is >=
          `confidence_threshold`;
        - `"entropy_bound"`: the open positions by increasing entropy of x_hat, as many as keep the summed entropy
          <= `entropy_bound` (with `allow_revision`, the ranking runs over every generated position, and a committed
          one that ranks again takes x_hat's mode: a correction to what the model is now sure of, not a fresh draw,
          so a settled canvas stops changing);
        and always at least max(1, ceil(open / steps_left)) open positions, the best ranked: at least one per step,
        and the canvas is complete by the last step, so `num_steps` bounds the calls. Positions are ranked by x_hat
        itself (the network's distribution); committed positions draw from x_hat after temperature / top-k / top-p
        (`top_k=1`: the argmax); positions not committed yet are
        re-noised from the process's prior (uniform tokens; MDLM: they stay masked). A row is done when every
        position is committed and, with revision, nothing changed for `stability_steps` steps."""
        given, accepted = commit.given(rows), commit.accepted(rows)
        open_ = ~given & ~accepted  # (n, W) positions still to commit
        entropy, top = softmax_stats(logits)  # (n, W) each, float32: of x_hat itself, before any filtering
        remaining = open_.sum(-1, keepdim=True)  # (n, 1)
        floor = torch.clamp(-(-remaining // steps_left), min=1)  # ceil(remaining / steps_left), at least 1
        if gen.sampler == "confidence":
            score = torch.where(open_, top, -1.0)  # higher is better
            by_rule = open_ & (top >= gen.confidence_threshold)
        else:
            revise = bool(getattr(gen, "allow_revision", False))
            ranked = ~given if revise else open_
            key = torch.where(ranked, entropy, float("inf"))
            order = torch.argsort(key, dim=-1, stable=True)  # (n, W) ascending entropy; not-ranked positions last
            within = torch.cumsum(key.gather(-1, order), -1) <= gen.entropy_bound  # (n, W) in sorted order
            by_rule = torch.zeros_like(open_).scatter(-1, order, within) & ranked
            score = torch.where(open_, -entropy, -float("inf"))
        best_first = torch.argsort(score, dim=-1, descending=True, stable=True)
        rank = torch.argsort(best_first, dim=-1, stable=True)  # (n, W) each position's rank, 0 = best
        chosen = by_rule | (open_ & (rank < floor))  # (n, W)
        positions = chosen.nonzero(as_tuple=True)
        draws = sample_at(lambda where: torch.softmax(filter_logits(logits[where], gen.temperature, gen.top_k,
                                                                     gen.top_p), dim=-1),
                          positions, tuple(z.shape), generator, z.device)
        z_new = z.clone()
        z_new[positions] = draws
        revised = (chosen & accepted).nonzero(as_tuple=True)  # committed tokens that ranked again (revision only)
        if revised[0].numel():
            z_new[revised] = logits[revised].argmax(-1)  # corrected to x_hat's mode: the canvas can settle
        changed = (chosen & (open_ | (z_new != z))).any(-1)  # (n,) a new commitment or a revised token
        accepted = accepted | chosen
        noise = process.prior_sample(tuple(z.shape), generator, z.device)
        z_new = torch.where(given | accepted, z_new, noise)  # uncommitted positions: back to the prior
        commit.update(rows, accepted, changed)
        complete = (given | accepted).all(-1)
        if getattr(gen, "allow_revision", False):
            done = complete & (commit.unchanged(rows) >= gen.stability_steps)
        else:
            done = complete
        return z_new, done

    @staticmethod
    def _stops_at_eos(gen: DiffusionGenerationConfig) -> bool:
        stop = getattr(gen, "stop_at_eos", None)
        if stop and gen.eos_token_id is None:
            raise ValueError("`stop_at_eos=True` needs an `eos_token_id` in the generation config")
        return gen.eos_token_id is not None if stop is None else stop

    def _step_options(self, gen: DiffusionGenerationConfig) -> dict:
        """The process step's sampler options (hook: RePlaid's DDIM and score temperature)."""
        return {"greedy": gen.sampler == "greedy_tail"}

    def _compiled_forward(self):
        """`torch.compile(self.forward)`, built on first use and kept outside the module tree (not a submodule, not
        in the state dict)."""
        compiled = self.__dict__.get("_dlm_compiled_forward")
        if compiled is None:
            compiled = self.__dict__["_dlm_compiled_forward"] = torch.compile(self.forward)
        return compiled

    def _sampling_logits(self, process, z, t, state: dict, gen: DiffusionGenerationConfig) -> torch.Tensor:
        """The filtered logits of x_hat at (z, t) (hook: MDLM reuses each row's logits while its z is unchanged)."""
        return self._network_logits(process, z, t, state["mask"], state, gen)

    def _network_logits(self, process, z, t, mask, state: dict, gen: DiffusionGenerationConfig,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
        """One network call at (z, t), counted in `state` (per sequence too: `rows` are the rows of z it runs on,
        None = all); the process's x_hat logits (SUBS for MDLM), then temperature, top-k and top-p (float32,
        (n, L, V))."""
        network = self._compiled_forward() if gen.torch_compile else self
        logits = network(**process.model_inputs(z, t), attention_mask=mask).logits
        state["forward_passes"] += 1
        state["forward_sequences"] += logits.shape[0]
        index = state.get("row_index")  # the batch rows of z (None: z is the whole batch)
        if rows is not None:
            index = rows if index is None else index[rows]
        passes = state.get("row_passes")  # absent for a caller stepping by hand (bench/sampling_step.py)
        if passes is not None and index is None:
            passes += 1
        elif passes is not None:
            passes[index] += 1
        if state.get("unfiltered"):  # an adaptive sampler ranks by x_hat itself and filters its draws
            return process.denoise_logits(logits).float()
        return filter_logits(process.denoise_logits(logits), gen.temperature, gen.top_k, gen.top_p)


class _CommitState:
    """What an adaptive sampler keeps between steps, for the whole batch (B, W): the given positions, the committed
    ones and each row's count of steps without a change."""

    def __init__(self, given: torch.Tensor):
        self._given = given
        self._accepted = torch.zeros_like(given)
        self._unchanged = torch.zeros(given.shape[0], dtype=torch.long, device=given.device)

    def _rows(self, value, rows):
        return value if rows is None else value[rows]

    def given(self, rows):
        return self._rows(self._given, rows)

    def accepted(self, rows):
        return self._rows(self._accepted, rows)

    def unchanged(self, rows):
        return self._rows(self._unchanged, rows)

    def time(self, process, gen, rows) -> torch.Tensor:
        """The time of each running row's canvas (n,) float64: the committed share of its generated positions is its
        keep probability alpha (the process's marginal at that level: clean committed tokens, prior elsewhere),
        mapped through the schedule and kept in [noise_removal_eps, 1], the range the network was trained on."""
        given, accepted = self.given(rows), self.accepted(rows)
        share = accepted.sum(-1).double() / (~given).sum(-1).clamp(min=1).double()  # (n,)
        return process.schedule.t_from_alpha(share).clamp(gen.noise_removal_eps, 1.0)

    def update(self, rows, accepted, changed) -> None:
        unchanged = torch.where(changed, 0, self.unchanged(rows) + 1)
        if rows is None:
            self._accepted, self._unchanged = accepted, unchanged
        else:
            self._accepted[rows], self._unchanged[rows] = accepted, unchanged


def _blocks(gen, given: torch.Tensor) -> list[tuple[int, int]]:
    """The (start, end) column ranges decoded one after the other: [(0, W)] without `block_size`; else blocks of
    `block_size` columns from the first column any row generates, skipping blocks with nothing to generate."""
    W = given.shape[1]
    if gen.block_size is None:
        return [(0, W)]
    todo = (~given).any(0)  # (W,) columns some row generates
    first = int(todo.long().argmax()) if bool(todo.any()) else W
    blocks = []
    for start in range(first, W, gen.block_size):
        end = min(start + gen.block_size, W)
        if bool(todo[start:end].any()):
            blocks.append((start, end))
    return blocks or [(0, W)]


def _state_map(z, fn):
    """`fn` applied to a sampler state: a tensor, or each tensor field of a state dataclass (RePlaid's latent)."""
    if isinstance(z, torch.Tensor):
        return fn(z)
    return dataclasses.replace(z, **{f.name: fn(getattr(z, f.name)) for f in dataclasses.fields(z)
                                     if isinstance(getattr(z, f.name), torch.Tensor)})


def _state_put(z, rows: torch.Tensor, z_rows):
    """The state z with its `rows` replaced by z_rows (fields that z lacks yet are created)."""
    if isinstance(z, torch.Tensor):
        out = z.clone()
        out[rows] = z_rows
        return out
    values = {}
    for f in dataclasses.fields(z):
        full, part = getattr(z, f.name), getattr(z_rows, f.name)
        if part is None:
            values[f.name] = full
            continue
        out = part.new_zeros((_batch_size(z),) + tuple(part.shape[1:])) if full is None else full.clone()
        out[rows] = part
        values[f.name] = out
    return dataclasses.replace(z, **values)


def _batch_size(z) -> int:
    return next(getattr(z, f.name).shape[0] for f in dataclasses.fields(z)
                if isinstance(getattr(z, f.name), torch.Tensor))


def _bos_is_eos(gen: DiffusionGenerationConfig) -> bool:
    """Whether the config's BOS id is one of its EOS ids (GPT-2-style tokenizers: one token for both)."""
    return gen.bos_token_id is not None and gen.bos_token_id in torch.as_tensor(gen.eos_token_id).reshape(-1).tolist()


def _eos_stops(new: torch.Tensor, eos: torch.Tensor, skip_leading: bool) -> torch.Tensor:
    """(B, L') bool: the EOS positions of the new tokens `new` that end a sample; with `skip_leading`, not the run of
    EOS that opens it (a document's start when BOS is EOS)."""
    is_eos = torch.isin(new, eos.to(new.device))
    return is_eos & ~is_eos.long().cumprod(-1).bool() if skip_leading else is_eos


def pad_after_eos(ids: torch.Tensor, start: int, eos_token_id, pad_token_id, skip_leading: bool = False
                  ) -> torch.Tensor:
    """`ids` (B, L) with every position after the first EOS at or after `start` (the first new token) set to
    `pad_token_id` (the first EOS id when None); the EOS itself and everything before `start` stay. With
    `skip_leading`, the EOS tokens that open the new tokens do not count (an unconditional sample whose tokenizer
    uses one token as BOS and EOS starts with it: the start of a document, not its end). No host sync: the ids are
    config values, made tensors here."""
    eos = torch.as_tensor(eos_token_id).reshape(-1)  # on the CPU: reading the pad id from it syncs nothing
    pad = int(eos[0]) if pad_token_id is None else int(torch.as_tensor(pad_token_id).reshape(-1)[0])
    new = ids[:, start:]
    is_eos = _eos_stops(new, eos, skip_leading)  # (B, L')
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


def sampling_time_grid(gen: DiffusionGenerationConfig, device=None, num_steps: int | None = None) -> torch.Tensor:
    """The times of the loop, (num_steps + 1,) float64 from 1 to 0: call k runs at ts[k] and steps to ts[k + 1]; the
    last call (ts[-2] -> 0) decodes. `final_step="grid"`: 1 - k / num_steps; `"noise_removal"`:
    linspace(1, eps, num_steps) then 0. `num_steps` defaults to the config's (a block's share with `block_size`)."""
    num_steps = gen.num_steps if num_steps is None else num_steps
    if gen.final_step == "grid":
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64, device=device)
    ts = torch.linspace(1.0, gen.noise_removal_eps, num_steps, dtype=torch.float64, device=device)
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
        adaptive = gen.sampler in gen.ADAPTIVE_SAMPLERS  # they change every running row at every step: no reuse
        if adaptive or logits is None or self.config.time_conditioning or not getattr(gen, "cache_predictions", True):
            logits = self._network_logits(process, z, t, state["mask"], state, gen)
        else:
            stale = (z != state["last_z"]).any(-1)  # (B,)
            rows = stale.nonzero().squeeze(-1)  # (n,)
            if rows.numel() == z.shape[0]:
                logits = self._network_logits(process, z, t, state["mask"], state, gen)
            elif rows.numel():
                mask = None if state["mask"] is None else state["mask"][rows]
                logits[rows] = self._network_logits(process, z[rows], t, mask, state, gen, rows=rows)
        # no carry-over needed: the step only ever changes masked positions, and softmaxes only the rows it unmasks
        if not adaptive:
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
