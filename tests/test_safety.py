"""Safe loading: no pickle anywhere in the package (issue 7).

An AST scan of every module in `modeling_dlm/`, `trainers/` and `metrics/`: no import of pickle-family modules, no
`torch.load` without `weights_only=True`, no `numpy.load(allow_pickle=True)`, and no `torch.save` (weights are written
with safetensors only). The scan is checked against planted violations so it cannot pass vacuously.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("modeling_dlm", "trainers", "metrics")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def pickle_violations(source: str, filename: str = "<src>") -> list[str]:
    """Every pickle-capable construct in `source`, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.endswith("torch.load"):
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{where}: {name}() without weights_only=True")
            elif name.endswith("torch.save"):
                found.append(f"{where}: torch.save() (use safetensors)")
            elif name.endswith(("np.load", "numpy.load")):
                allow = _keyword(node, "allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"{where}: {name}(allow_pickle=...)")
            elif name.split(".")[-1] in ("loads", "load", "Unpickler") and name.split(".")[0] in PICKLE_MODULES:
                found.append(f"{where}: {name}()")
    return found


def _package_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) >= 15, f"the scan found too few modules ({len(files)}): wrong repository layout?"
    return files


@pytest.mark.parametrize("planted", [
    "import pickle\n",
    "from dill import loads\n",
    "import torch\nstate = torch.load('x.pt')\n",
    "import torch\nstate = torch.load('x.pt', weights_only=False)\n",
    "import torch\ntorch.save({}, 'x.pt')\n",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)\n",
])
def test_the_scan_catches_planted_pickle_use(planted):
    assert pickle_violations(planted), f"the scan missed: {planted!r}"


def test_the_scan_accepts_safe_loading():
    assert pickle_violations("import torch\nstate = torch.load('x.ckpt', weights_only=True, map_location='cpu')\n"
                             "from safetensors.torch import load_file\n") == []


def test_no_pickle_in_the_package():
    violations = [v for path in _package_files()
                  for v in pickle_violations(path.read_text(), str(path.relative_to(REPO)))]
    assert not violations, "pickle-capable loading or saving in the package:\n" + "\n".join(violations)


def test_checkpoints_hold_safetensors_only(tmp_path):
    from tests.conftest import tiny_model

    for variant in ("sddlm", "duo", "mdlm", "replaid"):
        out = tmp_path / variant
        tiny_model(variant).save_pretrained(out)
        names = {p.name for p in out.iterdir()}
        assert "model.safetensors" in names, names
        pickled = {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}
        assert not pickled, f"{variant}: pickle files in a saved checkpoint: {pickled}"
