"""Configurations for the dlm diffusion language models.

One base, `DiffusionLMConfig`, holds the fields of the shared DiT backbone (methods.md §D) under the names that
transformers tooling expects (`vocab_size`, `hidden_size`, `num_hidden_layers`, ...). Each variant subclasses it with a
unique `model_type` and the knobs of its noise process and objective:

- `SDDLMConfig`   uniform-state diffusion trained with the simple denoising loss (arXiv 2510.22926), methods.md §A.
- `DuoConfig`     uniform-state diffusion with the Gaussian-guided curriculum and DCD (arXiv 2506.10892), §B.
- `MDLMConfig`    masked (absorbing-state) diffusion baseline (arXiv 2406.07524).
- `RePlaidConfig` continuous Gaussian diffusion on learned unit-norm embeddings (arXiv 2605.18530, Plaid), §C.

Every field is declared (transformers 5.x turns configs into keyword-only dataclasses) and validated in
`__post_init__`, which raises a `ValueError` naming the bad value.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


NOISE_SCHEDULES = ("loglinear", "cosine")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_number(value) -> bool:
    """A real number (int or float, not bool); a string such as "0.1" is not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(config, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        _check(_is_number(value), f"`{name}` must be a number, got {value!r} ({type(value).__name__})")


class DiffusionLMConfig(PreTrainedConfig):
    r"""Fields of the DiT backbone shared by every dlm variant.

    Args:
        vocab_size: number of token ids, `len(tokenizer)` (added pad/mask tokens included).
        hidden_size, num_hidden_layers, num_attention_heads: width, depth and heads of the DiT (small: 768/12/12).
        intermediate_size: MLP width; `None` means 4 * hidden_size.
        cond_dim: width of the time-conditioning vector fed to every adaLN modulation (128 in the papers).
        max_position_embeddings: the longest sequence the model is trained and sampled with.
        hidden_dropout_prob: dropout on the attention and MLP branches (0.1 in the papers).
        attention_dropout: dropout on attention probabilities.
        rope_theta: rotary base (10000).
        layer_norm_eps: epsilon of the weight-only float32 LayerNorms.
        initializer_range: std of the normal init of linear and embedding weights.
        time_conditioning: feed the noise level to the adaLN modulations (USDMs must; MDLM does not).
        noise_schedule: `"loglinear"` (alpha_t = 1 - (1 - eps) t, the text default) or `"cosine"`.
        schedule_eps: the `eps` of the discrete schedules (alpha_1 = eps, not 0).
        tie_word_embeddings: tie the output projection to the input embedding (the papers do not).
        pad_token_id, bos_token_id, eos_token_id, mask_token_id: special token ids from the tokenizer.
    """

    model_type = "dlm"
    _auto_class = "AutoConfig"  # makes save_pretrained copy this file next to config.json

    vocab_size: int = 50258
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    cond_dim: int = 128
    max_position_embeddings: int = 1024
    hidden_dropout_prob: float = 0.1
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    time_conditioning: bool = True
    noise_schedule: str = "loglinear"
    schedule_eps: float = 1e-3
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    mask_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self._validate_backbone()
        super().__post_init__(**kwargs)

    def _validate_backbone(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "cond_dim", "max_position_embeddings"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                   f"`{name}` must be a positive integer, got {value!r}")
        _check(self.vocab_size >= 2, f"`vocab_size` must be at least 2, got {self.vocab_size}")
        _check_numbers(self, ("hidden_dropout_prob", "attention_dropout", "rope_theta", "layer_norm_eps",
                              "initializer_range", "schedule_eps"))
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
               f"({self.num_attention_heads})")
        _check((self.hidden_size // self.num_attention_heads) % 2 == 0,
               f"the head dimension hidden_size / num_attention_heads = "
               f"{self.hidden_size // self.num_attention_heads} must be even for rotary embeddings")
        for name in ("hidden_dropout_prob", "attention_dropout"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"`{name}` must be in [0, 1), got {value!r}")
        _check(self.rope_theta > 0, f"`rope_theta` must be > 0, got {self.rope_theta!r}")
        _check(self.layer_norm_eps > 0, f"`layer_norm_eps` must be > 0, got {self.layer_norm_eps!r}")
        _check(self.initializer_range >= 0, f"`initializer_range` must be >= 0, got {self.initializer_range!r}")
        _check(self.noise_schedule in NOISE_SCHEDULES,
               f"`noise_schedule` must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}")
        _check(0.0 < self.schedule_eps < 1.0, f"`schedule_eps` must be in (0, 1), got {self.schedule_eps!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and 0 <= value < self.vocab_size),
                   f"`{name}` must be None or in [0, vocab_size={self.vocab_size}), got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class SDDLMConfig(DiffusionLMConfig):
    r"""Uniform-state diffusion trained with the simple denoising loss (methods.md §A).

    The training objective is cross-entropy on noise-replaced tokens plus a regularizer against collapse to uniform
    outputs; likelihood is still evaluated with the uniform-state ELBO (§B.3.1), with the network's softmax as the
    denoiser. That is the right plug-in: the ELBO is minimised position by position by the leave-one-out predictive
    p(x^l | z_t^{-l}) (the reverse step q(z_s | z_t, x_hat) already multiplies in the likelihood of z_t^l), and
    cross-entropy on every resampled position learns exactly that predictive (methods.md §A.3.7). Several details
    are UNVERIFIED in the sources, so they are options (defaults documented in the README):

    Args:
        loss_mask: which positions carry the loss: `"resampled"` (default: every position the forward process
            resampled, the paper's "noise-replaced tokens", including the 1/V draws that land on x; trains the ELBO
            optimum) or `"changed"` (z_t != x, the third-party transcription; removes from z_t^l the mass that the
            ELBO needs).
        regularizer: `"hinge"` (default: R = relu(margin - KL(U || p)), zero unless a prediction is within
            `regularizer_margin` nats of uniform, so it penalises a collapse to uniform and nothing else), `"mean"`
            (the mean log-probability over the vocabulary, the efficient v2-style guess: its optimum truncates every
            token below lambda / V, which at small V destroys the bound), `"sampled"` (v1 negative samples) or
            `"none"`. See `trainers/sddlm.py` for the optimum of each form.
        regularizer_weight: lambda in L = CE + lambda * R (1.0 matches v1).
        regularizer_margin: the hinge's margin in nats of KL(U || p) (0.01, chosen by `bench/sddlm_vocab.py`).
        loss_normalization: `"batch"` (the transcription: the sum over the batch's loss positions divided by their
            count, so a time t weighs in proportion to its 1 - alpha_t) or `"sequence"` (a mean over each sequence's
            loss positions, then over sequences: every t weighs the same, as in the ELBO's time integral).
        num_negative_samples: uniform negatives per position for `regularizer="sampled"` (v1 default 1).
        regularizer_eps: epsilon added to probabilities before the log (1e-6, as in the v1 transcription).
        elbo_weight: mu in the hybrid L = L_simple + mu * NELBO (the uniform-state bound of §B.3.1 on the same z_t
            and logits, as in the hybrid objective of Nichol & Dhariwal 2021 for Gaussian diffusion): 0.1, chosen by
            `bench/sddlm_vocab.py`; 0 trains the paper's simple loss alone. See `trainers/sddlm.py` for why the bound
            needs it at low noise.
    """

    model_type = "sddlm"

    loss_mask: str = "resampled"
    regularizer: str = "hinge"
    regularizer_weight: float = 1.0
    regularizer_margin: float = 0.01
    loss_normalization: str = "batch"
    num_negative_samples: int = 1
    regularizer_eps: float = 1e-6
    elbo_weight: float = 0.1

    def __post_init__(self, **kwargs):
        # `elbo_denoiser` existed until dlm 0.1: "raw" is what every model now does; "bayes" was wrong (it conditions
        # on z_t^l twice), so a checkpoint that asks for it cannot be reproduced and is refused.
        legacy = kwargs.pop("elbo_denoiser", getattr(self, "elbo_denoiser", "raw"))
        _check(legacy == "raw",
               f"`elbo_denoiser={legacy!r}` is no longer supported: the Bayes-rule denoiser counts z_t^l twice "
               f"and does not minimise the uniform-state ELBO; SDDLM always plugs the network's softmax into the "
               f"ELBO (remove the field from config.json)")
        if hasattr(self, "elbo_denoiser"):
            del self.elbo_denoiser
        _check_numbers(self, ("regularizer_weight", "regularizer_eps", "regularizer_margin", "elbo_weight"))
        _check(self.loss_mask in ("changed", "resampled"),
               f"`loss_mask` must be 'changed' or 'resampled', got {self.loss_mask!r}")
        _check(self.regularizer in ("hinge", "mean", "sampled", "none"),
               f"`regularizer` must be 'hinge', 'mean', 'sampled' or 'none', got {self.regularizer!r}")
        _check(self.loss_normalization in ("batch", "sequence"),
               f"`loss_normalization` must be 'batch' or 'sequence', got {self.loss_normalization!r}")
        _check(self.regularizer_margin >= 0, f"`regularizer_margin` must be >= 0, got {self.regularizer_margin!r}")
        _check(self.regularizer_weight >= 0, f"`regularizer_weight` must be >= 0, got {self.regularizer_weight!r}")
        _check(isinstance(self.num_negative_samples, int) and self.num_negative_samples >= 1,
               f"`num_negative_samples` must be a positive integer, got {self.num_negative_samples!r}")
        _check(self.regularizer_eps >= 0, f"`regularizer_eps` must be >= 0, got {self.regularizer_eps!r}")
        _check(self.elbo_weight >= 0, f"`elbo_weight` must be >= 0, got {self.elbo_weight!r}")
        _check(self.time_conditioning, "uniform-state models must condition on time: `time_conditioning=False` "
                                       "is not allowed for SDDLM")
        super().__post_init__(**kwargs)


class DuoConfig(DiffusionLMConfig):
    r"""Duo: uniform-state diffusion with the Gaussian-guided curriculum and consistency distillation (§B).

    Args:
        gamma_min, gamma_max: the log-SNR range of the Gaussian curriculum, linear in t (OWT run: -3.55, -1.85).
    """

    model_type = "duo"

    gamma_min: float = -3.55
    gamma_max: float = -1.85

    def __post_init__(self, **kwargs):
        _check_numbers(self, ("gamma_min", "gamma_max"))
        _check(self.gamma_min < self.gamma_max,
               f"`gamma_min` ({self.gamma_min!r}) must be smaller than `gamma_max` ({self.gamma_max!r})")
        _check(self.time_conditioning, "uniform-state models must condition on time: `time_conditioning=False` "
                                       "is not allowed for Duo")
        super().__post_init__(**kwargs)


class MDLMConfig(DiffusionLMConfig):
    r"""MDLM: masked (absorbing-state) diffusion with the SUBS parameterisation, the baseline (arXiv 2406.07524).

    `mask_token_id` defaults to `vocab_size - 1`; `time_conditioning` defaults to False as in MDLM.
    """

    model_type = "mdlm"

    time_conditioning: bool = False

    def __post_init__(self, **kwargs):
        if self.mask_token_id is None and _is_number(self.vocab_size):  # a bad vocab_size fails in validation
            self.mask_token_id = self.vocab_size - 1
        super().__post_init__(**kwargs)


class RePlaidConfig(DiffusionLMConfig):
    r"""RePlaid: Gaussian diffusion on learned unit-norm token embeddings, trained by likelihood (§C).

    Args:
        embedding_dim: width d_e of the learned diffusion embeddings (16, Plaid's). The sources conflict: the RePlaid
            project page says its embedding matrix matches MDLM's rank (the DiT width). At equal budget the two
            widths tie within seed noise (`bench/replaid_embedding.py`, 3 seeds), so the cheaper 16 is the default.
        embedding_init: initialisation of the embedding rows, `"unit_norm"` (default, Plaid: Gaussian rows scaled to
            norm 1) or `"normal"` (N(0, initializer_range^2), as every other weight). The rows are re-normalised on
            every use, so the two differ only in the rows' norm, which sets how fast Adam rotates them (unit rows
            make that independent of `initializer_range`); the bounds tie within seed noise (3 seeds).
        self_conditioning: feed the previous x0-embedding estimate back as an input (Plaid/RePlaid default on).
        output_prior: add the analytic Gaussian term (alpha / sigma^2) <z_t, E_v> to the logits.
        gamma_0, gamma_1: initial values of the learnable log noise-to-signal endpoints (-3 and 6).
        schedule_hidden_size: hidden units of the monotone schedule network (1024).
        time_input: what the adaLN time embedding sees, `"gamma"` (log noise-to-signal, default) or `"t"`; RePlaid's
            exact choice is UNVERIFIED.
        given_latent: the latent of given tokens (a prompt, an infill's context) in sampling: `"noised"` (default) the
            forward-noised true embedding at each step's level, the replacement method for a model trained on whole
            sequences; `"clean"` their clean latent at every step, which is what conditional (SFT) training feeds
            (`prompt_mask`), so SFT sets it (`trainers.data` / `dlm train --task sft`).
    """

    model_type = "replaid"

    embedding_dim: int = 16
    embedding_init: str = "unit_norm"
    self_conditioning: bool = True
    output_prior: bool = True
    gamma_0: float = -3.0
    gamma_1: float = 6.0
    schedule_hidden_size: int = 1024
    time_input: str = "gamma"
    given_latent: str = "noised"

    def __post_init__(self, **kwargs):
        _check(self.given_latent in ("noised", "clean"),
               f"`given_latent` must be 'noised' or 'clean', got {self.given_latent!r}")
        _check(isinstance(self.embedding_dim, int) and self.embedding_dim > 0,
               f"`embedding_dim` must be a positive integer, got {self.embedding_dim!r}")
        _check(self.embedding_init in ("normal", "unit_norm"),
               f"`embedding_init` must be 'normal' or 'unit_norm', got {self.embedding_init!r}")
        _check(isinstance(self.schedule_hidden_size, int) and self.schedule_hidden_size > 0,
               f"`schedule_hidden_size` must be a positive integer, got {self.schedule_hidden_size!r}")
        _check_numbers(self, ("gamma_0", "gamma_1"))
        _check(self.gamma_0 < self.gamma_1,
               f"`gamma_0` ({self.gamma_0!r}) must be smaller than `gamma_1` ({self.gamma_1!r})")
        _check(self.time_input in ("gamma", "t"), f"`time_input` must be 'gamma' or 't', got {self.time_input!r}")
        super().__post_init__(**kwargs)
