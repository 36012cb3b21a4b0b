"""Process math of the dlm noise processes, checked against brute force (pure tensors, no models).

- Schedules (methods.md §B.2, §C.2): endpoints, monotonicity, analytic derivatives against autograd, inverses.
- Stratified ("antithetic") times (§B.3.1): one draw per stratum, rank slices reassembling the global grid.
- Uniform-state process (§B.2, §B.3.1, §B.4): forward marginal, the posterior against transition matrices at V=5
  in float64, the mixture sampler against the dense posterior, the closed-form NELBO against the generic form, and the
  continuous-time ELBO of a uniform denoiser integrated over t against its exact NLL log V.
- Absorbing-state process (MDLM): masking rate, SUBS, posterior against transition matrices, step, NELBO.
- Gaussian process (§C.2-C.4): learned gamma schedule, posterior against direct Gaussian conditioning, prior KL
  against torch.distributions, the ancestral step's moments and the deterministic DDIM step.

Every random draw comes from a seeded torch.Generator; float64 wherever exactness is claimed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modeling_dlm.functional_dlm import inverse_cdf, sample_from_probs
from modeling_dlm.noise_schedules import (
    CosineSchedule,
    LearnedGammaSchedule,
    LogLinearSchedule,
    antithetic_times,
    gaussian_alpha_sigma,
    get_schedule,
)
from modeling_dlm.scheduling_absorbing import AbsorbingStateScheduler
from modeling_dlm.scheduling_gaussian import GaussianEmbeddingScheduler
from modeling_dlm.scheduling_uniform import UniformStateScheduler

from .conftest import gen


F64 = torch.float64
EPS = 1e-3
T_GRID = [0.0, 1e-6, 1e-3, 0.1, 0.25, 0.5, 0.75, 0.9, 1 - 1e-3, 1.0]
SCHEDULES = [LogLinearSchedule(EPS), CosineSchedule(EPS)]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def random_probs(shape, seed: int, sharpness: float = 2.0, dtype=F64) -> torch.Tensor:
    """Random rows of probabilities (softmax of scaled Gaussians)."""
    return (torch.randn(shape, generator=gen(seed), dtype=dtype) * sharpness).softmax(-1)


def binomial_tol(n: int, p: float, sigmas: float = 5.0) -> float:
    """Tolerance on an empirical frequency: `sigmas` binomial standard deviations (plus one count for p ~ 0 or 1)."""
    return sigmas * math.sqrt(p * (1 - p) / n) + 1.0 / n


# ---------------------------------------------------------------------------------------------------------------------
# Discrete schedules
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES, ids=["loglinear", "cosine"])
def test_schedule_endpoints_and_monotone(schedule):
    t = torch.linspace(0, 1, 1001, dtype=F64)
    alpha = schedule.alpha(t)
    assert alpha[0].item() == pytest.approx(1.0, abs=1e-15)
    if isinstance(schedule, LogLinearSchedule):
        assert alpha[-1].item() == pytest.approx(EPS, abs=1e-15)
    else:
        # The reference cosine (s-sahoo/duo trainer_base.py Cosine) is 1 - cos(pi/2 (1 - (1 - eps) t)), so its value at
        # t = 1 is 1 - cos(pi eps / 2) ~ 1.2e-6, not eps: eps only keeps alpha_1 > 0. dlm keeps the reference formula.
        assert alpha[-1].item() == pytest.approx(1 - math.cos(math.pi / 2 * EPS), rel=1e-9)
        assert 0 < alpha[-1].item() < EPS
    assert bool((alpha[1:] < alpha[:-1]).all()), "alpha_t must be strictly decreasing"
    assert bool(((alpha > 0) & (alpha <= 1)).all())


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["loglinear", "cosine"])
@pytest.mark.parametrize("t_value", T_GRID)
def test_schedule_derivative_and_inverse(schedule, t_value):
    t = torch.tensor([t_value], dtype=F64, requires_grad=True)
    alpha = schedule.alpha(t)
    (autograd,) = torch.autograd.grad(alpha.sum(), t)
    analytic = schedule.dalpha_dt(t.detach())
    assert analytic.dtype == F64
    torch.testing.assert_close(analytic, autograd, rtol=1e-12, atol=1e-12)
    assert float(analytic) < 0
    back = schedule.t_from_alpha(alpha.detach())
    torch.testing.assert_close(back, t.detach(), rtol=0, atol=1e-9)


def test_schedule_dtype_and_factory():
    t = torch.tensor([0.3, 0.7], dtype=torch.float32)
    for schedule in SCHEDULES:
        assert schedule.alpha(t).dtype == torch.float32
        assert schedule.dalpha_dt(t).shape == t.shape
    assert get_schedule("loglinear", 0.01) == LogLinearSchedule(0.01)
    assert get_schedule("cosine", 0.01) == CosineSchedule(0.01)
    with pytest.raises(ValueError, match="'linear'"):
        get_schedule("linear", 0.01)


# ---------------------------------------------------------------------------------------------------------------------
# Stratified times
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 8, 13])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_antithetic_times_stratified(n, seed):
    t = antithetic_times(n, eps=EPS, generator=gen(seed))
    assert t.shape == (n,) and t.dtype == torch.float32
    assert bool(((t >= EPS) & (t <= 1)).all())
    u = ((t.double() - EPS) / (1 - EPS)).sort().values  # undo the eps shift
    bins = torch.floor(u * n).long()
    assert bins.tolist() == list(range(n)), f"not one draw per stratum: {u.tolist()}"
    torch.testing.assert_close(antithetic_times(n, eps=EPS, generator=gen(seed)), t, rtol=0, atol=0)
    assert not torch.equal(antithetic_times(n, eps=EPS, generator=gen(seed + 100)), t)


@pytest.mark.parametrize("split", [(4, 4), (3, 5), (1, 2, 4, 1)])
def test_antithetic_times_rank_slices_reassemble(split):
    total = sum(split)
    whole = antithetic_times(total, eps=EPS, generator=gen(7))
    parts, offset = [], 0
    for n in split:  # every "rank" has a generator in the same state
        parts.append(antithetic_times(n, eps=EPS, generator=gen(7), offset=offset, total=total))
        offset += n
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-7)


def test_antithetic_false_is_not_stratified():
    n = 64
    t = antithetic_times(n, eps=EPS, generator=gen(3), antithetic=False)
    assert bool(((t >= EPS) & (t <= 1)).all())
    u = ((t.double() - EPS) / (1 - EPS)).sort().values
    # independent uniforms almost surely leave some stratum empty (probability of a perfect stratification ~ n!/n^n)
    assert torch.floor(u * n).long().tolist() != list(range(n))


# ---------------------------------------------------------------------------------------------------------------------
# Uniform-state process: brute-force references
# ---------------------------------------------------------------------------------------------------------------------
def uniform_transition(alpha: float, V: int) -> torch.Tensor:
    """Q[i, j] = q(z_t = j | z_s = i) = alpha 1[i = j] + (1 - alpha) / V, float64."""
    return alpha * torch.eye(V, dtype=F64) + (1 - alpha) * torch.full((V, V), 1.0 / V, dtype=F64)


def uniform_joint(alpha_t: float, alpha_s: float, V: int) -> torch.Tensor:
    """J[x, i, j] = q(z_s = i | x) q(z_t = j | z_s = i), from the transition matrices Q_s and Q_{t|s}."""
    Q_s = uniform_transition(alpha_s, V)  # rows: x, columns: z_s
    Q_ts = uniform_transition(alpha_t / alpha_s, V)  # rows: z_s, columns: z_t
    joint = Q_s[:, :, None] * Q_ts[None, :, :]
    # Chapman-Kolmogorov sanity: summing out z_s gives Q_t
    torch.testing.assert_close(joint.sum(1), uniform_transition(alpha_t, V), rtol=0, atol=1e-14)
    return joint


ALPHA_PAIRS = [(0.3, 0.7), (0.05, 0.06), (0.9, 0.999), (1e-3, 0.5), (0.5, 1.0), (0.42, 0.42)]


@pytest.mark.parametrize("alpha_t,alpha_s", ALPHA_PAIRS)
def test_uniform_posterior_one_hot_equals_exact_bayes(alpha_t, alpha_s):
    V = 5
    sched = UniformStateScheduler(V)
    joint = uniform_joint(alpha_t, alpha_s, V)  # (x, z_s, z_t)
    exact = joint / joint.sum(1, keepdim=True)  # q(z_s | z_t, x)
    x = torch.arange(V).repeat_interleave(V)  # every (x, z_t) pair
    z_t = torch.arange(V).repeat(V)
    x_hat = F.one_hot(x, V).to(F64)[None]  # (1, 25, V)
    post = sched.posterior_probs(x_hat, z_t[None], alpha_t, alpha_s)[0]
    torch.testing.assert_close(post, exact[x, :, z_t], rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha_t,alpha_s", ALPHA_PAIRS)
def test_uniform_posterior_soft_x_hat_is_normalised_mixture_of_joints(alpha_t, alpha_s):
    """Which identity holds for a soft x_hat?

    The numerator of q(z_s | z_t, x) (methods.md §B.4) is V q(z_t | z_s) q(z_s | x), which is linear in the one-hot
    x, and its sum over z_s, V alpha_t x[z_t] + 1 - alpha_t = V q(z_t | x), is also linear in x. Plugging x_hat into
    both therefore gives
        q(z_s | z_t, x_hat) = sum_x x_hat(x) q(z_t | z_s) q(z_s | x) / sum_{z_s} (same)
                            ∝ q(z_t | z_s) (Q_s^T x_hat)[z_s],
    the normalised mixture of the *joints* (identity (b) of the brief), and NOT the mixture of the normalised
    posteriors sum_x x_hat(x) q(z_s | z_t, x). Equivalently it is the Bayes mixture with x_hat treated as a prior on x
    and reweighted by the likelihood: sum_x w(x) q(z_s | z_t, x), w(x) ∝ x_hat(x) q(z_t | x). All three are checked.
    """
    V = 5
    sched = UniformStateScheduler(V)
    joint = uniform_joint(alpha_t, alpha_s, V)  # (x, z_s, z_t)
    x_hat = random_probs((1, 3 * V, V), seed=11)  # three random rows per z_t value
    z_t = torch.arange(V).repeat(3)[None]
    post = sched.posterior_probs(x_hat, z_t, alpha_t, alpha_s)[0]  # (3V, V)

    mixed_joint = torch.einsum("nx,xij->nij", x_hat[0], joint)[torch.arange(3 * V), :, z_t[0]]  # (3V, z_s)
    expected = mixed_joint / mixed_joint.sum(-1, keepdim=True)
    torch.testing.assert_close(post, expected, rtol=0, atol=1e-12)

    Q_ts = uniform_transition(alpha_t / alpha_s, V)
    via_prior = Q_ts[:, z_t[0]].T * (x_hat[0] @ uniform_transition(alpha_s, V))  # q(z_t|z_s) (Q_s^T x_hat)[z_s]
    torch.testing.assert_close(post, via_prior / via_prior.sum(-1, keepdim=True), rtol=0, atol=1e-12)

    exact = joint / joint.sum(1, keepdim=True)  # (x, z_s, z_t)
    likelihood = uniform_transition(alpha_t, V)[:, z_t[0]].T  # (3V, x): q(z_t | x)
    w = x_hat[0] * likelihood
    w = w / w.sum(-1, keepdim=True)
    bayes = torch.einsum("nx,nxi->ni", w, exact[:, :, z_t[0]].permute(2, 0, 1))
    torch.testing.assert_close(post, bayes, rtol=0, atol=1e-12)

    naive = torch.einsum("nx,nxi->ni", x_hat[0], exact[:, :, z_t[0]].permute(2, 0, 1))
    if alpha_t < alpha_s:  # at s = t every form is one-hot on z_t; otherwise they differ (by 6e-4 to 0.7 here)
        assert (post - naive).abs().max() > 1e-4, "the unweighted mixture of posteriors should differ"


def test_uniform_posterior_rows_and_edges():
    V = 61
    sched = UniformStateScheduler(V)
    B, L = 3, 7
    x_hat = random_probs((B, L, V), seed=4)
    z_t = torch.randint(0, V, (B, L), generator=gen(5))
    alpha_t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)  # per-sequence (B,) alphas
    alpha_s = torch.tensor([0.2, 0.75, 0.95], dtype=F64)
    post = sched.posterior_probs(x_hat, z_t, alpha_t, alpha_s)
    assert post.shape == (B, L, V) and post.dtype == F64
    assert bool((post >= 0).all())
    torch.testing.assert_close(post.sum(-1), torch.ones(B, L, dtype=F64), rtol=0, atol=1e-12)
    # each row matches the scalar-alpha computation of its sequence
    for b in range(B):
        row = sched.posterior_probs(x_hat[b : b + 1], z_t[b : b + 1], float(alpha_t[b]), float(alpha_s[b]))
        torch.testing.assert_close(post[b : b + 1], row, rtol=0, atol=1e-14)

    # s = 0 (alpha_s = 1) with a one-hot x_hat recovers x exactly, whatever z_t is
    x = torch.randint(0, V, (B, L), generator=gen(6))
    onehot = F.one_hot(x, V).to(F64)
    torch.testing.assert_close(sched.posterior_probs(onehot, z_t, 0.3, 1.0), onehot, rtol=0, atol=1e-12)
    # s = t keeps z_t, whatever x_hat is
    torch.testing.assert_close(sched.posterior_probs(x_hat, z_t, 0.3, 0.3), F.one_hot(z_t, V).to(F64), rtol=0,
                               atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Uniform-state process: forward sampling and the mixture sampler
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.73, 1.0])
def test_uniform_add_noise_marginal(alpha):
    V, B, L = 5, 4, 10_000
    sched = UniformStateScheduler(V)
    x0 = torch.randint(0, V, (B, L), generator=gen(0))
    z_t, resampled = sched.add_noise(x0, alpha, generator=gen(1))
    assert z_t.shape == x0.shape and z_t.dtype == x0.dtype and resampled.dtype == torch.bool
    n = B * L
    p_keep = alpha + (1 - alpha) / V
    assert abs((z_t == x0).double().mean().item() - p_keep) <= binomial_tol(n, p_keep)
    assert abs(resampled.double().mean().item() - (1 - alpha)) <= binomial_tol(n, 1 - alpha)
    assert torch.equal(z_t[~resampled], x0[~resampled])  # kept tokens are untouched
    if resampled.sum() > 1000:  # resampled tokens are uniform: they hit x0 with probability 1/V
        hits = (z_t[resampled] == x0[resampled]).double().mean().item()
        assert abs(hits - 1 / V) <= binomial_tol(int(resampled.sum()), 1 / V)
        counts = torch.bincount(z_t[resampled], minlength=V).double() / resampled.sum()
        assert (counts - 1 / V).abs().max() <= binomial_tol(int(resampled.sum()), 1 / V)
    z_again, _ = sched.add_noise(x0, alpha, generator=gen(1))
    assert torch.equal(z_again, z_t)


def test_uniform_add_noise_per_sequence_alpha():
    V = 7
    sched = UniformStateScheduler(V)
    x0 = torch.randint(0, V, (3, 20_000), generator=gen(0))
    alphas = torch.tensor([0.0, 0.5, 1.0])
    _, resampled = sched.add_noise(x0, alphas, generator=gen(2))
    rates = resampled.double().mean(-1)
    for rate, alpha in zip(rates.tolist(), alphas.tolist()):
        assert abs(rate - (1 - alpha)) <= binomial_tol(20_000, 1 - alpha)


def test_uniform_prior_sample():
    sched = UniformStateScheduler(61)
    z = sched.prior_sample((3, 7), generator=gen(0))
    assert z.shape == (3, 7) and z.dtype == torch.long and int(z.min()) >= 0 and int(z.max()) < 61
    assert torch.equal(z, sched.prior_sample((3, 7), generator=gen(0)))
    with pytest.raises(ValueError, match="1"):
        UniformStateScheduler(1)


def test_uniform_mixture_weights_sum_to_normaliser():
    V = 61
    sched = UniformStateScheduler(V)
    x_hat_z = torch.rand(3, 7, generator=gen(0), dtype=F64)
    alpha_t = torch.tensor([1e-3, 0.4, 0.8], dtype=F64)
    alpha_s = torch.tensor([0.5, 0.4, 1.0], dtype=F64)
    weights = sched.mixture_weights(x_hat_z, alpha_t, alpha_s)
    assert all(w.dtype == F64 and w.shape == (3, 7) and bool((w >= 0).all()) for w in weights)
    total = sum(weights)
    expected = V * alpha_t[:, None] * x_hat_z + 1 - alpha_t[:, None]
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-12)


def test_sample_from_probs_frequencies():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 2.0], [5.0, 0.0, 0.0, 0.0]], dtype=F64)
    n = 20_000
    rows = probs.repeat_interleave(n, 0)
    draws = sample_from_probs(rows, gen(0)).view(3, n)
    assert bool((draws[1] == 3).all()) and bool((draws[2] == 0).all())  # unnormalised rows are fine
    assert not bool((draws[0] == 1).any())  # zero-probability entries never drawn
    freq = torch.bincount(draws[0], minlength=4).double() / n
    for f, p in zip(freq.tolist(), probs[0].tolist()):
        assert abs(f - p) <= binomial_tol(n, p)


@pytest.mark.parametrize("alpha_t,alpha_s", [(0.3, 0.7), (0.02, 0.1), (0.6, 1.0), (0.9, 0.95)])
def test_uniform_step_matches_posterior_in_distribution(alpha_t, alpha_s):
    """Each row repeats one (x_hat, z_t) 20000 times; step's empirical frequencies match posterior_probs (5 sigma)."""
    V, n = 5, 20_000
    sched = UniformStateScheduler(V)
    x_hat_rows = torch.cat([random_probs((3, V), seed=9, dtype=torch.float32),
                            F.one_hot(torch.tensor([3]), V).float()])  # (4, V), the last one-hot
    z_rows = torch.tensor([0, 2, 4, 1])
    x_hat = x_hat_rows[:, None, :].expand(4, n, V).contiguous()
    z_t = z_rows[:, None].expand(4, n).contiguous()
    z_s = sched.step(x_hat, z_t, alpha_t, alpha_s, generator=gen(3))
    assert z_s.shape == z_t.shape and z_s.dtype == torch.long
    expected = sched.posterior_probs(x_hat_rows[:, None].double(), z_rows[:, None], alpha_t, alpha_s)[:, 0]
    for r in range(4):
        freq = torch.bincount(z_s[r], minlength=V).double() / n
        for v in range(V):
            p = float(expected[r, v])
            assert abs(float(freq[v]) - p) <= binomial_tol(n, p), (r, v, float(freq[v]), p)
    assert torch.equal(sched.step(x_hat, z_t, alpha_t, alpha_s, generator=gen(3)), z_s)


def test_uniform_step_edges():
    V = 61
    sched = UniformStateScheduler(V)
    x_hat = random_probs((3, 7, V), seed=0, dtype=torch.float32)
    z_t = torch.randint(0, V, (3, 7), generator=gen(1))
    # s = t: nothing moves
    assert torch.equal(sched.step(x_hat, z_t, 0.4, 0.4, generator=gen(2)), z_t)
    # s = 0 with a one-hot x_hat: every position lands on x
    x = torch.randint(0, V, (3, 7), generator=gen(3))
    assert torch.equal(sched.step(F.one_hot(x, V).float(), z_t, 0.4, 1.0, generator=gen(4)), x)


# ---------------------------------------------------------------------------------------------------------------------
# Uniform-state process: the NELBO integrand
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [5, 61])
@pytest.mark.parametrize("alpha", [1e-3, 0.05, 0.3, 0.5, 0.9, 0.999])
def test_uniform_nelbo_closed_form_equals_generic(V, alpha):
    sched = UniformStateScheduler(V)
    B, L = 3, 40
    x0 = torch.randint(0, V, (B, L), generator=gen(0))
    z_t, _ = sched.add_noise(x0, alpha, generator=gen(1))
    z_t[:, 0] = x0[:, 0]  # make sure both z = x and z != x occur
    z_t[:, 1] = (x0[:, 1] + 1) % V
    x_theta = random_probs((B, L, V), seed=2)
    dalpha = -(1 - EPS)
    closed = sched.nelbo_per_token(x_theta.log(), x0, z_t, alpha, dalpha, dtype=F64)
    generic = sched.nelbo_per_token_generic(x_theta, x0, z_t, alpha, dalpha)
    assert closed.shape == (B, L) and closed.dtype == F64
    torch.testing.assert_close(closed, generic, rtol=1e-9, atol=1e-9)
    assert bool((closed >= -1e-12).all()), "the integrand is a scaled KL, never negative"
    # per-sequence (B,) alphas broadcast like scalars
    alphas = torch.full((B,), alpha, dtype=F64)
    dalphas = torch.full((B,), dalpha, dtype=F64)
    torch.testing.assert_close(sched.nelbo_per_token(x_theta.log(), x0, z_t, alphas, dalphas, dtype=F64), closed,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("V", [5, 61, 3000])
@pytest.mark.parametrize("t_value", [0.0, 1e-3, 0.3, 0.9, 1.0])
def test_fused_uniform_nelbo_matches_the_log_softmax_chain(V, t_value):
    """The fused softmax + ELBO node equals the unfused chain in value and gradient (float64 to 1e-12, float32 to
    rounding), including t = 0 and t = 1, and passes gradcheck."""
    sched = UniformStateScheduler(V)
    B, L = 3, 6
    t = torch.full((B,), t_value, dtype=F64)
    alpha, dalpha = LogLinearSchedule(EPS).alpha(t), LogLinearSchedule(EPS).dalpha_dt(t)
    x0 = torch.randint(0, V, (B, L), generator=gen(0))
    z_t, _ = sched.add_noise(x0, alpha, generator=gen(1))
    z_t[:, 1] = (x0[:, 1] + 1) % V
    weights = torch.randn(B, L, generator=gen(3), dtype=F64)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 2e-4)):
        logits = (3 * torch.randn(B, L, V, generator=gen(2), dtype=F64)).to(dtype).requires_grad_()
        chain = sched.nelbo_per_token(logits.log_softmax(-1), x0, z_t, alpha.to(dtype), dalpha.to(dtype), dtype=dtype)
        (g_chain,) = torch.autograd.grad((chain * weights.to(dtype)).sum(), logits)
        fused = sched.nelbo_per_token_from_logits(logits, x0, z_t, alpha.to(dtype), dalpha.to(dtype), dtype=dtype)
        (g_fused,) = torch.autograd.grad((fused * weights.to(dtype)).sum(), logits)
        assert fused.dtype == dtype and bool(torch.isfinite(fused).all())
        scale = chain.abs().max().item() + 1
        torch.testing.assert_close(fused, chain, rtol=tol, atol=tol * scale)
        torch.testing.assert_close(g_fused, g_chain, rtol=tol, atol=tol * (g_chain.abs().max().item() + 1))
    if V <= 61 and 0 < t_value < 1:
        logits = torch.randn(B, L, V, generator=gen(4), dtype=F64).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: sched.nelbo_per_token_from_logits(x, x0, z_t, alpha, dalpha, dtype=F64), (logits,))


@pytest.mark.parametrize("alpha", [1e-3, 0.3, 0.999])
def test_uniform_nelbo_zero_for_clean_prediction(alpha):
    V = 61
    sched = UniformStateScheduler(V)
    x0 = torch.randint(0, V, (3, 7), generator=gen(0))
    z_t, _ = sched.add_noise(x0, alpha, generator=gen(1))
    log_onehot = torch.full((3, 7, V), -1e4, dtype=F64).scatter(-1, x0[..., None], 0.0)
    log_onehot = log_onehot.log_softmax(-1)  # exactly one-hot after exp in float64
    value = sched.nelbo_per_token(log_onehot, x0, z_t, alpha, -(1 - EPS), dtype=F64)
    torch.testing.assert_close(value, torch.zeros_like(value), rtol=0, atol=1e-9)
    wrong = sched.nelbo_per_token(log_onehot.roll(1, -1), x0, z_t, alpha, -(1 - EPS), dtype=F64)
    assert bool((wrong > 1e-3).all())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("t_value", [0.0, 1e-3, 0.5, 1 - 1e-3, 1.0])
def test_uniform_nelbo_finite_at_edges(dtype, t_value):
    V = 61
    sched = UniformStateScheduler(V)
    schedule = LogLinearSchedule(EPS)
    t = torch.full((3,), t_value, dtype=dtype)
    alpha, dalpha = schedule.alpha(t), schedule.dalpha_dt(t)
    x0 = torch.randint(0, V, (3, 7), generator=gen(0))
    z_t, _ = sched.add_noise(x0, alpha, generator=gen(1))
    log_x_theta = (torch.randn(3, 7, V, generator=gen(2), dtype=dtype) * 3).log_softmax(-1)
    value = sched.nelbo_per_token(log_x_theta, x0, z_t, alpha, dalpha, dtype=dtype)
    assert value.dtype == dtype
    assert bool(torch.isfinite(value).all()), value
    assert bool((value >= -1e-4 * (1 + value.abs())).all())
    if t_value == 0.0:
        assert torch.equal(z_t, x0)  # nothing is corrupted at t = 0


def test_uniform_continuous_elbo_of_uniform_denoiser_is_log_v():
    """A uniform denoiser x_theta = 1/V defines p(x) = 1/V exactly, and its reverse process is the time reversal of the
    forward chain started from a uniform x (Q is symmetric, the uniform law is stationary), so the continuous-time ELBO
    is tight: int_0^1 E_{z_t}[L_t] dt + KL(q(z_1|x) || uniform) = log V. The integrand has a log singularity at t = 0,
    hence a geometric grid there; the prior KL (alpha_1 = eps) is ~2e-6 here."""
    V, x = 5, 2
    sched = UniformStateScheduler(V)
    schedule = LogLinearSchedule(EPS)
    t = torch.cat([torch.logspace(-14, -2, 4000, dtype=F64), torch.linspace(1e-2, 1, 20001, dtype=F64)[1:]])
    N = t.shape[0]
    alpha, dalpha = schedule.alpha(t), schedule.dalpha_dt(t)
    x0 = torch.full((N, V), x)
    z_t = torch.arange(V).expand(N, V)  # every value of z_t, weighted by q(z_t | x) below
    log_uniform = torch.full((N, V, V), -math.log(V), dtype=F64)
    L = sched.nelbo_per_token(log_uniform, x0, z_t, alpha, dalpha, dtype=F64)  # (N, V)
    q_zt = alpha[:, None] * F.one_hot(torch.tensor(x), V).to(F64) + (1 - alpha[:, None]) / V
    integrand = (L * q_zt).sum(-1)
    assert bool(torch.isfinite(integrand).all()) and bool((integrand >= 0).all())
    integral = torch.trapezoid(integrand, t).item()
    q_1 = torch.full((V,), (1 - EPS) / V, dtype=F64)
    q_1[x] += EPS
    prior_kl = (q_1 * (q_1 * V).log()).sum().item()
    assert integral == pytest.approx(math.log(V), abs=1e-2)
    assert integral + prior_kl == pytest.approx(math.log(V), abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Absorbing-state process
# ---------------------------------------------------------------------------------------------------------------------
def absorbing_joint(alpha_t: float, alpha_s: float, V: int, m: int) -> torch.Tensor:
    """J[x, i, j] = q(z_s = i | x) q(z_t = j | z_s = i) for the absorbing process with mask id m (x != m)."""
    def transition(alpha):
        Q = alpha * torch.eye(V, dtype=F64)
        Q[:, m] += 1 - alpha
        Q[m] = 0
        Q[m, m] = 1
        return Q

    return transition(alpha_s)[:, :, None] * transition(alpha_t / alpha_s)[None]


def test_absorbing_add_noise_rate_and_prior():
    V, m = 61, 60
    sched = AbsorbingStateScheduler(V, m)
    x0 = torch.randint(0, V - 1, (4, 10_000), generator=gen(0))
    alphas = torch.tensor([0.0, 0.3, 0.8, 1.0])
    z_t, masked = sched.add_noise(x0, alphas, generator=gen(1))
    assert torch.equal(masked, z_t == m)
    assert torch.equal(z_t[~masked], x0[~masked])
    for rate, alpha in zip(masked.double().mean(-1).tolist(), alphas.tolist()):
        assert abs(rate - (1 - alpha)) <= binomial_tol(10_000, 1 - alpha)
    assert bool((sched.prior_sample((3, 7)) == m).all())
    with pytest.raises(ValueError, match="61"):
        AbsorbingStateScheduler(V, 61)


def test_absorbing_subs_log_probs():
    V, m = 61, 13  # an interior mask id, so nothing may assume it is the last one
    sched = AbsorbingStateScheduler(V, m)
    logits = torch.randn(3, 7, V, generator=gen(0)) * 3
    z_t = torch.randint(0, V, (3, 7), generator=gen(1))
    z_t[:, ::2] = m
    masked = z_t == m
    out = sched.subs_log_probs(logits, z_t)
    assert out.dtype == torch.float32
    assert bool(torch.isneginf(out[masked][:, m]).all())
    expected_masked = torch.cat([logits[..., :m], logits[..., m + 1 :]], -1).log_softmax(-1)
    got_masked = torch.cat([out[..., :m], out[..., m + 1 :]], -1)
    torch.testing.assert_close(got_masked[masked], expected_masked[masked])
    torch.testing.assert_close(out[masked].exp().sum(-1), torch.ones(int(masked.sum())))
    carried = out[~masked]  # one-hot on z_t: log 1 = 0 at z_t, -inf elsewhere
    assert torch.equal(carried.exp(), F.one_hot(z_t[~masked], V).float())
    no_carry = sched.subs_log_probs(logits, z_t, carry_over=False)
    assert bool(torch.isneginf(no_carry[..., m]).all())
    torch.testing.assert_close(no_carry[masked], out[masked])
    torch.testing.assert_close(no_carry.exp().sum(-1), torch.ones(3, 7))


@pytest.mark.parametrize("alpha_t,alpha_s", [(0.3, 0.7), (1e-3, 0.2), (0.5, 1.0)])
def test_absorbing_posterior_against_transition_matrices(alpha_t, alpha_s):
    V, m = 5, 2
    sched = AbsorbingStateScheduler(V, m)
    joint = absorbing_joint(alpha_t, alpha_s, V, m)
    clean = [v for v in range(V) if v != m]
    x_hat = random_probs((1, 8, V), seed=3)
    x_hat[..., m] = 0
    x_hat = x_hat / x_hat.sum(-1, keepdim=True)
    z_t = torch.tensor([[m, m, m, m, 0, 1, 3, 4]])
    post = sched.posterior_probs(x_hat, z_t, alpha_t, alpha_s)
    assert bool((post >= 0).all())
    torch.testing.assert_close(post.sum(-1), torch.ones(1, 8, dtype=F64), rtol=0, atol=1e-12)
    for n in range(8):
        j = int(z_t[0, n])
        mixed = torch.einsum("x,xi->i", x_hat[0, n], joint[:, :, j])  # sum_x x_hat(x) q(z_s, z_t | x)
        torch.testing.assert_close(post[0, n], mixed / mixed.sum(), rtol=0, atol=1e-12)
    for x in clean:  # one-hot x_hat: the exact Bayes posterior
        onehot = F.one_hot(torch.tensor([[x]]), V).to(F64)
        exact = joint[x, :, m] / joint[x, :, m].sum()
        torch.testing.assert_close(sched.posterior_probs(onehot, torch.tensor([[m]]), alpha_t, alpha_s)[0, 0], exact,
                                   rtol=0, atol=1e-12)


def test_absorbing_step():
    V, m, n = 5, 4, 20_000
    sched = AbsorbingStateScheduler(V, m)
    x_hat_row = torch.tensor([0.1, 0.4, 0.2, 0.3, 0.0])
    z_t = torch.full((2, n), m)
    z_t[1, ::2] = 1  # half of row 1 is already unmasked
    x_hat = x_hat_row.expand(2, n, V).contiguous()
    alpha_t, alpha_s = 0.25, 0.55
    z_s = sched.step(x_hat, z_t, alpha_t, alpha_s, generator=gen(0))
    unmasked = z_t != m
    assert torch.equal(z_s[unmasked], z_t[unmasked]), "unmasked tokens must never change"
    expected = sched.posterior_probs(x_hat_row.double()[None, None], torch.tensor([[m]]), alpha_t, alpha_s)[0, 0]
    freq = torch.bincount(z_s[0], minlength=V).double() / n
    for v in range(V):
        assert abs(float(freq[v]) - float(expected[v])) <= binomial_tol(n, float(expected[v]))
    # alpha_s = 1: everything is revealed, from x_hat's support
    final = sched.step(x_hat, z_t, alpha_t, 1.0, generator=gen(1))
    assert not bool((final == m).any())
    assert torch.equal(final[unmasked], z_t[unmasked])
    assert not bool((final == 0).all())
    # s = t: nothing is revealed
    assert torch.equal(sched.step(x_hat, z_t, 0.4, 0.4, generator=gen(2)), z_t)


def test_absorbing_nelbo_per_token():
    V, m = 61, 60
    sched = AbsorbingStateScheduler(V, m)
    x0 = torch.randint(0, V - 1, (3, 7), generator=gen(0))
    alpha = torch.tensor([0.2, 0.5, 0.9])
    dalpha = torch.full((3,), -(1 - EPS))
    z_t, masked = sched.add_noise(x0, alpha, generator=gen(1))
    z_t[:, 0], masked[:, 0] = m, True  # at least one masked and one clean position per row
    z_t[:, 1], masked[:, 1] = x0[:, 1], False
    logits = torch.randn(3, 7, V, generator=gen(2))
    log_p = sched.subs_log_probs(logits, z_t, carry_over=False)
    value = sched.nelbo_per_token(log_p, x0, z_t, alpha, dalpha)
    assert value.shape == (3, 7)
    assert bool((value[~masked] == 0).all())
    neg_log_p_x = -log_p.gather(-1, x0[..., None]).squeeze(-1)
    expected = -(dalpha / (1 - alpha))[:, None] * neg_log_p_x
    torch.testing.assert_close(value[masked], expected[masked])
    assert bool((value[masked] > 0).all())
    # carried-over (-inf off z_t) log-probs are not read at clean positions: still finite
    carried = sched.subs_log_probs(logits, z_t)
    assert bool(torch.isfinite(sched.nelbo_per_token(carried, x0, z_t, alpha, dalpha)).all())


# ---------------------------------------------------------------------------------------------------------------------
# Gaussian process
# ---------------------------------------------------------------------------------------------------------------------
def learned_schedule(seed: int = 0, hidden: int = 8, gamma_0: float = -3.0, gamma_1: float = 6.0):
    schedule = LearnedGammaSchedule(hidden, gamma_0, gamma_1)
    with torch.no_grad():  # the model's init: N(0, 1) raw weights, so the hidden units differ
        for p in (schedule.W1_raw, schedule.b1, schedule.W2_raw):
            p.copy_(torch.randn(p.shape, generator=gen(seed)))
    return schedule


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_gamma_schedule(seed):
    schedule = learned_schedule(seed)
    t = torch.linspace(0, 1, 513, dtype=F64)
    gamma, dgamma = schedule(t)
    assert gamma.dtype == F64 and dgamma.dtype == F64 and gamma.shape == t.shape
    assert bool((gamma[1:] > gamma[:-1]).all()), "gamma must be strictly increasing"
    assert bool((dgamma > 0).all())
    assert gamma[0].item() == pytest.approx(-3.0, abs=1e-12)
    assert gamma[-1].item() == pytest.approx(6.0, abs=1e-12)
    # the endpoints are exactly the learnable scalars, also after they moved
    with torch.no_grad():
        schedule.gamma_0.fill_(-5.5)
        schedule.gamma_1.fill_(2.25)
    ends, _ = schedule(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ends, torch.tensor([-5.5, 2.25], dtype=F64), rtol=0, atol=1e-12)
    # dgamma/dt against autograd and against central differences
    t_req = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.93, 1.0], dtype=F64, requires_grad=True)
    gamma, dgamma = schedule(t_req)
    (autograd,) = torch.autograd.grad(gamma.sum(), t_req)
    torch.testing.assert_close(dgamma.detach(), autograd, rtol=1e-10, atol=1e-12)
    t_mid = torch.tensor([0.1, 0.37, 0.5, 0.93], dtype=F64)
    h = 1e-6
    fd = (schedule(t_mid + h)[0] - schedule(t_mid - h)[0]) / (2 * h)
    torch.testing.assert_close(schedule(t_mid)[1].detach(), fd.detach(), rtol=1e-6, atol=1e-8)
    # shapes are preserved and float32 inputs give float64 outputs
    g2, d2 = schedule(torch.rand(3, 4, generator=gen(9)))
    assert g2.shape == (3, 4) and d2.shape == (3, 4) and g2.dtype == F64


def test_gaussian_alpha_sigma_variance_preserving():
    gamma = torch.linspace(-12, 12, 101, dtype=F64)
    alpha, sigma = gaussian_alpha_sigma(gamma)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(gamma), rtol=0, atol=1e-14)
    torch.testing.assert_close((alpha / sigma) ** 2, torch.exp(-gamma), rtol=1e-10, atol=0)  # SNR = exp(-gamma)
    assert bool((alpha[1:] < alpha[:-1]).all())


def test_gaussian_add_noise_and_prior_sample():
    d = 6
    sched = GaussianEmbeddingScheduler(d)
    e = torch.randn(3, 7, d, generator=gen(0))
    noise = torch.randn(3, 7, d, generator=gen(1))
    gamma = torch.tensor([-3.0, 0.5, 6.0], dtype=F64)
    z = sched.add_noise(e, gamma, noise=noise)
    alpha, sigma = gaussian_alpha_sigma(gamma)
    expected = alpha[:, None, None] * e.double() + sigma[:, None, None] * noise.double()
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, expected.float())
    assert torch.equal(sched.add_noise(e, gamma, generator=gen(2)), sched.add_noise(e, gamma, generator=gen(2)))
    prior = sched.prior_sample((2, 5), generator=gen(3))
    assert prior.shape == (2, 5, d)


@pytest.mark.parametrize("gamma_s,gamma_t", [(-3.0, -1.0), (-1.0, 4.0), (2.0, 2.5), (-6.0, 6.0)])
def test_gaussian_posterior_against_direct_conditioning(gamma_s, gamma_t):
    """Per coordinate, (z_s, z_t) | e is jointly Gaussian: z_s = a_s e + s_s eps_1 and
    z_t = a_{t|s} z_s + s_{t|s} eps_2 with a_{t|s} = a_t / a_s, s_{t|s}^2 = s_t^2 - a_{t|s}^2 s_s^2.
    Condition the 2x2 covariance on z_t."""
    d = 5
    sched = GaussianEmbeddingScheduler(d)
    e = torch.randn(4, 3, d, generator=gen(0), dtype=F64)
    z_t = torch.randn(4, 3, d, generator=gen(1), dtype=F64)
    g_s = torch.full((4,), gamma_s, dtype=F64)
    g_t = torch.full((4,), gamma_t, dtype=F64)
    mean, var = sched.posterior_mean_var(z_t, e, g_t, g_s)

    a_s, s_s = (float(v) for v in gaussian_alpha_sigma(torch.tensor(gamma_s, dtype=F64)))
    a_t, s_t = (float(v) for v in gaussian_alpha_sigma(torch.tensor(gamma_t, dtype=F64)))
    a_ts = a_t / a_s
    s_ts2 = s_t**2 - a_ts**2 * s_s**2
    assert s_ts2 > 0
    mu = torch.tensor([a_s, a_t], dtype=F64)  # means of (z_s, z_t) per unit of e
    cov = torch.tensor([[s_s**2, a_ts * s_s**2], [a_ts * s_s**2, a_ts**2 * s_s**2 + s_ts2]], dtype=F64)
    torch.testing.assert_close(cov[1, 1], torch.tensor(s_t**2, dtype=F64))  # marginal of z_t is right
    gain = cov[0, 1] / cov[1, 1]
    expected_mean = mu[0] * e + gain * (z_t - mu[1] * e)
    expected_var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
    torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var.expand_as(mean), torch.full_like(mean, float(expected_var)), rtol=1e-10,
                               atol=1e-14)


def test_gaussian_prior_kl_against_torch_distributions():
    d = 16
    sched = GaussianEmbeddingScheduler(d)
    e = F.normalize(torch.randn(3, 7, d, generator=gen(0), dtype=F64), dim=-1)
    e[0, 0] *= 2.5  # a non-unit row too
    gamma_1 = torch.tensor([[6.0], [0.0], [-2.0]], dtype=F64)
    kl = sched.prior_kl(e, gamma_1)
    alpha, sigma = gaussian_alpha_sigma(gamma_1)
    q = torch.distributions.Normal(alpha[..., None] * e, sigma[..., None].expand_as(e))
    p = torch.distributions.Normal(torch.zeros_like(e), torch.ones_like(e))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    assert kl.shape == (3, 7) and kl.dtype == F64
    torch.testing.assert_close(kl, expected, rtol=1e-10, atol=1e-12)
    assert bool((kl > 0).all())


def test_gaussian_diffusion_loss_is_minus_half_snr_derivative():
    """L_diff = -1/2 SNR'(t) ||e - e_hat||^2 with SNR = exp(-gamma(t)) (methods.md §C.3), SNR' via autograd."""
    d = 4
    sched = GaussianEmbeddingScheduler(d)
    schedule = learned_schedule(3)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64, requires_grad=True)
    gamma, dgamma = schedule(t)
    (snr_prime,) = torch.autograd.grad(torch.exp(-gamma).sum(), t)
    e = torch.randn(3, 7, d, generator=gen(0))
    e_hat = torch.randn(3, 7, d, generator=gen(1))
    loss = sched.diffusion_loss(e, e_hat, gamma.detach(), dgamma.detach())
    sq = ((e.double() - e_hat.double()) ** 2).sum(-1)
    torch.testing.assert_close(loss, -0.5 * snr_prime[:, None] * sq, rtol=1e-10, atol=1e-12)
    assert bool((loss > 0).all())


@pytest.mark.parametrize("gamma_s,gamma_t", [(-2.0, 1.0), (0.5, 0.6), (-3.0, 6.0)])
def test_gaussian_ancestral_step_moments(gamma_s, gamma_t):
    """With e_hat = e and score temperature 1, the ancestral step samples q(z_s | z_t, e): standardised residuals
    (z_s - mean) / sqrt(var) have mean 0 and variance 1 within 5 sigma over 2 x 5000 x 4 draws."""
    d, B, L = 4, 2, 5000
    sched = GaussianEmbeddingScheduler(d)
    e = F.normalize(torch.randn(B, L, d, generator=gen(0)), dim=-1)
    g_t = torch.full((B,), gamma_t, dtype=F64)
    g_s = torch.full((B,), gamma_s, dtype=F64)
    z_t = sched.add_noise(e, g_t, generator=gen(1))
    z_s = sched.step(e, z_t, g_t, g_s, generator=gen(2))
    assert z_s.shape == z_t.shape and z_s.dtype == torch.float32
    mean, var = sched.posterior_mean_var(z_t, e, g_t, g_s)
    r = (z_s.double() - mean) / var.sqrt()
    n = r.numel()
    assert abs(r.mean().item()) <= 5 / math.sqrt(n)
    assert abs(r.var().item() - 1) <= 5 * math.sqrt(2 / n)
    torch.testing.assert_close(sched.step(e, z_t, g_t, g_s, generator=gen(2)), z_s)


def test_gaussian_ddim_step_is_deterministic_trajectory():
    """DDIM with the true e: z_t = a_t e + s_t eps maps to z_s = a_s e + s_s eps (same eps), with no randomness."""
    d = 4
    sched = GaussianEmbeddingScheduler(d)
    e = torch.randn(3, 7, d, generator=gen(0), dtype=F64)
    eps = torch.randn(3, 7, d, generator=gen(1), dtype=F64)
    g_t = torch.tensor([1.0, 3.0, -1.0], dtype=F64)
    g_s = torch.tensor([-2.0, 2.9, -1.5], dtype=F64)
    (a_t, s_t), (a_s, s_s) = ((v[:, None, None] for v in gaussian_alpha_sigma(g)) for g in (g_t, g_s))
    z_t = a_t * e + s_t * eps
    z_s = sched.step(e, z_t, g_t, g_s, ddim=True, generator=gen(5))
    torch.testing.assert_close(z_s, (a_s * e + s_s * eps).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sched.step(e, z_t, g_t, g_s, ddim=True, generator=gen(6)), z_s, rtol=0, atol=0)
    # score temperature < 1 scales the predicted noise by 1 / temperature
    z_sharp = sched.step(e, z_t, g_t, g_s, ddim=True, score_temperature=0.5)
    e_sharp = (z_t - s_t * eps / 0.5) / a_t
    torch.testing.assert_close(z_sharp, (a_s * e_sharp + s_s * eps / 0.5).float(), rtol=1e-5, atol=1e-5)


def test_fused_uniform_terms_in_several_row_chunks(monkeypatch):
    """The CPU path of the fused node works through cache-sized row chunks: with chunks of 4 rows (the last one
    partial) it gives the whole-tensor values and gradients."""
    import modeling_dlm.functional_dlm as fd
    import modeling_dlm.scheduling_uniform as su

    V, B, L = 37, 3, 5
    g = gen(11)
    logits = (3 * torch.randn(B, L, V, generator=g, dtype=F64)).requires_grad_()
    z, x = torch.randint(0, V, (B, L), generator=g), torch.randint(0, V, (B, L), generator=g)
    scale, floor = torch.rand(B, L, generator=g, dtype=F64) * V, torch.rand(B, L, generator=g, dtype=F64)
    weights = [torch.randn(B, L, generator=g, dtype=F64) for _ in range(3)]

    def run():
        outs = su.softmax_log_affine_terms(logits, z, x, scale, floor)
        (grad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), logits)
        return [o.detach() for o in outs] + [grad]

    whole = run()
    monkeypatch.setattr(fd, "_CHUNK_ELEMENTS", 4 * V)
    assert fd.row_chunks(B * L, V, logits.device)[1] == 4
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    p = logits.detach().softmax(-1)
    torch.testing.assert_close(whole[0], torch.log(scale[..., None] * p + floor[..., None]).sum(-1))


@pytest.mark.parametrize("chunk_rows", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_steps_from_logits_equal_steps_from_softmax(monkeypatch, chunk_rows, dtype):
    """The samplers' hot path never writes softmax(logits): `step_from_logits` must draw exactly what `step` draws
    from the full softmax (same generator state -> same z_s), for the uniform mixture and for MDLM's unmasking,
    also when the row-chunked softmax runs in several chunks (the last one partial); `softmax_gather` and
    `softmax_matmul` must give the full-softmax values."""
    import modeling_dlm.functional_dlm as fd

    V, B, L = 29, 4, 7
    if chunk_rows:
        monkeypatch.setattr(fd, "_CHUNK_ELEMENTS", chunk_rows * V)
    g = gen(5)
    logits = 4 * torch.randn(B, L, V, generator=g, dtype=dtype)
    z_t = torch.randint(0, V, (B, L), generator=g)
    probs = logits.softmax(-1)
    torch.testing.assert_close(fd.softmax_gather(logits, z_t), probs.gather(-1, z_t[..., None]).squeeze(-1),
                               rtol=0, atol=0)
    E = torch.randn(V, 5, generator=g, dtype=dtype)
    torch.testing.assert_close(fd.softmax_matmul(logits, E), probs @ E)
    uniform = UniformStateScheduler(V)
    changed = 0
    times = [(0.05, 0.3), (0.5, 0.6), (0.9, 1.0), (torch.tensor([0.1, 0.2, 0.3, 0.4]), 0.8)]
    for seed, (a_t, a_s) in enumerate(times):
        expected = uniform.step(probs, z_t, a_t, a_s, generator=gen(seed))
        got = uniform.step_from_logits(logits, z_t, a_t, a_s, generator=gen(seed))
        assert torch.equal(got, expected), (a_t, a_s)
        changed += int((got != z_t).sum())
    assert changed > 0  # the comparison covered real draws
    mask_id = V - 1
    absorbing = AbsorbingStateScheduler(V, mask_id)
    subs_logits = logits.clone()
    subs_logits[..., mask_id] = float("-inf")
    z_m = torch.where(torch.rand(B, L, generator=g) < 0.7, torch.full_like(z_t, mask_id), z_t.clamp(max=V - 2))
    for seed, (a_t, a_s) in enumerate([(0.1, 0.5), (0.5, 1.0)]):
        expected = absorbing.step(subs_logits.softmax(-1), z_m, a_t, a_s, generator=gen(seed))
        got = absorbing.step_from_logits(subs_logits, z_m, a_t, a_s, generator=gen(seed))
        assert torch.equal(got, expected)
        assert (got != z_m).any() and not (got[z_m != mask_id] != z_m[z_m != mask_id]).any()
        assert (got[got != z_m] != mask_id).all()


# ---------------------------------------------------------------------------------------------------------------------
# Categorical draws are exact (issue 15, C10): float64 CDF and uniform, no zero-probability token, ever
# ---------------------------------------------------------------------------------------------------------------------
_BELOW_ONE = 1 - 2.0**-53  # the largest float64 uniform torch.rand can return


def _float32_inverse_cdf_before_fix(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The draw before the fix (float32 running sum, float32 uniform, left search), its uniform made explicit: the
    reference that shows the exactness checks below reject a float32 draw."""
    cdf = probs.float().cumsum(-1)
    target = u.float().reshape(probs.shape[0], -1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).clamp_(max=probs.shape[-1] - 1)


def _tiny_tail_row(V: int = 50_258) -> torch.Tensor:
    """A GPT-2-sized float32 row: 5 tokens hold ~99.5%, ~50k tokens hold 1e-8..3e-7 each (half of them below half a
    float32 ulp of a CDF near 1), zeros at the start, inside the tail (filtered) and at the end."""
    g = gen(0)
    p = torch.zeros(V, dtype=F64)
    p[3:8] = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.04], dtype=F64)
    p[8:25_008] = 2.5e-8 * (1 + 0.1 * torch.rand(25_000, generator=g, dtype=F64))
    p[25_008:V - 3] = 1e-7 + 2e-7 * torch.rand(V - 3 - 25_008, generator=g, dtype=F64)
    p[25_008:V - 3:7] = 0.0
    p[3:8] *= (1 - p[8:].sum()) / p[3:8].sum()
    return p.float()


def _induced_counts(draw, row: torch.Tensor, bits: int) -> torch.Tensor:
    """How many of the 2^bits uniforms u = i 2^-bits the draw `draw(probs, u)` (monotone in u) maps to each token:
    per token boundary, a bisection for the first i that reaches it. The exact distribution the draw induces when u
    is uniform on that grid (torch.rand: 24 bits in float32, 53 in float64)."""
    V = row.numel()
    k = torch.arange(1, V)
    lo = torch.full((V - 1,), -1, dtype=torch.long)
    hi = torch.full((V - 1,), 1 << bits, dtype=torch.long)
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        reached = draw(row[None], (mid.double() / 2.0**bits)[None])[0] >= k
        hi, lo = torch.where(reached, mid, hi), torch.where(reached, lo, mid)
    return torch.cat([torch.zeros(1, dtype=torch.long), hi, torch.full((1,), 1 << bits, dtype=torch.long)]).diff()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_inverse_cdf_edges_never_return_zero_probability_tokens(dtype):
    """u = 0 picks the first token of positive probability (not token 0), u just below 1 the last one (not V - 1),
    interior zeros are skipped at their CDF boundary; u = 1 (out of range) still lands on the last positive token."""
    probs = torch.tensor([[0.0, 0.0, 0.25, 0.0, 0.75, 0.0],
                          [0.0, 3.0, 0.0, 0.0, 0.0, 1.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 2.0],
                          [1e-30, 0.0, 0.0, 1.0, 0.0, 0.0]], dtype=dtype)
    first, last = torch.tensor([2, 1, 5, 0]), torch.tensor([4, 5, 5, 3])
    for u, expected in [(0.0, first), (_BELOW_ONE, last), (1.0, last)]:
        assert torch.equal(inverse_cdf(probs, torch.full((4,), u, dtype=F64)), expected), u
    # at the CDF boundary u * total = cdf[k]: the next positive token (right-continuous inverse), never a zero
    assert torch.equal(inverse_cdf(probs[:1], torch.tensor([[0.25, 0.25 - 2.0**-54]], dtype=F64)),
                       torch.tensor([[4, 2]]))
    # a (N, m) grid of u per row: monotone, and only positive-probability ids
    grid = torch.linspace(0, _BELOW_ONE, 4001, dtype=F64).expand(4, -1)
    ids = inverse_cdf(probs, grid)
    assert ids.shape == grid.shape and bool((ids.diff(dim=-1) >= 0).all())
    assert bool((probs.gather(-1, ids) > 0).all())
    assert inverse_cdf(probs[:0], torch.zeros(0, dtype=F64)).shape == (0,)
    # the old draw returned token 0 (probability 0) for u = 0
    assert int(_float32_inverse_cdf_before_fix(probs[:1], torch.zeros(1))[0, 0]) == 0


def test_mixture_components_at_the_edges_of_u():
    """The uniform mixture's component choice: u = 0 and u just below 1 never pick a component of weight 0."""
    from modeling_dlm.scheduling_uniform import _mixture_components

    names = ("copy", "x_hat", "uniform")
    cases = [((0.0, 0.3, 1.7), "x_hat", "uniform"),  # t = 1 (alpha_t = 0): no copy weight
             ((0.0, 0.0, 1.7), "uniform", "uniform"),
             ((0.3, 0.0, 0.0), "copy", "copy"),  # s = t
             ((0.3, 1.7, 0.0), "copy", "x_hat"),  # the final step (alpha_s = 1): no uniform weight
             ((0.3, 0.0, 1.7), "copy", "uniform"),
             ((1.0 / 3, 1.0 / 7, 0.0), "copy", "x_hat")]  # a total that is not a power of 2
    for weights, at_zero, below_one in cases:
        w = [torch.tensor([x], dtype=F64) for x in weights]
        for u, expected in ((0.0, at_zero), (0.5, None), (_BELOW_ONE, below_one)):
            picks = _mixture_components(torch.full((1,), u, dtype=F64), *w)
            picked = [name for name, p in zip(names, picks) if bool(p)]
            assert len(picked) == 1 and weights[names.index(picked[0])] > 0, (weights, u, picked)
            assert expected is None or picked == [expected], (weights, u, picked)


def test_filtered_rows_never_draw_a_filtered_token():
    """Top-k / top-p filtered rows (exact zeros after the softmax) over many seeded draws, directly and through the
    uniform and absorbing steps at their final step (alpha_s = 1, where the uniform mixture has no uniform part)."""
    V, R, n = 997, 16, 200
    g = gen(11)
    logits = 3 * torch.randn(2 * R, V, generator=g)
    kth = torch.topk(logits[:R], 7, dim=-1).values[:, -1:]
    logits[:R] = logits[:R].masked_fill(logits[:R] < kth, float("-inf"))  # top-k = 7
    sorted_logits, order = torch.sort(logits[R:], dim=-1, descending=True)
    p_sorted = sorted_logits.softmax(-1)
    drop = p_sorted.cumsum(-1) - p_sorted >= 0.3  # top-p = 0.3
    logits[R:] = logits[R:].masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    support = probs > 0
    assert bool((support.sum(-1) < V // 10).all())  # mostly exact zeros
    rows = probs.repeat_interleave(n, 0)
    for seed in range(3):
        ids = sample_from_probs(rows, gen(seed))
        assert bool(rows.gather(-1, ids[:, None]).gt(0).all()), seed
    # the draw is `inverse_cdf` of one float64 uniform per row, from the caller's generator
    assert torch.equal(sample_from_probs(rows, gen(7)), inverse_cdf(rows, torch.rand(len(rows), generator=gen(7),
                                                                                           dtype=F64)))
    # steps: every token they draw from x_hat is in its support
    B, L = 4, 2 * R // 4
    step_logits = logits.view(B, L, V)
    z_t = torch.randint(0, V, (B, L), generator=g)
    x_support = support.view(B, L, V)
    for seed in range(20):
        z_s = UniformStateScheduler(V).step_from_logits(step_logits, z_t, 0.3, 1.0, generator=gen(seed))
        ok = (z_s == z_t) | x_support.gather(-1, z_s[..., None]).squeeze(-1)
        assert bool(ok.all()), seed
    mask_id = V - 1
    absorbing_logits = step_logits.clone()
    absorbing_logits[..., mask_id] = float("-inf")
    z_m = torch.full((B, L), mask_id)
    for seed in range(20):
        z_s = AbsorbingStateScheduler(V, mask_id).step_from_logits(absorbing_logits, z_m, 0.3, 1.0,
                                                                  generator=gen(seed))
        assert bool(absorbing_logits.gather(-1, z_s[..., None]).isfinite().all()), seed


def test_draw_is_exact_on_many_tiny_probabilities():
    """Total variation between a GPT-2-sized row with ~50k tiny probabilities and the distribution the draw induces
    over every float64 uniform torch.rand can return (computed exactly, not sampled): float64 precision. The float32
    draw before the fix fails the same check by ~8 orders of magnitude (TV ~6e-4, ~4e-4 of the mass never drawn)."""
    row = _tiny_tail_row()
    exact = row.double() / row.double().sum()
    counts = _induced_counts(inverse_cdf, row, 53)
    induced = counts.double() / 2.0**53
    assert 0.5 * float((induced - exact).abs().sum()) < 1e-10
    assert torch.equal(counts > 0, row > 0)  # every token of positive probability can be drawn, no other
    old = _induced_counts(_float32_inverse_cdf_before_fix, row, 24)
    assert 0.5 * float((old.double() / 2.0**24 - exact).abs().sum()) > 1e-4
    assert float(exact[(old == 0) & (row > 0)].sum()) > 1e-4


def test_draw_chi_square_on_many_tiny_probabilities():
    """Seeded float64 draws from the tiny-tail row, binned (the 5 large tokens, then the tail in 14 bins of
    consecutive ids): a chi-square goodness of fit against the exact probabilities."""
    row = _tiny_tail_row()
    V, n = row.numel(), 100_000
    exact = row.double() / row.double().sum()
    edges = torch.tensor([4, 5, 6, 7, 8, 16_675, 25_008, *torch.linspace(25_008, V, 12).long().tolist()[1:-1]])
    bins = torch.bucketize(torch.arange(V), edges, right=True)  # bin 0 holds the three leading zeros and token 3
    expected = n * torch.zeros(len(edges) + 1, dtype=F64).index_add_(0, bins, exact)
    assert float(expected.min()) > 20
    for seed in range(2):
        ids = inverse_cdf(row[None], torch.rand(1, n, generator=gen(seed), dtype=F64))[0]
        assert bool((row[ids] > 0).all())
        observed = torch.bincount(bins[ids], minlength=len(expected)).double()
        chi2 = float(((observed - expected) ** 2 / expected).sum())
        dof = len(expected) - 1
        p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=F64), torch.tensor(chi2 / 2, dtype=F64)))
        assert p_value > 1e-4, (seed, chi2, p_value)
