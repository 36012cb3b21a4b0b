"""PEFT LoRA through every dlm Trainer: only the adapters (and modules_to_save) train; the adapter saves, reloads
onto a fresh base and merges into a plain dlm model that `AutoModel(..., trust_remote_code=True)` loads."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

from modeling_dlm import VARIANTS
from trainers import (
    DiffusionTrainingArguments,
    DuoDistillationTrainer,
    DuoTrainer,
    MDLMTrainer,
    RePlaidTrainer,
    SDDLMTrainer,
    apply_lora,
    default_lora_config,
    merge_lora,
)
from trainers.lora import DIT_TARGET_MODULES

from .conftest import LAYERS, SEQ, VOCAB, gen, shared_data, tiny_config, tiny_model


# case -> (model variant, trainer class)
CASES = {
    "sddlm": ("sddlm", SDDLMTrainer),
    "duo": ("duo", DuoTrainer),
    "mdlm": ("mdlm", MDLMTrainer),
    "replaid": ("replaid", RePlaidTrainer),
    "duo-dcd": ("duo", DuoDistillationTrainer),
}


def token_dataset(rows: int = 24) -> datasets.Dataset:
    ids = torch.randint(0, VOCAB - 1, (rows, SEQ), generator=gen(11))  # never the MDLM mask id (VOCAB - 1)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


@torch.no_grad()
def probe_logits(model, variant: str) -> torch.Tensor:
    """Logits of a fixed noisy input (time-dependent), through whatever wrapper `model` is."""
    model.eval()
    g = gen(5)
    if variant == "replaid":
        d_e = tiny_config("replaid").embedding_dim
        z = torch.randn(3, SEQ, d_e, generator=g)
        return model(noisy_embeds=z, t=torch.rand(3, generator=g), self_cond=torch.randn(3, SEQ, d_e, generator=g)
                     ).logits
    ids = torch.randint(0, VOCAB - 1, (3, SEQ), generator=g)
    return model(input_ids=ids, sigma=3 * torch.rand(3, generator=g)).logits


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


def test_default_lora_config_per_variant():
    expected_saved = {"sddlm": {"sigma_map"}, "duo": {"sigma_map"}, "mdlm": set(),
                      "replaid": {"sigma_map", "noise_schedule"}}
    for variant, saved in expected_saved.items():
        config = default_lora_config(variant, r=4, alpha=8, dropout=0.1)
        assert (config.r, config.lora_alpha, config.lora_dropout, config.task_type) == (4, 8, 0.1, None)
        assert set(config.modules_to_save or ()) == saved
        model = tiny_model(variant)
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        assert set(config.target_modules) <= names and saved <= names  # real module names of the DiT
        wrapped = apply_lora(model, r=4)
        lora_layers = [n for n, m in wrapped.named_modules() if hasattr(m, "lora_A")]
        extra = 2 if variant == "replaid" else 0  # input_proj, self_cond_proj
        # per block: attn_qkv, attn_out, fc1, fc2, adaLN_modulation; plus the final layer's adaLN_modulation
        assert len(lora_layers) == LAYERS * len(DIT_TARGET_MODULES) + 1 + extra
        assert not any("embed_tokens" in n or n.endswith("output_layer.linear") for n in lora_layers)
    # a time-conditioned MDLM trains its timestep embedder too
    timed = default_lora_config(tiny_model("mdlm", time_conditioning=True))
    assert set(timed.modules_to_save) == {"sigma_map"}
    overridden = default_lora_config("duo", target_modules="all-linear", modules_to_save=[])
    assert overridden.target_modules == "all-linear" and not overridden.modules_to_save
    with pytest.raises(ValueError, match="no default LoRA targets"):
        default_lora_config("llama")
    with pytest.raises(ValueError, match="rank"):
        default_lora_config("duo", r=0)
    with pytest.raises(TypeError, match="PeftModel"):
        merge_lora(tiny_model("duo"))


@pytest.mark.parametrize("case", list(CASES))
def test_lora_training_save_reload_merge(case, tmp_path, one_intra_op_thread):
    variant, trainer_class = CASES[case]
    model = apply_lora(tiny_model(variant), r=4, alpha=8)
    assert isinstance(model, PeftModel)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_param(n) for n in trainable)
    ema = case == "duo"  # EMA over the adapter weights: exported by save_model
    args = DiffusionTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=6, learning_rate=1e-2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        ema_decay=0.5 if ema else 0.0, lr_scheduler_type="constant",
    )
    trainer = trainer_class(model=model, args=args, train_dataset=token_dataset())
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(torch.isfinite(torch.tensor(logged)))

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable, sorted(changed - trainable)  # base weights (and original modules) untouched
    lora_b = {n for n in trainable if ".lora_B." in n}
    assert lora_b and lora_b <= changed, sorted(lora_b - changed)  # every adapter trained
    saved_copies = {n for n in trainable if ".modules_to_save." in n}
    assert saved_copies <= changed, sorted(saved_copies - changed)
    assert bool(saved_copies) == (variant != "mdlm")

    trained = probe_logits(model, variant)
    assert not torch.allclose(trained, probe_logits(tiny_model(variant), variant))  # the adapter changes outputs

    adapter_dir = tmp_path / "adapter"
    trainer.save_model(str(adapter_dir))
    files = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # the adapter only, not the base
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4

    expected = trained
    if ema:
        with trainer.ema.swapped(model):
            expected = probe_logits(model, variant)
        assert not torch.allclose(expected, trained)
    reloaded = PeftModel.from_pretrained(tiny_model(variant), str(adapter_dir))
    assert torch.allclose(probe_logits(reloaded, variant), expected, rtol=0, atol=1e-6)

    merged = merge_lora(model)
    assert type(merged) is VARIANTS[variant][1]
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    merged_logits = probe_logits(merged, variant)
    assert torch.allclose(merged_logits, trained, rtol=0, atol=1e-5)
    assert torch.equal(probe_logits(model, variant), trained)  # merge_lora left the wrapped model as it was

    merged_dir = tmp_path / "merged"
    merged.save_pretrained(merged_dir)
    remote = AutoModel.from_pretrained(merged_dir, trust_remote_code=True)
    assert type(remote).__name__ == VARIANTS[variant][1].__name__
    assert torch.allclose(probe_logits(remote, variant), merged_logits, rtol=0, atol=1e-6)


def test_dlm_train_lora_flags_save_adapter_and_merged_model(tmp_path, capsys, one_intra_op_thread):
    """`dlm train --init_from BASE --lora_r 4 --merge_lora`: the adapter in --output_dir, the merged model in
    --output_dir/merged; the two give the same logits."""
    from trainers.checkpoints import build_model
    from trainers.cli import main

    text = shared_data("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:20_000]
    data = tmp_path / "text.txt"
    data.write_text(text, encoding="utf-8")
    from trainers.data import builtin_tokenizer, prepare_tokenizer

    tokenizer = prepare_tokenizer(builtin_tokenizer(), need_pad=True)  # what `dlm train` uses without --tokenizer
    body = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, cond_dim=16, max_position_embeddings=32)
    base = build_model("duo", tokenizer=tokenizer, seq_len=32, seed=0, **body)
    with torch.no_grad():  # a "trained" base: no zero-initialised layers, so outputs depend on the input
        for name, p in base.named_parameters():
            if "adaLN_modulation" in name or "output_layer.linear" in name:
                p.normal_(0, 0.2)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    out = tmp_path / "lora"
    common = ["train", "--variant", "duo", "--dataset", str(data), "--seq_len", "32",
              "--max_steps", "3", "--per_device_train_batch_size", "4", "--max_eval_samples", "4",
              "--output_dir", str(out), "--report_to", "none", "--use_cpu", "--save_strategy", "no",
              "--disable_tqdm", "true", "--learning_rate", "1e-2"]
    assert main([*common, "--lora_r", "4"]) == 2  # LoRA needs a trained base to adapt
    assert "--init_from" in capsys.readouterr().err
    assert main([*common, "--init_from", str(base_dir), "--lora_r", "4", "--lora_alpha", "8",
                 "--lora_target_modules", "attn_qkv,attn_out", "--merge_lora"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_nelbo"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], set(config["target_modules"])) == (4, 8, {"attn_qkv", "attn_out"})
    assert config["modules_to_save"] == ["sigma_map"] and config["base_model_name_or_path"] == str(base_dir)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").is_file()

    fresh_base = AutoModel.from_pretrained(base_dir, trust_remote_code=True)
    adapted = PeftModel.from_pretrained(fresh_base, str(out)).eval()
    merged = AutoModel.from_pretrained(out / "merged", trust_remote_code=True).eval()
    assert AutoTokenizer.from_pretrained(out / "merged").vocab_size == tokenizer.vocab_size
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=gen(0))
    sigma = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        a = adapted(input_ids=ids, sigma=sigma).logits
        m = merged(input_ids=ids, sigma=sigma).logits
        b = AutoModel.from_pretrained(base_dir, trust_remote_code=True)(input_ids=ids, sigma=sigma).logits
    assert torch.allclose(a, m, rtol=0, atol=1e-5)
    assert not torch.allclose(a, b)  # the adapter did train
