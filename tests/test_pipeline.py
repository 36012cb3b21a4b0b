"""The `dlm-text-generation` pipeline (modeling_dlm/pipeline_dlm.py) and the streamers of `generate`.

Per variant, a tiny model (hidden 32) sized for dlm's built-in byte-level BPE tokenizer is saved with that tokenizer;
`pipeline(model=checkpoint, trust_remote_code=True)` must infer the task from `config.json` and load the pipeline
class from the checkpoint's own `pipeline_dlm.py`. Outputs are checked against direct `model.generate` calls with the
same seeds (row r of a call seeded `seed + r`), so the pipeline is pinned down token for token: prompts, batching
(left padding), `return_full_text`, seeds, unconditional sampling, the default length and the end at EOS. Bad
arguments raise errors that name the bad value.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import TextDiffusionStreamer, TextStreamer, pipeline

from modeling_dlm import VARIANTS, DLMTextGenerationPipeline, DraftStreamer, pipeline_dlm, register_pipeline
from modeling_dlm.pipeline_dlm import DEFAULT_MAX_NEW_TOKENS, PIPELINE_TASK
from trainers.data import builtin_tokenizer

from .conftest import tiny_model


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

MAX_POSITIONS = 32
PROMPTS = ["The module", "x", "A function returns"]  # in batches of two, the last prompt is alone in its batch
SAMPLE = dict(max_new_tokens=6, num_steps=3)


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer()


def make_model(variant: str, tokenizer):
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if variant == "mdlm":
        ids["mask_token_id"] = tokenizer.mask_token_id
    return tiny_model(variant, seed=2, vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS, **ids)


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tokenizer, tmp_path_factory):
    """(variant, checkpoint folder, model): the model saved with its tokenizer. The folder's name is fixed per variant
    so that transformers' module cache reuses one entry across runs."""
    variant = request.param
    model = make_model(variant, tokenizer)
    checkpoint = tmp_path_factory.mktemp("pipeline") / f"dlm-pipeline-test-{variant}"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return variant, checkpoint, model


@pytest.fixture(scope="module")
def pipe(saved):
    return pipeline(model=str(saved[1]), trust_remote_code=True)


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]])


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows(seed: int, count: int) -> list:
    """The per-row generators of a pipeline call with `seed` and `count` output rows."""
    return [seeded(seed + row) for row in range(count)]


def texts(outputs) -> list:
    """The generated texts of a pipeline answer, keeping its nesting."""
    if isinstance(outputs, dict):
        return outputs["generated_text"]
    return [texts(item) for item in outputs]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint and task inference
# ---------------------------------------------------------------------------------------------------------------------
def test_checkpoint_names_and_ships_the_pipeline(saved):
    variant, checkpoint, _ = saved
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["custom_pipelines"] == {PIPELINE_TASK: {
        "impl": "pipeline_dlm.DLMTextGenerationPipeline", "pt": ["AutoModel"], "type": "text"}}
    assert (checkpoint / "pipeline_dlm.py").read_bytes() == Path(pipeline_dlm.__file__).read_bytes()
    assert (checkpoint / "tokenizer.json").exists()


def test_pipeline_infers_the_task_from_the_checkpoint(saved, pipe, tokenizer):
    variant, _, model = saved
    assert pipe.task == PIPELINE_TASK
    assert type(pipe).__name__ == "DLMTextGenerationPipeline"
    # the class comes from the checkpoint's pipeline_dlm.py (remote code), not from the installed package
    module = type(pipe).__module__
    assert module.startswith("transformers_modules.") and module.endswith(".pipeline_dlm")
    assert type(pipe.model).__name__ == type(model).__name__
    assert len(pipe.tokenizer) == len(tokenizer) == pipe.model.config.vocab_size


# ---------------------------------------------------------------------------------------------------------------------
# Outputs, token for token
# ---------------------------------------------------------------------------------------------------------------------
def test_single_prompt_matches_generate(pipe, tokenizer):
    out = pipe(PROMPTS[0], seed=11, **SAMPLE)
    assert isinstance(out, list) and len(out) == 1 and set(out[0]) == {"generated_text"}
    ids = prompt_ids(tokenizer, PROMPTS[0])  # BOS + prompt, as `dlm generate` and training frame text
    expected = pipe.model.generate(input_ids=ids, generator=rows(11, 1), **SAMPLE)
    assert torch.equal(expected[:, : ids.shape[1]], ids)
    new_text = tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert out[0]["generated_text"] == PROMPTS[0] + new_text
    assert pipe(PROMPTS[0], seed=11, prepend_bos=False, **SAMPLE) != out  # the BOS token is part of the canvas


def test_return_full_text(pipe):
    full = pipe(PROMPTS[0], seed=3, **SAMPLE)[0]["generated_text"]
    new = pipe(PROMPTS[0], seed=3, return_full_text=False, **SAMPLE)[0]["generated_text"]
    assert full.startswith(PROMPTS[0]) and full == PROMPTS[0] + new
    assert not new.startswith(PROMPTS[0])
    default_false = type(pipe)(model=pipe.model, tokenizer=pipe.tokenizer, return_full_text=False)
    assert default_false(PROMPTS[0], seed=3, **SAMPLE)[0]["generated_text"] == new


def test_batched_prompts(pipe, tokenizer):
    one_by_one = pipe(PROMPTS, seed=5, **SAMPLE)
    batched = pipe(PROMPTS, seed=5, batch_size=2, **SAMPLE)
    for out in (one_by_one, batched):
        assert isinstance(out, list) and len(out) == len(PROMPTS)
        for prompt, records in zip(PROMPTS, out):
            assert isinstance(records, list) and len(records) == 1
            assert records[0]["generated_text"].startswith(prompt)
    # a batch of two is left-padded to its longest prompt, with the padding masked out of attention
    first, second = prompt_ids(tokenizer, PROMPTS[0]), prompt_ids(tokenizer, PROMPTS[1])
    width = max(first.shape[1], second.shape[1])
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, prompt in enumerate((first, second)):
        ids[row, width - prompt.shape[1]:] = prompt[0]
        mask[row, width - prompt.shape[1]:] = 1
    expected = pipe.model.generate(input_ids=ids, attention_mask=mask, generator=rows(5, 2), **SAMPLE)
    for row in range(2):
        new_text = tokenizer.decode(expected[row, width:], skip_special_tokens=True)
        assert batched[row][0]["generated_text"] == PROMPTS[row] + new_text
    assert batched == one_by_one  # per-row seeds: a prompt's text does not depend on the batching
    assert pipe((PROMPTS[0],), seed=5, **SAMPLE) == [pipe(PROMPTS[0], seed=5, **SAMPLE)]  # a tuple is a batch too
    assert pipe([], **SAMPLE) == []


def test_num_return_sequences(pipe, tokenizer):
    out = pipe(PROMPTS[:2], num_return_sequences=3, seed=1, batch_size=2, **SAMPLE)
    assert [len(records) for records in out] == [3, 3]
    assert all(record["generated_text"].startswith(prompt) for prompt, records in zip(PROMPTS, out)
               for record in records)
    single = pipe(PROMPTS[0], num_return_sequences=3, seed=1, **SAMPLE)
    ids = prompt_ids(tokenizer, PROMPTS[0])
    expected = pipe.model.generate(input_ids=ids.repeat(3, 1), generator=rows(1, 3), **SAMPLE)
    assert texts(single) == [PROMPTS[0] + tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True)
                             for row in expected]
    assert len(set(texts(single))) > 1
    assert out[0] == single  # prompt 0's rows are 0..2 in both calls


def test_seeds_reproduce(saved, pipe):
    first = pipe(PROMPTS, seed=7, batch_size=2, **SAMPLE)
    assert pipe(PROMPTS, seed=7, batch_size=2, **SAMPLE) == first
    assert pipe(PROMPTS, seed=8, batch_size=2, **SAMPLE) != first
    assert pipe(PROMPTS, seed=7, batch_size=3, **SAMPLE) == first  # per-row seeds: independent of the batching
    shared = pipe(PROMPTS, generator=seeded(7), batch_size=2, **SAMPLE)  # one shared stream of your own
    assert pipe(PROMPTS, generator=seeded(7), batch_size=2, **SAMPLE) == shared
    seeded_pipe = pipeline(model=str(saved[1]), trust_remote_code=True, seed=7)  # a default seed, fresh per call
    assert seeded_pipe(PROMPTS, batch_size=2, **SAMPLE) == first
    assert seeded_pipe(PROMPTS, batch_size=2, **SAMPLE) == first
    assert seeded_pipe(PROMPTS, seed=8, batch_size=2, **SAMPLE) != first


def test_unconditional_generation(pipe, tokenizer):
    expected = pipe.model.generate(batch_size=2, generator=rows(4, 2), **SAMPLE)
    expected_texts = [tokenizer.decode(row, skip_special_tokens=True) for row in expected]
    assert texts(pipe("", num_return_sequences=2, seed=4, **SAMPLE)) == expected_texts
    assert texts(pipe(num_return_sequences=2, seed=4, **SAMPLE)) == expected_texts  # no prompt at all
    assert texts(pipe(None, num_return_sequences=2, seed=4, return_full_text=False, **SAMPLE)) == expected_texts
    # an empty prompt batched with a real one is all padding: still unconditional, and nothing breaks
    mixed = pipe(["", PROMPTS[0]], seed=4, batch_size=2, **SAMPLE)
    assert len(mixed) == 2 and mixed[1][0]["generated_text"].startswith(PROMPTS[0])
    assert len(tokenizer(mixed[0][0]["generated_text"])["input_ids"]) > 0
    assert mixed == pipe(["", PROMPTS[0]], seed=4, **SAMPLE)  # ... and equal to each row alone
    assert mixed[0][0]["generated_text"] == expected_texts[0]


def test_default_length_fills_the_context(pipe, tokenizer):
    """Without max_new_tokens anywhere, 64 new tokens, or as many as fit in max_position_embeddings."""
    assert pipe.model.generation_config.max_new_tokens is None
    streamer = DraftStreamer(tokenizer)
    pipe(PROMPTS[0], num_steps=2, seed=0, streamer=streamer)
    prompt_len = prompt_ids(tokenizer, PROMPTS[0]).shape[1]
    assert len(streamer.prompt_ids) == prompt_len
    assert len(streamer.new_ids) == min(DEFAULT_MAX_NEW_TOKENS, MAX_POSITIONS - prompt_len)
    pipe(num_steps=2, seed=0, streamer=streamer)
    assert len(streamer.prompt_ids) == 0 and len(streamer.new_ids) == min(DEFAULT_MAX_NEW_TOKENS, MAX_POSITIONS)


def test_text_ends_at_the_first_generated_eos(saved, tokenizer):
    """With an EOS in the generation config, `generate` pads after the first generated EOS and the text ends at it;
    `stop_at_eos=False` keeps everything."""
    variant = saved[0]
    model = make_model(variant, tokenizer)
    eos = tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == eos
    with torch.no_grad():  # make EOS likely, so that most rows have one early
        model.backbone.output_layer.linear.bias[eos] += 8.0  # about 40% of x_hat on EOS (vocabulary 4096)
    pipe = DLMTextGenerationPipeline(model=model, tokenizer=tokenizer)
    keep = dict(skip_special_tokens=False, return_full_text=False, num_return_sequences=4, **SAMPLE)
    raw = model.generate(input_ids=prompt_ids(tokenizer, PROMPTS[0]).repeat(4, 1), generator=rows(3, 4),
                         stop_at_eos=False, **SAMPLE)
    new = raw[:, prompt_ids(tokenizer, PROMPTS[0]).shape[1]:].tolist()
    assert any(eos in row[:-1] for row in new), variant  # the test needs an EOS before the last new token
    cut = [row[:row.index(eos)] if eos in row else row for row in new]
    assert texts(pipe(PROMPTS[0], seed=3, **keep)) == [tokenizer.decode(row, skip_special_tokens=False)
                                                       for row in cut]
    assert texts(pipe(PROMPTS[0], seed=3, stop_at_eos=False, **keep)) == [
        tokenizer.decode(row, skip_special_tokens=False) for row in new]


@pytest.mark.parametrize("batch_size", [2, 3])
def test_argmax_rows_do_not_depend_on_the_batch(pipe, batch_size):
    """A deterministic configuration (top_k=1: the argmax of x_hat at every step): prompts of different lengths,
    left-padded together, give each prompt exactly its text alone with the same per-row seed."""
    alone = [pipe(prompt, seed=row, top_k=1, **SAMPLE)[0] for row, prompt in enumerate(PROMPTS)]  # row r: seed 0 + r
    assert [records[0] for records in pipe(PROMPTS, seed=0, top_k=1, batch_size=batch_size, **SAMPLE)] == alone


# ---------------------------------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_arguments_raise_naming_the_value(saved, pipe):
    variant = saved[0]
    wrong_sampler = "greedy_tail" if variant == "replaid" else "ddim"
    cases = [
        (dict(sampler="bogus"), ValueError, "sampler.*'bogus'"),
        (dict(sampler=wrong_sampler), ValueError, f"sampler.*'{wrong_sampler}'"),
        (dict(num_steps=0), ValueError, "num_steps.*got 0"),
        (dict(num_steps=2.5), ValueError, "num_steps.*got 2.5"),
        (dict(top_p=1.5), ValueError, "top_p.*got 1.5"),
        (dict(top_p=0.0), ValueError, "top_p.*got 0.0"),
        (dict(temperature=0.0), ValueError, "temperature.*got 0.0"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens.*got 0"),
        (dict(max_new_tokens=-3), ValueError, "max_new_tokens.*got -3"),
        (dict(num_return_sequences=0), ValueError, "num_return_sequences.*got 0"),
        (dict(return_full_text="yes"), TypeError, "return_full_text.*'yes'"),
        (dict(seed="0"), TypeError, "seed.*'0'"),
        (dict(seed=1, generator=seeded(1)), ValueError, "either `seed` or `generator`"),
        (dict(generator=0), TypeError, "generator.*int"),
        (dict(num_stepz=3), TypeError, "num_stepz"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            pipe(PROMPTS[0], **kwargs)
    with pytest.raises(ValueError, match=r"is 3\d tokens and leaves no room.*max_position_embeddings=32"):
        pipe("word " * (MAX_POSITIONS + 2), num_steps=2)
    with pytest.raises(ValueError, match=r"'A function returns' is \d+ tokens; with max_new_tokens=30 that is 3[3-9], "
                                         r"more than the model's max_position_embeddings=32"):
        pipe(["x", "A function returns"], max_new_tokens=30, num_steps=2)  # "x" fits (BOS x + 30), the other not
    with pytest.raises(TypeError, match="prompts must be strings, got int"):
        pipe([1, 2])
    with pytest.raises(ValueError, match="num_steps.*got 0"):  # defaults given when building the pipeline, too
        pipeline(model=str(saved[1]), trust_remote_code=True, num_steps=0)
    with pytest.raises(TypeError, match="seed"):
        pipeline(model=str(saved[1]), trust_remote_code=True, seed=1.5)


def test_checkpoint_without_tokenizer_raises(saved, tmp_path):
    variant, _, model = saved
    checkpoint = tmp_path / f"dlm-pipeline-test-{variant}-no-tokenizer"
    model.save_pretrained(checkpoint)
    with pytest.raises(ValueError, match=r"needs a tokenizer.*tokenizer.save_pretrained\(checkpoint_dir\)"):
        pipeline(model=str(checkpoint), trust_remote_code=True)


# ---------------------------------------------------------------------------------------------------------------------
# In memory, registration and pipe.save_pretrained
# ---------------------------------------------------------------------------------------------------------------------
def test_in_memory_pipeline_matches_the_checkpoint(saved, pipe, tokenizer, tmp_path):
    variant, _, model = saved
    expected = pipe(PROMPTS, seed=9, batch_size=2, **SAMPLE)
    direct = DLMTextGenerationPipeline(model=model, tokenizer=tokenizer)
    assert direct(PROMPTS, seed=9, batch_size=2, **SAMPLE) == expected
    register_pipeline()
    register_pipeline()  # idempotent
    by_name = pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer)
    assert type(by_name) is DLMTextGenerationPipeline
    assert by_name(PROMPTS, seed=9, batch_size=2, **SAMPLE) == expected
    # Pipeline.save_pretrained writes model, code and tokenizer: the folder works as a checkpoint again
    folder = tmp_path / f"dlm-pipeline-test-{variant}-resaved"
    by_name.save_pretrained(folder)
    assert (folder / "pipeline_dlm.py").exists() and (folder / "tokenizer.json").exists()
    reloaded = pipeline(model=str(folder), trust_remote_code=True)
    assert reloaded.task == PIPELINE_TASK and reloaded(PROMPTS, seed=9, batch_size=2, **SAMPLE) == expected


def test_pipeline_rejects_a_model_without_generate(tokenizer):
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=37))
    with pytest.raises(ValueError, match="needs a dlm diffusion model; BertModel has no `"):
        DLMTextGenerationPipeline(model=bert, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        DLMTextGenerationPipeline(model=make_model("duo", tokenizer))


# ---------------------------------------------------------------------------------------------------------------------
# Streamers
# ---------------------------------------------------------------------------------------------------------------------
def test_text_streamer_prints_the_final_text(saved, tokenizer, capsys):
    model = saved[2]
    ids = prompt_ids(tokenizer, PROMPTS[0])
    capsys.readouterr()
    out = model.generate(input_ids=ids, generator=seeded(2), streamer=TextStreamer(tokenizer), **SAMPLE)
    assert capsys.readouterr().out == tokenizer.decode(out[0]) + "\n"
    out = model.generate(input_ids=ids, generator=seeded(2), streamer=TextStreamer(tokenizer, skip_prompt=True),
                         **SAMPLE)
    assert capsys.readouterr().out == tokenizer.decode(out[0, ids.shape[1]:]) + "\n"
    # infilling: the whole canvas is printed once, at the end (no prompt, so nothing twice)
    canvas = torch.cat([ids, torch.full((1, 4), tokenizer.pad_token_id), ids], dim=1)
    holes = torch.zeros_like(canvas, dtype=torch.bool)
    holes[0, ids.shape[1]: ids.shape[1] + 4] = True
    out = model.generate(input_ids=canvas, infill_mask=holes, num_steps=3, generator=seeded(2),
                         streamer=TextStreamer(tokenizer))
    assert capsys.readouterr().out == tokenizer.decode(out[0]) + "\n"


def test_draft_streamer_collects_every_step(saved, tokenizer):
    model = saved[2]
    ids = prompt_ids(tokenizer, PROMPTS[0])
    stream = io.StringIO()
    streamer = DraftStreamer(tokenizer, stream=stream)
    out = model.generate(input_ids=ids, generator=seeded(6), streamer=streamer, return_dict_in_generate=True,
                         output_trajectory=True, max_new_tokens=8, num_steps=5)
    trajectory = out.trajectory[:, 0]  # (num_steps, L)
    assert len(streamer.draft_ids) == len(streamer.drafts) == 5
    assert all(torch.equal(got, want) for got, want in zip(streamer.draft_ids, trajectory))
    assert streamer.drafts == [tokenizer.decode(row) for row in trajectory]
    assert len(set(streamer.drafts)) > 1  # the drafts change while denoising
    assert torch.equal(streamer.prompt_ids, ids[0]) and torch.equal(streamer.new_ids, out.sequences[0, ids.shape[1]:])
    assert streamer.text == tokenizer.decode(out.sequences[0]) == streamer.drafts[-1]
    lines = stream.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 6  # one line per step, newlines inside drafts escaped
    assert lines[:5] == [f"[{k + 1}] " + draft.replace("\n", "\\n") for k, draft in enumerate(streamer.drafts)]
    # skip_prompt and decode kwargs; a second call starts over
    quiet = DraftStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(input_ids=ids, generator=seeded(6), streamer=quiet, return_dict_in_generate=True,
                         output_trajectory=True, max_new_tokens=8, num_steps=5)
    assert quiet.drafts == [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True)
                            for row in out.trajectory[:, 0]]
    model.generate(input_ids=ids, generator=seeded(6), streamer=quiet, max_new_tokens=4, num_steps=2)
    assert len(quiet.drafts) == 2 and len(quiet.new_ids) == 4
    assert quiet.text == tokenizer.decode(quiet.new_ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="batch size 1 only, got a batch of 2"):
        quiet.put_draft(torch.zeros(2, 3, dtype=torch.long))


def test_streamers_through_the_pipeline(pipe, tokenizer):
    streamer = DraftStreamer(tokenizer, skip_special_tokens=True)
    out = pipe(PROMPTS[0], seed=12, streamer=streamer, **SAMPLE)
    assert len(streamer.drafts) == SAMPLE["num_steps"]
    assert streamer.text == out[0]["generated_text"] == pipe(PROMPTS[0], seed=12, **SAMPLE)[0]["generated_text"]
    with pytest.raises(ValueError, match="batch size 1 only"):
        pipe(PROMPTS[0], num_return_sequences=2, streamer=DraftStreamer(tokenizer), **SAMPLE)


def test_text_diffusion_streamer_runs(saved, tokenizer, capsys):
    """transformers' TextDiffusionStreamer draws each draft in place (ANSI save/restore cursor) and ends with the
    final text. dlm sends it the whole canvas as the draft, prompt included."""
    model = saved[2]
    ids = prompt_ids(tokenizer, PROMPTS[0])
    capsys.readouterr()
    out = model.generate(input_ids=ids, generator=seeded(2), streamer=TextDiffusionStreamer(tokenizer), **SAMPLE)
    printed = capsys.readouterr().out
    drafts = re.findall("\0337(.*?)\0338\033\\[J", printed, flags=re.S)  # saved cursor, draft, restore + clear
    assert len(drafts) == SAMPLE["num_steps"]  # one draft per step, each erased by the next
    assert drafts[-1] == f"\033[33m{tokenizer.decode(out[0])}\033[0m"  # the last draft is the output
    assert re.sub("\0337.*?\0338\033\\[J", "", printed, flags=re.S) == tokenizer.decode(out[0]) + "\n"


def test_pipeline_runs_the_adaptive_samplers(saved, pipe, tokenizer):
    """Every variant's adaptive setting through the pipeline: its text equals `generate` with the same per-row seed
    (semi-AR blocks included), and a bad setting is named."""
    variant, _, model = saved
    adaptive = {"mdlm": {"sampler": "confidence", "confidence_threshold": 0.5},
                "duo": {"sampler": "entropy_bound", "allow_revision": True},
                "sddlm": {"sampler": "entropy_bound", "entropy_bound": 2.0},
                "replaid": {"stop_when_stable": True, "stability_steps": 2}}[variant]
    settings = dict(max_new_tokens=6, num_steps=6, block_size=3, stop_at_eos=False, **adaptive)
    out = pipe(PROMPTS[0], seed=5, **settings)
    ids = prompt_ids(tokenizer, PROMPTS[0])
    direct = model.generate(input_ids=ids, generator=rows(5, 1), **settings)
    new_text = tokenizer.decode(direct[0, ids.shape[1]:], skip_special_tokens=True)
    assert texts(out)[0] == PROMPTS[0] + new_text
    with pytest.raises(ValueError, match="block_size"):
        pipe(PROMPTS[0], block_size=0, max_new_tokens=2)
