"""The README's "Adding a variant", followed once: a throw-away uniform-state variant ("toy": x0 cross-entropy on
every position plus `elbo_weight` x the uniform-state NELBO) is added to a copy of the packages by editing exactly
the places the README lists, then trained, evaluated and sampled through the real `dlm` CLI and the real Trainer,
and its checkpoint loads with its shipped code (trust_remote_code) in this process, which never imported the copy.

The test counts the places: the copy differs from the packages in exactly these files, and nothing else was needed
(cli, lora, hub, model_card, the trainers' package and the sampling loop read the registries)."""

from __future__ import annotations

import filecmp
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from .conftest import shared_data
from .test_readme import python_blocks


ROOT = Path(__file__).resolve().parents[1]

# 1.-3. the config class (end of modeling_dlm/configuration_dlm.py), the model class (end of modeling_dlm.py) and the
# trainer file (trainers/toy.py): the README's three code blocks, as written
CONFIG_CLASS, MODEL_CLASS, TRAINER_FILE = python_blocks("## Adding a variant")

# 4. the registry entries: one line in modeling_dlm.VARIANTS, one VariantSpec in trainers/variants.py
MODEL_REGISTRY = ('    "replaid": (RePlaidConfig, RePlaidForDiffusionLM),\n',
                  '    "replaid": (RePlaidConfig, RePlaidForDiffusionLM),\n'
                  '    "toy": (ToyConfig, ToyForDiffusionLM),\n')
MODEL_REGISTRY_IMPORT = ("from .modeling_dlm import (\n", "from .configuration_dlm import ToyConfig\n"
                         "from .modeling_dlm import ToyForDiffusionLM\nfrom .modeling_dlm import (\n")
TRAINER_REGISTRY = ('    "ar": VariantSpec(',
                    '    "toy": VariantSpec(trainer="toy:ToyTrainer", title="Toy (x0 cross-entropy, uniform-state)",\n'
                    '                       papers=(), lora_modules_to_save=("sigma_map",), hub_config_stem="toy"),\n'
                    '    "ar": VariantSpec(')

# 5. data files: a hub config per size and the model card's method section
METHOD_CARD = "Uniform-state diffusion trained with x0 cross-entropy plus {{ config.elbo_weight }} x the NELBO.\n"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{path}: the anchor {old!r} is not unique"
    path.write_text(text.replace(old, new), encoding="utf-8")


def _add_toy_variant(dst: Path) -> None:
    for src, name in (("modeling_dlm", "modeling_dlm"), ("trainers", "trainers"), ("hub_configs", "dlm_hub_configs"),
                      ("model_cards", "dlm_model_cards")):
        shutil.copytree(ROOT / src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    with open(dst / "modeling_dlm" / "configuration_dlm.py", "a", encoding="utf-8") as f:
        f.write("\n\n" + CONFIG_CLASS)
    with open(dst / "modeling_dlm" / "modeling_dlm.py", "a", encoding="utf-8") as f:
        f.write("\n\n" + MODEL_CLASS)
    (dst / "trainers" / "toy.py").write_text(TRAINER_FILE, encoding="utf-8")
    _edit(dst / "modeling_dlm" / "__init__.py", *MODEL_REGISTRY)
    _edit(dst / "modeling_dlm" / "__init__.py", *MODEL_REGISTRY_IMPORT)
    _edit(dst / "trainers" / "variants.py", *TRAINER_REGISTRY)
    for size in ("tiny", "small", "medium"):
        body = json.loads((ROOT / "hub_configs" / f"duo-{size}.json").read_text())
        body = {k: v for k, v in body.items() if k not in ("gamma_min", "gamma_max")} | {"model_type": "toy"}
        (dst / "dlm_hub_configs" / f"toy-{size}.json").write_text(json.dumps(body, indent=2))
    (dst / "dlm_model_cards" / "method_toy.md").write_text(METHOD_CARD, encoding="utf-8")


def _changed_files(dst: Path) -> set[str]:
    """Files of the copy that differ from the packages or are new (relative paths)."""
    changed = set()
    for name, src in (("modeling_dlm", "modeling_dlm"), ("trainers", "trainers"), ("dlm_hub_configs", "hub_configs"),
                      ("dlm_model_cards", "model_cards")):
        for path in sorted((dst / name).rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(dst / name)
            original = ROOT / src / rel
            if not original.exists() or not filecmp.cmp(path, original, shallow=False):
                changed.add(f"{src}/{rel.as_posix()}")
    return changed


@pytest.mark.slow
def test_a_new_uniform_state_variant_touches_five_places(tmp_path):
    pkg = tmp_path / "pkg"
    _add_toy_variant(pkg)
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    for entry in (MODEL_REGISTRY[1].splitlines()[-1], TRAINER_REGISTRY[1].rsplit("\n", 2)[0]):
        assert " ".join(entry.split()) in readme, f"the README's step 4 no longer shows {entry!r}"
    assert _changed_files(pkg) == {
        "modeling_dlm/configuration_dlm.py",  # 1. config class
        "modeling_dlm/modeling_dlm.py",  # 2. model class
        "trainers/toy.py",  # 3. trainer file
        "modeling_dlm/__init__.py", "trainers/variants.py",  # 4. the registry entry (one per side)
        "hub_configs/toy-tiny.json", "hub_configs/toy-small.json", "hub_configs/toy-medium.json",  # 5. data files
        "model_cards/method_toy.md",
    }

    text = shared_data("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:30_000]
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    gpt2 = str(shared_data("tokenizers", "gpt2"))
    out = tmp_path / "toy-run"
    common = ["--dataset", str(tmp_path / "corpus.txt"), "--seq_len", "32", "--max_eval_samples", "8"]
    # one process, the copy first on the path (it shadows the installed packages); each command's last line is JSON
    script = (
        "import json, sys\n"
        "from trainers.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    code = main(argv)\n"
        "    assert not code, (argv, code)\n"
        "from trainers.model_card import build_model_card\n"
        "build_model_card(sys.argv[2]).save(sys.argv[2] + '/README.md')\n"
    )
    commands = [
        ["train", "--variant", "toy", "--size", "tiny", "--tokenizer", gpt2, *common, "--max_steps", "3",
         "--per_device_train_batch_size", "4", "--output_dir", str(out), "--report_to", "none", "--use_cpu",
         "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1"],
        ["eval", str(out), *common],
        ["generate", str(out), "--num_samples", "2", "--num_steps", "4", "--max_new_tokens", "16", "--seed", "0"],
    ]
    env = {**os.environ, "PYTHONPATH": str(pkg), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(commands), str(out)], cwd=pkg, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    # the trained checkpoint ships the copy's code: it loads here (where "toy" is no registered model type)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "toy" and config["auto_map"]["AutoModel"] == "modeling_dlm.ToyForDiffusionLM"
    assert "ToyForDiffusionLM" in (out / "modeling_dlm.py").read_text()
    assert "method_toy" not in (out / "README.md").read_text() and "x0 cross-entropy plus 0.5" in (
        out / "README.md").read_text()
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "ToyForDiffusionLM" and type(model.noise_process).__name__ == "UniformStateProcess"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=g)
    nelbo = model.nelbo(ids, generator=g)
    assert nelbo.shape == (2,) and torch.isfinite(nelbo).all()
    sample = model.generate(batch_size=2, max_new_tokens=16, num_steps=4, generator=torch.Generator().manual_seed(1))
    assert sample.shape == (2, 16) and sample.max() < model.config.vocab_size

    # the objective ran: its components were logged, and eval reported the NELBO (not the training loss)
    assert '"ce"' in result.stdout or "'ce'" in result.stdout + result.stderr
    eval_report = [json.loads(line) for line in result.stdout.splitlines()
                   if line.startswith("{") and '"nelbo"' in line]
    assert eval_report and math.isfinite(eval_report[-1]["nelbo"])
