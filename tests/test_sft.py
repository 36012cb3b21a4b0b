"""Conditional (prompt -> response) diffusion for every variant: SFT data, clean prompts in every process, the
conditional bound, global token weighting, EOS stopping and padded-batch rows (issue 17).

Real components: the GPT-2 tokenizer from ../shared/data, HF `datasets`, the real Trainer, a real chat template."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from transformers import AutoTokenizer, default_data_collator

from modeling_dlm.generation_dlm import pad_after_eos
from trainers import TRAINERS, DiffusionTrainingArguments
from trainers.base import DiffusionTrainer, masked_mean
from trainers.data import (
    DIGIT_MAP,
    build_sft_datasets,
    digit_map_task,
    encode_sft_example,
    prepare_tokenizer,
    split_conversation,
    tokenize_sft_dataset,
)
from trainers.duo import DuoDistillationTrainer

from .conftest import gen, shared_data, tiny_model


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def gpt2():
    tokenizer = AutoTokenizer.from_pretrained(str(shared_data("tokenizers", "gpt2")))
    return prepare_tokenizer(tokenizer, need_pad=True, need_mask=True)


def rows_dataset(rows):
    return datasets.Dataset.from_list(rows)


# ---- data -----------------------------------------------------------------------------------------------------------
def test_prompt_response_rows_are_framed_masked_and_eos_filled(gpt2):
    rows = [{"prompt": "map: 1 2", "response": " 8 5"}]
    out, stats = tokenize_sft_dataset(rows_dataset(rows), gpt2, 12)
    row = out[0]
    prompt = [gpt2.bos_token_id, *gpt2("map: 1 2", add_special_tokens=False)["input_ids"]]
    response = gpt2(" 8 5", add_special_tokens=False)["input_ids"]
    eos = gpt2.eos_token_id
    assert row["input_ids"] == prompt + response + [eos] * (12 - len(prompt) - len(response))
    assert row["prompt_mask"] == [1] * len(prompt) + [0] * (12 - len(prompt))
    assert row["attention_mask"] == [1] * 12  # the EOS fill is real and trained (LLaDA's recipe)
    assert stats == {"rows": 1, "kept": 1, "no_room": 0, "too_long": 0, "response_tokens": 12 - len(prompt)}
    padded, _ = tokenize_sft_dataset(rows_dataset(rows), gpt2, 12, fill="pad")
    used = len(prompt) + len(response) + 1
    assert padded[0]["input_ids"][used:] == [gpt2.pad_token_id] * (12 - used)
    assert padded[0]["attention_mask"] == [1] * used + [0] * (12 - used)


def test_examples_that_do_not_fit_are_dropped_and_counted_never_truncated(gpt2, caplog):
    rows = [{"prompt": "map: 1 2", "response": " 8 5"},
            {"prompt": "one two three four five six seven eight nine ten", "response": " x"},  # no room
            {"prompt": "map: 1", "response": " 8 5 9 0 1 2 3 4 5 6 7 8"}]  # response too long
    with caplog.at_level("WARNING"):
        out, stats = tokenize_sft_dataset(rows_dataset(rows), gpt2, 10)
    assert (stats["kept"], stats["no_room"], stats["too_long"]) == (1, 1, 1)
    assert len(out) == 1 and "dropped 2 of 3 examples" in caplog.text
    assert encode_sft_example([1] * 9, [2], 10, eos=0, pad=0) == (None, 1)  # prompt + EOS fill the canvas
    with pytest.raises(ValueError, match="none of its 1 examples fits seq_len=4"):
        tokenize_sft_dataset(rows_dataset(rows[1:2]), gpt2, 4)


def test_messages_use_the_chat_template_and_the_last_assistant_turn_is_the_response(gpt2):
    tokenizer = AutoTokenizer.from_pretrained(str(shared_data("tokenizers", "gpt2")))
    prepare_tokenizer(tokenizer)
    tokenizer.chat_template = CHATML
    messages = [{"role": "system", "content": "Map digits."}, {"role": "user", "content": "1 2"},
                {"role": "assistant", "content": "8 5"}]
    prompt, response = split_conversation(messages, tokenizer)
    assert prompt == ("<|im_start|>system\nMap digits.<|im_end|>\n<|im_start|>user\n1 2<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert response == "8 5<|im_end|>\n"
    out, _ = tokenize_sft_dataset(rows_dataset([{"messages": messages}]), tokenizer, 64)
    ids, mask = out[0]["input_ids"], out[0]["prompt_mask"]
    n_prompt = sum(mask)
    assert tokenizer.decode(ids[1:n_prompt]) == prompt  # after BOS, the rendered prompt
    assert tokenizer.decode(ids[n_prompt:]).startswith(response)
    plain = split_conversation(messages, gpt2)  # no template: the documented plain turns
    assert plain == ("system: Map digits.\nuser: 1 2\nassistant: ", "8 5")
    with pytest.raises(ValueError, match="must be the assistant's, got role 'user'"):
        split_conversation(messages[:2], gpt2, row=7)
    with pytest.raises(ValueError, match="needs `prompt` and `response` columns or a `messages` column"):
        tokenize_sft_dataset(rows_dataset([{"text": "x"}]), gpt2, 16)


def test_build_sft_datasets_from_jsonl_carves_validation(gpt2, tmp_path):
    path = tmp_path / "task.jsonl"
    rows_dataset(digit_map_task(40, seed=3, min_digits=2, max_digits=3)).to_json(str(path))
    train, evaluation = build_sft_datasets(str(path), gpt2, 14)
    assert len(train) + len(evaluation) == 40 and len(evaluation) == 2
    assert set(train.column_names) == {"input_ids", "attention_mask", "prompt_mask"}
    row = digit_map_task(1, seed=0)[0]
    digits = row["prompt"].split()[1:]
    assert row["response"].split() == [str(DIGIT_MAP[int(d)]) for d in digits]


# ---- the prompt is never corrupted ----------------------------------------------------------------------------------
def prompt_batch(variant, seed=0):
    ids = torch.randint(0, 60, (3, 8), generator=gen(seed))
    prompt = torch.zeros(3, 8, dtype=torch.bool)
    prompt[0, :3], prompt[1, :5], prompt[2, :1] = True, True, True
    return ids, prompt


def test_processes_keep_the_prompt_at_t_equal_1(variant):
    model = tiny_model(variant)
    ids, prompt = prompt_batch(variant)
    ones = torch.ones(3)
    noised = model.noise_process.add_noise(ids, ones, generator=gen(1), fixed=prompt)
    if variant == "replaid":
        gamma, _ = model.noise_schedule(ones)
        clean = model.noise_process.scheduler.clean_latent(model.normalized_embeddings()[ids], gamma)
        assert torch.equal(noised.z_t[prompt], clean[prompt])
        assert not torch.allclose(noised.z_t[~prompt], clean[~prompt])
        # the network sees sqrt(d_e) e at the prompt, whatever t: the same clean input at every noise level
        alpha, sigma = (torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt())
        scale = torch.rsqrt(alpha**2 / 16 + sigma**2).float()[:, None, None]
        seen = (noised.z_t * scale)[prompt]
        assert torch.allclose(seen, 4.0 * model.normalized_embeddings()[ids][prompt], atol=1e-5)
    else:
        assert torch.equal(noised.z_t[prompt], ids[prompt])
        assert not noised.aux["replaced"][prompt].any()
        assert (noised.z_t[~prompt] != ids[~prompt]).float().mean() > 0.5  # t = 1: the rest is noise
    per_token = model.nelbo_per_token(ids, ones * 0.5, generator=gen(2), prompt_mask=prompt)
    assert torch.all(per_token[prompt] == 0) and (per_token[~prompt] != 0).any()


class Recorder:
    """Records every network call's keyword inputs (a forward pre-hook with kwargs)."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})


def trainer_for(variant, model, tmp_path, cls=None, **args):
    arguments = DiffusionTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **args)
    return (cls or TRAINERS[variant])(model=model, args=arguments)


@pytest.mark.parametrize("case", ["sddlm", "duo", "duo-curriculum", "duo-curriculum-top2", "duo-dcd", "mdlm",
                                  "replaid"])
def test_training_objectives_never_see_a_corrupted_prompt(case, tmp_path):
    variant = case.split("-")[0]
    model = tiny_model(variant).train()
    ids, prompt = prompt_batch(variant)
    extra = {}
    if "curriculum" in case:
        extra = {"curriculum_steps": 10, "curriculum_top_k": 2 if "top2" in case else 0}
    if case == "duo-dcd":
        extra = {"distill_num_steps": 64, "distill_round_steps": 10}
    trainer = trainer_for(variant, model, tmp_path, DuoDistillationTrainer if case == "duo-dcd" else None, **extra)
    recorder = Recorder(model)
    teacher_recorder = None
    if case == "duo-dcd":
        trainer.refresh_teacher(model, 0)
        teacher_recorder = Recorder(trainer.teacher)
    t = torch.ones(3)
    plan = trainer.batch_plan(3, ids.device, gen(0), 0) if variant == "replaid" else t
    loss, _ = trainer.diffusion_loss(model, model, ids, None, plan, gen(3), prompt_mask=prompt)
    assert torch.isfinite(loss)
    loss.backward()
    calls = recorder.calls + (teacher_recorder.calls if teacher_recorder else [])
    assert calls
    for call in calls:
        if "input_ids" in call:
            assert torch.equal(call["input_ids"][prompt], ids[prompt])
        elif "token_weights" in call:
            one_hot = torch.nn.functional.one_hot(ids, model.config.vocab_size).float()
            assert torch.equal(call["token_weights"][prompt], one_hot[prompt])
        elif "inputs_embeds" in call:  # top-k curriculum: the weighted embedding of x alone
            assert torch.allclose(call["inputs_embeds"][prompt], model.embed_tokens(ids)[prompt], atol=1e-6)
        else:
            rows = torch.arange(len(call["noisy_embeds"])) % 3  # RePlaid: one or two network rows per entry
            gamma = call["gamma"]
            clean = model.noise_process.scheduler.clean_latent(model.normalized_embeddings()[ids][rows], gamma)
            assert torch.allclose(call["noisy_embeds"][prompt[rows]], clean[prompt[rows]], atol=1e-6)


def test_sampling_never_changes_the_prompt(variant):
    model = tiny_model(variant)
    prompt = torch.randint(0, 60, (2, 5), generator=gen(4))
    out = model.generate(input_ids=prompt, max_new_tokens=6, num_steps=5, generator=gen(5),
                         return_dict_in_generate=True, output_trajectory=True, stop_at_eos=False)
    assert torch.equal(out.trajectory[:, :, :5], prompt.expand(5, 2, 5))


# ---- the conditional bound ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mdlm", "duo"])
def test_conditional_nelbo_bounds_the_true_conditional_entropy(variant, tmp_path):
    """Source: prompt = (BOS, a, b), a, b uniform over 4 ids; response = (f(a, b), u, EOS) with f deterministic and u
    uniform over 4 ids: -log p(response | prompt) = log 4 exactly. The trained conditional NELBO (nats per sequence)
    must stay at or above log 4 (up to Monte Carlo error) and fall far below its value before training."""
    vocab, bos, eos = 24, 20, 21
    g = gen(0)
    n = 512
    a, b, u = (torch.randint(0, 4, (n,), generator=g) for _ in range(3))
    f = 4 + (a * 4 + b) % 8  # ids 4..11, a deterministic function of the prompt
    ids = torch.stack([torch.full((n,), bos), a, b, f, 12 + u, torch.full((n,), eos)], dim=1)
    prompt = torch.zeros_like(ids)
    prompt[:, :3] = 1
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "prompt_mask": prompt.tolist()})
    model = tiny_model(variant, randomize=False, vocab_size=vocab, mask_token_id=vocab - 1, hidden_size=64,
                       bos_token_id=bos, eos_token_id=eos)
    held_out, held_prompt = ids[:128], prompt[:128]

    def bound():
        model.eval()
        with torch.no_grad():
            values = model.nelbo(held_out, prompt_mask=held_prompt, num_time_samples=8, generator=gen(9),
                                 reduction="sum")
        return values.mean().item(), values.std().item() / math.sqrt(len(values))

    before, _ = bound()
    args = DiffusionTrainingArguments(output_dir=str(tmp_path), max_steps=300, per_device_train_batch_size=64,
                                      learning_rate=3e-3, warmup_steps=10, report_to=[], use_cpu=True,
                                      save_strategy="no", logging_steps=1000, lr_scheduler_type="constant_with_warmup")
    TRAINERS[variant](model=model, args=args, train_dataset=data, data_collator=default_data_collator).train()
    after, stderr = bound()
    truth = math.log(4)
    assert after >= truth - 3 * stderr, (after, truth, stderr)
    assert before > 3 * truth and after < 0.5 * before, (before, after)
    mean = model.nelbo(held_out[:4], prompt_mask=held_prompt[:4], generator=gen(1))
    summed = model.nelbo(held_out[:4], prompt_mask=held_prompt[:4], generator=gen(1), reduction="sum")
    torch.testing.assert_close(summed, mean * 3)  # three response tokens per sequence


def test_nelbo_checks_its_prompt_mask(variant):
    model = tiny_model(variant)
    ids, prompt = prompt_batch(variant)
    with pytest.raises(ValueError, match="`prompt_mask` must have the shape of input_ids"):
        model.nelbo(ids, prompt_mask=prompt[:, :3])
    full = prompt.clone()
    full[1] = True
    with pytest.raises(ValueError, match="sequence 1 has no response tokens"):
        model.nelbo(ids, prompt_mask=full)
    with pytest.raises(ValueError, match="`reduction` must be 'mean' or 'sum'"):
        model.nelbo(ids, reduction="none")
    # the prompt is clean context: changing a response token changes the bound, the prompt's own term is absent
    value = model.nelbo(ids, prompt_mask=prompt, generator=gen(0), reduction="sum")
    unconditional = model.nelbo(ids, generator=gen(0), reduction="sum")
    assert torch.isfinite(value).all() and not torch.allclose(value, unconditional)


# ---- global token weighting -----------------------------------------------------------------------------------------
class CleanCrossEntropyTrainer(DiffusionTrainer):
    """A deterministic objective (the network's cross-entropy on the clean batch, over the loss tokens), so that
    gradient accumulation can be compared with one big batch exactly."""

    def diffusion_loss(self, model, unwrapped, input_ids, attention_mask, t, generator, prompt_mask=None):
        logits = model(input_ids=input_ids, sigma=torch.zeros(input_ids.shape[0])).logits
        ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), input_ids, reduction="none")
        return masked_mean(ce, ~prompt_mask), {}


def test_gradient_accumulation_weighs_every_response_token_equally(tmp_path):
    ids = torch.randint(0, 60, (4, 8), generator=gen(0))
    prompt = torch.zeros(4, 8, dtype=torch.long)
    prompt[0, :7], prompt[1, :6], prompt[2, :1], prompt[3, :2] = 1, 1, 1, 1  # 1 + 2 vs 7 + 6 response tokens
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "prompt_mask": prompt.tolist()})
    weights = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = tiny_model("duo").train()
        args = DiffusionTrainingArguments(output_dir=str(tmp_path / str(batch)), max_steps=1, optim="sgd",
                                          learning_rate=1.0, per_device_train_batch_size=batch,
                                          gradient_accumulation_steps=accumulation, report_to=[], use_cpu=True,
                                          save_strategy="no", dataloader_drop_last=False, max_grad_norm=0.0,
                                          train_sampling_strategy="sequential")
        CleanCrossEntropyTrainer(model=model, args=args, train_dataset=data,
                                 data_collator=default_data_collator).train()
        weights.append(model.backbone.output_layer.linear.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


# ---- generation -----------------------------------------------------------------------------------------------------
def test_unconditional_samples_are_not_cut_at_a_leading_bos_that_is_also_eos():
    """GPT-2-style tokenizers use one token as BOS and EOS, and a wrap-trained model opens a sample with it: that is
    the document's start, so without a prompt the run of leading EOS tokens does not stop the sample (the quickstart
    once printed empty samples); the first EOS after them still does. With a prompt, an immediate EOS still ends."""
    ids = torch.tensor([[5, 5, 1, 2, 5, 3, 4], [5, 1, 5, 2, 2, 2, 2], [1, 2, 3, 5, 4, 4, 4]])
    assert pad_after_eos(ids, 0, 5, 6, skip_leading=True).tolist() == [
        [5, 5, 1, 2, 5, 6, 6], [5, 1, 5, 6, 6, 6, 6], [1, 2, 3, 5, 6, 6, 6]]
    assert pad_after_eos(ids, 0, 5, 6).tolist()[0] == [5, 6, 6, 6, 6, 6, 6]
    model = tiny_model("duo", eos_token_id=5, pad_token_id=6, bos_token_id=5)
    config = model.generation_config
    config.eos_token_id, config.pad_token_id, config.bos_token_id = 5, 6, 5
    with torch.no_grad():  # EOS likely everywhere, so that rows open with one
        model.backbone.output_layer.linear.bias[5] += 6.0
    raw = model.generate(batch_size=6, max_new_tokens=12, num_steps=4, generator=gen(1), stop_at_eos=False)
    out = model.generate(batch_size=6, max_new_tokens=12, num_steps=4, generator=gen(1))
    assert torch.equal(out, pad_after_eos(raw, 0, 5, 6, skip_leading=True))
    assert bool((raw[:, 0] == 5).any()) and not torch.equal(out, pad_after_eos(raw, 0, 5, 6))  # not cut there
    # semi-AR blocks stop early only when every row has ended, by the same rule
    raw = model.generate(batch_size=6, max_new_tokens=12, num_steps=6, block_size=4, generator=gen(2),
                         stop_at_eos=False)
    out = model.generate(batch_size=6, max_new_tokens=12, num_steps=6, block_size=4, generator=gen(2))
    assert torch.equal(out, pad_after_eos(raw, 0, 5, 6, skip_leading=True))
    prompt = torch.tensor([[5, 1, 2]] * 6)
    raw = model.generate(input_ids=prompt, max_new_tokens=12, num_steps=4, generator=gen(1), stop_at_eos=False)
    out = model.generate(input_ids=prompt, max_new_tokens=12, num_steps=4, generator=gen(1))
    assert torch.equal(out, pad_after_eos(raw, 3, 5, 6))


def test_stop_at_eos_pads_after_the_first_generated_eos():
    model = tiny_model("duo", eos_token_id=5, pad_token_id=6)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 5, 6
    with torch.no_grad():  # make EOS likely, so that every row has one
        model.backbone.output_layer.linear.bias[5] += 3.0
    prompt = torch.tensor([[5, 1, 2], [3, 4, 5]])  # an EOS in the prompt does not stop anything
    raw = model.generate(input_ids=prompt, max_new_tokens=10, num_steps=4, generator=gen(0), stop_at_eos=False)
    out = model.generate(input_ids=prompt, max_new_tokens=10, num_steps=4, generator=gen(0))  # default: on
    assert torch.equal(out, pad_after_eos(raw, 3, 5, 6)) and not torch.equal(out, raw)
    for new in out[:, 3:]:
        first = (new == 5).nonzero()[0].item()
        assert torch.all(new[first + 1:] == 6)
    assert torch.equal(out[:, :3], prompt)
    with pytest.raises(ValueError, match="`stop_at_eos` must be True, False or None"):
        model.generate(input_ids=prompt, max_new_tokens=2, stop_at_eos="yes")


@pytest.mark.parametrize("variant,settings", [
    ("duo", {"sampler": "greedy_tail"}),
    ("sddlm", {"sampler": "ancestral"}),
    ("mdlm", {"sampler": "greedy_tail", "cache_predictions": True}),
    ("replaid", {"sampler": "ddim"}),
])
def test_a_left_padded_row_equals_the_row_alone_with_its_generator(variant, settings, gpt2):
    """Prompts of different lengths, left-padded as the pipeline pads them; one generator per row. Each row of the
    batch equals that row generated alone with the same seed, token for token."""
    model = tiny_model(variant, vocab_size=len(gpt2), mask_token_id=gpt2.mask_token_id, max_position_embeddings=32)
    prompts = [[gpt2.bos_token_id, *gpt2(text, add_special_tokens=False)["input_ids"]]
               for text in ("map: 1", "map: 3 1 4 1 5", "a b c")]
    width = max(map(len, prompts))
    ids = torch.full((3, width), gpt2.pad_token_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_steps=6,
                             generator=[gen(10 + i) for i in range(3)], **settings)
    for i, p in enumerate(prompts):
        alone = model.generate(input_ids=torch.tensor([p]), max_new_tokens=8, num_steps=6, generator=[gen(10 + i)],
                               **settings)
        assert torch.equal(batched[i, width - len(p):], alone[0]), (variant, i)
    with pytest.raises(ValueError, match="one torch.Generator per row: 3 rows"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, generator=[gen(0)])
