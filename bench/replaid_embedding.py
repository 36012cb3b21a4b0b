"""RePlaid's embedding recipe at equal budget: embedding width, row initialisation and the embeddings' learning rate.

    python bench/replaid_embedding.py --parallel 2     # 8 RePlaid runs + the MDLM anchor, WikiText-2 raw, V = 1024

The sources disagree (issue 15, A2): methods.md takes `embedding_dim = 16` from Plaid, while the RePlaid project page
says its embedding matrix "matches MDLM's rank" (the DiT width, 768 at the papers' size). Plaid also starts the rows
at unit norm and trains the embeddings and the schedule at learning rate 1e-2. Every run here is the same tiny DiT
(hidden 128, 2 layers, 4 heads), data order, batch (32 x 64 tokens), steps, learning rate (2e-3 cosine) and seed as
`equal_steps_bound.py`; only the three factors change, in a full 2 x 2 x 2 design:
    width  d_e = 16 or the DiT width;   init  N(0, 0.02^2) ("normal") or unit-norm rows;
    lr     the network's for everything, or 1e-2 for the embeddings and the schedule (Plaid).
Measured on the same held-out blocks: the NELBO (4 time samples per sequence), and two signs of collapsed embeddings,
the mean pairwise cosine of the unit rows and the participation ratio of their covariance (of d_e). Prints the table
and the main effect of each factor (mean NELBO difference), writes bench/results/replaid_embedding.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch


def _embedding_stats(model) -> dict:
    """Mean pairwise cosine of the unit rows (excluding each row with itself) and the participation ratio."""
    E = model.normalized_embeddings().double()  # (V, d_e)
    V = E.shape[0]
    mean_cos = ((E.sum(0).square().sum() - V) / (V * (V - 1))).item()
    eig = torch.linalg.eigvalsh(torch.cov(E.T)).clamp_min(0)
    participation = (eig.sum() ** 2 / eig.square().sum()).item()
    return {"mean_cosine": round(mean_cos, 4), "participation_ratio": round(participation, 2)}


def _run(job: dict) -> dict:
    from common import train_and_bound, wikitext_data

    args = argparse.Namespace(**job["args"])
    torch.set_num_threads(args.threads)
    tokenizer, train_ds, held_out = wikitext_data(args)
    config, training = {}, {}
    if job["variant"] == "replaid":
        config = dict(embedding_dim=job["width"], embedding_init=job["init"])
        if job["lr"] == "plaid":
            training = dict(schedule_learning_rate=1e-2, embedding_learning_rate=1e-2)
    model, result, seconds = train_and_bound(job["variant"], args, tokenizer, train_ds, held_out,
                                             f"/tmp/dlm-bench-replaid-embedding/{job['name']}", config, training)
    row = {k: job[k] for k in ("name", "variant", "width", "init", "lr")}
    row.update(nelbo=round(result["nelbo"], 4), train_seconds=round(seconds, 1))
    if job["variant"] == "replaid":
        row.update(_embedding_stats(model))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    from common import wikitext_parser

    parser = wikitext_parser(__doc__, "replaid_embedding.json")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (one process each)")
    parser.add_argument("--no_mdlm", action="store_true", help="skip the MDLM anchor")
    parser.add_argument("--runs", nargs="+", default=None,
                        help="only these runs, by name (e.g. 'd16 normal shared'); main effects need all 8")
    args = parser.parse_args()

    jobs = [{"name": f"d{w} {init} {lr}", "variant": "replaid", "width": w, "init": init, "lr": lr}
            for w, init, lr in itertools.product((16, args.hidden), ("normal", "unit_norm"), ("shared", "plaid"))]
    if not args.no_mdlm:
        jobs.append({"name": "mdlm", "variant": "mdlm", "width": None, "init": None, "lr": None})
    if args.runs:
        unknown = set(args.runs) - {job["name"] for job in jobs}
        if unknown:
            raise ValueError(f"unknown --runs {sorted(unknown)}; names: {[job['name'] for job in jobs]}")
        jobs = [job for job in jobs if job["name"] in args.runs]
    for job in jobs:
        job["args"] = vars(args)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.parallel, mp_context=get_context("spawn")) as pool:
        rows = list(pool.map(_run, jobs))

    print(f"\n{'run':<24} {'NELBO':>7} {'mean cos':>9} {'PR':>6} {'train s':>8}")
    for r in rows:
        print(f"{r['name']:<24} {r['nelbo']:>7.3f} {r.get('mean_cosine', float('nan')):>9.3f} "
              f"{r.get('participation_ratio', float('nan')):>6.1f} {r['train_seconds']:>8.0f}")
    replaid = [r for r in rows if r["variant"] == "replaid"]
    effects = {}
    for factor, (a, b) in {"width": (16, args.hidden), "init": ("normal", "unit_norm"),
                           "lr": ("shared", "plaid")}.items():
        if len(replaid) != 8:
            break
        mean = {v: sum(r["nelbo"] for r in replaid if r[factor] == v) / 4 for v in (a, b)}
        effects[factor] = round(mean[b] - mean[a], 4)
        print(f"main effect of {factor}: {b} - {a} = {effects[factor]:+.3f} nats (mean of 4 runs each)")
    if replaid:
        best = min(replaid, key=lambda r: r["nelbo"])
        print(f"best: {best['name']} ({best['nelbo']:.3f}); log V = {math.log(args.vocab):.3f}")
    print(f"total {time.perf_counter() - start:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "rows": rows, "main_effects": effects}, indent=2) + "\n")


if __name__ == "__main__":
    main()
