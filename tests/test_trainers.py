"""Trainers on real text (Tiny Shakespeare, GPT-2 tokenizer) with the real `transformers.Trainer`."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from modeling_dlm import VARIANTS
from trainers import TRAINERS, DiffusionTrainingArguments
from trainers.checkpoints import build_model
from trainers.data import prepare_tokenizer, tokenize_dataset

from .conftest import shared_data


SEQ = 32


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return prepare_tokenizer(AutoTokenizer.from_pretrained(shared_data("tokenizers", "gpt2")), need_mask=True)


@pytest.fixture(scope="module")
def shakespeare(gpt2_tokenizer):
    text = shared_data("tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    lines = [line for line in text.split("\n\n")[:400]]
    raw = datasets.Dataset.from_dict({"text": lines})
    blocks = tokenize_dataset(raw, gpt2_tokenizer, SEQ, "wrap")
    split = blocks.train_test_split(test_size=16, seed=0, shuffle=False)
    return split["train"], split["test"]


def small_model(variant: str, tokenizer, seed: int = 0):
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, cond_dim=16,
                  max_position_embeddings=SEQ, hidden_dropout_prob=0.0)
    if variant == "mdlm":
        kwargs["mask_token_id"] = tokenizer.mask_token_id
    if variant == "replaid":
        kwargs["schedule_hidden_size"] = 16
    return build_model(variant, seed=seed, **kwargs)


def make_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), max_steps=25, per_device_train_batch_size=8,
                  per_device_eval_batch_size=8, learning_rate=3e-3, logging_steps=1, report_to=[],
                  save_strategy="no", eval_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                  lr_scheduler_type="constant")
    kwargs.update(overrides)
    return DiffusionTrainingArguments(**kwargs)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]


@pytest.mark.parametrize("variant", list(TRAINERS))
def test_training_lowers_loss_and_eval_bound(variant, tmp_path, gpt2_tokenizer, shakespeare):
    train, evaluation = shakespeare
    model = small_model(variant, gpt2_tokenizer)
    trainer = TRAINERS[variant](model=model, args=make_args(tmp_path), train_dataset=train, eval_dataset=evaluation)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    values = losses(trainer)
    assert len(values) == 25 and all(math.isfinite(v) for v in values)
    # the SDDLM objective is not a bound (its regularizer is negative); compare its trend, not its level
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5
    for metrics in (before, after):
        assert metrics["eval_loss"] == pytest.approx(metrics["eval_nelbo"])
        assert metrics["eval_ppl_bound"] == pytest.approx(math.exp(metrics["eval_nelbo"]))
        assert metrics["eval_tokens"] == 16 * SEQ
    assert after["eval_nelbo"] < before["eval_nelbo"]
    assert before["eval_nelbo"] > 0.5 * math.log(len(gpt2_tokenizer))


def test_loss_components_are_logged(tmp_path, gpt2_tokenizer, shakespeare):
    train, _ = shakespeare
    trainer = TRAINERS["sddlm"](model=small_model("sddlm", gpt2_tokenizer), args=make_args(tmp_path, max_steps=3),
                                train_dataset=train)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert {"ce", "reg", "nelbo", "corrupted_fraction"} <= set(logged[0])
    # the default collapse hinge is in [0, margin]; the logged loss is CE + lambda R + mu NELBO (mu = 0.1), positive
    assert 0 <= logged[0]["reg"] <= 0.01 < logged[0]["ce"]
    assert logged[0]["nelbo"] > 1.0  # near log V for a barely trained model
    expected = logged[0]["ce"] + logged[0]["reg"] + 0.1 * logged[0]["nelbo"]
    assert logged[0]["loss"] == pytest.approx(expected, rel=1e-3)


def test_input_ids_only_dataset_and_gradient_accumulation(tmp_path, gpt2_tokenizer, shakespeare):
    """A Dataset holding only input_ids trains as is; the logged loss does not scale with accumulation steps."""
    train, _ = shakespeare
    only_ids = datasets.Dataset.from_dict({"input_ids": train["input_ids"]})
    assert only_ids.column_names == ["input_ids"]
    results = {}
    for ga, bs in ((1, 8), (4, 2)):
        args = make_args(tmp_path / f"ga{ga}", max_steps=4, per_device_train_batch_size=bs,
                         gradient_accumulation_steps=ga, learning_rate=1e-9)
        trainer = TRAINERS["duo"](model=small_model("duo", gpt2_tokenizer), args=args, train_dataset=only_ids)
        trainer.train()
        results[ga] = sum(losses(trainer)) / 4
    assert results[4] == pytest.approx(results[1], rel=0.25)


def test_ema_saved_with_checkpoints_used_for_eval_and_export(tmp_path, gpt2_tokenizer, shakespeare):
    train, evaluation = shakespeare
    args = make_args(tmp_path, max_steps=6, ema_decay=0.5, save_strategy="steps", save_steps=3)
    model = small_model("mdlm", gpt2_tokenizer)
    trainer = TRAINERS["mdlm"](model=model, args=args, train_dataset=train, eval_dataset=evaluation)
    trainer.train()
    ema_file = tmp_path / "out" / "checkpoint-6" / "ema.safetensors"
    assert ema_file.is_file() and (tmp_path / "out" / "checkpoint-3" / "ema.safetensors").is_file()
    shadow = load_file(ema_file)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(shadow[n], raw[n]) for n in shadow)
    with_ema = trainer.evaluate()["eval_nelbo"]
    trainer.ema = None
    without_ema = trainer.evaluate()["eval_nelbo"]
    assert with_ema != without_ema
    # evaluation restored the raw weights
    assert all(torch.equal(p, raw[n]) for n, p in model.named_parameters())
    trainer.ema = [cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "shadow")][0]
    trainer.save_model(str(tmp_path / "export"))
    exported = load_file(tmp_path / "export" / "model.safetensors")
    name = "embed_tokens.weight"
    assert torch.allclose(exported[name], trainer.ema.shadow[name])


def test_resume_from_checkpoint_continues_the_same_trajectory(tmp_path, gpt2_tokenizer, shakespeare):
    train, _ = shakespeare
    full = TRAINERS["duo"](model=small_model("duo", gpt2_tokenizer),
                           args=make_args(tmp_path / "full", max_steps=6, ema_decay=0.9), train_dataset=train)
    full.train()
    first = TRAINERS["duo"](model=small_model("duo", gpt2_tokenizer),
                            args=make_args(tmp_path / "part", max_steps=6, ema_decay=0.9, save_strategy="steps",
                                           save_steps=3), train_dataset=train)
    first.train()
    checkpoint = tmp_path / "part" / "out" / "checkpoint-3"
    resumed = TRAINERS["duo"](model=small_model("duo", gpt2_tokenizer, seed=123),
                              args=make_args(tmp_path / "part", max_steps=6, ema_decay=0.9), train_dataset=train)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert losses(resumed)[-3:] == pytest.approx(losses(full)[-3:], rel=1e-5)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    for name, value in full.ema.shadow.items():
        assert torch.allclose(value, resumed.ema.shadow[name], atol=1e-6), name


def test_trainer_rejects_a_non_diffusion_model_and_wrong_args(tmp_path, gpt2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    with pytest.raises(TypeError, match="dlm diffusion model"):
        TRAINERS["duo"](model=llama, args=make_args(tmp_path))
    with pytest.raises(TypeError, match="DiffusionTrainingArguments"):
        TRAINERS["duo"](model=small_model("duo", gpt2_tokenizer),
                        args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    with pytest.raises(ValueError, match="sampling_eps"):
        make_args(tmp_path, sampling_eps=1.5)
    with pytest.raises(ValueError, match="ema_decay"):
        make_args(tmp_path, ema_decay=1.0)


def test_antithetic_times_cover_the_global_batch(tmp_path, gpt2_tokenizer):
    """Ranks x accumulation micro-batches draw disjoint slices of one evenly spaced grid."""
    trainer = TRAINERS["duo"](model=small_model("duo", gpt2_tokenizer),
                              args=make_args(tmp_path, gradient_accumulation_steps=2, sampling_eps=0.0))
    ts = []
    for micro in range(2):
        shared = torch.Generator().manual_seed(7)
        ts.append(trainer.sample_times(4, "cpu", shared, micro))
    grid = torch.sort(torch.cat(ts)).values
    gaps = grid[1:] - grid[:-1]
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 8), atol=1e-6)


def test_metrics_are_json_serialisable(tmp_path, gpt2_tokenizer, shakespeare):
    _, evaluation = shakespeare
    trainer = TRAINERS["replaid"](model=small_model("replaid", gpt2_tokenizer), args=make_args(tmp_path),
                                  eval_dataset=evaluation)
    metrics = trainer.evaluate()
    json.dumps(metrics)
    assert math.isfinite(metrics["eval_nelbo"]) and metrics["eval_bpd"] == pytest.approx(
        metrics["eval_nelbo"] / math.log(2))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sddlm", "mdlm"])
def test_bound_falls_well_below_log_v_on_real_text(variant, tmp_path, gpt2_tokenizer):
    """Trainer API: 80 steps on Tiny Shakespeare take the eval bound from about log V to well below it."""
    text = shared_data("tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    raw = datasets.Dataset.from_dict({"text": text.split("\n\n")[:1500]})
    blocks = tokenize_dataset(raw, gpt2_tokenizer, SEQ, "wrap").train_test_split(test_size=32, seed=0, shuffle=False)
    model = small_model(variant, gpt2_tokenizer)
    args = make_args(tmp_path, max_steps=80, logging_steps=40, per_device_train_batch_size=8)
    trainer = TRAINERS[variant](model=model, args=args, train_dataset=blocks["train"], eval_dataset=blocks["test"])
    before = trainer.evaluate()["eval_nelbo"]
    trainer.train()
    after = trainer.evaluate()["eval_nelbo"]
    log_v = math.log(len(gpt2_tokenizer))
    assert before > log_v - 1.0
    assert after < log_v - 2.0, (variant, before, after, log_v)


def test_sddlm_loss_pure_function():
    from trainers.sddlm import sddlm_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    x0 = torch.randint(0, 11, (2, 6), generator=g)
    positions = torch.zeros(2, 6, dtype=torch.bool)
    positions[0, 1] = positions[1, 4] = True
    probs = logits.softmax(-1)
    for regularizer, weight in (("none", 1.0), ("mean", 0.5)):
        loss, stats = sddlm_loss(logits, x0, positions, regularizer=regularizer, regularizer_weight=weight, eps=0.0)
        picked = [(0, 1), (1, 4)]
        ce = sum(-math.log(probs[b, l, x0[b, l]].item()) for b, l in picked) / 2
        reg = sum(probs[b, l].log().mean().item() for b, l in picked) / 2 if regularizer == "mean" else 0.0
        assert loss.item() == pytest.approx(ce + weight * reg, rel=1e-5)
        assert stats["corrupted_fraction"].item() == pytest.approx(2 / 12)
    # only the corrupted positions receive gradient
    loss, _ = sddlm_loss(logits, x0, positions, regularizer="mean")
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, positions)
    # sampled negatives: an unbiased estimate of the mean form
    many = torch.stack([sddlm_loss(logits, x0, positions, regularizer="sampled", num_negative_samples=64,
                                   generator=g)[1]["reg"] for _ in range(50)]).mean()
    exact = sddlm_loss(logits, x0, positions, regularizer="mean")[1]["reg"]
    assert many.item() == pytest.approx(exact.item(), abs=0.05)
    # nothing corrupted: a zero loss that still reaches the graph
    zero, _ = sddlm_loss(logits, x0, torch.zeros_like(positions))
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="regularizer"):
        sddlm_loss(logits, x0, positions, regularizer="contrastive")


def tiny_discrete(variant: str, vocab: int = 29, **overrides):
    """A seeded one-layer model of a discrete variant on sequences of 12 tokens (MDLM's mask id: vocab - 1)."""
    extra = {"mask_token_id": vocab - 1} if variant == "mdlm" else {}
    return build_model(variant, seed=0, vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       cond_dim=16, max_position_embeddings=12, hidden_dropout_prob=0.0, **extra, **overrides)


@pytest.mark.parametrize("variant", ["mdlm", "duo", "sddlm"])
def test_training_and_nelbo_compute_one_bound(variant, tmp_path):
    """The Trainer's bound and `model.nelbo_per_token` run one code path (`noised_forward`, then the process's
    `nelbo_per_token`): for the same x, t and noise they give the same numbers, bit for bit."""
    model = tiny_discrete(variant)
    ids = torch.randint(0, 28, (4, 12), generator=torch.Generator().manual_seed(3))
    trainer = TRAINERS[variant](model=model, args=make_args(tmp_path),
                                train_dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}))
    t = torch.tensor([0.02, 0.3, 0.6, 0.97])
    loss, stats = trainer.diffusion_loss(model, model, ids, None, t, torch.Generator().manual_seed(7))
    with torch.no_grad():
        bound = model.nelbo_per_token(ids, t, generator=torch.Generator().manual_seed(7)).mean()
    assert torch.equal(stats["nelbo"], bound)
    if variant != "sddlm":  # the bound is the objective (SDDLM's is the simple loss plus 0.1 of it)
        assert torch.equal(loss.detach(), bound)
    assert bound.item() > 0.5


def test_replaid_training_and_nelbo_compute_one_bound(tmp_path):
    """RePlaid's training loss with the all-terms plan (every entry trains prior, reconstruction and diffusion) is the
    model's three-term bound for the same x, t and noise. The trainer draws the noise of its 2B rows (reconstruction
    rows, then diffusion rows) in one call, the bound in two (z_0, then z_t): with B L d_e a multiple of 16 the
    generator's stream is the same, which the test checks first."""
    from .conftest import tiny_model

    B, L, d_e = 4, 12, 16
    g = torch.Generator().manual_seed(7)
    one = torch.randn(2 * B, L, d_e, generator=g)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(one, torch.cat([torch.randn(B, L, d_e, generator=g), torch.randn(B, L, d_e, generator=g)]))
    model = tiny_model("replaid", randomize=False, embedding_dim=d_e, self_conditioning=False,
                       max_position_embeddings=L)
    ids = torch.randint(0, 60, (B, L), generator=torch.Generator().manual_seed(3))
    trainer = TRAINERS["replaid"](model=model, args=make_args(tmp_path, replaid_batch_split="all_terms"),
                                  train_dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}))
    t = torch.tensor([0.02, 0.3, 0.6, 0.97])
    with torch.no_grad():
        loss, stats = trainer.diffusion_loss(model, model, ids, None, t, torch.Generator().manual_seed(7))
        terms = model.nelbo_terms(ids, t, generator=torch.Generator().manual_seed(7))
        bound = model.nelbo_per_token(ids, t, generator=torch.Generator().manual_seed(7)).mean()
    for name in ("prior", "reconstruction", "diffusion"):
        torch.testing.assert_close(stats[name].double(), terms[name].mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), bound, rtol=1e-6, atol=0)
    assert bound.item() > 1.0


@pytest.mark.parametrize("variant", ["mdlm", "duo", "sddlm"])
def test_token_ids_are_range_checked_on_the_first_training_batch_only(variant, tmp_path, monkeypatch):
    """The id range check costs a host sync: the Trainer runs it once, on the first batch, and the training steps'
    forwards skip it (they see only the process's draws from checked ids); bad ids in that batch still fail clearly."""
    import modeling_dlm.modeling_dlm as modeling
    import trainers.base as base

    calls = []
    real = base.check_token_ids

    def counting(ids, vocab_size, name):
        calls.append(tuple(ids.shape))
        return real(ids, vocab_size, name)

    monkeypatch.setattr(base, "check_token_ids", counting)
    monkeypatch.setattr(modeling, "check_token_ids", counting)
    model = tiny_discrete(variant)
    ids = torch.randint(0, 28, (16, 12), generator=torch.Generator().manual_seed(3))
    trainer = TRAINERS[variant](model=model, args=make_args(tmp_path, max_steps=4, per_device_train_batch_size=4),
                                train_dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}))
    trainer.train()
    assert calls == [(4, 12)], calls  # 4 steps, one check
    bad = ids.clone()
    bad[:, 0] = 29  # every row: whichever rows the first batch draws
    trainer = TRAINERS[variant](model=model, args=make_args(tmp_path / "bad", max_steps=1),
                                train_dataset=datasets.Dataset.from_dict({"input_ids": bad.tolist()}))
    with pytest.raises(ValueError, match=r"token ids outside \[0, 29\)"):
        trainer.train()
    from trainers.evaluation import evaluate_likelihood  # `dlm eval`'s loop checks every batch

    with pytest.raises(ValueError, match=r"token ids outside \[0, 29\)"):
        evaluate_likelihood(model.eval(), [{"input_ids": row} for row in bad.tolist()], batch_size=4)


@pytest.mark.parametrize("regularizer", ["hinge", "none", "sampled"])
def test_sddlm_hybrid_adds_the_uniform_nelbo_of_the_same_draw(regularizer, tmp_path):
    """elbo_weight = mu adds mu times the uniform-state NELBO of the same z_t and logits: the difference to the simple
    loss is mu * NELBO, and that NELBO is the model's own `nelbo_per_token` on the same noise draw."""
    from trainers.sddlm import SDDLMTrainer

    model = tiny_discrete("sddlm", elbo_weight=0.5, regularizer=regularizer)
    ids = torch.randint(0, 29, (4, 12), generator=torch.Generator().manual_seed(3))
    trainer = SDDLMTrainer(model=model, args=make_args(tmp_path),
                           train_dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}))
    t = torch.tensor([0.02, 0.3, 0.6, 0.97])
    hybrid, stats = trainer.diffusion_loss(model, model, ids, None, t, torch.Generator().manual_seed(7))
    model.config.elbo_weight = 0.0
    simple, simple_stats = trainer.diffusion_loss(model, model, ids, None, t, torch.Generator().manual_seed(7))
    assert "nelbo" not in simple_stats
    nelbo = model.nelbo_per_token(ids, t, generator=torch.Generator().manual_seed(7)).mean()
    assert stats["nelbo"].item() == pytest.approx(nelbo.item(), rel=1e-5)
    assert hybrid.item() == pytest.approx(simple.item() + 0.5 * nelbo.item(), rel=1e-5)
    assert stats["nelbo"].item() > 0.5  # an untrained model: the bound is near log V, far from 0
    with pytest.raises(ValueError, match=r"`elbo_weight` must be >= 0, got -1"):
        VARIANTS["sddlm"][0](elbo_weight=-1.0)


def test_one_fused_pass_gives_the_bound_and_the_regulariser_terms():
    """`nelbo_and_log_terms` (two affine sums from one softmax) equals the two separate fused calls, in value and
    gradient (float64)."""
    from modeling_dlm.scheduling_uniform import UniformStateScheduler, softmax_log_affine_terms

    V, eps = 23, 1e-3
    sched = UniformStateScheduler(V)
    g = torch.Generator().manual_seed(4)
    logits = (3 * torch.randn(3, 5, V, generator=g, dtype=torch.float64)).requires_grad_()
    x0 = torch.randint(0, V, (3, 5), generator=g)
    z_t = torch.where(torch.rand(3, 5, generator=g) < 0.5, torch.randint(0, V, (3, 5), generator=g), x0)
    alpha = torch.tensor([0.02, 0.5, 0.97], dtype=torch.float64)
    dalpha = torch.full((3,), -(1 - 1e-3), dtype=torch.float64)
    w = torch.randn(3, 3, 5, generator=g, dtype=torch.float64)  # random cotangents for the three outputs
    nelbo, S, log_p_x = sched.nelbo_and_log_terms(logits, x0, z_t, alpha, dalpha, eps=eps, dtype=torch.float64)
    (grad,) = torch.autograd.grad((w[0] * nelbo + w[1] * S + w[2] * log_p_x).sum(), logits)
    ref_nelbo = sched.nelbo_per_token_from_logits(logits, x0, z_t, alpha, dalpha, dtype=torch.float64)
    ones = torch.ones(3, 5, dtype=torch.float64)
    ref_S, ref_log_p_x, _ = softmax_log_affine_terms(logits, x0, x0, ones, torch.full_like(ones, eps))
    (ref_grad,) = torch.autograd.grad((w[0] * ref_nelbo + w[1] * ref_S + w[2] * ref_log_p_x).sum(), logits)
    torch.testing.assert_close(nelbo, ref_nelbo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, ref_S, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_p_x, ref_log_p_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    only, none, only_log_p_x = sched.nelbo_and_log_terms(logits, x0, z_t, alpha, dalpha, eps=None, dtype=torch.float64)
    assert none is None
    torch.testing.assert_close(only, ref_nelbo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(only_log_p_x, ref_log_p_x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("regularizer", ["mean", "sampled", "none"])
def test_sddlm_loss_matches_the_plain_autograd_chain(regularizer):
    """The fused / logsumexp forms give the value and gradient of the direct softmax chain (the loss works in float32;
    the reference chain here in float64)."""
    from trainers.sddlm import sddlm_loss

    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(3, 5, 23, generator=g, dtype=torch.float64)).requires_grad_()
    x0 = torch.randint(0, 23, (3, 5), generator=g)
    positions = torch.rand(3, 5, generator=g) < 0.6
    eps, weight = 1e-3, 0.7
    loss, stats = sddlm_loss(logits, x0, positions, regularizer=regularizer, regularizer_weight=weight, eps=eps,
                             num_negative_samples=4, generator=torch.Generator().manual_seed(5))
    (grad,) = torch.autograd.grad(loss, logits)
    probs = logits.softmax(-1)
    ce = -torch.log(probs.gather(-1, x0[..., None]).squeeze(-1) + eps)
    if regularizer == "mean":
        reg = torch.log(probs + eps).mean(-1)
    elif regularizer == "sampled":
        negatives = torch.randint(0, 23, (3, 5, 4), generator=torch.Generator().manual_seed(5))
        reg = torch.log(probs.gather(-1, negatives) + eps).mean(-1)
    else:
        reg = torch.zeros_like(ce)
    m = positions.double()
    expected = ((ce + weight * reg) * m).sum() / m.sum()
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert stats["ce"].item() == pytest.approx(((ce * m).sum() / m.sum()).item(), rel=1e-5)


@pytest.mark.parametrize("row_selection", ["select", "fixed", "auto"])
def test_mdlm_loss_on_masked_rows_matches_the_full_log_softmax(row_selection):
    """`nelbo_per_token_from_logits` (cross-entropy on the masked rows: selected, or all rows with fixed shapes)
    equals the SUBS log-softmax chain over all rows, in value and gradient, including the mask column's zero
    gradient."""
    from modeling_dlm.noise_schedules import LogLinearSchedule
    from modeling_dlm.scheduling_absorbing import AbsorbingStateScheduler

    V, mask = 19, 18
    sched = AbsorbingStateScheduler(V, mask)
    sched.row_selection = row_selection
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, V - 1, (3, 6), generator=g)
    t = torch.tensor([0.05, 0.5, 0.97], dtype=torch.float64)
    schedule = LogLinearSchedule(1e-3)
    alpha, dalpha = schedule.alpha(t), schedule.dalpha_dt(t)
    z_t, _ = sched.add_noise(x0, alpha, generator=g)
    assert (z_t == mask).any() and (z_t != mask).any()
    logits = (2 * torch.randn(3, 6, V, generator=g, dtype=torch.float64)).requires_grad_()
    weights = torch.randn(3, 6, generator=g, dtype=torch.float64)
    fused = sched.nelbo_per_token_from_logits(logits, x0, z_t, alpha, dalpha, dtype=torch.float64)
    no_mask = logits.masked_fill(torch.arange(V) == mask, float("-inf")).log_softmax(-1)  # SUBS in float64
    chain = sched.nelbo_per_token(no_mask, x0, z_t, alpha, dalpha, dtype=torch.float64)
    (g_fused,) = torch.autograd.grad((fused * weights).sum(), logits)
    (g_chain,) = torch.autograd.grad((chain * weights).sum(), logits)
    torch.testing.assert_close(fused, chain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fused, g_chain, rtol=1e-10, atol=1e-12)
    assert g_fused[..., mask].abs().max() == 0
    nothing = sched.nelbo_per_token_from_logits(logits, x0, x0, alpha, dalpha)  # t ~ 0: no masked position
    assert nothing.abs().max() == 0 and nothing.requires_grad


def test_unigram_entropy():
    from trainers.evaluation import unigram_entropy

    assert unigram_entropy(torch.tensor([[3, 3, 3, 3]])) == 0.0
    expected = (math.log(4) + math.log(2)) / 2
    assert unigram_entropy(torch.tensor([[0, 1, 2, 3], [5, 5, 6, 6]])) == pytest.approx(expected)


def test_ema_warmup_follows_the_standard_rule_and_survives_save_and_load(tmp_path):
    """decay_n = min(decay, (1 + n) / (10 + n)): with ema_decay = 0.9999 the average tracks a moving model within a
    few dozen updates instead of staying at its initial weights; the count is saved with the shadow."""
    from trainers.callbacks import EMACallback

    model = torch.nn.Linear(3, 2)
    ema = EMACallback(0.9999)
    ema.initialize(model)
    start = model.weight.detach().clone()
    decays = []
    for _ in range(200):
        decays.append(ema.current_decay())
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
    assert decays[:3] == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert all(d <= 0.9999 for d in decays) and decays[-1] == pytest.approx(200 / 209)
    # the weights moved by 200 on a ramp; the warmed-up average lags them by ~20 steps, not by ~200
    gap = float((model.weight.detach() - ema.shadow["weight"]).abs().max())
    assert gap < 25 and float((ema.shadow["weight"] - start).abs().min()) > 170
    plain_model = torch.nn.Linear(3, 2)
    plain = EMACallback(0.9999, warmup=False)
    plain.initialize(plain_model)
    assert plain.current_decay() == 0.9999
    for _ in range(200):
        with torch.no_grad():
            plain_model.weight.add_(1.0)
        plain.update(plain_model)
    assert float((plain_model.weight.detach() - plain.shadow["weight"]).abs().min()) > 195  # still at the start
    ema.save(tmp_path)
    again = EMACallback(0.9999)
    assert again.load(tmp_path) and again.num_updates == 200
    assert again.current_decay() == ema.current_decay()


def test_a_trainer_refuses_a_model_of_another_variant(tmp_path, gpt2_tokenizer):
    """An SDDLMTrainer given a Duo model would train Duo with SDDLM's loss and say nothing: a clear error instead."""
    duo = small_model("duo", gpt2_tokenizer)
    with pytest.raises(ValueError, match=r"SDDLMTrainer trains sddlm models, got a 'duo' model.*TRAINERS\['duo'\]"):
        TRAINERS["sddlm"](model=duo, args=make_args(tmp_path))
    with pytest.raises(ValueError, match="MDLMTrainer trains mdlm models, got a 'sddlm' model"):
        TRAINERS["mdlm"](model=small_model("sddlm", gpt2_tokenizer), args=make_args(tmp_path))
    assert type(TRAINERS["duo"](model=duo, args=make_args(tmp_path))).__name__ == "DuoTrainer"
