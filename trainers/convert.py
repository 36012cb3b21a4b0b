"""Import the authors' released checkpoints into dlm classes: MDLM (arXiv 2406.07524, `kuleshov-group/mdlm-owt`),
Duo and Duo-distilled (arXiv 2506.10892, `s-sahoo/duo`, `s-sahoo/duo-distilled`).

Both families run the DiT of `s-sahoo/duo` / `kuleshov-group/mdlm` `models/dit.py` (methods.md §D), which
`modeling_dit.py` reproduces term by term (weight-only float32 LayerNorm, packed (three, heads, head_dim) qkv,
adaLN chunks in the order shift/scale/gate for attention then MLP, half-split rotary on q and k with base 10000,
sinusoidal [cos, sin] time features of sigma = -log alpha_t with 256 frequencies, GELU(tanh) MLP, untied
embeddings). Converting is therefore a renaming of parameters plus a translation of the config; no tensor is
reshaped or transformed. `tests/test_convert.py` checks the logits against an independent re-implementation of the
reference forward.

Accepted sources:
- a Hub repo id (downloaded through transformers' `cached_file`; needs network),
- a local snapshot of such a repo: `config.json` with the authors' field names (`hidden_dim`, `n_blocks`, `n_heads`,
  `cond_dim`, `model_length`, ...) and `model.safetensors` (preferred), `pytorch_model.bin`, or a sharded index,
- a training checkpoint file (Lightning `.ckpt`, `.pt`, `.bin` or `.safetensors`) whose state dict holds the backbone
  under a prefix (`backbone.`, `model.backbone.`, `backbone._orig_mod.`, ...), with the EMA shadow weights of the
  reference `ExponentialMovingAverage` (`checkpoint["ema"]["shadow_params"]`) when present.

Pickled files are read only with `torch.load(weights_only=True)`. The reference's Lightning checkpoints also pickle
Python objects (its OmegaConf config, the tokenizer); their class names are registered, for that one load only, as
inert placeholders that record their arguments: nothing the file names is imported or run, and only tensors are used.
The OmegaConf `DictConfig` in `hyper_parameters` is read back from those placeholders (`_content` / `_val`) as plain
data; its metadata names a few builtin data types (`object_type=dict`, `key_type=int`), which are accepted, as
placeholders too. Names from modules that can reach the system (`os`, `sys`, `subprocess`, ...) and every other
builtin (`eval`, `exec`, `getattr`, `__import__`, ...) are refused outright.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

REFERENCE_FORMATS = ("duo", "mdlm")
FREQUENCY_EMBEDDING_SIZE = 256  # the reference TimestepEmbedder's sinusoidal width

# reference parameter name (without prefix) -> dlm parameter name
_TOP_LEVEL = {
    "vocab_embed.embedding": "embed_tokens.weight",
    "sigma_map.mlp.0.weight": "backbone.sigma_map.mlp.0.weight",
    "sigma_map.mlp.0.bias": "backbone.sigma_map.mlp.0.bias",
    "sigma_map.mlp.2.weight": "backbone.sigma_map.mlp.2.weight",
    "sigma_map.mlp.2.bias": "backbone.sigma_map.mlp.2.bias",
    "output_layer.norm_final.weight": "backbone.output_layer.norm_final.weight",
    "output_layer.linear.weight": "backbone.output_layer.linear.weight",
    "output_layer.linear.bias": "backbone.output_layer.linear.bias",
    "output_layer.adaLN_modulation.weight": "backbone.output_layer.adaLN_modulation.weight",
    "output_layer.adaLN_modulation.bias": "backbone.output_layer.adaLN_modulation.bias",
}
_PER_BLOCK = {
    "norm1.weight": "norm1.weight",
    "attn_qkv.weight": "attn.attn_qkv.weight",
    "attn_out.weight": "attn.attn_out.weight",
    "norm2.weight": "norm2.weight",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight",
    "mlp.2.bias": "mlp.fc2.bias",
    "adaLN_modulation.weight": "adaLN_modulation.weight",
    "adaLN_modulation.bias": "adaLN_modulation.bias",
}
_ROTARY_BUFFER = "rotary_emb.inv_freq"  # a persistent buffer in the reference; recomputed by dlm
_ANCHOR = "vocab_embed.embedding"  # every reference backbone has it; what precedes it is the prefix
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

# the authors' config names -> dlm's (HF repos use the first column of each pair; Hydra `model:` groups the second)
_CONFIG_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_dim": "hidden_size",
    "hidden_size": "hidden_size",
    "n_blocks": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "cond_dim": "cond_dim",
    "model_length": "max_position_embeddings",
    "length": "max_position_embeddings",
    "dropout": "hidden_dropout_prob",
    "time_conditioning": "time_conditioning",
}
_REFUSED_MODULES = ("builtins", "os", "posix", "nt", "sys", "subprocess", "shutil", "importlib", "socket", "runpy",
                    "pty", "code", "ctypes", "pickle", "marshal", "io", "webbrowser", "multiprocessing", "_io",
                    "_posixsubprocess")
# The only `builtins` names a checkpoint may use: plain data types. A pickled OmegaConf config names them as values in
# its node metadata (`ContainerMetadata(object_type=dict, key_type=int)`, a ListConfig's `object_type=list`, a typed
# node's `ref_type=str|int|float|bool`, `resolver_cache=defaultdict(dict)`). Like every other name in the file they
# become inert placeholders (`_torch_load`), so not even their constructors run; and were one called, it could only
# build a value of that type from values already in the pickle. Everything else in builtins stays refused: `eval`,
# `exec`, `compile`, `__import__`, `getattr`/`setattr`, `open`, `breakpoint`, `type` (builds classes), ...
_INERT_BUILTINS = frozenset(f"builtins.{t}" for t in (
    "dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "complex", "bool",
    "object"))
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


@dataclass
class ReferenceCheckpoint:
    """A reference backbone read from disk or the Hub: state dict with the prefix stripped (reference names), the
    authors' config fields (possibly empty) and where it came from."""

    state_dict: dict[str, torch.Tensor]
    config: dict
    source: str
    prefix: str = ""
    used_ema: bool = False
    ignored: list[str] = field(default_factory=list)


# ---- reading --------------------------------------------------------------------------------------------------------
class _InertPickledObject:
    """Stands in for a class or function named inside a pickle. Creating, calling or building it only records the
    arguments and state; it has no other behaviour."""

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):  # also what pickle's NEWOBJ calls (a DictConfig, a tokenizer), without __init__
        self = super().__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        return self

    def __init__(self, *args, **kwargs):
        pass  # __new__ recorded the arguments

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.pickled_name}>"


def _placeholder(name: str) -> type:
    return type("InertPickledObject", (_InertPickledObject,), {"pickled_name": name})


def _torch_load(path: Path) -> object:
    """`torch.load(weights_only=True)`; classes the file names are replaced by inert placeholders (see module doc)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    try:
        names, mmap = get_unsafe_globals_in_checkpoint(str(path)), True
    except (RuntimeError, ValueError, OSError):
        names, mmap = [], False  # not a zip-format checkpoint: the plain weights-only load below decides
    refused = [n for n in names if n.split(".", 1)[0] in _REFUSED_MODULES and n not in _INERT_BUILTINS]
    if refused:
        raise ValueError(f"{path} names {', '.join(sorted(refused))} in its pickle; refusing to read it (a model "
                         f"checkpoint has no reason to reference these)")
    try:
        with safe_globals([(_placeholder(n), n) for n in names]):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # UnpicklingError and the RuntimeError torch wraps it in
        if "weights_only" not in str(err) and "Unpickl" not in type(err).__name__ + str(err):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} cannot be read with torch.load(weights_only=True): {reason}. Save its state dict "
                         f"alone (torch.save(checkpoint['state_dict'], 'weights.pt')) in an environment you trust, "
                         f"or use the repo's safetensors file") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from transformers.modeling_utils import load_state_dict

    try:
        return load_state_dict(str(path))
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None


def _read_weights_file(path: Path) -> object:
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{path} has no `weight_map`")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            part = _read_weights_file(path.parent / shard)
            if not isinstance(part, dict):
                raise ValueError(f"shard {shard} of {path} does not hold a state dict")
            state.update(part)
        return state
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _torch_load(path)


def _fetch(src: str, revision: str | None, token, cache_dir) -> Path:
    """Download a Hub repo's config and weights (safetensors preferred) with transformers' `cached_file`; returns
    the local folder."""
    from transformers.utils import cached_file

    common = dict(revision=revision, token=token, cache_dir=cache_dir, _raise_exceptions_for_missing_entries=False)
    config = cached_file(src, "config.json", **common)
    if config is None:
        raise OSError(f"{src!r} is neither a local path nor a Hub repo with a config.json")
    for name in _WEIGHT_FILES:
        path = cached_file(src, name, **common)
        if path is not None:
            if name.endswith(".index.json"):
                for shard in sorted(set(json.loads(Path(path).read_text())["weight_map"].values())):
                    cached_file(src, shard, **common)
            return Path(path).parent
    raise OSError(f"Hub repo {src!r} has none of {', '.join(_WEIGHT_FILES)}")


def _state_dict_of(obj: object, where: str) -> tuple[dict[str, torch.Tensor], object]:
    """(state dict, EMA record or None) from a loaded checkpoint object."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} holds a {type(obj).__name__}, not a checkpoint dictionary")
    ema = obj.get("ema")
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner, ema
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and (len(tensors) == len(obj) or any(k.endswith(_ANCHOR) for k in tensors)):  # a bare state dict
        return tensors, None
    raise ValueError(f"{where} has no state dict of tensors (top-level keys: {', '.join(map(str, list(obj)[:12]))})")


def _detect_prefix(state: dict[str, torch.Tensor], prefix: str | None, where: str) -> tuple[str, list[str]]:
    candidates = sorted(k[: -len(_ANCHOR)] for k in state if k.endswith(_ANCHOR))
    if prefix is not None:
        if prefix not in candidates:
            raise ValueError(f"prefix {prefix!r} does not hold a reference backbone in {where}; found backbones "
                             f"under {candidates or 'no prefix at all'}")
        return prefix, [p for p in candidates if p != prefix]
    if not candidates:
        raise ValueError(f"{where} holds no reference DiT backbone: no key ends with {_ANCHOR!r}")
    if len(candidates) == 1:
        return candidates[0], []
    # several backbones (e.g. a distillation checkpoint with its teacher): take the one named `backbone`
    named = [p for p in candidates if re.search(r"(^|\.)backbone\.(_orig_mod\.)?$", p)]
    if len(named) == 1:
        return named[0], [p for p in candidates if p != named[0]]
    raise ValueError(f"{where} holds several backbones under the prefixes {candidates}; choose one with `prefix=`")


def _apply_ema(state: dict[str, torch.Tensor], ema: object, where: str) -> None:
    """Replace the parameters by the reference `ExponentialMovingAverage` shadow weights, which are stored as a list
    in the order of `backbone.parameters()` (module registration order = the state dict's order, buffers skipped)."""
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in shadow):
        raise ValueError(f"the EMA record of {where} has no list of `shadow_params` tensors")
    names = [k for k in state if k != _ROTARY_BUFFER]
    if len(shadow) < len(names):
        raise ValueError(f"the EMA of {where} has {len(shadow)} shadow parameters for a backbone of {len(names)}")
    for name, value in zip(names, shadow):
        if tuple(value.shape) != tuple(state[name].shape):
            raise ValueError(f"the EMA shadow of {name} in {where} has shape {tuple(value.shape)}, the weight "
                             f"{tuple(state[name].shape)}: the EMA does not belong to this backbone")
    for name, value in zip(names, shadow):
        state[name] = value


def read_reference_checkpoint(
    src: str | os.PathLike,
    prefix: str | None = None,
    use_ema: bool = True,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ReferenceCheckpoint:
    """Read a reference backbone (Hub repo id, local snapshot folder or training checkpoint file), strip its prefix,
    and swap in the EMA weights when the checkpoint has them and `use_ema` is True."""
    path = Path(src)
    if not path.exists():
        if str(src).startswith((".", "/", "~")) or str(src).count("/") > 1:
            raise OSError(f"no such file or folder: {src}")
        path = _fetch(str(src), revision, token, cache_dir)
    config: dict = {}
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
        weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise OSError(f"{path} has none of {', '.join(_WEIGHT_FILES)}")
    else:
        weights = path
        sibling = path.parent / "config.json"
        if sibling.is_file():
            config = json.loads(sibling.read_text())
    where = str(weights)
    loaded = _read_weights_file(weights)
    state, ema = _state_dict_of(loaded, where)
    if not config and isinstance(loaded, dict):
        config = _plain_hyper_parameters(loaded.get("hyper_parameters"))
    prefix, others = _detect_prefix(state, prefix, where)
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = [p or "(no prefix)" for p in others]
    ignored += sorted({k.split(".", 1)[0] for k in state if not k.startswith(prefix) and
                       not any(k.startswith(p) for p in others)})
    used_ema = False
    if ema is not None and use_ema:
        _apply_ema(backbone, ema, where)
        used_ema = True
    return ReferenceCheckpoint(state_dict=backbone, config=config, source=where, prefix=prefix, used_ema=used_ema,
                               ignored=ignored)


def _plain(obj: object, _path: frozenset = frozenset()) -> object:
    """Best-effort plain Python view of a pickled OmegaConf tree made of placeholders: a `DictConfig` / `ListConfig`
    pickles its `__dict__` as `{"_metadata", "_parent", "_content"}`, a leaf node (`AnyNode`, `IntegerNode`, ...) as
    `{"_metadata", "_parent", "_val"}`. Metadata and parent links are not followed; a cycle reads as None.
    Interpolations (`${...}`) and `???` stay the strings they were pickled as: nothing is resolved or evaluated."""
    if id(obj) in _path:
        return None
    inner = _path | {id(obj)}
    if isinstance(obj, _InertPickledObject):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in state:
            return _plain(state["_content"], inner)
        if "_val" in state:
            return _plain(state["_val"], inner)
        return None
    if isinstance(obj, dict):
        return {k: _plain(v, inner) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, inner) for v in obj]
    return obj


def _plain_hyper_parameters(hparams: object) -> dict:
    """The run's config from a Lightning checkpoint's `hyper_parameters` (a dict or a placeholder OmegaConf tree)."""
    plain = _plain(hparams)
    if isinstance(plain, dict) and isinstance(plain.get("config"), dict):
        plain = plain["config"]
    return plain if isinstance(plain, dict) else {}


# ---- translating ----------------------------------------------------------------------------------------------------
def _unresolved(value: object) -> bool:
    """An OmegaConf interpolation (`${model.length}`) or missing value (`???`) read from a pickled config: no value."""
    return isinstance(value, str) and (value.strip() == "???" or "${" in value)


def _flatten_config(config: dict) -> dict:
    """The authors' architecture fields, from an HF config (`hidden_dim`, ...), a Hydra run config (`model:` group)
    or a `PyTorchModelHubMixin` config (`{"config": {...}, "vocab_size": ...}`)."""
    flat: dict = {}
    nested = config.get("config") if isinstance(config.get("config"), dict) else config
    model = nested.get("model") if isinstance(nested.get("model"), dict) else {}
    for source in (model, config):
        for key, name in _CONFIG_NAMES.items():
            if key in source and name not in flat and not isinstance(source[key], dict) and \
                    not _unresolved(source[key]):
                flat[name] = source[key]
    algo = nested.get("algo") if isinstance(nested.get("algo"), dict) else {}
    causal = config.get("causal", algo.get("causal_attention", False))
    if causal:
        flat["causal"] = True
    if "model_type" in config:
        flat["model_type"] = config["model_type"]
    return flat


def _architecture(state: dict[str, torch.Tensor], where: str) -> dict:
    """Sizes read off the weights themselves."""
    missing = [k for k in ("vocab_embed.embedding", "sigma_map.mlp.0.weight") if k not in state]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}: not a reference DiT backbone")
    vocab, hidden = state["vocab_embed.embedding"].shape
    cond, freq = state["sigma_map.mlp.0.weight"].shape
    if freq != FREQUENCY_EMBEDDING_SIZE:
        raise ValueError(f"sigma_map.mlp.0.weight has shape {(cond, freq)}: the reference time embedding has "
                         f"{FREQUENCY_EMBEDDING_SIZE} sinusoidal features")
    layers = sorted({int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{where} has blocks {layers}; expected blocks 0..N-1")
    fc1 = state.get("blocks.0.mlp.0.weight")
    if fc1 is None:
        raise ValueError(f"{where} lacks blocks.0.mlp.0.weight")
    arch = {"vocab_size": int(vocab), "hidden_size": int(hidden), "cond_dim": int(cond),
            "num_hidden_layers": len(layers), "intermediate_size": int(fc1.shape[0])}
    inv_freq = state.get(_ROTARY_BUFFER)
    if inv_freq is not None:
        head_dim = 2 * inv_freq.numel()
        if head_dim == 0 or hidden % head_dim:
            raise ValueError(f"{_ROTARY_BUFFER} has {inv_freq.numel()} entries, which fits no head size of "
                             f"hidden size {hidden}")
        arch["num_attention_heads"] = hidden // head_dim
        if head_dim > 2:
            arch["rope_theta"] = float(inv_freq[1].double() ** (-head_dim / 2))
    return arch


def reference_config_kwargs(ckpt: ReferenceCheckpoint, fmt: str, **overrides) -> dict:
    """dlm config fields for a reference checkpoint: sizes from the weights, the rest from the authors' config,
    every value given in both checked against the other. `overrides` (e.g. `num_attention_heads=12`) fill gaps."""
    if fmt not in REFERENCE_FORMATS:
        raise ValueError(f"`from` must be one of {REFERENCE_FORMATS}, got {fmt!r}")
    arch = _architecture(ckpt.state_dict, ckpt.source)
    named = _flatten_config(ckpt.config)
    declared = named.pop("model_type", None)
    if isinstance(declared, str) and declared.lower() in REFERENCE_FORMATS and declared.lower() != fmt:
        raise ValueError(f"{ckpt.source}: its config says model_type={declared!r}, but it is being converted as "
                         f"{fmt!r}")
    if named.pop("causal", False):
        raise ValueError(f"{ckpt.source} is a causal (autoregressive) DiT; only the diffusion backbones convert")
    for name, value in named.items():
        if name in arch and name != "rope_theta" and value != arch[name]:
            raise ValueError(f"{ckpt.source}: the config says {name}={value!r} but the weights have {arch[name]!r}; "
                             f"config and weights do not belong together")
    kwargs = {**named, **arch}
    for name, value in overrides.items():
        if value is None:
            continue
        if name in arch and value != arch[name]:
            raise ValueError(f"{name}={value!r} does not fit the weights of {ckpt.source} ({arch[name]!r})")
        kwargs[name] = value
    if "num_attention_heads" not in kwargs:
        raise ValueError(f"the number of attention heads of {ckpt.source} is in neither its config nor its weights; "
                         f"pass num_attention_heads (12 for the papers' small model)")
    if kwargs["hidden_size"] % kwargs["num_attention_heads"]:
        raise ValueError(f"num_attention_heads={kwargs['num_attention_heads']} does not divide the hidden size "
                         f"{kwargs['hidden_size']} of {ckpt.source}")
    theta = kwargs.get("rope_theta", 10000.0)
    if not math.isfinite(theta) or theta <= 1:
        raise ValueError(f"{_ROTARY_BUFFER} of {ckpt.source} implies a rotary base of {theta!r}")
    kwargs["rope_theta"] = float(round(theta, 3)) if abs(theta - round(theta)) < 1e-2 * theta else theta
    if fmt == "duo":
        kwargs["time_conditioning"] = True
        if named.get("time_conditioning") is False:
            raise ValueError(f"{ckpt.source} is not time-conditioned; a uniform-state (Duo) model must be")
    else:
        kwargs.setdefault("time_conditioning", False)
    return kwargs


def rename_state_dict(state: dict[str, torch.Tensor], num_layers: int, head_dim: int | None = None,
                      rope_theta: float = 10000.0, where: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """Reference names -> dlm names; unknown or missing keys are refused, the rotary buffer is checked and dropped."""
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        if key == _ROTARY_BUFFER:
            if head_dim is not None:
                steps = torch.arange(0, head_dim, 2, dtype=torch.float64)
                expected = 1.0 / (rope_theta ** (steps / head_dim))
                if value.shape != expected.shape or not torch.allclose(value.double(), expected, rtol=1e-4):
                    raise ValueError(f"{_ROTARY_BUFFER} of {where} does not match rotary base {rope_theta} and head "
                                     f"size {head_dim}")
            continue
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
            continue
        match = _BLOCK_KEY.match(key)
        if match and match.group(2) in _PER_BLOCK and int(match.group(1)) < num_layers:
            out[f"backbone.blocks.{match.group(1)}.{_PER_BLOCK[match.group(2)]}"] = value
            continue
        unexpected.append(key)
    if unexpected:
        raise ValueError(f"{where} has parameters the reference DiT does not: {', '.join(unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
    expected_keys = set(_TOP_LEVEL.values()) | {
        f"backbone.blocks.{i}.{name}" for i in range(num_layers) for name in _PER_BLOCK.values()}
    missing = sorted(expected_keys - set(out))
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} reference parameters, e.g. {', '.join(missing[:6])}")
    return out


#: the released reference checkpoints each dlm variant can be built from (model_type -> reference format)
REFERENCE_FORMATS = {"duo": "duo", "mdlm": "mdlm"}


def from_reference(
    model_class,
    src: str | os.PathLike,
    prefix: str | None = None,
    use_ema: bool = True,
    distilled: bool | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    **config_overrides,
):
    r"""Build `model_class` (`DuoForDiffusionLM` or `MDLMForDiffusionLM`) from the authors' released weights (MDLM:
    `kuleshov-group/mdlm-owt`; Duo: `s-sahoo/duo`, `s-sahoo/duo-distilled`), with logits equal to the reference DiT's.

    Args:
        model_class: the dlm class to build; its `config_class.model_type` picks the reference format.
        src: a Hub repo id, a local snapshot of one (`config.json` + safetensors or bin weights), or a training
            checkpoint file whose state dict holds the backbone under a prefix (Lightning `.ckpt`, `.pt`).
        prefix: the backbone's key prefix; detected (`backbone.`, `model.backbone.`, ...) when None.
        use_ema: use the EMA shadow weights of a training checkpoint when it has them (the papers evaluate them).
        distilled: set few-step generation defaults (8 steps, greedy tail); None: when `src` names a distilled
            checkpoint ("distill" in the name).
        config_overrides: dlm config fields the source does not fix, e.g. `num_attention_heads` for a bare state
            dict, `max_position_embeddings`, `pad_token_id`, `eos_token_id`. Sizes must fit the weights.
    """
    model_type = getattr(getattr(model_class, "config_class", None), "model_type", None)
    if model_type not in REFERENCE_FORMATS:
        name = getattr(model_class, "__name__", model_class)
        raise ValueError(f"{name} (model_type {model_type!r}) has no released reference checkpoints to convert; use "
                         f"DuoForDiffusionLM or MDLMForDiffusionLM")
    fmt = REFERENCE_FORMATS[model_type]
    ckpt = read_reference_checkpoint(src, prefix=prefix, use_ema=use_ema, revision=revision, token=token,
                                     cache_dir=cache_dir)
    kwargs = reference_config_kwargs(ckpt, fmt, **config_overrides)
    config = model_class.config_class(**kwargs)
    head_dim = config.hidden_size // config.num_attention_heads
    renamed = rename_state_dict(ckpt.state_dict, config.num_hidden_layers, head_dim, config.rope_theta, ckpt.source)
    model = model_class(config)
    expected = model.state_dict()
    for name, value in renamed.items():
        if name not in expected:
            raise ValueError(f"{name} has no counterpart in {model_class.__name__}")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"{ckpt.source}: {name} has shape {tuple(value.shape)} but {model_class.__name__} with "
                             f"this config needs {tuple(expected[name].shape)}")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ValueError(f"{ckpt.source}: {name} is not a finite floating-point tensor")
    result = model.load_state_dict({k: v.to(torch.float32) for k, v in renamed.items()}, strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith("inv_freq")]
    if leftover or result.unexpected_keys:
        raise ValueError(f"conversion left parameters unset: {leftover or result.unexpected_keys}")
    model.eval()
    if distilled is None:
        distilled = fmt == "duo" and "distill" in str(src).lower()
    if distilled:
        model.generation_config.num_steps = 8
        model.generation_config.sampler = "greedy_tail"
    model.config.reference_source = {"format": fmt, "source": str(src), "prefix": ckpt.prefix, "ema": ckpt.used_ema,
                                     "distilled": bool(distilled)}
    logger.info("converted %s (%s, prefix %r, %s weights%s) into %s: %d layers, hidden %d, vocab %d", src, fmt,
                ckpt.prefix, "EMA" if ckpt.used_ema else "raw",
                f"; ignored {', '.join(ckpt.ignored)}" if ckpt.ignored else "", model_class.__name__,
                config.num_hidden_layers, config.hidden_size, config.vocab_size)
    return model
