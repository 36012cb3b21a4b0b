"""What the noise processes (`scheduling_*.py`) share: the process interface, its `Noised` draw, and tensor kernels.

A noise process is one object (`model.noise_process`, architecture.md §2b) that owns its time parameterisation and
its math, behind one interface that the model's bound and the one sampling loop (`generation_dlm.py`) call:
    prior_sample(shape, generator, device)                      -> z_1
    add_noise(x0, t, generator, fixed=None)                     -> Noised(z_t, model_inputs, aux)
    nelbo_per_token(logits, x0, noised)                         -> (B, L), the NELBO integrand at the draw
    model_inputs(z, t)                                          -> keyword arguments of the network at (z, t)
    denoise_logits(logits)                                      -> logits of x_hat (SUBS for the absorbing process)
    step(logits, z_t, t, s, *, generator, final, greedy)        -> z_s (the last step decodes)
    fix(z, x0, fixed, t, *, generator, final)                   -> z with the `fixed` positions set from x0
    tokens(z)                                                   -> token ids (identity for the discrete processes)
`fixed` (B, L) bool marks given positions (a prompt in conditional training, the context of an infill): they are
clean context at every t, in training as in sampling (`fix`), and carry no loss (`replaced` is False there).
`DiscreteProcess` implements it for a token-id state on an alpha(t) schedule (uniform, absorbing); the Gaussian
process (`scheduling_gaussian.GaussianEmbeddingProcess`) for an embedding latent on the learned gamma(t).

The kernels: broadcasting helpers, float64 inverse-CDF categorical draws, row-chunked softmax reductions that never
write a (B, L, V) softmax on CPU, and a matmul whose gradient to its right factor skips chosen rows (RePlaid's
self-conditioning entries, methods.md §C.3). Pure tensor math: no parameters, no model calls; randomness only
through `generator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .noise_schedules import sigma_from_alpha


@dataclass
class Noised:
    """One draw of a forward process (`process.add_noise`).

    z_t: the noised state ((B, L) ids, or (B, L, d_e) latents for the Gaussian process).
    model_inputs: the network's keyword arguments at z_t (`network(**model_inputs, attention_mask=...)`).
    aux: the process's values at this draw: discrete: alpha, dalpha (B,) and `replaced` (B, L) bool (the positions
        the process resampled or masked); Gaussian: gamma, dgamma (B,) and embeds (B, L, d_e).
    logits: the network's logits at z_t, set by `noised_forward` (None until then).
    """

    z_t: torch.Tensor
    model_inputs: dict = field(default_factory=dict)
    aux: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None


class DiscreteProcess:
    """A discrete process on token ids with a keep-probability schedule alpha(t) (`noise_schedules.get_schedule`);
    `scheduler` holds the alpha-level math (`UniformStateScheduler`, `AbsorbingStateScheduler`). The network is
    conditioned on sigma = -log alpha_t."""

    def __init__(self, scheduler, schedule):
        self.scheduler = scheduler
        self.schedule = schedule

    @property
    def vocab_size(self) -> int:
        return self.scheduler.vocab_size

    def prior_sample(self, shape: tuple[int, ...], generator=None, device=None) -> torch.Tensor:
        return self.scheduler.prior_sample(shape, generator=generator, device=device)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
                  fixed: torch.Tensor | None = None) -> Noised:
        """z_t ~ q(z_t | x0) at times t (B,); the `fixed` (B, L) positions keep x0 (the same draws either way)."""
        alpha, dalpha = self.schedule.alpha(t), self.schedule.dalpha_dt(t)  # (B,) each
        z_t, replaced = self.scheduler.add_noise(x0, alpha, generator=generator)
        if fixed is not None:
            z_t, replaced = self.fix(z_t, x0, fixed), replaced & ~fixed
        return Noised(z_t, self.model_inputs(z_t, t, alpha), {"alpha": alpha, "dalpha": dalpha, "replaced": replaced})

    def model_inputs(self, z: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor | None = None) -> dict:
        """The network's inputs at (z, t): ids and sigma = -log alpha_t (B,), float32 (t a scalar or (B,))."""
        alpha = self.schedule.alpha(t) if alpha is None else alpha
        return {"input_ids": z, "sigma": sigma_from_alpha(alpha).float().expand(z.shape[0])}

    def nelbo_per_token(self, logits: torch.Tensor, x0: torch.Tensor, noised: Noised) -> torch.Tensor:
        """The process's NELBO integrand at the draw, per position (B, L), float32 (fused with the softmax)."""
        return self.scheduler.nelbo_per_token_from_logits(logits, x0, noised.z_t, noised.aux["alpha"],
                                                          noised.aux["dalpha"])

    def denoise_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the denoiser's x_hat from the network's output (identity; SUBS for the absorbing process)."""
        return logits

    def greedy(self, logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The greedy tail: argmax of x_hat at every position."""
        return logits.argmax(-1)

    def step(self, logits: torch.Tensor, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, *,
             generator: torch.Generator | None = None, final: bool = False, greedy: bool = False) -> torch.Tensor:
        """z_t -> z_s from the (filtered) x_hat logits (B, L, V). The last step (`final`) goes to alpha_s = 1 (s = 0:
        branched on the flag, not on the tensor s, so no host sync), or is the greedy argmax with `greedy`."""
        if final and greedy:
            return self.greedy(logits, z)
        alpha_t = self.schedule.alpha(t)
        alpha_s = torch.ones_like(alpha_t) if final else self.schedule.alpha(s)
        return self.scheduler.step_from_logits(logits, z, alpha_t, alpha_s, generator=generator)

    def fix(self, z: torch.Tensor, x0: torch.Tensor, fixed: torch.Tensor, t: torch.Tensor | None = None, *,
            generator: torch.Generator | None = None, final: bool = False) -> torch.Tensor:
        """z with the `fixed` (B, L) positions set to x0 (given tokens: a prompt, or everything outside an infill)."""
        return torch.where(fixed, x0, z)

    def tokens(self, z: torch.Tensor) -> torch.Tensor:
        return z


def as_column(value: torch.Tensor | float, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Broadcast a scalar or (B,) tensor against (B, L)."""
    value = torch.as_tensor(value, dtype=dtype, device=like.device)
    return value.reshape(-1, 1) if value.dim() == 1 else value


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token k with cdf[k-1] <= u * total < cdf[k] in each row of `probs` (N, V) (non-negative, need not be
    normalised, total > 0), for u (N,) in [0, 1); returns (N,) ids (u (N, m): m draws per row, ids (N, m)). The CDF
    is a float64 running sum (each float32 probability is exact in float64, the sum exact to ~V * 2^-53 relative),
    so every token's share of [0, total) is its probability to float64 precision. The search is strict
    (`right=True`: the first k with cdf[k] > u * total), so a token of probability 0 (cdf[k] == cdf[k-1]) is never
    returned, u = 0 included. u * total < total for every float64 u < 1 (round to nearest); should a target still
    reach the total, it goes to the last token of positive probability, not to V - 1.
    The float64 CDF is built a block of rows at a time in one reused buffer (cache-sized on CPU, where this is faster
    than a float32 CDF of all rows; at most `_DRAW_CHUNK_ELEMENTS` on accelerators), never for all N rows at once."""
    N, V = probs.shape
    shape = u.shape
    u = u.to(device=probs.device, dtype=torch.float64).reshape(N, u.numel() // max(N, 1))  # (N, m)
    budget = _CHUNK_ELEMENTS if probs.device.type == "cpu" else _DRAW_CHUNK_ELEMENTS
    step = max(1, budget // V)
    ids = torch.empty(u.shape, dtype=torch.long, device=probs.device)
    buffer = torch.empty(min(step, N), V, dtype=torch.float64, device=probs.device)
    for start in range(0, N, step):
        rows = slice(start, start + step)
        block = probs[rows]
        cdf = buffer[: block.shape[0]].copy_(block).cumsum_(-1)  # (n, V) float64
        total = cdf[:, -1:].contiguous()
        k = torch.searchsorted(cdf, u[rows] * total, right=True)  # first k with cdf[k] > u * total
        last = torch.searchsorted(cdf, total)  # first k with cdf[k] >= total: the last token of positive probability
        ids[rows] = torch.where(k < V, k, last)
    return ids.view(shape)


class RowGenerators:
    """One `torch.Generator` per row of a batch (`generate(generator=[g_0, ..., g_B-1])`, diffusers' convention).

    Row b's draws come from g_b alone and cover only the row's last `lengths[b]` positions (its real part: a
    left-padded row starts after its padding), so a row of a padded batch draws exactly what it draws alone, with
    the same generator; padding positions get zeros (they are given positions and never change)."""

    def __init__(self, generators: list[torch.Generator], lengths: list[int]):
        if len(generators) != len(lengths):
            raise ValueError(f"{len(generators)} generators for {len(lengths)} rows")
        self.generators = list(generators)
        self.lengths = [int(n) for n in lengths]

    def select(self, rows: list[int]) -> RowGenerators:
        """The generators of `rows` (a sampler that runs the network on unfinished rows only): each row keeps its own
        stream, so a row's draws never depend on which other rows are still running."""
        return RowGenerators([self.generators[r] for r in rows], [self.lengths[r] for r in rows])

    def narrow(self, drop: int) -> RowGenerators:
        """The same rows on a canvas `drop` columns narrower on the right (a semi-autoregressive block's prefix):
        each row's real part still starts at its first real column."""
        return RowGenerators(self.generators, [max(0, n - drop) for n in self.lengths])

    def draw(self, fill, shape: tuple[int, ...], device, dtype: torch.dtype) -> torch.Tensor:
        """`fill(tensor, generator)` fills a tensor in place (e.g. `Tensor.uniform_`); per row over its real part of
        a (B, L, ...) tensor of `dtype`."""
        if len(shape) < 2 or shape[0] != len(self.generators):
            raise ValueError(f"per-row generators draw (B={len(self.generators)}, L, ...) tensors, got {tuple(shape)}")
        out = torch.zeros(shape, dtype=dtype, device=device)
        width = shape[1]
        for row, (generator, n) in enumerate(zip(self.generators, self.lengths)):
            if n:
                fill(out[row, width - n:], generator)  # a contiguous block: the same draws as a (n, ...) tensor
        return out


def draw_rand(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """U[0, 1) draws: `torch.rand`, or per row from `RowGenerators`."""
    if isinstance(generator, RowGenerators):
        return generator.draw(lambda x, g: x.uniform_(generator=g), tuple(shape), device, dtype)
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def draw_randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """N(0, 1) draws: `torch.randn`, or per row from `RowGenerators`."""
    if isinstance(generator, RowGenerators):
        return generator.draw(lambda x, g: x.normal_(generator=g), tuple(shape), device, dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def draw_randint(high: int, shape, generator=None, device=None) -> torch.Tensor:
    """Uniform ids in [0, high): `torch.randint`, or per row from `RowGenerators`."""
    if isinstance(generator, RowGenerators):
        return generator.draw(lambda x, g: x.random_(0, high, generator=g), tuple(shape), device, torch.long)
    return torch.randint(0, high, shape, generator=generator, device=device)


def sample_at(probs_of, rows: tuple[torch.Tensor, ...], shape, generator=None, device=None) -> torch.Tensor:
    """Inverse-CDF draws at the positions `rows` (a `nonzero(as_tuple=True)` into `shape`) from `probs_of(rows)`
    (N, V): one float64 uniform per position from a plain generator (no draw when N = 0), or, from `RowGenerators`,
    a uniform at every position of every row (so that a row's stream never depends on the other rows). (N,) ids."""
    n = rows[0].numel()
    if isinstance(generator, RowGenerators):  # every row draws its full stream, whatever n is
        u = draw_rand(shape, generator, device, torch.float64)[rows]
    elif n:
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return inverse_cdf(probs_of(rows), u) if n else rows[0].new_zeros(0)


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverse-CDF categorical draw from the rows of `probs` (N, V) (need not be normalised); returns (N,) ids.
    Exact to float64 precision: one float64 uniform per row (53 random bits, multiples of 2^-53 in [0, 1)) into a
    float64 CDF (`inverse_cdf`); a token of probability 0 is never drawn (top-k / top-p filtered entries)."""
    u = torch.rand(probs.shape[0], generator=generator, device=probs.device, dtype=torch.float64)
    return inverse_cdf(probs, u)


_CHUNK_ELEMENTS = 1 << 19  # CPU: rows per chunk so that one chunk's temporaries (~2 MB in float32) stay in cache
_DRAW_CHUNK_ELEMENTS = 1 << 25  # accelerators: the float64 CDF of `inverse_cdf` holds at most this many (256 MB)


def row_chunks(num_rows: int, vocab_size: int, device: torch.device) -> tuple[range, int]:
    """Starts of the row chunks the fused node works through: cache-sized on CPU (about twice as fast as whole
    (B, L, V) passes at V = 50k), a single chunk on accelerators (one kernel per op)."""
    step = max(1, _CHUNK_ELEMENTS // vocab_size) if device.type == "cpu" else max(1, num_rows)
    return range(0, num_rows, step), step


def softmax_gather(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """softmax(logits, -1).gather(-1, index[..., None]).squeeze(-1) for logits (..., V) and index (...), in the logits'
    dtype, without writing the softmax: the rows go through in cache-sized chunks on CPU (one chunk on accelerators),
    so only a (chunk, V) temporary exists. The values are those of the full softmax (it is computed row by row)."""
    V = logits.shape[-1]
    flat, idx = logits.reshape(-1, V), index.reshape(-1, 1)
    out = torch.empty(flat.shape[0], dtype=logits.dtype, device=logits.device)
    starts, step = row_chunks(flat.shape[0], V, logits.device)
    for i in starts:
        out[i:i + step] = torch.softmax(flat[i:i + step], dim=-1).gather(-1, idx[i:i + step]).squeeze(-1)
    return out.view(index.shape)


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
    if stop is None:  # (no shortcut for an all-False `stop`: it would read the device)
        return a @ w
    return _RowStoppedMatmul.apply(a, w, (~stop.to(a.device)).to(a.dtype))


def softmax_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy, top probability) of softmax(logits, -1) for logits (..., V) (filtered entries may be -inf), both
    (...,) float32, in cache-sized row chunks on CPU (one chunk on accelerators): no (..., V) softmax is kept. The
    statistics the adaptive samplers rank positions by (`generation_dlm`)."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    entropy = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    top = torch.empty_like(entropy)
    starts, step = row_chunks(flat.shape[0], V, logits.device)
    for i in starts:
        log_p = torch.log_softmax(flat[i:i + step].float(), dim=-1)  # (n, V)
        p = log_p.exp()
        entropy[i:i + step] = -(p * log_p.masked_fill(p == 0, 0.0)).sum(-1)  # 0 log 0 = 0 at filtered entries
        top[i:i + step] = p.amax(-1)
    return entropy.view(logits.shape[:-1]), top.view(logits.shape[:-1])


def softmax_matmul(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """softmax(logits, -1) @ weight for logits (..., V) and weight (V, d), without writing the (..., V) softmax on CPU:
    the rows go through in cache-sized chunks (one chunk on accelerators). No autograd (sampling only)."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    out = torch.empty(flat.shape[0], weight.shape[-1], dtype=weight.dtype, device=logits.device)
    starts, step = row_chunks(flat.shape[0], V, logits.device)
    for i in starts:
        torch.matmul(torch.softmax(flat[i:i + step], dim=-1).to(weight.dtype), weight, out=out[i:i + step])
    return out.view(*logits.shape[:-1], weight.shape[-1])
