"""SDDLM objective: the simple denoising loss for uniform-state diffusion (arXiv 2510.22926), methods.md §A.3.

    L = sum_l m_l (-log(p_theta(x^l | z_t) + eps) + lambda R_l) / sum_l m_l  (+ mu NELBO, the hybrid below)
with m the noise-replaced positions (`loss_mask`: "resampled" = every position drawn from the prior, the default;
"changed" = z_t != x) and R the regularizer against collapse to uniform outputs (`regularizer`):
    "hinge"   R = relu(margin - KL(U || p_theta))                   penalises only a collapse to uniform (default)
              with KL(U || p) = -log V - (1/V) sum_v log(p_v + eps) + log(1 + V eps) (0 at uniform), one reduction
    "mean"    R = (1/V) sum_v log(p_theta(v | z_t) + eps)         exact uniform expectation (the v2-style guess)
    "sampled" R = mean over K uniform negatives x^ of log(p_theta(x^ | z_t) + eps)   (v1 negative gradients)
    "none"    R = 0
Why "hinge" is the default: with "mean" at weight lambda the log-normaliser of CE + lambda R is (1 - lambda) lse, so
the per-position optimum is p_v proportional to max(q_v - lambda / V, 0) / (1 - lambda) (q the true conditional): a
built-in truncation of every token below lambda / V, degenerate (one-hot) at lambda = 1. At V = 50k that cuts only
the far tail (lower gen-PPL at lower entropy, a worse bound); at V = 16 it cuts real mass and the bound exceeds
log V. The hinge is zero unless a prediction is within `margin` nats of uniform, so where the data are predictable
its optimum is the cross-entropy's (the ELBO's, with the resampled mask). The sources leave the exact v2 form, its
weight and its masking UNVERIFIED; all forms are config options (`SDDLMConfig`).
The hybrid (`elbo_weight` mu, default 0.1): the trainer adds mu times the uniform-state NELBO (§B.3.1) of the same
z_t and logits, as Nichol & Dhariwal (2021) add a small L_vb to L_simple for Gaussian diffusion. Why: at low noise
almost every position is clean, and there the bound's integrand tends to |alpha'| (1 / p(x) - 1) / V per position, in
expectation |alpha'| (sum_v q_v / p_v - 1) / V: it grows like q_v / p_v for a token the data use and the network nearly
rules out, where the simple loss sees only the few resampled positions and penalises them by log(1 / p) (the limit is
checked in tests/test_sddlm.py). Both objectives share the optimum q, so the term changes where a finite network's
errors go, not what it learns in the limit; on 3 seeds it brought the bound from 1.06-1.12x Duo's to 1.05-1.08x on
the small-vocabulary sources of `bench/sddlm_vocab.py`.
Validation never reports this loss: `DiffusionTrainer` evaluates the uniform-state NELBO, a true bound.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from modeling_dlm.modeling_dlm import response_mask
from modeling_dlm.scheduling_uniform import softmax_log_affine_terms

from .base import DiffusionTrainer, masked_mean


def sddlm_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    loss_positions: torch.Tensor,
    *,
    regularizer: str = "hinge",
    regularizer_weight: float = 1.0,
    regularizer_margin: float = 0.01,
    normalization: str = "batch",
    num_negative_samples: int = 1,
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
    terms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logits (B, L, V), x0 (B, L), loss_positions (B, L) bool (noise-replaced and not padding). `terms`: (S, log p[x])
    when a fused pass already computed them, S = sum_v log(p_v + eps) for the "mean" and "hinge" forms (None for the
    others). Returns (loss, {"ce": ..., "reg": ..., "corrupted_fraction": ...})."""
    V = logits.shape[-1]
    if regularizer not in ("hinge", "mean", "sampled", "none"):
        raise ValueError(f"`regularizer` must be 'hinge', 'mean', 'sampled' or 'none', got {regularizer!r}")
    S, log_p_x = terms if terms is not None else (None, None)
    if log_p_x is None and regularizer in ("mean", "hinge"):
        # one fused node: S = sum_v log(p_v + eps) and log p[x], recomputing the softmax in backward
        ones = torch.ones(x0.shape, device=x0.device)
        S, log_p_x, _ = softmax_log_affine_terms(logits, x0, x0, ones, torch.full_like(ones, eps))
    elif log_p_x is None:  # log p[x] from the fused cross-entropy kernel
        log_p_x = -F.cross_entropy(logits.reshape(-1, V).float(), x0.reshape(-1), reduction="none").view(x0.shape)
    if regularizer in ("mean", "hinge"):
        reg = S / V  # (B, L)
        if regularizer == "hinge":
            # KL(U || p) = -log V - mean_v log(p_v + eps), shifted by log(1 + V eps) so that it is exactly 0 at the
            # uniform p (the eps would otherwise make it -0.049 at V = 50k and the hinge always active); zero unless
            # a prediction is within `margin` of uniform
            kl = -math.log(V) - reg + math.log1p(V * eps)
            reg = torch.relu(regularizer_margin - kl)
    elif regularizer == "sampled":
        lse = logits.gather(-1, x0[..., None]).squeeze(-1).float() - log_p_x  # logit[x] - log p[x]
        negatives = torch.randint(0, V, (*x0.shape, num_negative_samples), generator=generator, device=x0.device)
        log_p_neg = logits.gather(-1, negatives).float() - lse[..., None]  # (B, L, K)
        reg = torch.log(log_p_neg.exp() + eps).mean(-1)
    else:
        reg = torch.zeros_like(log_p_x)
    ce = -torch.log(log_p_x.exp() + eps)  # (B, L)
    m = loss_positions.to(ce.dtype)
    count = m.sum()
    per_token = ce + regularizer_weight * reg
    # nothing corrupted (t ~ 0): a zero loss that still touches the graph, so every rank runs the same backward
    if normalization == "batch":  # every noise-replaced position of the batch weighs the same: t weighted by 1 - alpha
        loss = (per_token * m).sum() / count.clamp(min=1)
    elif normalization == "sequence":  # a mean per sequence, then over sequences: every t weighs the same
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    else:
        raise ValueError(f"`normalization` must be 'batch' or 'sequence', got {normalization!r}")
    stats = {
        "ce": ((ce * m).sum() / count.clamp(min=1)).detach(),
        "reg": ((reg * m).sum() / count.clamp(min=1)).detach(),
        "corrupted_fraction": (count / m.numel()).detach(),
    }
    return loss, stats


class SDDLMTrainer(DiffusionTrainer):
    model_types = ("sddlm",)

    def diffusion_loss(self, model, unwrapped, input_ids, attention_mask, t, generator, prompt_mask=None):
        config = unwrapped.config
        noised = unwrapped.noised_forward(input_ids, t, attention_mask, generator, network=model,
                                          prompt_mask=prompt_mask)  # the prompt stays clean: never replaced
        positions = (noised.z_t != input_ids) if config.loss_mask == "changed" else noised.aux["replaced"]
        scored = response_mask(attention_mask, prompt_mask)
        if scored is not None:
            positions = positions & scored
        per_token = terms = None
        if config.elbo_weight:
            # the hybrid's bound, log p[x] and (mean, hinge) the regulariser's sum from ONE fused pass over the vocab
            eps = config.regularizer_eps if config.regularizer in ("mean", "hinge") else None
            per_token, S, log_p_x = unwrapped.noise_process.scheduler.nelbo_and_log_terms(
                noised.logits, input_ids, noised.z_t, noised.aux["alpha"], noised.aux["dalpha"], eps=eps)
            terms = (S, log_p_x)
        loss, stats = sddlm_loss(
            noised.logits, input_ids, positions,
            regularizer=config.regularizer, regularizer_weight=config.regularizer_weight,
            regularizer_margin=config.regularizer_margin, normalization=config.loss_normalization,
            num_negative_samples=config.num_negative_samples, eps=config.regularizer_eps, generator=generator,
            terms=terms,
        )
        if per_token is not None:  # the hybrid: mu times the uniform-state NELBO of the same draw
            nelbo = masked_mean(per_token, scored)
            loss = loss + config.elbo_weight * nelbo
            stats["nelbo"] = nelbo.detach()
        return loss, stats
