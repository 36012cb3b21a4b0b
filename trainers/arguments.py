"""`DiffusionTrainingArguments`: `TrainingArguments` plus the knobs of diffusion objectives.

Every field is a `dlm train` flag (the CLI is built on `HfArgumentParser`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


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
    eval_num_time_samples: int = field(
        default=1, metadata={"help": "Time samples per sequence when the Trainer evaluates the NELBO."}
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: diffusion losses read the batch themselves (input_ids, attention_mask)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.sampling_eps < 1.0:
            raise ValueError(f"`sampling_eps` must be in [0, 1), got {self.sampling_eps!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay!r}")
        if self.eval_num_time_samples < 1:
            raise ValueError(f"`eval_num_time_samples` must be >= 1, got {self.eval_num_time_samples!r}")
