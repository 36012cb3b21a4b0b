"""MDLM objective (arXiv 2406.07524): the continuous-time NELBO of the absorbing process with SUBS,
(alpha'/(1-alpha)) log x_theta[x] on masked positions, averaged over real tokens: the Trainer's default objective
(`DiffusionTrainer.diffusion_loss`), with the masked fraction logged."""

from __future__ import annotations

from .base import DiffusionTrainer


class MDLMTrainer(DiffusionTrainer):
    model_types = ("mdlm",)

    def noised_stats(self, noised):
        return {"masked_fraction": noised.aux["replaced"].float().mean()}
