"""transformers conventions the common `ModelTesterMixin` tests check (issue 15, B6-B8): `resize_token_embeddings`
resizes every vocabulary-sized part; `output_attentions` / `output_hidden_states` / `return_dict` follow the config;
`model.base_model` is a `PreTrainedModel`; the forward traces (`torch.export`, `torch.compile(fullgraph=True)`)."""

from __future__ import annotations

import pytest
import torch

from modeling_dlm import VARIANTS
from modeling_dlm.modeling_dit import DiTModel

from .conftest import BATCH, HEADS, LAYERS, SEQ, VOCAB, gen, tiny_model


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
UNIFORM = ("sddlm", "duo")


def time_kwargs(variant: str, batch: int = BATCH) -> dict:
    """The noise-level argument of each variant's forward (a non-trivial level, so time conditioning matters)."""
    return {"t": torch.full((batch,), 0.3)} if variant == "replaid" else {"sigma": torch.full((batch,), 0.5)}


def padded_mask() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 6:] = 0
    return mask


def clean_ids(variant: str, vocab: int, seed: int = 1) -> torch.Tensor:
    """Token ids over the whole vocabulary `vocab`, never MDLM's mask id (kept at VOCAB - 1 on resize)."""
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen(seed))
    if variant == "mdlm":
        ids[ids == VOCAB - 1] = 0
    return ids


# ---- B6: resize_token_embeddings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("new_vocab", [VOCAB + 10, VOCAB - 10], ids=["up", "down"])
def test_resize_token_embeddings_follows_everywhere(variant, new_vocab, tmp_path):
    overrides = {"mask_token_id": 40} if variant == "mdlm" and new_vocab < VOCAB else {}
    model = tiny_model(variant, **overrides)
    old_embed = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings()
    old_w, old_b = old_head.weight.detach().clone(), old_head.bias.detach().clone()
    mask_id = model.config.mask_token_id

    returned = model.resize_token_embeddings(new_vocab)

    n = min(VOCAB, new_vocab)
    assert returned is model.get_input_embeddings()
    assert model.config.vocab_size == new_vocab
    assert model.get_input_embeddings().weight.shape[0] == new_vocab
    head = model.get_output_embeddings()
    assert head is model.backbone.output_layer.linear
    assert head.weight.shape[0] == new_vocab and head.bias.shape == (new_vocab,)
    torch.testing.assert_close(model.get_input_embeddings().weight[:n], old_embed[:n], rtol=0, atol=0)
    torch.testing.assert_close(head.weight[:n], old_w[:n], rtol=0, atol=0)
    torch.testing.assert_close(head.bias[:n], old_b[:n], rtol=0, atol=0)
    if variant != "replaid":
        assert model.noise_process.vocab_size == new_vocab
    if variant == "mdlm":
        assert model.config.mask_token_id == mask_id == model.noise_process.mask_token_id  # kept, never moved

    ids = clean_ids(variant, new_vocab)
    with torch.no_grad():
        logits = model(input_ids=ids, **time_kwargs(variant)).logits
        nelbo = model.nelbo(ids, generator=gen(0))
        sample = model.generate(batch_size=2, max_new_tokens=SEQ, num_steps=4, generator=gen(2))
    assert logits.shape == (BATCH, SEQ, new_vocab)
    assert nelbo.shape == (BATCH,) and torch.isfinite(nelbo).all()
    assert sample.shape == (2, SEQ) and int(sample.min()) >= 0 and int(sample.max()) < new_vocab
    with pytest.raises(ValueError, match="outside"):
        model(input_ids=torch.full((1, SEQ), new_vocab), **time_kwargs(variant, 1))

    model.save_pretrained(tmp_path)
    reloaded = VARIANTS[variant][1].from_pretrained(tmp_path).eval()
    assert reloaded.config.vocab_size == new_vocab
    if variant != "replaid":
        assert reloaded.noise_process.vocab_size == new_vocab
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, **time_kwargs(variant)).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("variant", UNIFORM)
def test_resized_uniform_noise_draws_the_new_ids(variant):
    model = tiny_model(variant)
    model.resize_token_embeddings(VOCAB + 10)
    x0 = torch.zeros(64, 64, dtype=torch.long)
    scheduler = model.noise_process.scheduler
    z, resampled = scheduler.add_noise(x0, torch.tensor(0.0), generator=gen(0))  # alpha = 0: all noise
    prior = model.noise_process.prior_sample((64, 64), generator=gen(1))
    for draws in (z[resampled], prior.flatten()):
        assert int(draws.max()) == VOCAB + 9  # ids >= the old vocabulary are drawn, up to the new V - 1
        assert (draws >= VOCAB).float().mean().item() == pytest.approx(10 / (VOCAB + 10), abs=0.02)


def test_resize_mdlm_mask_id_rule():
    model = tiny_model("mdlm")
    assert model.config.mask_token_id == VOCAB - 1
    embed = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ValueError, match=r"mask_token_id.*60"):
        model.resize_token_embeddings(VOCAB - 1)  # would cut the mask token
    assert model.config.vocab_size == VOCAB and torch.equal(model.get_input_embeddings().weight, embed)  # unchanged
    model.resize_token_embeddings(VOCAB + 5)  # added tokens come after the mask token
    assert model.config.mask_token_id == VOCAB - 1 and model.noise_process.vocab_size == VOCAB + 5
    with torch.no_grad():
        sample = model.generate(batch_size=2, max_new_tokens=SEQ, num_steps=4, generator=gen(0))
    assert not (sample == VOCAB - 1).any()  # the mask never survives sampling


def test_resize_pad_to_multiple_of_and_mean_resizing_off():
    model = tiny_model("duo")
    model.resize_token_embeddings(65, pad_to_multiple_of=8)
    assert model.config.vocab_size == 72 == model.noise_process.vocab_size
    assert model.get_output_embeddings().weight.shape == (72, model.config.hidden_size)
    model.resize_token_embeddings(pad_to_multiple_of=16)  # pad the current size
    assert model.config.vocab_size == 80 == model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(90, mean_resizing=False)
    head = model.get_output_embeddings()
    assert head.weight.shape[0] == 90 and not head.weight[80:].any() and not head.bias[80:].any()  # zero rows
    with pytest.raises(ValueError, match="new_num_tokens"):
        model.resize_token_embeddings(1)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        model.resize_token_embeddings(64, pad_to_multiple_of=0)


def test_resize_refuses_to_cut_special_ids():
    model = tiny_model("sddlm", pad_token_id=55)
    with pytest.raises(ValueError, match="pad_token_id"):
        model.resize_token_embeddings(50)
    assert model.config.vocab_size == VOCAB


# ---- B7: output flags, attentions, base_model ---------------------------------------------------------------------
def test_config_output_flags_are_honoured(variant, batch):
    model = tiny_model(variant)
    kwargs = time_kwargs(variant)
    with torch.no_grad():
        reference = model(input_ids=batch, **kwargs).logits
        model.config.output_hidden_states = True
        out = model(input_ids=batch, **kwargs)
        assert len(out.hidden_states) == LAYERS + 1 and out.attentions is None
        assert len(model(input_ids=batch, output_hidden_states=False, **kwargs)) == 1  # the argument wins
        model.config.return_dict = False
        as_tuple = model(input_ids=batch, **kwargs)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2 and len(as_tuple[1]) == LAYERS + 1
    torch.testing.assert_close(as_tuple[0], reference, rtol=0, atol=0)


def test_output_attentions_eager(variant, batch):
    model = tiny_model(variant)
    kwargs = time_kwargs(variant)
    mask = padded_mask()
    with torch.no_grad():
        sdpa = model(input_ids=batch, attention_mask=mask, **kwargs).logits
        model.set_attn_implementation("eager")
        out = model(input_ids=batch, attention_mask=mask, output_attentions=True, **kwargs)
        model.config.output_attentions = True  # the config flag alone
        from_config = model(input_ids=batch, attention_mask=mask, **kwargs)
    torch.testing.assert_close(out.logits, sdpa, rtol=1e-5, atol=1e-5)
    assert len(out.attentions) == LAYERS and len(from_config.attentions) == LAYERS
    for weights in out.attentions:
        assert weights.shape == (BATCH, HEADS, SEQ, SEQ)
        torch.testing.assert_close(weights.sum(-1), torch.ones(BATCH, HEADS, SEQ))
        assert not weights[0, :, :, 4:].any() and not weights[2, :, :, 6:].any()  # padded keys get no weight
    assert out.to_tuple()[-1] is out.attentions  # attentions come last, as transformers' tests expect


def test_output_attentions_sdpa_raises(batch):
    model = tiny_model("duo")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"(?s)sdpa.*attn_implementation=\"eager\""):
        model(input_ids=batch, output_attentions=True)


def test_flash_attention_2_is_accepted_and_gets_the_padding_mask(batch, monkeypatch, tmp_path):
    """`attn_implementation="flash_attention_2"` is supported (flash-attn stays optional: without it, loading fails
    with transformers' ImportError naming the package), and the flash path receives the (B, L) padding mask, which
    the flash kernels unpad by, instead of the 4-D mask. A stand-in kernel (SDPA on that mask) proves the wiring."""
    import importlib.util

    import torch.nn.functional as F
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert all(model_class._supports_flash_attn for _, model_class in VARIANTS.values())
    model = tiny_model("duo")
    model.save_pretrained(tmp_path)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="FlashAttention2.*installed"):
            VARIANTS["duo"][1].from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    seen = []

    def stand_in(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        seen.append(None if attention_mask is None else tuple(attention_mask.shape))
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2), None  # (B, L, H, D), as the flash interface returns

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", stand_in)
    kwargs, mask = time_kwargs("duo"), padded_mask()
    with torch.no_grad():
        sdpa = model(input_ids=batch, attention_mask=mask, **kwargs).logits
        model.config._attn_implementation = "flash_attention_2"
        flash = model(input_ids=batch, attention_mask=mask, **kwargs).logits
    assert seen == [(BATCH, SEQ)] * LAYERS
    torch.testing.assert_close(flash, sdpa, rtol=1e-5, atol=1e-5)


def test_base_model_is_a_pretrained_backbone(variant, tmp_path):
    """transformers' `test_correct_missing_keys`: the base model saves alone, and the full model loaded from it
    reports the head's weights as missing; the full model's state-dict keys are unchanged."""
    model = tiny_model(variant)
    assert model.base_model is model.backbone and isinstance(model.backbone, DiTModel)
    keys = set(model.state_dict())
    assert {"embed_tokens.weight", "backbone.output_layer.linear.weight", "backbone.blocks.0.attn.attn_qkv.weight",
            "backbone.sigma_map.mlp.0.weight"} <= keys
    assert all(k.split(".")[0] in {"embed_tokens", "backbone", "input_proj", "self_cond_proj", "noise_schedule"}
               for k in keys)
    model.base_model.save_pretrained(tmp_path)
    loaded, info = VARIANTS[variant][1].from_pretrained(tmp_path, output_loading_info=True)
    assert "embed_tokens.weight" in info["missing_keys"] and not info["unexpected_keys"]
    for name, param in model.backbone.state_dict().items():
        torch.testing.assert_close(loaded.backbone.state_dict()[name], param, rtol=0, atol=0)


# ---- B8: tracing ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", [False, True], ids=["no-mask", "padded"])
def test_torch_export_matches_eager(variant, batch, padding):
    model = tiny_model(variant)
    kwargs = dict(input_ids=batch, **time_kwargs(variant))
    if padding:
        kwargs["attention_mask"] = padded_mask()
    with torch.no_grad():
        eager = model(**kwargs).logits
        exported = torch.export.export(model, (), kwargs)
        traced = exported.module()(**kwargs).logits
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
        other = dict(kwargs, input_ids=clean_ids(variant, VOCAB, seed=7))  # the graph is not specialised to values
        torch.testing.assert_close(exported.module()(**other).logits, model(**other).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", [False, True], ids=["no-mask", "padded"])
def test_torch_compile_fullgraph_matches_eager(variant, batch, padding):
    """fullgraph=True fails on any graph break (a data-dependent check); aot_eager keeps it fast on CPU (inductor
    below)."""
    model = tiny_model(variant)
    kwargs = dict(input_ids=batch, **time_kwargs(variant))
    if padding:
        kwargs["attention_mask"] = padded_mask()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kwargs).logits, model(**kwargs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager(batch):
    model = tiny_model("sddlm")
    kwargs = dict(input_ids=batch, attention_mask=padded_mask(), **time_kwargs("sddlm"))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kwargs).logits, model(**kwargs).logits, rtol=1e-5, atol=1e-5)


def test_eager_validation_is_kept(variant):
    model = tiny_model(variant)
    with pytest.raises(ValueError, match="outside"):
        model(input_ids=torch.full((1, SEQ), VOCAB), **time_kwargs(variant, 1))
    if variant == "replaid":
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            model(input_ids=torch.zeros(1, SEQ, dtype=torch.long), t=torch.tensor([1.5]))
