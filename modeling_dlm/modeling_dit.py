"""The DiT backbone shared by every dlm variant: the MDLM/Duo "DDiT" (methods.md §D).

Reference: `s-sahoo/duo` and `kuleshov-group/mdlm`, `models/dit.py` (MDLM, arXiv 2406.07524; Duo, arXiv 2506.10892).
The network maps input embeddings and a per-sequence noise level to vocabulary logits. It knows nothing about
schedules, losses or sampling.

Notable choices (all as in the reference):
- adaLN-Zero blocks: the conditioning vector c = SiLU(TimestepEmbedder(sigma)) gives (shift, scale, gate) for the
  attention and MLP branches; the modulation layers are zero-initialised, so every block starts as the identity.
- weight-only LayerNorm computed in float32; bias-free qkv/out projections; MLP Linear-GELU(tanh)-Linear with biases.
- rotary position embeddings (rotate-half form, base `rope_theta`) on q and k.
- non-causal attention through transformers' `ALL_ATTENTION_FUNCTIONS` (SDPA by default) with an eager fallback.
- the final layer (LayerNorm + adaLN shift/scale + Linear to the vocabulary) is zero-initialised, so an untrained model
  predicts uniform logits. Input and output embeddings are untied.
- time conditioning can be switched off (MDLM): the noise level is then replaced by zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dlm import DiffusionLMConfig


class DiTLayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 (the reference `LayerNorm`)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)
            return y * self.weight.float()[None, None, :]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift; shift and scale are (B, 1, d)."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level (256 dims, [cos, sin], max period 10000) and a two-layer MLP."""

    def __init__(self, cond_dim: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, cond_dim, bias=True),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim, bias=True),
        )

    def timestep_features(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
        )  # (half,)
        args = sigma.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        features = self.timestep_features(sigma)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (B, cond_dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary embeddings; `inv_freq` is a non-persistent buffer (not saved)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        return 1.0 / (self.theta ** (steps / self.head_dim))

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.device != device or inv_freq.dtype != torch.float32:
            inv_freq = self._inv_freq(device)  # meta-device init or a dtype cast of the whole model
        positions = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, inv_freq)  # (L, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, head_dim)
        return emb.cos().to(dtype)[None, None], emb.sin().to(dtype)[None, None]  # (1, 1, L, head_dim)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; q, k, v are (B, H, L, D); returns (B, L, H, D) like the other interfaces."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, L, L)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, L, H, D)
    return out, weights


class DiTAttention(nn.Module):
    """Non-causal multi-head self-attention with rotary q/k and a packed (three, heads, head_dim) qkv projection."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # sdpa_attention_forward would otherwise default to a causal mask
        self.attn_qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.attn_out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (output (B, L, d), attention weights (B, H, L, L) or None). Weights come only from the eager
        path: SDPA and the other fused kernels never materialise them."""
        B, L, _ = x.shape
        qkv = self.attn_qkv(x).view(B, L, 3, self.num_heads, self.head_dim)  # (B, L, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        implementation = self.config._attn_implementation
        if output_attentions and implementation not in (None, "eager"):
            raise ValueError(
                f"`output_attentions=True` needs the eager attention path, but this model runs "
                f"attn_implementation={implementation!r} (the {implementation.upper()} path never materialises the "
                f"attention weights); load it with `from_pretrained(..., attn_implementation=\"eager\")` or call "
                f"`model.set_attn_implementation(\"eager\")`"
            )
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        out, weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
        )  # (B, L, H, D)
        return self.attn_out(out.reshape(B, L, -1)), (weights if output_attentions else None)


class DiTMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block with adaLN-Zero modulation of both branches."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.norm1 = DiTLayerNorm(d, config.layer_norm_eps)
        self.attn = DiTAttention(config)
        self.norm2 = DiTLayerNorm(d, config.layer_norm_eps)
        self.mlp = DiTMLP(config)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * d, bias=True)
        self.adaLN_modulation.zero_init = True  # read by `_init_weights`: each block starts as the identity
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # (B, 1, d) each, in the reference order
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, -1)
        h = modulate(self.norm1(x), shift_msa, scale_msa).to(x.dtype)
        attn, weights = self.attn(h, cos, sin, attention_mask, output_attentions)
        x = x + gate_msa * self.dropout(attn)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp).to(x.dtype)
        x = x + gate_mlp * self.dropout(self.mlp(h))
        return x, weights  # (B, L, d), (B, H, L, L) or None


class DiTFinalLayer(nn.Module):
    """LayerNorm, adaLN shift/scale, then the (zero-initialised) projection to the vocabulary."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.norm_final = DiTLayerNorm(d, config.layer_norm_eps)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * d, bias=True)
        self.linear = nn.Linear(d, config.vocab_size, bias=True)
        self.adaLN_modulation.zero_init = self.linear.zero_init = True  # an untrained model predicts uniformly

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        h = modulate(self.norm_final(x), shift, scale).to(self.linear.weight.dtype)
        return self.linear(h)  # (B, L, V)


@torch.no_grad()
def init_dit_module(module: nn.Module, std: float) -> None:
    """The weight init of every backbone module (shared by the dlm models' `_init_weights`): normal(0, std) Linear
    and Embedding weights, zero biases, zeros for the layers marked `zero_init` (adaLN-zero modulation, output
    layer), ones for the LayerNorm weights, the rotary table recomputed (a non-persistent buffer: after a meta-device
    `from_pretrained` it must be rebuilt)."""
    if isinstance(module, nn.Linear):
        if getattr(module, "zero_init", False):
            init.zeros_(module.weight)
        else:
            init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, DiTLayerNorm):
        init.ones_(module.weight)
    elif isinstance(module, RotaryEmbedding):
        init.copy_(module.inv_freq, module._inv_freq(module.inv_freq.device))


class DiTPreTrainedModel(PreTrainedModel):
    """Makes the backbone a `PreTrainedModel`, as transformers expects of `model.base_model`
    (`model.backbone.save_pretrained(...)` writes a checkpoint that the full model loads, reporting the head's
    weights as missing). The full model's state-dict keys are unchanged (`backbone.` + these)."""

    config_class = DiffusionLMConfig
    base_model_prefix = "backbone"
    main_input_name = "inputs_embeds"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True  # `attn_implementation="flash_attention_2"` with flash-attn installed (optional)
    _supports_flex_attn = False
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        init_dit_module(module, self.config.initializer_range)


class DiTModel(DiTPreTrainedModel):
    """Blocks + time embedding + final layer: (inputs_embeds (B, L, d), sigma (B,)) -> logits (B, L, V).

    `sigma` is the noise level of each sequence, in the units the variant feeds its time embedding
    (-log alpha_t for the discrete processes, the log noise-to-signal gamma for RePlaid). When
    `config.time_conditioning` is False it is ignored (zeros are embedded), as in MDLM.

    `init_weights=False` (inside a dlm model): leave the weight init to the owning model's `post_init`, so that a
    seeded model draws its weights in the same module order as when the backbone was a plain `nn.Module`.
    """

    def __init__(self, config, init_weights: bool = True):
        super().__init__(config)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.num_hidden_layers)])
        self.output_layer = DiTFinalLayer(config)
        self.gradient_checkpointing = False
        self._defer_init_weights = not init_weights
        self.post_init()

    def init_weights(self):
        if self.__dict__.pop("_defer_init_weights", False):
            return  # the owning model's post_init initialises these modules (once, in its module order)
        super().init_weights()

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        sigma: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Returns (logits (B, L, V), hidden states (num_layers + 1 of (B, L, d)) or None, attention weights
        (num_layers of (B, H, L, L)) or None)."""
        B, L, _ = inputs_embeds.shape
        if sigma is None or not self.config.time_conditioning:
            sigma = torch.zeros(B, device=inputs_embeds.device)
        c = F.silu(self.sigma_map(sigma))  # (B, cond_dim)
        cos, sin = self.rotary(L, inputs_embeds.device, inputs_embeds.dtype)
        mask4d = None
        if attention_mask is not None and str(self.config._attn_implementation).startswith("flash"):
            mask4d = attention_mask  # (B, L): the flash kernels take the padding mask itself (and unpad)
        elif attention_mask is not None:
            mask4d = attention_mask.bool()[:, None, None, :].expand(B, 1, L, L)  # keys only; True = attend
        x = inputs_embeds
        hidden_states = (x,) if output_hidden_states else None
        attentions = () if output_attentions else None
        for block in self.blocks:
            x, weights = block(x, c, cos, sin, mask4d, output_attentions)
            if output_hidden_states:
                hidden_states = hidden_states + (x,)
            if output_attentions:
                attentions = attentions + (weights,)
        logits = self.output_layer(x, c)  # (B, L, V)
        return logits, hidden_states, attentions
