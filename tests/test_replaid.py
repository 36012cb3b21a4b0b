"""RePlaid trained by likelihood (methods.md §C.2-C.3): the learned schedule, the NELBO terms, Plaid's adaptive batch
split, the variance-minimising schedule gradient, the self-conditioning stop-gradients, the output-prior warm-up, the
optimizer's param groups, and a real `RePlaidTrainer` run that learns, stays a bound and resumes exactly.

(The Gaussian posterior against direct conditioning and the prior KL against torch.distributions are in
test_scheduling.py.)"""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch

from modeling_dlm import RePlaidConfig, RePlaidForDiffusionLM
from trainers import DiffusionTrainingArguments, RePlaidTrainer
from trainers.replaid import SPLIT_STATE_NAME, ReconstructionShareCallback, plan_batch, replaid_training_loss

from .conftest import gen, shared_data, tiny_config, tiny_model


F64 = torch.float64
SCHEDULE_SHAPE = ("noise_schedule.W1_raw", "noise_schedule.b1", "noise_schedule.W2_raw")
BOUNDS = ("noise_schedule.gamma_0", "noise_schedule.gamma_1")


@pytest.fixture(autouse=True, scope="module")
def _threads(one_intra_op_thread):
    yield


def ids(b=6, seq=7, vocab=60, seed=1):
    return torch.randint(0, vocab, (b, seq), generator=gen(seed))


def grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def training_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8, learning_rate=3e-3,
                  logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                  lr_scheduler_type="constant")
    kwargs.update(overrides)
    return DiffusionTrainingArguments(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# the learned schedule
# ---------------------------------------------------------------------------------------------------------------------
def test_learned_schedule_monotone_at_init_and_after_perturbation():
    model = RePlaidForDiffusionLM(RePlaidConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, cond_dim=8, schedule_hidden_size=64))
    schedule = model.noise_schedule
    t = torch.linspace(0, 1, 1001, dtype=F64)
    for trial in range(4):
        with torch.no_grad():
            gamma, dgamma = schedule(t)
            shape, dshape = schedule.shape(t)
        assert bool((gamma[1:] > gamma[:-1]).all()) and bool((dgamma > 0).all()), trial
        assert shape[0].item() == pytest.approx(0.0, abs=1e-12) and shape[-1].item() == pytest.approx(1.0, abs=1e-12)
        assert bool((shape >= -1e-12).all()) and bool((shape <= 1 + 1e-12).all())
        g0, g1 = schedule.endpoints()
        torch.testing.assert_close(gamma, g0 + (g1 - g0) * shape)
        torch.testing.assert_close(dgamma, (g1 - g0) * dshape)
        assert gamma[0].item() == pytest.approx(g0.item(), abs=1e-12)
        with torch.no_grad():  # large random moves of every parameter, endpoints included (kept ordered)
            for p in (schedule.W1_raw, schedule.b1, schedule.W2_raw):
                p.add_(3.0 * torch.randn(p.shape, generator=gen(10 + trial)))
            schedule.gamma_0.fill_(-8.0 + trial)
            schedule.gamma_1.fill_(2.0 + 2 * trial)


# ---------------------------------------------------------------------------------------------------------------------
# the NELBO terms
# ---------------------------------------------------------------------------------------------------------------------
def test_nelbo_is_the_sum_of_the_three_terms():
    model = tiny_model("replaid")
    x = ids()
    t = torch.rand(6, generator=gen(2))
    with torch.no_grad():
        terms = model.nelbo_terms(x, t, generator=gen(3))
        total = model.nelbo_per_token(x, t, generator=gen(3))
    assert set(terms) == {"prior", "reconstruction", "diffusion"}
    for value in terms.values():
        assert value.shape == (6, 7) and value.dtype == F64 and bool((value >= 0).all())
    torch.testing.assert_close(total, terms["prior"] + terms["reconstruction"] + terms["diffusion"], rtol=0, atol=0)
    # the training loss's parts add up to it too
    plan = plan_batch(6, num_reconstruction=2, generator=gen(4))
    loss, stats, _ = replaid_training_loss(model, model, x, None, plan, generator=gen(5))
    assert loss.item() == pytest.approx(sum(float(v) for v in stats.values()), rel=1e-6)


@pytest.mark.parametrize("t_value", [0.0, 1e-5, 0.5, 1 - 1e-5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_terms_loss_and_gradients_finite_at_the_edges(t_value, dtype):
    model = tiny_model("replaid").train()
    x = ids(4)
    t = torch.full((4,), t_value)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with torch.no_grad():
            terms = model.nelbo_terms(x, t, generator=gen(0))
        plan = plan_batch(4, num_reconstruction=1, generator=gen(1))
        plan.t = torch.where(plan.reconstruction, 0.0, t_value)
        loss, _, _ = replaid_training_loss(model, model, x, None, plan, generator=gen(2))
    for name, value in terms.items():
        assert bool(torch.isfinite(value).all()), (name, t_value, dtype)
    assert math.isfinite(loss.item())
    for name, g in grads(model, loss).items():
        assert bool(torch.isfinite(g).all()), (name, t_value, dtype)


# ---------------------------------------------------------------------------------------------------------------------
# the adaptive split
# ---------------------------------------------------------------------------------------------------------------------
def test_plan_slices_form_one_global_plan():
    """4 slices (processes x accumulation) of a global batch of 12 with 5 reconstruction entries: exactly 5, the
    diffusion times one evenly spaced grid on [eps, 1], self-conditioning every 4th entry."""
    eps, total, b = 1e-3, 12, 3
    slices = [plan_batch(b, num_reconstruction=5, generator=gen(7), offset=k * b, total=total, eps=eps)
              for k in range(4)]
    recon = torch.cat([p.reconstruction for p in slices])
    t = torch.cat([p.t for p in slices])
    chosen = torch.cat([p.self_conditioning for p in slices])
    assert int(recon.sum()) == 5 and bool((t[recon] == 0).all())
    grid = torch.sort(t[~recon]).values
    gaps = grid[1:] - grid[:-1]
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - eps) / 7), rtol=0, atol=1e-6)
    assert eps <= grid[0] < eps + (1 - eps) / 7 and grid[-1] <= 1
    start = int(chosen.nonzero()[0])
    assert start < 4 and torch.equal(chosen.nonzero().squeeze(-1), torch.arange(start, total, 4))
    assert slices[0].reconstruction_weight == 12 / 5 and slices[0].diffusion_weight == 12 / 7
    # another step (generator state) draws another subset, and bad requests fail clearly
    other = torch.cat([p.reconstruction for p in (plan_batch(b, num_reconstruction=5, generator=gen(8),
                                                             offset=k * b, total=total) for k in range(4))])
    assert not torch.equal(other, recon)
    with pytest.raises(ValueError, match="num_reconstruction"):
        plan_batch(3, num_reconstruction=3, generator=gen(0))


def test_reconstruction_share_from_bias_corrected_moments():
    share = ReconstructionShareCallback(decay=0.997)
    assert share.num_reconstruction(16) == 1  # no statistics yet: std 0 / (0 + 0), clamped to 1 as in Plaid
    rec, diff = torch.tensor([1.0, 3.0], dtype=F64), torch.tensor([0.0, 2.0, 4.0, 10.0], dtype=F64)
    share.accumulate(rec[:1], diff[:2])  # two micro-batches of one step
    share.accumulate(rec[1:], diff[2:])
    share.update()
    std_rec, std_diff = share.stds()  # one update: the bias-corrected EMAs are this step's population moments
    assert std_rec == pytest.approx(rec.std(unbiased=False).item(), rel=1e-9)
    assert std_diff == pytest.approx(diff.std(unbiased=False).item(), rel=1e-9)
    assert share.num_reconstruction(16) == round(16 * std_rec / (std_rec + std_diff))
    state = share.state_dict()
    restored = ReconstructionShareCallback(decay=0.5)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.stds() == share.stds() and restored.decay == 0.997
    loud = ReconstructionShareCallback()
    loud.accumulate(torch.tensor([0.0, 100.0]), torch.tensor([1.0, 1.0]))
    loud.update()
    assert loud.num_reconstruction(8) == 7  # clamped to G - 1


def test_lagged_split_folds_each_step_in_one_step_later():
    """Lag 1 sees the same moments as lag 0, one step later; the pending step survives a checkpoint round trip."""
    exact, lagged = ReconstructionShareCallback(decay=0.9), ReconstructionShareCallback(decay=0.9, lag=1)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(4):
        rec, diff = torch.rand(3, generator=gen, dtype=F64), 5 * torch.rand(5, generator=gen, dtype=F64)
        for share in (exact, lagged):
            share.accumulate(rec, diff)
            share.update()
        history.append((exact.stds(), exact.updates))
        assert lagged.updates == exact.updates - 1
        if len(history) > 1:
            assert lagged.stds() == history[-2][0]
    assert lagged.num_reconstruction(16) != 1  # the lagged moments are live, not the initial split
    restored = ReconstructionShareCallback(decay=0.9, lag=1)
    restored.load_state_dict(json.loads(json.dumps(lagged.state_dict())))
    for share in (restored, lagged):  # the next step folds the saved step in, as the uninterrupted run does
        share.accumulate(torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64))
        share.update()
    assert restored.stds() == lagged.stds() == exact.stds() and restored.updates == exact.updates
    with pytest.raises(ValueError, match="lag must be 0 or 1 steps, got 2"):
        ReconstructionShareCallback(lag=2)


def test_split_estimator_is_unbiased():
    """Over many draws (subset, t, noise), the split estimate's mean matches the all-terms estimate's mean, part by
    part, within 4 standard errors, for a fixed batch of 4 with padding (inverse-inclusion weights). For speed, one
    call evaluates 25 independent draws as 25 copies of the batch (equal token counts: the call's parts are the mean
    of the 25 estimates), and 40 calls give 40 such means per estimator."""
    from trainers.replaid import RePlaidBatchPlan

    model = tiny_model("replaid", self_conditioning=False)
    x = ids(4, 5)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    copies, groups = 25, 40
    means = {"split": [], "all": []}
    with torch.no_grad():
        for group in range(groups):
            for name, n_rec in (("split", 1), ("all", None)):
                plans = [plan_batch(4, num_reconstruction=n_rec, generator=gen(1000 + group * copies + k),
                                    self_conditioning=False) for k in range(copies)]
                plan = RePlaidBatchPlan(
                    t=torch.cat([p.t for p in plans]), self_conditioning=torch.zeros(4 * copies, dtype=torch.bool),
                    reconstruction=None if n_rec is None else torch.cat([p.reconstruction for p in plans]),
                    reconstruction_weight=plans[0].reconstruction_weight, diffusion_weight=plans[0].diffusion_weight)
                _, stats, _ = replaid_training_loss(model, model, x.repeat(copies, 1), mask.repeat(copies, 1), plan,
                                                    generator=gen(5000 + group))
                means[name].append([float(stats[k]) for k in ("prior", "reconstruction", "diffusion")])
    split, full = torch.tensor(means["split"], dtype=F64), torch.tensor(means["all"], dtype=F64)
    split = torch.cat([split, split.sum(-1, keepdim=True)], -1)  # (groups, 4): three parts and the total
    full = torch.cat([full, full.sum(-1, keepdim=True)], -1)
    se = (split.var(0) / groups + full.var(0) / groups).sqrt()
    diff = (split.mean(0) - full.mean(0)).abs()
    assert bool((diff <= 4 * se + 1e-9).all()), (split.mean(0), full.mean(0), se)
    # the comparison has power: a wrong weight (1 instead of 4 or 4/3) would move a part by many standard errors
    assert se[1] < 0.1 * full[:, 1].mean() and se[2] < 0.03 * full[:, 2].mean() and se[3] < 0.03 * full[:, 3].mean()
    # the split's reconstruction part rests on one entry in four: it is the noisier estimate
    assert float(split[:, 1].std()) > float(full[:, 1].std())


def test_trainer_plans_use_the_global_batch_and_fall_back_for_one_entry(tmp_path):
    model = tiny_model("replaid").train()
    trainer = RePlaidTrainer(model=model, args=training_args(tmp_path, gradient_accumulation_steps=2,
                                                             per_device_train_batch_size=3))
    trainer.split.accumulate(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]))
    trainer.split.update()
    n_rec = trainer.split.num_reconstruction(6)
    recon = []
    for micro in range(2):
        plan = trainer.batch_plan(3, "cpu", gen(3), micro)
        assert plan.t.shape == (3,) and plan.num_reconstruction == n_rec
        recon.append(plan.reconstruction)
    assert int(torch.cat(recon).sum()) == n_rec
    single = RePlaidTrainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=1))
    plan = single.batch_plan(1, "cpu", gen(3), 0)
    assert plan.reconstruction is None  # all three terms on the one entry
    loss, stats = single.diffusion_loss(model, model, ids(1), None, plan, gen(4))
    assert math.isfinite(loss.item()) and stats["reconstruction"] > 0 and stats["diffusion"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# the variance-minimising schedule gradient and the self-conditioning stop-gradients
# ---------------------------------------------------------------------------------------------------------------------
def test_schedule_shape_descends_the_second_moment_and_everything_else_the_nelbo():
    """Same draws three times. With the hook, the shape network's gradient equals the gradient of
    sum_rows w_r n_r / N * L_diff_r^2 (brute force), while gamma_0, gamma_1, the embeddings and the network get exactly
    the plain NELBO gradient."""
    model = tiny_model("replaid", self_conditioning=False).train()
    x = ids(6)
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[2, 5:] = 0

    def run(hook):
        plan = plan_batch(6, num_reconstruction=2, generator=gen(11), self_conditioning=False)
        loss, _, rows = replaid_training_loss(model, model, x, mask, plan, generator=gen(12),
                                              schedule_variance_gradient=hook)
        return loss, rows, plan

    hooked = grads(model, run(True)[0])
    plain = grads(model, run(False)[0])
    _, rows, plan = run(False)
    n = mask.sum(-1).double()  # (6,) tokens per entry (one row per entry)
    weight = torch.where(plan.reconstruction, plan.reconstruction_weight, plan.diffusion_weight).double()
    second_moment = (weight * n * (~plan.reconstruction) * rows["diffusion"] ** 2).sum() / n.sum()
    brute = grads(model, second_moment)
    for name in SCHEDULE_SHAPE:
        assert brute[name].abs().sum() > 0, name
        # float32 network: elements where positive and negative terms nearly cancel are compared at the gradient's
        # own scale (absolute 1e-4 of its largest element) rather than relative to themselves
        scale = float(brute[name].abs().max())
        torch.testing.assert_close(hooked[name], brute[name], rtol=1e-4, atol=1e-4 * scale)
        assert not torch.allclose(hooked[name], plain[name], rtol=1e-2), name
    for name, g in plain.items():
        if name not in SCHEDULE_SHAPE:
            torch.testing.assert_close(hooked[name], g, rtol=1e-5, atol=1e-9)
    assert all(plain[name].abs() > 0 for name in BOUNDS)


def test_self_conditioning_entries_train_only_the_network():
    model = tiny_model("replaid").train()
    x = ids(4)
    plan = plan_batch(4, num_reconstruction=1, generator=gen(0))
    plan.self_conditioning = torch.ones(4, dtype=torch.bool)
    loss, _, _ = replaid_training_loss(model, model, x, None, plan, generator=gen(1))
    g = grads(model, loss)
    for name in SCHEDULE_SHAPE + BOUNDS + ("embed_tokens.weight",):
        assert torch.equal(g[name], torch.zeros_like(g[name])), name
    for prefix in ("backbone.", "input_proj.", "self_cond_proj."):  # the network does learn from them
        assert sum(float(v.abs().sum()) for n, v in g.items() if n.startswith(prefix)) > 0, prefix
    # the same draws without self-conditioning: gradients reach the schedule and E, and the loss differs (the
    # self-conditioning pass fed e_hat back)
    plan.self_conditioning = torch.zeros(4, dtype=torch.bool)
    loss_plain, _, _ = replaid_training_loss(model, model, x, None, plan, generator=gen(1))
    g_plain = grads(model, loss_plain)
    assert loss_plain.item() != pytest.approx(loss.item(), rel=1e-6)
    for name in SCHEDULE_SHAPE + BOUNDS + ("embed_tokens.weight",):
        assert g_plain[name].abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------------------
# trainer knobs: output-prior warm-up, param groups, frozen schedule
# ---------------------------------------------------------------------------------------------------------------------
def test_output_prior_warmup(tmp_path):
    model = tiny_model("replaid")
    trainer = RePlaidTrainer(model=model, args=training_args(tmp_path, output_prior_warmup_steps=100, max_steps=300))
    scales = []
    for step in (0, 25, 100, 250):
        trainer.state.global_step = step
        scales.append(trainer.output_prior_scale())
    assert scales == [0.0, 0.25, 1.0, 1.0]
    # the default is a fraction of the run (5%), not Plaid's absolute 5000 steps
    default = RePlaidTrainer(model=model, args=training_args(tmp_path, max_steps=240))
    assert default.output_prior_warmup() == 12
    default.state.global_step = 6
    assert default.output_prior_scale() == 0.5
    default.state.global_step = 120  # mid-run: full weight, as evaluation uses
    assert default.output_prior_scale() == 1.0
    ratio = RePlaidTrainer(model=model, args=training_args(tmp_path, max_steps=1000, output_prior_warmup_ratio=0.2))
    assert ratio.output_prior_warmup() == 200
    # a warm-up as long as the run never reaches the weight evaluation uses: refused
    with pytest.raises(ValueError, match="output_prior_warmup_steps.*max_steps"):
        training_args(tmp_path, output_prior_warmup_steps=6, max_steps=6)
    with pytest.raises(ValueError, match="output_prior_warmup_ratio"):
        training_args(tmp_path, output_prior_warmup_ratio=1.0)
    off = RePlaidTrainer(model=model, args=training_args(tmp_path, output_prior_warmup_steps=0))
    assert off.output_prior_scale() == 1.0
    # the scale weights the analytic logit term linearly
    z = torch.randn(3, 7, model.config.embedding_dim, generator=gen(0))
    t = torch.tensor([0.2, 0.5, 0.8])
    with torch.no_grad():
        base, quarter, full = (model(noisy_embeds=z, t=t, output_prior_scale=s).logits for s in (0.0, 0.25, 1.0))
    torch.testing.assert_close(quarter, base + 0.25 * (full - base), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="output_prior_warmup_steps"):
        training_args(tmp_path, output_prior_warmup_steps=-1)


def test_optimizer_param_groups(tmp_path):
    model = tiny_model("replaid")
    args = training_args(tmp_path, learning_rate=1e-3, weight_decay=0.01, schedule_learning_rate=1e-2,
                         embedding_learning_rate=5e-3, gamma_bounds_weight_decay=0.1)
    optimizer = RePlaidTrainer(model=model, args=args).create_optimizer()
    groups = {g["name"]: g for g in optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert members["schedule"] == set(SCHEDULE_SHAPE) and members["gamma_bounds"] == set(BOUNDS)
    assert members["embeddings"] == {"embed_tokens.weight"}
    assert sum(len(m) for m in members.values()) == len(names)  # every parameter exactly once
    assert optimizer.param_groups[0]["name"] == "network"  # the logged learning rate is the network's
    expected = {"network": (1e-3, 0.01), "network_no_decay": (1e-3, 0.0), "schedule": (1e-2, 0.0),
                "gamma_bounds": (1e-2, 0.1), "embeddings": (5e-3, 0.0)}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == expected
    # None inherits: the schedule and bounds from the network, the bounds' decay from the schedule's
    inherit = training_args(tmp_path, learning_rate=2e-3, weight_decay=0.05, schedule_weight_decay=None,
                            embedding_weight_decay=None)
    groups = {g["name"]: g for g in RePlaidTrainer(model=model, args=inherit).create_optimizer().param_groups}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items() if k != "network_no_decay"} == {
        "network": (2e-3, 0.05), "schedule": (2e-3, 0.05), "gamma_bounds": (2e-3, 0.05), "embeddings": (2e-3, 0.05)}
    # a frozen schedule leaves the optimizer and never moves
    frozen_model = tiny_model("replaid")
    frozen = RePlaidTrainer(model=frozen_model, args=training_args(tmp_path, freeze_schedule=True))
    assert "schedule" not in {g["name"] for g in frozen.create_optimizer().param_groups}
    assert not any(p.requires_grad for p in frozen_model.noise_schedule.parameters())
    with pytest.raises(ValueError, match="schedule_learning_rate"):
        training_args(tmp_path, schedule_learning_rate=-1.0)
    with pytest.raises(ValueError, match="replaid_batch_split"):
        training_args(tmp_path, replaid_batch_split="half")


# ---------------------------------------------------------------------------------------------------------------------
# real training: a bound on a known-entropy source, falling loss on real text, exact resume
# ---------------------------------------------------------------------------------------------------------------------
def test_trained_bound_stays_above_the_entropy_of_an_iid_source(tmp_path):
    """i.i.d. tokens from a known categorical (entropy H nats/token): after brief training the held-out NELBO is at
    least H (within Monte Carlo error) and has fallen well below its untrained value."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=F64)
    entropy = float(-(probs * probs.log()).sum())
    g = gen(0)
    train = torch.multinomial(probs.float(), 1024 * 8, replacement=True, generator=g).view(1024, 8)
    held_out = torch.multinomial(probs.float(), 256 * 8, replacement=True, generator=g).view(256, 8)
    torch.manual_seed(0)
    model = RePlaidForDiffusionLM(RePlaidConfig(vocab_size=6, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, cond_dim=16, max_position_embeddings=8,
                                                hidden_dropout_prob=0.0, embedding_dim=4, schedule_hidden_size=16))

    def bound():
        model.eval()
        with torch.no_grad():
            values = model.nelbo(held_out, num_time_samples=4, generator=gen(1))  # (256,)
        return float(values.mean()), float(values.std() / math.sqrt(len(values)))

    before, _ = bound()
    args = training_args(tmp_path, max_steps=120, per_device_train_batch_size=32, learning_rate=1e-2,
                         schedule_learning_rate=1e-2, embedding_learning_rate=1e-2, output_prior_warmup_steps=20,
                         logging_steps=20)
    RePlaidTrainer(model=model, args=args,
                   train_dataset=datasets.Dataset.from_dict({"input_ids": train.tolist()})).train()
    after, stderr = bound()
    assert after >= entropy - 3 * stderr, (after, stderr, entropy)
    # and it learned: most of the way from the uniform code length log V (where the untrained model sits) to H
    assert before > math.log(6) - 0.05 and after < entropy + 0.3 * (math.log(6) - entropy), (before, after, entropy)


@pytest.fixture(scope="module")
def shakespeare_chars():
    """Tiny Shakespeare as character ids (65 symbols), blocks of 16: real text with a small vocabulary."""
    text = shared_data("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:40_000]
    alphabet = sorted(set(text))
    codes = torch.tensor([alphabet.index(c) for c in text])
    blocks = codes[: len(codes) // 16 * 16].view(-1, 16)
    return datasets.Dataset.from_dict({"input_ids": blocks.tolist()}), len(alphabet)


def char_model(vocab, seed=0):
    torch.manual_seed(seed)
    return RePlaidForDiffusionLM(RePlaidConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, cond_dim=16, max_position_embeddings=16,
                                               hidden_dropout_prob=0.0, schedule_hidden_size=16))


def logged(trainer, key="loss") -> list[float]:
    return [h[key] for h in trainer.state.log_history if "loss" in h and key in h]


def test_trainer_lowers_the_loss_on_real_text_and_resumes_exactly(tmp_path, shakespeare_chars):
    data, vocab = shakespeare_chars
    common = dict(per_device_train_batch_size=16, learning_rate=3e-3, output_prior_warmup_steps=4,
                  schedule_learning_rate=1e-2)
    long = RePlaidTrainer(model=char_model(vocab), args=training_args(tmp_path / "long", max_steps=30, **common),
                          train_dataset=data)
    long.train()
    values = logged(long)
    assert len(values) == 30 and all(math.isfinite(v) for v in values)
    assert sum(values[-6:]) / 6 < sum(values[:6]) / 6 - 0.5, values
    entries = logged(long, "reconstruction_entries")
    assert entries[0] == 1 and all(1 <= e <= 15 for e in entries) and len(set(entries)) > 1  # no statistics at first

    full = RePlaidTrainer(model=char_model(vocab), args=training_args(tmp_path / "full", max_steps=6, **common),
                          train_dataset=data)
    full.train()
    first = RePlaidTrainer(model=char_model(vocab),
                           args=training_args(tmp_path / "part", max_steps=6, save_strategy="steps", save_steps=3,
                                              **common), train_dataset=data)
    first.train()
    checkpoint = tmp_path / "part" / "out" / "checkpoint-3"
    state = json.loads((checkpoint / SPLIT_STATE_NAME).read_text())
    assert state["updates"] == 3
    resumed = RePlaidTrainer(model=char_model(vocab, seed=123),
                             args=training_args(tmp_path / "part", max_steps=6, **common), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert logged(resumed)[-3:] == pytest.approx(logged(full)[-3:], rel=1e-5)
    assert logged(resumed, "reconstruction_entries")[-3:] == logged(full, "reconstruction_entries")[-3:]
    assert resumed.split.updates == full.split.updates == 6
    assert resumed.split.moments == pytest.approx(full.split.moments, rel=1e-6)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    # the saved statistics matter: without them step 4 would start again from one reconstruction entry
    assert ReconstructionShareCallback().num_reconstruction(16) == 1 != logged(full, "reconstruction_entries")[-3]
    assert SPLIT_STATE_NAME in json.loads((checkpoint / "dlm_checkpoint.json").read_text())["files"]


@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (4, 3, 7, 5)])  # (B, L, K, N): a narrower or wider than w
def test_row_stopped_matmul_matches_two_products(shape):
    """`row_stopped_matmul` = where(stop, a @ w.detach(), a @ w): the same value and gradients, one product."""
    from modeling_dlm.functional_dlm import row_stopped_matmul

    B, L, K, N = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, L, K, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(K, N, generator=g, dtype=torch.float64, requires_grad=True)
    stop = torch.tensor([False, True, False, True])
    upstream = torch.randn(B, L, N, generator=g, dtype=torch.float64)
    out = row_stopped_matmul(a, w, stop)
    ga, gw = torch.autograd.grad((out * upstream).sum(), (a, w))
    ref = torch.where(stop[:, None, None], a @ w.detach(), a @ w)
    ra, rw = torch.autograd.grad((ref * upstream).sum(), (a, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gw, rw)
    assert torch.equal(row_stopped_matmul(a, w, torch.zeros(B, dtype=torch.bool)), a @ w)


@pytest.mark.parametrize("embedding_init", ["normal", "unit_norm"])
def test_embedding_init(embedding_init, tmp_path):
    """`embedding_init="unit_norm"` (Plaid) starts every row at norm 1; "normal" draws N(0, initializer_range^2);
    the choice survives save and reload, and the reloaded rows are the saved ones (not re-initialised)."""
    torch.manual_seed(0)
    model = RePlaidForDiffusionLM(tiny_config("replaid", embedding_dim=64, embedding_init=embedding_init))
    norms = model.embed_tokens.weight.norm(dim=-1)
    if embedding_init == "unit_norm":
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    else:
        expected = model.config.initializer_range * 64 ** 0.5
        assert abs(norms.mean().item() - expected) < 0.1 * expected
    model.save_pretrained(tmp_path)
    reloaded = RePlaidForDiffusionLM.from_pretrained(tmp_path)
    assert reloaded.config.embedding_init == embedding_init
    assert torch.equal(reloaded.embed_tokens.weight, model.embed_tokens.weight)
