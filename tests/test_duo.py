"""Duo: the Gaussian -> uniform operator T, shared-noise latents and Discrete Consistency Distillation."""

from __future__ import annotations

import math
import time

import datasets
import pytest
import torch
from safetensors.torch import load_file

from trainers import DiffusionTrainingArguments, DuoDistillationTrainer
from trainers.duo import consistency_distillation_loss
from trainers.relaxation import _argmax_probability, diffusion_transformation, gaussian_coupled_latents

from .conftest import VOCAB, tiny_model


def gaussian_argmax(x: torch.Tensor, gamma: float, vocab: int, eps: torch.Tensor) -> torch.Tensor:
    """Brute force: argmax of alpha~ e_x + sigma~ eps with the (N, V) Gaussian materialised."""
    a = math.sqrt(torch.sigmoid(torch.tensor(-gamma)).item())
    s = math.sqrt(torch.sigmoid(torch.tensor(gamma)).item())
    return (a * torch.nn.functional.one_hot(x, vocab).double() + s * eps).argmax(-1)


@pytest.mark.parametrize("vocab", [5, 100, 1000])
@pytest.mark.parametrize("gamma", [-3.0, -1.0, 1.5])
def test_operator_matches_monte_carlo_argmax_frequencies(vocab, gamma):
    n = 40_000
    g = torch.Generator().manual_seed(vocab)
    x = torch.randint(0, vocab, (n,), generator=g)
    z = gaussian_argmax(x, gamma, vocab, torch.randn(n, vocab, generator=g, dtype=torch.float64))
    p_hat = (z == x).double().mean().item()
    alpha, _ = diffusion_transformation(torch.tensor([gamma]), vocab, -5.0, 5.0)
    p = alpha.item() + (1 - alpha.item()) / vocab
    assert abs(p_hat - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-4, (p_hat, p)


def test_operator_reproduces_the_reference_ranges_at_gpt2_vocabulary():
    """methods.md §B.2: gamma in [-4, -1] gives alpha in about [0.0062, 0.9987] and [-3.55, -1.85] gives
    [0.049, 0.945] for V = 50257 (computed there from the authors' shipped caches)."""
    alpha, _ = diffusion_transformation(torch.tensor([-4.0, -1.0]), 50257, -4.0, -1.0)
    assert alpha[0].item() == pytest.approx(0.9987, abs=1e-4)
    assert alpha[1].item() == pytest.approx(0.0062, abs=1e-4)
    alpha, _ = diffusion_transformation(torch.tensor([-3.55, -1.85]), 50257, -3.55, -1.85)
    assert alpha[0].item() == pytest.approx(0.945, abs=1e-3)
    assert alpha[1].item() == pytest.approx(0.049, abs=1e-3)


def test_operator_derivative_monotonicity_and_cache():
    gammas = torch.linspace(-4.0, -1.0, 301, dtype=torch.float64)
    alpha, dalpha = diffusion_transformation(gammas, 30522, -4.0, -1.0)
    assert bool((alpha[1:] < alpha[:-1]).all()) and bool((dalpha < 0).all())
    # the tabulated derivative against central differences of the exact (untabulated) quadrature
    h, inner, V = 1e-4, gammas[1:-1:10], 30522

    def exact_alpha(g):
        p, _ = _argmax_probability(torch.exp(-g / 2), V)
        return (V * p - 1) / (V - 1)

    _, d = diffusion_transformation(inner, V, -4.0, -1.0)
    torch.testing.assert_close((exact_alpha(inner + h) - exact_alpha(inner - h)) / (2 * h), d, rtol=1e-3, atol=1e-6)
    table_alpha, _ = diffusion_transformation(inner, V, -4.0, -1.0)
    torch.testing.assert_close(table_alpha, exact_alpha(inner), rtol=0, atol=1e-5)
    start = time.perf_counter()
    diffusion_transformation(gammas, 30522, -4.0, -1.0)
    assert time.perf_counter() - start < 0.05  # tabulated once per (V, range)
    with pytest.raises(ValueError, match="gamma_min"):
        diffusion_transformation(gammas, 30522, -1.0, -4.0)


def test_coupled_latents_match_a_shared_gaussian_trajectory():
    """Marginals and the joint of (z_t, z_s) equal those of argmax over one materialised Gaussian eps."""
    vocab, n = 20, 60_000
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (1, n), generator=g)
    gamma_t, gamma_s = -0.5, -2.0
    m = [math.exp(-gamma_t / 2), math.exp(-gamma_s / 2)]
    z_t, z_s = gaussian_coupled_latents(x, [torch.tensor(m[0]), torch.tensor(m[1])], vocab, generator=g)
    eps = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    b_t, b_s = gaussian_argmax(x[0], gamma_t, vocab, eps), gaussian_argmax(x[0], gamma_s, vocab, eps)
    stats = lambda a, b: torch.stack([(a == x[0]).double().mean(), (b == x[0]).double().mean(),  # noqa: E731
                                      (a == b).double().mean()])
    ours, brute = stats(z_t[0], z_s[0]), stats(b_t, b_s)
    assert torch.allclose(ours, brute, atol=4 * math.sqrt(0.25 / n) * 2), (ours, brute)
    alpha, _ = diffusion_transformation(torch.tensor([gamma_t]), vocab, -5.0, 5.0)
    assert ours[0].item() == pytest.approx(alpha.item() + (1 - alpha.item()) / vocab, abs=0.01)
    # a corrupted token is never x, and is uniform over the others
    wrong = z_t[0][z_t[0] != x[0]]
    assert len(wrong) > 1000


def test_distillation_loss_is_a_divergence():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    same, _ = consistency_distillation_loss(a, a)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    for divergence in ("kl-bwd", "kl-fwd"):
        loss, _ = consistency_distillation_loss(a, b, divergence=divergence)
        assert loss.item() > 0
    fwd, _ = consistency_distillation_loss(a, b, divergence="kl-fwd")
    bwd, _ = consistency_distillation_loss(b, a, divergence="kl-bwd")
    assert fwd.item() == pytest.approx(bwd.item(), rel=1e-5)
    with pytest.raises(ValueError, match="divergence"):
        consistency_distillation_loss(a, b, divergence="js")


def _distill_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), max_steps=7, per_device_train_batch_size=4, learning_rate=1e-3,
                  logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                  distill_round_steps=3, distill_num_steps=16, lr_scheduler_type="constant")
    kwargs.update(overrides)
    return DiffusionTrainingArguments(**kwargs)


def _ids_dataset():
    g = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict({"input_ids": torch.randint(0, VOCAB - 1, (64, 7), generator=g).tolist()})


def test_distillation_rounds_refresh_the_teacher_and_double_dt(tmp_path):
    student = tiny_model("duo").train()
    trainer = DuoDistillationTrainer(model=student, args=_distill_args(tmp_path), train_dataset=_ids_dataset())
    assert student.generation_config.num_steps == 8 and student.generation_config.sampler == "greedy_tail"
    assert [trainer.dt(r) for r in range(4)] == [1 / 16, 2 / 16, 4 / 16, 8 / 16]
    refreshes = []
    original = trainer.refresh_teacher

    def spy(unwrapped, round_index):
        original(unwrapped, round_index)
        refreshes.append((trainer.state.global_step, round_index))
        for (name, p), q in zip(unwrapped.named_parameters(), trainer.teacher.parameters()):
            assert torch.equal(p, q) and not q.requires_grad, name

    trainer.refresh_teacher = spy
    trainer.train()
    assert refreshes == [(0, 0), (3, 1), (6, 2)]
    logged = [h for h in trainer.state.log_history if "kl" in h]
    assert len(logged) == 7 and all(math.isfinite(h["kl"]) and h["kl"] >= 0 for h in logged)
    assert [h["dt"] for h in logged] == pytest.approx([1 / 16] * 3 + [2 / 16] * 3 + [4 / 16])
    # the student moved away from the last teacher after the refresh at step 6
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), trainer.teacher.parameters()))


def test_distillation_checkpoint_keeps_the_round_teacher(tmp_path):
    args = _distill_args(tmp_path, max_steps=5, save_strategy="steps", save_steps=4)
    trainer = DuoDistillationTrainer(model=tiny_model("duo").train(), args=args, train_dataset=_ids_dataset())
    trainer.train()
    saved = load_file(tmp_path / "checkpoint-4" / "teacher.safetensors")
    resumed = DuoDistillationTrainer(model=tiny_model("duo", seed=5).train(), args=args, train_dataset=_ids_dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed.teacher_round == 1
    for name, value in resumed.teacher.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_distillation_refuses_rounds_that_reach_dt_one(tmp_path):
    # 7 steps in rounds of 3 with T = 4: round 2 would use dt = 4/4, so s = 0 and the teacher sees the clean data
    args = _distill_args(tmp_path, distill_num_steps=4)
    trainer = DuoDistillationTrainer(model=tiny_model("duo").train(), args=args, train_dataset=_ids_dataset())
    with pytest.raises(ValueError, match=r"round 2 reaches dt = 1 .*distill_num_steps >= 8"):
        trainer.train()


def test_distillation_rejects_a_masked_model(tmp_path):
    with pytest.raises(ValueError, match="DuoDistillationTrainer trains duo or sddlm models, got a 'mdlm' model"):
        DuoDistillationTrainer(model=tiny_model("mdlm"), args=_distill_args(tmp_path))


def test_curriculum_phase_then_elbo(tmp_path):
    from trainers import DuoTrainer

    args = _distill_args(tmp_path, max_steps=6, curriculum_steps=3)
    trainer = DuoTrainer(model=tiny_model("duo").train(), args=args, train_dataset=_ids_dataset())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "curriculum" in h]
    assert [h["curriculum"] for h in logged] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in logged)


def test_curriculum_loss_is_the_elbo_at_the_gaussian_argmax():
    """With tau = 1e-3 the tempered softmax is the one-hot of argmax(w), so the curriculum loss equals the uniform ELBO
    integrand at z_t = argmax(w) with alpha = T(gamma) and alpha' = T'(gamma) dgamma/dt."""
    from trainers import DuoTrainer

    model = tiny_model("duo")
    trainer = DuoTrainer(model=model, args=_distill_args("/tmp/unused-dlm-test", curriculum_steps=5))
    x = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.5, 0.9])
    loss, stats = trainer.curriculum_loss(model, model, x, None, t, torch.Generator().manual_seed(0))
    cfg = model.config
    gamma = cfg.gamma_min + t.double() * (cfg.gamma_max - cfg.gamma_min)
    alpha, dalpha_dgamma = diffusion_transformation(gamma, VOCAB, cfg.gamma_min, cfg.gamma_max)
    eps = torch.randn(3, 7, VOCAB, generator=torch.Generator().manual_seed(0))
    w = torch.sigmoid(-gamma).sqrt()[:, None, None] * torch.nn.functional.one_hot(x, VOCAB) + torch.sigmoid(
        gamma).sqrt()[:, None, None] * eps
    z_t = w.argmax(-1)
    logits = model(input_ids=z_t, sigma=-torch.log(alpha).float()).logits
    dalpha = (dalpha_dgamma * (cfg.gamma_max - cfg.gamma_min)).float()
    expected = model.noise_process.scheduler.nelbo_per_token_from_logits(logits, x, z_t, alpha.float(), dalpha).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert stats["curriculum"].item() == 1.0


@pytest.mark.parametrize(("vocab", "top_k", "tau"), [(6, 5, 1.0), (50, 3, 0.3), (50, 3, 1e-3)])
def test_topk_relaxation_matches_the_dense_tempered_softmax(vocab, top_k, tau):
    """Duo++'s top-k draw gives the same argmax law and the same mean weight on x and on its top entries as the dense
    (B, L, V) tempered softmax; with k = V - 1 nothing is approximated."""
    from trainers.relaxation import gaussian_topk_relaxation

    n, gamma = 20_000, -1.0
    signal = torch.tensor([math.sqrt(torch.sigmoid(torch.tensor(-gamma)).item()) / tau])
    noise = torch.tensor([math.sqrt(torch.sigmoid(torch.tensor(gamma)).item()) / tau])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (1, n), generator=g)
    ids, weights, z_t = gaussian_topk_relaxation(x, signal, noise, vocab, top_k, generator=g)
    assert ids.shape == (1, n, top_k + 1) and bool((ids[..., 0] == x).all())
    assert bool((ids[..., 1:] != x[..., None]).all())
    assert all(len(set(row.tolist())) == top_k + 1 for row in ids[0, :200])  # distinct ids
    assert bool((weights.sum(-1) <= 1 + 1e-5).all())
    eps = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    w = signal.double() * torch.nn.functional.one_hot(x[0], vocab) + noise.double() * eps
    dense = w.softmax(-1)
    tol = 4 * math.sqrt(0.25 / n)
    assert (z_t[0] == x[0]).double().mean().item() == pytest.approx((w.argmax(-1) == x[0]).double().mean().item(),
                                                                    abs=tol)
    assert weights[0, :, 0].double().mean().item() == pytest.approx(dense.gather(-1, x[0][:, None]).mean().item(),
                                                                     abs=tol)
    others = dense.scatter(-1, x[0][:, None], 0.0).topk(top_k, dim=-1).values.sum(-1).mean().item()
    assert weights[0, :, 1:].double().sum(-1).mean().item() == pytest.approx(others, abs=tol)
    if top_k == vocab - 1:
        assert weights.sum(-1).double().mean().item() == pytest.approx(1.0, abs=1e-5)


def test_topk_curriculum_trains_without_a_dense_latent(tmp_path):
    from trainers import DuoTrainer

    args = _distill_args(tmp_path, max_steps=4, curriculum_steps=4, curriculum_top_k=2)
    trainer = DuoTrainer(model=tiny_model("duo").train(), args=args, train_dataset=_ids_dataset())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "curriculum" in h]
    assert len(logged) == 4 and all(h["curriculum"] == 1.0 and math.isfinite(h["loss"]) for h in logged)
