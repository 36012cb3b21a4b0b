"""A saved dlm checkpoint is self-contained: it loads with `trust_remote_code=True` where only torch and transformers
are installed, and the shipped files (`modeling_dlm/*.py` except `__init__.py`) obey the rules that make this work
(architecture.md §4, hf-ecosystem.md §1.8-1.9).

- `bare_python` builds (once, then reuses) a virtual environment holding only torch and transformers, at the versions
  installed here: `$DLM_BARE_VENV`, else `<repo>/.cache/bare-venv`.
- Per variant, a checkpoint (with a character-level tokenizer) and reference outputs are saved here and
  `tests/remote_load_script.py` reloads them there, runs the checkpoint's `dlm-text-generation` pipeline and re-saves
  the remote-code model.
- Static checks scan the shipped sources with `ast` and with transformers' own load-time import check.
- Importing the shipped files (as transformers does, without the package `__init__`) only defines things.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from transformers.dynamic_module_utils import get_imports, get_relative_imports

from modeling_dlm import PIPELINE_TASK, VARIANTS, DLMTextGenerationPipeline
from tests.conftest import BATCH, SEQ, VOCAB, tiny_model
from tests.remote_load_script import RESULT_PREFIX, compute_outputs, run_pipeline


REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "modeling_dlm"
REMOTE_SCRIPT = Path(__file__).resolve().with_name("remote_load_script.py")
SOURCES = sorted(PACKAGE_DIR.glob("*.py"))
SHIPPED = [p for p in SOURCES if p.name != "__init__.py"]  # the package __init__ registers Auto classes; not shipped

TORCH_VERSION = torch.__version__.split("+")[0]  # the local wheel dir holds the +cpu build of this version
TRANSFORMERS_VERSION = transformers.__version__
PIP_TIMEOUT_S = 600
LOAD_TIMEOUT_S = 300
LOGITS_ATOL = 1e-5

ALLOWED_TOP_LEVEL = {"torch", "transformers"}
STDLIB = set(sys.stdlib_module_names)
PIPELINE_ENTRY = {PIPELINE_TASK: {"impl": "pipeline_dlm.DLMTextGenerationPipeline", "pt": ["AutoModel"],
                                  "type": "text"}}
# Prompts of different lengths and an empty one, batched in twos: left padding and unconditional rows in one run.
PIPELINE_SPEC = {"inputs": ["Hello", "ab", ""], "seed": 13, "kwargs": {"max_new_tokens": 5, "batch_size": 2}}
GENERATION_CONFIG_CLASS = {
    "sddlm": "SDDLMGenerationConfig",
    "duo": "DuoGenerationConfig",
    "mdlm": "MDLMGenerationConfig",
    "replaid": "RePlaidGenerationConfig",
}
# Saved generation settings that differ from the defaults, so the remote generate() proves it read them.
GENERATION_OVERRIDES = {
    "sddlm": {"num_steps": 5},
    "duo": {"num_steps": 4, "sampler": "greedy_tail"},
    "mdlm": {"num_steps": 6, "sampler": "greedy_tail"},
    "replaid": {"num_steps": 5, "score_temperature": 0.9},
}


def _tail(text: str, n: int = 6000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Python/HF path settings (PYTHONPATH, HF_HOME, caches, ...)."""
    drop = ("PYTHON", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


# ---------------------------------------------------------------------------------------------------------------------
# The bare environment
# ---------------------------------------------------------------------------------------------------------------------
def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _wanted_marker() -> dict:
    return {"torch": TORCH_VERSION, "transformers": TRANSFORMERS_VERSION, "python": sys.version,
            "base_prefix": sys.base_prefix}


def _read_marker(venv: Path) -> dict | None:
    try:
        return json.loads((venv / "dlm-bare-venv.json").read_text())
    except (OSError, ValueError):
        return None


def _run_or_fail(cmd: list[str], what: str, timeout: float = PIP_TIMEOUT_S, **kwargs) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"{what} timed out after {timeout}s: {' '.join(cmd)}\n{_tail(out)}")
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{_tail(proc.stdout + proc.stderr)}")
    return proc


def _build_bare_venv(venv: Path) -> float:
    """Create `venv` from scratch with torch==TORCH_VERSION, then transformers==TRANSFORMERS_VERSION; seconds taken."""
    start = time.monotonic()
    if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
        pytest.fail(f"{venv} exists, is not empty and is not a virtual environment; refusing to clear it "
                    f"(point DLM_BARE_VENV elsewhere)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    env = _clean_env()
    _run_or_fail([sys.executable, "-m", "venv", "--clear", str(venv)], "creating the bare venv", env=env)
    python = str(_venv_python(venv))
    pip = [python, "-m", "pip", "install", "--no-input", "--disable-pip-version-check"]
    # torch first and pinned: pip's config points at a local wheel dir with the CPU build; an unpinned torch could
    # pull a multi-GB CUDA build.
    _run_or_fail([*pip, f"torch=={TORCH_VERSION}"], "pip install torch", env=env)
    _run_or_fail([*pip, f"transformers=={TRANSFORMERS_VERSION}"], "pip install transformers", env=env)
    probe = _run_or_fail([python, "-I", "-c", "import torch, transformers; print(torch.__version__); "
                          "print(transformers.__version__)"], "importing torch/transformers in the bare venv", env=env)
    got_torch, got_transformers = probe.stdout.split()[-2:]
    if got_torch.split("+")[0] != TORCH_VERSION or got_transformers != TRANSFORMERS_VERSION:
        pytest.fail(f"bare venv got torch {got_torch} / transformers {got_transformers}, wanted "
                    f"{TORCH_VERSION} / {TRANSFORMERS_VERSION}")
    seconds = time.monotonic() - start
    marker = {**_wanted_marker(), "built_seconds": round(seconds, 1), "built_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    (venv / "dlm-bare-venv.json").write_text(json.dumps(marker, indent=1))
    return seconds


@pytest.fixture(scope="session")
def bare_python() -> Path:
    """Interpreter of a venv with only torch and transformers (same versions as here); built once, then reused."""
    venv = Path(os.environ.get("DLM_BARE_VENV") or REPO / ".cache" / "bare-venv").resolve()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        if os.name == "posix":  # concurrent pytest processes (xdist workers, parallel CI jobs) build it once
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        marker = _read_marker(venv)
        wanted = _wanted_marker()
        if not (marker and all(marker.get(k) == v for k, v in wanted.items()) and _venv_python(venv).exists()):
            seconds = _build_bare_venv(venv)
            print(f"\n[bare venv] built {venv} in {seconds:.1f}s", file=sys.stderr)
    return _venv_python(venv)


_DISTRIBUTIONS_PROBE = textwrap.dedent(
    """
    import importlib.metadata as md, json, sys
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    dists = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}
    needed, todo = set(), ["torch", "transformers"]
    while todo:  # the closure of torch's and transformers' required (not optional) dependencies
        name = canonicalize_name(todo.pop())
        if name in needed or name not in dists:
            continue
        needed.add(name)
        for spec in dists[name].requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    print(json.dumps({"installed": sorted(dists), "needed": sorted(needed),
                      "versions": {n: dists[n].version for n in ("torch", "transformers") if n in dists},
                      "prefix": sys.prefix, "base_prefix": sys.base_prefix}))
    """
)


@pytest.mark.slow
def test_bare_venv_holds_only_torch_and_transformers(bare_python, record_property):
    proc = _run_or_fail([str(bare_python), "-I", "-c", _DISTRIBUTIONS_PROBE], "listing the bare venv",
                        timeout=120, env=_clean_env(), cwd=str(bare_python.parent))
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    record_property("bare_venv_built_seconds", (_read_marker(bare_python.parents[1]) or {}).get("built_seconds"))
    assert info["versions"]["torch"].split("+")[0] == TORCH_VERSION
    assert info["versions"]["transformers"] == TRANSFORMERS_VERSION
    assert info["prefix"] != info["base_prefix"], "not a virtual environment"
    cfg = (bare_python.parents[1] / "pyvenv.cfg").read_text().replace(" ", "").lower()
    assert "include-system-site-packages=false" in cfg, "the bare venv must not see the system site-packages"
    extra = set(info["installed"]) - set(info["needed"]) - {"pip", "setuptools", "wheel"}
    assert not extra, f"the bare venv holds packages beyond torch + transformers and their dependencies: {extra}"
    for name in ("dlm", "datasets", "accelerate", "peft", "evaluate"):
        assert name not in info["installed"]


# ---------------------------------------------------------------------------------------------------------------------
# Save here, load there
# ---------------------------------------------------------------------------------------------------------------------
def _reference_inputs(variant: str, model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB - 1, (BATCH, SEQ), generator=g)  # never the MDLM mask id (VOCAB - 1)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, -2:] = 0
    inputs = {"nelbo.input_ids": ids, "nelbo.attention_mask": mask, "generate.input_ids": ids[:, :2].contiguous()}
    if variant == "replaid":
        d_e = model.config.embedding_dim
        t = torch.tensor([0.1, 0.5, 0.9])
        inputs.update({
            "forward.ids.input_ids": ids, "forward.ids.t": t,
            "forward.noisy.noisy_embeds": torch.randn(BATCH, SEQ, d_e, generator=g), "forward.noisy.t": t,
            "forward.noisy.self_cond": torch.randn(BATCH, SEQ, d_e, generator=g) / d_e**0.5,
            "forward.noisy.attention_mask": mask,
        })
    else:
        sigma = torch.tensor([0.3, 1.1, 2.5])
        inputs.update({
            "forward.ids.input_ids": ids, "forward.ids.sigma": sigma,
            "forward.padded.input_ids": ids, "forward.padded.sigma": sigma, "forward.padded.attention_mask": mask,
            "forward.soft.token_weights": torch.rand(BATCH, SEQ, VOCAB, generator=g).softmax(-1),
            "forward.soft.sigma": sigma,
        })
    return inputs


def _char_tokenizer():
    """A real (tokenizers-backed) character-level tokenizer with exactly VOCAB = 61 ids: <|endoftext|> (bos, eos,
    unk) = 0, [PAD] = 1, 58 characters, [MASK] = 60 (MDLM's default mask id, vocab_size - 1)."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = " " + string.ascii_lowercase + string.ascii_uppercase + ".,!?'"
    vocab = {"<|endoftext|>": 0, "[PAD]": 1, **{c: i + 2 for i, c in enumerate(chars)}, "[MASK]": VOCAB - 1}
    assert len(vocab) == VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))  # no merges: one id a char
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="[PAD]", mask_token="[MASK]")


def _spec(variant: str, inputs: dict) -> dict:
    forward: dict[str, list[str]] = {}
    for key in inputs:
        if key.startswith("forward."):
            _, case, name = key.split(".")
            forward.setdefault(case, []).append(name)
    return {
        "forward": forward,
        "nelbo": {"seed": 5, "num_time_samples": 2},
        "generate": {"seed": 7, "kwargs": {"max_new_tokens": 4}},  # num_steps/sampler come from generation_config
        "generation_config": sorted(GENERATION_OVERRIDES[variant]),
        "pipeline": PIPELINE_SPEC,
    }


def _save_checkpoint(variant: str, root: Path, name: str) -> tuple[Path, Path, Path, Path, dict, list]:
    """A randomized tiny model saved with a tokenizer under root/name, plus its inputs, reference outputs and spec
    beside it, and the reference texts of its pipeline."""
    model = tiny_model(variant, seed=3)
    for key, value in GENERATION_OVERRIDES[variant].items():
        setattr(model.generation_config, key, value)
    checkpoint = root / name
    tokenizer = _char_tokenizer()
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    inputs = _reference_inputs(variant, model)
    spec = _spec(variant, inputs)
    reference = compute_outputs(model, inputs, spec)
    texts = run_pipeline(DLMTextGenerationPipeline(model=model, tokenizer=tokenizer), spec["pipeline"])
    paths = root / "inputs.safetensors", root / "reference.safetensors", root / "spec.json"
    save_file({k: v.clone().contiguous() for k, v in inputs.items()}, paths[0])  # no shared storage
    save_file(reference, paths[1])
    paths[2].write_text(json.dumps(spec))
    return checkpoint, *paths, reference, texts


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_checkpoint_ships_exactly_the_model_files(variant, tmp_path):
    model = tiny_model(variant)
    model.save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert "__init__.py" not in saved  # the registering __init__ must never reach the Hub
    assert {n for n in saved if n.endswith(".py")} == {p.name for p in SHIPPED}
    assert "pipeline_dlm.py" in saved  # the dlm-text-generation pipeline ships with every checkpoint
    for path in SHIPPED:
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), f"{path.name} was altered on save"
    assert {"config.json", "generation_config.json", "model.safetensors"} <= saved
    assert not [n for n in saved if n.endswith((".bin", ".pt", ".pkl", ".pth"))]
    config = json.loads((tmp_path / "config.json").read_text())
    config_class, model_class = VARIANTS[variant]
    assert config["model_type"] == variant
    assert config["architectures"] == [model_class.__name__]
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_dlm.{config_class.__name__}",
        "AutoModel": f"modeling_dlm.{model_class.__name__}",
        "AutoModelForMaskedLM": f"modeling_dlm.{model_class.__name__}",
    }
    assert config["custom_pipelines"] == PIPELINE_ENTRY  # lets pipeline(model=dir) infer the task
    for entry in [*config["auto_map"].values(), PIPELINE_ENTRY[PIPELINE_TASK]["impl"]]:
        assert (tmp_path / f"{entry.split('.')[0]}.py").exists()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reload_restores_every_parameter_and_buffer(variant, tmp_path):
    """`from_pretrained` builds the model on the meta device, then fills missing keys and non-persistent buffers with
    `torch.empty_like` and relies on `_init_weights` to set them: every tensor must come back equal, or the reloaded
    model (here, and on the Hub) computes something else than the saved one."""
    model = tiny_model(variant, seed=3)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    persistent = set(model.state_dict())
    reloaded = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    bad = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in reloaded or not torch.equal(reloaded[name], tensor):
            kind = "parameter/buffer" if name in persistent else "non-persistent buffer (not in the checkpoint)"
            bad.append(f"{name} [{kind}]")
    assert not bad, f"{variant}: differs after save_pretrained + from_pretrained: {bad}"


@pytest.fixture(scope="module")
def remote_load(bare_python, tmp_path_factory) -> dict:
    """Save one checkpoint (with inputs and reference outputs) per variant here, then check all of them in ONE run of
    `remote_load_script.py` with the bare interpreter: isolated mode, empty cwd, no PYTHONPATH, offline, cold HF_HOME.
    """
    root = tmp_path_factory.mktemp("remote_load")
    workdir, hf_home = root / "cwd", root / "hf_home"
    workdir.mkdir()
    hf_home.mkdir()
    jobs, references, texts = {}, {}, {}
    for variant in VARIANTS:  # distinct folder names: each gets its own transformers_modules package
        checkpoint, inputs_path, reference_path, spec_path, reference, texts[variant] = _save_checkpoint(
            variant, root / variant, f"dlm-{variant}-tiny")
        jobs[variant] = {"checkpoint": str(checkpoint), "inputs": str(inputs_path),
                         "reference": str(reference_path), "spec": str(spec_path)}
        references[variant] = reference
    jobs_path = root / "jobs.json"
    jobs_path.write_text(json.dumps(jobs))
    cmd = [str(bare_python), "-I", "-B", str(REMOTE_SCRIPT), str(jobs_path)]
    start = time.monotonic()
    proc = _run_or_fail(cmd, "loading the checkpoints in the bare venv", timeout=LOAD_TIMEOUT_S, cwd=str(workdir),
                        env=_clean_env(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home)))
    seconds = time.monotonic() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if len(lines) != 1:
        pytest.fail(f"the remote load printed no result line:\n{_tail(proc.stdout + proc.stderr)}")
    return {"result": json.loads(lines[0][len(RESULT_PREFIX):]), "references": references, "texts": texts,
            "workdir": workdir,
            "hf_home": hf_home, "stderr": proc.stderr, "seconds": seconds}


@pytest.mark.slow
def test_bare_process_cannot_see_dlm(remote_load):
    result, workdir = remote_load["result"], remote_load["workdir"]
    assert result["hidden"] == {"modeling_dlm": True, "trainers": True, "datasets": True}, result["hidden"]
    assert result["dlm_modules_loaded"] == []
    assert "dlm" not in result["distributions"] and "datasets" not in result["distributions"]
    assert result["flags_isolated"]
    assert not {str(REPO), str(REPO / "tests"), str(workdir)} & {os.path.realpath(p) for p in result["sys_path"] if p}
    assert result["torch"].split("+")[0] == TORCH_VERSION and result["transformers"] == TRANSFORMERS_VERSION
    assert result["hf_home"] == os.path.realpath(remote_load["hf_home"])
    assert not any(workdir.iterdir()), "loading wrote into the working directory"
    assert "Traceback" not in remote_load["stderr"], _tail(remote_load["stderr"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_loads_with_only_torch_and_transformers(variant, remote_load):
    reference = remote_load["references"][variant]
    assert any(key.startswith("buffer.") for key in reference)
    for key, value in reference.items():  # the references must be informative, not constant
        if key.startswith("forward."):
            assert value.std() > 1e-3 and bool(value.isfinite().all()), key
    assert reference["nelbo"].unique().numel() == BATCH
    assert reference["generate"].shape == (BATCH, 2 + 4)

    checked = remote_load["result"]["checkpoints"][variant]
    assert "error" not in checked, f"{variant}: loading in the bare venv raised:\n{checked.get('error')}"
    # Classes come from the checkpoint's files, copied into the (cold) module cache of the run's HF_HOME.
    config_class, model_class = VARIANTS[variant]
    hf_home = os.path.realpath(remote_load["hf_home"]) + os.sep
    assert checked["config"]["class"] == config_class.__name__
    assert checked["config"]["model_type"] == variant
    assert checked["config"]["module"].startswith("transformers_modules.")
    assert checked["config"]["file"].startswith(hf_home)
    assert set(checked["models"]) == {"AutoModel", "AutoModelForMaskedLM"}
    for auto, loaded in checked["models"].items():
        where = f"{variant} via {auto}"
        assert loaded["class"] == model_class.__name__, where
        assert loaded["module"].startswith("transformers_modules."), where
        assert loaded["file"].startswith(hf_home), where
        assert loaded["config_class"] == config_class.__name__, where
        assert loaded["config_module"].startswith("transformers_modules."), where
        assert loaded["training"] is False, where
        assert loaded["loading_info"] == {}, f"{where}: weights did not load cleanly: {loaded['loading_info']}"
        assert loaded["generation_config_class"] == GENERATION_CONFIG_CLASS[variant], where
        assert loaded["generation_config_module"].startswith("transformers_modules."), where
        assert loaded["generation_config"] == GENERATION_OVERRIDES[variant], where
        outputs = loaded["outputs"]
        assert set(outputs) == set(reference), where
        for key, check in sorted(outputs.items(), key=lambda kv: (not kv[0].startswith("buffer."), kv[0])):
            assert check["present"] and check["shape_ok"], f"{where}: {key}: {check}"
            assert check["dtype"] == check["ref_dtype"], f"{where}: {key}: {check}"
            what = f"{where}: {key} differs from the saved model's"
            if key.startswith("buffer."):
                what += " (buffers outside the checkpoint must be rebuilt by `_init_weights`)"
            if reference[key].is_floating_point():
                assert check["finite"] and check["max_abs_diff"] <= LOGITS_ATOL, f"{what}: {check}"
            else:
                assert check["equal"], f"{what}: {check}"


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pipeline_runs_with_only_torch_and_transformers(variant, remote_load):
    """`pipeline(model=checkpoint, trust_remote_code=True)` in the bare process: the task comes from config.json, the
    pipeline class from the checkpoint's pipeline_dlm.py, and the texts equal those of the installed pipeline on the
    in-memory model (same seed). A re-saved remote-code model ships the pipeline again and gives the same texts."""
    checked = remote_load["result"]["checkpoints"][variant]
    assert "error" not in checked, f"{variant}: loading in the bare venv raised:\n{checked.get('error')}"
    piped = checked["pipeline"]
    assert "error" not in piped, f"{variant}: the pipeline in the bare venv raised:\n{piped.get('error')}"
    hf_home = os.path.realpath(remote_load["hf_home"]) + os.sep
    assert piped["task"] == PIPELINE_TASK
    assert piped["class"] == DLMTextGenerationPipeline.__name__
    assert piped["module"].startswith("transformers_modules.") and piped["module"].endswith(".pipeline_dlm")
    assert piped["file"].startswith(hf_home)
    assert piped["model_class"] == VARIANTS[variant][1].__name__
    assert piped["model_module"].startswith("transformers_modules.")
    expected = remote_load["texts"][variant]
    prompts = PIPELINE_SPEC["inputs"]
    assert [len(records) for records in expected] == [1] * len(prompts)
    assert all(records[0].startswith(prompt) and len(records[0]) > len(prompt)  # text was generated
               for prompt, records in zip(prompts, expected))
    assert piped["texts"] == expected
    resaved = piped["resaved"]
    assert {n for n in resaved["files"] if n.endswith(".py")} == {p.name for p in SHIPPED}
    assert "tokenizer.json" in resaved["files"] and resaved["custom_pipelines"] == PIPELINE_ENTRY
    assert resaved["task"] == PIPELINE_TASK and resaved["texts"] == expected


# ---------------------------------------------------------------------------------------------------------------------
# Static rules of the shipped sources
# ---------------------------------------------------------------------------------------------------------------------
def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _in_try_body(node: ast.AST, parents: dict) -> bool:
    """Whether `node` sits in the body of a `try:` that catches ImportError (or broader)."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            caught = set()
            for handler in parent.handlers:
                types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                caught |= {"BaseException" if t is None else getattr(t, "id", "") for t in types}
            if caught & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}:
                return True
        child, parent = parent, parents.get(parent)
    return False


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parents = _parents(tree)
    docstrings = _docstring_nodes(tree)
    siblings = {p.stem for p in SOURCES}
    found = []

    def where(node) -> str:
        return f"{path.name}:{node.lineno}"

    def check_absolute(node, module: str) -> None:
        top = module.split(".")[0]
        if top in STDLIB or top in ALLOWED_TOP_LEVEL:
            return
        if not _in_try_body(node, parents):
            found.append(f"{where(node)}: third-party import {module!r} outside a try/except ImportError block")
        if top in {"modeling_dlm", "trainers", "dlm"}:
            found.append(f"{where(node)}: absolute import of the package itself ({module!r})")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check_absolute(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                check_absolute(node, node.module or "")
                if node.module == "torch" and any(a.name == "load" for a in node.names):
                    found.append(f"{where(node)}: imports torch.load")
            elif node.level > 1:
                found.append(f"{where(node)}: parent-relative import (`from {'.' * node.level}...`)")
            elif node.module is None:
                found.append(f"{where(node)}: `from . import ...` (not copied by save_pretrained)")
            elif "." in node.module:
                found.append(f"{where(node)}: sub-package import `from .{node.module} import ...`")
            elif node.module not in siblings:
                found.append(f"{where(node)}: `from .{node.module}` has no sibling file")
            elif node.module == "__init__" or any(a.name == "*" for a in node.names):
                found.append(f"{where(node)}: `from .{node.module} import {node.names[0].name}`")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in {"print", "breakpoint", "exec", "eval"}:
                found.append(f"{where(node)}: {func.id}() call")
            if isinstance(func, ast.Attribute) and func.attr == "cuda":
                found.append(f"{where(node)}: .cuda() call (use .to(device))")
        elif isinstance(node, ast.Attribute):
            if node.attr == "load" and isinstance(node.value, ast.Name) and node.value.id == "torch":
                call = parents.get(node)  # only a direct call with a literal weights_only=True may unpickle
                safe = isinstance(call, ast.Call) and call.func is node and any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in call.keywords)
                if not safe:
                    found.append(f"{where(node)}: torch.load without weights_only=True")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if "cuda" in node.value.lower():
                found.append(f"{where(node)}: string literal {node.value!r} (hard-coded CUDA device)")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve"}
                   for n in names):
                found.append(f"{where(node)}: pickle-style serialisation import")
    return found


def test_model_package_has_no_subpackages():
    nested = [p.name for p in PACKAGE_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"]
    assert not nested, f"save_pretrained copies flat sibling files only; sub-packages are not shipped: {nested}"
    assert not [p.name for p in PACKAGE_DIR.iterdir() if p.suffix in {".so", ".pyd", ".pyx", ".c", ".cu", ".cpp"}]
    assert (PACKAGE_DIR / "__init__.py").exists() and len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_source_follows_remote_code_rules(path):
    problems = _violations(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_transformers_load_time_import_check_passes(path):
    """transformers' own `check_imports` input: absolute imports outside try blocks must be installed in a bare env;
    its regex for relative imports must find only flat sibling files (what save_pretrained copies)."""
    required = set(get_imports(path))
    assert required <= STDLIB | ALLOWED_TOP_LEVEL, f"{path.name} would need {sorted(required - STDLIB)} at load time"
    for name in get_relative_imports(path):
        assert "." not in name and (PACKAGE_DIR / f"{name}.py").exists(), f"{path.name}: relative import {name!r}"
        assert name != "__init__"


def test_rule_scanner_reports_each_violation(tmp_path):
    """The scanner itself: each forbidden pattern is reported, the allowed ones are not."""
    bad = tmp_path / "bad_module.py"
    bad.write_text(textwrap.dedent(
        '''
        """Docstrings may mention cuda."""
        import os
        import numpy
        import pickle
        from . import configuration_dlm
        from ..common import X
        from .sub.mod import Y
        from .configuration_dlm import DuoConfig
        from modeling_dlm.modeling_dit import DiTModel
        try:
            import flash_attn
        except ImportError:
            flash_attn = None
        print("hi")
        x = torch.load("w.pt")
        fine = torch.load("w.pt", weights_only=True)
        device = "cuda:0"
        y = x.cuda()
        '''
    ))
    problems = "\n".join(_violations(bad))
    for needle in ("'numpy'", "pickle-style", "`from . import", "parent-relative", "sub-package", "'modeling_dlm",
                   "print()", "torch.load", "'cuda:0'", ".cuda() call"):
        assert needle in problems, f"{needle} not reported:\n{problems}"
    assert problems.count("torch.load") == 1, problems  # the weights_only=True call is allowed
    for quiet in ("flash_attn", "'os'", "configuration_dlm import DuoConfig", "Docstrings"):
        assert quiet not in problems, problems


# ---------------------------------------------------------------------------------------------------------------------
# Importing the shipped files only defines things
# ---------------------------------------------------------------------------------------------------------------------
_IMPORT_PROBE = textwrap.dedent(
    """
    import importlib, json, logging, os, sys, threading, types, warnings

    pkg_dir, hf_home, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    import torch
    import transformers
    import transformers.initialization, transformers.modeling_layers, transformers.modeling_utils
    import transformers.pipelines  # transformers imports pipeline_dlm.py from pipeline(), with this loaded already
    from transformers import GenerationConfig, PreTrainedConfig, PreTrainedModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING, MODEL_MAPPING
    from transformers.utils import ModelOutput

    def tree(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)

    def native_threads():
        try:
            return len(os.listdir("/proc/self/task"))
        except OSError:
            return None

    def snapshot():
        loggers = {"": logging.getLogger()}
        for n, lg in logging.Logger.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                loggers[n] = lg
        return {
            "modules": set(sys.modules),
            "threads": sorted(t.name for t in threading.enumerate()),
            "native_threads": native_threads(),
            "loggers": {n: ([id(h) for h in lg.handlers], lg.level, lg.propagate, lg.disabled)
                        for n, lg in loggers.items()},
            "logging_disable": logging.root.manager.disable,
            "auto": [sorted(CONFIG_MAPPING._extra_content), sorted(map(str, MODEL_MAPPING._extra_content)),
                     sorted(map(str, MODEL_FOR_MASKED_LM_MAPPING._extra_content))],
            "dlm_types_in_config_mapping": [t for t in ("sddlm", "duo", "mdlm", "replaid") if t in CONFIG_MAPPING],
            "torch": [torch.get_default_dtype() is torch.float32, torch.get_num_threads(),
                      torch.is_grad_enabled(), torch.get_rng_state().tolist() == rng0,
                      torch.are_deterministic_algorithms_enabled()],
            "warnings_filters": len(warnings.filters),
            "environ": dict(os.environ),
            "cwd": os.getcwd(),
            "cwd_files": tree(os.getcwd()),
            "pkg_files": tree(pkg_dir),
            "hf_home_files": tree(hf_home),
            "sys_path": list(sys.path),
        }

    rng0 = torch.get_rng_state().tolist()
    package = types.ModuleType("dlm_shipped")  # as transformers imports remote code: no package __init__ runs
    package.__path__ = [pkg_dir]
    sys.modules["dlm_shipped"] = package
    report = {}
    before = snapshot()
    for name in names:
        importlib.import_module("dlm_shipped." + name)
        after = snapshot()
        changes = {}
        for key in before:
            if key == "modules":
                new = sorted(after[key] - before[key])
                changes["new_modules"] = new
                changes["foreign_modules"] = [m for m in new if m.split(".")[0] not in
                                              {"dlm_shipped", "torch", "transformers"} | set(sys.stdlib_module_names)]
            elif key == "loggers":
                changes["changed_loggers"] = sorted(
                    n for n in before[key] if before[key][n] != after[key].get(n))
                changes["new_loggers_with_setup"] = sorted(
                    n for n in set(after[key]) - set(before[key]) if after[key][n] != ([], 0, True, False))
            elif before[key] != after[key]:
                changes[key] = [str(before[key])[:300], str(after[key])[:300]]
        report[name] = changes
        before = after
    report["modeling_dlm_in_sys_modules"] = "modeling_dlm" in sys.modules
    print("PROBE " + json.dumps(report))
    """
)


def _dependency_order() -> list[str]:
    """Shipped module names, each after the siblings it imports (as found by transformers' regex)."""
    deps = {p.stem: set(get_relative_imports(p)) for p in SHIPPED}
    order: list[str] = []
    while len(order) < len(deps):
        ready = sorted(n for n in deps if n not in order and deps[n] <= set(order))
        assert ready, f"circular relative imports among {sorted(set(deps) - set(order))}"
        order.extend(ready)
    return order


def _probe_imports(tmp_path: Path, files: dict[str, str], names: list[str]) -> tuple[dict, Path, Path]:
    """Import `names` one by one from a package holding `files` (name -> source) in a fresh interpreter; the changes
    each import made, plus the working directory and HF_HOME it ran with."""
    pkg_dir, cwd, hf_home = tmp_path / "pkg", tmp_path / "cwd", tmp_path / "hf_home"
    for folder in (pkg_dir, cwd, hf_home):
        folder.mkdir()
    for file_name, text in files.items():
        (pkg_dir / file_name).write_text(text, encoding="utf-8")
    cmd = [sys.executable, "-I", "-B", "-c", _IMPORT_PROBE, str(pkg_dir), str(hf_home), *names]
    proc = _run_or_fail(cmd, "the import probe", timeout=LOAD_TIMEOUT_S, cwd=str(cwd),
                        env=_clean_env(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert lines, f"the import probe printed no report:\n{_tail(proc.stdout + proc.stderr)}"
    assert sorted(p.name for p in pkg_dir.iterdir()) == sorted(files), "the import wrote into the package folder"
    return json.loads(lines[-1][len("PROBE "):]), cwd, hf_home


def test_importing_shipped_files_only_defines_things(tmp_path):
    """Each shipped file, imported (in a fresh interpreter, after torch and transformers) the way transformers
    imports remote code, registers nothing with the Auto classes, adds no logging handlers, starts no threads, writes
    no files, loads no third-party modules and leaves torch's global state (RNG, dtype, grad mode) alone."""
    names = _dependency_order()  # leaves first: each step imports exactly one new file, so its changes are its own
    files = {p.name: p.read_text(encoding="utf-8") for p in SHIPPED}
    report, cwd, hf_home = _probe_imports(tmp_path, files, names)
    assert report.pop("modeling_dlm_in_sys_modules") is False, "a shipped file imported the installed package"
    assert set(report) == set(names)
    for name, changes in report.items():
        new_shipped = [m for m in changes.pop("new_modules") if m.startswith("dlm_shipped")]
        assert new_shipped == [f"dlm_shipped.{name}"], f"{name}: imported {new_shipped}"
        assert changes.pop("foreign_modules") == [], f"{name}: imports beyond stdlib/torch/transformers"
        assert changes.pop("changed_loggers") == [], f"{name}: reconfigured existing loggers"
        assert changes.pop("new_loggers_with_setup") == [], f"{name}: configured its logger (handlers/level)"
        assert changes == {}, f"{name}: side effects on import: {json.dumps(changes, indent=1)}"
    assert not any(cwd.iterdir()) and not any(hf_home.iterdir())


_NOISY_MODULE = textwrap.dedent(
    """
    import logging
    import os
    import threading
    import time

    import torch
    from transformers import AutoConfig, PreTrainedConfig

    class NoisyConfig(PreTrainedConfig):
        model_type = "duo"

    AutoConfig.register("duo", NoisyConfig)
    logging.getLogger().addHandler(logging.NullHandler())
    logging.getLogger(__name__).setLevel(logging.DEBUG)
    threading.Thread(target=time.sleep, args=(30,), daemon=True, name="noisy").start()
    open("written.txt", "w").close()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    os.environ["NOISY"] = "1"
    """
)


def test_import_probe_reports_each_side_effect(tmp_path):
    """The probe itself: a module that registers, configures logging, starts a thread, writes a file and touches
    torch's global state gets each of these reported."""
    report, cwd, _ = _probe_imports(tmp_path, {"quiet.py": "X = 1\n", "noisy.py": _NOISY_MODULE}, ["quiet", "noisy"])
    quiet, noisy = report["quiet"], report["noisy"]
    assert quiet["new_modules"] == ["dlm_shipped.quiet"]
    assert {k for k, v in quiet.items() if v and k != "new_modules"} == set()
    assert noisy["changed_loggers"] == [""] and noisy["new_loggers_with_setup"] == ["dlm_shipped.noisy"]
    for key in ("auto", "dlm_types_in_config_mapping", "threads", "torch", "environ", "cwd_files"):
        assert key in noisy, f"{key} not reported: {sorted(noisy)}"
    assert (cwd / "written.txt").exists()
