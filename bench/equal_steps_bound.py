"""Eval bound of RePlaid, SDDLM, Duo and MDLM trained for the same steps on the same text (RePlaid issue).

    python bench/equal_steps_bound.py                 # WikiText-2 raw, built-in BPE V = 1024, 800 steps each

Every variant gets the same tiny DiT (hidden 128, 2 layers, 4 heads), data order, batch (32 x 64 tokens), steps,
learning rate and seed, and is evaluated on the same held-out blocks with the NELBO (`evaluate_likelihood`, 4 time
samples per sequence): nats/token, perplexity bound, and the ratio of each bound to MDLM's. RePlaid uses its default
recipe (adaptive split, variance-minimising schedule, learning rate 1e-2 for the schedule and embeddings, as in the
schedule bench); Duo runs without the curriculum. Writes bench/results/equal_steps_bound.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


VARIANTS = ("mdlm", "sddlm", "duo", "replaid")


def main() -> None:
    from common import train_and_bound, wikitext_data, wikitext_parser

    parser = wikitext_parser(__doc__, "equal_steps_bound.json")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer, train_ds, held_out = wikitext_data(args)
    print(f"{len(train_ds)} training and {len(held_out)} held-out blocks of {args.seq} tokens, vocabulary "
          f"{len(tokenizer)}, log V = {math.log(len(tokenizer)):.3f}", flush=True)

    rows = []
    for variant in args.variants:
        training = {}
        if variant == "replaid":
            training = dict(schedule_learning_rate=1e-2, embedding_learning_rate=1e-2)  # warm-up: 5% of --steps
        _, result, seconds = train_and_bound(variant, args, tokenizer, train_ds, held_out,
                                             f"/tmp/dlm-bench-equal-steps/{variant}", training=training)
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
