"""`DiffusionTrainingArguments`: `TrainingArguments` plus the knobs of diffusion objectives.

Every field is a `dlm train` flag (the CLI is built on `HfArgumentParser`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .checkpoints import has_accelerator


@dataclass
class DiffusionTrainingArguments(TrainingArguments):
    sampling_eps: float = field(
        default=1e-3,
        metadata={"help": "Smallest diffusion time drawn in training and evaluation: t ~ U[sampling_eps, 1]."},
    )
    antithetic_time: bool = field(
        default=True,
        metadata={"help": "Stratify t over the global batch (one shared offset, evenly spaced), as in MDLM/Duo."},
    )
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "Decay of the exponential moving average of the weights (0 disables EMA; papers: 0.9999). "
                          "EMA weights are saved with checkpoints and used for evaluation and the final export."},
    )
    ema_warmup: bool = field(
        default=True,
        metadata={"help": "Warm the EMA up: update n uses decay min(ema_decay, (1 + n) / (10 + n)), as torch_ema and "
                          "the MDLM/Duo code do (False: ema_decay from the first step, which keeps the average at its "
                          "initial weights for ~1/(1 - ema_decay) steps)."},
    )
    nan_guard: bool = field(
        default=True,
        metadata={"help": "Guard against non-finite losses and gradients, so no NaN weights are written (see "
                          "nan_guard_policy)."},
    )
    nan_guard_policy: str = field(
        default="skip",
        metadata={"help": "'skip' (default, no host sync per step): an optimizer step whose loss or gradients are "
                          "not finite is skipped on the device (the fused optimizer's found_inf, as GradScaler "
                          "does); each logging step reports the skipped steps and stops training with a "
                          "FloatingPointError when every step since the last log was skipped. 'stop': check on the "
                          "host at every micro-batch and stop at the first non-finite loss or gradient (one host "
                          "sync per micro-batch and per step). Optimizers that cannot skip a step on the device "
                          "(not fused Adam/AdamW/SGD) use 'stop'."},
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "transformers' filter reads every micro-batch's loss on the host (a sync per step); dlm's "
                          "nan_guard keeps non-finite steps out of the logged loss instead. True restores the "
                          "Trainer's filter."},
    )
    eval_num_time_samples: int = field(
        default=1, metadata={"help": "Time samples per sequence when the Trainer evaluates the NELBO."}
    )
    curriculum_steps: int = field(
        default=0,
        metadata={"help": "Duo: steps of the Gaussian-guided curriculum (0 disables it; the papers use 500K)."},
    )
    curriculum_tau: float = field(
        default=1e-3, metadata={"help": "Duo: temperature of the softmax of the Gaussian latent fed to the model."}
    )
    curriculum_top_k: int = field(
        default=0,
        metadata={"help": "Duo: keep only the k largest Gaussian entries (Duo++ memory-efficient curriculum; "
                          "0 = the dense (B, L, V) latent). The Duo++ paper reports k as small as 2."},
    )
    distill_round_steps: int = field(
        default=10_000,
        metadata={"help": "DCD: steps per round; each round refreshes the teacher from the student and doubles dt."},
    )
    distill_num_steps: int = field(
        default=512, metadata={"help": "DCD: T, the step grid of the first round (dt = 2^round / T)."}
    )
    distill_gamma_min: float = field(default=-4.0, metadata={"help": "DCD: log-SNR gamma at t = 0 (linear in t)."})
    distill_gamma_max: float = field(default=-1.0, metadata={"help": "DCD: log-SNR gamma at t = 1."})
    distill_divergence: str = field(
        default="kl-bwd", metadata={"help": "DCD loss: 'kl-bwd' = KL(student || teacher) (default), 'kl-fwd'."}
    )
    replaid_batch_split: str = field(
        default="adaptive",
        metadata={"help": "RePlaid: 'adaptive' (Plaid, methods.md §C.3): each batch entry trains one term, the "
                          "reconstruction (t = 0) or the diffusion term (low-discrepancy t), with the reconstruction "
                          "share B std_rec / (std_rec + std_diff) from EMAs of both losses; one network call per "
                          "entry. 'all_terms': every entry trains all three terms (two network calls per entry)."},
    )
    replaid_split_ema_decay: float = field(
        default=0.997, metadata={"help": "RePlaid: decay of the loss-moment EMAs behind the adaptive split (Plaid)."}
    )
    replaid_split_lag: int | None = field(
        default=None,
        metadata={"help": "RePlaid: steps between a step's loss moments and the split they size. 0 (Plaid): read "
                          "on the host at the step's end, one device sync per step. 1: copied without waiting and "
                          "folded in one step later (no sync; the split uses moments one step older). None (auto): "
                          "1 on accelerators, 0 on the CPU (where the read costs nothing)."},
    )
    schedule_variance_gradient: bool = field(
        default=True,
        metadata={"help": "RePlaid: train the schedule's shape on E[L_diff^2] (gradient multiplied by 2 L_diff per "
                          "diffusion entry, Plaid) while gamma_0, gamma_1 and everything else train on the NELBO. "
                          "False: the shape trains on the NELBO too."},
    )
    freeze_schedule: bool = field(
        default=False, metadata={"help": "RePlaid: keep the whole noise schedule (shape and gamma_0, gamma_1) fixed."}
    )
    output_prior_warmup_ratio: float = field(
        default=0.05,
        metadata={"help": "RePlaid: the output-prior logit term's weight rises linearly from 0 to 1 over this "
                          "fraction of max_steps (default 0.05; Plaid's 5000 steps assume a ~100K-1M step run). "
                          "Evaluation always uses 1."},
    )
    output_prior_warmup_steps: int | None = field(
        default=None,
        metadata={"help": "RePlaid: an absolute output-prior warm-up in steps, overriding output_prior_warmup_ratio "
                          "(Plaid: 5000; 0 = full weight from the start). Must be smaller than max_steps."},
    )
    schedule_learning_rate: float | None = field(
        default=None,
        metadata={"help": "RePlaid: learning rate of the schedule's shape network (None = learning_rate; "
                          "Plaid: 1e-2)."},
    )
    gamma_bounds_learning_rate: float | None = field(
        default=None,
        metadata={"help": "RePlaid: learning rate of gamma_0, gamma_1 (None = schedule_learning_rate; Plaid: 1e-2)."},
    )
    embedding_learning_rate: float | None = field(
        default=None,
        metadata={"help": "RePlaid: learning rate of the diffusion embeddings E (None = learning_rate; Plaid: 1e-2)."},
    )
    schedule_weight_decay: float | None = field(
        default=0.0,
        metadata={"help": "RePlaid: AdamW weight decay of the schedule's shape network (None = weight_decay; "
                          "Plaid: 0)."},
    )
    gamma_bounds_weight_decay: float | None = field(
        default=None,
        metadata={"help": "RePlaid: AdamW weight decay of gamma_0, gamma_1 (None = schedule_weight_decay). Plaid "
                          "decays them by 1e-3 per step, i.e. weight_decay = 1e-3 / its learning rate."},
    )
    embedding_weight_decay: float | None = field(
        default=0.0,
        metadata={"help": "RePlaid: AdamW weight decay of the embeddings E (None = weight_decay; Plaid: 0; the rows "
                          "are re-normalised on every use, so decay only changes their effective step size)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: diffusion losses read the batch themselves (input_ids, attention_mask)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not has_accelerator():
            # pinned host memory only speeds up copies to an accelerator: without one, torch's DataLoader warns
            # about it on every epoch; and DeepSpeed (imported by accelerate when installed) warns that it "was
            # unable to detect" one before it settles on the CPU, which is what it is told here
            self.dataloader_pin_memory = False
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if self.nan_guard_policy not in ("skip", "stop"):
            raise ValueError(f"nan_guard_policy must be 'skip' or 'stop', got {self.nan_guard_policy!r}")
        for name in ("sampling_eps", "ema_decay", "output_prior_warmup_ratio", "curriculum_tau", "distill_gamma_min",
                     "distill_gamma_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"`{name}` must be a number, got {value!r} ({type(value).__name__})")
        for name in ("eval_num_time_samples", "curriculum_steps", "curriculum_top_k", "distill_round_steps",
                     "distill_num_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__})")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"`max_steps` must be a positive number of optimizer steps (or -1 to train for "
                             f"num_train_epochs), got {self.max_steps!r}")
        if not 0.0 <= self.sampling_eps < 1.0:
            raise ValueError(f"`sampling_eps` must be in [0, 1), got {self.sampling_eps!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay!r}")
        if self.distill_round_steps < 1 or self.distill_num_steps < 1:
            raise ValueError(f"`distill_round_steps` and `distill_num_steps` must be >= 1, got "
                             f"{self.distill_round_steps!r} and {self.distill_num_steps!r}")
        if not self.distill_gamma_min < self.distill_gamma_max:
            raise ValueError(f"`distill_gamma_min` ({self.distill_gamma_min!r}) must be smaller than "
                             f"`distill_gamma_max` ({self.distill_gamma_max!r})")
        if self.distill_divergence not in ("kl-bwd", "kl-fwd"):
            raise ValueError(f"`distill_divergence` must be 'kl-bwd' or 'kl-fwd', got {self.distill_divergence!r}")
        if self.curriculum_steps < 0:
            raise ValueError(f"`curriculum_steps` must be >= 0, got {self.curriculum_steps!r}")
        if self.curriculum_top_k < 0:
            raise ValueError(f"`curriculum_top_k` must be >= 0, got {self.curriculum_top_k!r}")
        if not self.curriculum_tau > 0:
            raise ValueError(f"`curriculum_tau` must be > 0, got {self.curriculum_tau!r}")
        if self.eval_num_time_samples < 1:
            raise ValueError(f"`eval_num_time_samples` must be >= 1, got {self.eval_num_time_samples!r}")
        if self.replaid_batch_split not in ("adaptive", "all_terms"):
            raise ValueError(f"`replaid_batch_split` must be 'adaptive' or 'all_terms', got "
                             f"{self.replaid_batch_split!r}")
        if self.replaid_split_lag not in (None, 0, 1):
            raise ValueError(f"`replaid_split_lag` must be 0, 1 or None (auto), got {self.replaid_split_lag!r}")
        if not 0.0 < self.replaid_split_ema_decay < 1.0:
            raise ValueError(f"`replaid_split_ema_decay` must be in (0, 1), got {self.replaid_split_ema_decay!r}")
        if self.output_prior_warmup_steps is not None and self.output_prior_warmup_steps < 0:
            raise ValueError(f"`output_prior_warmup_steps` must be >= 0, got {self.output_prior_warmup_steps!r}")
        if not 0.0 <= self.output_prior_warmup_ratio < 1.0:
            raise ValueError(f"`output_prior_warmup_ratio` must be in [0, 1), got {self.output_prior_warmup_ratio!r}")
        if (self.output_prior_warmup_steps is not None and self.max_steps > 0
                and self.output_prior_warmup_steps >= self.max_steps):
            raise ValueError(f"`output_prior_warmup_steps`={self.output_prior_warmup_steps} must be smaller than "
                             f"`max_steps`={self.max_steps}: the output prior would never reach its full weight, "
                             f"which evaluation uses (use `output_prior_warmup_ratio` instead)")
        for name in ("schedule_learning_rate", "gamma_bounds_learning_rate", "embedding_learning_rate",
                     "schedule_weight_decay", "gamma_bounds_weight_decay", "embedding_weight_decay"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"`{name}` must be >= 0 (or None to inherit), got {value!r}")
