"""MDLM objective (arXiv 2406.07524): the continuous-time NELBO of the absorbing process with SUBS,
(alpha'/(1-alpha)) log x_theta[x] on masked positions, averaged over real tokens."""

from __future__ import annotations

import torch

from .base import DiffusionTrainer, masked_mean


def mdlm_loss(logits, x0, z_t, alpha, dalpha, scheduler, attention_mask=None):
    per_token = scheduler.nelbo_per_token_from_logits(logits, x0, z_t, alpha, dalpha)  # (B, L), masked rows only
    loss = masked_mean(per_token, attention_mask)
    return loss, {"nelbo": loss.detach(), "masked_fraction": (z_t == scheduler.mask_token_id).float().mean()}


class MDLMTrainer(DiffusionTrainer):
    model_types = ("mdlm",)

    def diffusion_loss(self, model, unwrapped, input_ids, attention_mask, t, generator):
        alpha, dalpha = unwrapped.schedule.alpha(t), unwrapped.schedule.dalpha_dt(t)
        z_t, _ = unwrapped.noise_scheduler.add_noise(input_ids, alpha, generator=generator)
        logits = model(input_ids=z_t, attention_mask=attention_mask, sigma=-torch.log(alpha)).logits
        return mdlm_loss(logits, input_ids, z_t, alpha, dalpha, unwrapped.noise_scheduler, attention_mask)
