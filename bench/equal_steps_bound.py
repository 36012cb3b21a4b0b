"""Eval bound of RePlaid, SDDLM, Duo and MDLM trained for the same steps on the same text (RePlaid issue).

    python bench/equal_steps_bound.py                 # WikiText-2 raw, built-in BPE V = 1024, 800 steps each

Every variant gets the same tiny DiT (hidden 128, 2 layers, 4 heads), data order, batch (32 x 64 tokens), steps,
learning rate and seed, and is evaluated on the same held-out blocks with the NELBO (`evaluate_likelihood`, 4 time
samples per sequence): nats/token, perplexity bound, and the ratio of each bound to MDLM's. RePlaid uses its default
recipe (adaptive split, variance-minimising schedule, learning rate 1e-2 for the schedule and embeddings, as in the
schedule bench); Duo runs without the curriculum. Writes bench/results/equal_steps_bound.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


VARIANTS = ("mdlm", "sddlm", "duo", "replaid")


def main() -> None:
    from modeling_dlm import VARIANTS as CLASSES
    from trainers import TRAINERS, DiffusionTrainingArguments
    from trainers.data import build_datasets, builtin_tokenizer, prepare_tokenizer
    from trainers.evaluation import evaluate_likelihood

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                 "wikitext-2-raw"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--vocab", type=int, default=1024, help="size of the built-in BPE tokenizer")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval_blocks", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "equal_steps_bound.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = prepare_tokenizer(builtin_tokenizer(args.vocab), need_mask=True)
    train_ds, eval_ds = build_datasets(args.dataset, tokenizer, args.seq, "wrap")
    held_out = [{"input_ids": row} for row in eval_ds["input_ids"][: args.eval_blocks]]
    print(f"{len(train_ds)} training and {len(eval_ds)} held-out blocks of {args.seq} tokens (using "
          f"{len(held_out)}), vocabulary {len(tokenizer)}, log V = {math.log(len(tokenizer)):.3f}", flush=True)

    rows = []
    for variant in args.variants:
        torch.manual_seed(args.seed)
        config_class, model_class = CLASSES[variant]
        kwargs = dict(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, cond_dim=64, max_position_embeddings=args.seq,
                      hidden_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        if variant == "mdlm":
            kwargs["mask_token_id"] = tokenizer.mask_token_id
        model = model_class(config_class(**kwargs))
        extra = {}
        if variant == "replaid":
            extra = dict(schedule_learning_rate=1e-2, embedding_learning_rate=1e-2, output_prior_warmup_steps=100)
        targs = DiffusionTrainingArguments(
            output_dir=f"/tmp/dlm-bench-equal-steps/{variant}", max_steps=args.steps,
            per_device_train_batch_size=args.batch, learning_rate=args.lr, warmup_steps=50,
            lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=max(1, args.steps // 4), report_to=[],
            save_strategy="no", use_cpu=True, disable_tqdm=True, seed=args.seed, **extra)
        trainer = TRAINERS[variant](model=model, args=targs, train_dataset=train_ds)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        result = evaluate_likelihood(model.eval(), held_out, batch_size=64, num_time_samples=4, seed=args.seed)
        rows.append({"variant": variant, "nelbo": round(result["nelbo"], 4),
                     "ppl_bound": round(result["ppl_bound"], 2), "train_seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)

    base = next((r["nelbo"] for r in rows if r["variant"] == "mdlm"), None)
    print(f"{'variant':<8} {'NELBO':>7} {'PPL bound':>10} {'NELBO / MDLM':>13} {'train s':>8}")
    for r in rows:
        ratio = f"{r['nelbo'] / base:.3f}" if base else "-"
        r["nelbo_over_mdlm"] = float(ratio) if base else None
        print(f"{r['variant']:<8} {r['nelbo']:>7.3f} {r['ppl_bound']:>10.2f} {ratio:>13} {r['train_seconds']:>8.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
