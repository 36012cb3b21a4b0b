"""Pushing a dlm checkpoint folder to the Hugging Face Hub (`dlm push`): one commit with exactly what a user needs.

What is uploaded is an allowlist, never "the folder minus some patterns":
- weights as safetensors only (`model.safetensors`, or the shards named by `model.safetensors.index.json`);
- `config.json` (with the `auto_map` that `trust_remote_code` needs) and `generation_config.json`;
- the Python files the config, its custom pipelines and the tokenizer refer to, plus their `from .x import y`
  siblings (what `save_pretrained` copies next to a dlm model); missing ones are taken from the installed
  `modeling_dlm` package;
- the tokenizer files;
- `README.md`: the folder's own, or a model card generated from the checkpoint (`trainers.model_card`).

Optimizer and scheduler state, RNG state, `training_args.bin`, pickles, checkpoints, logs, `.env` files and anything
else in the folder stay on the machine. Every selected text file (and the metadata header of each safetensors file)
is scanned for credential-like strings (Hugging Face tokens and similar); a hit aborts the push before any request
is sent.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .variants import DLM_VARIANTS


logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
)
CARD_NAME = "README.md"
# Suffixes a pushed file may have at all (a last guard on top of the allowlist).
ALLOWED_SUFFIXES = (".safetensors", ".json", ".py", ".txt", ".model", ".jinja", ".md")
# Credential-like strings: Hugging Face user/org tokens, GitHub tokens, AWS access keys, OpenAI-style keys,
# private key blocks.
SECRET_PATTERNS = (
    re.compile(rb"hf_[A-Za-z0-9]{20,}"),
    re.compile(rb"api_org_[A-Za-z0-9]{20,}"),
    re.compile(rb"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,}"),
    re.compile(rb"(?:AKIA|ASIA)[0-9A-Z]{16}"),
    re.compile(rb"sk-(?:proj-)?[A-Za-z0-9_-]{32,}"),
    re.compile(rb"-----BEGIN (?:RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----"),
)


@dataclass
class PushResult:
    repo_id: str
    commit: str | None
    commit_url: str | None
    files: list[str] = field(default_factory=list)
    card: str = "none"  # "folder", "generated" or "none"

    def to_dict(self) -> dict:
        return {"repo_id": self.repo_id, "commit": self.commit, "url": self.commit_url, "card": self.card,
                "files": self.files}


def find_secrets(data: bytes) -> list[str]:
    """Credential-like substrings of `data`, masked (first 6 characters kept) for error messages."""
    hits = []
    for pattern in SECRET_PATTERNS:
        for match in pattern.finditer(data):
            text = match.group(0).decode("ascii", errors="replace")
            hits.append(text[:6] + "..." + f"({len(text)} chars)")
    return hits


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header of {size} bytes)")
        header = handle.read(size)
    try:
        json.loads(header)
    except ValueError:
        raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    return header


def _relative_imports(source: str) -> set[str]:
    """Module names of the `from .name import x` statements of a file (what transformers copies along)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _code_modules(config: dict, tokenizer_config: dict | None) -> set[str]:
    """Module names referenced by `auto_map` entries ("module.Class" or "repo--module.Class") and custom pipelines."""
    refs: list[str] = []

    def collect(value):
        if isinstance(value, str):
            refs.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    for source in (config, tokenizer_config or {}):
        for value in (source.get("auto_map") or {}).values():
            collect(value)
    for task in (config.get("custom_pipelines") or {}).values():
        collect(task.get("impl") if isinstance(task, dict) else None)
    modules = set()
    for ref in refs:
        if "--" in ref:  # code that lives in another repo: nothing to upload
            continue
        if "." in ref:
            modules.add(ref.rsplit(".", 1)[0])
    return modules


def _installed_code_dir() -> Path | None:
    try:
        import modeling_dlm
    except ImportError:
        return None
    return Path(modeling_dlm.__file__).resolve().parent


def collect_files(folder: str | Path) -> tuple[dict[str, Path | bytes], dict]:
    """The files to push from a checkpoint folder: (path in repo -> local path or bytes, config dict).

    Raises OSError/ValueError for a folder that is not a pushable checkpoint."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise OSError(f"{folder} is not a checkpoint folder: config.json is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    files: dict[str, Path | bytes] = {}

    # weights: safetensors only
    index_path = folder / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            shards = sorted(set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"{index_path} is not a valid safetensors index: {err}") from None
        files[WEIGHTS_INDEX_NAME] = index_path
        for shard in shards:
            if "/" in shard or not shard.endswith(".safetensors") or not (folder / shard).is_file():
                raise OSError(f"{index_path} names the shard {shard!r}, which is not a .safetensors file in {folder}")
            files[shard] = folder / shard
    elif (folder / WEIGHTS_NAME).is_file():
        files[WEIGHTS_NAME] = folder / WEIGHTS_NAME
    else:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        hint = f" (found {', '.join(others)}: re-save with save_pretrained(safe_serialization=True))" if others else ""
        raise OSError(f"{folder} holds no {WEIGHTS_NAME} weights; dlm pushes safetensors only{hint}")
    for name in files:
        if name.endswith(".safetensors"):
            _safetensors_header(folder / name)

    # configs
    for name in CONFIG_FILES:
        if (folder / name).is_file():
            files[name] = folder / name
    model_type = config.get("model_type")
    if model_type in DLM_VARIANTS and not config.get("auto_map"):
        architecture = (config.get("architectures") or [None])[0]
        from modeling_dlm import VARIANTS

        config_class = VARIANTS[model_type][0].__name__
        if architecture is None:
            raise ValueError(f"{config_path} has neither auto_map nor architectures; re-save the model with "
                             f"save_pretrained")
        logger.warning("%s has no auto_map; adding the one trust_remote_code needs", config_path)
        config = {**config, "auto_map": {"AutoConfig": f"configuration_dlm.{config_class}",
                                         "AutoModel": f"modeling_dlm.{architecture}",
                                         "AutoModelForMaskedLM": f"modeling_dlm.{architecture}"}}
        files["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()

    # tokenizer
    tokenizer_config = None
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            files[name] = folder / name
    if (folder / "tokenizer_config.json").is_file():
        try:
            tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{folder / 'tokenizer_config.json'} is not valid JSON: {err}") from None
    if not any(name in files for name in ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model",
                                          "spiece.model")):
        logger.warning("%s holds no tokenizer files; users will need their own tokenizer", folder)

    # code: what the auto_map and custom pipelines name, and their relative imports, recursively
    todo, seen = sorted(_code_modules(config, tokenizer_config)), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        name = f"{module}.py"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\.py", name):
            raise ValueError(f"auto_map refers to an invalid module name {module!r}")
        local = folder / name
        installed = _installed_code_dir() if not local.is_file() and model_type in DLM_VARIANTS else None
        if installed is not None and (installed / name).is_file():
            logger.warning("%s is missing from %s; taking it from the installed modeling_dlm", name, folder)
            local = installed / name
        if not local.is_file():
            raise OSError(f"{folder} lacks {name}, which the config's auto_map needs for trust_remote_code")
        files[name] = local
        todo.extend(sorted(_relative_imports(local.read_text(encoding="utf-8")) - seen))
    return files, config


def _scan(files: dict[str, Path | bytes]) -> None:
    problems = []
    for name, source in sorted(files.items()):
        if not name.endswith(ALLOWED_SUFFIXES) or "/" in name:
            problems.append(f"{name}: not a file type dlm pushes")
            continue
        if isinstance(source, bytes):
            data = source
        elif name.endswith(".safetensors"):
            data = _safetensors_header(source)
        else:
            data = source.read_bytes()
        hits = find_secrets(data)
        if hits:
            problems.append(f"{name}: contains what looks like a credential ({', '.join(hits)})")
    if problems:
        raise ValueError("refusing to push: " + "; ".join(problems) + ". Remove the secret (and revoke it if it "
                         "was ever shared) before pushing.")


def prepare_push(
    folder: str | Path,
    repo_id: str,
    *,
    card: str = "auto",
    card_template: str | Path | None = None,
    eval_files: list[str | Path] | tuple = (),
    license: str | None = None,  # noqa: A002 (the Hub metadata field's name)
) -> tuple[dict[str, Path | bytes], str]:
    """The files of the commit (scanned for secrets) and where its README.md comes from.

    `card`: "auto" (the folder's README.md if there is one, else a generated card), "generate" (always generate),
    or "none" (no README.md)."""
    if card not in ("auto", "generate", "none"):
        raise ValueError(f"card must be 'auto', 'generate' or 'none', got {card!r}")
    folder = Path(folder)
    files, config = collect_files(folder)
    card_source = "none"
    if card == "auto" and card_template is None and (folder / CARD_NAME).is_file():
        files[CARD_NAME] = folder / CARD_NAME
        card_source = "folder"
    elif card != "none":
        from .model_card import build_model_card

        model_card = build_model_card(folder, repo_id, template_path=card_template, config=config,
                                      eval_files=eval_files, license=license)
        files[CARD_NAME] = str(model_card).encode("utf-8")
        card_source = "generated"
    _scan(files)
    return files, card_source


def push_checkpoint(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload dlm model",
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    card: str = "auto",
    card_template: str | Path | None = None,
    eval_files: list[str | Path] | tuple = (),
    license: str | None = None,  # noqa: A002
    dry_run: bool = False,
) -> PushResult:
    """Create `repo_id` if needed and push the checkpoint in `folder` as ONE commit (see the module docstring for
    what goes in). `endpoint`/`token` default to huggingface_hub's (`HF_ENDPOINT`, `HF_TOKEN`, the saved login).
    With `dry_run`, nothing is sent: the result lists the files that would be pushed."""
    files, card_source = prepare_push(folder, repo_id, card=card, card_template=card_template,
                                      eval_files=eval_files, license=license)
    names = sorted(files)
    if dry_run:
        return PushResult(repo_id, None, None, names, card_source)

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=source if isinstance(source, bytes)
                                     else str(source)) for name, source in sorted(files.items())]
    if revision is not None and revision != "main":
        api.create_branch(repo.repo_id, branch=revision, exist_ok=True)  # commits go to existing branches only
    logger.info("pushing %d files from %s to %s", len(operations), folder, repo.repo_id)
    info = api.create_commit(repo.repo_id, operations, commit_message=commit_message, revision=revision)
    return PushResult(repo.repo_id, info.oid, info.commit_url, names, card_source)
