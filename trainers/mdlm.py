"""MDLM objective (arXiv 2406.07524): the continuous-time NELBO of the absorbing process with SUBS,
(alpha'/(1-alpha)) log x_theta[x] on masked positions, averaged over real tokens."""

from __future__ import annotations

from .base import DiffusionTrainer, masked_mean


class MDLMTrainer(DiffusionTrainer):
    model_types = ("mdlm",)

    def diffusion_loss(self, model, unwrapped, input_ids, attention_mask, t, generator):
        noised = unwrapped.noised_forward(input_ids, t, attention_mask, generator, network=model)
        loss = masked_mean(unwrapped.nelbo_from_noised(input_ids, noised), attention_mask)  # masked rows only
        return loss, {"nelbo": loss.detach(), "masked_fraction": noised.replaced.float().mean()}
