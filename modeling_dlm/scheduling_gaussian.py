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
"""

from __future__ import annotations

import torch

from .noise_schedules import gaussian_alpha_sigma
from .scheduling_uniform import _row_chunks


class _RowStoppedMatmul(torch.autograd.Function):
    """a @ w, where the leading-dim rows of `a` with keep = 0 send no gradient to w (they still get their own)."""

    @staticmethod
    def forward(ctx, a, w, keep):
        ctx.save_for_backward(a, w, keep)
        return a @ w

    @staticmethod
    def backward(ctx, grad):
        a, w, keep = ctx.saved_tensors
        grad_a = grad @ w.T if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            shape = (-1,) + (1,) * (a.dim() - 1)
            # mask whichever of `a` and `grad` is smaller (the other one may be a (B, L, V) tensor)
            if a.shape[-1] <= grad.shape[-1]:
                a = a * keep.to(a.dtype).view(shape)
            else:
                grad = grad * keep.to(grad.dtype).view(shape)
            grad_w = a.reshape(-1, a.shape[-1]).T @ grad.reshape(-1, grad.shape[-1])
        return grad_a, grad_w, None


def row_stopped_matmul(a: torch.Tensor, w: torch.Tensor, stop: torch.Tensor | None) -> torch.Tensor:
    """`a @ w` for a (B, ..., K) and w (K, N), with the gradient to `w` from the rows where `stop` (B,) is True cut
    (methods.md §C.3: self-conditioning entries train the network only). One matmul forward, two backward, instead
    of computing the product twice (with and without `w.detach()`) and selecting rows."""
    if stop is None or not bool(stop.any()):
        return a @ w
    return _RowStoppedMatmul.apply(a, w, (~stop.to(a.device)).to(a.dtype))


def softmax_matmul(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """softmax(logits, -1) @ weight for logits (..., V) and weight (V, d), without writing the (..., V) softmax on CPU:
    the rows go through in cache-sized chunks (one chunk on accelerators). No autograd (sampling only)."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    out = torch.empty(flat.shape[0], weight.shape[-1], dtype=weight.dtype, device=logits.device)
    starts, step = _row_chunks(flat.shape[0], V, logits.device)
    for i in starts:
        torch.matmul(torch.softmax(flat[i:i + step], dim=-1).to(weight.dtype), weight, out=out[i:i + step])
    return out.view(*logits.shape[:-1], weight.shape[-1])


class GaussianEmbeddingScheduler:
    def __init__(self, embedding_dim: int):
        self.embedding_dim = embedding_dim

    def prior_sample(self, shape: tuple[int, ...], generator=None, device=None) -> torch.Tensor:
        return torch.randn(*shape, self.embedding_dim, generator=generator, device=device)

    @staticmethod
    def _col(x: torch.Tensor, ndim: int) -> torch.Tensor:
        return x.reshape(x.shape + (1,) * (ndim - x.dim()))

    def add_noise(
        self, embeds: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor | None = None, generator=None
    ) -> torch.Tensor:
        """z_t = alpha e + sigma eps for embeds (B, L, d) and gamma (B,); returns float32 (B, L, d)."""
        if noise is None:
            noise = torch.randn(embeds.shape, generator=generator, device=embeds.device)
        alpha, sigma = gaussian_alpha_sigma(gamma)
        alpha, sigma = self._col(alpha, embeds.dim()), self._col(sigma, embeds.dim())
        return (alpha * embeds.double() + sigma * noise.double()).float()

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
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float64)
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
