"""Shared pieces of the benchmark scripts: the size flags and the model builder."""

from __future__ import annotations

import argparse

import torch

from modeling_dlm import VARIANTS


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
    config_class, model_class = VARIANTS[variant]
    kwargs = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, cond_dim=128, max_position_embeddings=args.seq,
                  hidden_dropout_prob=0.0)
    if variant == "replaid":
        kwargs["schedule_hidden_size"] = 1024
    kwargs.update(overrides)
    torch.manual_seed(0)
    return model_class(config_class(**kwargs))
