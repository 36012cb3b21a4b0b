"""Quality at a fixed training budget: every variant trained for the same steps on the same tokens, then the eval
bound on held-out WikiText-2 text and the gen-PPL / entropy of samples at 8, 32 and 128 steps.

    python bench/quality.py --max_steps 240 --learning_rate 2e-3 --eval_blocks 128 --num_time_samples 4 \
        --num_samples 8 --parallel 2 --workdir runs/quality_240 --out bench/results/quality_240.json  # recorded run
    python bench/quality.py --max_steps 4000 --device cuda        # a longer run on a GPU

Everything goes through the `dlm` CLI (what a user would run): `dlm train` on `wiki.valid.raw` of
../shared/data/wikitext-2-raw with the GPT-2 tokenizer, wrap mode, sequences of 128, batch 8, the same seed, learning
rate schedule and model size for every variant (hidden 256, 4 layers, 4 heads, cond 128; the AR baseline is a stock
`LlamaForCausalLM` of the same size, untied); then `dlm eval` on held-out blocks of `wiki.test.raw` (the bound for
the diffusion models, the exact NLL for AR) and `dlm eval --judge AR` for the samples (gen-PPL judged by the trained
AR model, unigram entropy of the samples). "duo (curriculum)" runs the dense Gaussian-guided curriculum for the
first half of the steps. `--parallel 2` runs two variants at a time with one thread each (a 2-core machine): the AR
judge first, then the most expensive runs, so the pool stays busy; a variant waits for the judge only to score its
samples. Finished stages (the bound, then the samples) are kept under --workdir and not repeated, so a long
benchmark can be resumed. Results: the --out JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = Path(__file__).parent / "results"
#: name -> (variant, extra `dlm train` flags, extra config fields)
RUNS = {
    "ar": ("ar", [], {}),
    "mdlm": ("mdlm", [], {}),
    "sddlm": ("sddlm", [], {}),  # the defaults: resampled mask, collapse hinge, 0.1 x NELBO
    "sddlm (simple loss only)": ("sddlm", [], {"elbo_weight": 0.0}),  # the hinge and CE alone, no NELBO term
    "sddlm (resampled, no reg.)": ("sddlm", [], {"regularizer": "none", "elbo_weight": 0.0}),  # the hinge at 50k
    # the rows recorded before the defaults changed (changed-token mask), kept comparable
    "sddlm (mean reg.)": ("sddlm", [], {"regularizer": "mean", "loss_mask": "changed", "elbo_weight": 0.0}),
    "sddlm (sampled reg.)": ("sddlm", [], {"regularizer": "sampled", "loss_mask": "changed", "elbo_weight": 0.0}),
    "sddlm (no reg.)": ("sddlm", [], {"regularizer": "none", "loss_mask": "changed", "elbo_weight": 0.0}),
    "duo": ("duo", [], {}),
    "duo (curriculum)": ("duo", ["--curriculum_steps", "{half}"], {}),
    "replaid": ("replaid", [], {}),  # the defaults: embedding width 16, unit-norm rows
    "replaid (DiT width)": ("replaid", [], {"embedding_dim": "{hidden}"}),  # the project page's "MDLM's rank"
}
#: relative cost of a run (training + evaluation, measured at 120 steps on 2 CPU cores), to schedule the longest first
COST = {"ar": 0.5, "mdlm": 0.8, "sddlm": 0.85, "sddlm (simple loss only)": 0.85,
        "sddlm (resampled, no reg.)": 0.85, "sddlm (mean reg.)": 0.85, "sddlm (sampled reg.)": 0.95,
        "sddlm (no reg.)": 0.9, "duo": 1.0, "duo (curriculum)": 1.4, "replaid": 2.0, "replaid (DiT width)": 2.5}


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "").replace(".", "")


def _dlm(args: list[str], env: dict, log: Path) -> dict:
    """Run `dlm ...` and return the JSON of its last stdout line; the full output goes to `log`."""
    cmd = [sys.executable, "-m", "trainers.cli", *args]
    with open(log, "a") as fh:
        fh.write("$ dlm " + " ".join(args) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, env=env, cwd=REPO)
        fh.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"`dlm {' '.join(args[:2])}` failed (exit {proc.returncode}); see {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_and_bound(name: str, args, workdir: Path) -> dict:
    """`dlm train` one variant, then `dlm eval` its held-out bound (the exact NLL for AR)."""
    out = workdir / _slug(name)
    partial = out / "bound_result.json"
    if partial.is_file():
        return json.loads(partial.read_text())
    variant, flags, fields = RUNS[name]
    out.mkdir(parents=True, exist_ok=True)
    config = {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
              "max_position_embeddings": args.seq, "hidden_dropout_prob": 0.0}
    if variant == "ar":
        config.update(intermediate_size=4 * args.hidden, tie_word_embeddings=False)
    else:
        config.update(cond_dim=128, **{k: args.hidden if v == "{hidden}" else v for k, v in fields.items()})
    (out / "bench_config.json").write_text(json.dumps(config))
    log = out / "log.txt"
    model_dir = out / "model"
    start = time.time()
    flags = [f.format(half=args.max_steps // 2) for f in flags]
    train = _dlm(["train", "--variant", variant, "--config", str(out / "bench_config.json"),
                  "--tokenizer", str(DATA / "tokenizers" / "gpt2"),
                  "--dataset", str(DATA / "wikitext-2-raw" / "wiki.valid.raw"), "--seq_len", str(args.seq),
                  "--mode", "wrap", "--max_steps", str(args.max_steps), "--per_device_train_batch_size",
                  str(args.batch), "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "cosine",
                  "--warmup_steps", str(max(1, args.max_steps // 20)), "--weight_decay", "0.0", "--seed", "0",
                  "--max_eval_samples", "64", "--output_dir", str(model_dir), "--save_strategy", "no",
                  "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps",
                  str(max(1, args.max_steps // 10)), *flags], _env(args), log)
    train_seconds = time.time() - start
    held_out = ["--dataset", str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "--seq_len", str(args.seq),
                "--max_eval_samples", str(args.eval_blocks), "--device", args.device]
    bound = _dlm(["eval", str(model_dir), *held_out, "--num_time_samples", str(args.num_time_samples)], _env(args),
                 log)
    result = {"name": name, "variant": variant, "max_steps": args.max_steps, "train_seconds": round(train_seconds, 1),
              "nelbo": bound["nelbo"], "ppl_bound": bound["ppl_bound"], "exact_nll": bound.get("exact_nll"),
              "train_metrics": train, "samples": {}, "seconds": round(time.time() - start, 1)}
    partial.write_text(json.dumps(result, indent=2) + "\n")
    return result


def score_samples(result: dict, args, workdir: Path) -> dict:
    """gen-PPL (judged by the trained AR model) and unigram entropy of samples at each of `args.gen_steps`."""
    out = workdir / _slug(result["name"])
    start = time.time()
    for steps in args.gen_steps:
        scored = _dlm(["eval", str(out / "model"), "--dataset", str(DATA / "wikitext-2-raw" / "wiki.test.raw"),
                       "--seq_len", str(args.seq), "--max_eval_samples", "1", "--device", args.device,
                       "--judge", str(workdir / _slug("ar") / "model"), "--num_samples", str(args.num_samples),
                       "--gen_num_steps", str(steps), "--batch_size", str(args.num_samples)], _env(args),
                      out / "log.txt")
        result["samples"][str(steps)] = {"gen_ppl": scored["gen_ppl"], "entropy": scored["entropy"]}
    result["seconds"] = round(result["seconds"] + time.time() - start, 1)
    return result


def run_one(name: str, args, workdir: Path, judge_ready: threading.Event) -> dict:
    """Train, bound and (once the AR judge exists) score one variant; finished runs are read back, not repeated."""
    result_file = workdir / _slug(name) / "quality_result.json"
    try:
        if result_file.is_file():
            return json.loads(result_file.read_text())
        result = train_and_bound(name, args, workdir)
        if result["variant"] != "ar":
            judge_ready.wait()  # set even when the AR run fails: `dlm eval --judge` then names the missing model
            result = score_samples(result, args, workdir)
        result_file.write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        if name == "ar":
            judge_ready.set()


def _env(args) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    names = list(results)
    ar = results["ar"]["nelbo"]
    axes[0].barh(names, [results[n]["nelbo"] / ar for n in names], color="tab:blue")
    axes[0].axvline(1.0, color="k", lw=1)
    axes[0].set_xlabel("held-out NLL bound / AR NLL (nats per token ratio)")
    axes[0].invert_yaxis()
    colors = plt.cm.tab20.colors  # one distinct colour per run (tab10 repeats after ten)
    for i, name in enumerate(names):
        if not results[name]["samples"]:
            continue
        pts = [(results[name]["samples"][str(s)]["entropy"], results[name]["samples"][str(s)]["gen_ppl"])
               for s in args.gen_steps]
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=colors[i % 20])
        for (x, y), s in zip(pts, args.gen_steps):
            axes[1].annotate(str(s), (x, y), fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("unigram entropy of samples (nats)")
    axes[1].set_ylabel("gen-PPL (judged by the trained AR model)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{args.max_steps} steps x {args.batch} x {args.seq} tokens of WikiText-2, GPT-2 tokenizer, "
                 f"hidden {args.hidden}, {args.layers} layers (labels: denoising steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--eval_blocks", type=int, default=256, help="held-out blocks of seq tokens for the bound")
    parser.add_argument("--num_time_samples", type=int, default=2)
    parser.add_argument("--num_samples", type=int, default=16, help="samples per (model, steps) for gen-PPL")
    parser.add_argument("--gen_steps", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="threads per run (default: 2 / parallel)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "quality"))
    parser.add_argument("--out", default=str(RESULTS / "quality.json"))
    args = parser.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // args.parallel)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = [n for n in RUNS if n in args.runs]  # table order
    judge_ready = threading.Event()
    if "ar" not in names:
        if not (workdir / _slug("ar") / "model").is_dir():
            raise ValueError(f"no AR judge under {workdir}: add `ar` to --runs")
        judge_ready.set()
    # The AR judge first, then the longest runs, so that the pool stays busy until the end.
    order = sorted(names, key=lambda n: (n != "ar", -COST.get(n, 1.0)))
    results = {}
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {name: pool.submit(run_one, name, args, workdir, judge_ready) for name in order}
        for future in as_completed(futures.values()):
            result = future.result()
            results[result["name"]] = result
            print(f"{result['name']}: {'NLL' if result['variant'] == 'ar' else 'bound'} {result['nelbo']:.3f} "
                  f"nats/token (train {result['train_seconds']:.0f} s, total {result['seconds']:.0f} s)", flush=True)
    results = {name: results[name] for name in names}
    ar = results.get("ar", {}).get("nelbo")
    print(f"\n{'model':<22} {'NLL/bound':>9} {'PPL':>9} {'x AR':>6} " +
          " ".join(f"{'gen-PPL@' + str(s):>11} {'H@' + str(s):>6}" for s in args.gen_steps))
    for name, r in results.items():
        cells = " ".join(f"{r['samples'][str(s)]['gen_ppl']:>11.1f} {r['samples'][str(s)]['entropy']:>6.2f}"
                         if r["samples"] else f"{'-':>11} {'-':>6}" for s in args.gen_steps)
        ratio = f"{r['nelbo'] / ar:>6.3f}" if ar else f"{'-':>6}"
        print(f"{name:<22} {r['nelbo']:>9.3f} {math.exp(r['nelbo']):>9.1f} {ratio} {cells}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "results": results}, indent=2) + "\n")
    if "ar" in results and len(results) > 1:
        plot(results, args, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
