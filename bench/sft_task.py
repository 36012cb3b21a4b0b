"""Conditional fine-tuning (SFT) of every variant on a synthetic task an unconditional model cannot solve.

    python bench/sft_task.py --steps 1000 --threads 1     # 4 variants + LoRA SFT of Duo; GPT-2 tokenizer; ~70 min
    python bench/sft_task.py --variants mdlm --steps 300 --lora_variant none     # one quick row
    python bench/sft_task.py --variants --steps 1000 --threads 1                 # the LoRA row alone

The task (`trainers.data.digit_map_task`): the prompt is a random number ("map: 3 1 4"), the response maps each
digit through a fixed permutation ("0 8 9"): without reading the prompt every response digit is a 1-in-10 guess.
Each variant is trained at tiny size through the real CLI (`dlm train --task sft`, a subprocess) on the JSONL file,
then generates answers to held-out prompts (`trainers.evaluation.sft_accuracy`: the SFT canvas, one generator per
row, stop at EOS). "before" is the same model before fine-tuning (the initial weights of `dlm train`'s seed). The
LoRA row adapts a pretrained base, as LoRA is used: the same initial model first trained unconditionally (`--task lm`)
for `--lora_base_steps` on `--lora_base_dataset` (general text, no digit maps), then `--init_from BASE --lora_r R
--merge_lora`; "before" is that base, and the merged weights are scored. (LoRA on untrained DiT weights cannot learn:
the zero-initialised output layer is frozen, so the logits stay uniform.) Prints the table, and writes it (with the
commands) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHANCE = 0.1  # one of ten digits


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=["mdlm", "duo", "sddlm", "replaid"])
    parser.add_argument("--lora_variant", default="duo", help="variant of the LoRA row ('none' to skip)")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_targets", default=None, help="--lora_target_modules of the LoRA row (default: dlm's)")
    parser.add_argument("--lora_base_steps", type=int, default=300, help="unconditional pretraining of the LoRA base")
    parser.add_argument("--lora_base_dataset", default="builtin", help="text the LoRA base is pretrained on")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--digits", type=int, nargs=2, default=[3, 3], metavar=("MIN", "MAX"))
    parser.add_argument("--seq_len", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--train_rows", type=int, default=4000)
    parser.add_argument("--test_rows", type=int, default=128)
    parser.add_argument("--num_steps", type=int, default=16, help="denoising steps of the answers")
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "tokenizers" / "gpt2"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the training runs")
    parser.add_argument("--workdir", default=None, help="keep data and checkpoints here (default: a temp folder)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sft_task.json"))
    return parser.parse_args(argv)


def model_body(variant: str, args) -> dict:
    body = {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
            "cond_dim": max(16, args.hidden // 2), "max_position_embeddings": args.seq_len}
    if variant == "replaid":
        body["embedding_dim"] = 16
    return body


def dlm(*cli_args: str, threads: int | None) -> tuple[dict, float]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "trainers.cli", *cli_args], capture_output=True, text=True,
                          cwd=REPO, env=env)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"dlm {' '.join(cli_args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    import datasets
    from transformers import set_seed

    from trainers.checkpoints import build_model, load_model, load_tokenizer
    from trainers.cli import _load_tokenizer
    from trainers.data import digit_map_task
    from trainers.evaluation import sft_accuracy

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sft_task_"))
    work.mkdir(parents=True, exist_ok=True)
    low, high = args.digits
    train_rows = digit_map_task(args.train_rows, seed=args.seed + 1, min_digits=low, max_digits=high)
    test_rows = digit_map_task(args.test_rows, seed=args.seed + 2, min_digits=low, max_digits=high)
    datasets.Dataset.from_list(train_rows).to_json(str(work / "train.jsonl"))
    score = {"seq_len": args.seq_len, "seed": args.seed, "num_steps": args.num_steps}
    common = ["--task", "sft", "--dataset", str(work / "train.jsonl"), "--tokenizer", args.tokenizer,
              "--seq_len", str(args.seq_len), "--max_steps", str(args.steps), "--per_device_train_batch_size",
              str(args.batch), "--learning_rate", str(args.learning_rate), "--lr_scheduler_type",
              "constant_with_warmup", "--warmup_steps", "20", "--save_strategy", "no", "--report_to", "none",
              "--logging_steps", str(max(args.steps // 4, 1)), "--disable_tqdm", "true", "--seed", str(args.seed)]
    rows = []
    jobs = [(v, False) for v in args.variants] + ([(args.lora_variant, True)] if args.lora_variant != "none" else [])
    for variant, lora in jobs:
        tokenizer = _load_tokenizer(args.tokenizer, variant)
        config_path = work / f"{variant}.json"
        config_path.write_text(json.dumps(model_body(variant, args)))
        set_seed(args.seed)  # the initial weights `dlm train --seed` builds
        base = build_model(variant, tokenizer=tokenizer, seq_len=args.seq_len, **model_body(variant, args))
        name = f"{variant} + LoRA r={args.lora_r}" if lora else variant
        output = work / (f"{variant}_lora" if lora else variant)
        base_seconds = 0.0
        if lora:  # pretrain the base unconditionally on general text, then adapt it
            base_dir = work / f"{variant}_base"
            pretrain = ["train", "--variant", variant, "--config", str(config_path), "--dataset",
                        args.lora_base_dataset, "--tokenizer", args.tokenizer, "--seq_len", str(args.seq_len),
                        "--max_steps", str(args.lora_base_steps), "--per_device_train_batch_size", str(args.batch),
                        "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "constant_with_warmup",
                        "--warmup_steps", "20", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm",
                        "true", "--seed", str(args.seed), "--output_dir", str(base_dir)]
            _, base_seconds = dlm(*pretrain, threads=args.threads)
            base = load_model(str(base_dir), "cpu")
            cli = ["train", "--variant", variant, "--init_from", str(base_dir), "--lora_r", str(args.lora_r),
                   "--lora_alpha", str(2 * args.lora_r), "--merge_lora", "true", "--output_dir", str(output), *common,
                   *(["--lora_target_modules", args.lora_targets] if args.lora_targets else [])]
        else:
            cli = ["train", "--variant", variant, "--config", str(config_path), "--output_dir", str(output), *common]
        before = sft_accuracy(base.eval(), tokenizer, test_rows, **score)
        metrics, seconds = dlm(*cli, threads=args.threads)
        trained = load_model(str(output / "merged") if lora else str(output), "cpu")
        after = sft_accuracy(trained, load_tokenizer(str(output / "merged") if lora else str(output), trained),
                             test_rows, **score)
        rows.append({"model": name, "steps": args.steps, "seconds": round(seconds, 1),
                     "before_token": before["token_accuracy"], "before_exact": before["exact_match"],
                     "after_token": after["token_accuracy"], "after_exact": after["exact_match"],
                     "eval_nelbo": metrics.get("eval_nelbo"), "command": "dlm " + " ".join(cli),
                     **({"base_steps": args.lora_base_steps, "base_seconds": round(base_seconds, 1),
                         "base_command": "dlm " + " ".join(pretrain)} if lora else {})})
        print(f"{name}: token accuracy {before['token_accuracy']:.3f} -> {after['token_accuracy']:.3f}, exact "
              f"{before['exact_match']:.3f} -> {after['exact_match']:.3f} ({seconds:.0f} s)", flush=True)

    digits = f"{low}" if low == high else f"{low}-{high}"
    print(f"\nSFT on digit mapping ({digits} digits, chance {CHANCE:.1f} per digit), {args.test_rows} held-out "
          f"prompts, {args.num_steps} denoising steps")
    print(f"{'model':22s} {'steps':>6s} {'wall s':>7s} {'token acc before':>17s} {'after':>7s} {'x chance':>9s} "
          f"{'exact before':>13s} {'after':>7s} {'eval NELBO':>11s}")
    for r in rows:
        nelbo = r["eval_nelbo"] if r["eval_nelbo"] is not None else float("nan")
        print(f"{r['model']:22s} {r['steps']:6d} {r['seconds']:7.0f} {r['before_token']:17.3f} "
              f"{r['after_token']:7.3f} {r['after_token'] / CHANCE:9.1f} {r['before_exact']:13.3f} "
              f"{r['after_exact']:7.3f} {nelbo:11.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
