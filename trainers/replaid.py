"""RePlaid objective (arXiv 2605.18530; Plaid, NeurIPS 2023), methods.md §C.3: NELBO = prior + reconstruction +
diffusion.

Per token, in nats, with gamma(t) = gamma_0 + (gamma_1 - gamma_0) gamma_hat(t) the learned log noise-to-signal ratio:
    L_prior = KL(N(alpha_1 e, sigma_1^2 I) || N(0, I))       every entry
    L_recon = -log x_theta(z_0, gamma_0)[x]                  reconstruction entries (t = 0)
    L_diff  = 1/2 exp(-gamma_t) gamma'(t) ||e - e_hat||^2     diffusion entries (t in [sampling_eps, 1])

`RePlaidTrainer` implements Plaid's training recipe (`DiffusionTrainingArguments` fields in brackets):
- Adaptive batch split [`replaid_batch_split="adaptive"`]: of the G entries of the global batch (processes x
  accumulation steps x per-device batch), n_rec = G std_rec / (std_rec + std_diff), rounded and clamped to
  [1, G - 1], train only the reconstruction term; the other G - n_rec train only the diffusion term, at low-discrepancy
  times t_j = (j + u) / (G - n_rec) (one shared u per step, mapped onto [sampling_eps, 1] as in `antithetic_times`).
  std_rec and std_diff come from bias-corrected EMAs (decay 0.997 [`replaid_split_ema_decay`]) of the first and
  second moments of the per-entry losses, updated once per optimizer step with the global batch's values (identical on
  every process) and saved with checkpoints (`replaid_split.json`), so a resumed run replays the same split. With
  `replaid_split_lag=1` (auto on accelerators) a step's moments are folded in one step later, copied to the host
  without a device sync (a deviation from Plaid, which reads them at once). Which
  entries reconstruct is a uniformly random subset, and each part is weighted by its inverse inclusion probability
  (G / n_rec, G / (G - n_rec)): each part is averaged over its own count, and the loss is an unbiased estimate of the
  all-terms NELBO of the batch. One network call per entry instead of two. With a global batch of one entry the split
  is impossible, and that step falls back to all terms (with a warning).
  [`replaid_batch_split="all_terms"`]: every entry trains all three terms (two network calls per entry).
- Variance-minimising schedule [`schedule_variance_gradient`]: the gradient reaching gamma_hat(t) and gamma_hat'(t)
  of each diffusion entry is multiplied by 2 L_diff (that entry's per-token mean), so the shape network descends
  E[L_diff^2] (the NELBO is invariant to the interior schedule in continuous time, so this minimises its variance).
  gamma_0 and gamma_1 enter through gamma = gamma_0 + (gamma_1 - gamma_0) gamma_hat, outside the hook, and like every
  other parameter they descend the NELBO itself. [`freeze_schedule`] keeps the whole schedule fixed.
- Self-conditioning (when `config.self_conditioning`): every 4th entry of the global batch, from a random offset,
  gets a first no-grad pass whose e_hat = softmax(logits) E is fed back. On those entries gamma, gamma', the embeddings
  (in z, in the target and in e_hat), the prior term and the output prior's E are detached: they train the network
  only.
- Output-prior warm-up [`output_prior_warmup_ratio`, 5% of max_steps; `output_prior_warmup_steps` overrides it]: the
  logit term (alpha / sigma^2) <z_t, E_v> is scaled by min(1, step / warmup). Plaid's absolute 5000 steps assume a
  long run: in a 240-step run they leave the prior at 0.048 of the weight evaluation uses, and the embeddings collapse.
- Separate learning rates and weight decays for the schedule's shape network, gamma_0/gamma_1 and the embeddings
  [`schedule_*`, `gamma_bounds_*`, `embedding_*`] through param groups in `create_optimizer`.
Evaluation (`evaluate`, `model.nelbo`) always computes all three terms on every entry with self-conditioning and the
full output prior. Schedule and loss math run in float64.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from modeling_dlm.functional_dlm import row_stopped_matmul
from modeling_dlm.modeling_dlm import response_mask
from modeling_dlm.noise_schedules import antithetic_times

from .base import DiffusionTrainer
from .profiling import host_side


logger = logging.getLogger(__name__)
SPLIT_STATE_NAME = "replaid_split.json"
SELF_CONDITIONING_PERIOD = 4  # every 4th entry: 25% of the batch (Plaid)


@dataclass
class RePlaidBatchPlan:
    """What each of this micro-batch's B entries trains.

    t: (B,) diffusion time per entry (0 for reconstruction-only entries).
    reconstruction: (B,) bool, the reconstruction-only entries; None = every entry trains all three terms.
    self_conditioning: (B,) bool, the entries with a self-conditioning pass (network-only gradients).
    reconstruction_weight, diffusion_weight: inverse inclusion probabilities, G / n_rec and G / (G - n_rec).
    num_reconstruction: n_rec over the global batch (logged).
    host_reconstruction, host_self_conditioning: the same masks on the host (CPU), when the plan was drawn there
    (`plan_batch`): the loss then selects its rows without reading the device. None: selected on the device.
    """

    t: torch.Tensor
    reconstruction: torch.Tensor | None
    self_conditioning: torch.Tensor
    reconstruction_weight: float = 1.0
    diffusion_weight: float = 1.0
    num_reconstruction: int = 0
    host_reconstruction: torch.Tensor | None = None
    host_self_conditioning: torch.Tensor | None = None

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in ("reconstruction", "self_conditioning"):  # a changed mask: its host copy no longer holds
            super().__setattr__(f"host_{name}", None)


def plan_batch(
    batch_size: int,
    *,
    num_reconstruction: int | None,
    generator: torch.Generator,
    device=None,
    offset: int = 0,
    total: int | None = None,
    eps: float = 1e-3,
    antithetic: bool = True,
    self_conditioning: bool = True,
) -> RePlaidBatchPlan:
    """The split of entries [offset, offset + batch_size) of a global batch of `total` entries (default batch_size).

    `generator` must be in the same state for every slice of the global batch (it draws the self-conditioning offset,
    the reconstruction subset and the shared time offset u). `num_reconstruction=None` gives the all-terms plan, with
    `antithetic_times` over the global batch."""
    total = batch_size if total is None else total
    if not 0 <= offset <= total - batch_size:
        raise ValueError(f"entries [{offset}, {offset + batch_size}) do not fit a global batch of {total}")
    index = torch.arange(offset, offset + batch_size, device=device)  # (B,) global entry indices
    host_index = torch.arange(offset, offset + batch_size)  # the same on the host
    host_reconstruction = None
    if num_reconstruction is None:
        t = antithetic_times(batch_size, eps=eps, generator=generator, device=device, offset=offset, total=total,
                             antithetic=antithetic)
        reconstruction = None
    else:
        if not 1 <= num_reconstruction <= total - 1:
            raise ValueError(f"num_reconstruction must be in [1, {total - 1}], got {num_reconstruction}")
        num_diffusion = total - num_reconstruction
        # which entries reconstruct: drawn on the host (a CPU generator seeded by `generator`'s seed), so the loss
        # knows its rows without reading the device
        order = torch.randperm(total, generator=_host_generator(generator, 0x2EC0))  # (G,), CPU
        is_reconstruction = torch.zeros(total, dtype=torch.bool)
        is_reconstruction[order[:num_reconstruction]] = True
        with host_side():
            diffusion_entries = (~is_reconstruction).nonzero().squeeze(-1)  # (G - n_rec,) ascending, CPU
        times = antithetic_times(num_diffusion, eps=eps, generator=generator, device=device, antithetic=antithetic)
        t_global = torch.zeros(total, device=device).index_put_((diffusion_entries.to(device),), times.float())
        host_reconstruction = is_reconstruction[host_index]
        t, reconstruction = t_global[index], host_reconstruction.to(device)
    if self_conditioning:
        start = self_conditioning_start(generator)
        host_chosen = (host_index - start) % SELF_CONDITIONING_PERIOD == 0
    else:
        host_chosen = torch.zeros(batch_size, dtype=torch.bool)
    plan = RePlaidBatchPlan(t=t, reconstruction=reconstruction, self_conditioning=host_chosen.to(device),
                            host_reconstruction=host_reconstruction, host_self_conditioning=host_chosen)
    if num_reconstruction is not None:
        plan.reconstruction_weight = total / num_reconstruction
        plan.diffusion_weight = total / (total - num_reconstruction)
        plan.num_reconstruction = num_reconstruction
    return plan


def _host_generator(generator: torch.Generator, salt: int) -> torch.Generator:
    """A CPU generator seeded by `generator`'s seed (the same for every slice of the global batch) and `salt`."""
    return torch.Generator().manual_seed(generator.initial_seed() ^ salt)


def self_conditioning_start(generator: torch.Generator) -> int:
    """The self-conditioning period's offset, drawn on the host (`_host_generator`): a host integer without reading
    the device."""
    with host_side():
        return int(torch.randint(SELF_CONDITIONING_PERIOD, (1,), generator=_host_generator(generator, 0x5E1FC0D)))


def _rows(plan: RePlaidBatchPlan, batch_size: int):
    """(entry index, is-reconstruction, t, weight) per network row: one row per entry with a split, two without."""
    device = plan.t.device
    entries = torch.arange(batch_size, device=device)
    if plan.reconstruction is None:
        rows = torch.cat([entries, entries])  # (2B,): reconstruction rows, then diffusion rows
        reconstruction = torch.cat([torch.ones_like(entries, dtype=torch.bool),
                                    torch.zeros_like(entries, dtype=torch.bool)])
        t = torch.cat([torch.zeros_like(plan.t), plan.t])
        weight = torch.ones(2 * batch_size, dtype=torch.float64, device=device)
    else:
        rows, reconstruction, t = entries, plan.reconstruction, plan.t
        weights = torch.tensor([plan.diffusion_weight, plan.reconstruction_weight], dtype=torch.float64,
                               device=device)
        weight = weights[reconstruction.long()]  # (B,)
    return rows, reconstruction, t, weight


def _host_rows(plan: RePlaidBatchPlan, batch_size: int):
    """`_rows`' is-reconstruction and live (no self-conditioning pass) masks per network row, on the host; None when
    the plan carries no host masks."""
    if plan.host_self_conditioning is None or (plan.reconstruction is not None and plan.host_reconstruction is None):
        return None
    live = ~plan.host_self_conditioning
    if plan.reconstruction is None:
        ones, zeros = torch.ones(batch_size, dtype=torch.bool), torch.zeros(batch_size, dtype=torch.bool)
        return torch.cat([ones, zeros]), torch.cat([live, live])
    return plan.host_reconstruction, live


def _row_index(host_mask: torch.Tensor | None, device_mask: torch.Tensor, device) -> torch.Tensor:
    """The rows where the mask is True: from the host mask when there is one (no device read), else `nonzero`."""
    if host_mask is None:
        return device_mask.nonzero().squeeze(-1)
    with host_side():
        return host_mask.nonzero().squeeze(-1).to(device, non_blocking=True)


def replaid_training_loss(
    model,
    unwrapped,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    plan: RePlaidBatchPlan,
    *,
    generator: torch.Generator | None = None,
    output_prior_scale: float = 1.0,
    schedule_variance_gradient: bool = True,
    prompt_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The RePlaid training loss of one micro-batch under `plan` (see the module docstring). `prompt_mask` (B, L)
    bool: those positions hold their clean latent (`clean_latent`) in every row and carry no term.

    `model` is what the network is called through (possibly DDP-wrapped), `unwrapped` the RePlaid model itself.
    Returns (loss: float32 scalar, the token mean of sum_i n_i P_i + sum_rows w_r n_r (R_r or D_r) over the batch's
    tokens; stats: the three parts of that sum (float, detached); rows: per network row, 'reconstruction' and
    'diffusion' per-token means (R,) float64 with their graph, and 'is_reconstruction' (R,))."""
    B = input_ids.shape[0]
    device = input_ids.device
    scheduler, schedule = unwrapped.noise_process.scheduler, unwrapped.noise_schedule
    rows, is_recon, t, weight = _rows(plan, B)
    host = _host_rows(plan, B)  # (is_recon, live) on the host, or None
    live_entry = ~plan.self_conditioning.to(device)  # (B,) entries whose gradients reach E and the schedule
    live = live_entry[rows]  # (R,)
    scored = response_mask(attention_mask, prompt_mask)  # (B, L) loss positions, or None for all
    mask = None if scored is None else scored.to(torch.float64)  # (B, L)
    row_mask = torch.ones(len(rows), input_ids.shape[1], dtype=torch.float64, device=device) if mask is None \
        else mask[rows]  # (R, L)
    row_attention = None if attention_mask is None else attention_mask[rows]

    # schedule, float64: gamma = gamma_0 + (gamma_1 - gamma_0) gamma_hat(t); gamma_hat = 0 exactly on t = 0 rows
    g0, g1 = schedule.endpoints()
    gamma_hat, dgamma_hat = schedule.shape(t)  # (R,) each
    gamma_hat = torch.where(is_recon, torch.zeros_like(gamma_hat), gamma_hat)
    dgamma_hat = torch.where(is_recon, torch.zeros_like(dgamma_hat), dgamma_hat)
    gamma = g0 + (g1 - g0) * gamma_hat  # (R,)
    dgamma = (g1 - g0) * dgamma_hat
    gamma = torch.where(live, gamma, gamma.detach())
    dgamma = torch.where(live, dgamma, dgamma.detach())

    E = unwrapped.normalized_embeddings()  # (V, d_e)
    embeds = E[input_ids]  # (B, L, d_e)
    embeds = torch.where(live_entry[:, None, None], embeds, embeds.detach())
    row_embeds = embeds[rows]  # (R, L, d_e)
    noise = torch.randn(row_embeds.shape, generator=generator, device=device)
    z = scheduler.add_noise(row_embeds, gamma, noise=noise)  # (R, L, d_e) float32
    if prompt_mask is not None:  # the prompt is clean context in every row
        z = torch.where(prompt_mask[rows][..., None], scheduler.clean_latent(row_embeds, gamma), z)

    self_cond = None
    if host is None:
        any_chosen = not bool(live.all())  # a device read (plans without host masks)
    else:
        with host_side():
            any_chosen = not bool(host[1].all())
    if any_chosen:
        chosen = _row_index(None if host is None else ~host[1], ~live, device)
        with torch.no_grad():
            first = model(noisy_embeds=z[chosen], t=t[chosen].float(), gamma=gamma[chosen].detach(),
                          attention_mask=None if row_attention is None else row_attention[chosen],
                          output_prior_scale=output_prior_scale).logits
            self_cond = torch.zeros_like(z)
            with torch.autocast(device.type, enabled=False):  # e_hat in float32 even under bf16 autocast
                self_cond[chosen] = first.float().softmax(-1) @ E.detach()
    logits = model(noisy_embeds=z, t=t.float(), gamma=gamma, self_cond=self_cond, attention_mask=row_attention,
                   output_prior_scale=output_prior_scale, output_prior_stop_gradient=~live).logits  # (R, L, V)
    R, L, V = logits.shape
    # reconstruction: a cross-entropy on the reconstruction rows only
    recon_rows = _row_index(None if host is None else host[0], is_recon, device)
    recon_logits = logits.index_select(0, recon_rows).float().reshape(-1, V)
    recon_targets = input_ids[rows].index_select(0, recon_rows).reshape(-1)
    recon = torch.zeros(R, L, dtype=torch.float64, device=device).index_put(
        (recon_rows,), F.cross_entropy(recon_logits, recon_targets, reduction="none").view(-1, L).double())  # (R, L)
    with torch.autocast(device.type, enabled=False):  # float32: bf16 e_hat would bias ||e - e_hat||^2 near t = 0
        probs = logits.float().softmax(-1)  # (R, L, V); on reconstruction rows e_hat meets gamma' = 0
        embeds_hat = row_stopped_matmul(probs, E, ~live)  # (R, L, d_e); self-conditioning rows: no gradient to E
    diffusion = scheduler.diffusion_loss(row_embeds, embeds_hat, gamma, dgamma)  # (R, L); 0 on t = 0 rows
    gamma_1 = torch.where(live_entry, g1.expand(B), g1.detach().expand(B))  # (B,)
    prior = scheduler.prior_kl(embeds, gamma_1[:, None])  # (B, L)

    row_tokens = row_mask.sum(-1).clamp(min=1)  # (R,)
    recon_mean = (recon * row_mask).sum(-1) / row_tokens  # (R,) per-token means
    diffusion_mean = (diffusion * row_mask).sum(-1) / row_tokens
    if schedule_variance_gradient and gamma_hat.requires_grad:
        # the shape network descends E[L_diff^2]: its gradient through this row's gamma_hat, gamma_hat' times 2 L_diff
        scale = 2 * diffusion_mean.detach()
        gamma_hat.register_hook(lambda grad: grad * scale)
        dgamma_hat.register_hook(lambda grad: grad * scale)

    tokens = prior.new_tensor(float(input_ids.numel())) if mask is None else mask.sum().clamp(min=1)
    prior_part = (prior if mask is None else prior * mask).sum() / tokens
    recon_part = (weight * is_recon * (recon * row_mask).sum(-1)).sum() / tokens
    diffusion_part = (weight * ~is_recon * (diffusion * row_mask).sum(-1)).sum() / tokens
    loss = (prior_part + recon_part + diffusion_part).float()
    stats = {"prior": prior_part.detach().float(), "reconstruction": recon_part.detach().float(),
             "diffusion": diffusion_part.detach().float()}
    return loss, stats, {"reconstruction": recon_mean, "diffusion": diffusion_mean, "is_reconstruction": is_recon}


class ReconstructionShareCallback(TrainerCallback):
    """Bias-corrected EMAs of the first and second moments of the per-entry reconstruction and diffusion losses, which
    set the adaptive split (Plaid). Values are summed over the step's micro-batches (and, through `reduce`, over
    processes) and folded in once per optimizer step; `RePlaidTrainer` saves the state as `replaid_split.json` in every
    checkpoint (before the checkpoint's completion marker) and restores it on resume."""

    def __init__(self, decay: float = 0.997, reduce=None, lag: int = 0):
        if lag not in (0, 1):
            raise ValueError(f"the adaptive split's lag must be 0 or 1 steps, got {lag!r}")
        self.decay = decay
        self.reduce = reduce  # sums a float64 tensor over processes (identity on one process)
        self.lag = lag  # 0: fold each step's moments in at its end (Plaid); 1: one step later, without waiting
        self.updates = 0
        self.moments = [0.0, 0.0, 0.0, 0.0]  # EMAs of E[R], E[R^2], E[D], E[D^2], not bias-corrected
        self._pending: torch.Tensor | None = None  # this step's sums (6,): R, R^2, count_R, D, D^2, count_D
        self._lagged: tuple[torch.Tensor, object] | None = None  # lag 1: last step's sums on the host, and its copy

    def stds(self) -> tuple[float, float]:
        if self.updates == 0:
            return 0.0, 0.0
        correction = 1.0 - self.decay**self.updates
        m = [v / correction for v in self.moments]
        return math.sqrt(max(m[1] - m[0] ** 2, 0.0)), math.sqrt(max(m[3] - m[2] ** 2, 0.0))

    def num_reconstruction(self, total: int) -> int:
        """round(G std_rec / (std_rec + std_diff)) clamped to [1, G - 1] (1 before any statistics, as in Plaid)."""
        std_rec, std_diff = self.stds()
        share = std_rec / (std_rec + std_diff + 1e-8)
        return int(min(max(round(total * share), 1), total - 1))

    def accumulate(self, reconstruction: torch.Tensor, diffusion: torch.Tensor,
                   reconstruction_mask: torch.Tensor | None = None,
                   diffusion_mask: torch.Tensor | None = None) -> None:
        """Per-entry losses (1-D) of the reconstruction and diffusion entries of one micro-batch, or of all its rows
        with masks saying which entries count (fixed shapes). Summed on the device: the host reads the sums once per
        optimizer step, in `update` (the split of the next step is a host integer)."""

        def sums(x, mask):
            x = x.detach().double()
            weight = torch.ones_like(x) if mask is None else mask.to(x.dtype)
            x = torch.where(weight > 0, x, torch.zeros_like(x))
            return torch.stack([(x * weight).sum(), (x * x * weight).sum(), weight.sum()])

        values = torch.cat([sums(reconstruction, reconstruction_mask), sums(diffusion, diffusion_mask)])
        self._pending = values if self._pending is None else self._pending + values.to(self._pending.device)

    def update(self, device=None) -> None:
        """Folds this step's sums into the moments. Lag 0 reads them on the host now (one device sync per step, as
        Plaid); lag 1 starts their copy to the host and folds in the previous step's copy, which finished long ago,
        so the host never waits for the device (the split then uses moments one step older than Plaid's)."""
        pending = self._pending if self._pending is not None else torch.zeros(6, dtype=torch.float64)
        sums = pending.to(device)
        if self.reduce is not None:
            sums = self.reduce(sums)
        self._pending = None
        if self.lag == 0:
            self._fold(sums.tolist())  # the one host read of the step (Plaid's split needs it on the host)
            return
        previous, self._lagged = self._lagged, self._copy_to_host(sums)
        if previous is not None:
            host, copied = previous
            if copied is not None:
                copied.synchronize()  # recorded a whole step ago: complete, no wait
            with host_side():
                self._fold(host.tolist())

    @staticmethod
    def _copy_to_host(sums: torch.Tensor) -> tuple[torch.Tensor, object]:
        """A host copy of `sums` started without waiting (pinned memory, non_blocking) and the event that marks its
        end; on the CPU a plain copy and no event."""
        if sums.device.type == "cpu":
            return sums.clone(), None
        host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        host.copy_(sums, non_blocking=True)
        copied = torch.Event(device=sums.device)
        copied.record()
        return host, copied

    def _fold(self, sums: list[float]) -> None:
        if sums[2] == 0 or sums[5] == 0:
            return
        means = [sums[0] / sums[2], sums[1] / sums[2], sums[3] / sums[5], sums[4] / sums[5]]
        self.moments = [self.decay * m + (1 - self.decay) * v for m, v in zip(self.moments, means)]
        self.updates += 1

    def state_dict(self) -> dict:
        """The moments and, with lag 1, the last step's sums that are not folded in yet (read at save time)."""
        state = {"decay": self.decay, "updates": self.updates, "moments": list(self.moments)}
        if self._lagged is not None:
            host, copied = self._lagged
            if copied is not None:
                copied.synchronize()
            state["lagged"] = host.tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates, self.moments = float(state["decay"]), int(state["updates"]), list(state["moments"])
        self._pending = None
        lagged = state.get("lagged")
        self._lagged = None if lagged is None else (torch.tensor(lagged, dtype=torch.float64), None)

    def on_step_end(self, args, state, control, **kwargs):
        self.update(args.device)


class RePlaidTrainer(DiffusionTrainer):
    """Trains `RePlaidForDiffusionLM` by the NELBO with Plaid's variance reductions (see the module docstring)."""

    model_types = ("replaid",)
    # under FSDP2 the learned schedule and the embedding table stay whole on every process: fully_shard cannot shard
    # the schedule's 0-d gamma_0/gamma_1, and the loss reads both outside the model's forward (the table is V x d_e,
    # d_e = 16: small next to the network); their gradients are averaged as DDP would
    fsdp_replicated_modules = "noise_schedule|embed_tokens"

    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(training_args, "deepspeed", None):  # before the Trainer sets up accelerate's (process-wide) state
            raise ValueError("RePlaidTrainer does not support DeepSpeed: the engine cannot broadcast the learned "
                             "schedule's 0-d parameters gamma_0 and gamma_1 (and ZeRO would partition the schedule "
                             "that the loss reads outside the model's forward); train RePlaid with DDP or FSDP2 "
                             "(--fsdp, version 2)")
        super().__init__(*args, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not hasattr(unwrapped, "normalized_embeddings") or not hasattr(unwrapped, "noise_schedule"):
            raise TypeError(f"RePlaidTrainer trains a RePlaid model, got {type(unwrapped).__name__}")
        if self.args.freeze_schedule:
            unwrapped.noise_schedule.requires_grad_(False)
        lag = self.args.replaid_split_lag
        if lag is None:  # auto: no wait on accelerators; on the CPU a host read costs nothing, so Plaid's exact split
            lag = 0 if self.args.device.type == "cpu" else 1
        self.split = ReconstructionShareCallback(self.args.replaid_split_ema_decay, reduce=self._sum_over_processes,
                                                 lag=lag)
        self.add_callback(self.split)
        self._warned_single_entry = False

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum") if self.args.world_size > 1 else tensor

    def output_prior_warmup(self) -> int:
        """Warm-up length in steps: `output_prior_warmup_steps` when set, else `output_prior_warmup_ratio` of the
        run's max_steps (floored, so always shorter than the run)."""
        max_steps = self.state.max_steps if self.state.max_steps > 0 else max(self.args.max_steps, 0)
        if self.args.output_prior_warmup_steps is not None:
            warmup = self.args.output_prior_warmup_steps
            if max_steps > 0 and warmup >= max_steps:
                raise ValueError(f"`output_prior_warmup_steps`={warmup} must be smaller than max_steps={max_steps}: "
                                 f"the output prior would never reach its full weight")
            return warmup
        return int(self.args.output_prior_warmup_ratio * max_steps)

    def output_prior_scale(self) -> float:
        """min(1, step / warm-up) in training (1 without warm-up)."""
        warmup = self.output_prior_warmup()
        return 1.0 if warmup == 0 else min(1.0, self.state.global_step / warmup)

    # ---- the batch plan ---------------------------------------------------------------------------------------------
    def batch_plan(self, batch_size: int, device, shared: torch.Generator, micro: int) -> RePlaidBatchPlan:
        """This micro-batch's slice of the global batch's plan (`plan_batch`): adaptive split or all terms."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        world, accumulation = self.args.world_size, self.args.gradient_accumulation_steps
        rank_micro = (micro % accumulation) * world + self.args.process_index
        total = world * accumulation * batch_size
        self_conditioning = bool(unwrapped.config.self_conditioning)
        if self.args.replaid_batch_split == "adaptive" and total < 2 and not self._warned_single_entry:
            logger.warning("RePlaid: a global batch of one entry cannot be split between reconstruction and "
                           "diffusion; every entry trains all three terms")
            self._warned_single_entry = True
        if self.args.replaid_batch_split == "adaptive" and total >= 2:
            return plan_batch(batch_size, num_reconstruction=self.split.num_reconstruction(total), generator=shared,
                              device=device, offset=rank_micro * batch_size, total=total, eps=self.args.sampling_eps,
                              antithetic=self.args.antithetic_time, self_conditioning=self_conditioning)
        t = self.sample_times(batch_size, device, shared, micro)
        plan = plan_batch(batch_size, num_reconstruction=None, generator=shared, device=device,
                          offset=rank_micro * batch_size, total=total, eps=self.args.sampling_eps,
                          self_conditioning=self_conditioning)
        plan.t = t
        return plan

    def diffusion_loss(self, model, unwrapped, input_ids, attention_mask, t, generator, prompt_mask=None):
        """`t`: this micro-batch's `RePlaidBatchPlan` (from `batch_plan`), or times (B,) for the all-terms plan at
        those times (self-conditioning entries drawn from `generator`)."""
        plan = t
        if prompt_mask is not None and unwrapped.config.given_latent != "clean":
            # conditional training feeds the prompt's clean latent: sampling must give it the same (saved with the
            # config, so the checkpoint samples as it was trained)
            logger.warning("RePlaid: conditional (prompt_mask) batches train the prompt as clean latents; setting "
                           "config.given_latent = 'clean' (was %r) so that sampling feeds prompts the same way",
                           unwrapped.config.given_latent)
            unwrapped.config.given_latent = "clean"
        if isinstance(plan, torch.Tensor):
            chosen = torch.zeros(input_ids.shape[0], dtype=torch.bool)  # on the host
            if unwrapped.config.self_conditioning:
                start = self_conditioning_start(generator)
                chosen[start::SELF_CONDITIONING_PERIOD] = True
            plan = RePlaidBatchPlan(t=t, reconstruction=None, self_conditioning=chosen.to(input_ids.device),
                                    host_self_conditioning=chosen)
        training = model.training
        loss, stats, rows = replaid_training_loss(
            model, unwrapped, input_ids, attention_mask, plan, generator=generator,
            output_prior_scale=self.output_prior_scale() if training else 1.0,
            schedule_variance_gradient=self.args.schedule_variance_gradient and training, prompt_mask=prompt_mask,
        )
        if training:
            recon_rows = rows["is_reconstruction"]
            self.split.accumulate(rows["reconstruction"], rows["diffusion"], recon_rows, ~recon_rows)
        g0, g1 = unwrapped.noise_schedule.endpoints()
        stats.update({"gamma_0": g0.detach().float(), "gamma_1": g1.detach().float()})
        if plan.reconstruction is not None:
            stats["reconstruction_entries"] = torch.tensor(float(plan.num_reconstruction))
        return loss, stats

    # ---- optimizer --------------------------------------------------------------------------------------------------
    def parameter_groups(self, model=None) -> list[dict]:
        """Param groups: the network (with the Trainer's decay / no-decay split), the schedule's shape network,
        gamma_0/gamma_1 and the embeddings, each with its learning rate and weight decay (None = inherited)."""
        model = self.model if model is None else model
        unwrapped = self.accelerator.unwrap_model(model)
        args = self.args
        schedule = unwrapped.noise_schedule
        bounds = {id(schedule.gamma_0), id(schedule.gamma_1)}
        shape = {id(p) for p in schedule.parameters()} - bounds
        embeddings = {id(p) for p in unwrapped.embed_tokens.parameters()}

        def pick(value, fallback):
            return fallback if value is None else value

        schedule_lr = pick(args.schedule_learning_rate, args.learning_rate)
        schedule_wd = pick(args.schedule_weight_decay, args.weight_decay)
        special = {
            "schedule": (shape, schedule_lr, schedule_wd),
            "gamma_bounds": (bounds, pick(args.gamma_bounds_learning_rate, schedule_lr),
                             pick(args.gamma_bounds_weight_decay, schedule_wd)),
            "embeddings": (embeddings, pick(args.embedding_learning_rate, args.learning_rate),
                           pick(args.embedding_weight_decay, args.weight_decay)),
        }
        decay_names = set(self.get_decay_parameter_names(model))
        groups = {  # the network first: the Trainer logs the first group's learning rate
            "network": {"params": [], "lr": args.learning_rate, "weight_decay": args.weight_decay},
            "network_no_decay": {"params": [], "lr": args.learning_rate, "weight_decay": 0.0},
        }
        groups.update({name: {"params": [], "lr": lr, "weight_decay": wd} for name, (_, lr, wd) in special.items()})
        for name, group in groups.items():
            group["name"] = name
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            key = next((k for k, (ids, _, _) in special.items() if id(p) in ids), None)
            if key is None:
                key = "network" if name in decay_names else "network_no_decay"
            groups[key]["params"].append(p)
        return [g for g in groups.values() if g["params"]]

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if any(key in optimizer_kwargs for key in ("params", "model", "optimizer_dict")) or not isinstance(
            optimizer_cls, type
        ):
            raise ValueError(f"RePlaidTrainer builds its own param groups (network, schedule, gamma bounds, "
                             f"embeddings) and needs a plain torch optimizer (e.g. --optim adamw_torch), got "
                             f"{self.args.optim!r}")
        self.optimizer = optimizer_cls(self.parameter_groups(opt_model), **optimizer_kwargs)
        return self.optimizer

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def save_extra_state(self, folder: str) -> None:
        super().save_extra_state(folder)
        if self.args.should_save:
            with open(os.path.join(folder, SPLIT_STATE_NAME), "w") as f:
                json.dump(self.split.state_dict(), f)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, SPLIT_STATE_NAME)
        if os.path.isfile(path):
            with open(path) as f:
                self.split.load_state_dict(json.load(f))
        else:
            logger.warning("no %s in %s; the adaptive RePlaid split restarts its loss statistics", SPLIT_STATE_NAME,
                           resume_from_checkpoint)
