"""RePlaid objective (arXiv 2605.18530; Plaid), methods.md §C.3: NELBO = prior KL + reconstruction + diffusion.

This slice trains every batch entry on all three terms (two network calls: z_0 at t = 0 for the reconstruction,
z_t at the stratified t for the diffusion term), with self-conditioning on a random 25% of entries (a no-grad first
pass whose e_hat is fed back). The adaptive reconstruction/diffusion batch split, the variance-minimising schedule
gradient and the separate learning rates are tracked in the RePlaid issue.
"""

from __future__ import annotations

import torch

from .base import DiffusionTrainer, masked_mean


def replaid_loss(prior, reconstruction, diffusion, attention_mask=None):
    """Sum of the three (B, L) NELBO terms, token-averaged; returns (loss, stats)."""
    terms = {"prior": prior, "reconstruction": reconstruction, "diffusion": diffusion}
    means = {k: masked_mean(v.double(), attention_mask) for k, v in terms.items()}
    loss = (means["prior"] + means["reconstruction"] + means["diffusion"]).float()
    return loss, {k: v.detach().float() for k, v in means.items()}


class RePlaidTrainer(DiffusionTrainer):
    self_conditioning_fraction = 0.25

    def diffusion_loss(self, model, unwrapped, input_ids, attention_mask, t, generator):
        B = input_ids.shape[0]
        device = input_ids.device
        sched = unwrapped.noise_scheduler
        E = unwrapped.normalized_embeddings()
        embeds = E[input_ids]  # (B, L, d_e)
        zeros, ones = torch.zeros(B, device=device), torch.ones(B, device=device)
        gamma_0, _ = unwrapped.noise_schedule(zeros)
        gamma_1, _ = unwrapped.noise_schedule(ones)
        prior = sched.prior_kl(embeds, gamma_1[:, None])
        z_0 = sched.add_noise(embeds, gamma_0, generator=generator)
        logits_0 = model(noisy_embeds=z_0, t=zeros, attention_mask=attention_mask).logits
        recon = -logits_0.float().log_softmax(-1).gather(-1, input_ids[..., None]).squeeze(-1)
        gamma_t, dgamma_t = unwrapped.noise_schedule(t)
        z_t = sched.add_noise(embeds, gamma_t, generator=generator)
        self_cond = None
        if unwrapped.config.self_conditioning:
            chosen = torch.rand(B, generator=generator, device=device) < self.self_conditioning_fraction
            if bool(chosen.any()):
                with torch.no_grad():
                    first = model(noisy_embeds=z_t, t=t, attention_mask=attention_mask).logits
                    self_cond = (first.float().softmax(-1) @ E) * chosen[:, None, None]
        logits_t = model(noisy_embeds=z_t, t=t, self_cond=self_cond, attention_mask=attention_mask).logits
        embeds_hat = logits_t.float().softmax(-1) @ E
        diffusion = sched.diffusion_loss(embeds, embeds_hat, gamma_t, dgamma_t)
        return replaid_loss(prior, recon, diffusion, attention_mask)
