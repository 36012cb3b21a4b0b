"""Adaptive decoding (issue 18): the confidence and entropy-bound samplers, semi-autoregressive blocks and RePlaid's
adaptive stop, each against its contract: threshold semantics, at least one token per step, the stopping rule,
revision on and off, blocks left to right, prompt intact, reproducibility, a padded row equals the row alone."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modeling_dlm import VARIANTS
from modeling_dlm.functional_dlm import softmax_stats
from modeling_dlm.generation_dlm import (
    DuoGenerationConfig,
    MDLMGenerationConfig,
    RePlaidGenerationConfig,
    _CommitState,
)

from .conftest import SEQ, VOCAB, gen, tiny_config, tiny_model


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

K = 17
ADAPTIVE = [("mdlm", "confidence"), ("mdlm", "entropy_bound"), ("duo", "entropy_bound"), ("sddlm", "entropy_bound")]


def forced_model(variant: str, token: int = K, **overrides):
    """A model whose x_hat is a point mass on `token` everywhere (entropy 0, top probability 1)."""
    model = VARIANTS[variant][1](tiny_config(variant, **overrides)).eval()
    with torch.no_grad():
        model.backbone.output_layer.linear.weight.zero_()
        model.backbone.output_layer.linear.bias.zero_()
        model.backbone.output_layer.linear.bias[token] = 1e4
    return model


def count_calls(model):
    widths = []
    handle = model.register_forward_hook(lambda module, args, kwargs, out: widths.append(
        (kwargs.get("input_ids", kwargs.get("noisy_embeds"))).shape[:2]), with_kwargs=True)
    return widths, handle


def crafted_logits(rows: list[list[list[float]]]) -> torch.Tensor:
    """(n, W, V) logits whose softmax is the given probabilities (log of them; zeros become -inf)."""
    return torch.tensor(rows, dtype=torch.float32).log()


def one_hot_row(vocab: int, token: int, p: float, exclude: int | None = None) -> list[float]:
    """A distribution with probability p on `token`, the rest spread evenly (over all but `exclude`, which gets 0:
    MDLM's mask token)."""
    rest = (1 - p) / (vocab - 1 - (exclude is not None))
    return [p if v == token else 0.0 if v == exclude else rest for v in range(vocab)]


# ---------------------------------------------------------------------------------------------------------------------
# The commit rules, on crafted x_hat
# ---------------------------------------------------------------------------------------------------------------------
def _commit(model, gen_config, logits, z, given, steps_left, state=None, generator=None):
    state = _CommitState(given) if state is None else state
    z_new, done = model._commit_step(model.noise_process, gen_config, logits, z, state, None, steps_left,
                                     generator or gen(0))
    return z_new, done, state


def test_confidence_commits_exactly_the_positions_over_the_threshold():
    model = tiny_model("mdlm")
    V, mask = VOCAB, model.config.mask_token_id
    tops = [0.95, 0.5, 0.92, 0.3, 0.899]
    logits = crafted_logits([[one_hot_row(V, 3 + i, p, exclude=mask) for i, p in enumerate(tops)]])
    z = torch.full((1, 5), mask)
    given = torch.zeros(1, 5, dtype=torch.bool)
    cfg = MDLMGenerationConfig(sampler="confidence", confidence_threshold=0.9, top_k=1)
    z_new, done, state = _commit(model, cfg, logits, z, given, steps_left=100)
    assert (z_new != mask).tolist() == [[True, False, True, False, False]]  # 0.899 < 0.9 stays masked
    assert z_new[0, 0] == 3 and z_new[0, 2] == 5 and not bool(done)
    # nothing over the threshold: exactly one position, the most confident open one
    cfg.confidence_threshold = 0.99
    z_new2, _, _ = _commit(model, cfg, logits, z_new, given, steps_left=100, state=state)
    assert (z_new2 != mask).sum() == 3 and z_new2[0, 4] == 7  # 0.899 was the best of the open positions
    # the last step of the budget commits everything left
    z_last, done, _ = _commit(model, cfg, logits, z_new2, given, steps_left=1, state=state)
    assert bool((z_last != mask).all()) and bool(done)


def test_confidence_floor_keeps_within_the_step_budget():
    """With 8 open positions and 2 steps left, at least ceil(8 / 2) = 4 are committed, the most confident."""
    model = tiny_model("mdlm")
    mask = model.config.mask_token_id
    tops = [0.10, 0.80, 0.20, 0.70, 0.30, 0.60, 0.40, 0.50]
    logits = crafted_logits([[one_hot_row(VOCAB, 1, p, exclude=mask) for p in tops]])
    cfg = MDLMGenerationConfig(sampler="confidence", confidence_threshold=0.99, top_k=1)
    z_new, _, _ = _commit(model, cfg, logits, torch.full((1, 8), mask), torch.zeros(1, 8, dtype=torch.bool), 2)
    assert (z_new != mask)[0].tolist() == [False, True, False, True, False, True, False, True]


def test_entropy_bound_commits_the_lowest_entropy_prefix_under_the_bound():
    model = tiny_model("duo")
    tops = [0.99, 0.6, 0.999, 0.9, 0.3]
    rows = [one_hot_row(VOCAB, 10 + i, p) for i, p in enumerate(tops)]
    logits = crafted_logits([rows])
    entropy, top = softmax_stats(logits)
    assert torch.allclose(top[0], torch.tensor(tops), atol=1e-6)
    brute = torch.tensor([-sum(p * math.log(p) for p in row if p > 0) for row in rows])
    assert torch.allclose(entropy[0], brute.float(), atol=1e-5)
    order = entropy[0].argsort().tolist()  # [2, 0, 3, 1, 4]
    cums = entropy[0][order].cumsum(0)
    bound = float(cums[2]) + 1e-4  # room for exactly the three lowest-entropy positions
    cfg = DuoGenerationConfig(sampler="entropy_bound", entropy_bound=bound, top_k=1)
    z = torch.zeros(1, 5, dtype=torch.long)
    z_new, done, state = _commit(model, cfg, logits, z, torch.zeros(1, 5, dtype=torch.bool), steps_left=100)
    committed = state.accepted(None)[0]
    assert committed.tolist() == [True, False, True, True, False]
    assert z_new[0, 0] == 10 and z_new[0, 2] == 12 and z_new[0, 3] == 13  # top_k=1: the argmax
    assert not bool(done)
    # a bound below the lowest entropy still commits one position, the lowest-entropy one
    cfg.entropy_bound = float(entropy[0].min()) / 2
    _, _, state = _commit(model, cfg, logits, z, torch.zeros(1, 5, dtype=torch.bool), steps_left=100)
    assert state.accepted(None)[0].tolist() == [False, False, True, False, False]


def test_uncommitted_positions_are_renoised_from_the_prior():
    """Uniform state: every step draws fresh uniform tokens at the open positions; MDLM: they stay masked."""
    model = tiny_model("duo")
    logits = crafted_logits([[one_hot_row(VOCAB, 5, 0.5)] * 12])
    cfg = DuoGenerationConfig(sampler="entropy_bound", entropy_bound=1e-3, top_k=1)
    z = torch.zeros(1, 12, dtype=torch.long)
    z_new, _, state = _commit(model, cfg, logits, z, torch.zeros(1, 12, dtype=torch.bool), steps_left=100)
    open_ = ~state.accepted(None)[0]
    assert int((~open_).sum()) == 1
    assert len(set(z_new[0, open_].tolist())) > 3  # fresh uniform draws, not the old zeros
    mdlm = tiny_model("mdlm")
    mask = mdlm.config.mask_token_id
    m_logits = logits.clone()
    m_logits[..., mask] = float("-inf")
    m_cfg = MDLMGenerationConfig(sampler="entropy_bound", entropy_bound=1e-3, top_k=1)
    m_new, _, m_state = _commit(mdlm, m_cfg, m_logits, torch.full((1, 12), mask),
                                torch.zeros(1, 12, dtype=torch.bool), steps_left=100)
    assert bool((m_new[0, ~m_state.accepted(None)[0]] == mask).all())


def test_revision_redraws_a_committed_token_only_when_allowed():
    """A committed position whose x_hat became confident about another token: revised with allow_revision=True,
    kept with False."""
    model = tiny_model("duo")
    logits = crafted_logits([[one_hot_row(VOCAB, 9, 0.999), one_hot_row(VOCAB, 4, 0.2)]])
    given = torch.zeros(1, 2, dtype=torch.bool)
    for revise in (False, True):
        cfg = DuoGenerationConfig(sampler="entropy_bound", entropy_bound=0.05, top_k=1, allow_revision=revise)
        state = _CommitState(given)
        state.update(None, torch.tensor([[True, False]]), torch.tensor([True]))  # position 0 committed to token 3
        z = torch.tensor([[3, 50]])
        z_new, _, _ = _commit(model, cfg, logits, z, given, steps_left=100, state=state)
        assert int(z_new[0, 0]) == (9 if revise else 3)


# ---------------------------------------------------------------------------------------------------------------------
# Through generate
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,sampler", ADAPTIVE)
def test_adaptive_sampler_prompt_intact_reproducible_and_bounded(variant, sampler, batch):
    model = tiny_model(variant)
    prompt = batch[:, :3]
    kwargs = dict(max_new_tokens=6, num_steps=4, sampler=sampler, return_dict_in_generate=True)
    a = model.generate(input_ids=prompt, generator=gen(3), **kwargs)
    b = model.generate(input_ids=prompt, generator=gen(3), **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.sequences[:, :3], prompt)
    assert 1 <= a.num_forward_passes <= 4  # num_steps bounds the calls
    assert a.num_forward_passes_per_sequence.shape == (3,)
    assert int(a.num_forward_passes_per_sequence.sum()) == a.num_forward_sequences
    if variant == "mdlm":
        assert not bool((a.sequences == model.config.mask_token_id).any())  # complete within the budget


@pytest.mark.parametrize("variant,sampler", ADAPTIVE)
def test_a_confident_model_finishes_in_one_call(variant, sampler):
    """x_hat a point mass everywhere: every position is under any threshold / bound, so one call commits all."""
    model = forced_model(variant)
    out = model.generate(batch_size=2, max_new_tokens=SEQ, num_steps=8, sampler=sampler,
                         return_dict_in_generate=True, generator=gen(0))
    assert bool((out.sequences == K).all())
    assert out.num_forward_passes == 1 and out.num_forward_passes_per_sequence.tolist() == [1, 1]


@pytest.mark.parametrize("stability_steps", [1, 3])
def test_revision_stops_after_stability_steps_unchanged(stability_steps):
    """With revision, a row ends when all is committed and nothing changed for `stability_steps` steps: one call
    commits everything, then `stability_steps` calls that change nothing."""
    model = forced_model("duo")
    out = model.generate(batch_size=2, max_new_tokens=SEQ, num_steps=20, sampler="entropy_bound",
                         allow_revision=True, stability_steps=stability_steps, return_dict_in_generate=True,
                         generator=gen(0))
    assert bool((out.sequences == K).all())
    assert out.num_forward_passes == 1 + stability_steps


def test_entropy_bound_at_least_one_token_per_step_on_a_high_entropy_model():
    """A model near uniform (entropy ~ log V >> bound): one position per step, so exactly L calls, each committing
    one more position (the trajectory shows the committed count rising by one)."""
    model = forced_model("mdlm")
    with torch.no_grad():
        model.backbone.output_layer.linear.bias.zero_()
    mask = model.config.mask_token_id
    out = model.generate(batch_size=1, max_new_tokens=6, num_steps=50, sampler="entropy_bound", entropy_bound=0.5,
                         return_dict_in_generate=True, output_trajectory=True, generator=gen(0))
    committed = [(draft != mask).sum().item() for draft in out.trajectory]
    assert committed == [1, 2, 3, 4, 5, 6] and out.num_forward_passes == 6


@pytest.mark.parametrize("variant,sampler", [("mdlm", "confidence"), ("duo", "entropy_bound"),
                                             ("mdlm", "ancestral"), ("sddlm", "greedy_tail"), ("replaid", "ddim")])
def test_blocks_decode_left_to_right_on_the_prefix(variant, sampler, batch):
    model = tiny_model(variant)
    prompt = batch[:1, :2]
    widths, handle = count_calls(model)
    out = model.generate(input_ids=prompt, max_new_tokens=9, num_steps=6, block_size=4, sampler=sampler,
                         generator=gen(1), return_dict_in_generate=True, output_trajectory=True, stop_at_eos=False)
    handle.remove()
    assert torch.equal(out.sequences[:, :2], prompt)
    seen = [w[1] for w in widths]  # the network sees the prompt and the blocks up to the current one
    assert seen == sorted(seen) and set(seen) <= {6, 10, 11} and seen[-1] == 11
    assert len(out.trajectory) == out.num_forward_passes <= 6
    if variant == "mdlm":
        mask = model.config.mask_token_id
        for draft in out.trajectory:  # a later block starts only once the earlier ones are complete
            masked = (draft[0, 2:] == mask).tolist()
            first_masked = masked.index(True) if True in masked else len(masked)
            block_end = (first_masked // 4 + 1) * 4
            assert all(masked[block_end:]), masked
    with pytest.raises(ValueError, match="`num_steps`=2 is fewer than the 3 blocks of `block_size`=4"):
        model.generate(input_ids=prompt, max_new_tokens=9, num_steps=2, block_size=4, sampler=sampler)


def test_blocks_stop_once_every_row_generated_eos():
    """stop_at_eos with blocks: a model that only emits EOS ends after the first block."""
    model = forced_model("mdlm", token=5, eos_token_id=5)
    out = model.generate(batch_size=2, max_new_tokens=12, num_steps=6, block_size=4, sampler="confidence",
                         return_dict_in_generate=True, eos_token_id=5, pad_token_id=6)
    assert out.num_forward_passes == 1
    assert out.sequences[:, 0].tolist() == [5, 5] and bool((out.sequences[:, 1:] == 6).all())


def test_replaid_stops_when_its_decode_is_stable():
    model = forced_model("replaid")
    out = model.generate(batch_size=2, max_new_tokens=SEQ, num_steps=30, stop_when_stable=True, stability_steps=3,
                         return_dict_in_generate=True, generator=gen(0))
    assert bool((out.sequences == K).all())
    assert out.num_forward_passes == 4  # the first decode, then 3 unchanged ones
    full = model.generate(batch_size=2, max_new_tokens=SEQ, num_steps=30, return_dict_in_generate=True,
                          generator=gen(0))
    assert full.num_forward_passes == 30


@pytest.mark.parametrize("variant,settings", [
    ("mdlm", {"sampler": "confidence"}),
    ("mdlm", {"sampler": "entropy_bound", "block_size": 3}),
    ("duo", {"sampler": "entropy_bound", "allow_revision": True}),
    ("sddlm", {"sampler": "entropy_bound", "block_size": 4}),
    ("replaid", {"stop_when_stable": True, "stability_steps": 2, "top_k": 1}),
])
def test_a_padded_row_equals_the_row_alone(variant, settings):
    """Left-padded prompts of different lengths, one generator per row (and sampling, not only argmax): each row
    equals the row generated alone, and takes the same number of network calls."""
    model = tiny_model(variant, max_position_embeddings=24)
    prompts = [[3, 4], [5, 6, 7, 8, 9], [10, 11, 12]]
    width = max(map(len, prompts))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    kwargs = dict(max_new_tokens=8, num_steps=8, return_dict_in_generate=True, **settings)
    batched = model.generate(input_ids=ids, attention_mask=mask, generator=[gen(20 + i) for i in range(3)], **kwargs)
    for i, p in enumerate(prompts):
        alone = model.generate(input_ids=torch.tensor([p]), generator=[gen(20 + i)], **kwargs)
        assert torch.equal(batched.sequences[i, width - len(p):], alone.sequences[0]), (variant, i)
        assert batched.num_forward_passes_per_sequence[i] == alone.num_forward_passes_per_sequence[0]


@pytest.mark.parametrize("variant,sampler", [("mdlm", "confidence"), ("duo", "entropy_bound")])
def test_streamer_sees_every_step_of_an_adaptive_sampler(variant, sampler, batch):
    from modeling_dlm import DraftStreamer

    class Tok:
        def decode(self, ids, **_):
            return " ".join(map(str, ids))

    model = tiny_model(variant)
    streamer = DraftStreamer(Tok())
    out = model.generate(input_ids=batch[:1, :2], max_new_tokens=5, num_steps=5, sampler=sampler, block_size=2,
                         streamer=streamer, generator=gen(0), return_dict_in_generate=True)
    assert len(streamer.drafts) == out.num_forward_passes
    assert streamer.draft_ids[-1].tolist() == out.sequences[0].tolist()
    assert streamer.text == Tok().decode(out.sequences[0].tolist())


# ---------------------------------------------------------------------------------------------------------------------
# Settings: validated, saved with the checkpoint
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,field,value,message", [
    (MDLMGenerationConfig, "confidence_threshold", 0.0, "a probability in"),
    (MDLMGenerationConfig, "confidence_threshold", 1.5, "a probability in"),
    (DuoGenerationConfig, "entropy_bound", -1.0, "a finite number of nats > 0"),
    (DuoGenerationConfig, "entropy_bound", float("inf"), "a finite number of nats > 0"),
    (DuoGenerationConfig, "allow_revision", "yes", "True or False"),
    (DuoGenerationConfig, "stability_steps", 0, "an integer >= 1"),
    (RePlaidGenerationConfig, "stop_when_stable", 1, "True or False"),
    (DuoGenerationConfig, "block_size", 0, "None \\(off\\) or an integer >= 1"),
    (DuoGenerationConfig, "sampler", "confidence", "one of"),
    (RePlaidGenerationConfig, "sampler", "entropy_bound", "one of"),
])
def test_bad_sampler_settings_are_named(cls, field, value, message):
    with pytest.raises(ValueError, match=f"`{field}` must be {message}.*{value!r}"[:60]):
        cls(**{field: value}).validate()


def test_settings_that_do_not_apply_are_rejected(batch):
    with pytest.raises(TypeError, match="allow_revision"):
        tiny_model("mdlm").generate(input_ids=batch[:, :2], max_new_tokens=2, allow_revision=True)
    with pytest.raises(TypeError, match="confidence_threshold"):
        tiny_model("duo").generate(input_ids=batch[:, :2], max_new_tokens=2, confidence_threshold=0.5)


def test_sampler_settings_are_saved_with_the_checkpoint(tmp_path):
    model = tiny_model("duo")
    model.generation_config.sampler = "entropy_bound"
    model.generation_config.entropy_bound = 0.25
    model.generation_config.allow_revision = True
    model.generation_config.block_size = 32
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["sampler"] == "entropy_bound" and saved["entropy_bound"] == 0.25 and saved["block_size"] == 32
    loaded = VARIANTS["duo"][1].from_pretrained(tmp_path)
    assert isinstance(loaded.generation_config, DuoGenerationConfig)
    assert (loaded.generation_config.sampler, loaded.generation_config.entropy_bound,
            loaded.generation_config.allow_revision, loaded.generation_config.block_size) == \
        ("entropy_bound", 0.25, True, 32)
