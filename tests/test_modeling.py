"""Tests for the dlm configs, models and samplers (modeling_dlm/): tiny odd-sized configs on CPU.

Configs: validation and round trips. Models: forward paths, zero init, time conditioning, padding, attention
backends, gradients, activation checkpointing, save/load (also through the Auto classes with remote code). NELBO:
shape, sign, seeding, variance reduction, argument checks, padding. Generation: every variant and sampler, prompts,
infilling, streamers, argument checks, progress bar, and a forced-denoiser "mock model" that pins down the samplers'
final step and their number of network calls. `filter_logits` against direct computations.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, GenerationConfig

from modeling_dlm import (
    VARIANTS,
    DiffusionGenerateOutput,
    DuoGenerationConfig,
    MDLMConfig,
    MDLMGenerationConfig,
    RePlaidGenerationConfig,
    SDDLMGenerationConfig,
    modeling_dit,
)
from modeling_dlm.generation_dlm import filter_logits

from .conftest import BATCH, HIDDEN, SEQ, VOCAB, gen, tiny_config, tiny_model


DISCRETE = ["sddlm", "duo", "mdlm"]
UNIFORM = ["sddlm", "duo"]
# Duo plugs the network's softmax into the ELBO and the sampler unchanged; SDDLM may mix in a carry-over term
# (its config's denoiser option), so exact expectations about x_hat-driven outputs are stated for Duo and MDLM.
RAW_DENOISER = ["duo", "mdlm"]
GENERATION_CONFIGS = {"sddlm": SDDLMGenerationConfig, "duo": DuoGenerationConfig, "mdlm": MDLMGenerationConfig,
                      "replaid": RePlaidGenerationConfig}
SHIPPED_FILES = {"configuration_dlm.py", "modeling_dlm.py", "modeling_dit.py", "generation_dlm.py",
                 "noise_schedules.py", "scheduling_uniform.py", "scheduling_absorbing.py", "scheduling_gaussian.py"}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def logits_of(model, variant: str, ids: torch.Tensor, attention_mask=None, seed: int = 0) -> torch.Tensor:
    """Logits at a fixed, non-trivial noise level (and, for RePlaid, a fixed noisy latent and self-conditioning)."""
    B, L = ids.shape
    with torch.no_grad():
        if variant == "replaid":
            d_e = model.config.embedding_dim
            t = torch.linspace(0.2, 0.8, B)
            z = torch.randn(B, L, d_e, generator=gen(seed))
            self_cond = torch.randn(B, L, d_e, generator=gen(seed + 1))
            return model(noisy_embeds=z, t=t, self_cond=self_cond, attention_mask=attention_mask).logits
        sigma = torch.linspace(0.1, 2.0, B)
        return model(input_ids=ids, sigma=sigma, attention_mask=attention_mask).logits


def count_calls(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    return calls, module.register_forward_hook(hook)


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------
def test_config_round_trip(variant, tmp_path):
    config = tiny_config(variant, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    config.save_pretrained(tmp_path)
    expected = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # the load path is recorded
    loaded = VARIANTS[variant][0].from_pretrained(tmp_path)
    assert type(loaded) is type(config)
    assert {k: v for k, v in loaded.to_dict().items() if k != "_name_or_path"} == expected
    assert loaded.intermediate_size == 4 * HIDDEN and loaded.head_dim == HIDDEN // 4
    via_auto = AutoConfig.from_pretrained(tmp_path)
    assert type(via_auto).__name__ == type(config).__name__
    assert {k: v for k, v in via_auto.to_dict().items() if k != "_name_or_path"} == expected


def test_model_types_unique_and_registered():
    types = [config_class.model_type for config_class, _ in VARIANTS.values()]
    assert types == list(VARIANTS) and len(set(types)) == len(types)
    assert all(model_class.config_class is config_class for config_class, model_class in VARIANTS.values())


def test_mdlm_mask_token_default():
    assert MDLMConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4).mask_token_id == VOCAB - 1
    assert tiny_config("mdlm", mask_token_id=5).mask_token_id == 5
    assert tiny_config("mdlm").time_conditioning is False
    assert tiny_config("sddlm").mask_token_id is None


INVALID_CONFIGS = [
    ("sddlm", {"hidden_size": 30}, "hidden_size"),
    ("duo", {"hidden_size": 36}, "head dimension"),  # 36 / 4 heads = 9, odd: no rotary split
    ("mdlm", {"num_attention_heads": 0}, "num_attention_heads"),
    ("replaid", {"vocab_size": 1}, "vocab_size"),
    ("sddlm", {"noise_schedule": "linear"}, "noise_schedule"),
    ("mdlm", {"schedule_eps": 0.0}, "schedule_eps"),
    ("duo", {"schedule_eps": 1.0}, "schedule_eps"),
    ("sddlm", {"schedule_eps": -0.1}, "schedule_eps"),
    ("sddlm", {"pad_token_id": VOCAB}, "pad_token_id"),
    ("duo", {"bos_token_id": -1}, "bos_token_id"),
    ("replaid", {"eos_token_id": 100}, "eos_token_id"),
    ("mdlm", {"mask_token_id": VOCAB}, "mask_token_id"),
    ("mdlm", {"hidden_dropout_prob": 1.0}, "hidden_dropout_prob"),
    ("sddlm", {"regularizer": "l2"}, "regularizer"),
    ("sddlm", {"loss_mask": "all"}, "loss_mask"),
    ("sddlm", {"num_negative_samples": 0}, "num_negative_samples"),
    ("duo", {"gamma_min": -1.0, "gamma_max": -2.0}, "gamma_min"),
    ("duo", {"gamma_min": -1.5, "gamma_max": -1.5}, "gamma_max"),
    ("replaid", {"time_input": "sigma"}, "time_input"),
    ("replaid", {"gamma_0": 6.0, "gamma_1": -3.0}, "gamma_0"),
    ("replaid", {"embedding_dim": 0}, "embedding_dim"),
    ("replaid", {"embedding_init": "xavier"}, "embedding_init"),
    ("sddlm", {"time_conditioning": False}, "time_conditioning"),
    ("duo", {"time_conditioning": False}, "time_conditioning"),
]


@pytest.mark.parametrize("variant_name,overrides,name", INVALID_CONFIGS,
                         ids=[f"{v}-{'-'.join(o)}" for v, o, _ in INVALID_CONFIGS])
def test_config_rejects_invalid_values(variant_name, overrides, name):
    with pytest.raises(ValueError, match=name):
        tiny_config(variant_name, **overrides)


def test_time_conditioning_off_allowed_where_valid():
    assert tiny_config("mdlm", time_conditioning=True).time_conditioning is True
    assert tiny_config("replaid", time_conditioning=False).time_conditioning is False


# ---------------------------------------------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------------------------------------------
def test_forward_shapes(variant, batch):
    model = tiny_model(variant)
    logits = logits_of(model, variant, batch)
    assert logits.shape == (BATCH, SEQ, VOCAB) and logits.dtype == torch.float32
    assert bool(torch.isfinite(logits).all())
    with torch.no_grad():
        out = model(input_ids=batch, output_hidden_states=True)
        assert out.logits.shape == (BATCH, SEQ, VOCAB)
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        assert all(h.shape == (BATCH, SEQ, HIDDEN) for h in out.hidden_states)
        as_tuple = model(input_ids=batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)


@pytest.mark.parametrize("variant_name", DISCRETE)
def test_discrete_input_paths_agree(variant_name, batch):
    model = tiny_model(variant_name)
    sigma = torch.tensor([0.1, 1.0, 3.0])
    with torch.no_grad():
        by_ids = model(input_ids=batch, sigma=sigma).logits
        by_weights = model(token_weights=F.one_hot(batch, VOCAB).float(), sigma=sigma).logits
        by_embeds = model(inputs_embeds=model.embed_tokens(batch), sigma=sigma).logits
        scalar_sigma = model(input_ids=batch, sigma=torch.tensor(1.0)).logits
        full_sigma = model(input_ids=batch, sigma=torch.ones(BATCH)).logits
    torch.testing.assert_close(by_weights, by_ids, rtol=0, atol=1e-5)
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=1e-5)
    torch.testing.assert_close(scalar_sigma, full_sigma, rtol=0, atol=0)
    # soft weights embed as the weighted mean of the rows of E
    soft = torch.rand(BATCH, SEQ, VOCAB, generator=gen(0)).softmax(-1)
    with torch.no_grad():
        torch.testing.assert_close(model(token_weights=soft, sigma=sigma).logits,
                                   model(inputs_embeds=soft @ model.embed_tokens.weight, sigma=sigma).logits)
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=batch, token_weights=F.one_hot(batch, VOCAB).float())
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="token_weights"):
        model(token_weights=torch.ones(BATCH, SEQ, VOCAB - 1))
    with pytest.raises(ValueError, match="sigma"):
        model(input_ids=batch, sigma=torch.ones(BATCH + 1))


def test_replaid_input_paths_agree(batch):
    model = tiny_model("replaid")
    t = torch.tensor([0.0, 0.3, 0.9])
    with torch.no_grad():
        gamma, _ = model.noise_schedule(t)
        alpha = torch.sigmoid(-gamma).sqrt().float()
        by_ids = model(input_ids=batch, t=t).logits
        by_latent = model(noisy_embeds=alpha[:, None, None] * model.normalized_embeddings()[batch], t=t).logits
    torch.testing.assert_close(by_latent, by_ids, rtol=1e-5, atol=1e-5)
    norms = model.normalized_embeddings().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(VOCAB))
    with pytest.raises(ValueError, match="t"):
        model(input_ids=batch, t=torch.tensor([0.0, 0.5, 1.5]))
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=batch, noisy_embeds=torch.zeros(BATCH, SEQ, model.config.embedding_dim))


@pytest.mark.parametrize("variant_name", DISCRETE)
def test_default_init_gives_zero_logits(variant_name, batch):
    """adaLN-Zero and a zero final layer: an untrained discrete model predicts uniform (all-zero) logits."""
    model = VARIANTS[variant_name][1](tiny_config(variant_name)).eval()
    with torch.no_grad():
        logits = model(input_ids=batch, sigma=torch.tensor([0.5, 1.0, 2.0])).logits
    assert torch.equal(logits, torch.zeros_like(logits))
    assert model.embed_tokens.weight.std() > 0  # the rest is randomly initialised
    assert model.backbone.blocks[0].attn.attn_qkv.weight.std() > 0
    assert torch.equal(model.backbone.blocks[0].adaLN_modulation.weight,
                       torch.zeros_like(model.backbone.blocks[0].adaLN_modulation.weight))


def test_replaid_default_init_logits_are_the_output_prior(batch):
    """At init the DiT contributes zero, so RePlaid's logits are exactly the analytic term (alpha/sigma^2) <z, E_v>."""
    model = VARIANTS["replaid"][1](tiny_config("replaid")).eval()
    schedule = model.noise_schedule
    assert schedule.gamma_0.item() == -3.0 and schedule.gamma_1.item() == 6.0
    t = torch.tensor([0.1, 0.5, 0.9])
    z = torch.randn(BATCH, SEQ, model.config.embedding_dim, generator=gen(0))
    with torch.no_grad():
        logits = model(noisy_embeds=z, t=t).logits
        gamma, _ = schedule(t)
        prior = (torch.sigmoid(-gamma).sqrt() / torch.sigmoid(gamma)).float()[:, None, None] * (
            z @ model.normalized_embeddings().T)
        torch.testing.assert_close(logits, prior, rtol=1e-5, atol=1e-5)
        no_prior = model(noisy_embeds=z, t=t, output_prior_scale=0.0).logits
    assert torch.equal(no_prior, torch.zeros_like(no_prior))


@pytest.mark.parametrize("variant_name", UNIFORM)
def test_sigma_changes_outputs_with_time_conditioning(variant_name, batch):
    model = tiny_model(variant_name)
    with torch.no_grad():
        a = model(input_ids=batch, sigma=torch.full((BATCH,), 0.1)).logits
        b = model(input_ids=batch, sigma=torch.full((BATCH,), 2.0)).logits
    assert (a - b).abs().max() > 1e-3


def test_mdlm_ignores_sigma_without_time_conditioning(batch):
    model = tiny_model("mdlm")
    with torch.no_grad():
        a = model(input_ids=batch, sigma=torch.full((BATCH,), 0.1)).logits
        b = model(input_ids=batch, sigma=torch.full((BATCH,), 2.0)).logits
        c = model(input_ids=batch).logits
    assert torch.equal(a, b) and torch.equal(a, c)
    conditioned = tiny_model("mdlm", time_conditioning=True)
    with torch.no_grad():
        a = conditioned(input_ids=batch, sigma=torch.full((BATCH,), 0.1)).logits
        b = conditioned(input_ids=batch, sigma=torch.full((BATCH,), 2.0)).logits
    assert (a - b).abs().max() > 1e-3


def test_replaid_time_changes_outputs(batch):
    for time_input in ("gamma", "t"):
        model = tiny_model("replaid", time_input=time_input)
        z = torch.randn(BATCH, SEQ, model.config.embedding_dim, generator=gen(0))
        with torch.no_grad():
            a = model(noisy_embeds=z, t=torch.full((BATCH,), 0.2), output_prior_scale=0.0).logits
            b = model(noisy_embeds=z, t=torch.full((BATCH,), 0.8), output_prior_scale=0.0).logits
        assert (a - b).abs().max() > 1e-3, time_input


def _padding_mask() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    return mask


def test_attention_mask_hides_padding(variant, batch):
    model = tiny_model(variant)
    mask = _padding_mask()
    real = mask.bool()
    changed = batch.clone()
    changed[~real] = (changed[~real] + 7) % (VOCAB - 1)
    if variant == "replaid":
        d_e = model.config.embedding_dim
        t = torch.full((BATCH,), 0.5)
        z = torch.randn(BATCH, SEQ, d_e, generator=gen(0))
        z2 = z.clone()
        z2[~real] = torch.randn(int((~real).sum()), d_e, generator=gen(1))
        with torch.no_grad():
            a = model(noisy_embeds=z, t=t, attention_mask=mask).logits
            b = model(noisy_embeds=z2, t=t, attention_mask=mask).logits
            c = model(noisy_embeds=z2, t=t).logits
    else:
        a = logits_of(model, variant, batch, attention_mask=mask)
        b = logits_of(model, variant, changed, attention_mask=mask)
        c = logits_of(model, variant, changed)
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-5)
    assert (a[real] - c[real]).abs().max() > 1e-4, "without the mask the padded values must matter"
    # an all-ones mask is the same as no mask
    ones = torch.ones(BATCH, SEQ, dtype=torch.long)
    torch.testing.assert_close(logits_of(model, variant, batch, attention_mask=ones), logits_of(model, variant, batch))


@pytest.mark.parametrize("with_mask", [False, True])
def test_eager_and_sdpa_attention_agree(variant, batch, with_mask, monkeypatch):
    model = tiny_model(variant)
    mask = _padding_mask() if with_mask else None
    assert model.config._attn_implementation == "sdpa"
    calls = [0]
    original = modeling_dit.eager_attention_forward

    def counting_eager(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_dit, "eager_attention_forward", counting_eager)
    sdpa = logits_of(model, variant, batch, attention_mask=mask)
    assert calls[0] == 0
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    eager = logits_of(model, variant, batch, attention_mask=mask)
    assert calls[0] == model.config.num_hidden_layers
    real = mask.bool() if with_mask else torch.ones(BATCH, SEQ, dtype=torch.bool)
    torch.testing.assert_close(eager[real], sdpa[real], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Gradients and activation checkpointing
# ---------------------------------------------------------------------------------------------------------------------
# Parameters that legitimately receive no gradient from one NELBO backward: none. (Rows can: embedding rows of
# tokens absent from z_t and, for MDLM, the mask token's output row, checked below.)
NO_GRADIENT: dict[str, set[str]] = {"sddlm": set(), "duo": set(), "mdlm": set(), "replaid": set()}


def _nelbo_grads(model, ids, seed=0):
    model.zero_grad(set_to_none=True)
    loss = model.nelbo(ids, generator=gen(seed)).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_reach_every_parameter(variant, batch):
    model = tiny_model(variant).train()
    loss, grads = _nelbo_grads(model, batch)
    assert torch.isfinite(loss)
    missing = {n for n, g in grads.items() if g is None or not bool(g.ne(0).any())}
    assert missing == NO_GRADIENT[variant]
    for name, g in grads.items():
        assert bool(torch.isfinite(g).all()), name
    if variant == "mdlm":  # SUBS never predicts the mask token: its output row gets exactly zero gradient
        m = model.config.mask_token_id
        out = model.backbone.output_layer.linear
        assert torch.equal(out.weight.grad[m], torch.zeros(HIDDEN)) and out.bias.grad[m] == 0
        assert out.weight.grad[:m].abs().sum() > 0
    if variant == "replaid":  # the learned schedule and its endpoints are trained by the NELBO
        for name in ("W1_raw", "b1", "W2_raw", "gamma_0", "gamma_1"):
            assert grads[f"noise_schedule.{name}"].abs().sum() > 0, name


@pytest.mark.parametrize("variant_name", DISCRETE)
def test_zero_init_gradient_flows_only_into_final_projection(variant_name, batch):
    """With adaLN-Zero and a zero final projection, the first backward reaches only the final Linear."""
    model = VARIANTS[variant_name][1](tiny_config(variant_name)).train()
    _, grads = _nelbo_grads(model, batch)
    nonzero = {n for n, g in grads.items() if g is not None and bool(g.ne(0).any())}
    assert nonzero == {"backbone.output_layer.linear.weight", "backbone.output_layer.linear.bias"}


def test_activation_checkpointing_same_loss_and_gradients(variant, batch):
    reference = tiny_model(variant).train()
    loss_ref, grads_ref = _nelbo_grads(reference, batch)
    model = tiny_model(variant).train()
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.backbone.blocks)
    calls, handle = count_calls(model.backbone.blocks[0].attn)  # inside the checkpointed block: replayed in backward
    loss, grads = _nelbo_grads(model, batch)
    handle.remove()
    forwards_per_nelbo = 4 if variant == "replaid" else 1  # RePlaid: (self-cond + main) at t = 0 and at t
    grad_forwards = 2 if variant == "replaid" else 1  # the self-conditioning passes run under no_grad
    assert calls[0] == forwards_per_nelbo + grad_forwards, "checkpointing did not recompute the block"
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    model.activation_checkpointing_disable()
    assert not any(block.gradient_checkpointing for block in model.backbone.blocks)


# ---------------------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(variant, batch, tmp_path):
    model = tiny_model(variant)
    model.generation_config.num_steps = 11
    model.generation_config.sampler = "ddim" if variant == "replaid" else "greedy_tail"
    model.generation_config.top_p = 0.9
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert SHIPPED_FILES <= files, SHIPPED_FILES - files
    assert {"config.json", "generation_config.json", "model.safetensors"} <= files
    assert "__init__.py" not in files
    config_json = json.loads((tmp_path / "config.json").read_text())
    model_name = type(model).__name__
    assert config_json["model_type"] == variant
    assert config_json["auto_map"] == {
        "AutoConfig": f"configuration_dlm.{type(model.config).__name__}",
        "AutoModel": f"modeling_dlm.{model_name}",
        "AutoModelForMaskedLM": f"modeling_dlm.{model_name}",
    }
    expected = logits_of(model, variant, batch)

    loaders = {
        "class": lambda: VARIANTS[variant][1].from_pretrained(tmp_path),
        "AutoModel": lambda: AutoModel.from_pretrained(tmp_path, trust_remote_code=True),
        "AutoModelForMaskedLM": lambda: AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True),
    }
    for how, load in loaders.items():
        loaded = load().eval()
        assert type(loaded).__name__ == model_name, how
        assert (logits_of(loaded, variant, batch) - expected).abs().max() <= 1e-6, how
        generation_config = loaded.generation_config
        assert type(generation_config).__name__ == GENERATION_CONFIGS[variant].__name__, how
        assert generation_config.num_steps == 11 and generation_config.top_p == 0.9, how
        assert generation_config.sampler == model.generation_config.sampler, how
        if variant == "replaid":
            assert generation_config.score_temperature == 1.0
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    # non-persistent buffers (rotary inv_freq) are not in the checkpoint and must be rebuilt, not left uninitialised
    for (name, buffer), (_, loaded_buffer) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(loaded_buffer, buffer), name


def test_default_generation_config_class(variant):
    model = tiny_model(variant)
    assert type(model.generation_config) is GENERATION_CONFIGS[variant]
    assert model.generation_config.num_steps == 128 and model.generation_config.sampler == "ancestral"


# ---------------------------------------------------------------------------------------------------------------------
# NELBO
# ---------------------------------------------------------------------------------------------------------------------
def test_nelbo_shape_sign_and_seeding(variant, batch):
    model = tiny_model(variant)
    with torch.no_grad():
        value = model.nelbo(batch, generator=gen(0))
        again = model.nelbo(batch, generator=gen(0))
        other = model.nelbo(batch, generator=gen(1))
    assert value.shape == (BATCH,)
    assert bool(torch.isfinite(value).all()) and bool((value > 0).all())
    assert torch.equal(value, again)
    assert not torch.equal(value, other)


def test_nelbo_of_untrained_discrete_model_is_order_log_v(batch):
    """Zero-init discrete models predict uniform x_theta; their NELBO estimates average to about log V (uniform
    state: exactly log V in expectation up to the prior term, see test_scheduling; MDLM: log(V - 1) since SUBS drops
    the mask token)."""
    for variant_name, target in (("duo", math.log(VOCAB)), ("mdlm", math.log(VOCAB - 1))):
        model = VARIANTS[variant_name][1](tiny_config(variant_name)).eval()
        ids = batch.repeat(20, 1)  # 60 sequences, 60 stratified times
        with torch.no_grad():
            value = model.nelbo(ids, generator=gen(0), num_time_samples=4).mean().item()
        assert value == pytest.approx(target, rel=0.25), variant_name


def test_nelbo_time_samples_average_independent_draws(variant, batch):
    """num_time_samples=K is exactly the mean of K consecutive single-sample estimates drawn from one generator, and
    those draws differ (fresh times and noise each time), so averaging them lowers the variance."""
    model = tiny_model(variant)
    with torch.no_grad():
        four = model.nelbo(batch, num_time_samples=4, generator=gen(7))
        shared = gen(7)
        singles = torch.stack([model.nelbo(batch, generator=shared) for _ in range(4)])
    torch.testing.assert_close(four, singles.mean(0), rtol=1e-5, atol=1e-5)
    assert bool((singles.std(0) > 1e-3).all()), "the K draws must be independent, not repeats"


def test_nelbo_more_time_samples_lower_variance(variant):
    """120 replicates of one sequence (a batch of 120 copies: each copy's times are marginally uniform, and
    independent across the K draws) for K = 1 and K = 8: the spread drops (1/sqrt(8) ~ 0.35 for a finite-variance
    estimator; these integrands are heavy-tailed at small t, so the bound is loose) and the means agree. A batch of
    replicates costs 9 forward passes instead of 30 seeds x 9."""
    model = tiny_model(variant)
    ids = torch.tensor([[5, 17, 33, 2, 41, 9, 28]]).repeat(120, 1)
    with torch.no_grad():
        one = model.nelbo(ids, num_time_samples=1, generator=gen(0))
        eight = model.nelbo(ids, num_time_samples=8, generator=gen(1))
    assert one.shape == eight.shape == (120,)
    assert eight.std() < 0.75 * one.std(), (one.std(), eight.std())
    se = torch.sqrt(one.var() / 120 + eight.var() / 120)
    assert (one.mean() - eight.mean()).abs() < 5 * se


def test_nelbo_rejects_bad_arguments(variant, batch):
    model = tiny_model(variant)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_time_samples"):
            model.nelbo(batch, num_time_samples=bad)
    with pytest.raises(TypeError, match="float"):
        model.nelbo(batch.float())
    too_big = batch.clone()
    too_big[0, 0] = VOCAB
    with pytest.raises(ValueError, match=str(VOCAB)):
        model.nelbo(too_big)
    negative = batch.clone()
    negative[1, 2] = -1
    with pytest.raises(ValueError, match="-1"):
        model.nelbo(negative)
    with pytest.raises(ValueError, match="attention_mask"):
        model.nelbo(batch, attention_mask=torch.ones(BATCH, SEQ + 1))
    with pytest.raises(ValueError, match="input_ids"):
        model.nelbo(batch[0])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.nelbo(torch.zeros(1, model.config.max_position_embeddings + 1, dtype=torch.long))


def test_mdlm_nelbo_rejects_mask_token_in_clean_ids(batch):
    model = tiny_model("mdlm")
    ids = batch.clone()
    ids[0, 0] = model.config.mask_token_id
    with pytest.raises(ValueError, match=str(model.config.mask_token_id)):
        model.nelbo(ids)


def test_nelbo_honours_attention_mask(variant, batch):
    model = tiny_model(variant)
    mask = _padding_mask()
    changed = batch.clone()
    pad = ~mask.bool()
    changed[pad] = (changed[pad] + 11) % (VOCAB - 1)
    with torch.no_grad():
        a = model.nelbo(batch, attention_mask=mask, generator=gen(3))
        b = model.nelbo(changed, attention_mask=mask, generator=gen(3))
        c = model.nelbo(changed, generator=gen(3))
        ones = model.nelbo(batch, attention_mask=torch.ones(BATCH, SEQ), generator=gen(3))
        none = model.nelbo(batch, generator=gen(3))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a[[0, 2]] - c[[0, 2]]).abs().max() > 1e-4, "padding must matter without the mask"
    torch.testing.assert_close(ones, none, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------
class RecordingStreamer:
    def __init__(self):
        self.events: list[tuple[str, torch.Tensor | None]] = []

    def put(self, value):
        self.events.append(("put", value.clone()))

    def put_draft(self, value):
        self.events.append(("put_draft", value.clone()))

    def end(self):
        self.events.append(("end", None))


def test_generate_with_prompt(variant, batch):
    model = tiny_model(variant)
    prompt = batch[:, :3]
    out = model.generate(input_ids=prompt, max_new_tokens=4, num_steps=4, generator=gen(0))
    assert out.shape == (BATCH, 7) and out.dtype == torch.long
    assert torch.equal(out[:, :3], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB
    if variant == "mdlm":
        assert not bool((out == model.config.mask_token_id).any()), "every mask must be resolved"
    assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=4, num_steps=4, generator=gen(0)), out)
    others = [model.generate(input_ids=prompt, max_new_tokens=4, num_steps=4, generator=gen(s)) for s in (1, 2)]
    assert any(not torch.equal(o, out) for o in others)
    assert not model.training


def test_generate_unconditional(variant):
    model = tiny_model(variant)
    out = model.generate(batch_size=2, max_new_tokens=5, num_steps=3, generator=gen(0))
    assert out.shape == (2, 5)
    single = model.generate(max_new_tokens=6, num_steps=3, generator=gen(0))
    assert single.shape == (1, 6)
    model.train()
    model.generate(max_new_tokens=2, num_steps=2, generator=gen(0))
    assert model.training, "generate must restore train mode"


def test_generate_trajectory(variant, batch):
    model = tiny_model(variant)
    prompt = batch[:, :2]
    out = model.generate(input_ids=prompt, max_new_tokens=5, num_steps=5, generator=gen(0),
                         return_dict_in_generate=True, output_trajectory=True)
    assert isinstance(out, DiffusionGenerateOutput)
    assert out.trajectory.shape == (5, BATCH, 7)
    assert torch.equal(out.trajectory[-1], out.sequences)
    assert bool((out.trajectory[:, :, :2] == prompt).all())
    plain = model.generate(input_ids=prompt, max_new_tokens=5, num_steps=5, generator=gen(0))
    assert torch.equal(plain, out.sequences)
    no_traj = model.generate(input_ids=prompt, max_new_tokens=5, num_steps=5, generator=gen(0),
                             return_dict_in_generate=True)
    assert no_traj.trajectory is None
    if variant != "mdlm":
        assert out.num_forward_passes == 5


def test_generate_other_samplers(variant, batch):
    model = tiny_model(variant)
    sampler = "ddim" if variant == "replaid" else "greedy_tail"
    prompt = batch[:, :3]
    out = model.generate(input_ids=prompt, max_new_tokens=4, num_steps=4, sampler=sampler, generator=gen(0))
    assert out.shape == (BATCH, 7) and torch.equal(out[:, :3], prompt)
    assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=4, num_steps=4, sampler=sampler,
                                      generator=gen(0)), out)
    if variant == "mdlm":
        assert not bool((out == model.config.mask_token_id).any())
    with pytest.raises(ValueError, match="sampler"):
        model.generate(input_ids=prompt, max_new_tokens=4, num_steps=4,
                       sampler="greedy_tail" if variant == "replaid" else "ddim")
    # filtering knobs run and keep the contract
    filtered = model.generate(input_ids=prompt, max_new_tokens=4, num_steps=3, temperature=0.7, top_k=5, top_p=0.9,
                              generator=gen(0))
    assert torch.equal(filtered[:, :3], prompt)


def test_greedy_tail_last_step_is_argmax(batch):
    """greedy_tail's last step takes argmax x_hat at t = 1/num_steps: with one step that is argmax of the logits at
    the prior sample z_1 ~ Uniform (drawn from the same generator state)."""
    model = tiny_model("duo")
    out = model.generate(batch_size=BATCH, max_new_tokens=SEQ, num_steps=1, sampler="greedy_tail", generator=gen(4))
    z_1 = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen(4))
    with torch.no_grad():
        alpha_1 = model.noise_process.schedule.alpha(torch.tensor(1.0, dtype=torch.float64))
        sigma = (-torch.log(alpha_1)).float().expand(BATCH)
        expected = model(input_ids=z_1, sigma=sigma).logits.argmax(-1)
    assert torch.equal(out, expected)


def test_generate_infill(variant, batch):
    model = tiny_model(variant)
    infill = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    infill[:, [1, 4, 5]] = True
    out = model.generate(input_ids=batch, infill_mask=infill, num_steps=4, generator=gen(0),
                         return_dict_in_generate=True, output_trajectory=True)
    assert out.sequences.shape == (BATCH, SEQ)
    for draft in out.trajectory:
        assert torch.equal(draft[~infill], batch[~infill]), "given tokens must never change"
    assert torch.equal(out.sequences[~infill], batch[~infill])
    if variant == "mdlm":
        assert not bool((out.sequences == model.config.mask_token_id).any())
    with pytest.raises(ValueError, match="infill_mask"):
        model.generate(input_ids=batch, infill_mask=infill.long(), num_steps=2)
    with pytest.raises(ValueError, match="infill_mask"):
        model.generate(input_ids=batch, infill_mask=infill, max_new_tokens=2, num_steps=2)
    with pytest.raises(ValueError, match="infill_mask"):
        model.generate(infill_mask=infill, max_new_tokens=2, num_steps=2)


def test_generate_streamer(variant, batch):
    model = tiny_model(variant)
    prompt = batch[:1, :3]
    streamer = RecordingStreamer()
    out = model.generate(input_ids=prompt, max_new_tokens=4, num_steps=5, generator=gen(0), streamer=streamer)
    kinds = [kind for kind, _ in streamer.events]
    assert kinds == ["put"] + ["put_draft"] * 5 + ["put", "end"]
    assert torch.equal(streamer.events[0][1], prompt)
    assert torch.equal(streamer.events[-3][1], out)  # the last draft is the output
    assert all(draft.shape == (1, 7) for kind, draft in streamer.events if kind == "put_draft")
    assert torch.equal(streamer.events[-2][1], out[:, 3:])
    with pytest.raises(ValueError, match="batch size"):
        model.generate(input_ids=batch, max_new_tokens=2, num_steps=2, streamer=RecordingStreamer())


def test_generate_streamer_without_put_draft(batch):
    class PlainStreamer:
        def __init__(self):
            self.values = []
            self.ended = False

        def put(self, value):
            self.values.append(value)

        def end(self):
            self.ended = True

    model = tiny_model("sddlm")
    streamer = PlainStreamer()
    out = model.generate(input_ids=batch[:1, :2], max_new_tokens=3, num_steps=2, generator=gen(0), streamer=streamer)
    assert len(streamer.values) == 2 and streamer.ended
    assert torch.equal(streamer.values[1], out[:, 2:])


def test_generate_rejects_bad_arguments(variant, batch):
    model = tiny_model(variant)
    prompt = batch[:, :3]
    cases = [
        (dict(num_steps=0), ValueError, "num_steps"),
        (dict(num_steps=2.5), ValueError, "num_steps"),
        (dict(sampler="euler"), ValueError, "sampler"),
        (dict(final_step="last"), ValueError, "final_step"),
        (dict(final_step="noise_removal", noise_removal_eps=0.0), ValueError, "noise_removal_eps"),
        (dict(final_step="noise_removal", noise_removal_eps=1.0), ValueError, "noise_removal_eps"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(top_k=-2), ValueError, "top_k"),
        (dict(max_new_tokens=model.config.max_position_embeddings), ValueError, "max_position_embeddings"),
        (dict(not_a_knob=3), TypeError, "not_a_knob"),
        (dict(generator=0), TypeError, "generator"),
        (dict(batch_size=5), ValueError, "batch_size"),
    ]
    for kwargs, error, name in cases:
        kwargs = {"max_new_tokens": 4, "num_steps": 2, **kwargs}
        with pytest.raises(error, match=name):
            model.generate(input_ids=prompt, **kwargs)
    bad_ids = prompt.clone()
    bad_ids[0, 0] = VOCAB
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(input_ids=bad_ids, max_new_tokens=2, num_steps=2)
    with pytest.raises(TypeError, match="input_ids"):
        model.generate(input_ids=prompt.float(), max_new_tokens=2, num_steps=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(batch_size=2, num_steps=2)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(input_ids=prompt, attention_mask=torch.ones(BATCH, 4), max_new_tokens=2, num_steps=2)
    if variant == "replaid":
        with pytest.raises(ValueError, match="score_temperature"):
            model.generate(input_ids=prompt, max_new_tokens=2, num_steps=2, score_temperature=0.0)
    # the model's own generation config is not modified by per-call kwargs
    assert model.generation_config.num_steps == 128


def test_generate_accepts_plain_generation_config(variant):
    """A stock transformers GenerationConfig is lifted into the variant's class; its fields and the kwargs apply."""
    model = tiny_model(variant)
    out = model.generate(generation_config=GenerationConfig(max_new_tokens=3), batch_size=2, num_steps=2,
                         generator=gen(0), return_dict_in_generate=True, output_trajectory=True)
    assert out.sequences.shape == (2, 3) and out.trajectory.shape == (2, 2, 3)
    custom = GENERATION_CONFIGS[variant](max_new_tokens=4, num_steps=3, return_dict_in_generate=True,
                                         output_trajectory=True)
    out = model.generate(generation_config=custom, generator=gen(0))
    assert out.sequences.shape == (1, 4) and out.trajectory.shape[0] == 3


def test_generate_progress_bar(capsys):
    model = tiny_model("sddlm")
    capsys.readouterr()
    model.generate(max_new_tokens=3, num_steps=3, generator=gen(0))
    quiet = capsys.readouterr()
    assert "it/s" not in quiet.err and "sampling" not in quiet.err
    model.generate(max_new_tokens=3, num_steps=3, generator=gen(0), show_progress=True)
    shown = capsys.readouterr().err
    assert "it/s" in shown and "SDDLMForDiffusionLM sampling" in shown


def test_generate_attention_mask_on_prompt(variant, batch):
    model = tiny_model(variant)
    prompt = batch[:, :3]
    mask = torch.ones(BATCH, 3, dtype=torch.long)
    mask[1, 0] = 0  # left-padded prompt
    out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=4, num_steps=3, generator=gen(0))
    assert out.shape == (BATCH, 7) and torch.equal(out[:, :3], prompt)
    changed = prompt.clone()
    changed[1, 0] = (changed[1, 0] + 5) % (VOCAB - 1)
    again = model.generate(input_ids=changed, attention_mask=mask, max_new_tokens=4, num_steps=3, generator=gen(0))
    assert torch.equal(again[:, :3], changed)
    if variant in ("mdlm", "replaid"):
        # these samplers draw a fixed amount of randomness per step, so with the same seed a masked prompt token
        # cannot change the sample. (The uniform-state step draws one uniform per position that picks x_hat, a
        # number that depends on x_hat at the clamped prompt positions too: same distribution, different stream.)
        assert torch.equal(again[:, 3:], out[:, 3:]), "a masked prompt token must not influence the sample"


# ---------------------------------------------------------------------------------------------------------------------
# Forced ("mock") denoiser: x_hat is one-hot on token K
# ---------------------------------------------------------------------------------------------------------------------
K = 17


def forced_model(variant_name: str, **overrides):
    model = VARIANTS[variant_name][1](tiny_config(variant_name, **overrides)).eval()
    with torch.no_grad():  # adaLN-Zero everywhere; the final projection is only a bias that is huge on K
        model.backbone.output_layer.linear.weight.zero_()
        model.backbone.output_layer.linear.bias.zero_()
        model.backbone.output_layer.linear.bias[K] = 1e4
    return model


@pytest.mark.parametrize("variant_name", RAW_DENOISER)
def test_forced_denoiser_generates_k_with_one_call_per_step(variant_name, batch):
    model = forced_model(variant_name)
    calls, handle = count_calls(model)
    num_steps = 6
    out = model.generate(input_ids=batch[:, :2], max_new_tokens=5, num_steps=num_steps, generator=gen(0),
                         return_dict_in_generate=True)
    handle.remove()
    assert torch.equal(out.sequences[:, :2], batch[:, :2])
    assert bool((out.sequences[:, 2:] == K).all()), out.sequences
    assert out.num_forward_passes == calls[0]
    if variant_name in UNIFORM:
        assert calls[0] == num_steps
    else:
        assert 1 <= calls[0] <= num_steps


@pytest.mark.parametrize("variant_name", UNIFORM + ["replaid"])
def test_one_network_call_per_step(variant_name, batch):
    model = tiny_model(variant_name)
    calls, handle = count_calls(model)
    out = model.generate(input_ids=batch[:, :2], max_new_tokens=4, num_steps=7, generator=gen(0),
                         return_dict_in_generate=True)
    handle.remove()
    assert calls[0] == 7 == out.num_forward_passes


@pytest.mark.parametrize("variant_name", RAW_DENOISER)
def test_forced_denoiser_greedy_tail(variant_name):
    model = forced_model(variant_name)
    out = model.generate(batch_size=2, max_new_tokens=SEQ, num_steps=3, sampler="greedy_tail", generator=gen(1))
    assert bool((out == K).all())


def test_mdlm_filtering_acts_on_subs_distribution():
    """top-k/top-p filter x_hat, the SUBS distribution without the mask token, even when the raw mask logit is the
    largest (it is never trained under SUBS): the nucleus never "spends" a slot or mass on the mask token."""
    model = forced_model("mdlm")
    with torch.no_grad():
        bias = model.backbone.output_layer.linear.bias
        bias.zero_()
        bias[model.config.mask_token_id], bias[K], bias[3] = 5.0, 4.0, 3.9
    top1 = model.generate(batch_size=2, max_new_tokens=6, num_steps=4, top_k=1, generator=gen(0))
    assert bool((top1 == K).all()), top1
    # SUBS probabilities: K 0.34, token 3 0.30, the 58 others 0.006 each: a 0.5 nucleus is exactly {K, 3}
    nucleus = model.generate(batch_size=2, max_new_tokens=6, num_steps=4, top_p=0.5, generator=gen(0))
    assert set(nucleus.unique().tolist()) <= {3, K} and not bool((nucleus == model.config.mask_token_id).any())


def test_mdlm_caching_sampler_skips_calls_while_nothing_changes():
    """With few positions and many steps most steps reveal nothing; MDLM (no time conditioning) then reuses x_hat.
    With time conditioning the cache must be off: exactly one call per step."""
    num_steps = 24
    model = forced_model("mdlm")
    calls, handle = count_calls(model)
    out = model.generate(max_new_tokens=4, num_steps=num_steps, generator=gen(0), return_dict_in_generate=True)
    handle.remove()
    assert bool((out.sequences == K).all())
    assert out.num_forward_passes == calls[0]
    assert 1 <= calls[0] <= 5 < num_steps  # one call, then one more after each step that revealed something

    conditioned = forced_model("mdlm", time_conditioning=True)
    calls, handle = count_calls(conditioned)
    out = conditioned.generate(max_new_tokens=4, num_steps=num_steps, generator=gen(0), return_dict_in_generate=True)
    handle.remove()
    assert calls[0] == num_steps == out.num_forward_passes


def test_mdlm_cache_matches_uncached_sampling(batch):
    """Reusing x_hat while z is unchanged is exact for a time-independent denoiser: the cached sampler and one that
    calls the network every step draw the same samples from the same generator."""
    model = tiny_model("mdlm")
    cached = model.generate(input_ids=batch[:, :2], max_new_tokens=5, num_steps=12, generator=gen(5),
                            return_dict_in_generate=True)
    uncached = model.generate(input_ids=batch[:, :2], max_new_tokens=5, num_steps=12, generator=gen(5),
                              return_dict_in_generate=True, cache_predictions=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.num_forward_passes < uncached.num_forward_passes == 12
    with pytest.raises(ValueError, match="cache_predictions"):
        model.generate(input_ids=batch[:, :2], max_new_tokens=5, num_steps=4, cache_predictions="yes")


def test_mdlm_cache_is_per_sequence():
    """The cache works per sequence: the network runs only on the rows whose z_t changed in the last step (a row
    subset of the batch, so no call is skipped just because another sequence changed), the samples equal plain
    ancestral sampling, and `num_forward_sequences` counts exactly the rows the network saw."""
    model = tiny_model("mdlm")
    rows_seen = []
    handle = model.register_forward_hook(
        lambda module, args, kwargs, out: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    B, steps = 4, 24
    cached = model.generate(batch_size=B, max_new_tokens=6, num_steps=steps, generator=gen(3),
                            return_dict_in_generate=True)
    handle.remove()
    uncached = model.generate(batch_size=B, max_new_tokens=6, num_steps=steps, generator=gen(3),
                              return_dict_in_generate=True, cache_predictions=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert uncached.num_forward_sequences == B * steps and uncached.num_forward_passes == steps
    assert cached.num_forward_passes == len(rows_seen) and cached.num_forward_sequences == sum(rows_seen)
    assert rows_seen[0] == B and any(0 < n < B for n in rows_seen)  # partial batches were run
    assert cached.num_forward_sequences < B * cached.num_forward_passes  # what a batch-wide cache would have run


# ---------------------------------------------------------------------------------------------------------------------
# filter_logits
# ---------------------------------------------------------------------------------------------------------------------
def test_filter_logits_top_k():
    logits = torch.randn(4, 5, VOCAB, generator=gen(0))
    for k in (1, 3, 10, VOCAB - 1):
        out = filter_logits(logits, top_k=k)
        finite = torch.isfinite(out)
        assert bool((finite.sum(-1) == k).all())
        kept_expected = torch.zeros_like(finite).scatter(-1, logits.topk(k, -1).indices, True)
        assert torch.equal(finite, kept_expected)
        assert torch.equal(out[finite], logits[finite])
    for k in (None, 0, VOCAB, VOCAB + 5):
        assert torch.equal(filter_logits(logits, top_k=k), logits)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_filter_logits_top_p(top_p):
    logits = torch.randn(6, VOCAB, generator=gen(1)) * 2
    out = filter_logits(logits, top_p=top_p)
    probs = logits.double().softmax(-1)
    for row in range(6):
        order = probs[row].argsort(descending=True)
        cum = probs[row][order].cumsum(0)
        m = int((cum < top_p).sum()) + 1  # the smallest prefix whose mass reaches top_p
        expected = torch.zeros(VOCAB, dtype=torch.bool)
        expected[order[:m]] = True
        assert torch.equal(torch.isfinite(out[row]), expected), (row, m)
        assert probs[row][expected].sum() >= top_p
        assert probs[row][order[: m - 1]].sum() < top_p
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)


def test_filter_logits_top_p_exact_boundary():
    """Probabilities that are exact in float32: a prefix that reaches top_p exactly ends the nucleus (as in
    transformers' TopPLogitsWarper); the next token is not kept."""
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    for top_p, kept in ((0.5, 1), (0.6, 2), (0.75, 2), (0.76, 3), (0.875, 3), (0.9, 4)):
        assert int(torch.isfinite(filter_logits(logits, top_p=top_p)).sum()) == kept, top_p


def test_filter_logits_temperature_and_composition():
    logits = torch.randn(3, VOCAB, generator=gen(2))
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits / 0.5)
    torch.testing.assert_close(filter_logits(logits, temperature=4.0), logits / 4.0)
    assert torch.equal(filter_logits(logits, temperature=1.0), logits)
    assert filter_logits(logits.half()).dtype == torch.float32
    sharp = filter_logits(logits, temperature=0.25).softmax(-1)
    assert bool((sharp.max(-1).values > logits.softmax(-1).max(-1).values).all())
    # temperature acts first: top-p at a low temperature keeps fewer tokens than at temperature 1
    cold = torch.isfinite(filter_logits(logits, temperature=0.3, top_p=0.9)).sum(-1)
    warm = torch.isfinite(filter_logits(logits, top_p=0.9)).sum(-1)
    assert bool((cold <= warm).all()) and bool((cold < warm).any())
    both = filter_logits(logits, top_k=5, top_p=0.5)
    assert bool((torch.isfinite(both).sum(-1) <= 5).all())


def test_ignored_autoregressive_kwargs_are_accepted(batch):
    model = tiny_model("sddlm")
    a = model.generate(input_ids=batch[:, :2], max_new_tokens=3, num_steps=2, generator=gen(0))
    b = model.generate(input_ids=batch[:, :2], max_new_tokens=3, num_steps=2, generator=gen(0), do_sample=True,
                       num_beams=1, use_cache=False)
    assert torch.equal(a, b)


def test_sddlm_plugs_the_raw_softmax_into_the_elbo_and_refuses_the_old_bayes_denoiser(tmp_path):
    """SDDLM's ELBO denoiser is the network's softmax (the leave-one-out predictive, tests/test_sddlm.py); a
    config.json that still asks for the removed Bayes-rule denoiser is refused with a clear error."""
    model = tiny_model("sddlm")
    x = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        noised = model.noised_forward(x, t, generator=torch.Generator().manual_seed(4))
        fused = model.nelbo_per_token(x, t, generator=torch.Generator().manual_seed(4))
        plain = model.noise_process.scheduler.nelbo_per_token(noised.logits.log_softmax(-1), x, noised.z_t,
                                                              noised.aux["alpha"], noised.aux["dalpha"])  # unfused
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "elbo_denoiser" not in config
    config["elbo_denoiser"] = "bayes"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="elbo_denoiser='bayes'.* no longer supported"):
        type(model).from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# The final step: decode at t = 1/num_steps ("grid") or after stepping to t = eps ("noise_removal", the reference)
# ---------------------------------------------------------------------------------------------------------------------
def _call_times(model, variant_name: str, **kwargs) -> list[float]:
    """The time t of every network call of one generate, read from the call's own inputs."""
    times = []

    def hook(_module, args, kw):
        if variant_name == "replaid":
            times.append(float(kw["t"][0]))
        else:  # sigma = -log alpha_t of the log-linear schedule: alpha_t = 1 - (1 - eps) t
            alpha = math.exp(-float(kw["sigma"][0]))
            times.append((1 - alpha) / (1 - model.config.schedule_eps))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = model.generate(batch_size=2, max_new_tokens=5, generator=gen(0), return_dict_in_generate=True,
                             **kwargs)
    finally:
        handle.remove()
    assert out.num_forward_passes == len(times) == kwargs["num_steps"]
    return times


@pytest.mark.parametrize("variant_name", UNIFORM + ["replaid"])
@pytest.mark.parametrize("sampler", ["ancestral", "greedy_tail"])
def test_final_step_sets_the_time_of_every_call(variant_name, sampler):
    if variant_name == "replaid" and sampler == "greedy_tail":
        sampler = "ddim"
    model = tiny_model(variant_name)
    N = 5
    grid = _call_times(model, variant_name, num_steps=N, sampler=sampler, final_step="grid")
    assert grid == pytest.approx([1 - k / N for k in range(N)], abs=1e-6)  # the last call decodes at t = 1/N
    ref = _call_times(model, variant_name, num_steps=N, sampler=sampler, final_step="noise_removal")
    eps = 1e-5
    assert ref == pytest.approx([1 - k * (1 - eps) / (N - 1) for k in range(N)], abs=1e-6)  # ... at t = eps
    assert ref[-1] == pytest.approx(eps, abs=1e-6)
    custom = _call_times(model, variant_name, num_steps=N, sampler=sampler, final_step="noise_removal",
                         noise_removal_eps=0.05)
    assert custom[-1] == pytest.approx(0.05, abs=1e-6)
    # one step: both forms are the single decode at t = 1
    assert _call_times(model, variant_name, num_steps=1, final_step="noise_removal") == pytest.approx([1.0])


def test_noise_removal_is_the_reference_loop(batch):
    """final_step="noise_removal" with num_steps = S + 1 is the reference sampler: S posterior steps on
    linspace(1, 1e-5, S + 1), then the greedy noise removal at t = 1e-5, draw for draw."""
    model = tiny_model("duo").eval()
    S, B, L = 4, 2, 6
    out = model.generate(batch_size=B, max_new_tokens=L, num_steps=S + 1, sampler="greedy_tail",
                         final_step="noise_removal", generator=gen(3))
    g = gen(3)
    sched, schedule = model.noise_process.scheduler, model.noise_process.schedule
    z = sched.prior_sample((B, L), generator=g, device=torch.device("cpu"))
    ts = torch.linspace(1.0, 1e-5, S + 1, dtype=torch.float64)
    with torch.no_grad():
        for k in range(S):
            alpha_t, alpha_s = schedule.alpha(ts[k]), schedule.alpha(ts[k + 1])
            logits = model(input_ids=z, sigma=(-torch.log(alpha_t)).float().expand(B)).logits
            z = sched.step_from_logits(logits, z, alpha_t, alpha_s, generator=g)
        alpha = schedule.alpha(ts[-1])
        z = model(input_ids=z, sigma=(-torch.log(alpha)).float().expand(B)).logits.argmax(-1)
    assert torch.equal(out, z)
