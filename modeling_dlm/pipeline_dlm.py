"""The `dlm-text-generation` pipeline: text in, text out, through a dlm model's own `generate`.

Every checkpoint saved by a dlm model ships this file and names it in `config.json` (`custom_pipelines`), so

    pipe = pipeline(model="path/or/repo", trust_remote_code=True)     # task inferred: "dlm-text-generation"
    pipe(["The module", "A function"], num_steps=32, max_new_tokens=24, seed=0)
    # [[{"generated_text": "The module ..."}], [{"generated_text": "A function ..."}]]

works where only torch and transformers are installed. The output follows transformers' `text-generation`: one list
of `{"generated_text": ...}` per prompt (`num_return_sequences` entries), a list of such lists for a list of prompts.

Prompts are encoded without special tokens and, as in `dlm generate` and in training (`[BOS] text [EOS]` blocks),
start with the tokenizer's BOS token (`prepend_bos=False` turns that off). An empty prompt (or none) samples
unconditionally. Prompt tokens are clamped by `generate` and never change; with `return_full_text=True` (the default)
the prompt string is put in front of the decoded completion, as in `text-generation`. A list of prompts is run in
batches of `batch_size` (default 1) prompts, left-padded (padding is masked out of attention, so an empty prompt
in a batch still samples unconditionally).

Sampling keywords go to `model.generate` after the model's own generation config has validated them: `num_steps`,
`sampler`, `temperature`, `top_p`, `top_k`, `max_new_tokens`, `score_temperature` (RePlaid), `stop_at_eos`,
`show_progress`, `streamer`. `seed` (an int) gives every output row its own fresh `torch.Generator`: row
`r = i * num_return_sequences + j` (prompt `i` of the call, sample `j`) is seeded with `seed + r`, so equal calls give
equal outputs and a prompt's text does not depend on `batch_size` or on the other prompts of its batch (each row draws
only over its own positions: see `generate`'s list of generators). `generator` passes one shared stream of your own
instead (then the draws depend on the batching). Without `max_new_tokens` (here or in the generation config) the
completion is 64 tokens, or fewer if the prompt leaves less room in `max_position_embeddings`. With `stop_at_eos` (on
when the generation config has an `eos_token_id`) the text of a completion ends at its first generated EOS.

This file ships inside checkpoints: only torch, transformers and the standard library, and importing it only defines
things.
"""

from __future__ import annotations

import collections.abc
import copy
import typing

import torch
from torch.utils.data import DataLoader
from transformers import Pipeline
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator


PIPELINE_TASK = "dlm-text-generation"
DEFAULT_MAX_NEW_TOKENS = 64


class DLMTextGenerationPipeline(Pipeline):
    r"""Text generation with a dlm diffusion language model (`task="dlm-text-generation"`).

    Call arguments (also accepted when building the pipeline, as defaults for every call):
        text_inputs: a prompt, a list of prompts, `""` or nothing (one unconditional sample per `""`).
        max_new_tokens, num_steps, sampler, temperature, top_p, top_k, score_temperature, show_progress: passed to
            `model.generate`, checked first by the model's generation config (a bad value raises `ValueError`).
        num_return_sequences (`int`, defaults to 1): samples per prompt.
        return_full_text (`bool`, defaults to `True`): put the prompt in front of the completion.
        prepend_bos (`bool`, defaults to `True`): start non-empty prompts with the tokenizer's BOS token.
        seed (`int`): one generator per output row, seeded `seed + row` (rows counted over the whole call), so that
            a prompt's output does not depend on the batching; or generator (`torch.Generator`): one shared stream
            (not both).
        stop_at_eos (`bool`): end each text at its first generated EOS (default: on when the generation config has
            an `eos_token_id`).
        streamer: a transformers streamer (batch size 1 only), e.g. `TextStreamer` or dlm's `DraftStreamer`.
        skip_special_tokens (`bool`, defaults to `True`), clean_up_tokenization_spaces: passed to `decode`.
    """

    _pipeline_calls_generate = False  # dlm's generate is not autoregressive: skip transformers' AR plumbing
    _load_tokenizer = None  # loaded when the checkpoint has one; __init__ explains what to do when it does not
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    _GENERATE_ONLY = ("streamer",)  # generate() arguments that are not generation-config fields

    def __init__(self, model, tokenizer=None, *args, seed: int | None = None, **kwargs):
        for name in ("generate", "generation_config", "generation_config_class"):
            if not hasattr(model, name):
                raise ValueError(
                    f"the {PIPELINE_TASK} pipeline needs a dlm diffusion model; {type(model).__name__} has no `{name}`"
                )
        if tokenizer is None:
            raise ValueError(
                f"the {PIPELINE_TASK} pipeline needs a tokenizer, and none was found with the model: save it next to "
                f"the weights (`tokenizer.save_pretrained(checkpoint_dir)`) or pass `tokenizer=...` to `pipeline()`"
            )
        self._default_seed = _check_seed(seed)
        super().__init__(model, tokenizer, *args, **kwargs)

    # ---- parameters -------------------------------------------------------------------------------------------------
    def _sanitize_parameters(
        self,
        return_full_text=None,
        num_return_sequences=None,
        prepend_bos=None,
        generator=None,
        seed=None,
        skip_special_tokens=None,
        clean_up_tokenization_spaces=None,
        max_new_tokens=None,
        **generate_kwargs,
    ):
        preprocess_params, forward_params, postprocess_params = {}, {}, {}
        for name, value in (("return_full_text", return_full_text), ("prepend_bos", prepend_bos),
                            ("skip_special_tokens", skip_special_tokens)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False, got {value!r}")
        if return_full_text is not None:
            postprocess_params["return_full_text"] = return_full_text
        if skip_special_tokens is not None:
            postprocess_params["skip_special_tokens"] = skip_special_tokens
        if clean_up_tokenization_spaces is not None:
            postprocess_params["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        if prepend_bos is not None:
            preprocess_params["prepend_bos"] = prepend_bos
        if max_new_tokens is not None:
            if not _is_int(max_new_tokens) or max_new_tokens < 1:
                raise ValueError(f"`max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}")
            preprocess_params["max_new_tokens"] = forward_params["max_new_tokens"] = max_new_tokens
        if num_return_sequences is not None:
            if not _is_int(num_return_sequences) or num_return_sequences < 1:
                raise ValueError(f"`num_return_sequences` must be an integer >= 1, got {num_return_sequences!r}")
            forward_params["num_return_sequences"] = num_return_sequences
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}")
            forward_params["generator"] = generator
        if seed is not None:  # per-row generators, built in _forward; it overrides a generator given at construction
            forward_params["seed"], forward_params["generator"] = seed, None
        if generate_kwargs:
            config_kwargs = {k: v for k, v in generate_kwargs.items() if k not in self._GENERATE_ONLY}
            self._check_generation_kwargs(config_kwargs)
            forward_params.update(generate_kwargs)
        return preprocess_params, forward_params, postprocess_params

    def _check_generation_kwargs(self, kwargs: dict):
        """Validate sampling keywords with the model's own generation config (what `generate` would do); returns
        the updated config."""
        config = copy.deepcopy(self.model.generation_config)
        if not hasattr(config, "num_steps"):  # a plain GenerationConfig: lift it into the model's class
            config = self.model.generation_config_class.from_dict(config.to_dict())
        unknown = config.update(**kwargs)  # validates the updated config: ValueError naming a bad value
        if unknown:
            raise TypeError(f"{PIPELINE_TASK}: unexpected keyword arguments {sorted(unknown)}")
        return config

    def _stop_token_ids(self, generate_kwargs: dict) -> list[int] | None:
        """The EOS ids that end a text (as `generate`'s `stop_at_eos` resolves them), or None when it is off."""
        config = self._check_generation_kwargs({k: v for k, v in generate_kwargs.items()
                                                if k not in (*self._GENERATE_ONLY, "generator")})
        if not type(self.model)._stops_at_eos(config):
            return None
        return torch.as_tensor(config.eos_token_id).reshape(-1).tolist()

    def _configured_max_new_tokens(self, max_new_tokens: int | None) -> int | None:
        return max_new_tokens if max_new_tokens is not None else self.model.generation_config.max_new_tokens

    # ---- the three stages -------------------------------------------------------------------------------------------
    def __call__(self, text_inputs=None, **kwargs):
        """Generate text from a prompt or a list of prompts; see the class docstring for the keyword arguments.

        Returns a list of `{"generated_text": str}` per prompt (one entry per returned sequence), or a list of such
        lists for a list of prompts.
        """
        seed = _check_seed(kwargs.pop("seed", None))
        if seed is not None and kwargs.get("generator") is not None:
            raise ValueError("pass either `seed` or `generator`, not both")
        if seed is None and kwargs.get("generator") is None and "generator" not in self._forward_params:
            seed = self._default_seed
        if seed is not None:  # fresh per-row generators in every call: equal calls give equal outputs
            kwargs["seed"] = seed
        if text_inputs is None:
            text_inputs = ""
        if isinstance(text_inputs, tuple):
            text_inputs = list(text_inputs)
        if isinstance(text_inputs, list) and not text_inputs:
            return []
        return super().__call__(text_inputs, **kwargs)

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """transformers' iterator with this pipeline's collate function (left padding that allows empty prompts); each
        prompt carries its index in the call, which seeds its rows."""
        if isinstance(inputs, collections.abc.Sized):
            dataset = PipelineDataset(_Indexed(inputs), self.preprocess, preprocess_params)
        else:
            dataset = PipelineIterator(map(_Row._make, enumerate(inputs)), self.preprocess, preprocess_params)
        collate_fn = _first_item if batch_size == 1 else self._collate  # batch_size 1: items are not batched
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=collate_fn)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _collate(self, items: list[dict]) -> dict:
        """Left-pad the prompts of a batch (the last may hold a single one); padding is masked out of attention and,
        like the prompt, never changes."""
        width = max(item["input_ids"].shape[1] for item in items)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            length = item["input_ids"].shape[1]
            if length:
                input_ids[row, width - length:] = item["input_ids"][0]
                attention_mask[row, width - length:] = item["attention_mask"][0]
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "prompt_text": [item["prompt_text"] for item in items],
                "prompt_index": [item["prompt_index"] for item in items]}

    def preprocess(self, prompt_text, prepend_bos: bool = True, max_new_tokens: int | None = None):
        index = 0  # a single prompt (transformers' run_single) is prompt 0
        if isinstance(prompt_text, _Row):
            index, prompt_text = prompt_text
        if prompt_text is None:
            prompt_text = ""
        if not isinstance(prompt_text, str):
            raise TypeError(f"prompts must be strings, got {type(prompt_text).__name__}: {prompt_text!r}")
        ids = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"] if prompt_text else []
        if ids and prepend_bos and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        limit = self.model.config.max_position_embeddings
        wanted = self._configured_max_new_tokens(max_new_tokens)
        shown = prompt_text if len(prompt_text) <= 40 else prompt_text[:37] + "..."
        if wanted is not None and len(ids) + wanted > limit:
            raise ValueError(
                f"prompt {shown!r} is {len(ids)} tokens; with max_new_tokens={wanted} that is {len(ids) + wanted}, "
                f"more than the model's max_position_embeddings={limit}"
            )
        if wanted is None and len(ids) >= limit:
            raise ValueError(
                f"prompt {shown!r} is {len(ids)} tokens and leaves no room for new tokens within the model's "
                f"max_position_embeddings={limit}"
            )
        input_ids = torch.tensor([ids], dtype=torch.long).reshape(1, len(ids))
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "prompt_text": prompt_text,
                "prompt_index": index}

    def _forward(self, model_inputs, max_new_tokens=None, num_return_sequences=1, seed=None, **generate_kwargs):
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs["attention_mask"]
        prompt_text, prompt_index = model_inputs["prompt_text"], model_inputs["prompt_index"]
        batch, prompt_len = input_ids.shape
        max_new_tokens = self._configured_max_new_tokens(max_new_tokens)
        if max_new_tokens is None:
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, self.model.config.max_position_embeddings - prompt_len)
        stop_ids = self._stop_token_ids(generate_kwargs)
        if seed is not None:  # row r = prompt * num_return_sequences + sample of the call: seeded seed + r
            indices = prompt_index if isinstance(prompt_index, list) else [prompt_index]
            generate_kwargs["generator"] = [
                torch.Generator(device=self.model.device).manual_seed(seed + index * num_return_sequences + sample)
                for index in indices for sample in range(num_return_sequences)
            ]
        if prompt_len == 0:  # unconditional: the canvas is only new tokens
            output = self.model.generate(batch_size=batch * num_return_sequences, max_new_tokens=max_new_tokens,
                                         **generate_kwargs)
        else:
            output = self.model.generate(
                input_ids=input_ids.repeat_interleave(num_return_sequences, dim=0),
                attention_mask=attention_mask.repeat_interleave(num_return_sequences, dim=0),
                max_new_tokens=max_new_tokens,
                **generate_kwargs,
            )
        sequences = output.sequences if hasattr(output, "sequences") else output
        return {
            "generated_sequence": sequences.reshape(batch, num_return_sequences, -1),
            "input_ids": input_ids,
            "prompt_text": prompt_text,
            "stop_ids": [stop_ids] * batch if isinstance(prompt_text, list) else stop_ids,
        }

    def postprocess(self, model_outputs, return_full_text: bool = True, skip_special_tokens: bool = True,
                    clean_up_tokenization_spaces=None):
        prompt_len = model_outputs["input_ids"].shape[-1]
        prompt_text, stop_ids = model_outputs["prompt_text"], model_outputs["stop_ids"]
        records = []
        for sequence in model_outputs["generated_sequence"][0].tolist():
            new = sequence[prompt_len:]
            if stop_ids is not None:  # the text ends at the first generated EOS
                new = next((new[:k] for k, token in enumerate(new) if token in stop_ids), new)
            text = self.tokenizer.decode(new, skip_special_tokens=skip_special_tokens,
                                         clean_up_tokenization_spaces=clean_up_tokenization_spaces)
            records.append({"generated_text": prompt_text + text if return_full_text else text})
        return records


class _Row(typing.NamedTuple):
    """A prompt with its index in the pipeline call (the index seeds its rows)."""

    index: int
    text: object


class _Indexed(collections.abc.Sequence):
    """A sized input (list, dataset) seen as `_Row`s."""

    def __init__(self, items):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Row:
        return _Row(index, self.items[index])


def _first_item(items: list):
    return items[0]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_seed(seed):
    if seed is not None and not _is_int(seed):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}: {seed!r}")
    return seed


def register_pipeline() -> None:
    """Register `dlm-text-generation` with transformers' pipeline registry in this process (safe to call repeatedly),
    so that `pipeline("dlm-text-generation", model=model, tokenizer=tokenizer)` accepts in-memory models. Checkpoints
    need no registration: their `config.json` names this pipeline."""
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    registered = PIPELINE_REGISTRY.supported_tasks.get(PIPELINE_TASK)
    if registered is None or registered["impl"] is not DLMTextGenerationPipeline:
        PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=DLMTextGenerationPipeline,
                                            pt_model=AutoModel, type="text")
