"""Likelihood evaluation over a dataset: the NELBO / perplexity bound of a dlm model (or the exact NLL of an AR model).

Protocol (methods.md §E): one stratified ("antithetic") t per sequence across each batch, t in [eps, 1], per-token
values summed over real tokens of the whole split: NELBO = sum / tokens (nats per token), ppl_bound = exp(NELBO),
bpd = NELBO / ln 2. `num_time_samples` > 1 averages several t per sequence to cut the Monte Carlo variance.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader
from transformers import default_data_collator

from modeling_dlm.noise_schedules import antithetic_times


def nelbo_batch_sums(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    num_time_samples: int = 1,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    per_sequence: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token NELBO over real tokens, number of real tokens), float64; scalars, or (B,) with
    `per_sequence`. No gradients."""
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    total = None
    with torch.no_grad():
        for _ in range(num_time_samples):
            t = antithetic_times(input_ids.shape[0], eps=eps, generator=generator, device=input_ids.device)
            per_token = model.nelbo_per_token(input_ids, t, attention_mask=attention_mask, generator=generator)
            total = per_token if total is None else total + per_token
    per_token = (total / num_time_samples).double()
    mask = torch.ones_like(per_token) if attention_mask is None else attention_mask.to(per_token.dtype)
    if per_sequence:
        return (per_token * mask).sum(-1), mask.sum(-1)
    return (per_token * mask).sum(), mask.sum()


def ar_batch_sums(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Exact next-token NLL sums for a causal LM (every token after the first is predicted)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double()
    mask = torch.ones_like(nll) if attention_mask is None else attention_mask[:, 1:].to(nll.dtype)
    return (nll * mask).sum(), mask.sum()


def evaluate_likelihood(
    model,
    dataset,
    *,
    batch_size: int = 16,
    num_time_samples: int = 1,
    eps: float = 1e-3,
    seed: int = 0,
    show_progress: bool = False,
) -> dict[str, float]:
    """NELBO (dlm models) or NLL (causal LMs) over `dataset` (rows of input_ids[, attention_mask])."""
    if num_time_samples < 1:
        raise ValueError(f"`num_time_samples` must be >= 1, got {num_time_samples}")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("the evaluation dataset is empty")
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=default_data_collator)
    is_diffusion = hasattr(model, "nelbo_per_token")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    nll = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    if show_progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="eval", unit="batch")
    for batch in loader:
        input_ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = mask.to(device) if mask is not None else None
        if is_diffusion:
            s, n = nelbo_batch_sums(model, input_ids, mask, num_time_samples=num_time_samples, eps=eps,
                                    generator=generator)
        else:
            s, n = ar_batch_sums(model, input_ids, mask)
        nll += s.cpu()
        tokens += n.cpu()
    value = float(nll / tokens)
    return {
        "nelbo": value,
        "ppl_bound": math.exp(min(value, 700.0)),
        "bpd": value / math.log(2),
        "tokens": int(tokens),
        "exact_nll": not is_diffusion,
    }
