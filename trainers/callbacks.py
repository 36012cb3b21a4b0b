"""Training callbacks: an exponential moving average (EMA) of the weights, and a guard against non-finite gradients.

MDLM, Duo and Plaid evaluate and sample with EMA weights (decay 0.9999). transformers' Trainer has no EMA, so
`EMACallback` keeps a float32 shadow of the trainable parameters, updates it after every optimizer step, writes it to
`ema.safetensors` in each checkpoint folder (so a resumed run continues the same average) and can swap it into the
model for evaluation and export (`DiffusionTrainer` does both).

Warm-up (on by default, `warmup=True`): update n (counted from 0) uses decay min(decay, (1 + n) / (10 + n)), the
rule of the EMA implementations users know (torch_ema's `use_num_updates`, the MDLM/Duo code's
`ExponentialMovingAverage`). Without it, decay 0.9999 keeps the average at its initial weights for thousands of
steps: a 1000-step run would evaluate, sample and export an almost untrained model. The update count is saved in
the checkpoint's metadata, so a resumed run continues the same warm-up.

`InterruptCallback` turns the first Ctrl-C (SIGINT) into a clean stop: the current optimizer step finishes, a complete
checkpoint is saved, and training ends; a second Ctrl-C aborts at once.

`ETACallback` logs, a few steps in, how long the rest of the run should take on this machine.

`NonFiniteGuardCallback` stops training before an optimizer step whose gradients hold NaN or inf, so no NaN weights are
ever written (the loss itself is checked in `DiffusionTrainer.compute_loss`). It reads the gradients on the host at
every step; `DiffusionTrainer`'s default guard (`nan_guard_policy="skip"`) skips such a step on the device instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections import defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

EMA_WEIGHTS_NAME = "ema.safetensors"


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; a sharded `DTensor` (FSDP2) is gathered first, a collective that every rank must call."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).contiguous().cpu() for k, v in tensors.items()}


def placed_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` (a full, ordinary tensor) on `like`'s device and, if `like` is a sharded DTensor (FSDP2), sharded
    like it (each rank keeps its own slice: no communication)."""
    if hasattr(like, "device_mesh") and not hasattr(tensor, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return tensor.to(like.device)


class EMACallback(TrainerCallback):
    def __init__(self, decay: float, save_on_checkpoint: bool = True, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.warmup = warmup
        self.save_on_checkpoint = save_on_checkpoint  # False when the trainer saves it (dlm trainers do)
        self.shadow: dict[str, torch.Tensor] | None = None
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay of the next update: min(decay, (1 + n) / (10 + n)) with warm-up, else `decay`."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @staticmethod
    def _params(model) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def initialize(self, model) -> None:
        self.shadow = {name: p.detach().float().clone() for name, p in self._params(model).items()}
        self.num_updates = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.shadow is None and model is not None:
            self.initialize(model)

    @torch.no_grad()
    def update(self, model) -> None:
        params = self._params(model)
        if self.shadow is None or self.shadow.keys() != params.keys():
            self.initialize(model)
        weight = 1.0 - self.current_decay()
        groups: dict[type, list[str]] = defaultdict(list)  # one foreach call per tensor type: FSDP2 can leave some
        for name, param in params.items():  # parameters whole (plain tensors) beside the sharded DTensors
            groups[type(param.data)].append(name)
        for names in groups.values():
            torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names], weight)
        self.num_updates += 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.update(model)

    def save(self, directory: str | os.PathLike, write: bool = True) -> None:
        """Write `ema.safetensors` (full tensors). Under FSDP2 every rank must call it (the shards are gathered);
        only those with `write` write the file."""
        if self.shadow is None or not (write or any(hasattr(v, "full_tensor") for v in self.shadow.values())):
            return  # (a rank that does not write joins only the gather of a sharded average)
        tensors = full_tensors(self.shadow)
        if write:
            metadata = {"num_updates": str(self.num_updates), "decay": repr(self.decay), "warmup": str(self.warmup)}
            save_file(tensors, os.path.join(directory, EMA_WEIGHTS_NAME), metadata=metadata)

    def load(self, directory: str | os.PathLike, device=None, model=None) -> bool:
        """Read `ema.safetensors`; with `model`, each average is placed like its parameter (sharded like it under
        FSDP2), else moved to `device`."""
        path = os.path.join(directory, EMA_WEIGHTS_NAME)
        if not os.path.isfile(path):
            return False
        params = self._params(model) if model is not None else {}
        self.shadow = {k: placed_like(v, params[k]) if k in params else v.to(device) if device is not None else v
                       for k, v in load_file(path).items()}
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        # a file written before the warm-up existed: its average is past any warm-up (no count was kept)
        self.num_updates = int(metadata.get("num_updates", 10**9))
        return True

    def on_save(self, args, state, control, **kwargs):
        if self.save_on_checkpoint and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                self.save(folder)

    @contextlib.contextmanager
    def swapped(self, model):
        """Temporarily load the EMA weights into `model` (a no-op before the first update)."""
        if self.shadow is None:
            yield model
            return
        params = self._params(model)
        backup = {}
        with torch.no_grad():
            for name, p in params.items():
                if name in self.shadow:
                    backup[name] = p.detach().clone()
                    p.copy_(placed_like(self.shadow[name], p).to(p.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    params[name].copy_(value)


class NonFiniteGuardCallback(TrainerCallback):
    """Raise `FloatingPointError` naming the step and the first offending parameters before the optimizer applies a
    non-finite gradient. One fused reduction per step (a device sync). `active` (a callable) turns it off per step:
    `DiffusionTrainer` uses it only with `nan_guard_policy="stop"` (its default skips such steps on the device)."""

    def __init__(self, active=None):
        self.active = active

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.active is not None and not self.active():
            return
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        if not grads:  # e.g. DeepSpeed keeps gradients elsewhere; the loss check still applies
            return
        finite = torch.stack([torch.isfinite(g).all() for _, g in grads])
        if bool(finite.all()):
            return
        bad = [n for (n, _), ok in zip(grads, finite.tolist()) if not ok]
        raise FloatingPointError(
            f"non-finite gradients at step {state.global_step + 1} in {len(bad)} parameters (first: {bad[:3]}); "
            f"training stopped before the optimizer step, so the weights and the checkpoints in {args.output_dir} "
            f"hold no NaN. Lower the learning rate, keep max_grad_norm > 0, or set nan_guard=False to skip this check."
        )


class InterruptCallback(TrainerCallback):
    """First SIGINT: finish the optimizer step in flight, save a complete checkpoint, stop (`requested` is then
    True); a second SIGINT raises KeyboardInterrupt at once.

    Installed by the `dlm` command for single-process runs only: in a multi-process job every rank gets the signal
    at its own step, and stopping them at different steps would deadlock their collectives, so Ctrl-C keeps its
    default meaning there (resume from the last periodic checkpoint).
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return True

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        if self.requested:  # the second Ctrl-C: abort now
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


class ETACallback(TrainerCallback):
    """One log line early in training: how long the rest of the run should take on this machine, measured over steps
    2 to `probe_steps + 1` (the first step pays for warm-up), plus `hint`: a string, or a function of the measured
    seconds per step that returns one (e.g. how long a shorter run would take). Only the host clock is read: no
    device sync.

    `extra_seconds`: time the caller will spend after training (evaluation, sampling), added to the estimate.
    `log`: the logger the line goes to (default: this module's; the `dlm` command passes its own, so the line reads
    like its other lines).
    """

    def __init__(self, probe_steps: int = 4, hint: str = "", extra_seconds: float = 0.0,
                 log: logging.Logger | None = None):
        if probe_steps < 1:
            raise ValueError(f"probe_steps must be >= 1, got {probe_steps}")
        self.probe_steps, self.hint, self.extra_seconds = probe_steps, hint, extra_seconds
        self.log = log or logger
        self._start: float | None = None
        self._first_step: int | None = None
        self.estimate: float | None = None  # seconds left when the line was logged

    def on_step_end(self, args, state, control, **kwargs):
        import time

        if self.estimate is not None or not state.is_world_process_zero:
            return
        if self._start is None:  # the end of the first step seen (a resumed run starts later than step 1)
            self._start, self._first_step = time.perf_counter(), state.global_step
            return
        done = state.global_step - self._first_step
        if done < self.probe_steps and state.global_step < state.max_steps:
            return
        per_step = (time.perf_counter() - self._start) / done
        self.estimate = per_step * (state.max_steps - state.global_step) + self.extra_seconds
        hint = self.hint(per_step) if callable(self.hint) else self.hint
        self.log.info("%.2f s per step here: the remaining %d steps%s take about %s%s", per_step,
                    state.max_steps - state.global_step, " and the final evaluation" if self.extra_seconds else "",
                    duration(self.estimate), f". {hint}" if hint else "")


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 26 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
