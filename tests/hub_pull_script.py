"""Load pushed dlm checkpoints from a Hub by repo id, the way a user does, with only torch and transformers installed.

Run by `tests/test_hub.py` with the bare virtual environment's interpreter in isolated mode, from an empty working
directory, with a cold `HF_HOME` and `HF_ENDPOINT` pointing at the Hub under test:

    python -I hub_pull_script.py JOBS.json [--wait SECONDS]

With `--wait`, the script imports torch and transformers first and then waits (up to SECONDS) for JOBS.json to
appear, so that the caller can start it before the checkpoints are pushed.

JOBS.json maps a variant to {"repo_id", "inputs": .safetensors, "expected": .safetensors, "text"}. For each, the
script loads the model and the tokenizer by repo id with `AutoModel`/`AutoTokenizer.from_pretrained(repo_id,
trust_remote_code=True)`, recomputes the logits, a seeded NELBO and seeded `generate` ids, tokenises `text`,
and prints one line `RESULT {json}` with the differences from the expected values; an error is reported per
variant. A job with a "pipeline" prompt also runs `pipeline(model=repo_id, trust_remote_code=True)` on it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback


RESULT_PREFIX = "RESULT "


def outputs(model, inputs: dict) -> dict:
    """Logits, a seeded NELBO and seeded generate ids of `model` on `inputs` (same code on both sides)."""
    import torch

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        if "t" in inputs:  # RePlaid is conditioned on t
            logits = model(input_ids=ids, t=inputs["t"]).logits
        else:
            logits = model(input_ids=ids, sigma=inputs["sigma"]).logits
        nelbo = model.nelbo(ids, attention_mask=mask, num_time_samples=2, generator=torch.Generator().manual_seed(5))
    generated = model.generate(input_ids=ids[:, :3].contiguous(), max_new_tokens=4, num_steps=3,
                               generator=torch.Generator().manual_seed(7))
    return {"logits": logits.float().contiguous(), "nelbo": nelbo.float().contiguous(),
            "generate": generated.contiguous()}


def _check(job: dict) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(job["repo_id"], trust_remote_code=True).eval()
    # without trust_remote_code, AutoTokenizer's config lookup would prompt for it (the config has an auto_map)
    tokenizer = AutoTokenizer.from_pretrained(job["repo_id"], trust_remote_code=True)
    got = outputs(model, load_file(job["inputs"]))
    expected = load_file(job["expected"])
    report = {"class": type(model).__name__, "module": type(model).__module__,
              "file": os.path.realpath(sys.modules[type(model).__module__].__file__),
              "token_ids": tokenizer(job["text"])["input_ids"], "diffs": {}}
    for key, value in expected.items():
        mine = got[key]
        if mine.shape != value.shape:
            report["diffs"][key] = f"shape {tuple(mine.shape)} != {tuple(value.shape)}"
        elif value.is_floating_point():
            report["diffs"][key] = float((mine.double() - value.double()).abs().max())
        else:
            report["diffs"][key] = 0.0 if bool((mine == value).all()) else "different"
    if job.get("pipeline"):  # the custom "dlm-text-generation" pipeline, found through config.custom_pipelines
        from transformers import pipeline

        pipe = pipeline(model=job["repo_id"], trust_remote_code=True)
        report["pipeline"] = {"task": pipe.task, "class": type(pipe).__name__,
                              "output": pipe(job["pipeline"], num_steps=2, max_new_tokens=3, seed=0)}
    return report


def main(jobs_path: str, wait: float = 0.0) -> None:
    if wait > 0:
        import time

        import transformers  # noqa: F401  (imported while the caller pushes)
        from transformers import AutoModel, AutoTokenizer, pipeline  # noqa: F401

        deadline = time.monotonic() + wait
        while not os.path.exists(jobs_path):
            if time.monotonic() > deadline:
                sys.exit(f"no jobs file {jobs_path} after {wait}s")
            time.sleep(0.05)
    with open(jobs_path) as handle:
        jobs = json.load(handle)
    hidden = {}
    for name in ("modeling_dlm", "trainers", "datasets"):
        try:
            importlib.import_module(name)
            hidden[name] = False
        except ModuleNotFoundError:
            hidden[name] = True
    result = {"hidden": hidden, "hf_home": os.path.realpath(os.environ.get("HF_HOME", "")),
              "endpoint": os.environ.get("HF_ENDPOINT"), "variants": {}}
    for variant, job in jobs.items():
        try:
            result["variants"][variant] = _check(job)
        except Exception:  # reported per variant; the test shows the traceback
            result["variants"][variant] = {"error": traceback.format_exc()}
    print("\n" + RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--wait" else 0.0)
