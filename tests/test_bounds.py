"""The NELBO is a bound: on a source of known entropy (a Markov chain generated here), a trained model's held-out NELBO
stays at or above the true entropy rate (within Monte Carlo error) and well below log V."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from trainers import TRAINERS, DiffusionTrainingArguments
from trainers.checkpoints import build_model


STATES, LENGTH = 12, 16


def markov_chain(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    transition = (2.5 * torch.randn(STATES, STATES, generator=g)).softmax(-1)  # (S, S), rows sum to 1
    # stationary distribution: left eigenvector for eigenvalue 1
    pi = torch.ones(STATES) / STATES
    for _ in range(1000):
        pi = pi @ transition
    entropy_rows = -(transition * transition.clamp_min(1e-30).log()).sum(-1)
    h_first = -(pi * pi.log()).sum()
    rate = (h_first + (LENGTH - 1) * (pi * entropy_rows).sum()) / LENGTH  # nats per token of a whole sequence
    return transition, pi, float(rate), g


def sample_sequences(transition, pi, n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.empty(n, LENGTH, dtype=torch.long)
    x[:, 0] = torch.multinomial(pi.expand(n, -1), 1, generator=g).squeeze(-1)
    for i in range(1, LENGTH):
        x[:, i] = torch.multinomial(transition[x[:, i - 1]], 1, generator=g).squeeze(-1)
    return x


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "overrides", "margin"),
    [
        ("mdlm", {}, 0.5),
        ("duo", {}, 0.5),
        ("replaid", {"schedule_hidden_size": 32, "embedding_dim": 8}, 0.5),
        # SDDLM's objective is not a likelihood, but with its defaults (resampled loss mask, collapse hinge, 0.1 x
        # NELBO) the network learns the leave-one-out predictive that minimises the ELBO: informative at V = 12
        ("sddlm", {}, 0.5),
        # with the "mean" regulariser at weight 1 the optimum truncates every token below 1 / V (one-hot at this
        # tiny vocabulary) and the bound, though valid, can exceed log V: check validity only
        ("sddlm", {"regularizer": "mean"}, None),
    ],
    ids=["mdlm", "duo", "replaid", "sddlm-default", "sddlm-mean"],
)
def test_trained_nelbo_is_a_bound_on_a_known_entropy_source(variant, overrides, margin, tmp_path):
    transition, pi, rate, g = markov_chain()
    train = sample_sequences(transition, pi, 4096, g)
    held_out = sample_sequences(transition, pi, 512, g)
    vocab = STATES + 1  # one extra id: MDLM's mask token (unused by the others)
    model = build_model(variant, seed=0, vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        cond_dim=32, max_position_embeddings=LENGTH, hidden_dropout_prob=0.0, **overrides)
    args = DiffusionTrainingArguments(output_dir=str(tmp_path), max_steps=400, per_device_train_batch_size=64,
                                      learning_rate=3e-3, warmup_steps=20, lr_scheduler_type="cosine",
                                      logging_steps=50, report_to=[], save_strategy="no", use_cpu=True,
                                      disable_tqdm=True, seed=0)
    trainer = TRAINERS[variant](model=model, args=args,
                                train_dataset=datasets.Dataset.from_dict({"input_ids": train.tolist()}))
    trainer.train()
    model.eval()
    with torch.no_grad():
        values = model.nelbo(held_out, num_time_samples=8, generator=torch.Generator().manual_seed(1))  # (512,)
    mean, stderr = float(values.mean()), float(values.std() / math.sqrt(len(values)))
    log_v = math.log(STATES)
    # a bound: never below the entropy rate beyond Monte Carlo error
    assert mean >= rate - 3 * stderr, (variant, mean, stderr, rate)
    # and the model learned the chain: below the uniform code length by a margin
    if margin is not None:
        assert mean < rate + (1 - margin) * (log_v - rate), (variant, mean, rate, log_v)
