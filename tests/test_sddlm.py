"""SDDLM: which denoiser minimises the uniform-state ELBO, which positions its loss trains on, and its regulariser.

Brute force at tiny V and L: every clean sequence x and every noised z_t is enumerated, so the expected ELBO integrand
at a fixed t is an exact function of a free table of denoiser logits (one row per (z_t, position)).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from modeling_dlm.scheduling_uniform import UniformStateScheduler


F64 = torch.float64


def _enumerate(V: int, L: int):
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))  # (V^L, L)
    return seqs


def _random_source(V: int, L: int, seed: int):
    """Every sequence of V^L and a random, skewed distribution over them."""
    seqs = _enumerate(V, L)
    p_x = torch.rand(len(seqs), generator=torch.Generator().manual_seed(seed), dtype=F64) ** 3
    return seqs, p_x / p_x.sum()


def _kernel(x: torch.Tensor, z: torch.Tensor, alpha: float, V: int) -> torch.Tensor:
    """q(z | x) for every pair, (n_x, n_z): prod_l (alpha 1[z_l = x_l] + (1 - alpha) / V)."""
    same = (x[:, None, :] == z[None, :, :]).to(F64)
    return (alpha * same + (1 - alpha) / V).prod(-1)


def _expected_integrand(table_log_probs, p_x, seqs, alpha, V):
    """E_{x ~ p, z ~ q(.|x)} sum_l L_t(x, z, x_theta(z)) with x_theta(z)[l] = softmax(table[z, l]); exact."""
    process = UniformStateScheduler(V)
    n, L = seqs.shape
    q = _kernel(seqs, seqs, alpha, V)  # (n_x, n_z)
    x0 = seqs[:, None, :].expand(n, n, L).reshape(-1, L)
    z_t = seqs[None, :, :].expand(n, n, L).reshape(-1, L)
    log_x_theta = table_log_probs[None].expand(n, n, L, V).reshape(-1, L, V)
    per = process.nelbo_per_token(log_x_theta, x0, z_t, alpha, -(1 - 1e-3), dtype=F64).sum(-1)  # (n_x n_z,)
    return (per.view(n, n) * q * p_x[:, None]).sum()


def _leave_one_out(p_x, seqs, alpha, V):
    """p(x^l = v | z^{-l}) for every z and l: (n_z, L, V)."""
    n, L = seqs.shape
    out = torch.zeros(n, L, V, dtype=F64)
    for l in range(L):
        others = [k for k in range(L) if k != l]
        q_rest = _kernel(seqs[:, others], seqs[:, others], alpha, V)  # (n_x, n_z): q(z^{-l} | x^{-l})
        joint = p_x[:, None] * q_rest  # (n_x, n_z)
        for v in range(V):
            out[:, l, v] = joint[seqs[:, l] == v].sum(0)
        out[:, l] /= out[:, l].sum(-1, keepdim=True)
    return out


def _posterior(p_x, seqs, alpha, V):
    """p(x^l = v | z) (conditions on z^l too: the removed "bayes" denoiser's target), (n_z, L, V)."""
    n, L = seqs.shape
    joint = p_x[:, None] * _kernel(seqs, seqs, alpha, V)  # (n_x, n_z)
    out = torch.zeros(n, L, V, dtype=F64)
    for l in range(L):
        for v in range(V):
            out[:, l, v] = joint[seqs[:, l] == v].sum(0)
    return out / out.sum(-1, keepdim=True)


def test_uniform_elbo_is_minimised_by_the_leave_one_out_predictive():
    """The ELBO with the exact leave-one-out denoiser is the minimum over all denoisers (a free table, optimised),
    and strictly below the ELBO with the full posterior p(x^l | z_t) (the former `elbo_denoiser="bayes"`)."""
    V, L, alpha = 3, 2, 0.6
    seqs, p_x = _random_source(V, L, seed=0)
    loo = _leave_one_out(p_x, seqs, alpha, V)
    at_loo = _expected_integrand(loo.log(), p_x, seqs, alpha, V)
    at_posterior = _expected_integrand(_posterior(p_x, seqs, alpha, V).log(), p_x, seqs, alpha, V)
    assert at_loo < at_posterior - 1e-4

    table = torch.zeros(len(seqs), L, V, dtype=F64, requires_grad=True)
    optimizer = torch.optim.LBFGS([table], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = _expected_integrand(table.log_softmax(-1), p_x, seqs, alpha, V)
        value.backward()
        return value

    for _ in range(3):
        optimizer.step(closure)
    best = _expected_integrand(table.detach().log_softmax(-1), p_x, seqs, alpha, V)
    assert best >= at_loo - 1e-9  # nothing beats the leave-one-out denoiser
    torch.testing.assert_close(best, at_loo, rtol=0, atol=1e-8)
    torch.testing.assert_close(table.detach().softmax(-1), loo, rtol=0, atol=1e-4)


def _cross_entropy_minimiser(p_x, seqs, alpha, V, loss_mask):
    """The denoiser that minimises SDDLM's expected cross-entropy (no regulariser) for a loss mask: the
    weighted-CE optimum theta(z)[l] proportional to sum_x p(x) w(x, z, l) onehot(x^l), where w is the probability
    that position l carries the loss given (x, z)."""
    n, L = seqs.shape
    q = _kernel(seqs, seqs, alpha, V)  # (n_x, n_z)
    same = (seqs[:, None, :] == seqs[None, :, :]).to(F64)  # (n_x, n_z, L)
    if loss_mask == "resampled":  # P(resampled | x^l, z^l) = ((1 - alpha) / V) / q(z^l | x^l)
        weight = ((1 - alpha) / V) / (alpha * same + (1 - alpha) / V)
    else:  # "changed": z^l != x^l
        weight = 1 - same
    w = p_x[:, None, None] * q[..., None] * weight  # (n_x, n_z, L)
    out = torch.zeros(n, L, V, dtype=F64)
    for v in range(V):
        out[..., v] = (w * (seqs[:, None, :] == v)).sum(0)
    return out / out.sum(-1, keepdim=True)


def test_resampled_loss_mask_trains_the_elbo_optimum_and_changed_does_not():
    """SDDLM's default `loss_mask="resampled"` (every position the process resampled) has the leave-one-out
    predictive as its cross-entropy optimum, the ELBO minimiser; `"changed"` (z_t != x) removes the mass on z_t^l
    that the ELBO needs and lands on a worse bound."""
    from modeling_dlm import SDDLMConfig

    assert SDDLMConfig().loss_mask == "resampled"
    V, L, alpha = 3, 2, 0.6
    seqs, p_x = _random_source(V, L, seed=1)
    loo = _leave_one_out(p_x, seqs, alpha, V)
    resampled = _cross_entropy_minimiser(p_x, seqs, alpha, V, "resampled")
    changed = _cross_entropy_minimiser(p_x, seqs, alpha, V, "changed")
    torch.testing.assert_close(resampled, loo, rtol=0, atol=1e-12)
    elbo_resampled = _expected_integrand(resampled.log(), p_x, seqs, alpha, V)
    elbo_changed = _expected_integrand(changed.log(), p_x, seqs, alpha, V)
    assert elbo_changed > elbo_resampled * 1.05


def test_low_noise_end_of_the_elbo_penalises_little_mass_on_data_tokens_as_one_over_p():
    """At alpha -> 1 a clean position's ELBO integrand tends to |alpha'| (1 / p(x) - 1) / V, so its expectation over
    x ~ q (the leave-one-out predictive) is |alpha'| (sum_v q_v / p_v - 1) / V: it grows like q_v / p_v for a token
    that the data use and the model nearly rules out (cross-entropy grows only like q_v log(1 / p_v)), and on its own
    it is minimised by the flatter p ~ sqrt(q). At low noise almost every position is clean, so this is the part of
    the bound that the simple loss, log p on the few resampled positions, controls least: the reason for SDDLM's
    `elbo_weight` (trainers/sddlm.py)."""
    V = 7
    sched = UniformStateScheduler(V)
    g = torch.Generator().manual_seed(0)
    q = torch.rand(V, generator=g, dtype=F64).softmax(-1)
    dalpha = torch.tensor([-(1 - 1e-3)], dtype=F64)
    x = torch.arange(V)[None]  # (1, V): position l holds the clean token l, z_t = x

    def clean_integrand(p, alpha):
        return sched.nelbo_per_token(p.log().expand(1, V, V), x, x, torch.tensor([alpha], dtype=F64), dalpha,
                                     dtype=F64)[0]  # (V,)

    p = (3 * torch.randn(V, generator=g, dtype=F64)).softmax(-1)  # a sharp, wrong prediction
    limit = (1 - 1e-3) * (1 / p - 1) / V
    errors = [float(((clean_integrand(p, alpha) - limit) / limit).abs().max()) for alpha in (1 - 1e-5, 1 - 1e-10)]
    assert errors[1] < 1e-4 and errors[1] < errors[0] / 100, errors  # converges to the limit as alpha -> 1

    def expected(p):
        return float((q * clean_integrand(p, 1 - 1e-10)).sum())

    assert expected(p) == pytest.approx(float((1 - 1e-3) * ((q / p).sum() - 1) / V), rel=1e-4)
    flat = q.sqrt() / q.sqrt().sum()
    assert expected(flat) < expected(q) < expected(p)  # rewards hedging; the sharp wrong p costs the most
    assert expected(p) > 5 * expected(q)
