"""Uniform-state discrete diffusion: forward corruption, exact posterior, reverse step and the closed-form ELBO.

Papers: UDLM (Schiff et al., arXiv 2412.10193), Duo (Sahoo et al., arXiv 2506.10892), SDDLM (arXiv 2510.22926).
Spec: methods.md §B.2 (process), §B.3.1 (ELBO), §B.4 and §H.1 (sampling).

Time convention: t in [0, 1], t = 0 clean. alpha_t is the keep probability:
    q(z_t | x) = Cat(alpha_t e_x + (1 - alpha_t) / V . 1)
Posterior for s < t, with x_hat the denoiser's distribution over clean tokens and alpha_{t|s} = alpha_t / alpha_s:
    q(z_s | z_t, x_hat) = [V alpha_t x_hat * e_{z_t} + (alpha_{t|s} - alpha_t) e_{z_t} + (alpha_s - alpha_t) x_hat
                           + (1 - alpha_{t|s})(1 - alpha_s) / V . 1] / [V alpha_t x_hat[z_t] + 1 - alpha_t]
It is a three-part mixture (copy z_t | draw from x_hat | draw uniformly), which `step` samples without ever building
a (B, L, V) posterior: the component weights are per-position scalars (computed in float64), and only positions
that pick x_hat need a categorical draw (inverse CDF on those rows).

`UniformStateScheduler` is that math at given alpha (the oracle tests call it directly); `UniformStateProcess` adds
the schedule alpha(t) and is what a model holds (`model.noise_process`). Everything here is pure tensor math: no
parameters, no model calls; randomness only through `generator`.
"""

from __future__ import annotations

import torch

from .functional_dlm import (
    DiscreteProcess,
    as_column,
    draw_rand,
    draw_randint,
    row_chunks,
    sample_at,
    softmax_gather,
)


def _mixture_components(u: torch.Tensor, w_copy: torch.Tensor, w_x_hat: torch.Tensor, w_uniform: torch.Tensor):
    """Masks (copy, x_hat, uniform) of the posterior mixture component for float64 uniforms u in [0, 1): with
    v = u * (w_copy + w_x_hat + w_uniform), copy if v < w_copy, x_hat if v < w_copy + w_x_hat, uniform otherwise.
    The comparisons are strict, so u = 0 never picks a zero-weight component; v < total for every float64 u < 1 and
    the total is summed in the order of the comparisons, so a zero `w_uniform` is never picked either."""
    first_two = w_copy + w_x_hat
    v = u * (first_two + w_uniform)
    pick_copy = v < w_copy
    pick_x_hat = ~pick_copy & (v < first_two)
    return pick_copy, pick_x_hat, ~pick_copy & ~pick_x_hat


class UniformStateScheduler:
    """The uniform-state process over `vocab_size` tokens. Stateless apart from the vocabulary size."""

    def __init__(self, vocab_size: int):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        self.vocab_size = vocab_size

    # ---- prior and forward process -------------------------------------------------------------------------------
    def prior_sample(self, shape: tuple[int, ...], generator=None, device=None) -> torch.Tensor:
        return draw_randint(self.vocab_size, shape, generator, device)

    def add_noise(
        self, x0: torch.Tensor, alpha_t: torch.Tensor | float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample z_t ~ q(z_t | x0). Returns (z_t, resampled) where `resampled` marks positions drawn from the uniform
        prior (a resampled token equals x0 with probability 1 / V). x0 is (B, L); alpha_t a scalar or (B,)."""
        alpha = as_column(alpha_t, x0, torch.float32)
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        resampled = u < 1 - alpha  # (B, L)
        noise = torch.randint(0, self.vocab_size, x0.shape, generator=generator, device=x0.device)
        return torch.where(resampled, noise, x0), resampled

    # ---- posterior -----------------------------------------------------------------------------------------------
    def posterior_probs(
        self, x_hat: torch.Tensor, z_t: torch.Tensor, alpha_t: torch.Tensor | float, alpha_s: torch.Tensor | float
    ) -> torch.Tensor:
        """Dense q(z_s | z_t, x_hat) of shape (B, L, V), in x_hat's dtype. For tests and small vocabularies; sampling
        uses the mixture form in `step`."""
        V = self.vocab_size
        a_t = as_column(alpha_t, z_t, x_hat.dtype)[..., None]  # (B, 1, 1) or scalar
        a_s = as_column(alpha_s, z_t, x_hat.dtype)[..., None]
        a_ts = a_t / a_s
        onehot = torch.nn.functional.one_hot(z_t, V).to(x_hat.dtype)  # (B, L, V)
        x_hat_z = (x_hat * onehot).sum(-1, keepdim=True)  # (B, L, 1)
        numerator = V * a_t * x_hat * onehot + (a_ts - a_t) * onehot + (a_s - a_t) * x_hat + (1 - a_ts) * (1 - a_s) / V
        return numerator / (V * a_t * x_hat_z + 1 - a_t)

    def mixture_weights(
        self, x_hat_z: torch.Tensor, alpha_t: torch.Tensor | float, alpha_s: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float64 weights (copy z_t, draw from x_hat, draw uniformly) of the posterior mixture; they sum to
        Z = V alpha_t x_hat[z_t] + 1 - alpha_t. x_hat_z is (B, L)."""
        a_t = as_column(alpha_t, x_hat_z, torch.float64)
        a_s = as_column(alpha_s, x_hat_z, torch.float64)
        a_ts = a_t / a_s
        w_copy = self.vocab_size * a_t * x_hat_z.double() + (a_ts - a_t)
        w_x_hat = (a_s - a_t).expand_as(w_copy)
        w_uniform = ((1 - a_ts) * (1 - a_s)).expand_as(w_copy)
        return w_copy, w_x_hat, w_uniform

    def step(
        self,
        x_hat: torch.Tensor,
        z_t: torch.Tensor,
        alpha_t: torch.Tensor | float,
        alpha_s: torch.Tensor | float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw z_s ~ q(z_s | z_t, x_hat). x_hat (B, L, V) holds probabilities (after any temperature/top-k/top-p
        filtering, which acts on x_hat, never on the posterior); z_t (B, L). Returns z_s (B, L)."""
        x_hat_z = x_hat.gather(-1, z_t[..., None]).squeeze(-1)  # (B, L)
        return self._mixture_step(x_hat_z, lambda rows: x_hat[rows], z_t, alpha_t, alpha_s, generator)

    def step_from_logits(
        self,
        logits: torch.Tensor,
        z_t: torch.Tensor,
        alpha_t: torch.Tensor | float,
        alpha_s: torch.Tensor | float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """`step(logits.softmax(-1), z_t, ...)` (the same random draws, the same z_s) without writing the (B, L, V)
        softmax: the mixture weights need x_hat only at z_t (a row-chunked softmax, `softmax_gather`), and whole rows
        of x_hat only where the mixture picks x_hat. This is the sampling hot path (methods.md §H.1)."""
        x_hat_z = softmax_gather(logits, z_t)  # (B, L)
        return self._mixture_step(x_hat_z, lambda rows: logits[rows].softmax(-1), z_t, alpha_t, alpha_s, generator)

    def _mixture_step(self, x_hat_z, x_hat_rows, z_t, alpha_t, alpha_s, generator) -> torch.Tensor:
        """The three-part mixture draw; `x_hat_rows(rows)` returns x_hat (N, V) at the N positions that pick it."""
        w_copy, w_x_hat, w_uniform = self.mixture_weights(x_hat_z, alpha_t, alpha_s)
        u = draw_rand(z_t.shape, generator, z_t.device, torch.float64)
        pick_copy, pick_x_hat, pick_uniform = _mixture_components(u, w_copy, w_x_hat, w_uniform)
        z_s = z_t.clone()
        rows = pick_x_hat.nonzero(as_tuple=True)
        draws = sample_at(x_hat_rows, rows, z_t.shape, generator, z_t.device)
        if rows[0].numel():
            z_s[rows] = draws
        uniform = draw_randint(self.vocab_size, z_t.shape, generator, z_t.device)
        return torch.where(pick_uniform, uniform, z_s)

    # ---- ELBO ----------------------------------------------------------------------------------------------------
    def nelbo_per_token(
        self,
        log_x_theta: torch.Tensor,
        x0: torch.Tensor,
        z_t: torch.Tensor,
        alpha_t: torch.Tensor | float,
        dalpha_t: torch.Tensor | float,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Continuous-time UDLM NELBO integrand (methods.md §B.3.1), closed form, per position (B, L), >= 0.

        With xbar = V alpha e_x + (1 - alpha) 1 and xbar_theta = V alpha x_theta + (1 - alpha) 1:
            L = (alpha' / (V alpha)) [V / xbar[z] - V / xbar_theta[z]
                                      - sum_j (xbar[j] / xbar[z]) log(xbar[j] xbar_theta[z] / (xbar[z] xbar_theta[j]))]
        xbar takes two values (A = V alpha + 1 - alpha at j = x, b = 1 - alpha elsewhere), so the sum reduces to
            (1 / xbar[z]) [A log A + (V-1) b log b - V log xbar[z] + V log xbar_theta[z] - b S
                           - V alpha log xbar_theta[x]]
        with S = sum_j log xbar_theta[j], the one O(V) reduction. log_x_theta is (B, L, V) log-probabilities.
        """
        alpha, dalpha, one_minus = self._elbo_scalars(alpha_t, dalpha_t, x0, dtype)
        log_x = log_x_theta.to(dtype)
        # log xbar_theta[j] = log(V alpha p_j + (1 - alpha)); S sums it over the vocabulary: (B, L)
        S = torch.log(torch.exp(log_x) * (self.vocab_size * alpha)[..., None] + one_minus[..., None]).sum(-1)
        log_p_z = log_x.gather(-1, z_t[..., None]).squeeze(-1)
        log_p_x = log_x.gather(-1, x0[..., None]).squeeze(-1)
        return self._nelbo_from_terms(S, log_p_z, log_p_x, x0, z_t, alpha, dalpha, one_minus)

    @staticmethod
    def _elbo_scalars(alpha_t, dalpha_t, x0, dtype):
        """(alpha, alpha', 1 - alpha) as (B, 1) columns in `dtype`; the clamps keep t = 0 and t = 1 finite."""
        alpha = as_column(alpha_t, x0, dtype).clamp(min=1e-12)
        return alpha, as_column(dalpha_t, x0, dtype), (1 - alpha).clamp(min=1e-20)

    def _nelbo_from_terms(self, S, log_p_z, log_p_x, x0, z_t, alpha, dalpha, one_minus):
        """The closed form of `nelbo_per_token` from S = sum_j log xbar_theta[j], log x_theta[z_t] and
        log x_theta[x0] (each (B, L)); O(B L)."""
        V = self.vocab_size
        a_big = V * alpha + one_minus  # A
        log_xbt_z = torch.log(V * alpha * torch.exp(log_p_z) + one_minus)
        log_xbt_x = torch.log(V * alpha * torch.exp(log_p_x) + one_minus)
        xbar_z = torch.where(z_t == x0, a_big, one_minus)  # (B, L)
        term1 = V / xbar_z - V * torch.exp(-log_xbt_z)
        const = a_big * torch.log(a_big) + (V - 1) * torch.special.xlogy(one_minus, one_minus)
        term2 = (const - V * torch.log(xbar_z) + V * log_xbt_z - one_minus * S - V * alpha * log_xbt_x) / xbar_z
        return dalpha / (V * alpha) * (term1 - term2)

    def nelbo_per_token_from_logits(
        self,
        logits: torch.Tensor,
        x0: torch.Tensor,
        z_t: torch.Tensor,
        alpha_t: torch.Tensor | float,
        dalpha_t: torch.Tensor | float,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """`nelbo_per_token` with x_theta = softmax(logits), fused: the softmax, S = sum_j log xbar_theta[j] and the
        two gathers run in one autograd node (`_UniformELBOTerms`) that keeps no (B, L, V) tensor besides the
        logits and builds one (forward) or two (backward) (B, L, V) temporaries in `dtype` (the unfused chain keeps
        five). Same value and gradient as `nelbo_per_token(logits.to(dtype).log_softmax(-1), ...)` up to rounding."""
        return self.nelbo_and_log_terms(logits, x0, z_t, alpha_t, dalpha_t, eps=None, dtype=dtype)[0]

    def nelbo_and_log_terms(
        self,
        logits: torch.Tensor,
        x0: torch.Tensor,
        z_t: torch.Tensor,
        alpha_t: torch.Tensor | float,
        dalpha_t: torch.Tensor | float,
        eps: float | None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`nelbo_per_token_from_logits` and, from the same fused softmax pass, sum_j log(p_j + eps) and log p[x0]
        (SDDLM's regulariser and cross-entropy terms in its hybrid loss): (nelbo, S_eps, log_p_x), (B, L) each.
        With `eps=None` the second sum is skipped (S_eps is None)."""
        alpha, dalpha, one_minus = self._elbo_scalars(alpha_t, dalpha_t, x0, dtype)
        # (B, L) each; their dtype is the O(V) pass's
        scale, floor = (self.vocab_size * alpha).expand(x0.shape), one_minus.expand(x0.shape)
        if eps is not None:  # a second affine pair: (2, B, L)
            scale = torch.stack([scale, torch.ones(x0.shape, dtype=dtype, device=x0.device)])
            floor = torch.stack([floor, torch.full(x0.shape, eps, dtype=dtype, device=x0.device)])
        S, log_p_z, log_p_x = _UniformELBOTerms.apply(logits, z_t, x0, scale.contiguous(), floor.contiguous())
        S_elbo, S_eps = (S[0], S[1]) if eps is not None else (S, None)
        return self._nelbo_from_terms(S_elbo, log_p_z, log_p_x, x0, z_t, alpha, dalpha, one_minus), S_eps, log_p_x

    def nelbo_per_token_generic(
        self,
        x_theta: torch.Tensor,
        x0: torch.Tensor,
        z_t: torch.Tensor,
        alpha_t: torch.Tensor | float,
        dalpha_t: torch.Tensor | float,
    ) -> torch.Tensor:
        """The same integrand from the generic O(V) formula (UDLM `diffusion.py`), in x_theta's dtype. Reference for
        tests; materialises several (B, L, V) tensors."""
        V = self.vocab_size
        alpha = as_column(alpha_t, x0, x_theta.dtype)[..., None]  # (B, 1, 1)
        dalpha = as_column(dalpha_t, x0, x_theta.dtype)
        onehot = torch.nn.functional.one_hot(x0, V).to(x_theta.dtype)
        xbar = V * alpha * onehot + (1 - alpha)  # (B, L, V)
        xbar_theta = V * alpha * x_theta + (1 - alpha)
        xbar_z = xbar.gather(-1, z_t[..., None])  # (B, L, 1)
        xbar_theta_z = xbar_theta.gather(-1, z_t[..., None])
        ratio = xbar / xbar_z
        log_term = torch.log(xbar * xbar_theta_z / (xbar_z * xbar_theta))
        inner = V / xbar_z.squeeze(-1) - V / xbar_theta_z.squeeze(-1) - (ratio * log_term).sum(-1)
        return dalpha / (V * alpha.squeeze(-1)) * inner


class UniformStateProcess(DiscreteProcess):
    """The uniform-state process (SDDLM, Duo) as one object: the schedule alpha(t) and `UniformStateScheduler`'s
    math behind the shared process interface (`functional_dlm.DiscreteProcess`)."""

    def __init__(self, vocab_size: int, schedule):
        super().__init__(UniformStateScheduler(vocab_size), schedule)


def softmax_log_affine_terms(
    logits: torch.Tensor, z_t: torch.Tensor, x0: torch.Tensor, scale: torch.Tensor, floor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, log p[z_t], log p[x0]), each (B, L) in `scale`'s dtype, with p = softmax(logits) and
    S = sum_j log(scale p_j + floor), as ONE autograd node that keeps no (B, L, V) tensor besides the logits.
    The uniform ELBO uses scale = V alpha_t, floor = 1 - alpha_t; SDDLM's mean regulariser scale = 1, floor = eps."""
    return _UniformELBOTerms.apply(logits, z_t, x0, scale, floor)


class _UniformELBOTerms(torch.autograd.Function):
    """From logits (B, L, V), with p = softmax(logits) in the dtype of the per-position scale c and floor b (B, L):
        S = sum_j log(c p_j + b),   log p[z],   log p[x]                                   (each (B, L))
    Backward, with r_j = c p_j / (c p_j + b):
        dS/dlogits = r - p sum_j r_j,   dlog p[k]/dlogits = e_k - p
    c and b may stack K pairs on a leading dimension, (K, B, L): S is then (K, B, L), from the same softmax.
    The softmax is recomputed in backward from the saved logits instead of being stored. The log-normaliser comes
    from the softmax itself, lse = max_j logit_j - log max_j p_j (the largest probability is >= 1/V, so its log is
    accurate). On CPU the rows are processed in cache-sized chunks, so that the (chunk, V) temporaries never leave
    the cache; only the logits and their gradient are (B, L, V)."""

    @staticmethod
    def forward(ctx, logits, z_t, x0, scale, floor):
        dtype = scale.dtype
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        K = scale.shape[0] if scale.dim() == logits.dim() else 1  # K affine pairs stacked on a leading dim
        c, b = scale.reshape(K, -1, 1), floor.reshape(K, -1, 1)
        S = torch.empty(K, flat.shape[0], dtype=dtype, device=logits.device)
        lse = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)
        starts, step = row_chunks(flat.shape[0], V, logits.device)
        for i in starts:
            rows = slice(i, i + step)
            x = flat[rows].to(dtype)  # (n, V)
            p = torch.softmax(x, dim=-1)
            lse[rows] = x.amax(-1) - torch.log(p.amax(-1))
            for k in range(K):  # the last pair works in place on p
                term = p.mul_(c[k, rows]) if k == K - 1 else torch.mul(p, c[k, rows])
                S[k, rows] = term.add_(b[k, rows]).log_().sum(-1)
        lse = lse.view(x0.shape)
        log_p_z = logits.gather(-1, z_t[..., None]).squeeze(-1).to(dtype) - lse
        log_p_x = logits.gather(-1, x0[..., None]).squeeze(-1).to(dtype) - lse
        ctx.save_for_backward(logits, z_t, x0, scale, floor)
        return S.view(scale.shape), log_p_z, log_p_x

    @staticmethod
    def backward(ctx, grad_S, grad_z, grad_x):
        logits, z_t, x0, scale, floor = ctx.saved_tensors
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        K = scale.shape[0] if scale.dim() == logits.dim() else 1
        c, b = scale.reshape(K, -1, 1), floor.reshape(K, -1, 1)
        g_S = grad_S.reshape(K, -1, 1)
        g_direct = (grad_z + grad_x).reshape(-1, 1)
        grad = torch.empty(flat.shape, dtype=scale.dtype, device=logits.device)
        starts, step = row_chunks(flat.shape[0], V, logits.device)
        for i in starts:
            rows = slice(i, i + step)
            p = torch.softmax(flat[rows].to(scale.dtype), dim=-1)  # (n, V)
            total, coeff = None, g_direct[rows]
            for k in range(K):
                r = torch.addcmul(b[k, rows], p, c[k, rows])  # c p + b
                r.reciprocal_().mul_(-b[k, rows]).add_(1)  # r = c p / (c p + b) = 1 - b / (c p + b)
                coeff = g_S[k, rows] * r.sum(-1, keepdim=True) + coeff  # (n, 1)
                r.mul_(g_S[k, rows])
                total = r if total is None else total.add_(r)
            torch.sub(total, p.mul_(coeff), out=grad[rows])
        grad = grad.view(logits.shape)
        grad.scatter_add_(-1, z_t[..., None], grad_z[..., None])
        grad.scatter_add_(-1, x0[..., None], grad_x[..., None])
        return grad.to(logits.dtype), None, None, None, None
