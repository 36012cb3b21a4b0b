"""Checkpoints saved before the noise-process seam (commit 39d77c3; `tests/data/pre_seam`, written by
`tests/data/make_pre_seam_checkpoints.py` with that commit's code) load into the current classes with the same
state-dict keys and give the numbers that code gave: identical logits, the same NELBO draw for draw, and the same
samples from a seeded generator (unconditional and prompted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_dlm import VARIANTS

from .conftest import BATCH, gen


FIXTURES = Path(__file__).parent / "data" / "pre_seam"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pre_seam_checkpoint_gives_the_same_numbers(variant):
    folder = FIXTURES / variant
    assert (folder / "model.safetensors").is_file(), f"missing fixture {folder}"
    expected = load_file(str(folder / "expected.safetensors"))
    model = VARIANTS[variant][1].from_pretrained(folder).eval()
    x = expected["input_ids"]
    time = {"t": torch.full((BATCH,), 0.3)} if variant == "replaid" else {"sigma": torch.full((BATCH,), 0.5)}
    with torch.no_grad():
        logits = model(input_ids=x, **time).logits
        nelbo = model.nelbo(x, generator=gen(0), num_time_samples=2)
        ancestral = model.generate(batch_size=2, max_new_tokens=x.shape[1], num_steps=4, generator=gen(2))
        prompted = model.generate(input_ids=x[:2, :3], max_new_tokens=4, num_steps=3, generator=gen(5))
    # float sums may round differently with another thread count than the fixture's: equal up to float32 rounding
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nelbo, expected["nelbo"], rtol=1e-5, atol=1e-6)
    assert torch.equal(ancestral, expected["ancestral"])
    assert torch.equal(prompted, expected["prompted"])
