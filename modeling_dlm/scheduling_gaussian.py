"""Variance-preserving Gaussian diffusion on token embeddings (RePlaid / Plaid), methods.md §C.

Papers: Plaid (Gulrajani & Hashimoto, NeurIPS 2023), RePlaid (arXiv 2605.18530), VDM (Kingma et al., arXiv 2107.00630).

With gamma the log noise-to-signal ratio, alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma), SNR = exp(-gamma):
    z_t = alpha_t e + sigma_t eps,           e = E[x] (unit-norm rows), eps ~ N(0, I)
NELBO per token in nats (VDM continuous time):
    L_prior = KL(N(alpha_1 e, sigma_1^2 I) || N(0, I))
    L_recon = -log x_theta(z_0, gamma_0)[x]
    L_diff  = 1/2 exp(-gamma_t) gamma'(t) ||e - e_hat(z_t, t)||^2,   t ~ U[0, 1]
Reverse step s < t (VDM App. A.4, eq. 33), with c = -expm1(gamma_s - gamma_t) = 1 - SNR_t / SNR_s:
    z_s = (1 - c)(alpha_s / alpha_t) z_t + c alpha_s e_hat + sqrt(c (1 - alpha_s^2)) xi
and DDIM: z_s = alpha_s e_hat + sigma_s eps_hat. Schedule and step math run in float64.
`GaussianEmbeddingScheduler` is that math at given gamma; `GaussianEmbeddingProcess` adds the model's learned gamma(t)
and its embeddings and is what the model hands out (`model.noise_process`), with the sampler's state a
`GaussianLatent` (the latent, its argmax decode and e_hat, the next call's self-conditioning input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .functional_dlm import Noised, draw_randn, softmax_matmul
from .noise_schedules import gaussian_alpha_sigma


class GaussianEmbeddingScheduler:
    def __init__(self, embedding_dim: int):
        self.embedding_dim = embedding_dim

    def prior_sample(self, shape: tuple[int, ...], generator=None, device=None) -> torch.Tensor:
        return draw_randn((*shape, self.embedding_dim), generator, device)

    @staticmethod
    def _col(x: torch.Tensor, ndim: int) -> torch.Tensor:
        return x.reshape(x.shape + (1,) * (ndim - x.dim()))

    def add_noise(
        self, embeds: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor | None = None, generator=None
    ) -> torch.Tensor:
        """z_t = alpha e + sigma eps for embeds (B, L, d) and gamma (B,); returns float32 (B, L, d)."""
        if noise is None:
            noise = draw_randn(embeds.shape, generator, embeds.device)
        alpha, sigma = gaussian_alpha_sigma(gamma)
        alpha, sigma = self._col(alpha, embeds.dim()), self._col(sigma, embeds.dim())
        return (alpha * embeds.double() + sigma * noise.double()).float()

    def clean_latent(self, embeds: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """The latent of a given (never corrupted) token at the level gamma (B,): its embedding times
        sqrt(alpha^2 + d_e sigma^2), which the network's input normalisation (z / sqrt(alpha^2 / d_e + sigma^2)) maps
        to sqrt(d_e) e at every t, so a prompt is the same clean input at every noise level. (B, L, d) float32."""
        alpha, sigma = gaussian_alpha_sigma(gamma)
        scale = torch.sqrt(alpha**2 + embeds.shape[-1] * sigma**2)
        return (self._col(scale, embeds.dim()) * embeds.double()).float()

    def prior_kl(self, embeds: torch.Tensor, gamma_1: torch.Tensor) -> torch.Tensor:
        """KL(N(alpha_1 e, sigma_1^2 I) || N(0, I)) summed over the embedding dims; (B, L), float64."""
        alpha2, sigma2 = torch.sigmoid(-gamma_1), torch.sigmoid(gamma_1)
        sq = (embeds.double() ** 2).sum(-1)
        d = embeds.shape[-1]
        return 0.5 * (d * sigma2 + alpha2 * sq - d - d * torch.log(sigma2))

    def diffusion_loss(
        self, embeds: torch.Tensor, embeds_hat: torch.Tensor, gamma: torch.Tensor, dgamma: torch.Tensor
    ) -> torch.Tensor:
        """1/2 exp(-gamma) gamma' ||e - e_hat||^2 per position; (B, L), float64. gamma, dgamma are (B,)."""
        sq = ((embeds.double() - embeds_hat.double()) ** 2).sum(-1)  # (B, L)
        return 0.5 * torch.exp(-gamma)[:, None] * dgamma[:, None] * sq

    def step(
        self,
        embeds_hat: torch.Tensor,
        z_t: torch.Tensor,
        gamma_t: torch.Tensor,
        gamma_s: torch.Tensor,
        *,
        score_temperature: float = 1.0,
        ddim: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One reverse step z_t -> z_s (float64 inside, float32 out). embeds_hat is the x0-embedding estimate.

        score_temperature < 1 sharpens: eps_hat is divided by it and e_hat re-derived (Plaid's "score temperature")."""
        nd = z_t.dim()
        a_t, s_t = (self._col(v, nd) for v in gaussian_alpha_sigma(gamma_t.double()))
        a_s, s_s = (self._col(v, nd) for v in gaussian_alpha_sigma(gamma_s.double()))
        z = z_t.double()
        e_hat = embeds_hat.double()
        eps_hat = (z - a_t * e_hat) / s_t / score_temperature
        e_hat = (z - s_t * eps_hat) / a_t
        if ddim:
            return (a_s * e_hat + s_s * eps_hat).float()
        c = self._col(-torch.expm1(gamma_s.double() - gamma_t.double()), nd)
        noise = draw_randn(z.shape, generator, z.device, torch.float64)
        z_s = (1 - c) * (a_s / a_t) * z + c * a_s * e_hat + torch.sqrt(c * (1 - a_s**2)) * noise
        return z_s.float()

    def posterior_mean_var(
        self, z_t: torch.Tensor, embeds: torch.Tensor, gamma_t: torch.Tensor, gamma_s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(z_s | z_t, e) (float64); the sampler's step uses these with e -> e_hat."""
        nd = z_t.dim()
        a_t, _ = (self._col(v, nd) for v in gaussian_alpha_sigma(gamma_t.double()))
        a_s, _ = (self._col(v, nd) for v in gaussian_alpha_sigma(gamma_s.double()))
        c = self._col(-torch.expm1(gamma_s.double() - gamma_t.double()), nd)
        mean = (1 - c) * (a_s / a_t) * z_t.double() + c * a_s * embeds.double()
        return mean, c * (1 - a_s**2)


@dataclass
class GaussianLatent:
    """The Gaussian sampler's state: z (B, L, d_e) float32; tokens (B, L), the argmax decode of the last x_hat (None
    before the first step); embeds_hat (B, L, d_e), e_hat = x_hat E of the last step (the self-conditioning input)."""

    z: torch.Tensor
    tokens: torch.Tensor | None = None
    embeds_hat: torch.Tensor | None = None


class GaussianEmbeddingProcess:
    """RePlaid's process as one object, behind the interface of `functional_dlm` (see its docstring). It owns its
    time parameterisation through references to the model's parts: `schedule`, the learned gamma(t) module
    (t (B,) -> (gamma, gamma'), float64), and `embeddings`, a callable returning the unit-norm E (V, d_e). The model
    builds it on every `model.noise_process` access, so it always sees the current (resized, LoRA-wrapped) parts.
    Given positions (`fixed`): in `add_noise` (training, the bound) they hold their clean latent
    (`GaussianEmbeddingScheduler.clean_latent`); in sampling (`fix`), `given_latent` decides: `"clean"` the same (for
    a model trained conditionally), `"noised"` the forward-noised true embedding at the step's level (the replacement
    method, for a model trained on whole sequences only)."""

    def __init__(self, embedding_dim: int, schedule, embeddings, self_conditioning: bool = True,
                 given_latent: str = "noised"):
        self.scheduler = GaussianEmbeddingScheduler(embedding_dim)
        self.schedule = schedule
        self.embeddings = embeddings
        self.self_conditioning = self_conditioning
        self.given_latent = given_latent

    def prior_sample(self, shape: tuple[int, ...], generator=None, device=None) -> GaussianLatent:
        return GaussianLatent(self.scheduler.prior_sample(shape, generator=generator, device=device))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
                  fixed: torch.Tensor | None = None) -> Noised:
        """z_t = alpha_t E[x0] + sigma_t eps at times t (B,), the `fixed` (B, L) positions at their clean latent; the
        network's inputs carry no self-conditioning."""
        gamma, dgamma = self.schedule(t)  # (B,) float64 each
        embeds = self.embeddings()[x0]  # (B, L, d_e)
        z_t = self.scheduler.add_noise(embeds, gamma, generator=generator)
        if fixed is not None:
            z_t = torch.where(fixed[..., None], self.scheduler.clean_latent(embeds, gamma), z_t)
        return Noised(z_t, {"noisy_embeds": z_t, "t": t}, {"gamma": gamma, "dgamma": dgamma, "embeds": embeds})

    def model_inputs(self, z: GaussianLatent, t: torch.Tensor) -> dict:
        """Latent, time (B,) float32 and, with self-conditioning, the previous step's e_hat."""
        B = z.z.shape[0]
        return {"noisy_embeds": z.z, "t": t.expand(B).float(),
                "self_cond": z.embeds_hat if self.self_conditioning else None}

    def nelbo_per_token(self, logits: torch.Tensor, x0: torch.Tensor, noised: Noised) -> torch.Tensor:
        """The continuous-time diffusion term at the draw, (B, L) float64 (the model's bound adds the prior and the
        reconstruction terms, which need their own network call at t = 0)."""
        with torch.autocast(logits.device.type, enabled=False):  # float32: bf16 would bias ||e - e_hat||^2 at t ~ 0
            embeds_hat = logits.float().softmax(-1) @ self.embeddings()
        return self.scheduler.diffusion_loss(noised.aux["embeds"], embeds_hat, noised.aux["gamma"],
                                             noised.aux["dgamma"])

    def denoise_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def step(self, logits: torch.Tensor, z: GaussianLatent, t: torch.Tensor, s: torch.Tensor, *,
             generator: torch.Generator | None = None, final: bool = False, greedy: bool = False,
             ddim: bool = False, score_temperature: float = 1.0) -> GaussianLatent:
        """e_hat = softmax(logits) E and the argmax decode; then (except at the last step, which only decodes) the
        VDM ancestral (or DDIM) step z_t -> z_s. `greedy` changes nothing: the decode is always the argmax."""
        embeds_hat = softmax_matmul(logits, self.embeddings())  # (B, L, d_e), no (B, L, V) softmax written
        tokens = logits.argmax(-1)
        if final:
            return GaussianLatent(z.z, tokens, embeds_hat)
        B = z.z.shape[0]
        gamma_t, _ = self.schedule(t.expand(B))
        gamma_s, _ = self.schedule(s.expand(B))
        z_s = self.scheduler.step(embeds_hat, z.z, gamma_t, gamma_s, score_temperature=score_temperature, ddim=ddim,
                                  generator=generator)
        return GaussianLatent(z_s, tokens, embeds_hat)

    def fix(self, z: GaussianLatent, x0: torch.Tensor, fixed: torch.Tensor, t: torch.Tensor | None = None, *,
            generator: torch.Generator | None = None, final: bool = False) -> GaussianLatent:
        """Given tokens: their decode is x0, and (not after the last step) their latent is, with
        `given_latent="clean"`, the clean latent at the next call's time t (t = 1 at the prior, t=None); with
        `"noised"`, the forward-noised true embedding at time t (after every step; the prior is left as drawn)."""
        tokens = None if z.tokens is None else torch.where(fixed, x0, z.tokens)
        clean = self.given_latent == "clean"
        if final or (t is None and not clean):
            return GaussianLatent(z.z, tokens, z.embeds_hat)
        B = x0.shape[0]
        t = torch.ones(B, dtype=torch.float64, device=x0.device) if t is None else t.expand(B)
        gamma, _ = self.schedule(t)
        embeds = self.embeddings()[x0]
        given = self.scheduler.clean_latent(embeds, gamma) if clean else \
            self.scheduler.add_noise(embeds, gamma, generator=generator)
        return GaussianLatent(torch.where(fixed[..., None], given, z.z), tokens, z.embeds_hat)

    def tokens(self, z: GaussianLatent) -> torch.Tensor:
        return z.tokens
