"""A 2-process CPU (gloo) FSDP2 job, launched by tests/test_fsdp.py with
`accelerate launch --multi_gpu --num_processes 2 tests/fsdp_train_script.py OUT_DIR`.

For the trainers of MDLM, SDDLM, Duo (with the curriculum), DCD and RePlaid, all with EMA on, from one seed:
- `fsdp`: 4 steps under the Trainer's FSDP settings (version 2, `DiTBlock` wrapped), a sharded checkpoint at step 2,
  then the final `save_model` (one ordinary model.safetensors with the EMA weights);
- `resume`: a fresh process-group-wide run resumed from that sharded checkpoint to step 4;
- `ddp`: the same 4 steps with DDP.
Each rank writes OUT_DIR/rank{R}.json with the losses logged at every step and how each run was wrapped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import torch  # noqa: E402

from trainers import TRAINERS, DiffusionTrainingArguments, DuoDistillationTrainer  # noqa: E402
from trainers.checkpoints import build_model  # noqa: E402


VOCAB, SEQ, ROWS, BATCH = 61, 8, 64, 4
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["DiTBlock"], "reshard_after_forward": True,
               "state_dict_type": "SHARDED_STATE_DICT"}
CASES = {
    "mdlm": ("mdlm", {}),
    "sddlm": ("sddlm", {}),
    "duo-curriculum": ("duo", {"curriculum_steps": 10}),
    "dcd": ("duo", {"distill_round_steps": 2, "distill_num_steps": 8}),
    # RePlaid: the learned schedule stays whole on both ranks (fully_shard cannot shard its 0-d gamma_0, gamma_1);
    # the adaptive split, self-conditioning and the output-prior warm-up are all on
    "replaid": ("replaid", {"output_prior_warmup_steps": 2}),
}


def model_for(variant: str):
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, cond_dim=16,
                  max_position_embeddings=16, hidden_dropout_prob=0.0)
    if variant == "replaid":
        kwargs["schedule_hidden_size"] = 8
    model = build_model(variant, seed=0, **kwargs)
    with torch.no_grad():  # perturb the zero-initialised layers, as a trained model would have them
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "output_layer.linear" in name or "self_cond_proj" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def run(case: str, mode: str, out: Path, dataset) -> dict:
    variant, extra = CASES[case]
    trainer_class = DuoDistillationTrainer if case == "dcd" else TRAINERS[variant]
    folder = out / case / ("fsdp" if mode == "resume" else mode)
    args = DiffusionTrainingArguments(
        output_dir=str(folder), max_steps=4, per_device_train_batch_size=BATCH, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=2, report_to=[],
        use_cpu=True, ddp_backend="gloo", disable_tqdm=True, seed=0, dataloader_num_workers=0, ema_decay=0.9,
        max_grad_norm=1.0, **({} if mode == "ddp" else {"fsdp": True, "fsdp_config": FSDP_CONFIG}), **extra)
    trainer = trainer_class(model=model_for(variant), args=args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=str(folder / "checkpoint-2") if mode == "resume" else None)
    wrapped = type(trainer.model_wrapped).__name__
    if mode == "fsdp":
        trainer.save_model(str(folder / "export"))
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    report = {"losses": losses, "wrapped": wrapped, "fsdp": trainer.is_fsdp_enabled}
    if mode == "fsdp":  # the parameters FSDP2 left whole on this rank, and their values' sums
        from torch.distributed.tensor import DTensor

        whole = {n: p for n, p in trainer.model_wrapped.named_parameters() if not isinstance(p, DTensor)}
        report["replicated"] = sorted(whole)
        report["replicated_sums"] = [float(whole[n].double().sum()) for n in sorted(whole)]
    return report


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    ids = torch.randint(0, VOCAB - 1, (ROWS, SEQ), generator=torch.Generator().manual_seed(3))
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    report = {}
    only = os.environ.get("DLM_FSDP_CASES")  # a comma-separated subset, to iterate on one trainer by hand
    for case in CASES if not only else only.split(","):
        report[case] = {mode: run(case, mode, out, dataset) for mode in ("fsdp", "resume", "ddp")}
    rank = torch.distributed.get_rank()
    report["rank"], report["world_size"] = rank, torch.distributed.get_world_size()
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
