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
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
CASES = {
    "duo": ("duo", {}),
    "mdlm": ("mdlm", {}),
    "sddlm hinge 0.01 (default)": ("sddlm", {}),
    "sddlm hinge 0.01, per-sequence": ("sddlm", {"loss_normalization": "sequence"}),
    "sddlm hinge 0.05": ("sddlm", {"regularizer_margin": 0.05}),
    "sddlm hinge 0.05, per-sequence": ("sddlm", {"regularizer_margin": 0.05, "loss_normalization": "sequence"}),
    "sddlm none, per-sequence": ("sddlm", {"regularizer": "none", "loss_normalization": "sequence"}),
    "sddlm mean": ("sddlm", {"regularizer": "mean"}),
    "sddlm none": ("sddlm", {"regularizer": "none"}),
    "sddlm mean, changed mask": ("sddlm", {"regularizer": "mean", "loss_mask": "changed"}),
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


def run_case(variant, overrides, train, test, vocab, steps, work):
    extra = 1 if variant == "mdlm" else 0  # MDLM's mask token
    config_class, model_class = VARIANTS[variant]
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=vocab + extra, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, cond_dim=32, max_position_embeddings=LENGTH,
                                     hidden_dropout_prob=0.0, **overrides))
    args = DiffusionTrainingArguments(output_dir=str(work), max_steps=steps, per_device_train_batch_size=64,
                                      learning_rate=3e-3, warmup_steps=steps // 20, lr_scheduler_type="cosine",
                                      logging_steps=max(steps // 4, 1), report_to=[], save_strategy="no",
                                      use_cpu=True, disable_tqdm=True, seed=0)
    TRAINERS[variant](model=model, args=args,
                      train_dataset=datasets.Dataset.from_dict({"input_ids": train.tolist()})).train()
    model.eval()
    with torch.no_grad():
        values = model.nelbo(test, num_time_samples=8, generator=torch.Generator().manual_seed(1))
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", default=["markov16", "markov64", "chars"])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--steps", type=int, default=600)
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
            start = time.perf_counter()
            mean, stderr = run_case(variant, overrides, train, test, vocab, args.steps, f"/tmp/dlm-sddlm-vocab/{case}")
            row = {"source": source, "case": case, "vocab": vocab, "log_v": math.log(vocab), "entropy_rate": rate,
                   "nelbo": mean, "stderr": stderr, "seconds": time.perf_counter() - start}
            results["rows"].append(row)
            rate_text = f"{rate:.3f}" if rate is not None else "-"
            sys.stdout.write(f"{source:9s} V={vocab:3d} log V={math.log(vocab):.3f} H={rate_text:>5s}  "
                             f"{case:26s} NELBO {mean:.3f} ± {stderr:.3f}  ({row['seconds']:.0f} s)\n")
            sys.stdout.flush()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
