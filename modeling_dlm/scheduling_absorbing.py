"""Absorbing-state (masked) discrete diffusion: the MDLM baseline (Sahoo et al., arXiv 2406.07524).

Time convention: t in [0, 1], t = 0 clean; alpha_t is the probability that a token is still unmasked:
    q(z_t | x) = Cat(alpha_t e_x + (1 - alpha_t) e_m)
SUBS parameterisation: the denoiser never predicts the mask token, and unmasked positions are carried over, so
x_theta(z_t)[x] is only learned at masked positions. The continuous-time NELBO per position is
    L_t = (alpha'_t / (1 - alpha_t)) log x_theta(z_t)[x] * 1[z_t = m]     (>= 0, since alpha' < 0)
which is 1/t times the masked cross-entropy for the log-linear schedule. Reverse step for s < t at masked positions:
    q(z_s | z_t = m, x_hat) = [(alpha_s - alpha_t) x_hat + (1 - alpha_s) e_m] / (1 - alpha_t)
and unmasked positions stay. `AbsorbingStateScheduler` is that math at given alpha; `AbsorbingStateProcess` adds the
schedule alpha(t) and is what the model holds (`model.noise_process`). The SUBS rule (no mass on the mask token) is
one function, `drop_mask_logit`, used by the bound, the oracle's log-probabilities and the sampler. Pure tensor math;
randomness only through `generator`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .functional_dlm import DiscreteProcess, as_column, draw_rand, sample_at


def drop_mask_logit(logits: torch.Tensor, mask_token_id: int, inplace: bool = False) -> torch.Tensor:
    """SUBS: the mask token's logit set to -inf (x_hat never predicts the mask). `inplace` writes into `logits`
    (only where no autograd graph needs the original)."""
    out = logits if inplace else logits.clone()
    return out.index_fill_(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))


class AbsorbingStateScheduler:
    #: how `nelbo_per_token_from_logits` finds the masked rows: "auto" (select them on the CPU, where `nonzero` waits
    #: for nothing; fixed shapes on accelerators, where it would be a device sync), "select" or "fixed"
    row_selection = "auto"

    def __init__(self, vocab_size: int, mask_token_id: int):
        if not 0 <= mask_token_id < vocab_size:
            raise ValueError(f"mask_token_id must be in [0, {vocab_size}), got {mask_token_id}")
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id

    def prior_sample(self, shape: tuple[int, ...], generator=None, device=None) -> torch.Tensor:
        return torch.full(shape, self.mask_token_id, dtype=torch.long, device=device)

    def add_noise(
        self, x0: torch.Tensor, alpha_t: torch.Tensor | float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask each token with probability 1 - alpha_t. Returns (z_t, masked)."""
        alpha = as_column(alpha_t, x0, torch.float32)
        masked = torch.rand(x0.shape, generator=generator, device=x0.device) < 1 - alpha
        return torch.where(masked, torch.full_like(x0, self.mask_token_id), x0), masked

    def subs_log_probs(self, logits: torch.Tensor, z_t: torch.Tensor, carry_over: bool = True) -> torch.Tensor:
        """SUBS: drop the mask logit and log-softmax in float32; with `carry_over`, unmasked positions become one-hot
        on z_t (log 1 = 0, -inf elsewhere). Losses skip the carry-over: they only read masked positions."""
        log_probs = drop_mask_logit(logits.float(), self.mask_token_id).log_softmax(-1)  # (B, L, V)
        if not carry_over:
            return log_probs
        unmasked = (z_t != self.mask_token_id)[..., None]  # (B, L, 1)
        onehot = torch.nn.functional.one_hot(z_t, logits.shape[-1]).bool()
        carried = torch.zeros_like(log_probs).masked_fill(~onehot, float("-inf"))
        return torch.where(unmasked, carried, log_probs)

    def posterior_probs(
        self, x_hat: torch.Tensor, z_t: torch.Tensor, alpha_t: torch.Tensor | float, alpha_s: torch.Tensor | float
    ) -> torch.Tensor:
        """Dense q(z_s | z_t, x_hat), (B, L, V); for tests."""
        a_t = as_column(alpha_t, z_t, x_hat.dtype)[..., None]
        a_s = as_column(alpha_s, z_t, x_hat.dtype)[..., None]
        masked = (z_t == self.mask_token_id)[..., None]
        onehot_m = torch.zeros_like(x_hat)
        onehot_m[..., self.mask_token_id] = 1
        q_masked = ((a_s - a_t) * x_hat + (1 - a_s) * onehot_m) / (1 - a_t)
        onehot_z = torch.nn.functional.one_hot(z_t, self.vocab_size).to(x_hat.dtype)
        return torch.where(masked, q_masked, onehot_z)

    def step(
        self,
        x_hat: torch.Tensor,
        z_t: torch.Tensor,
        alpha_t: torch.Tensor | float,
        alpha_s: torch.Tensor | float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw z_s; x_hat (B, L, V) are clean-token probabilities with no mass on the mask token."""
        return self._unmask_step(lambda rows: x_hat[rows], z_t, alpha_t, alpha_s, generator)

    def step_from_logits(
        self,
        logits: torch.Tensor,
        z_t: torch.Tensor,
        alpha_t: torch.Tensor | float,
        alpha_s: torch.Tensor | float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """`step(logits.softmax(-1), z_t, ...)` (the same draws and result; the mask logit must already be -inf)
        with the softmax computed only on the rows that are unmasked in this step, not on all (B, L, V)."""
        return self._unmask_step(lambda rows: logits[rows].softmax(-1), z_t, alpha_t, alpha_s, generator)

    def _unmask_step(self, x_hat_rows, z_t, alpha_t, alpha_s, generator) -> torch.Tensor:
        a_t = as_column(alpha_t, z_t, torch.float64)
        a_s = as_column(alpha_s, z_t, torch.float64)
        p_unmask = ((a_s - a_t) / (1 - a_t)).expand(z_t.shape)  # (B, L)
        masked = z_t == self.mask_token_id
        u = draw_rand(z_t.shape, generator, z_t.device, torch.float64)
        reveal = masked & (u < p_unmask)
        z_s = z_t.clone()
        rows = reveal.nonzero(as_tuple=True)
        draws = sample_at(x_hat_rows, rows, z_t.shape, generator, z_t.device)
        if rows[0].numel():
            z_s[rows] = draws
        return z_s

    @staticmethod
    def nelbo_weight(alpha_t, dalpha_t, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """alpha'_t / (1 - alpha_t) (<= 0), broadcastable against (B, L) `like`."""
        return as_column(dalpha_t, like, dtype) / (1 - as_column(alpha_t, like, dtype)).clamp(min=1e-12)

    def nelbo_per_token_from_logits(
        self,
        logits: torch.Tensor,
        x0: torch.Tensor,
        z_t: torch.Tensor,
        alpha_t: torch.Tensor | float,
        dalpha_t: torch.Tensor | float,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """`nelbo_per_token(subs_log_probs(logits, z_t, carry_over=False), ...)` as one cross-entropy (a log-softmax
        without the mask column) on the rows that carry a loss; same value and gradient up to rounding, (B, L) in
        `dtype`. `row_selection` decides how those rows are found: "select" computes the (N, V) masked rows only
        (a `nonzero`: free on the CPU, a device sync on an accelerator); "fixed" computes all B * L rows and keeps
        the masked ones (fixed shapes, no sync; one (B, L, V) temporary in `dtype`); "auto" selects on the CPU
        only."""
        B, L, V = logits.shape
        masked = z_t == self.mask_token_id  # (B, L)
        weight = self.nelbo_weight(alpha_t, dalpha_t, x0, dtype)
        select = self.row_selection == "select" or (self.row_selection == "auto" and logits.device.type == "cpu")
        if select:
            rows = masked.reshape(-1).nonzero().squeeze(-1)  # (N,)
            picked = logits.reshape(-1, V).index_select(0, rows).to(dtype)  # (N, V), a fresh tensor
            picked = drop_mask_logit(picked, self.mask_token_id, inplace=True)  # SUBS
            log_p_x = -F.cross_entropy(picked, x0.reshape(-1).index_select(0, rows), reduction="none")  # (N,)
            out = torch.zeros(B * L, dtype=dtype, device=logits.device)
            return out.index_put((rows,), weight.expand(B, L).reshape(-1).index_select(0, rows) * log_p_x).view(B, L)
        subs = drop_mask_logit(logits.reshape(-1, V).to(dtype), self.mask_token_id,
                               inplace=logits.dtype != dtype)  # (B*L, V): a fresh tensor when cast
        log_p_x = -F.cross_entropy(subs, x0.reshape(-1), reduction="none").view(B, L)  # (B, L)
        return torch.where(masked, weight * log_p_x, torch.zeros((), dtype=dtype, device=logits.device))

    def nelbo_per_token(
        self,
        log_x_theta: torch.Tensor,
        x0: torch.Tensor,
        z_t: torch.Tensor,
        alpha_t: torch.Tensor | float,
        dalpha_t: torch.Tensor | float,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """(alpha' / (1 - alpha)) log x_theta[x] at masked positions, 0 elsewhere; (B, L)."""
        masked = z_t == self.mask_token_id
        log_p_x = log_x_theta.gather(-1, x0[..., None]).squeeze(-1).to(dtype)  # (B, L)
        log_p_x = torch.where(masked, log_p_x, torch.zeros_like(log_p_x))  # avoids 0 * -inf at carried positions
        weight = self.nelbo_weight(alpha_t, dalpha_t, x0, dtype)
        return torch.where(masked, weight * log_p_x, torch.zeros_like(log_p_x))


class AbsorbingStateProcess(DiscreteProcess):
    """The absorbing (masked) process of MDLM as one object: the schedule alpha(t) and `AbsorbingStateScheduler`'s
    math behind the shared process interface, with SUBS (`denoise_logits`) and the carry-over rule of the greedy
    tail (only masked positions are decoded)."""

    def __init__(self, vocab_size: int, mask_token_id: int, schedule):
        super().__init__(AbsorbingStateScheduler(vocab_size, mask_token_id), schedule)

    @property
    def mask_token_id(self) -> int:
        return self.scheduler.mask_token_id

    def denoise_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """SUBS on the network's logits, float32 (in place on a float32 output: sampling runs without autograd)."""
        logits = logits.float()
        return drop_mask_logit(logits, self.mask_token_id, inplace=not torch.is_grad_enabled())

    def greedy(self, logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Argmax of x_hat at the masked positions; unmasked ones are carried over."""
        return torch.where(z == self.mask_token_id, logits.argmax(-1), z)
