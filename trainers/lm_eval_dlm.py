"""lm-evaluation-harness (`lm-eval` 0.4.x) model for every dlm checkpoint, registered under the name `dlm`.

    import lm_eval, trainers.lm_eval_dlm                       # the import registers "dlm"
    lm_eval.simple_evaluate(model="dlm", model_args="pretrained=DIR,mc_num=32,seed=0", tasks=[...])

    lm_eval --model dlm --model_args pretrained=DIR,mc_num=32 --tasks lambada_openai ...       # lm-eval's CLI
    dlm lm-eval --model dlm --model_args pretrained=DIR,mc_num=32 --tasks lambada_openai ...   # the same

lm-eval 0.4 finds models only in its own registry (it has no plugin entry points). Installing dlm installs a start-up
hook (`dlm_lm_eval.pth`, see `dlm_lm_eval_hook.py`) that registers `dlm` as a lazy placeholder whenever lm-eval
fills its registry, so plain `lm_eval --model dlm` works; `dlm lm-eval ...` (and `python -m trainers.lm_eval_dlm ...`)
import this module and then run lm-eval's own command line with the arguments as given, hook or not.

What each request type computes (`DiffusionLMEval`):
- `loglikelihood(context, continuation)`: minus the conditional NELBO of the continuation given the context, summed
  over the continuation's tokens: a lower bound on log p(continuation | context) (the context is clean, as in
  conditional fine-tuning; `model.nelbo(..., prompt_mask=..., reduction="sum")`). It is a Monte Carlo estimate over
  `mc_num` time samples: the request's ids repeated `mc_num` times as one batch, with stratified ("antithetic") times
  across the copies and a generator seeded with `seed` for every request. So a request's score does not depend on the
  batch it came in, and the choices of one question see the same times and noise (common random numbers, which
  lowers the variance of their differences).
- `loglikelihood_rolling(text)`: the same bound for a whole text, in windows of `max_length` tokens that score each
  token once, as lm-eval's rolling windows do: window k scores tokens [kL, (k+1)L) unconditionally, except the
  last, shorter window, which is given the preceding tokens (up to L in all) as clean context.
- `generate_until(context, {until, max_gen_toks, ...})`: `model.generate` from the context's ids with the checkpoint's
  saved sampler settings (`generation_config.json`; a warning when there is none), `max_gen_toks` new tokens, cut at
  the first `until` string; `do_sample`/`temperature` in the request are ignored (the sampler is the checkpoint's).
- `is_greedy`: greedy decoding is not defined for a diffusion model. Here it is the one-step decode: the continuation
  equals the argmax of the model's prediction with every continuation position at t = 1 (masked for MDLM, pure noise
  for the uniform-state and Gaussian variants, drawn with the seeded generator) given the clean context. lambada's
  `acc` reads it; it is a stricter test than an iterative decode.

Tokens: `add_special_tokens=False`; the context and continuation are split the way lm-eval's HF model splits them
(trailing spaces of the context move to the continuation; the continuation's ids are the tail of the whole text's).
A context too long for `max_length` (default: the model's `max_position_embeddings`) loses its left end; a
continuation longer than `max_length` is a ValueError.
"""

from __future__ import annotations

import logging
import os
import sys

import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models first: see _register below)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model


logger = logging.getLogger(__name__)
#: what lm-eval's command line passes as `device` when none is given (its EvaluatorConfig default)
LM_EVAL_DEFAULT_DEVICE = "cuda:0"


class DiffusionLMEval(LM):
    """A dlm checkpoint (SDDLM, Duo, RePlaid, MDLM) as an lm-eval `LM` (see the module docstring).

    Model args: `pretrained` (folder or Hub id), `mc_num` (Monte Carlo time samples per request, default 32),
    `seed` (default 0), `max_length` (default: the model's `max_position_embeddings`), `device` (default: the
    machine's accelerator, else the CPU), `show_progress` (tqdm over requests, default on). lm-eval always passes
    `batch_size`; it is accepted and unused, since each request is one batch (its `mc_num` copies, or one prompt)."""

    def __init__(self, pretrained: str, mc_num: int = 32, seed: int = 0, max_length: int | None = None,
                 device: str | None = None, batch_size: int | str = 1, show_progress: bool = True, **kwargs):
        super().__init__()
        from .checkpoints import load_model, load_tokenizer
        from .evaluation import announce_checkpoint

        unknown = sorted(set(kwargs) - {"dtype", "trust_remote_code", "max_batch_size"})
        if unknown:
            raise ValueError(f"unknown model_args for the dlm lm-eval model: {unknown}; expected pretrained, mc_num, "
                             f"seed, max_length, device, batch_size, show_progress")
        self.mc_num, self.seed = int(mc_num), int(seed)
        if self.mc_num < 1:
            raise ValueError(f"mc_num must be a positive integer, got {mc_num!r}")
        if device == LM_EVAL_DEFAULT_DEVICE and not torch.cuda.is_available():
            logger.warning("device %r (lm-eval's default) is not on this machine; using the machine's default "
                           "device instead", device)
            device = None
        self.model = load_model(str(pretrained), device)
        if not hasattr(self.model, "nelbo_per_token"):
            raise ValueError(f"{pretrained} holds a causal LM ({type(self.model).__name__}); evaluate it with "
                             f"lm-eval's own `--model hf`")
        self.tokenizer = load_tokenizer(str(pretrained), self.model)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = int(max_length) if max_length is not None else int(limit)
        if self.max_length < 2 or (limit is not None and self.max_length > limit):
            raise ValueError(f"max_length must be in [2, {limit}] (the model's max_position_embeddings), got "
                             f"{max_length!r}")
        self.show_progress = bool(show_progress)  # lm-eval's argument parsing turns "false" into False
        self.pretrained = str(pretrained)
        self.has_sampler_settings = _has_generation_config(self.pretrained)
        kind = announce_checkpoint(self.model, self.pretrained)
        logger.info("dlm lm-eval model: %s (%s, %s); loglikelihood = minus the conditional NELBO over %d time "
                    "samples (seed %d), a lower bound on log p; max_length %d", self.pretrained,
                    type(self.model).__name__, kind, self.mc_num, self.seed, self.max_length)

    # ---- lm-eval's interface ----------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", self.pretrained).replace("/", "__")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        for request in self._progress(requests, "loglikelihood", disable_tqdm):
            context, continuation = request.args
            context_ids, continuation_ids = self.encode_pair(context, continuation)
            results.append(self.score(context_ids, continuation_ids, greedy=True))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in self._progress(requests, "loglikelihood_rolling", disable_tqdm):
            (text,) = request.args
            ids = self.encode(text)
            if not ids:
                raise ValueError("loglikelihood_rolling got a text with no tokens")
            total = 0.0
            for context_ids, scored_ids in rolling_windows(ids, self.max_length):
                total += self.score(context_ids, scored_ids)[0]
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if requests and not self.has_sampler_settings:
            logger.warning("%s has no generation_config.json (saved sampler settings): generate_until samples with "
                           "the defaults of %s's generation config, which may not be how the model was meant to "
                           "sample", self.pretrained, type(self.model).__name__)
        outputs = []
        for request in self._progress(requests, "generate_until", disable_tqdm):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            if max_new < 1 or max_new >= self.max_length:
                raise ValueError(f"max_gen_toks must be in [1, {self.max_length - 1}] for this model, got {max_new}")
            context_ids = self.encode(context)[-(self.max_length - max_new):] if context else []
            generator = torch.Generator(device=self.model.device).manual_seed(self.seed)
            kwargs = {"max_new_tokens": max_new, "generator": generator, "show_progress": False}
            if context_ids:
                kwargs["input_ids"] = torch.tensor([context_ids], device=self.model.device)
            else:
                kwargs["batch_size"] = 1
            with torch.no_grad():
                sequence = self.model.generate(**kwargs)[0, len(context_ids):]
            text = self.tokenizer.decode(sequence.tolist(), skip_special_tokens=True)
            cut = min((text.find(stop) for stop in until if stop and stop in text), default=len(text))
            outputs.append(text[:cut])
        return outputs

    # ---- the scores -------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context go to the continuation, whose ids are the tail of the
        whole text's ids; the context is cut on the left to fit `max_length`."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context) if context else []
        continuation_ids = whole[len(context_ids):]
        if not continuation_ids:
            raise ValueError(f"the continuation {continuation!r} has no tokens of its own")
        if len(continuation_ids) > self.max_length:
            raise ValueError(f"a continuation of {len(continuation_ids)} tokens is longer than max_length "
                             f"{self.max_length}")
        keep = self.max_length - len(continuation_ids)  # context tokens that fit, from the right
        return context_ids[max(0, len(context_ids) - keep):], continuation_ids

    def score(self, context_ids: list[int], continuation_ids: list[int], greedy: bool = False) -> tuple[float, bool]:
        """(minus the conditional NELBO of the continuation, summed over its tokens, averaged over `mc_num` time
        samples; whether the one-step decode reproduces it)."""
        ids, prompt_mask = request_batch(context_ids, continuation_ids, self.mc_num, self.model.device)
        generator = torch.Generator(device=self.model.device).manual_seed(self.seed)
        conditional = {"prompt_mask": prompt_mask} if context_ids else {}
        with torch.no_grad():
            nelbo = self.model.nelbo(ids, generator=generator, reduction="sum", **conditional)  # (mc_num,)
            is_greedy = self._one_step_decode_matches(ids[:1], prompt_mask[:1], len(context_ids)) if greedy \
                else False
        return -float(nelbo.double().mean()), is_greedy

    def _one_step_decode_matches(self, ids: torch.Tensor, prompt_mask: torch.Tensor, start: int) -> bool:
        generator = torch.Generator(device=ids.device).manual_seed(self.seed)
        t = torch.ones(1, device=ids.device)
        noised = self.model.noised_forward(ids, t, generator=generator,
                                           prompt_mask=prompt_mask if start else None)
        guess = noised.logits[0, start:].argmax(-1)
        return bool((guess == ids[0, start:]).all())

    def _progress(self, requests, desc: str, disable: bool):
        if not self.show_progress or disable:
            return requests
        from tqdm.auto import tqdm

        return tqdm(requests, desc=f"dlm {desc}", unit="request")


def request_batch(context_ids: list[int], continuation_ids: list[int], copies: int, device=None):
    """(ids (copies, n), prompt_mask (copies, n) bool): the request repeated `copies` times, the context marked."""
    ids = torch.tensor([list(context_ids) + list(continuation_ids)], device=device).expand(copies, -1)
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[:, :len(context_ids)] = True
    return ids.contiguous(), prompt_mask


def rolling_windows(ids: list[int], length: int) -> list[tuple[list[int], list[int]]]:
    """(context, scored) pairs that score every token once: [kL, (k+1)L) without context, and a last, shorter window
    given the preceding tokens as context, up to `length` tokens in all (lm-eval's rolling windows)."""
    windows = []
    for start in range(0, len(ids), length):
        scored = ids[start:start + length]
        context = ids[max(0, start + len(scored) - length):start] if start else []
        windows.append((context, scored))
    return windows


def _has_generation_config(path: str) -> bool:
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "generation_config.json"))
    return True  # a Hub repo: transformers loads (or defaults) it; not checked offline


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the `dlm` model registered (`dlm lm-eval ...`)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


# lm-eval imports `lm_eval.models` (its own models, as lazy placeholders) only while its registry is empty, so it is
# imported above before "dlm" goes in: otherwise `--model hf` would vanish once this module is imported. When dlm's
# start-up hook (dlm_lm_eval_hook.py) registered "dlm" as the placeholder "trainers.lm_eval_dlm:DiffusionLMEval",
# this replaces it with the class. Run as `python -m trainers.lm_eval_dlm`, this file is `__main__`: it then imports
# itself under its real name, which registers the one class lm-eval's placeholder names.
if __name__ == "__main__":
    from trainers.lm_eval_dlm import main as _main

    sys.exit(_main())
else:
    register_model("dlm")(DiffusionLMEval)
