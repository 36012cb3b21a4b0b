"""Few-step generation: gen-PPL and entropy against sampling steps for a Duo teacher and its DCD student.

    dlm train --variant duo --size tiny --dataset builtin --tokenizer TOK --output_dir teacher ...   # see bench/README
    python bench/distill_steps.py --teacher teacher --distill_steps 300 --distill_round_steps 60

Steps: (1) train a tiny AR judge on the same built-in corpus and tokenizer; (2) distil the teacher with
`DuoDistillationTrainer` (rounds of `--distill_round_steps`, dt = 2^round / `--distill_num_steps`, which must stay
below 1; the reference's 5 rounds end at dt = 16/512); (3) sample `--num_samples` sequences at 1024/256/64/16/8/4
steps from the teacher and the student, each with the ancestral sampler and the greedy tail (the student's distilled
default), each with both final steps (`final_step="grid"`: decode at t = 1/steps; `"noise_removal"`: step to
t = 1e-5, then decode, the reference loop; the same number of network calls and the same seed), and score them with
the judge: gen-PPL and unigram entropy, always together. Prints the table, the student/teacher verdict at 8 steps
for each sampler, the noise_removal/grid comparison for each model and sampler, the wall-clock speed-up of the
student at 8 steps over the teacher at 1024, and writes bench/results/distill_steps.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import AutoModel, AutoTokenizer, Trainer, TrainingArguments


def main() -> None:
    from trainers import DiffusionTrainingArguments, DuoDistillationTrainer
    from trainers.checkpoints import build_model
    from trainers.cli import ModelArguments, _load_config_dict
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
    parser.add_argument("--final_steps", nargs="+", default=["grid", "noise_removal"],
                        choices=["grid", "noise_removal"])
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
        judge = build_model("ar", tokenizer=tokenizer, seq_len=seq_len, seed=0,
                            **_load_config_dict(ModelArguments(variant="ar", size="tiny")))
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
        for final_step in args.final_steps:
            for steps in args.steps:
                start = time.perf_counter()
                result = generative_perplexity(model, tokenizer, judge, tokenizer, num_samples=args.num_samples,
                                               seq_len=seq_len, batch_size=args.num_samples, seed=0,
                                               num_steps=steps, sampler=sampler, final_step=final_step)
                seconds = time.perf_counter() - start
                rows.append({"model": name, "sampler": sampler, "final_step": final_step, "steps": steps,
                             "gen_ppl": round(result["gen_ppl"], 2), "entropy": round(result["entropy"], 3),
                             "seconds": round(seconds, 2)})
                print(json.dumps(rows[-1]), flush=True)
    by = {(r["model"], r["sampler"], r["final_step"], r["steps"]): r for r in rows}
    first = args.final_steps[0]
    speedup = None
    if ("teacher", "ancestral", first, 1024) in by and ("student", "greedy_tail", first, 8) in by:
        speedup = (by[("teacher", "ancestral", first, 1024)]["seconds"]
                   / by[("student", "greedy_tail", first, 8)]["seconds"])
    print(f"{'model':<8} {'sampler':<12} {'final step':<14} {'steps':>5} {'gen-PPL':>9} {'entropy':>8} {'seconds':>8}")
    for r in rows:
        print(f"{r['model']:<8} {r['sampler']:<12} {r['final_step']:<14} {r['steps']:>5} {r['gen_ppl']:>9.2f} "
              f"{r['entropy']:>8.3f} {r['seconds']:>8.2f}")
    verdict = {}
    for sampler in ("ancestral", "greedy_tail"):
        for final_step in args.final_steps:
            t8, s8 = by.get(("teacher", sampler, final_step, 8)), by.get(("student", sampler, final_step, 8))
            if t8 and s8:
                verdict[f"{sampler} {final_step}"] = {"student_gen_ppl_ratio": s8["gen_ppl"] / t8["gen_ppl"],
                                                      "entropy_difference": s8["entropy"] - t8["entropy"]}
                print(f"at 8 steps ({sampler}, {final_step}): student/teacher gen-PPL = "
                      f"{s8['gen_ppl'] / t8['gen_ppl']:.3f}, entropy {s8['entropy']:.3f} vs {t8['entropy']:.3f} nats")
    final_step_effect = []
    if set(args.final_steps) == {"grid", "noise_removal"}:
        for name, _, sampler in runs:
            for steps in args.steps:
                g, n = by[(name, sampler, "grid", steps)], by[(name, sampler, "noise_removal", steps)]
                final_step_effect.append({"model": name, "sampler": sampler, "steps": steps,
                                          "gen_ppl_ratio": round(n["gen_ppl"] / g["gen_ppl"], 3),
                                          "entropy_difference": round(n["entropy"] - g["entropy"], 3)})
                print(f"noise_removal / grid, {name} {sampler} @ {steps}: gen-PPL x"
                      f"{final_step_effect[-1]['gen_ppl_ratio']:.3f}, entropy "
                      f"{final_step_effect[-1]['entropy_difference']:+.3f} nats")
    if speedup:
        print(f"wall-clock speed-up, student at 8 steps over teacher at 1024 steps: {speedup:.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"config": vars(args), "rows": rows, "speedup": speedup, "verdict": verdict,
               "final_step_effect": final_step_effect}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, _, sampler) in enumerate(runs):
        for final_step in args.final_steps:
            pts = [r for r in rows if r["model"] == name and r["sampler"] == sampler and r["final_step"] == final_step]
            style = dict(marker="o", color=f"C{i}", linestyle="-" if final_step == "grid" else "--",
                         label=f"{name} ({sampler}, {final_step})")
            ax[0].plot([r["steps"] for r in pts], [r["gen_ppl"] for r in pts], **style)
            ax[1].plot([r["steps"] for r in pts], [r["entropy"] for r in pts], **style)
    for a, label in zip(ax, ("gen-PPL (AR judge)", "unigram entropy (nats)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("sampling steps")
        a.set_ylabel(label)
        a.legend(fontsize=6)
    ax[0].set_yscale("log")
    fig.suptitle("Duo teacher vs DCD student")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
