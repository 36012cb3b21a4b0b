"""Few-step generation: gen-PPL and entropy against sampling steps for a Duo teacher and its DCD student.

    dlm train --variant duo --size tiny --dataset builtin --tokenizer TOK --output_dir teacher ...   # see bench/README
    python bench/distill_steps.py --teacher teacher --distill_steps 300 --distill_round_steps 60

Steps: (1) train a tiny AR judge on the same built-in corpus and tokenizer; (2) distil the teacher with
`DuoDistillationTrainer` (rounds of `--distill_round_steps`, dt = 2^round / `--distill_num_steps`, which must stay
below 1; the reference's 5 rounds end at dt = 16/512); (3) sample `--num_samples` sequences at 1024/256/64/16/8/4
steps from the teacher and the student, each with the ancestral sampler and the greedy tail (the student's distilled
default), and score them with the judge: gen-PPL and unigram entropy, always together. Prints the table, the
student/teacher verdict at 8 steps for each sampler and the wall-clock speed-up of the student at 8 steps over the
teacher at 1024, and writes bench/results/distill_steps.{json,png}.
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
    parser.add_argument("--distill_steps", type=int, default=500)
    parser.add_argument("--distill_round_steps", type=int, default=100)
    parser.add_argument("--distill_num_steps", type=int, default=128)
    parser.add_argument("--distill_lr", type=float, default=1e-4)
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
            learning_rate=args.distill_lr, lr_scheduler_type="constant", warmup_steps=20, report_to=[],
            save_strategy="no",
            use_cpu=True, disable_tqdm=True, logging_steps=50, distill_round_steps=args.distill_round_steps,
            distill_num_steps=args.distill_num_steps)
        trainer = DuoDistillationTrainer(model=student, args=dargs, train_dataset=train_ds, processing_class=tokenizer)
        trainer.train()
        trainer.save_model(str(student_dir))
    student = AutoModel.from_pretrained(student_dir, trust_remote_code=True).eval()

    # 3. the table
    rows = []
    runs = (("teacher", teacher, "ancestral"), ("teacher", teacher, "greedy_tail"),
            ("student", student, "ancestral"), ("student", student, "greedy_tail"))
    for name, model, sampler in runs:
        for steps in args.steps:
            start = time.perf_counter()
            result = generative_perplexity(model, tokenizer, judge, tokenizer, num_samples=args.num_samples,
                                           seq_len=seq_len, batch_size=args.num_samples, seed=0, num_steps=steps,
                                           sampler=sampler)
            seconds = time.perf_counter() - start
            rows.append({"model": name, "sampler": sampler, "steps": steps, "gen_ppl": round(result["gen_ppl"], 2),
                         "entropy": round(result["entropy"], 3), "seconds": round(seconds, 2)})
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["model"], r["sampler"], r["steps"]): r for r in rows}
    speedup = verdict = None
    if ("teacher", "ancestral", 1024) in by and ("student", "greedy_tail", 8) in by:
        speedup = by[("teacher", "ancestral", 1024)]["seconds"] / by[("student", "greedy_tail", 8)]["seconds"]
    print(f"{'model':<8} {'sampler':<12} {'steps':>5} {'gen-PPL':>9} {'entropy':>8} {'seconds':>8}")
    for r in rows:
        print(f"{r['model']:<8} {r['sampler']:<12} {r['steps']:>5} {r['gen_ppl']:>9.2f} {r['entropy']:>8.3f} "
              f"{r['seconds']:>8.2f}")
    verdict = {}
    for sampler in ("ancestral", "greedy_tail"):
        if ("teacher", sampler, 8) in by and ("student", sampler, 8) in by:
            t8, s8 = by[("teacher", sampler, 8)], by[("student", sampler, 8)]
            verdict[sampler] = {"student_gen_ppl_ratio": s8["gen_ppl"] / t8["gen_ppl"],
                                "entropy_difference": s8["entropy"] - t8["entropy"]}
            print(f"at 8 steps ({sampler}, both): student/teacher gen-PPL = "
                  f"{verdict[sampler]['student_gen_ppl_ratio']:.3f}, entropy {s8['entropy']:.3f} vs "
                  f"{t8['entropy']:.3f} nats")
    if speedup:
        print(f"wall-clock speed-up, student at 8 steps over teacher at 1024 steps: {speedup:.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"config": vars(args), "rows": rows, "speedup": speedup, "verdict": verdict}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name, _, sampler in runs:
        pts = [r for r in rows if r["model"] == name and r["sampler"] == sampler]
        label = f"{name} ({sampler})"
        ax[0].plot([r["steps"] for r in pts], [r["gen_ppl"] for r in pts], marker="o", label=label)
        ax[1].plot([r["steps"] for r in pts], [r["entropy"] for r in pts], marker="o", label=label)
    for a, label in zip(ax, ("gen-PPL (AR judge)", "unigram entropy (nats)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("sampling steps")
        a.set_ylabel(label)
        a.legend()
    ax[0].set_yscale("log")
    fig.suptitle("Duo teacher vs DCD student")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
