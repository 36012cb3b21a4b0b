"""SDDLM's bound at small vocabularies: each regulariser form against Duo and MDLM trained identically.

    python bench/sddlm_vocab.py --sources markov16 markov64 chars --steps 600

Sources: a Markov chain of known entropy rate at V = 16 and 64 (generated here), and character-level Tiny Shakespeare
(`../shared/data/tinyshakespeare`, a character tokenizer built from the text). Every model: DiT hidden 64 x 2 layers,
batch 64 x 32 tokens, AdamW 3e-3 with a cosine schedule, the same seed. The held-out NELBO (8 time samples per
sequence) is printed next to log V and, for the Markov chains, the true entropy rate; the JSON goes to
bench/results/sddlm_vocab.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import datasets
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_dlm import VARIANTS  # noqa: E402
from trainers import TRAINERS, DiffusionTrainingArguments  # noqa: E402


LENGTH = 32
T_GRID = (0.01, 0.03, 0.06, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97)
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
# "simple" = the paper's loss alone (elbo_weight 0); every case but the default pins it, so rows stay comparable
CASES = {
    "duo": ("duo", {}),
    "mdlm": ("mdlm", {}),
    "sddlm (default: hinge + 0.1 NELBO)": ("sddlm", {}),
    "sddlm hinge + 0.3 NELBO": ("sddlm", {"elbo_weight": 0.3}),
    "sddlm hinge 0.01, simple": ("sddlm", {"elbo_weight": 0.0}),
    "sddlm hinge 0.01, per-sequence": ("sddlm", {"loss_normalization": "sequence", "elbo_weight": 0.0}),
    "sddlm hinge 0.05": ("sddlm", {"regularizer_margin": 0.05, "elbo_weight": 0.0}),
    "sddlm hinge 0.05, per-sequence": ("sddlm", {"regularizer_margin": 0.05, "loss_normalization": "sequence",
                                                 "elbo_weight": 0.0}),
    "sddlm none, per-sequence": ("sddlm", {"regularizer": "none", "loss_normalization": "sequence",
                                           "elbo_weight": 0.0}),
    "sddlm mean": ("sddlm", {"regularizer": "mean", "elbo_weight": 0.0}),
    "sddlm none": ("sddlm", {"regularizer": "none", "elbo_weight": 0.0}),
    "sddlm mean, changed mask": ("sddlm", {"regularizer": "mean", "loss_mask": "changed", "elbo_weight": 0.0}),
}


def markov_source(states: int, seed: int = 0, n_train: int = 8192, n_test: int = 512):
    g = torch.Generator().manual_seed(seed)
    transition = (2.0 * torch.randn(states, states, generator=g)).softmax(-1)
    pi = torch.ones(states) / states
    for _ in range(2000):
        pi = pi @ transition
    rows = -(transition * transition.clamp_min(1e-30).log()).sum(-1)
    rate = float((-(pi * pi.log()).sum() + (LENGTH - 1) * (pi * rows).sum()) / LENGTH)

    def sample(n):
        x = torch.empty(n, LENGTH, dtype=torch.long)
        x[:, 0] = torch.multinomial(pi.expand(n, -1), 1, generator=g).squeeze(-1)
        for i in range(1, LENGTH):
            x[:, i] = torch.multinomial(transition[x[:, i - 1]], 1, generator=g).squeeze(-1)
        return x

    return sample(n_train), sample(n_test), states, rate


def char_source(n_test: int = 512):
    if not SHAKESPEARE.is_file():
        raise FileNotFoundError(f"Tiny Shakespeare not found at {SHAKESPEARE}")
    text = SHAKESPEARE.read_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text])
    blocks = ids[: len(ids) // LENGTH * LENGTH].view(-1, LENGTH)
    g = torch.Generator().manual_seed(0)
    blocks = blocks[torch.randperm(len(blocks), generator=g)]
    return blocks[n_test:], blocks[:n_test], len(vocab), None


def run_case(variant, overrides, train, test, vocab, steps, work, seed=0):
    extra = 1 if variant == "mdlm" else 0  # MDLM's mask token
    config_class, model_class = VARIANTS[variant]
    torch.manual_seed(seed)
    model = model_class(config_class(vocab_size=vocab + extra, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, cond_dim=32, max_position_embeddings=LENGTH,
                                     hidden_dropout_prob=0.0, **overrides))
    args = DiffusionTrainingArguments(output_dir=str(work), max_steps=steps, per_device_train_batch_size=64,
                                      learning_rate=3e-3, warmup_steps=steps // 20, lr_scheduler_type="cosine",
                                      logging_steps=max(steps // 4, 1), report_to=[], save_strategy="no",
                                      use_cpu=True, disable_tqdm=True, seed=seed)
    TRAINERS[variant](model=model, args=args,
                      train_dataset=datasets.Dataset.from_dict({"input_ids": train.tolist()})).train()
    model.eval()
    with torch.no_grad():
        values = model.nelbo(test, num_time_samples=8, generator=torch.Generator().manual_seed(1))
        # the bound's integrand at fixed t (the NELBO is its integral over t in [0, 1]): where the nats are lost
        g = torch.Generator().manual_seed(2)
        integrand = [float(model.nelbo_per_token(test, torch.full((len(test),), t), generator=g).mean())
                     for t in T_GRID]
    return float(values.mean()), float(values.std() / math.sqrt(len(values))), integrand


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", default=["markov16", "markov64", "chars"])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds (initialisation, data order, noise); data and test draws stay fixed")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sddlm_vocab.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    results = {"steps": args.steps, "length": LENGTH, "batch": 64, "hidden": 64, "layers": 2, "rows": []}
    for source in args.sources:
        if source.startswith("markov"):
            train, test, vocab, rate = markov_source(int(source[len("markov"):]))
        elif source == "chars":
            train, test, vocab, rate = char_source()
        else:
            raise ValueError(f"unknown source {source!r}")
        for case in args.cases:
            variant, overrides = CASES[case]
            for seed in args.seeds:
                start = time.perf_counter()
                mean, stderr, integrand = run_case(variant, overrides, train, test, vocab, args.steps,
                                        f"/tmp/dlm-sddlm-vocab/{case}", seed=seed)
                row = {"source": source, "case": case, "seed": seed, "vocab": vocab, "log_v": math.log(vocab),
                       "entropy_rate": rate, "nelbo": mean, "stderr": stderr, "integrand": integrand,
                       "seconds": time.perf_counter() - start}
                results["rows"].append(row)
                rate_text = f"{rate:.3f}" if rate is not None else "-"
                sys.stdout.write(f"{source:9s} V={vocab:3d} log V={math.log(vocab):.3f} H={rate_text:>5s}  "
                                 f"{case:26s} seed {seed} NELBO {mean:.3f} ± {stderr:.3f}  ({row['seconds']:.0f} s)\n")
                sys.stdout.flush()
    results["t_grid"] = list(T_GRID)
    summarise(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    plot(results, Path(args.out).with_suffix(".png"))


def summarise(results: dict) -> None:
    """Mean and spread over seeds of every (source, case), and its ratio to Duo's mean when Duo ran."""
    sys.stdout.write("\nsource    case                                 seeds  mean NELBO (min-max)   / Duo\n")
    for source in dict.fromkeys(r["source"] for r in results["rows"]):
        rows = [r for r in results["rows"] if r["source"] == source]
        means = {}
        for case in dict.fromkeys(r["case"] for r in rows):
            values = [r["nelbo"] for r in rows if r["case"] == case]
            means[case] = (sum(values) / len(values), min(values), max(values), len(values))
        for case, (mean, low, high, n) in means.items():
            ratio = f"{mean / means['duo'][0]:.3f}x" if "duo" in means else "-"
            sys.stdout.write(f"{source:9s} {case:36s} {n:5d}  {mean:.3f} ({low:.3f}-{high:.3f})  {ratio}\n")


def plot(results: dict, path: Path) -> None:
    """One panel per source: the bound's integrand against t for every case (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(r["source"] for r in results["rows"]))
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 4), squeeze=False)
    for ax, source in zip(axes[0], sources):
        rows = [r for r in results["rows"] if r["source"] == source]
        for case in dict.fromkeys(r["case"] for r in rows):
            runs = [r for r in rows if r["case"] == case]
            curve = [sum(r["integrand"][i] for r in runs) / len(runs) for i in range(len(results["t_grid"]))]
            nelbo = sum(r["nelbo"] for r in runs) / len(runs)
            ax.plot(results["t_grid"], curve, marker="o", ms=3, label=f"{case} ({nelbo:.3f})")
        ax.axhline(rows[0]["log_v"], color="gray", ls=":", lw=1, label="log V")
        ax.set_title(f"{source} (V = {rows[0]['vocab']})")
        ax.set_xlabel("t")
        ax.set_ylabel("NELBO integrand (nats/token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
