"""Load a saved dlm checkpoint the way a Hub user does, with nothing but torch and transformers installed.

Run by `tests/test_remote_code.py` with the interpreter of a bare virtual environment, in isolated mode (`-I`), from
an empty working directory, with `HF_HUB_OFFLINE=1` and a fresh `HF_HOME`:

    python -I remote_load_script.py JOBS.json

JOBS.json maps a name (the variant) to {"checkpoint": dir, "inputs": .safetensors, "reference": .safetensors,
"spec": .json}. The script checks that the dlm package (and the training stack) cannot be imported, loads each
checkpoint through AutoConfig, AutoModel and AutoModelForMaskedLM with `trust_remote_code=True`, recomputes the
reference outputs with `compute_outputs` (the same function produced them), runs the checkpoint's own
`dlm-text-generation` pipeline (`pipeline(model=dir, trust_remote_code=True)`, task inferred) with `run_pipeline`, and
re-saves the remote-code model with its tokenizer to a temporary folder, which must work as a checkpoint again. It
prints one line `RESULT {json}` that the test asserts on; an exception while checking one checkpoint (or its pipeline)
is reported for that checkpoint (or pipeline) only.
This file imports only the standard library at module level, so the test process can import `compute_outputs` and
`run_pipeline` too.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import sys
import tempfile
import traceback


RESULT_PREFIX = "RESULT "
HIDDEN_MODULES = ("modeling_dlm", "trainers", "datasets")


def compute_outputs(model, inputs: dict, spec: dict) -> dict:
    """Reference outputs of `model`: its buffers (persistent or not), logits per forward case, a seeded nelbo and
    seeded generate ids."""
    import torch

    out = {f"buffer.{name}": buffer.detach().clone() for name, buffer in model.named_buffers()}
    with torch.no_grad():
        for case, names in spec["forward"].items():
            kwargs = {name: inputs[f"forward.{case}.{name}"] for name in names}
            out[f"forward.{case}.logits"] = model(**kwargs).logits.float().contiguous()
        generator = torch.Generator().manual_seed(spec["nelbo"]["seed"])
        out["nelbo"] = model.nelbo(
            inputs["nelbo.input_ids"],
            attention_mask=inputs["nelbo.attention_mask"],
            num_time_samples=spec["nelbo"]["num_time_samples"],
            generator=generator,
        ).contiguous()
    generator = torch.Generator().manual_seed(spec["generate"]["seed"])
    out["generate"] = model.generate(
        input_ids=inputs["generate.input_ids"], generator=generator, **spec["generate"]["kwargs"]
    ).contiguous()
    return out


def run_pipeline(pipe, spec: dict) -> list:
    """The generated texts of `pipe` on the spec's prompts, seeded (a list of lists of strings, one per prompt)."""
    outputs = pipe(spec["inputs"], seed=spec["seed"], **spec["kwargs"])
    return [[record["generated_text"] for record in records] for records in outputs]


def compare(outputs: dict, reference: dict) -> dict:
    """Per output: shape/dtype agreement, max abs difference (floats) or exact equality (integers)."""
    report = {}
    for key, ref in reference.items():
        got = outputs.get(key)
        entry = {"present": got is not None}
        if got is not None:
            entry["shape_ok"] = tuple(got.shape) == tuple(ref.shape)
            entry["dtype"] = str(got.dtype)
            entry["ref_dtype"] = str(ref.dtype)
            if entry["shape_ok"]:
                if ref.is_floating_point():
                    entry["max_abs_diff"] = float((got.double() - ref.double()).abs().max()) if ref.numel() else 0.0
                    entry["finite"] = bool(got.isfinite().all())
                else:
                    entry["equal"] = bool((got == ref).all()) and got.dtype == ref.dtype
        report[key] = entry
    return report


def _hidden_modules() -> dict:
    hidden = {}
    for name in HIDDEN_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            hidden[name] = err.name == name
        else:
            hidden[name] = False
    return hidden


def _module_file(obj) -> str:
    return os.path.realpath(getattr(sys.modules[type(obj).__module__], "__file__", "") or "")


def check_pipeline(checkpoint: str, spec: dict) -> dict:
    """Run the checkpoint's own pipeline (task inferred from config.json), then re-save its model (remote code, loaded
    by the pipeline through AutoModel) and tokenizer to a temporary folder and run the pipeline from there: the
    re-saved folder must ship pipeline_dlm.py again."""
    from transformers import pipeline

    pipe = pipeline(model=checkpoint, trust_remote_code=True)
    result = {"task": pipe.task, "class": type(pipe).__name__, "module": type(pipe).__module__,
              "file": _module_file(pipe), "model_class": type(pipe.model).__name__,
              "model_module": type(pipe.model).__module__, "texts": run_pipeline(pipe, spec)}
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "resaved-" + os.path.basename(checkpoint))
        pipe.model.save_pretrained(target)
        pipe.tokenizer.save_pretrained(target)
        with open(os.path.join(target, "config.json")) as f:
            custom_pipelines = json.load(f).get("custom_pipelines")
        resaved = pipeline(model=target, trust_remote_code=True)
        result["resaved"] = {"files": sorted(os.listdir(target)), "custom_pipelines": custom_pipelines,
                             "task": resaved.task, "texts": run_pipeline(resaved, spec)}
    return result


def check_checkpoint(job: dict) -> dict:
    """Load one checkpoint through AutoConfig, AutoModel and AutoModelForMaskedLM and compare with its reference."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    checkpoint = job["checkpoint"]
    with open(job["spec"]) as f:
        spec = json.load(f)
    inputs = load_file(job["inputs"])
    reference = load_file(job["reference"])
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    result = {"config": {"class": type(config).__name__, "module": type(config).__module__,
                         "file": _module_file(config), "model_type": config.model_type}, "models": {}}
    for auto in (AutoModel, AutoModelForMaskedLM):
        model, info = auto.from_pretrained(checkpoint, trust_remote_code=True, output_loading_info=True)
        gen = model.generation_config
        outputs = compute_outputs(model, inputs, spec)
        result["models"][auto.__name__] = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "file": _module_file(model),
            "config_class": type(model.config).__name__,
            "config_module": type(model.config).__module__,
            "training": model.training,
            "loading_info": {key: sorted(map(str, value)) for key, value in info.items() if value},
            "generation_config_class": type(gen).__name__,
            "generation_config_module": type(gen).__module__,
            "generation_config": {key: getattr(gen, key, None) for key in spec["generation_config"]},
            "outputs": compare(outputs, reference),
        }
    try:
        result["pipeline"] = check_pipeline(checkpoint, spec["pipeline"])
    except Exception:  # reported on its own, so that the model checks above still count
        result["pipeline"] = {"error": traceback.format_exc()}
    return result


def main(argv: list[str]) -> None:
    (jobs_path,) = argv
    with open(jobs_path) as f:
        jobs = json.load(f)  # {name: {"checkpoint", "inputs", "reference", "spec"}}
    result = {"hidden": _hidden_modules()}  # before torch/transformers: nothing may have put dlm on the path
    result["distributions"] = sorted({(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()})
    result["sys_path"] = sys.path
    result["flags_isolated"] = bool(sys.flags.isolated)

    import torch
    import transformers

    result["torch"] = torch.__version__
    result["transformers"] = transformers.__version__
    result["hf_home"] = os.path.realpath(os.environ.get("HF_HOME", ""))
    result["checkpoints"] = {}
    for name, job in jobs.items():
        try:
            result["checkpoints"][name] = check_checkpoint(job)
        except Exception:  # reported per checkpoint, so that one broken variant does not hide the others
            result["checkpoints"][name] = {"error": traceback.format_exc()}
    result["dlm_modules_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN_MODULES)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
