"""Writes `tests/data/pre_seam/<variant>/`: tiny checkpoints saved by the code *before* the noise-process seam (commit
39d77c3), with the logits, NELBO and samples that code computed on them (`expected.safetensors`). The remote-code
files are left out: `tests/test_compat.py` loads the weights with the current classes and checks the numbers.

Run once from a checkout of 39d77c3 (the fixture is committed):
    PYTHONPATH=<checkout of 39d77c3> python tests/data/make_pre_seam_checkpoints.py tests/data/pre_seam
"""

import os
import sys

import torch
from safetensors.torch import save_file

from tests.conftest import BATCH, SEQ, VARIANTS, VOCAB, gen, tiny_model


def main(out: str) -> None:
    x = torch.randint(0, VOCAB - 1, (BATCH, SEQ), generator=gen(1))  # never the MDLM mask id
    for variant in VARIANTS:
        folder = os.path.join(out, variant)
        model = tiny_model(variant)
        model.save_pretrained(folder)
        for name in os.listdir(folder):
            if name.endswith(".py"):
                os.remove(os.path.join(folder, name))
        time = {"t": torch.full((BATCH,), 0.3)} if variant == "replaid" else {"sigma": torch.full((BATCH,), 0.5)}
        with torch.no_grad():
            expected = {
                "input_ids": x,
                "logits": model(input_ids=x, **time).logits,
                "nelbo": model.nelbo(x, generator=gen(0), num_time_samples=2),
                "ancestral": model.generate(batch_size=2, max_new_tokens=SEQ, num_steps=4, generator=gen(2)),
                "prompted": model.generate(input_ids=x[:2, :3], max_new_tokens=4, num_steps=3, generator=gen(5)),
            }
        save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(folder, "expected.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
