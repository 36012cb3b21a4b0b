"""Shared pieces of the benchmark scripts: the size flags and the model builder."""

from __future__ import annotations

import argparse

import torch

from trainers.checkpoints import build_model


def size_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The flags every benchmark shares (issue defaults: V=50258, batch 8 x 128, hidden 256, 4 layers, 4 heads)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=50258)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def build(variant: str, args, **overrides):
    """A seeded model of `variant` with the benchmark's sizes (dropout off); `overrides` change config fields."""
    kwargs = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, cond_dim=128, max_position_embeddings=args.seq,
                  hidden_dropout_prob=0.0)
    if variant == "replaid":
        kwargs["schedule_hidden_size"] = 1024
    kwargs.update(overrides)
    return build_model(variant, seed=0, **kwargs)


def wikitext_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The flags of the equal-budget WikiText-2 benchmarks (built-in BPE V = 1024, hidden 128, 2 layers, 4 heads,
    800 steps of 32 x 64 tokens, learning rate 2e-3, 256 held-out blocks); `out` is the default --out."""
    from pathlib import Path

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                 "wikitext-2-raw"))
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
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / out))
    return parser


def wikitext_data(args):
    """(tokenizer, train dataset, held-out rows) of `wikitext_parser`'s flags: the built-in BPE with a mask token,
    wrap-mode blocks of `args.seq` tokens, the first `args.eval_blocks` held-out blocks."""
    from pathlib import Path

    from trainers.data import build_datasets, builtin_tokenizer, prepare_tokenizer

    if not Path(args.dataset).exists():
        raise FileNotFoundError(f"dataset not found: {args.dataset}")
    tokenizer = prepare_tokenizer(builtin_tokenizer(args.vocab), need_mask=True)
    train_ds, eval_ds = build_datasets(args.dataset, tokenizer, args.seq, "wrap")
    held_out = [{"input_ids": row} for row in eval_ds["input_ids"][: args.eval_blocks]]
    return tokenizer, train_ds, held_out


def train_and_bound(variant: str, args, tokenizer, train_ds, held_out, output_dir: str, config: dict | None = None,
                    training: dict | None = None) -> tuple[torch.nn.Module, dict, float]:
    """Train one seeded `variant` with the benchmark's sizes and the variant's Trainer (cosine schedule, 50 warm-up
    steps, no decay, no checkpoints), then its NELBO on `held_out` (4 time samples per sequence). `config` and
    `training` override config and `DiffusionTrainingArguments` fields. Returns (model, bound, train seconds)."""
    import time

    from trainers import TRAINERS, DiffusionTrainingArguments
    from trainers.evaluation import evaluate_likelihood

    kwargs = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  cond_dim=64, max_position_embeddings=args.seq, hidden_dropout_prob=0.0)
    kwargs.update(config or {})
    model = build_model(variant, tokenizer=tokenizer, seed=args.seed, **kwargs)
    targs = DiffusionTrainingArguments(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        warmup_steps=50, lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=max(1, args.steps // 4),
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=args.seed, **(training or {}))
    trainer = TRAINERS[variant](model=model, args=targs, train_dataset=train_ds)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    bound = evaluate_likelihood(model.eval(), held_out, batch_size=64, num_time_samples=4, seed=args.seed)
    return model, bound, seconds
