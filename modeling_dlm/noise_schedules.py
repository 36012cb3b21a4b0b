"""Noise schedules: how much signal survives at time t.

Convention used across dlm: t in [0, 1], t = 0 is clean data and t = 1 is the prior.

Discrete processes (methods.md §B.2; `s-sahoo/duo: trainer_base.py LogLinear/Cosine`):
    alpha_t is the probability that a token is kept (uniform state: P(z_t = x) = alpha_t + (1 - alpha_t) / V).
    - LogLinearSchedule: alpha_t = 1 - (1 - eps) t,                     dalpha/dt = -(1 - eps)
    - CosineSchedule:    alpha_t = 1 - cos(pi/2 (1 - (1 - eps) t)),
                         dalpha/dt = -(pi/2)(1 - eps) sin(pi/2 (1 - (1 - eps) t))
    so alpha_1 = eps (1e-3), not 0. The network is conditioned on sigma = -log alpha_t.

Gaussian process (methods.md §C.2; `igul222/plaid: lib/models.py NoiseSchedule, GammaBounds`):
    - LearnedGammaSchedule: gamma(t) = gamma_0 + (gamma_1 - gamma_0) * normalized monotone network(t), where gamma is
      the log noise-to-signal ratio, alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma). It is an nn.Module owned by
      the RePlaid model (so it saves with the weights); its math runs in float64.

The discrete schedules are frozen dataclasses: their fields are their whole config, nothing is cached on them, and
every method computes on the input's device and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LogLinearSchedule:
    eps: float = 1e-3

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - (1 - self.eps) * t

    def dalpha_dt(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -(1 - self.eps))

    def t_from_alpha(self, alpha: torch.Tensor) -> torch.Tensor:
        return (1 - alpha) / (1 - self.eps)


@dataclass(frozen=True)
class CosineSchedule:
    eps: float = 1e-3

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - torch.cos(math.pi / 2 * (1 - (1 - self.eps) * t))

    def dalpha_dt(self, t: torch.Tensor) -> torch.Tensor:
        return -(math.pi / 2) * (1 - self.eps) * torch.sin(math.pi / 2 * (1 - (1 - self.eps) * t))

    def t_from_alpha(self, alpha: torch.Tensor) -> torch.Tensor:
        return (1 - torch.acos(1 - alpha) * 2 / math.pi) / (1 - self.eps)


def get_schedule(name: str, eps: float) -> LogLinearSchedule | CosineSchedule:
    if name == "loglinear":
        return LogLinearSchedule(eps)
    if name == "cosine":
        return CosineSchedule(eps)
    raise ValueError(f"unknown noise schedule {name!r}; expected 'loglinear' or 'cosine'")


def sigma_from_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """The time input of uniform-state networks: sigma = -log alpha_t."""
    return -torch.log(alpha)


class LearnedGammaSchedule(nn.Module):
    """Learned monotone log noise-to-signal schedule gamma(t) with learnable endpoints (Plaid/RePlaid).

    gamma_tilde(t) = W2 . tanh(W1 (t - 1/2) + b1), W1 = softplus(W1_raw) > 0, W2 = 0.01 softplus(W2_raw) > 0, so
    gamma_tilde is increasing; it is normalised to [0, 1] over t in [0, 1] and mapped onto [gamma_0, gamma_1].
    The derivative dgamma/dt is analytic (no autograd needed, so it also works under `torch.no_grad`).
    """

    def __init__(self, hidden_size: int = 1024, gamma_0: float = -3.0, gamma_1: float = 6.0):
        super().__init__()
        self.W1_raw = nn.Parameter(torch.zeros(hidden_size))
        self.b1 = nn.Parameter(torch.zeros(hidden_size))
        self.W2_raw = nn.Parameter(torch.zeros(hidden_size))
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_0)))
        self.gamma_1 = nn.Parameter(torch.tensor(float(gamma_1)))

    def _tilde(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma_tilde(t) and its derivative, float64; t is (N,)."""
        W1 = F.softplus(self.W1_raw.double())  # (H,)
        W2 = 0.01 * F.softplus(self.W2_raw.double())  # (H,)
        h = torch.tanh((t.double()[:, None] - 0.5) * W1 + self.b1.double())  # (N, H)
        value = h @ W2  # (N,)
        deriv = ((1 - h**2) * W1) @ W2  # (N,)
        return value, deriv

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learnable gamma_0 = gamma(0) and gamma_1 = gamma(1), float64 scalars."""
        return self.gamma_0.double(), self.gamma_1.double()

    def shape(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised shape gamma_hat(t) in [0, 1] (gamma_hat(0) = 0, gamma_hat(1) = 1) and d gamma_hat / dt, both
        float64 with the shape of t. They depend on the shape network only (not on gamma_0, gamma_1), which lets a
        trainer treat the shape's gradient apart from the endpoints' (Plaid's variance-minimising schedule)."""
        shape = t.shape
        ends, _ = self._tilde(torch.tensor([0.0, 1.0], dtype=torch.float64, device=t.device))  # (2,)
        value, deriv = self._tilde(t.reshape(-1).double())  # (N,) each
        span = ends[1] - ends[0]
        return ((value - ends[0]) / span).reshape(shape), (deriv / span).reshape(shape)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns gamma(t) = gamma_0 + (gamma_1 - gamma_0) gamma_hat(t) and dgamma/dt, both float64 with the shape
        of t."""
        gamma_hat, dgamma_hat = self.shape(t)
        g0, g1 = self.endpoints()
        return g0 + (g1 - g0) * gamma_hat, (g1 - g0) * dgamma_hat


def gaussian_alpha_sigma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance-preserving scales from the log noise-to-signal gamma: alpha^2 = sigmoid(-gamma),
    sigma^2 = sigmoid(gamma)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def antithetic_times(
    n: int,
    *,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    device=None,
    offset: int = 0,
    total: int | None = None,
    antithetic: bool = True,
) -> torch.Tensor:
    """Stratified ("antithetic") times over a batch, as in `s-sahoo/duo: Diffusion._sample_t` (methods.md §B.3.1).

    u_i = (u + (offset + i) / total) mod 1 and t = (1 - eps) u + eps, i = 0 .. n-1, with one shared u ~ U[0, 1).
    `offset`/`total` let each rank (or accumulation step) draw its slice of one stratified global batch, provided the
    generators share their state. With `antithetic=False` every t is an independent draw. Returns float32 (n,).
    """
    total = n if total is None else total
    if antithetic:
        u = torch.rand(1, generator=generator, device=device)
        u = (u + (offset + torch.arange(n, device=device)) / total) % 1
    else:
        u = torch.rand(n, generator=generator, device=device)
    return (1 - eps) * u + eps
