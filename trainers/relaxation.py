"""Duo's Gaussian-to-uniform relaxation, used only in training (Duo, arXiv 2506.10892, methods.md §B.2-B.3).

- `diffusion_transformation`: the operator T that maps a Gaussian log-SNR gamma to the uniform-state alpha of the
  argmax of a Gaussian latent over one-hot vectors (§B.2), by quadrature for any vocabulary size;
- `gaussian_coupled_latents`: argmaxes of several noise levels sharing one Gaussian draw, for Discrete Consistency
  Distillation's deterministic trajectories (§B.3.3), in O(B L);
- `gaussian_topk_relaxation`: the tempered softmax of the Gaussian latent on its k + 1 largest entries, Duo++'s
  memory-efficient curriculum (§B.3.2).

A loaded checkpoint never runs these (sampling and the ELBO use the uniform-state process alone), so they live in
`trainers/` and do not ship with the model.
"""

from __future__ import annotations

import math

import torch

from modeling_dlm.functional_dlm import as_column


_T_TABLES: dict[tuple[int, float, float, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _argmax_probability(m: torch.Tensor, vocab_size: int, num_nodes: int = 3601) -> tuple[torch.Tensor, torch.Tensor]:
    """p(m) = P(argmax(m e_x + eps) = x) = int phi(u) Phi(u + m)^(V-1) du and dp/dm, float64, by the trapezoid rule on
    u in [-9, 9] (the integrand is smooth and negligible outside)."""
    u = torch.linspace(-9.0, 9.0, num_nodes, dtype=torch.float64)  # (U,)
    log_phi_u = -0.5 * u**2 - 0.5 * math.log(2 * math.pi)
    shifted = u[None, :] + m.double()[:, None]  # (M, U)
    log_cdf = torch.special.log_ndtr(shifted)
    p = torch.trapezoid(torch.exp(log_phi_u + (vocab_size - 1) * log_cdf), u, dim=-1)
    log_phi_shift = -0.5 * shifted**2 - 0.5 * math.log(2 * math.pi)
    dp = torch.trapezoid(
        torch.exp(log_phi_u + math.log(vocab_size - 1) + (vocab_size - 2) * log_cdf + log_phi_shift), u, dim=-1
    )
    return p, dp


def diffusion_transformation(
    gamma: torch.Tensor, vocab_size: int, gamma_min: float, gamma_max: float, num_points: int = 2049
) -> tuple[torch.Tensor, torch.Tensor]:
    """Duo's operator T (methods.md §B.2): uniform-state alpha of the argmax of a Gaussian latent, and d alpha/d gamma.

    A variance-preserving Gaussian diffusion of one-hot vectors, w = alpha~ e_x + sigma~ eps with alpha~^2 =
    sigmoid(-gamma), sigma~^2 = sigmoid(gamma), has argmax(w) ~ q_t(. | x; alpha) with
        alpha = T(gamma) = (V p(gamma) - 1) / (V - 1),   p = int phi(u) Phi(u + m)^(V-1) du,   m = exp(-gamma / 2).
    Computed here by quadrature for any vocabulary size (no tokenizer-keyed tables, no download), tabulated once per
    (vocab_size, gamma range) on `num_points` points and linearly interpolated; float64 in, float64 out."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    if not gamma_min < gamma_max:
        raise ValueError(f"gamma_min ({gamma_min}) must be smaller than gamma_max ({gamma_max})")
    key = (vocab_size, float(gamma_min), float(gamma_max), num_points)
    if key not in _T_TABLES:
        grid = torch.linspace(gamma_min, gamma_max, num_points, dtype=torch.float64)
        m = torch.exp(-grid / 2)
        p, dp_dm = _argmax_probability(m, vocab_size)
        alpha = (vocab_size * p - 1) / (vocab_size - 1)
        dalpha = vocab_size / (vocab_size - 1) * dp_dm * (-m / 2)
        _T_TABLES[key] = (grid, alpha, dalpha)
    grid, alpha_table, dalpha_table = _T_TABLES[key]
    g = gamma.double().clamp(gamma_min, gamma_max)
    position = (g - gamma_min) / (gamma_max - gamma_min) * (num_points - 1)
    lo = position.floor().long().clamp(max=num_points - 2)
    frac = position - lo
    device = gamma.device
    alpha_table, dalpha_table = alpha_table.to(device), dalpha_table.to(device)
    alpha = alpha_table[lo] * (1 - frac) + alpha_table[lo + 1] * frac
    dalpha = dalpha_table[lo] * (1 - frac) + dalpha_table[lo + 1] * frac
    return alpha, dalpha


def gaussian_coupled_latents(
    x0: torch.Tensor,
    signal_to_noise: list[torch.Tensor],
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """argmax(alpha~ e_x + sigma~ eps) for several noise levels sharing ONE Gaussian eps (Duo's deterministic
    trajectory given x, methods.md §B.3.3), without building the (B, L, V) latent.

    With m = alpha~ / sigma~, the argmax is x iff eps_x + m > M = max_{j != x} eps_j, and otherwise the arg of that
    maximum, which is uniform over the other V - 1 tokens. M has CDF Phi(u)^(V-1), so M = Phi^-1(U^(1/(V-1))).
    `signal_to_noise` holds one m per level, each a scalar or (B,); returns one z (B, L) per level."""
    shape = x0.shape
    eps_x = torch.randn(shape, generator=generator, device=x0.device, dtype=torch.float64)
    u = torch.rand(shape, generator=generator, device=x0.device, dtype=torch.float64).clamp_min(1e-300)
    max_others = torch.special.ndtri(torch.exp(torch.log(u) / (vocab_size - 1)))  # (B, L)
    r = torch.randint(0, vocab_size - 1, shape, generator=generator, device=x0.device)
    other = r + (r >= x0).long()  # uniform over V \ {x}
    out = []
    for m in signal_to_noise:
        m = as_column(m, x0, torch.float64)
        out.append(torch.where(eps_x + m > max_others, x0, other))
    return out


def gaussian_topk_relaxation(
    x0: torch.Tensor,
    signal: torch.Tensor,
    noise: torch.Tensor,
    vocab_size: int,
    top_k: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tempered softmax of w = signal e_x + noise eps (eps ~ N(0, I_V)) kept on its k + 1 largest entries, without
    the (B, L, V) latent: Duo++'s memory-efficient curriculum (methods.md §B.3.2, `sample_tempered_softmax_topk`).

    The largest k of the V - 1 zero-mean entries are drawn as order statistics of uniforms (log-space recursion,
    Phi^-1), on k distinct random ids other than x (Floyd's sampling, then shuffled); the true token's entry is
    signal + noise eps_x. The other V - 1 - k entries enter only the softmax normaliser, in closed form:
    (V - 1 - k) E[exp(noise X) | X < c] with log E = noise^2/2 + log Phi(c - noise) - log Phi(c), c the k-th maximum.
    `signal`, `noise` are (B,) (already divided by the temperature). Returns ids (B, L, k + 1) (x first), their
    softmax weights (B, L, k + 1) (float32; they sum to < 1, the rest being the dropped tail) and z_t = argmax(w)
    (B, L), which is exact."""
    if not 1 <= top_k <= vocab_size - 1:
        raise ValueError(f"top_k must be in [1, {vocab_size - 1}], got {top_k}")
    B, L = x0.shape
    device = x0.device
    n = vocab_size - 1  # entries other than x
    # 1. order statistics of n standard normals, largest first: log Phi(M_i) = log Phi(M_i-1) + log(U_i) / (n - i + 1)
    u = torch.rand(B, L, top_k, generator=generator, device=device, dtype=torch.float64)
    log_u = torch.log(u.clamp_min(1e-300))
    log_cdf = torch.cumsum(log_u / torch.arange(n, n - top_k, -1, device=device, dtype=torch.float64), dim=-1)
    maxima = torch.special.ndtri(torch.exp(log_cdf))  # (B, L, k), decreasing
    # 2. k distinct ids among the n others (Floyd), in random order, then skip x
    chosen = torch.empty(B, L, top_k, dtype=torch.long, device=device)
    for i, j in enumerate(range(n - top_k, n)):
        r = torch.floor(torch.rand(B, L, generator=generator, device=device, dtype=torch.float64) * (j + 1)).long()
        taken = (chosen[..., :i] == r[..., None]).any(-1) if i else torch.zeros_like(r, dtype=torch.bool)
        chosen[..., i] = torch.where(taken, torch.full_like(r, j), r)
    order = torch.rand(B, L, top_k, generator=generator, device=device).argsort(-1)
    chosen = chosen.gather(-1, order)
    chosen = chosen + (chosen >= x0[..., None]).long()
    # 3. logits of the kept entries and the closed-form tail
    sig = signal.double().reshape(-1, 1, 1)
    nse = noise.double().reshape(-1, 1, 1)
    eps_x = torch.randn(B, L, 1, generator=generator, device=device, dtype=torch.float64)
    logits = torch.cat([sig + nse * eps_x, nse * maxima], dim=-1)  # (B, L, k + 1)
    c = maxima[..., -1:]
    rest = n - top_k
    if rest > 0:
        log_tail = (math.log(rest) + nse**2 / 2 + torch.special.log_ndtr(c - nse) - torch.special.log_ndtr(c))
        log_norm = torch.logaddexp(torch.logsumexp(logits, -1, keepdim=True), log_tail)
    else:
        log_norm = torch.logsumexp(logits, -1, keepdim=True)
    weights = torch.exp(logits - log_norm).float()
    ids = torch.cat([x0[..., None], chosen], dim=-1)
    z_t = torch.where(logits[..., 0] > logits[..., 1], x0, chosen[..., 0])
    return ids, weights, z_t
