"""Few-step generation: gen-PPL and entropy against sampling steps for a Duo teacher and its DCD student.

    dlm quickstart --output_dir dlm-quickstart                 # a tiny Duo teacher on the built-in corpus
    python bench/distill_steps.py --teacher dlm-quickstart     # judge + distillation + the table and plot

Steps: (1) train a tiny AR judge on the same built-in corpus and tokenizer; (2) distil the teacher with
`DuoDistillationTrainer`; (3) sample `--num_samples` sequences from both at 1024/256/64/16/8/4 steps (teacher:
ancestral, student: greedy tail, its distilled default) and score them with the judge: gen-PPL and unigram entropy,
always together. Prints the table and the wall-clock speed-up of the student at 8 steps over the teacher at 1024, and
writes bench/results/distill_steps.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, Trainer, TrainingArguments


def main() -> None:
    from trainers import DiffusionTrainingArguments, DuoDistillationTrainer
    from trainers.cli import ModelArguments, _load_config_dict, build_model
    from trainers.data import build_datasets
    from trainers.evaluation import generative_perplexity

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--work_dir", default="runs/bench-distill")
    parser.add_argument("--judge_steps", type=int, default=400)
    parser.add_argument("--distill_steps", type=int, default=400)
    parser.add_argument("--distill_round_steps", type=int, default=50)
    parser.add_argument("--distill_num_steps", type=int, default=64)
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=[1024, 256, 64, 16, 8, 4])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill_steps"))
    args = parser.parse_args()
    work = Path(args.work_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModel.from_pretrained(args.teacher, trust_remote_code=True).eval()
    seq_len = teacher.config.max_position_embeddings
    seq_len = min(seq_len, 64)
    train_ds, eval_ds = build_datasets("builtin", tokenizer, seq_len, "wrap")

    # 1. the AR judge
    judge_dir = work / "judge"
    if not (judge_dir / "config.json").is_file():
        torch.manual_seed(0)
        judge = build_model("ar", _load_config_dict(ModelArguments(variant="ar", size="tiny")), tokenizer, seq_len)
        targs = TrainingArguments(output_dir=str(judge_dir), max_steps=args.judge_steps,
                                  per_device_train_batch_size=32,
                                  learning_rate=2e-3, warmup_steps=20, lr_scheduler_type="cosine", report_to=[],
                                  save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=100)
        from transformers import DataCollatorForLanguageModeling

        trainer = Trainer(model=judge, args=targs, train_dataset=train_ds, processing_class=tokenizer,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer.train()
        trainer.save_model(str(judge_dir))
    from transformers import AutoModelForCausalLM

    judge = AutoModelForCausalLM.from_pretrained(judge_dir).eval()

    # 2. the distilled student
    student_dir = work / "student"
    if not (student_dir / "config.json").is_file():
        student = AutoModel.from_pretrained(args.teacher, trust_remote_code=True).train()
        dargs = DiffusionTrainingArguments(
            output_dir=str(student_dir), max_steps=args.distill_steps, per_device_train_batch_size=32,
            learning_rate=3e-4, lr_scheduler_type="constant", warmup_steps=20, report_to=[], save_strategy="no",
            use_cpu=True, disable_tqdm=True, logging_steps=50, distill_round_steps=args.distill_round_steps,
            distill_num_steps=args.distill_num_steps)
        trainer = DuoDistillationTrainer(model=student, args=dargs, train_dataset=train_ds, processing_class=tokenizer)
        trainer.train()
        trainer.save_model(str(student_dir))
    student = AutoModel.from_pretrained(student_dir, trust_remote_code=True).eval()

    # 3. the table
    rows = []
    for name, model, sampler in (("teacher", teacher, "ancestral"), ("student", student, "greedy_tail")):
        for steps in args.steps:
            start = time.perf_counter()
            result = generative_perplexity(model, tokenizer, judge, tokenizer, num_samples=args.num_samples,
                                           seq_len=seq_len, batch_size=args.num_samples, seed=0, num_steps=steps,
                                           sampler=sampler)
            seconds = time.perf_counter() - start
            rows.append({"model": name, "sampler": sampler, "steps": steps, "gen_ppl": round(result["gen_ppl"], 2),
                         "entropy": round(result["entropy"], 3), "seconds": round(seconds, 2)})
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["model"], r["steps"]): r for r in rows}
    speedup = None
    if ("teacher", 1024) in by and ("student", 8) in by:
        speedup = by[("teacher", 1024)]["seconds"] / by[("student", 8)]["seconds"]
    print(f"{'model':<8} {'steps':>5} {'gen-PPL':>9} {'entropy':>8} {'seconds':>8}")
    for r in rows:
        print(f"{r['model']:<8} {r['steps']:>5} {r['gen_ppl']:>9.2f} {r['entropy']:>8.3f} {r['seconds']:>8.2f}")
    if speedup:
        print(f"wall-clock speed-up, student at 8 steps over teacher at 1024 steps: {speedup:.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": vars(args), "rows": rows, "speedup": speedup},
                                                   indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("teacher", "student"):
        pts = [r for r in rows if r["model"] == name]
        ax[0].plot([r["steps"] for r in pts], [r["gen_ppl"] for r in pts], marker="o", label=name)
        ax[1].plot([r["steps"] for r in pts], [r["entropy"] for r in pts], marker="o", label=name)
    for a, label in zip(ax, ("gen-PPL (AR judge)", "unigram entropy (nats)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("sampling steps")
        a.set_ylabel(label)
        a.legend()
    ax[0].set_yscale("log")
    fig.suptitle("Duo teacher (ancestral) vs DCD student (greedy tail)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
