"""Likelihood evaluation over a dataset: the NELBO / perplexity bound of a dlm model (or the exact NLL of an AR model).

Protocol (methods.md §E): one stratified ("antithetic") t per sequence across each batch, t in [eps, 1], per-token
values summed over real tokens of the whole split: NELBO = sum / tokens (nats per token), ppl_bound = exp(NELBO),
bpd = NELBO / ln 2. `num_time_samples` > 1 averages several t per sequence to cut the Monte Carlo variance.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.utils.data import DataLoader
from transformers import default_data_collator

from modeling_dlm.generation_dlm import check_token_ids
from modeling_dlm.modeling_dlm import response_mask
from modeling_dlm.noise_schedules import antithetic_times


logger = logging.getLogger(__name__)


def checkpoint_kind(model) -> str:
    """What the checkpoint's bound means: a diffusion model trained on its NELBO, or a DCD-distilled student (marked
    by `DuoDistillationTrainer`, or by `dlm convert` of the authors' distilled weights)."""
    config = model.config
    source = getattr(config, "reference_source", None)
    if getattr(config, "distillation", None) == "dcd" or (isinstance(source, dict) and source.get("distilled")):
        return "DCD-distilled few-step student"
    return f"{config.model_type} diffusion model"


def announce_checkpoint(model, name: str) -> str:
    """Logs which kind of checkpoint is evaluated and, for a distilled student, what its bound means; returns the
    kind."""
    kind = checkpoint_kind(model)
    if kind.startswith("DCD"):
        logger.warning("%s is a DCD-distilled (few-step) student: its bound is the ELBO of the distilled network, "
                       "which distillation does not train (it trains few-step sampling); it is not the teacher's "
                       "likelihood, so compare it with the teacher's only as such", name)
    else:
        logger.info("%s: a %s; its bound is the NELBO it was trained on", name, kind)
    return kind


def nelbo_batch_sums(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    num_time_samples: int = 1,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    per_sequence: bool = False,
    prompt_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token NELBO over real tokens, number of real tokens), float64; scalars, or (B,) with
    `per_sequence`. With `prompt_mask` (conditional sets) the prompt is clean context and the sums run over the
    response tokens: the bound on -log p(response | prompt). No gradients."""
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    conditional = {} if prompt_mask is None else {"prompt_mask": prompt_mask.bool()}
    check_token_ids(input_ids, model.config.vocab_size, "input_ids")  # once per batch: the steps below never check
    if hasattr(model, "check_clean_ids"):  # absent from checkpoints whose shipped code predates it
        model.check_clean_ids(input_ids)
    total = None
    with torch.no_grad():
        for _ in range(num_time_samples):
            t = antithetic_times(input_ids.shape[0], eps=eps, generator=generator, device=input_ids.device)
            per_token = model.nelbo_per_token(input_ids, t, attention_mask=attention_mask, generator=generator,
                                              **conditional)
            total = per_token if total is None else total + per_token
    per_token = (total / num_time_samples).double()
    scored = response_mask(attention_mask, prompt_mask)
    mask = torch.ones_like(per_token) if scored is None else scored.to(per_token.dtype)
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
    """NELBO (dlm models) or NLL (causal LMs) over `dataset` (rows of input_ids[, attention_mask][, prompt_mask]; with
    `prompt_mask`, the conditional bound over response tokens)."""
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
        prompt_mask = batch.get("prompt_mask")
        if is_diffusion:
            s, n = nelbo_batch_sums(model, input_ids, mask, num_time_samples=num_time_samples, eps=eps,
                                    generator=generator,
                                    prompt_mask=None if prompt_mask is None else prompt_mask.to(device))
        elif prompt_mask is not None:
            raise ValueError("conditional (prompt_mask) evaluation is for dlm models; score a causal LM's response "
                             "tokens with labels instead")
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


def unigram_entropy(ids: torch.Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's empirical token distribution (methods.md §E).
    Report it next to gen-PPL: low entropy (repetition) can fake a good gen-PPL."""
    values = []
    for row in ids:
        counts = torch.bincount(row.flatten()).double()
        p = counts[counts > 0] / counts.sum()
        values.append(float(-(p * p.log()).sum()))
    return sum(values) / len(values)


def generative_perplexity(
    model,
    tokenizer,
    judge,
    judge_tokenizer,
    *,
    num_samples: int = 16,
    seq_len: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    show_progress: bool = False,
    **generate_kwargs,
) -> dict[str, float]:
    """Sample `num_samples` sequences, decode them, re-tokenise with the judge's tokenizer and score them with the
    judge causal LM: gen_ppl = exp(total NLL / scored tokens). Returns gen_ppl, entropy and the sampler settings."""
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    generate_kwargs.setdefault("stop_at_eos", False)  # the papers' protocol scores whole canvases
    samples = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        samples.append(model.generate(batch_size=n, max_new_tokens=seq_len, generator=generator,
                                      show_progress=show_progress, **generate_kwargs).cpu())
    ids = torch.cat(samples)
    return {**judge_samples(ids, tokenizer, judge, judge_tokenizer), "gen_num_samples": num_samples}


def judge_samples(ids: torch.Tensor, tokenizer, judge, judge_tokenizer) -> dict[str, float]:
    """gen-PPL of sampled ids (N, L) under a judge causal LM (decoded, re-tokenised with the judge's tokenizer, one
    BOS in front) and their unigram entropy: {"gen_ppl", "entropy", "gen_tokens_scored"}."""
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    judge.eval()
    judge_device = next(judge.parameters()).device
    max_len = getattr(judge.config, "max_position_embeddings", 1024)
    nll, count = 0.0, 0
    prefix = [judge_tokenizer.bos_token_id] if judge_tokenizer.bos_token_id is not None else []
    for text in texts:
        tokens = (prefix + judge_tokenizer(text, add_special_tokens=False)["input_ids"])[:max_len]
        if len(tokens) < 2:
            continue
        row = torch.tensor([tokens], device=judge_device)
        s, c = ar_batch_sums(judge, row, None)
        nll += float(s)
        count += int(c)
    if count == 0:
        raise ValueError("the samples decoded to no text the judge could score")
    return {"gen_ppl": math.exp(nll / count), "entropy": unigram_entropy(ids), "gen_tokens_scored": count}


def sft_accuracy(
    model,
    tokenizer,
    rows: list[dict[str, str]],
    *,
    seq_len: int,
    batch_size: int = 16,
    seed: int = 0,
    **generate_kwargs,
) -> dict[str, float]:
    """Exact-match and per-token accuracy of generated responses on `rows` ({"prompt", "response"}).

    Each prompt is framed as in SFT training ([BOS] prompt) and given `seq_len - len(prompt)` new tokens (the SFT
    canvas), the batch left-padded with one generator per row (seeded from `seed` and the row's index, so the result
    does not depend on `batch_size`), and the answer ends at its first EOS (`stop_at_eos`). The answer's
    whitespace-separated words are compared with the response's: per-token accuracy is the share of response words
    matched at their position, exact match the share of answers equal to the response."""
    if not rows:
        raise ValueError("sft_accuracy needs at least one row")
    device = next(model.parameters()).device
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = total = exact = 0
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [[bos, *tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]] for r in chunk]
        width = max(map(len, prompts))
        if width >= seq_len:
            raise ValueError(f"a prompt of {width} tokens leaves no room in seq_len={seq_len}")
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        generators = [torch.Generator(device=device).manual_seed(seed * 1_000_003 + start + i)
                      for i in range(len(chunk))]
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=seq_len - width, generator=generators, stop_at_eos=True,
                             **generate_kwargs)
        for row, answer in zip(chunk, out[:, width:].tolist()):
            words = tokenizer.decode(answer, skip_special_tokens=True).split()
            target = row["response"].split()
            correct += sum(a == b for a, b in zip(words, target))
            total += len(target)
            exact += words == target
    return {"token_accuracy": correct / max(total, 1), "exact_match": exact / len(rows), "rows": len(rows)}
