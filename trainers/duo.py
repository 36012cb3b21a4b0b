"""Duo objective (arXiv 2506.10892), methods.md §B.3.

This slice trains with the uniform-state ELBO of §B.3.1 (the objective Duo uses after its curriculum, and the one
every uniform-state model is evaluated with). The Gaussian-guided curriculum and Discrete Consistency Distillation
(`DuoDistillationTrainer`) are tracked in their own issue.
"""

from __future__ import annotations

import torch

from .base import DiffusionTrainer, masked_mean


def uniform_nelbo_loss(logits, x0, z_t, alpha, dalpha, scheduler, attention_mask=None):
    """Token-mean of the closed-form UDLM NELBO integrand (float32 log-softmax); returns (loss, stats)."""
    per_token = scheduler.nelbo_per_token(logits.float().log_softmax(-1), x0, z_t, alpha, dalpha)
    loss = masked_mean(per_token, attention_mask)
    return loss, {"nelbo": loss.detach()}


class DuoTrainer(DiffusionTrainer):
    def diffusion_loss(self, model, unwrapped, input_ids, attention_mask, t, generator):
        alpha, dalpha = unwrapped.schedule.alpha(t), unwrapped.schedule.dalpha_dt(t)
        z_t, _ = unwrapped.noise_scheduler.add_noise(input_ids, alpha, generator=generator)
        logits = model(input_ids=z_t, attention_mask=attention_mask, sigma=-torch.log(alpha)).logits
        return uniform_nelbo_loss(logits, input_ids, z_t, alpha, dalpha, unwrapped.noise_scheduler, attention_mask)
