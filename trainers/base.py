"""`DiffusionTrainer`: the `transformers.Trainer` seam shared by every dlm objective.

The default objective is the NELBO through the model's one loss path (`nelbo_per_token`: the noise process's draw,
the network, the process's bound), the same path `model.nelbo` evaluates. A variant trainer overrides only what
differs, through the hook `diffusion_loss(model, unwrapped, input_ids, attention_mask, t, generator)` (the scalar
loss and a dict of components to log) and, for a richer plan than the times t, `batch_plan`. The base class:
- draws stratified ("antithetic") times over the *global* batch: ranks and gradient-accumulation micro-batches take
  disjoint slices of one evenly spaced grid (methods.md §B.3.1), from generators derived from (seed, step), so a
  resumed run redraws exactly the same t and noise;
- calls the network through the (possibly DDP/FSDP-wrapped) `model`, and the noise process through the unwrapped one;
- takes conditional (SFT) batches: a `prompt_mask` column (1 on prompt tokens, `trainers.data.build_sft_datasets`)
  reaches the objective as `diffusion_loss(..., prompt_mask=...)`; every process keeps the prompt clean at every t
  and the loss counts response tokens only;
- weighs every loss token of the optimizer step equally: each micro-batch's per-token mean is scaled by its share of
  the step's loss tokens (`num_items_in_batch`: real tokens outside the prompt, summed over the accumulation
  micro-batches and, with `average_tokens_across_devices`, over ranks), so responses of different lengths,
  accumulation and ranks give one global token mean (`loss_is_scaled_for_ga = True`);
- evaluates the NELBO (a true bound, never the training loss) token-weighted over the whole eval set:
  `eval_loss` = `eval_nelbo` (nats/token), plus `eval_ppl_bound` = exp(eval_nelbo), `eval_bpd` and `eval_tokens`;
- reads no tensor value on the host between logging steps (`tests/test_step_syncs.py`): loss components accumulate
  on the device, and the NaN guard (`nan_guard_policy="skip"`) skips a non-finite optimizer step on the device and
  reports it at the next logging step;
- keeps an optional EMA (`ema_decay`) that is saved with checkpoints and swapped in for evaluation and `save_model`;
- makes checkpoints crash-safe: a checkpoint counts as complete only once `dlm_checkpoint.json` (written last,
  atomically, with every file's size) is in it; older checkpoints are rotated out only after that; and
  `train(resume_from_checkpoint=True)` resumes from the newest *complete* checkpoint, refusing a truncated one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping

import torch
from accelerate.utils import DistributedType
from transformers import Trainer

from modeling_dlm.generation_dlm import check_token_ids
from modeling_dlm.modeling_dlm import check_prompt_mask, response_mask
from modeling_dlm.noise_schedules import antithetic_times

from .arguments import DiffusionTrainingArguments
from .callbacks import EMACallback, NonFiniteGuardCallback, full_tensors
from .evaluation import nelbo_batch_sums
from .profiling import host_side


logger = logging.getLogger(__name__)
CHECKPOINT_MARKER = "dlm_checkpoint.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def write_checkpoint_marker(folder: str, step: int) -> None:
    """Record every file of a finished checkpoint with its size, atomically (temp file, fsync, rename)."""
    files = {}
    for root, dirs, names in os.walk(folder):  # sharded (FSDP) checkpoints keep their shards in sub-folders
        dirs.sort()
        for name in sorted(names):
            relative = os.path.relpath(os.path.join(root, name), folder)
            if relative not in (CHECKPOINT_MARKER, CHECKPOINT_MARKER + ".tmp"):
                files[relative] = os.path.getsize(os.path.join(root, name))
    tmp = os.path.join(folder, CHECKPOINT_MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, CHECKPOINT_MARKER))


def checkpoint_problem(folder: str) -> str | None:
    """Why `folder` is not a complete dlm checkpoint, or None if it is."""
    marker = os.path.join(folder, CHECKPOINT_MARKER)
    if not os.path.isfile(marker):
        return f"no {CHECKPOINT_MARKER} (the save was interrupted)"
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable {CHECKPOINT_MARKER}: {err}"
    for name, size in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {size} were written"
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir` (incomplete newer ones are logged and skipped)."""
    if not os.path.isdir(output_dir):
        return None
    found = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir)
                    if (m := _CHECKPOINT_DIR.match(name)) and os.path.isdir(os.path.join(output_dir, name))),
                   reverse=True)
    for _, name in found:
        folder = os.path.join(output_dir, name)
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("skipping incomplete checkpoint %s: %s", folder, problem)
    return None


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, L) values over the positions where mask is 1 (all positions if mask is None)."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _check_dataset(dataset, name: str) -> None:
    """A dataset the Trainer cannot use fails here, naming it: no `input_ids` column (raw text) or no rows."""
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, list) and "input_ids" not in columns:
        raise ValueError(f"{name} has no `input_ids` column (columns: {columns}); tokenize it first, e.g. with "
                         f"trainers.data.build_datasets")
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{name} is empty (0 rows)")


def _mix(*numbers: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix-style), for per-(seed, step, rank) generators."""
    x = 0x9E3779B97F4A7C15
    for n in numbers:
        x = (x ^ (int(n) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def loss_tokens(inputs) -> torch.Tensor:
    """The number of positions of a batch that carry a loss: real tokens outside the prompt (a 0-d tensor)."""
    input_ids = inputs["input_ids"]
    mask = response_mask(inputs.get("attention_mask"), inputs.get("prompt_mask"))
    return torch.tensor(input_ids.numel(), device=input_ids.device) if mask is None else mask.sum()


class DropFullAttentionMask:
    """Wraps a data collator: drops an `attention_mask` that is all ones, on the host where the batch is built, so the
    network takes its unmasked attention path without the training step reading the mask on the device (a sync)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        with host_side():
            if isinstance(mask, torch.Tensor) and mask.device.type == "cpu" and bool(mask.all()):
                batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        return batch


class DiffusionTrainer(Trainer):
    loss_is_scaled_for_ga = True  # compute_loss scales each micro-batch by its share of the step's loss tokens
    #: the `model_type`s this trainer's objective is for (None: any dlm model, with its own `nelbo_per_token`)
    model_types: tuple[str, ...] | None = None
    #: under FSDP2, the modules (a regex over module names) that stay whole on every rank (torch's `ignored_params`),
    #: e.g. tiny modules that the objective reads outside the model's forward; their gradients are averaged over the
    #: processes before clipping, as DDP would (`_average_replicated_gradients`)
    fsdp_replicated_modules: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DiffusionTrainingArguments):
            raise TypeError(
                f"{type(self).__name__} needs `args` of type DiffusionTrainingArguments, "
                f"got {type(self.args).__name__}"
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not hasattr(unwrapped, "noise_process"):
            raise TypeError(f"{type(self).__name__} needs a dlm diffusion model, got {type(unwrapped).__name__} "
                            f"(it has no `noise_process`; for a checkpoint whose shipped code predates it, load the "
                            f"weights with this version's `modeling_dlm` classes instead of its remote code)")
        model_type = getattr(getattr(unwrapped, "config", None), "model_type", None)
        if self.model_types is not None and model_type not in self.model_types:
            raise ValueError(f"{type(self).__name__} trains {' or '.join(self.model_types)} models, got a "
                             f"{model_type!r} model ({type(unwrapped).__name__}); use "
                             f"trainers.TRAINERS[{model_type!r}]")
        _check_dataset(self.train_dataset, "train_dataset")
        eval_sets = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"": self.eval_dataset}
        for name, dataset in eval_sets.items():
            _check_dataset(dataset, f"eval_dataset[{name!r}]" if name else "eval_dataset")
        self._train_ids_checked = False
        # the trainer writes the EMA itself, inside the checkpoint's completion marker
        self.ema = EMACallback(self.args.ema_decay, save_on_checkpoint=False,
                                warmup=self.args.ema_warmup) if self.args.ema_decay > 0 else None
        if self.ema is not None:
            self.add_callback(self.ema)
        if not isinstance(self.data_collator, DropFullAttentionMask):
            self.data_collator = DropFullAttentionMask(self.data_collator)
        self._guard: str | None = None  # "skip" / "stop" once the optimizer is known (`_guard_mode`)
        if self.args.nan_guard:
            self.add_callback(NonFiniteGuardCallback(active=lambda: self._guard_mode() == "stop"))
        self._step_finite: torch.Tensor | None = None  # this step's micro-batch losses all finite (device bool)
        self._step_loss: torch.Tensor | None = None  # this step's summed micro-batch losses (device)
        self._guard_window: dict[str, torch.Tensor] = {}  # skipped steps, first skipped, applied steps' loss sum
        self._guard_window_start = 0
        self._components: dict[str, list[torch.Tensor]] = defaultdict(list)  # detached, on the device
        self._micro_step = 0
        self._last_step = -1
        self._eval_batches = 0
        self._replicated_params: list[torch.nn.Parameter] | None = None  # FSDP2-ignored ones (trainable)

    def create_accelerator_and_postprocess(self):
        """accelerate (1.16) turns the Trainer's FSDP settings on only for accelerator device types (its MULTI_GPU,
        MULTI_NPU, ... branch); a multi-process CPU (gloo) job silently trains with DDP instead. Here such a job
        becomes the FSDP2 job it asked for: torch's `fully_shard` runs on CPU with gloo, through accelerate's own
        FSDP2 preparation, sharded checkpoints and full-state export."""
        super().create_accelerator_and_postprocess()
        plugin_args = self.args.fsdp_plugin_args
        state = self.accelerator.state
        if not plugin_args or state.distributed_type != DistributedType.MULTI_CPU:
            if self.is_fsdp_enabled:
                self._replicate_under_fsdp()
            return
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(**plugin_args)
        if plugin.fsdp_version != 2:
            raise ValueError(f"FSDP on CPU needs fsdp_config version 2 (torch's fully_shard), got version "
                             f"{plugin.fsdp_version}")
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
        self.is_fsdp_enabled = True
        self._replicate_under_fsdp()
        if self.args.process_index == 0:
            logger.info("FSDP2 on %d CPU processes (gloo), wrapping %s", self.args.world_size,
                        plugin_args.get("transformer_cls_names_to_wrap"))

    def _replicate_under_fsdp(self) -> None:
        """Hands `fsdp_replicated_modules` to the FSDP2 plugin as modules to leave unsharded."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if self.fsdp_replicated_modules is None or plugin is None:
            return
        if plugin.fsdp_version != 2:
            raise ValueError(f"{type(self).__name__} keeps {self.fsdp_replicated_modules!r} whole on every process, "
                             f"which needs FSDP version 2 (torch's fully_shard), got fsdp_config version "
                             f"{plugin.fsdp_version}")
        plugin.ignored_modules = rf"(.*\.)?(?:{self.fsdp_replicated_modules})"

    # ---- randomness -------------------------------------------------------------------------------------------------
    def _generators(self, device) -> tuple[torch.Generator, torch.Generator, int]:
        """(shared generator for the stratification offset, per-rank generator for noise, micro-batch index)."""
        step = self.state.global_step
        if step != self._last_step:
            self._last_step, self._micro_step = step, 0
        micro = self._micro_step
        self._micro_step += 1
        shared = torch.Generator(device=device).manual_seed(_mix(self.args.seed, step, 1))
        local = torch.Generator(device=device).manual_seed(
            _mix(self.args.seed, step, micro, self.args.process_index, 2)
        )
        return shared, local, micro

    def sample_times(self, batch_size: int, device, shared: torch.Generator, micro: int) -> torch.Tensor:
        """Stratified t over the global batch (world x accumulation x per-device batch), this micro-batch's slice.
        `shared` must be in the same state on every rank and micro-batch (it draws the common offset); without
        stratification (`antithetic_time=False`) it only seeds independent draws for this rank and micro-batch."""
        world, accumulation = self.args.world_size, self.args.gradient_accumulation_steps
        rank_micro = (micro % accumulation) * world + self.args.process_index
        if not self.args.antithetic_time:
            shared = torch.Generator(device=device).manual_seed(_mix(shared.initial_seed(), rank_micro, 4))
        return antithetic_times(batch_size, eps=self.args.sampling_eps, generator=shared, device=device,
                                offset=rank_micro * batch_size, total=world * accumulation * batch_size,
                                antithetic=self.args.antithetic_time)

    # ---- training ---------------------------------------------------------------------------------------------------
    def _batch(self, inputs) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(input_ids, attention_mask or None without padding, prompt_mask (bool) or None)."""
        if "input_ids" not in inputs:
            raise ValueError(f"batches need an `input_ids` column, got keys {sorted(inputs)}")
        input_ids = inputs["input_ids"]
        # an all-ones mask was dropped on the host by `DropFullAttentionMask`; one that reaches here is used as is
        attention_mask = inputs.get("attention_mask")
        return input_ids, attention_mask, check_prompt_mask(inputs.get("prompt_mask"), input_ids)

    def _get_num_items_in_batch(self, batch_samples: list, device) -> torch.Tensor | None:
        """The optimizer step's loss tokens (real tokens outside the prompt) over its micro-batches, summed over ranks
        with `average_tokens_across_devices` (the Trainer counts `labels`, which diffusion batches do not have)."""
        if not batch_samples or not all("input_ids" in batch for batch in batch_samples):
            return None
        count = sum(loss_tokens(batch).to(device) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    def _check_token_ids(self, input_ids, unwrapped) -> None:
        """Ids outside the model's vocabulary (a tokenizer that does not match the model) fail with a ValueError. One
        device sync, so only on the first training batch (the training step itself never checks: the network sees
        only the process's draws from these ids); evaluation batches are checked by `nelbo_batch_sums`."""
        vocab_size = getattr(getattr(unwrapped, "config", None), "vocab_size", None)
        if vocab_size is not None:
            check_token_ids(input_ids, vocab_size, "input_ids")
        if hasattr(unwrapped, "check_clean_ids"):  # absent from checkpoints whose shipped code predates it
            unwrapped.check_clean_ids(input_ids)  # e.g. MDLM: no mask token in clean data

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The objective's per-token mean of this micro-batch; inside a training step (`num_items_in_batch` given)
        scaled by this micro-batch's share of the step's loss tokens (times the ranks that average gradients), so
        that the step's gradient is that of the global token mean."""
        input_ids, attention_mask, prompt_mask = self._batch(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        if not self._train_ids_checked:
            self._check_token_ids(input_ids, unwrapped)
            self._train_ids_checked = True
        shared, local, micro = self._generators(input_ids.device)
        plan = self.batch_plan(input_ids.shape[0], input_ids.device, shared, micro)
        extra = {} if prompt_mask is None else {"prompt_mask": prompt_mask}  # a variant without SFT support: as before
        loss, components = self.diffusion_loss(model, unwrapped, input_ids, attention_mask, plan, local, **extra)
        if num_items_in_batch is not None:
            share = loss_tokens(inputs).to(loss.device, torch.float32) / torch.as_tensor(
                num_items_in_batch, device=loss.device, dtype=torch.float32).clamp(min=1)
            averaged = self.args.world_size if self.args.average_tokens_across_devices else 1
            loss = loss * (share * averaged)
        if model.training and self._guard_mode() == "stop" and not bool(torch.isfinite(loss.detach())):
            parts = ", ".join(f"{k}={float(v):.4g}" for k, v in components.items())
            t = plan if isinstance(plan, torch.Tensor) else plan.t
            raise FloatingPointError(
                f"non-finite training loss {float(loss.detach())} at step {self.state.global_step + 1} ({parts}; t in "
                f"[{float(t.min()):.4g}, {float(t.max()):.4g}]); training stopped before the update, so the weights "
                f"and the checkpoints in {self.args.output_dir} hold no NaN. Lower the learning rate or check the data"
            )
        if model.training:  # kept on the device: no host sync per step, one per logged component at `log`
            for key, value in components.items():
                self._components[key].append(torch.as_tensor(value, device=loss.device).detach().float())
        return (loss, None) if return_outputs else loss

    # ---- the NaN guard without host syncs ---------------------------------------------------------------------------
    def _guard_mode(self) -> str | None:
        """None (guard off), "skip" (on the device) or "stop" (host check per micro-batch). "skip" needs an
        optimizer that takes `found_inf` (fused Adam/AdamW/SGD, `_step_supports_amp_scaling`) and no fp16 GradScaler or
        DeepSpeed (which skip or check by themselves); otherwise "stop", logged once."""
        if not self.args.nan_guard:
            return None
        if self._guard is None and getattr(self, "optimizer", None) is not None:
            mode = self.args.nan_guard_policy
            inner = self._torch_optimizer()
            if mode == "skip" and (not getattr(inner, "_step_supports_amp_scaling", False)
                                   or getattr(self.accelerator, "scaler", None) is not None
                                   or self.is_deepspeed_enabled):
                if self.args.process_index == 0:
                    logger.info("nan_guard: %s cannot skip a step on the device; checking every step on the host "
                                "(nan_guard_policy='stop', one sync per step)", type(inner).__name__)
                mode = "stop"
            self._guard = mode
        return self._guard or self.args.nan_guard_policy

    def _torch_optimizer(self):
        """The torch optimizer inside accelerate's wrapper."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)  # detached, after backward
        if self._guard_mode() != "skip":
            return loss
        finite = torch.isfinite(loss)
        loss = torch.where(finite, loss, torch.zeros_like(loss))  # the Trainer's running loss stays finite
        self._step_finite = finite if self._step_finite is None else self._step_finite & finite
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        return loss

    def _average_replicated_gradients(self, model) -> None:
        """Under FSDP2: the gradients of the parameters that FSDP left whole (plain tensors among the DTensors,
        `fsdp_replicated_modules`) become their mean over the processes, in one collective (no host sync), once per
        optimizer step and before clipping: by `_clip_grad_norm`, or by `_get_grad_norm` when nothing was clipped."""
        if not self.is_fsdp_enabled or self.fsdp_replicated_modules is None or self.args.world_size < 2:
            return
        if self._replicated_params is None:  # found once, after wrapping: the plain tensors among the DTensors
            from torch.distributed.tensor import DTensor

            self._replicated_params = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]
        params = self._replicated_params
        if not params:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]  # same layout on every rank
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1).float() for g in grads]), reduction="mean")
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).to(p.dtype)

    def _clip_grad_norm(self, model):
        self._average_replicated_gradients(model)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm; with the "skip" guard also the step's verdict, on the device: a non-finite
        global norm (any non-finite gradient) or loss on any rank sets the optimizer's `found_inf`, and the fused
        kernel then leaves the weights, moments and step count as they were."""
        if grad_norm is None:  # no clipping this step (max_grad_norm 0): average here instead
            self._average_replicated_gradients(model)
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if self._guard_mode() != "skip" or not isinstance(grad_norm, torch.Tensor):
            return grad_norm
        norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        bad = ~torch.isfinite(norm.detach().float().reshape(()).to(self.args.device))
        if self._step_finite is not None:
            loss_bad = (~self._step_finite).float()
            if self.args.world_size > 1:  # one small collective, no host sync: every rank skips the same steps
                loss_bad = self.accelerator.reduce(loss_bad, reduction="sum")
            bad = bad | (loss_bad > 0)
        self._torch_optimizer().found_inf = bad.float()
        window = self._guard_window
        step = torch.full((), self.state.global_step + 1, device=bad.device)
        step_loss = self._step_loss if self._step_loss is not None else torch.zeros((), device=bad.device)
        if not window:
            window.update(skipped=torch.zeros((), device=bad.device), first=torch.full_like(step, -1),
                          loss=torch.zeros((), device=bad.device))
        window["skipped"] = window["skipped"] + bad
        window["first"] = torch.where(bad & (window["first"] < 0), step, window["first"])
        window["loss"] = window["loss"] + torch.where(bad, torch.zeros_like(step_loss), step_loss)
        self._step_finite = self._step_loss = None
        return grad_norm

    def _report_skipped(self, logs: dict | None) -> None:
        """At a logging step (one host read): warn about skipped steps and log their count with the loss of the
        applied steps; stop with FloatingPointError when every step since the last report was skipped."""
        window, start = self._guard_window, self._guard_window_start
        self._guard_window, self._guard_window_start = {}, self.state.global_step
        if not window:
            return
        skipped = int(window["skipped"])
        if skipped == 0:
            return
        steps, first = self.state.global_step - start, int(window["first"])
        if skipped >= steps:
            span = f"step {first}" if first == self.state.global_step else \
                f"step {first} and every step to {self.state.global_step}"
            raise FloatingPointError(
                f"non-finite training loss or gradients at {span}: those optimizer steps were skipped on the device, "
                f"so the weights and the checkpoints in {self.args.output_dir} hold no NaN. Training stopped: lower "
                f"the learning rate or check the data")
        logger.warning("skipped %d of %d optimizer steps (from step %d) with a non-finite loss or gradients; the "
                       "weights hold no NaN", skipped, steps, first)
        if logs is not None and "loss" in logs:
            applied = self.accelerator.reduce(window["loss"].to(self.args.device), reduction="mean")
            logs["loss"] = round(float(applied) / (steps - skipped), 4)
            logs["skipped_steps"] = skipped

    def batch_plan(self, batch_size: int, device, shared: torch.Generator, micro: int):
        """What this micro-batch trains, handed to `diffusion_loss` as its `t`: the stratified times (B,)
        (`sample_times`) by default; a variant may return a richer plan (RePlaid: `RePlaidBatchPlan`)."""
        return self.sample_times(batch_size, device, shared, micro)

    def diffusion_loss(self, model, unwrapped, input_ids, attention_mask, t, generator, prompt_mask=None):
        """Objective hook: returns (scalar loss, {name: float tensor to log}), a mean over the loss tokens
        (`response_mask(attention_mask, prompt_mask)`). `prompt_mask` (B, L) bool, given for conditional batches
        only: those positions stay clean in every process and carry no loss. The default is the NELBO: the masked
        token mean of the model's `nelbo_per_token` (the path `model.nelbo` takes), with the network called through
        the wrapped `model`; `noised_stats` adds what a variant logs from the draw."""
        per_token, noised = unwrapped.nelbo_per_token(input_ids, t, attention_mask, generator, network=model,
                                                      return_noised=True, prompt_mask=prompt_mask)  # (B, L)
        loss = masked_mean(per_token, response_mask(attention_mask, prompt_mask))
        return loss, {"nelbo": loss.detach(), **self.noised_stats(noised)}

    def noised_stats(self, noised) -> dict[str, torch.Tensor]:
        """Hook: values to log from the training draw (`functional_dlm.Noised`); none by default."""
        return {}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            self._report_skipped(logs)
        if "loss" in logs and self._components:
            for key, values in self._components.items():
                value = torch.stack(values)
                finite = torch.isfinite(value)  # a skipped step's non-finite components are left out
                value = (torch.where(finite, value, 0).sum() / finite.sum().clamp(min=1)).to(self.args.device)
                logs[key] = round(float(self.accelerator.reduce(value, reduction="mean")), 4)
            self._components.clear()
        super().log(logs, start_time)

    # ---- evaluation -------------------------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Returns (batch NELBO, per-sequence [NELBO sum, real tokens] (B, 2), None). The per-sequence sums travel as
        "logits" so that the evaluation loop gathers them across ranks with `gather_for_metrics`, which drops the
        samples a distributed sampler repeats to even out the last batch."""
        input_ids, attention_mask, prompt_mask = self._batch(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        self._eval_batches += 1  # `nelbo_batch_sums` checks this batch's ids
        generator = torch.Generator(device=input_ids.device).manual_seed(
            _mix(self.args.seed, self._eval_batches, self.args.process_index, 3)
        )
        nll, tokens = nelbo_batch_sums(unwrapped, input_ids, attention_mask,
                                       num_time_samples=self.args.eval_num_time_samples,
                                       eps=self.args.sampling_eps, generator=generator, per_sequence=True,
                                       prompt_mask=prompt_mask)
        sums = torch.stack([nll, tokens], dim=-1)  # (B, 2), float64
        return (nll.sum() / tokens.sum().clamp(min=1)).float().detach(), sums, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_batches = 0
        output = super().evaluation_loop(dataloader, description, False, ignore_keys, metric_key_prefix)
        sums = output.predictions
        if sums is None or len(sums) == 0 or float(sums[:, 1].sum()) == 0:
            raise ValueError("the evaluation dataset produced no tokens")
        nll, tokens = float(sums[:, 0].sum()), float(sums[:, 1].sum())
        nelbo = nll / tokens
        output.metrics.update({
            f"{metric_key_prefix}_loss": nelbo,
            f"{metric_key_prefix}_nelbo": nelbo,
            f"{metric_key_prefix}_ppl_bound": math.exp(min(nelbo, 700.0)),
            f"{metric_key_prefix}_bpd": nelbo / math.log(2),
            f"{metric_key_prefix}_tokens": tokens,
        })
        return output

    def evaluate(self, *args, **kwargs):
        if self.ema is None:
            return super().evaluate(*args, **kwargs)
        with self.ema.swapped(self.accelerator.unwrap_model(self.model)):
            return super().evaluate(*args, **kwargs)

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Checkpoints (internal calls) keep the raw weights; an explicit save exports the EMA weights if enabled.
        Under FSDP with `SHARDED_STATE_DICT` (checkpoints as shards), an explicit save still writes one ordinary
        `model.safetensors`: the Trainer would write nothing there."""
        if self.ema is None or _internal_call:
            return self._save_model(output_dir, _internal_call)
        with self.ema.swapped(self.accelerator.unwrap_model(self.model)):
            return self._save_model(output_dir, _internal_call)

    def _save_model(self, output_dir, _internal_call):
        sharded = self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(
            self.accelerator.state.fsdp_plugin.state_dict_type)
        if _internal_call or not sharded:
            return super().save_model(output_dir, _internal_call)
        state_dict = full_tensors(self.accelerator.unwrap_model(self.model).state_dict())  # every rank gathers
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def save_extra_state(self, folder: str) -> None:
        """Hook: objective state that must travel with a checkpoint (written before the completion marker). Called
        on every rank (FSDP2 gathers sharded state collectively); only `self.args.should_save` writes files."""
        if self.ema is not None:
            self.ema.save(folder, write=self.args.should_save)

    def _save_checkpoint(self, model, trial):
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate old checkpoints only once the new one is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        self.save_extra_state(folder)
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()  # every rank's shards are on disk before the marker counts them
        if self.args.should_save:
            write_checkpoint_marker(folder, self.state.global_step)
            if limit:
                self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`resume_from_checkpoint=True` resumes from the newest complete checkpoint in `output_dir`; a path must
        hold a complete checkpoint (ValueError otherwise, naming what is wrong)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint to resume from in {self.args.output_dir!r}")
        elif resume_from_checkpoint:
            if not os.path.isdir(resume_from_checkpoint):
                raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r} is not a directory")
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise ValueError(f"checkpoint {resume_from_checkpoint!r} is incomplete or corrupt: {problem}; "
                                 f"resume from an earlier one or pass resume_from_checkpoint=True")
        if resume_from_checkpoint:
            logger.info("resuming from %s", resume_from_checkpoint)
        self._guard_window, self._guard_window_start = {}, self.state.global_step
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        self._report_skipped(None)  # steps after the last logging step
        return output

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.ema is not None and not self.ema.load(resume_from_checkpoint, device=self.args.device,
                                                      model=self.accelerator.unwrap_model(self.model)):
            logger.warning("no EMA weights in %s; restarting the average from the current weights",
                           resume_from_checkpoint)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs):
        """Upload the trained model like `Trainer.push_to_hub`, but through dlm's allowlist
        (`trainers.hub.push_checkpoint`): safetensors weights (the EMA weights when EMA is on), config with
        `auto_map`, the remote code, generation config, tokenizer and the dlm model card, in one commit; never
        `training_args.bin`, optimizer state, checkpoints or anything holding a credential. The repo is
        `hub_model_id` (else the output folder's name); `hub_token`, `hub_private_repo` and `hub_revision` apply;
        `endpoint=` overrides `HF_ENDPOINT`. Returns the `PushResult` (None on other processes)."""
        self.save_model(self.args.output_dir)
        if not self.is_world_process_zero():
            return None
        kwargs.pop("model_name", None)
        endpoint = kwargs.pop("endpoint", None)
        self.create_model_card(**kwargs)
        from .hub import push_checkpoint

        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        return push_checkpoint(self.args.output_dir, repo_id, commit_message=commit_message or "End of training",
                               private=self.args.hub_private_repo, token=token or self.args.hub_token,
                               revision=revision or getattr(self.args, "hub_revision", None), card="auto",
                               endpoint=endpoint)

    def create_model_card(self, *args, **kwargs):
        """Writes `output_dir/README.md` (used by `push_to_hub`): dlm's card with the variant, its method and papers,
        this run's steps and its last measured evaluation (trainers/model_card.py), instead of the generic card."""
        if not self.is_world_process_zero():
            return
        from .model_card import write_trainer_model_card

        names = ("language", "license", "tags", "model_name", "finetuned_from", "tasks", "dataset_tags", "dataset")
        kwargs.update(zip(names, args))
        try:
            write_trainer_model_card(self, **kwargs)
        except (OSError, ValueError, KeyError, ImportError) as err:
            logger.warning("could not build the dlm model card (%s); writing the Trainer's generic card", err)
            super().create_model_card(**kwargs)
