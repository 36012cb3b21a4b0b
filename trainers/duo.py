"""Duo objective (arXiv 2506.10892), methods.md §B.3.

- `DuoTrainer` trains with the uniform-state ELBO of §B.3.1, the objective every uniform-state model is evaluated
  with. While `global_step < curriculum_steps` it runs the Gaussian-guided curriculum (§B.3.2) instead:
      gamma = gamma_min + t (gamma_max - gamma_min)   (DuoConfig; OWT run: -3.55, -1.85)
      alpha, alpha' = T(gamma), T'(gamma) (gamma_max - gamma_min)   (Duo's operator, `diffusion_transformation`)
      w = (alpha~ e_x + sigma~ eps) / tau,  eps ~ N(0, I_V)           a (B, L, V) Gaussian latent
      the model sees softmax(w) as soft token weights; the ELBO integrand uses z_t = argmax(w) with alpha, alpha'.
  With `curriculum_top_k = k > 0` (Duo++), only the k + 1 largest entries of w are drawn (order statistics) and fed
  as weighted embeddings, with the rest of the softmax normaliser in closed form: no (B, L, V) tensor.
  Validation always reports the standard ELBO.
- `DuoDistillationTrainer`: Discrete Consistency Distillation (§B.3.3, `s-sahoo/duo@ch-1: algo.py Distillation`).
  The student starts from a trained Duo model; the teacher is a frozen copy of the student, refreshed every
  `distill_round_steps` steps, when dt = 2^round / `distill_num_steps` doubles. Per batch:
      t ~ stratified U[eps, 1];  t <- min(t + dt, 1);  s = t - dt
      gamma linear in t on [distill_gamma_min, distill_gamma_max];  alpha = T(gamma) (Duo's operator)
      z_t, z_s = argmax of alpha~ e_x + sigma~ eps for ONE shared eps (a deterministic trajectory given x)
      loss = KL(p_student(. | z_t, t) || p_teacher(. | z_s, s)) per token (reverse KL; `kl-fwd` swaps it)
  The shared-noise argmaxes are drawn in O(B L) (`gaussian_coupled_latents`), not from a (B, L, V) latent.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from safetensors.torch import load_file, save_file

from modeling_dlm.functional_dlm import Noised
from modeling_dlm.modeling_dlm import response_mask, unsharded_class
from modeling_dlm.noise_schedules import sigma_from_alpha

from .base import DiffusionTrainer, masked_mean
from .callbacks import full_tensors
from .relaxation import diffusion_transformation, gaussian_coupled_latents, gaussian_topk_relaxation


logger = logging.getLogger(__name__)
TEACHER_WEIGHTS_NAME = "teacher.safetensors"


def linear_gamma_schedule(t: torch.Tensor, gamma_min: float, gamma_max: float, vocab_size: int):
    """Duo's Gaussian time parameterisation: gamma linear in t, alpha = T(gamma) and dalpha/dt; float64, (B,) each."""
    span = gamma_max - gamma_min
    gamma = gamma_min + t.double() * span
    alpha, dalpha_dgamma = diffusion_transformation(gamma, vocab_size, gamma_min, gamma_max)
    return gamma, alpha, dalpha_dgamma * span


class DuoTrainer(DiffusionTrainer):
    model_types = ("duo",)

    def in_curriculum(self, model) -> bool:
        return model.training and self.state.global_step < self.args.curriculum_steps

    def curriculum_loss(self, model, unwrapped, input_ids, attention_mask, t, generator, prompt_mask=None):
        """The curriculum's NELBO; `prompt_mask` positions are clean (one-hot soft inputs, z_t = x) and unscored."""
        config = unwrapped.config
        V = config.vocab_size
        gamma, alpha, dalpha = linear_gamma_schedule(t, config.gamma_min, config.gamma_max, V)  # (B,) each
        tau = self.args.curriculum_tau
        signal = torch.sigmoid(-gamma).sqrt() / tau  # alpha~ / tau, (B,)
        noise = torch.sigmoid(gamma).sqrt() / tau  # sigma~ / tau
        sigma = sigma_from_alpha(alpha).float()
        if self.args.curriculum_top_k:
            # Duo++: k + 1 weighted embeddings instead of a (B, L, V) latent
            ids, weights, z_t = gaussian_topk_relaxation(input_ids, signal, noise, V, self.args.curriculum_top_k,
                                                         generator=generator)
            if prompt_mask is not None:  # ids[..., 0] is x: all the weight on it
                one_hot = torch.zeros_like(weights)
                one_hot[..., 0] = 1.0
                weights = torch.where(prompt_mask[..., None], one_hot, weights)
            embeds = (weights[..., None] * unwrapped.get_input_embeddings()(ids)).sum(-2)  # (B, L, d)
            logits = model(inputs_embeds=embeds, attention_mask=attention_mask, sigma=sigma).logits
        else:
            w = torch.randn(*input_ids.shape, V, generator=generator, device=input_ids.device)  # (B, L, V)
            w.mul_(noise.float()[:, None, None])
            w.scatter_add_(-1, input_ids[..., None], signal.float()[:, None, None].expand(*input_ids.shape, 1))
            z_t = w.argmax(-1)  # (B, L), distributed as q_t(. | x; alpha)
            weights = w.softmax(-1)  # tempered softmax of the Gaussian latent: the relaxed model input
            del w
            if prompt_mask is not None:  # the prompt's rows become one-hot on x, in place (no second (B, L, V))
                rows = prompt_mask.nonzero(as_tuple=True)
                weights[rows] = 0.0
                weights[rows + (input_ids[rows],)] = 1.0
            logits = model(token_weights=weights, attention_mask=attention_mask, sigma=sigma).logits
        if prompt_mask is not None:
            z_t = torch.where(prompt_mask, input_ids, z_t)
        # the bound at z_t = argmax(w), the law of the uniform-state process at alpha = T(gamma)
        noised = Noised(z_t, aux={"alpha": alpha.float(), "dalpha": dalpha.float()}, logits=logits)
        per_token = unwrapped.noise_process.nelbo_per_token(logits, input_ids, noised)
        loss = masked_mean(per_token, response_mask(attention_mask, prompt_mask))
        return loss, {"nelbo": loss.detach(), "curriculum": torch.tensor(1.0)}

    def diffusion_loss(self, model, unwrapped, input_ids, attention_mask, t, generator, prompt_mask=None):
        if self.in_curriculum(model):
            return self.curriculum_loss(model, unwrapped, input_ids, attention_mask, t, generator, prompt_mask)
        loss, stats = super().diffusion_loss(model, unwrapped, input_ids, attention_mask, t, generator,
                                             prompt_mask)  # the NELBO
        if self.args.curriculum_steps:
            stats["curriculum"] = torch.tensor(0.0)
        return loss, stats


def consistency_distillation_loss(student_logits, teacher_logits, attention_mask=None, divergence="kl-bwd"):
    """Per-token KL between student and (detached) teacher predictions, averaged over the positions where
    `attention_mask` (the loss tokens) is 1; float32."""
    log_s = student_logits.float().log_softmax(-1)
    log_t = teacher_logits.float().log_softmax(-1).detach()
    if divergence == "kl-bwd":
        per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    elif divergence == "kl-fwd":
        per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:
        raise ValueError(f"`divergence` must be 'kl-bwd' or 'kl-fwd', got {divergence!r}")
    loss = masked_mean(per_token, attention_mask)
    return loss, {"kl": loss.detach()}


class DuoDistillationTrainer(DiffusionTrainer):
    """Discrete Consistency Distillation of a Duo model into a few-step sampler (see the module docstring)."""

    model_types = ("duo", "sddlm")

    #: generation defaults written into the distilled checkpoint
    distilled_generation = {"num_steps": 8, "sampler": "greedy_tail"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.teacher = None
        self.teacher_round = -1
        for key, value in self.distilled_generation.items():
            setattr(unwrapped.generation_config, key, value)
        unwrapped.config.distillation = "dcd"  # saved in config.json: evaluation says what the checkpoint's bound is

    def distill_round(self, step: int) -> int:
        return step // self.args.distill_round_steps

    def dt(self, round_index: int) -> float:
        return min(2.0**round_index / self.args.distill_num_steps, 1.0)

    def check_round_schedule(self) -> None:
        """Refuse a run whose last round would reach dt >= 1: then s = 0 and the teacher sees the clean data, so the
        student is taught to predict x from pure noise (a collapse to the most frequent tokens)."""
        if self.state.max_steps <= 0:
            return
        last_round = (self.state.max_steps - 1) // self.args.distill_round_steps
        last_dt = 2.0**last_round / self.args.distill_num_steps
        if last_dt >= 1.0:
            raise ValueError(
                f"DCD: with max_steps={self.state.max_steps}, distill_round_steps={self.args.distill_round_steps} and "
                f"distill_num_steps={self.args.distill_num_steps}, round {last_round} reaches dt = {last_dt:g} >= 1 "
                f"(the teacher would see clean data). Use distill_num_steps >= {2 ** (last_round + 1)} or fewer "
                f"rounds (the reference: 5 rounds, dt from 1/512 to 16/512).")
        logger.info("DCD: %d rounds of %d steps, dt from %g to %g", last_round + 1, self.args.distill_round_steps,
                    self.dt(0), last_dt)

    def refresh_teacher(self, unwrapped, round_index: int) -> None:
        """The teacher: a frozen copy of the student. Under FSDP2 (which cannot be deep-copied) a whole, unsharded copy
        built from the gathered weights, on every rank."""
        if any(hasattr(p, "full_tensor") for p in unwrapped.parameters()):
            teacher = unsharded_class(unwrapped)(unwrapped.config).to(self.args.device)
            weights = full_tensors(unwrapped.state_dict())  # every rank gathers the shards
            teacher.load_state_dict({k: v.to(self.args.device) for k, v in weights.items()})
            self.teacher = teacher.eval().requires_grad_(False)
        else:
            self.teacher = copy.deepcopy(unwrapped).eval().requires_grad_(False)
        self.teacher_round = round_index
        logger.info("DCD round %d: teacher refreshed from the student, dt = %.5f", round_index, self.dt(round_index))

    def diffusion_loss(self, model, unwrapped, input_ids, attention_mask, t, generator, prompt_mask=None):
        round_index = self.distill_round(self.state.global_step)
        if self.teacher is None and model.training:
            self.check_round_schedule()
        if self.teacher is None or (model.training and round_index != self.teacher_round):
            self.refresh_teacher(unwrapped, round_index)
        dt = self.dt(round_index)
        V = unwrapped.config.vocab_size
        t = (t.double() + dt).clamp(max=1.0)
        s = t - dt
        bounds = (self.args.distill_gamma_min, self.args.distill_gamma_max)
        gamma_t, alpha_t, _ = linear_gamma_schedule(t, *bounds, V)
        gamma_s, alpha_s, _ = linear_gamma_schedule(s, *bounds, V)
        m_t, m_s = torch.exp(-gamma_t / 2), torch.exp(-gamma_s / 2)  # alpha~ / sigma~
        z_t, z_s = gaussian_coupled_latents(input_ids, [m_t, m_s], V, generator=generator)
        if prompt_mask is not None:  # the prompt is clean context on both ends of the trajectory
            z_t, z_s = torch.where(prompt_mask, input_ids, z_t), torch.where(prompt_mask, input_ids, z_s)
        with unwrapped.ids_checked():  # z_t, z_s are drawn from the checked batch: no range check (a sync) per step
            student = model(input_ids=z_t, attention_mask=attention_mask,
                            sigma=sigma_from_alpha(alpha_t).float()).logits
        with torch.no_grad(), self.teacher.ids_checked():
            teacher = self.teacher(input_ids=z_s, attention_mask=attention_mask,
                                   sigma=sigma_from_alpha(alpha_s).float()).logits
        loss, stats = consistency_distillation_loss(student, teacher, response_mask(attention_mask, prompt_mask),
                                                    self.args.distill_divergence)
        stats["dt"] = torch.tensor(dt)
        return loss, stats

    # the teacher travels with checkpoints, so a resumed run keeps the round's teacher
    def save_extra_state(self, folder: str) -> None:
        super().save_extra_state(folder)
        if self.teacher is not None and self.args.should_save:  # the teacher is whole on every rank, even under FSDP2
            save_file(full_tensors(self.teacher.state_dict()), os.path.join(folder, TEACHER_WEIGHTS_NAME),
                      metadata={"round": str(self.teacher_round)})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, TEACHER_WEIGHTS_NAME)
        if os.path.isfile(path):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                round_index = int(f.metadata()["round"])
            unwrapped = self.accelerator.unwrap_model(self.model)
            self.refresh_teacher(unwrapped, round_index)
            self.teacher.load_state_dict(load_file(path))  # copied onto the teacher's device (whole on every rank)
