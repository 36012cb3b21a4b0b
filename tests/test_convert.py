"""Importing the authors' released checkpoints (issue 8): MDLM, Duo and Duo-distilled into dlm classes.

The checkpoints here are built in the test with random weights in every accepted layout: a Hub-style snapshot
(`config.json` with the authors' field names + safetensors or bin weights under `backbone.`), and a Lightning-style
training checkpoint (prefixed state dict, EMA shadow list, pickled Python objects in `hyper_parameters`).
`reference_dit_forward` below is an independent re-implementation of the reference DiT forward written from the
layout facts of the issue (s-sahoo/duo `models/dit.py`), not from dlm's code: the converted models must match it.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from modeling_dlm import DuoForDiffusionLM, MDLMForDiffusionLM, SDDLMForDiffusionLM
from tests.conftest import shared_data
from trainers.cli import main as dlm_main
from trainers.convert import from_reference, read_reference_checkpoint


V, D, LAYERS, HEADS, COND, LENGTH = 97, 48, 2, 4, 24, 12


# ---- the reference, from the facts ----------------------------------------------------------------------------------
def reference_state(seed: int = 0, vocab: int = V, hidden: int = D, layers: int = LAYERS, heads: int = HEADS,
                    cond: int = COND, rotary: bool = True) -> OrderedDict:
    """Random weights under the reference's parameter names, in its module registration order."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    s = OrderedDict()
    s["vocab_embed.embedding"] = rnd(vocab, hidden)
    s["sigma_map.mlp.0.weight"] = rnd(cond, 256, scale=0.2)
    s["sigma_map.mlp.0.bias"] = rnd(cond, scale=0.2)
    s["sigma_map.mlp.2.weight"] = rnd(cond, cond, scale=0.3)
    s["sigma_map.mlp.2.bias"] = rnd(cond, scale=0.2)
    if rotary:
        s["rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hidden // heads, 2).float() / (hidden // heads)))
    for i in range(layers):
        p = f"blocks.{i}."
        s[p + "norm1.weight"] = 1 + rnd(hidden, scale=0.1)
        s[p + "attn_qkv.weight"] = rnd(3 * hidden, hidden, scale=hidden**-0.5)
        s[p + "attn_out.weight"] = rnd(hidden, hidden, scale=hidden**-0.5)
        s[p + "norm2.weight"] = 1 + rnd(hidden, scale=0.1)
        s[p + "mlp.0.weight"] = rnd(4 * hidden, hidden, scale=hidden**-0.5)
        s[p + "mlp.0.bias"] = rnd(4 * hidden, scale=0.1)
        s[p + "mlp.2.weight"] = rnd(hidden, 4 * hidden, scale=(4 * hidden) ** -0.5)
        s[p + "mlp.2.bias"] = rnd(hidden, scale=0.1)
        s[p + "adaLN_modulation.weight"] = rnd(6 * hidden, cond, scale=0.2)
        s[p + "adaLN_modulation.bias"] = rnd(6 * hidden, scale=0.2)
    s["output_layer.norm_final.weight"] = 1 + rnd(hidden, scale=0.1)
    s["output_layer.linear.weight"] = rnd(vocab, hidden, scale=hidden**-0.5)
    s["output_layer.linear.bias"] = rnd(vocab, scale=0.1)
    s["output_layer.adaLN_modulation.weight"] = rnd(2 * hidden, cond, scale=0.2)
    s["output_layer.adaLN_modulation.bias"] = rnd(2 * hidden, scale=0.2)
    return s


def _layer_norm(x, weight):
    """Weight-only LayerNorm (eps 1e-5), computed in float64 here."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # "rotate_half": the half-split form
    return x * cos + rotated * sin


def reference_dit_forward(state: dict, ids: torch.Tensor, sigma: torch.Tensor | None, heads: int,
                          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The reference DiT on CPU (float32 there; float64 by default here): logits (B, L, V). sigma None = MDLM's
    constant noise level."""
    w = {k: v.to(dtype) for k, v in state.items()}
    B, L = ids.shape
    x = w["vocab_embed.embedding"][ids]  # (B, L, d)
    d = x.shape[-1]
    hd = d // heads
    sigma = torch.zeros(B, dtype=dtype) if sigma is None else sigma.to(dtype)
    k = torch.arange(128, dtype=dtype)
    args = sigma[:, None] * torch.exp(-math.log(10000.0) * k / 128)[None]  # (B, 128)
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [cos, sin], 256 features
    h = features @ w["sigma_map.mlp.0.weight"].T + w["sigma_map.mlp.0.bias"]
    h = h * torch.sigmoid(h)
    c = h @ w["sigma_map.mlp.2.weight"].T + w["sigma_map.mlp.2.bias"]
    c = c * torch.sigmoid(c)  # SiLU of the embedding: the conditioning vector
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=dtype) / hd))
    angles = torch.arange(L, dtype=dtype)[:, None] * inv[None]  # (L, hd/2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # (L, hd)
    for i in range(sum(1 for key in w if key.endswith("norm1.weight"))):
        p = f"blocks.{i}."
        mod = (c @ w[p + "adaLN_modulation.weight"].T + w[p + "adaLN_modulation.bias"])[:, None]  # (B, 1, 6d)
        shift_msa, scale_msa, gate_msa = mod[..., :d], mod[..., d:2 * d], mod[..., 2 * d:3 * d]
        shift_mlp, scale_mlp, gate_mlp = mod[..., 3 * d:4 * d], mod[..., 4 * d:5 * d], mod[..., 5 * d:]
        h = _layer_norm(x, w[p + "norm1.weight"]) * (1 + scale_msa) + shift_msa
        qkv = (h @ w[p + "attn_qkv.weight"].T).reshape(B, L, 3, heads, hd)  # packed (three, heads, head_dim)
        q, kk, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (B, H, L, hd)
        q, kk = _rotate(q, cos, sin), _rotate(kk, cos, sin)
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # non-causal
        out = (att @ v).transpose(1, 2).reshape(B, L, d) @ w[p + "attn_out.weight"].T
        x = x + gate_msa * out
        h = _layer_norm(x, w[p + "norm2.weight"]) * (1 + scale_mlp) + shift_mlp
        m = _gelu_tanh(h @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"]) @ w[p + "mlp.2.weight"].T
        x = x + gate_mlp * (m + w[p + "mlp.2.bias"])
    mod = (c @ w["output_layer.adaLN_modulation.weight"].T + w["output_layer.adaLN_modulation.bias"])[:, None]
    h = _layer_norm(x, w["output_layer.norm_final.weight"]) * (1 + mod[..., d:]) + mod[..., :d]
    return h @ w["output_layer.linear.weight"].T + w["output_layer.linear.bias"]


# ---- checkpoint layouts ---------------------------------------------------------------------------------------------
def hub_config(fmt: str, **changes) -> dict:
    """config.json of the released repos, with the authors' field names."""
    config = {"model_type": fmt, "architectures": [fmt.upper()], "vocab_size": V, "model_length": LENGTH,
              "hidden_dim": D, "cond_dim": COND, "n_blocks": LAYERS, "n_heads": HEADS, "dropout": 0.1,
              "auto_map": {"AutoConfig": f"configuration_{fmt}.{fmt.upper()}Config",
                           "AutoModelForMaskedLM": f"modeling_{fmt}.{fmt.upper()}"}}
    config.update({"time_conditioning": False} if fmt == "mdlm" else {"causal": False, "var_min": True})
    config.update(changes)
    return config


def write_hub_snapshot(folder: Path, fmt: str, state: dict, weights: str = "safetensors", **config_changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hub_config(fmt, **config_changes)))
    prefixed = {f"backbone.{k}": v.contiguous() for k, v in state.items()}
    if weights == "safetensors":
        save_file(prefixed, str(folder / "model.safetensors"))
    else:
        torch.save(prefixed, folder / "pytorch_model.bin")
    return folder


class HydraNode:
    """Stands for a pickled OmegaConf node; unpickling it for real would leave a marker file behind."""

    marker: Path | None = None

    def __init__(self, value):
        self.__dict__.update(_val=value, _metadata=None, _parent=None)

    def __setstate__(self, state):
        if HydraNode.marker is not None:
            HydraNode.marker.write_text("code from the checkpoint ran")
        self.__dict__.update(state)


class HydraConfig(HydraNode):
    def __init__(self, content):
        self.__dict__.update(_content=content, _metadata=None, _parent=None)


def write_training_checkpoint(path: Path, raw: dict, ema: dict | None, prefix: str = "backbone.",
                              extra: dict | None = None, hparams: bool = True) -> Path:
    """A Lightning-style checkpoint of the reference trainer: prefixed state dict, EMA shadow list in parameter
    order, and Python objects (a Hydra config) in `hyper_parameters`."""
    state = OrderedDict((prefix + k, v) for k, v in raw.items())
    state.update(extra or {})
    ckpt = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.2.1", "state_dict": state,
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}}, "optimizer_states": []}
    if ema is not None:
        ckpt["ema"] = {"decay": 0.9999, "num_updates": 1000, "collected_params": None,
                       "shadow_params": [v for k, v in ema.items() if k != "rotary_emb.inv_freq"]}
    if hparams:
        model = HydraConfig({"hidden_size": HydraNode(D), "n_heads": HydraNode(HEADS), "n_blocks": HydraNode(LAYERS),
                             "cond_dim": HydraNode(COND), "length": HydraNode(LENGTH), "dropout": HydraNode(0.1)})
        ckpt["hyper_parameters"] = {"config": HydraConfig({"model": model}), "tokenizer": HydraNode("gpt2")}
    torch.save(ckpt, path)
    return path


def _ids_sigma(batch: int = 3, seed: int = 1, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 1, (batch, LENGTH), generator=g), torch.tensor([0.0, 0.7, 6.9])[:batch]


def _max_diff(model, state, heads: int = HEADS, time_conditioning: bool = True) -> float:
    ids, sigma = _ids_sigma()
    with torch.no_grad():
        ours = model(input_ids=ids, sigma=sigma).logits.double()
    ref = reference_dit_forward(state, ids, sigma if time_conditioning else None, heads)
    assert ref.abs().max() > 1.0  # non-trivial logits: the check has something to compare
    return float((ours - ref).abs().max())


# ---- logit equality, every layout and variant ---------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_duo_hub_snapshot_matches_reference_forward(tmp_path, weights):
    state = reference_state(seed=0)
    folder = write_hub_snapshot(tmp_path / "duo", "duo", state, weights)
    model = from_reference(DuoForDiffusionLM, folder)
    assert model.config.hidden_size == D and model.config.num_hidden_layers == LAYERS
    assert model.config.num_attention_heads == HEADS and model.config.cond_dim == COND
    assert model.config.vocab_size == V and model.config.max_position_embeddings == LENGTH
    assert model.config.time_conditioning and model.config.hidden_dropout_prob == 0.1
    assert model.generation_config.num_steps != 8 or model.generation_config.sampler != "greedy_tail"
    assert _max_diff(model, state) <= 1e-4
    # sigma matters (a time-conditioned model): a wrong sigma convention would not pass the check above
    ids, _ = _ids_sigma(1)
    with torch.no_grad():
        a = model(input_ids=ids, sigma=torch.tensor([0.1])).logits
        b = model(input_ids=ids, sigma=torch.tensor([3.0])).logits
    assert (a - b).abs().max() > 1e-2


@pytest.mark.slow
def test_published_size_matches_reference_forward(tmp_path):
    """The released models' size (12 x 768, 12 heads, cond 128, V = 50258, 169.6M parameters), both variants, with
    weights scaled like a trained model's (logits of a few units; random unit-variance weights at this depth give
    logits of ~40, where float32 rounding alone exceeds 1e-4)."""
    sizes = dict(vocab=50258, hidden=768, layers=12, heads=12, cond=128)
    state = reference_state(seed=14, **sizes)
    state["vocab_embed.embedding"] *= 0.1
    for key in state:
        if "adaLN_modulation" in key:
            state[key] *= 0.25
    config = dict(vocab_size=50258, hidden_dim=768, n_blocks=12, n_heads=12, cond_dim=128, model_length=1024)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (2, 128), generator=g)
    sigma = torch.tensor([0.05, 3.0])
    for fmt, cls in (("duo", DuoForDiffusionLM), ("mdlm", MDLMForDiffusionLM)):
        model = from_reference(cls, write_hub_snapshot(tmp_path / fmt, fmt, state, **config))
        assert sum(p.numel() for p in model.parameters()) == 169_627_218
        with torch.no_grad():
            ours = model(input_ids=ids, sigma=sigma).logits.double()
        ref = reference_dit_forward(state, ids, sigma if fmt == "duo" else None, 12)
        assert 2.0 < ref.abs().max() < 50
        assert float((ours - ref).abs().max()) <= 1e-4, fmt
        del model


def test_mdlm_hub_snapshot_feeds_a_constant_noise_level(tmp_path):
    state = reference_state(seed=1)
    folder = write_hub_snapshot(tmp_path / "mdlm", "mdlm", state)
    model = from_reference(MDLMForDiffusionLM, folder)
    assert not model.config.time_conditioning and model.config.mask_token_id == V - 1
    assert _max_diff(model, state, time_conditioning=False) <= 1e-4
    ids, _ = _ids_sigma(1)
    with torch.no_grad():  # no time conditioning: the noise level is ignored
        a = model(input_ids=ids, sigma=torch.tensor([0.1])).logits
        b = model(input_ids=ids, sigma=torch.tensor([3.0])).logits
    assert torch.equal(a, b)


def test_duo_distilled_snapshot_gets_few_step_defaults(tmp_path):
    state = reference_state(seed=2)
    folder = write_hub_snapshot(tmp_path / "duo-distilled", "duo", state)
    model = from_reference(DuoForDiffusionLM, folder)
    assert model.generation_config.num_steps == 8 and model.generation_config.sampler == "greedy_tail"
    assert model.config.reference_source["distilled"] is True
    assert _max_diff(model, state) <= 1e-4
    plain = from_reference(DuoForDiffusionLM, folder, distilled=False)
    assert plain.generation_config.sampler != "greedy_tail" or plain.generation_config.num_steps != 8


def test_training_checkpoint_prefix_ema_and_placeholders(tmp_path):
    raw, ema = reference_state(seed=3), reference_state(seed=4)
    ema["rotary_emb.inv_freq"] = raw["rotary_emb.inv_freq"]
    marker = tmp_path / "ran.txt"
    HydraNode.marker = None
    path = write_training_checkpoint(tmp_path / "last.ckpt", raw, ema)
    HydraNode.marker = marker  # from now on, running the file's own classes would leave this file behind
    try:
        model = from_reference(DuoForDiffusionLM, path)
        no_ema = from_reference(DuoForDiffusionLM, path, use_ema=False)
    finally:
        HydraNode.marker = None
    assert not marker.exists()
    assert model.config.reference_source["ema"] is True and model.config.reference_source["prefix"] == "backbone."
    assert _max_diff(model, ema) <= 1e-4  # the EMA weights, not the raw ones
    assert _max_diff(no_ema, raw) <= 1e-4
    assert _max_diff(model, raw) > 1e-2
    # the pickled Hydra config was read through placeholders: model_length -> max_position_embeddings
    assert model.config.max_position_embeddings == LENGTH


def test_compiled_prefix_and_teacher_are_handled(tmp_path):
    raw = reference_state(seed=5)
    teacher = {f"teacher.{k}": v for k, v in reference_state(seed=55).items()}
    path = write_training_checkpoint(tmp_path / "distill.ckpt", raw, None, prefix="backbone._orig_mod.",
                                     extra=teacher, hparams=False)
    ckpt = read_reference_checkpoint(path)
    assert ckpt.prefix == "backbone._orig_mod." and "teacher." in ckpt.ignored and not ckpt.used_ema
    model = from_reference(DuoForDiffusionLM, path)
    assert _max_diff(model, raw) <= 1e-4
    as_teacher = from_reference(DuoForDiffusionLM, path, prefix="teacher.")
    assert _max_diff(as_teacher, {k[len("teacher."):]: v for k, v in teacher.items()}) <= 1e-4


def test_bare_state_dict_needs_heads_when_nothing_says(tmp_path):
    raw = reference_state(seed=6, rotary=False)
    path = tmp_path / "weights.pt"
    torch.save(dict(raw), path)
    with pytest.raises(ValueError, match="attention heads"):
        from_reference(DuoForDiffusionLM, path)
    model = from_reference(DuoForDiffusionLM, path, num_attention_heads=HEADS, max_position_embeddings=LENGTH)
    assert _max_diff(model, raw) <= 1e-4
    with pytest.raises(ValueError, match="hidden_size"):
        from_reference(DuoForDiffusionLM, path, num_attention_heads=HEADS, hidden_size=64)


# ---- refusals -------------------------------------------------------------------------------------------------------
def test_mismatched_config_and_shapes_are_refused(tmp_path):
    state = reference_state(seed=7)
    folder = write_hub_snapshot(tmp_path / "a", "duo", state, hidden_dim=64)
    with pytest.raises(ValueError, match=r"hidden_size=64 but the weights have 48"):
        from_reference(DuoForDiffusionLM, folder)
    bad = OrderedDict(state)
    bad["blocks.1.attn_out.weight"] = torch.zeros(D, D + 1)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.attn_out\.weight has shape \(48, 49\)"):
        from_reference(DuoForDiffusionLM, write_hub_snapshot(tmp_path / "b", "duo", bad))
    missing = OrderedDict((k, v) for k, v in state.items() if k != "blocks.0.norm2.weight")
    with pytest.raises(ValueError, match=r"lacks 1 reference parameters, e\.g\. backbone\.blocks\.0\.norm2\.weight"):
        from_reference(DuoForDiffusionLM, write_hub_snapshot(tmp_path / "c", "duo", missing))
    extra = OrderedDict(state)
    extra["blocks.0.attn_q_norm.weight"] = torch.ones(D)
    with pytest.raises(ValueError, match="parameters the reference DiT does not: blocks.0.attn_q_norm.weight"):
        from_reference(DuoForDiffusionLM, write_hub_snapshot(tmp_path / "d", "duo", extra))
    with pytest.raises(ValueError, match="model_type='mdlm'"):
        from_reference(DuoForDiffusionLM, write_hub_snapshot(tmp_path / "e", "mdlm", state))
    with pytest.raises(ValueError, match="causal"):
        from_reference(DuoForDiffusionLM, write_hub_snapshot(tmp_path / "f", "duo", state, causal=True))
    rope = OrderedDict(state)
    rope["rotary_emb.inv_freq"] = rope["rotary_emb.inv_freq"][:4]
    with pytest.raises(ValueError, match="config says num_attention_heads=4 but the weights have 6"):
        from_reference(DuoForDiffusionLM, write_hub_snapshot(tmp_path / "g", "duo", rope))
    with pytest.raises(ValueError, match="no released reference checkpoints"):
        from_reference(SDDLMForDiffusionLM, folder)


def test_bad_files_are_refused_without_running_code(tmp_path):
    raw, ema = reference_state(seed=8), reference_state(seed=9, layers=1)
    with pytest.raises(ValueError, match="EMA"):
        from_reference(DuoForDiffusionLM, write_training_checkpoint(tmp_path / "ema.ckpt", raw, ema, hparams=False))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises((ValueError, OSError)):
        from_reference(DuoForDiffusionLM, garbage)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in raw.items()}, "hook": EvilPayload()}, evil)
    with pytest.raises(ValueError, match="refusing"):
        from_reference(DuoForDiffusionLM, evil)
    two = tmp_path / "two.pt"
    torch.save({**{f"a.{k}": v for k, v in raw.items()}, **{f"b.{k}": v for k, v in raw.items()}}, two)
    with pytest.raises(ValueError, match="several backbones"):
        from_reference(DuoForDiffusionLM, two)
    with pytest.raises(ValueError, match="no reference DiT backbone"):
        from_reference(DuoForDiffusionLM, write_hub_snapshot(tmp_path / "h", "duo", {"x.weight": torch.ones(2)}))
    with pytest.raises(OSError, match="no such file"):
        from_reference(DuoForDiffusionLM, tmp_path / "absent")


class EvilPayload:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


# ---- a Lightning 2.x checkpoint with its OmegaConf config (issue 15, C9) --------------------------------------------
# A stand-in for omegaconf 2.3 (not a dependency of dlm): the same classes under the same module paths, built and
# pickled the way OmegaConf builds and pickles them (`Node.__getstate__` drops `_flags_cache`, a container pickles a
# copy of its `ContainerMetadata`, leaves are `AnyNode`s with `_val`), so the checkpoint names the same globals
# (builtins.dict, builtins.int, builtins.list, typing.Any, collections.defaultdict, omegaconf.*) as a real one. Where
# omegaconf itself is installed, the test runs with it as well and checks that both name the same globals. Every
# `__setstate__` of the stand-in leaves a marker file behind: unpickling it for real would show.
OMEGACONF_STAND_IN = '''"""Stand-in for omegaconf 2.3 (tests/test_convert.py): same module paths and pickled state."""
import copy
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Optional


def _ran():
    marker = os.environ.get("DLM_TEST_OMEGACONF_MARKER")
    if marker:
        with open(marker, "w") as f:
            f.write("omegaconf code from the checkpoint ran")


@dataclass
class Metadata:
    ref_type: Any
    object_type: Any
    optional: bool
    key: Any
    flags: Optional[Dict[str, bool]] = None
    flags_root: bool = False
    resolver_cache: Dict[str, Any] = field(default_factory=lambda: defaultdict(dict))

    def __setstate__(self, state):
        _ran()
        self.__dict__.update(state)


@dataclass
class ContainerMetadata(Metadata):
    key_type: Any = None
    element_type: Any = None


class Node:
    def __init__(self, parent, metadata):
        self.__dict__["_metadata"] = metadata
        self.__dict__["_parent"] = parent
        self.__dict__["_flags_cache"] = None

    def __getstate__(self):
        state = copy.copy(self.__dict__)
        del state["_flags_cache"]
        return state

    def __setstate__(self, state):
        _ran()
        self.__dict__.update(state)
        self.__dict__["_flags_cache"] = None


class AnyNode(Node):
    def __init__(self, value, key=None, parent=None):
        super().__init__(parent, Metadata(ref_type=Any, object_type=None, optional=True, key=key, flags={}))
        self.__dict__["_val"] = value


class BaseContainer(Node):
    def __getstate__(self):
        state = copy.copy(self.__dict__)
        state.pop("_flags_cache", None)
        state["_metadata"] = copy.copy(state["_metadata"])
        return state

    def _node(self, value, key):
        if isinstance(value, dict):
            return DictConfig(value, key, self)
        if isinstance(value, list):
            return ListConfig(value, key, self)
        return AnyNode(value, key, self)


class DictConfig(BaseContainer):
    def __init__(self, content, key=None, parent=None, flags=None):
        super().__init__(parent, ContainerMetadata(ref_type=Any, object_type=dict, optional=True, key=key,
                                                   flags=flags or {}, key_type=Any, element_type=Any))
        self.__dict__["_content"] = {k: self._node(v, k) for k, v in content.items()}


class ListConfig(BaseContainer):
    def __init__(self, content, key=None, parent=None):
        super().__init__(parent, ContainerMetadata(ref_type=Any, object_type=list, optional=True, key=key,
                                                   flags={}, key_type=int, element_type=Any))
        self.__dict__["_content"] = [self._node(v, i) for i, v in enumerate(content)]


AnyNode.__module__ = "omegaconf.nodes"
DictConfig.__module__ = "omegaconf.dictconfig"
ListConfig.__module__ = "omegaconf.listconfig"
'''
OMEGACONF_STAND_IN_MODULES = {"base": OMEGACONF_STAND_IN, "nodes": "from omegaconf.base import AnyNode\n",
                              "dictconfig": "from omegaconf.base import DictConfig\n",
                              "listconfig": "from omegaconf.base import ListConfig\n", "__init__": ""}

# what the reference run composes with Hydra (s-sahoo/duo `configs/config.yaml`, a tiny `model:` group), strings
# with interpolations and `${eval:...}` included: they must stay dead strings
LIGHTNING_RUN_CONFIG = {
    "mode": "train", "seed": 1,
    "loader": {"global_batch_size": 512, "eval_global_batch_size": "${.global_batch_size}",
               "num_workers": "${eval:\"len(__import__('os').sched_getaffinity(0))\"}", "pin_memory": True},
    "model": {"name": "tiny", "type": "ddit", "hidden_size": D, "cond_dim": COND, "length": LENGTH,
              "n_blocks": LAYERS, "n_heads": HEADS, "scale_by_sigma": True, "dropout": "${training.dropout}",
              "tie_word_embeddings": False},
    "algo": {"name": "duo_base", "backbone": "dit", "parameterization": "mean", "time_conditioning": True,
             "causal_attention": False, "ignore_bos": False},
    "training": {"ema": 0.9999, "dropout": 0.1, "sampling_eps": 1e-3, "finetune_path": ""},
    "trainer": {"_target_": "lightning.Trainer", "devices": "${device_count:}", "precision": "bf16"},
    "wandb": {"group": None, "tags": ["${noise.type}", "log-linear", 3, 0.5, None, True, ["nested"]]},
    "checkpointing": {"resume_ckpt_path": "???"},
}

LIGHTNING_WRITER = r'''
import json, os, sys
from collections import OrderedDict

import torch

impl, weights, out, config = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
raw, ema = torch.load(weights, weights_only=True)
if impl == "installed":
    from omegaconf import OmegaConf
    cfg = OmegaConf.create(config)
    OmegaConf.set_struct(cfg, True)  # what Hydra hands the task function
else:
    from omegaconf.dictconfig import DictConfig
    cfg = DictConfig(config, flags={"struct": True})
from tokenizers import Tokenizer, models
tokenizer = Tokenizer(models.BPE(vocab={"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}, merges=[("a", "b")]))
state = OrderedDict(("backbone." + k, v) for k, v in raw.items())
step = {"total": {"ready": 1000, "completed": 1000}, "current": {"ready": 1000, "completed": 1000}}
# the layout of lightning 2.x `_CheckpointConnector.dump_checkpoint` plus the reference's `on_save_checkpoint`
ckpt = {
    "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.2.1", "state_dict": state,
    "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 1000},
                           "epoch_loop.batch_progress": step, "epoch_progress": {"current": {"completed": 3}},
                           "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {"step": step}}}},
    "callbacks": {"ModelCheckpoint{'monitor': 'val/nll', 'mode': 'min', 'every_n_train_steps': 0, "
                  "'every_n_epochs': 1, 'train_time_interval': None}": {
                      "monitor": "val/nll", "best_model_score": torch.tensor(3.25), "best_k_models": {},
                      "best_model_path": "checkpoints/best.ckpt", "kth_value": torch.tensor(float("inf")),
                      "dirpath": "outputs/checkpoints", "last_model_path": ""}},
    "optimizer_states": [{"state": {0: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros(3)}},
                          "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                                            "amsgrad": False, "params": [0]}]}],
    "lr_schedulers": [{"base_lrs": [3e-4], "last_epoch": 1000, "_step_count": 1001, "_last_lr": [3e-4],
                       "lr_lambdas": [{}]}],
    "MixedPrecision": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
    "hparams_name": "kwargs",
    "hyper_parameters": {"config": cfg, "tokenizer": tokenizer, "vocab_size": None},
    "ema": {"decay": 0.9999, "num_updates": 1000, "collected_params": None,
            "shadow_params": [v for k, v in ema.items() if k != "rotary_emb.inv_freq"]},
    "sampler": {"random_state": None},
}
torch.save(ckpt, out)
# a plain unpickling of this file does run the config's code (the stand-in leaves its marker; omegaconf gives back
# the DictConfig it was): what the converter must not do
back = torch.load(out, weights_only=False)["hyper_parameters"]["config"]
marker = os.environ["DLM_TEST_OMEGACONF_MARKER"]
if impl == "installed":
    assert OmegaConf.to_container(back) == config
else:
    assert os.path.exists(marker), "the stand-in's __setstate__ did not run"
    os.remove(marker)
print("written")
'''


def _write_lightning_checkpoint(tmp_path: Path, impl: str, raw: dict, ema: dict) -> tuple[Path, Path, Path]:
    """Write, in a child process, a Lightning checkpoint whose `hyper_parameters["config"]` is a `DictConfig` (of the
    stand-in, or of the installed omegaconf). Returns the checkpoint, the stand-in package's folder and the marker."""
    import os
    import subprocess
    import sys

    site = tmp_path / "stand_in"
    (site / "omegaconf").mkdir(parents=True, exist_ok=True)
    for name, text in OMEGACONF_STAND_IN_MODULES.items():
        (site / "omegaconf" / f"{name}.py").write_text(text)
    weights = tmp_path / "weights.pt"
    torch.save((dict(raw), dict(ema)), weights)
    out, marker = tmp_path / f"last-{impl}.ckpt", tmp_path / "omegaconf-ran.txt"
    paths = ([] if impl == "installed" else [str(site)]) + [p for p in sys.path if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "DLM_TEST_OMEGACONF_MARKER": str(marker),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LIGHTNING_WRITER, impl, str(weights), str(out),
                           json.dumps(LIGHTNING_RUN_CONFIG)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "written" in proc.stdout, proc.stdout + proc.stderr
    assert not marker.exists()
    return out, site, marker


def _omegaconf_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("omegaconf") is not None


@pytest.mark.parametrize("impl", ["stand-in", pytest.param("installed", marks=pytest.mark.skipif(
    not _omegaconf_installed(), reason="omegaconf is not installed (the stand-in variant covers the format)"))])
def test_lightning_checkpoint_with_omegaconf_config_is_read_without_its_code(tmp_path, monkeypatch, impl):
    """The reference runs' `last.ckpt` (Lightning 2.x, `save_hyperparameters()` of a Hydra `DictConfig`) converts:
    the `builtins.dict` / `builtins.int` / `builtins.list` its metadata names are accepted, the config is read back as
    plain data, and neither omegaconf nor the stand-in's code is imported or run."""
    import sys

    from torch.serialization import get_unsafe_globals_in_checkpoint

    raw, ema = reference_state(seed=14), reference_state(seed=15)
    path, site, marker = _write_lightning_checkpoint(tmp_path, impl, raw, ema)
    names = set(get_unsafe_globals_in_checkpoint(str(path)))
    assert {"builtins.dict", "builtins.int", "builtins.list", "omegaconf.dictconfig.DictConfig",
            "omegaconf.listconfig.ListConfig", "omegaconf.nodes.AnyNode", "omegaconf.base.ContainerMetadata",
            "typing.Any"} <= names
    if impl == "installed":  # the stand-in names exactly what the real omegaconf does
        stand_in, _, _ = _write_lightning_checkpoint(tmp_path / "s", "stand-in", raw, ema)
        assert set(get_unsafe_globals_in_checkpoint(str(stand_in))) == names

    def loaded_omegaconf() -> set:
        return {m for m, mod in sys.modules.items() if m.split(".")[0] == "omegaconf" and mod is not None}

    before = loaded_omegaconf()
    monkeypatch.syspath_prepend(str(site))  # importable here, so any import of the stand-in would run its code ...
    monkeypatch.setenv("DLM_TEST_OMEGACONF_MARKER", str(marker))
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # ... were it not that any import of omegaconf now fails
    ckpt = read_reference_checkpoint(path)
    model = from_reference(DuoForDiffusionLM, path)
    assert not marker.exists() and loaded_omegaconf() == before
    assert ckpt.config == LIGHTNING_RUN_CONFIG  # the whole run config, as plain data; interpolations stay strings
    assert ckpt.used_ema and ckpt.prefix == "backbone."
    # heads and length are in the config only (the weights cannot tell them): they were read from the DictConfig
    assert model.config.num_attention_heads == HEADS and model.config.max_position_embeddings == LENGTH
    assert isinstance(model.config.hidden_dropout_prob, float)  # `${training.dropout}` is no value, not a string
    assert _max_diff(model, ema) <= 1e-4


@pytest.mark.parametrize("name", ["eval", "exec", "compile", "getattr", "setattr", "__import__", "open", "type",
                                  "breakpoint"])
def test_builtins_that_are_not_data_types_are_refused(tmp_path, name):
    """Only plain data types of `builtins` are accepted; a callable that can run code is refused, by name, even next
    to the data types a config names."""
    import builtins

    raw = reference_state(seed=16)
    ok = tmp_path / "types.ckpt"
    data_types = [dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool, object]
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in raw.items()}, "types": data_types}, ok)
    assert read_reference_checkpoint(ok).prefix == "backbone."
    bad = tmp_path / f"{name}.ckpt"
    hook = getattr(builtins, name)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in raw.items()}, "types": data_types, "hook": hook}, bad)
    with pytest.raises(ValueError, match="refusing") as err:
        from_reference(DuoForDiffusionLM, bad)
    # named as pickle names it (`open` is `io.open`); the data types beside it are not what is refused
    assert f"names {hook.__module__}.{name} in" in str(err.value)


def test_eval_payload_is_refused_without_running(tmp_path):
    """The classic payload, `builtins.eval` by REDUCE, is refused before anything is unpickled."""
    marker = tmp_path / "ran.txt"
    evil = tmp_path / "eval.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in reference_state(seed=17).items()},
                "hook": EvalPayload(f"open({str(marker)!r}, 'w').write('pwned')")}, evil)
    with pytest.raises(ValueError, match=r"builtins\.eval.*refusing"):
        from_reference(DuoForDiffusionLM, evil)
    assert not marker.exists()


class EvalPayload:
    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return (eval, (self.source,))


# ---- the converted model works with the rest of dlm -----------------------------------------------------------------
def test_converted_model_saves_reloads_generates_and_evaluates(tmp_path):
    state = reference_state(seed=10)
    model = from_reference(MDLMForDiffusionLM, write_hub_snapshot(tmp_path / "src", "mdlm", state))
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids, sigma = _ids_sigma()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, sigma=sigma).logits, reloaded(input_ids=ids, sigma=sigma).logits)
        nelbo = reloaded.nelbo(ids, generator=torch.Generator().manual_seed(0))
    assert nelbo.shape == (3,) and torch.isfinite(nelbo).all()
    out = reloaded.generate(batch_size=2, max_new_tokens=LENGTH, num_steps=4,
                            generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, LENGTH) and int(out.max()) < V - 1  # every mask replaced by a real token


def test_cli_convert_then_finetune_with_lora(tmp_path):
    """`dlm convert` with the GPT-2 tokenizer, then `dlm train --init_from` (LoRA) on real text."""
    vocab = 50258  # GPT-2 + [PAD], the reference's Duo vocabulary
    state = reference_state(seed=11, vocab=vocab, hidden=32, heads=4, cond=16, layers=1)
    src = write_hub_snapshot(tmp_path / "duo-owt", "duo", state, vocab_size=vocab, hidden_dim=32, cond_dim=16,
                             n_blocks=1, model_length=32)
    out = tmp_path / "converted"
    tok = shared_data("tokenizers", "gpt2")
    assert dlm_main(["convert", str(src), str(out), "--from", "duo", "--tokenizer", str(tok)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "duo" and config["vocab_size"] == vocab and config["pad_token_id"] == 50257
    assert (out / "tokenizer.json").is_file() and (out / "modeling_dlm.py").is_file()
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    sigma = torch.tensor([0.3, 1.2])
    with torch.no_grad():
        diff = (model(input_ids=ids, sigma=sigma).logits.double() - reference_dit_forward(state, ids, sigma, 4))
    assert float(diff.abs().max()) <= 1e-4
    # refusals of the CLI: occupied output folder, unknown format, a tokenizer that cannot fill the vocabulary
    assert dlm_main(["convert", str(src), str(out), "--from", "duo"]) == 2
    assert dlm_main(["convert", str(src), str(tmp_path / "x"), "--from", "sedd"]) == 2
    small = write_hub_snapshot(tmp_path / "small", "duo", reference_state(seed=12))
    assert dlm_main(["convert", str(small), str(tmp_path / "y"), "--from", "duo", "--tokenizer", str(tok)]) == 2
    # MDLM: the tokenizer's new [MASK] lands on the model's mask id, and eos pads (no free row for a [PAD])
    mdlm_state = reference_state(seed=15, vocab=vocab, hidden=32, heads=4, cond=16, layers=1)
    mdlm_src = write_hub_snapshot(tmp_path / "mdlm-owt", "mdlm", mdlm_state, vocab_size=vocab, hidden_dim=32,
                                  cond_dim=16, n_blocks=1, model_length=32)
    assert dlm_main(["convert", str(mdlm_src), str(tmp_path / "mdlm"), "--from", "mdlm", "--tokenizer", str(tok)]) == 0
    mdlm_config = json.loads((tmp_path / "mdlm" / "config.json").read_text())
    assert mdlm_config["mask_token_id"] == 50257 and mdlm_config["pad_token_id"] == mdlm_config["eos_token_id"]
    from transformers import AutoTokenizer

    mdlm_tok = AutoTokenizer.from_pretrained(tmp_path / "mdlm")
    assert (len(mdlm_tok), mdlm_tok.mask_token_id) == (vocab, 50257)
    # the converted folder passes `dlm push`'s allowlist (dry run: what would be uploaded)
    assert dlm_main(["push", str(out), "my-org/duo-owt", "--dry_run"]) == 0
    # fine-tune the converted model with LoRA on real text
    text = tmp_path / "text.txt"
    text.write_text(shared_data("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:8_000])
    ft = tmp_path / "ft"
    rc = dlm_main(["train", "--variant", "duo", "--init_from", str(out), "--tokenizer", str(out),
                   "--dataset", str(text), "--seq_len", "32", "--max_train_samples", "16", "--max_eval_samples",
                   "4", "--max_steps", "2", "--per_device_train_batch_size", "2", "--output_dir", str(ft),
                   "--lora_r", "4", "--merge_lora", "true", "--report_to", "none", "--save_strategy", "no",
                   "--disable_tqdm", "true", "--use_cpu", "true"])
    assert rc == 0
    merged = AutoModel.from_pretrained(ft / "merged", trust_remote_code=True)
    assert merged.config.vocab_size == vocab


def test_cli_convert_by_hub_repo_id(tmp_path):
    """`dlm convert REPO_ID` downloads config + safetensors from a Hub-protocol server (tests/hub_server.py), as it
    would from huggingface.co, in a fresh process with an empty HF_HOME."""
    import os
    import subprocess
    import sys

    from huggingface_hub import HfApi

    from tests.hub_server import HubServer

    state = reference_state(seed=13)
    snapshot = write_hub_snapshot(tmp_path / "snapshot", "duo", state)
    with HubServer() as hub:
        api = HfApi(endpoint=hub.url, token="hf_test")
        api.create_repo("dlm-test/duo-distilled")
        api.upload_folder(repo_id="dlm-test/duo-distilled", folder_path=str(snapshot))
        drop = ("PYTHON", "HF_", "HUGGINGFACE_", "TRANSFORMERS_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN="hf_test",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
        out = tmp_path / "converted"
        proc = subprocess.run([sys.executable, "-m", "trainers.cli", "convert", "dlm-test/duo-distilled", str(out),
                               "--from", "duo"], capture_output=True, text=True, env=env, timeout=300,
                              cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        fetched = {path for method, path, status in hub.requests if method == "GET" and status == 200}
    assert any(p.endswith("/model.safetensors") for p in fetched)  # safetensors preferred: no .bin requested
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["source"] == "dlm-test/duo-distilled" and info["distilled"] is True
    assert info["generation"] == {"num_steps": 8, "sampler": "greedy_tail"}
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert _max_diff(model, state) <= 1e-4
