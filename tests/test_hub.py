"""Push to and pull from a Hub over real HTTP, with the real `huggingface_hub` and `transformers` clients.

`tests/hub_server.py` serves the Hub protocol on 127.0.0.1. A tiny checkpoint of every variant (with the real
bert-base-uncased tokenizer from ../shared/data) is pushed with the `dlm push` command in a subprocess; a second
process, the bare torch + transformers venv with a cold HF_HOME, loads each one by repo id with
`AutoModel.from_pretrained(repo_id, trust_remote_code=True)` and recomputes logits, NELBO and generate ids. The
server's stored files show exactly what was uploaded: no optimizer state, training args, `.env` or token. An opt-in
test does the same against the real Hub when `HF_TOKEN_REAL` holds a write token.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import save_file
from transformers import AutoTokenizer

from modeling_dlm import VARIANTS
from tests.conftest import shared_data, tiny_model
from tests.hub_pull_script import RESULT_PREFIX, outputs
from tests.hub_server import HubServer, git_blob_sha1
from tests.test_remote_code import bare_python  # noqa: F401  (the session fixture: a torch+transformers-only venv)
from trainers.hub import find_secrets, push_checkpoint
from trainers.model_card import build_model_card, find_eval_results


REPO = Path(__file__).resolve().parents[1]
PULL_SCRIPT = Path(__file__).resolve().with_name("hub_pull_script.py")
SHIPPED_CODE = sorted(p.name for p in (REPO / "modeling_dlm").glob("*.py") if p.name != "__init__.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SEQ = 12
TEXT = "The tower is 324 metres tall, about the same height as an 81-storey building."
PROMPT = "The tower"
NAMESPACE = "dlm-test"
LOGITS_ATOL = 1e-5
# A token-shaped secret planted in the checkpoint folders; the push process also authenticates with it.
FAKE_TOKEN = "hf_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(34))
PLANTED = {  # files a training run or a careless user leaves in an output folder; none may reach the Hub
    ".env": f"HF_TOKEN={FAKE_TOKEN}\nWANDB_API_KEY=0123456789abcdef\n",
    "token": FAKE_TOKEN,
    "notes.txt": f"remember to rotate {FAKE_TOKEN}\n",
    "training_args.bin": b"\x80\x04\x95" + FAKE_TOKEN.encode() + b"\x00" * 64,
    "optimizer.pt": b"PK\x03\x04" + os.urandom(256) + FAKE_TOKEN.encode(),
    "pytorch_model.bin": b"PK\x03\x04" + os.urandom(256),
    "checkpoint-2/optimizer.pt": b"PK\x03\x04" + os.urandom(64),
    "checkpoint-2/trainer_state.json": json.dumps({"global_step": 2, "max_steps": 2, "log_history": []}),
}


def _tail(text: str, n: int = 6000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def _hub_env(url: str, hf_home: Path, token: str = FAKE_TOKEN) -> dict[str, str]:
    """A clean environment for a client process: no inherited HF/Python settings, this Hub, a fresh HF_HOME."""
    drop = ("PYTHON", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(HF_ENDPOINT=url, HF_HOME=str(hf_home), HF_TOKEN=token, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
    return env


def _run(cmd: list[str], what: str, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{what} timed out after {timeout}s:\n{_tail(str(err.stdout or ''))}")
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
    return proc


@pytest.fixture(scope="module")
def hub():
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(shared_data("tokenizers", "bert-base-uncased")))


def _model_inputs(variant: str, tokenizer) -> dict[str, torch.Tensor]:
    lines = [line.strip() for line in shared_data("wikitext-2-raw", "wiki.test.raw").read_text("utf-8").splitlines()
             if len(line.split()) > 30][:2]
    encoded = tokenizer(lines, truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")
    mask = encoded["attention_mask"].clone()
    mask[0, -3:] = 0
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": mask}
    if variant == "replaid":
        inputs["t"] = torch.tensor([0.2, 0.7])
    else:
        inputs["sigma"] = torch.tensor([0.4, 1.8])
    return inputs


def _save_checkpoint(variant: str, tokenizer, folder: Path):
    overrides = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if variant == "mdlm":
        overrides["mask_token_id"] = tokenizer.mask_token_id
    model = tiny_model(variant, seed=4, **overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def _publish(path: Path, payload) -> None:
    """Write JSON atomically: the waiting client processes poll for `path` and must never read half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def _communicate(proc: subprocess.Popen, what: str, timeout: float) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{what} timed out after {timeout}s:\n{_tail(out)}\n{_tail(err)}")
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{_tail(out)}\n{_tail(err)}")
    return out, err


# `dlm push` for every variant in ONE process: the CLI's `main`, as the console script runs it. It imports the stack
# while the test builds the checkpoints, then waits for the list of (folder, repo id) pairs.
PUSH_CODE = """
import json, os, sys, time
from trainers.cli import main
import trainers.hub, trainers.model_card, huggingface_hub.hf_api  # warm up while the checkpoints are built
deadline = time.monotonic() + float(sys.argv[2])
while not os.path.exists(sys.argv[1]):
    if time.monotonic() > deadline:
        sys.exit("no push list: " + sys.argv[1])
    time.sleep(0.05)
with open(sys.argv[1]) as handle:
    sys.exit(max(main(["push", folder, repo_id]) for folder, repo_id in json.load(handle)))
"""


@pytest.fixture(scope="module")
def roundtrip(hub, tokenizer, bare_python, tmp_path_factory) -> dict:  # noqa: F811
    """Every variant saved (secrets planted beside it), pushed with `dlm push` in one process, then loaded by repo id
    in one bare-venv process. Both client processes start first and import while this process builds the
    checkpoints; they wait for their job files. Duo also gets a measured `dlm_eval.json`, so its card must show
    those numbers."""
    root = tmp_path_factory.mktemp("hub")
    pairs_path, jobs_path, workdir, pull_home = root / "push.json", root / "jobs.json", root / "cwd", root / "home"
    workdir.mkdir()
    pull_home.mkdir()
    start = time.monotonic()
    push_proc = subprocess.Popen([sys.executable, "-c", PUSH_CODE, str(pairs_path), "300"], cwd=str(REPO),
                                 env=_hub_env(hub.url, root / "push_home"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    pull_proc = subprocess.Popen([str(bare_python), "-I", "-B", str(PULL_SCRIPT), str(jobs_path), "--wait", "400"],
                                 cwd=str(workdir), env=_hub_env(hub.url, pull_home, token="hf_pull"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        jobs, folders, repos, measured = {}, {}, {}, None
        for variant in VARIANTS:
            folder = root / "runs" / variant
            model = _save_checkpoint(variant, tokenizer, folder)
            for name, content in PLANTED.items():
                path = folder / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
            inputs = _model_inputs(variant, tokenizer)
            save_file(inputs, root / f"{variant}-inputs.safetensors")
            save_file(outputs(model, inputs), root / f"{variant}-expected.safetensors")
            repos[variant] = f"{NAMESPACE}/{variant}-tiny"
            folders[variant] = folder
            jobs[variant] = {"repo_id": repos[variant], "inputs": str(root / f"{variant}-inputs.safetensors"),
                             "expected": str(root / f"{variant}-expected.safetensors"), "text": TEXT}
            if variant == "duo":
                from trainers.evaluation import evaluate_likelihood

                rows = [{"input_ids": ids, "attention_mask": m}
                        for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]
                measured = evaluate_likelihood(model, rows, batch_size=2, num_time_samples=2, seed=0)
                measured.update(model=str(folder), dataset="wiki.test.raw", split="test", seq_len=SEQ,
                                num_time_samples=2)
                (folder / "dlm_eval.json").write_text(json.dumps(measured))
                jobs[variant]["pipeline"] = PROMPT
        _publish(pairs_path, [[str(folders[v]), repos[v]] for v in VARIANTS])
        push_out, push_err = _communicate(push_proc, "dlm push", 300)
        push_seconds = time.monotonic() - start
        _publish(jobs_path, jobs)
        try:
            pull_out, pull_err = _communicate(pull_proc, "pulling by repo id in the bare venv", 400)
            pull_error = None
        except pytest.fail.Exception as err:  # reported by the pull tests, not by the push tests
            pull_out, pull_err, pull_error = "", "", str(err)
    finally:
        for proc in (push_proc, pull_proc):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    reports = [json.loads(line) for line in push_out.splitlines() if line.startswith("{")]
    return {"root": root, "jobs": jobs, "folders": folders, "repos": repos, "reports": reports, "measured": measured,
            "push_stderr": push_err, "push_seconds": push_seconds, "pull_stdout": pull_out, "pull_stderr": pull_err,
            "pull_error": pull_error, "pull_home": pull_home, "seconds": time.monotonic() - start}


@pytest.fixture(scope="module")
def pushed(roundtrip) -> dict:
    return roundtrip


@pytest.fixture(scope="module")
def pulled(roundtrip) -> dict:
    if roundtrip["pull_error"]:
        pytest.fail(roundtrip["pull_error"])
    lines = [line for line in roundtrip["pull_stdout"].splitlines() if line.startswith(RESULT_PREFIX)]
    if len(lines) != 1:
        pytest.fail(f"the pull script printed no result line:\n{_tail(roundtrip['pull_stdout'])}\n"
                    f"{_tail(roundtrip['pull_stderr'])}")
    return {"result": json.loads(lines[0][len(RESULT_PREFIX):]), "hf_home": roundtrip["pull_home"],
            "stderr": roundtrip["pull_stderr"], "stdout": roundtrip["pull_stdout"], "seconds": roundtrip["seconds"]}


# ---------------------------------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------------------------------
def test_push_reports_one_commit_per_variant(pushed, hub, record_property):
    record_property("push_seconds", round(pushed["push_seconds"], 1))
    assert [r["repo_id"] for r in pushed["reports"]] == [pushed["repos"][v] for v in VARIANTS]
    for report in pushed["reports"]:
        repo = hub.get_repo(report["repo_id"])
        assert repo is not None, report
        # the initial commit of create_repo, then exactly ONE commit with everything
        assert len(repo.commits) == 2, f"{report['repo_id']}: {len(repo.commits)} commits"
        assert repo.branches["main"] == report["commit"]
        assert report["url"].endswith(f"/{report['repo_id']}/commit/{report['commit']}")
        assert report["card"] == "generated"
    assert not hub.unhandled, f"clients asked for endpoints the test hub lacks: {hub.unhandled}"
    assert f"Bearer {FAKE_TOKEN}" in hub.auth_headers  # the push authenticated with HF_TOKEN


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pushed_repo_holds_exactly_the_model_files(variant, pushed, hub):
    folder, repo_id = pushed["folders"][variant], pushed["repos"][variant]
    files = hub.files(repo_id)
    expected = {".gitattributes", "README.md", "config.json", "generation_config.json", "model.safetensors",
                *TOKENIZER_FILES, *SHIPPED_CODE}
    assert set(files) == expected
    for name in expected - {".gitattributes", "README.md"}:
        assert files[name] == (folder / name).read_bytes(), f"{name} changed on the way"
    config = json.loads(files["config.json"])
    assert config["model_type"] == variant
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM"}
    for entry in config["auto_map"].values():
        assert f"{entry.split('.')[0]}.py" in files


def test_no_secret_or_training_state_reaches_the_hub(pushed, hub):
    stored = hub.all_stored_files()
    assert stored, "the server stored nothing"
    names = {key.rsplit(":", 1)[1] for key in stored}
    for planted in PLANTED:
        assert planted not in names, f"{planted} was uploaded"
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) or n.startswith(".env")]
    leaked = [key for key, data in stored.items() if FAKE_TOKEN.encode() in data]
    assert not leaked, f"the token reached the Hub in {leaked}"
    # and the planted files are still there locally (the push never touches the folder)
    folder = pushed["folders"]["sddlm"]
    assert (folder / ".env").is_file() and (folder / "training_args.bin").is_file()
    assert not (folder / "README.md").exists()


def test_push_refuses_a_credential_inside_an_allowed_file(hub, tokenizer, tmp_path):
    folder = tmp_path / "ckpt"
    _save_checkpoint("duo", tokenizer, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["hub_token"] = FAKE_TOKEN  # e.g. a token pasted into a config by mistake
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    requests_before = len(hub.requests)
    with pytest.raises(ValueError, match=r"refusing to push: tokenizer_config\.json: contains what looks like a cre"):
        push_checkpoint(folder, f"{NAMESPACE}/leaky", endpoint=hub.url, token="hf_fake")
    assert hub.get_repo(f"{NAMESPACE}/leaky") is None
    assert len(hub.requests) == requests_before, "a request was sent before the secret scan"
    hits = find_secrets((folder / "tokenizer_config.json").read_bytes())
    assert hits == [FAKE_TOKEN[:6] + f"...({len(FAKE_TOKEN)} chars)"]  # masked in messages


def test_push_checkpoint_to_a_branch_skips_unchanged_files(pushed, hub):
    """The Python API behind `dlm push`: a new branch starts at main, so every file is unchanged (the preupload
    answer carries each file's oid) and the client commits nothing; a changed card makes one commit on the branch."""
    repo_id, folder = pushed["repos"]["duo"], pushed["folders"]["duo"]
    main_head = hub.get_repo(repo_id).branches["main"]
    result = push_checkpoint(folder, repo_id, revision="dev", endpoint=hub.url, token="hf_fake")
    assert hub.get_repo(repo_id).branches["dev"] == main_head == result.commit
    result = push_checkpoint(folder, repo_id, revision="dev", endpoint=hub.url, token="hf_fake", license="mit")
    repo = hub.get_repo(repo_id)
    assert repo.branches["dev"] == result.commit != main_head and repo.branches["main"] == main_head
    dev, main = hub.files(repo_id, "dev"), hub.files(repo_id, "main")
    assert {k for k in dev if dev[k] != main.get(k)} == {"README.md"}
    assert ModelCard(dev["README.md"].decode()).data.license == "mit"


def test_push_rejects_folders_without_safetensors(hub, tmp_path, capsys):
    from trainers.cli import main

    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "duo"}))
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    assert main(["push", str(folder), f"{NAMESPACE}/bin-only"]) == 2  # fails before any request
    err = capsys.readouterr().err
    assert "dlm push: error:" in err and "safetensors only" in err and "pytorch_model.bin" in err
    assert hub.get_repo(f"{NAMESPACE}/bin-only") is None
    assert main(["push", str(tmp_path / "missing"), f"{NAMESPACE}/x"]) == 2
    assert "config.json is missing" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# pull, in a process that has only torch and transformers
# ---------------------------------------------------------------------------------------------------------------------
def test_pull_process_cannot_import_dlm(pulled, hub, record_property):
    record_property("push_and_pull_seconds", round(pulled["seconds"], 1))
    result = pulled["result"]
    assert result["hidden"] == {"modeling_dlm": True, "trainers": True, "datasets": True}
    assert result["endpoint"] == hub.url
    assert result["hf_home"] == os.path.realpath(pulled["hf_home"])
    assert "Traceback" not in pulled["stderr"], _tail(pulled["stderr"])
    assert "Do you wish to run the custom code" not in pulled["stdout"]  # trust_remote_code was never prompted for


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_loads_by_repo_id_with_identical_outputs(variant, pulled, pushed, tokenizer):
    checked = pulled["result"]["variants"][variant]
    assert "error" not in checked, f"{variant}: loading by repo id failed:\n{checked.get('error')}"
    assert checked["class"] == VARIANTS[variant][1].__name__
    # the class came from the code downloaded into the cold HF_HOME's module cache, not from an installed package
    assert checked["module"].startswith("transformers_modules.")
    assert checked["file"].startswith(os.path.realpath(pulled["hf_home"]) + os.sep)
    assert checked["token_ids"] == tokenizer(TEXT)["input_ids"]
    diffs = checked["diffs"]
    assert set(diffs) == {"logits", "nelbo", "generate"}
    assert diffs["generate"] == 0.0, diffs
    assert isinstance(diffs["logits"], float) and diffs["logits"] <= LOGITS_ATOL, diffs
    assert isinstance(diffs["nelbo"], float) and diffs["nelbo"] <= LOGITS_ATOL, diffs


def test_custom_pipeline_loads_by_repo_id(pulled, pushed, hub):
    config = json.loads(hub.files(pushed["repos"]["duo"])["config.json"])
    assert "dlm-text-generation" in config["custom_pipelines"]
    checked = pulled["result"]["variants"]["duo"]
    assert "error" not in checked, checked.get("error")
    assert checked["pipeline"]["task"] == "dlm-text-generation"
    (sample,) = checked["pipeline"]["output"]
    assert sample["generated_text"].startswith(PROMPT) and len(sample["generated_text"]) > len(PROMPT)


def test_pulled_files_match_the_server(pulled, pushed, hub):
    """The blobs in the pull process's cache are the server's bytes (ETag = git blob sha1 of the content)."""
    repo_id = pushed["repos"]["duo"]
    cache = pulled["hf_home"] / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = cache / "snapshots" / hub.get_repo(repo_id).branches["main"]
    files = hub.files(repo_id)
    for name in ("model.safetensors", "config.json", "modeling_dlm.py", "tokenizer.json"):
        assert (snapshot / name).read_bytes() == files[name]
    assert (cache / "refs" / "main").read_text() == hub.get_repo(repo_id).branches["main"]


# ---------------------------------------------------------------------------------------------------------------------
# protocol details the clients rely on
# ---------------------------------------------------------------------------------------------------------------------
def test_missing_file_raises_entry_not_found(pushed, hub, tmp_path):
    repo_id = pushed["repos"]["mdlm"]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "does-not-exist.json", endpoint=hub.url, token="hf_fake", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{NAMESPACE}/no-such-repo", "config.json", endpoint=hub.url, token="hf_fake",
                        cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch", endpoint=hub.url, token="hf_fake",
                        cache_dir=tmp_path)
    path = hf_hub_download(repo_id, "config.json", endpoint=hub.url, token="hf_fake", cache_dir=tmp_path)
    assert Path(path).read_bytes() == hub.files(repo_id)["config.json"]


def test_status_codes_and_headers(pushed, hub):
    repo_id = pushed["repos"]["replaid"]
    commit = hub.get_repo(repo_id).branches["main"]

    def request(method: str, path: str, token: str | None = "hf_fake"):
        req = urllib.request.Request(hub.url + path, method=method,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    status, headers, body = request("HEAD", f"/{repo_id}/resolve/main/config.json")
    data = hub.files(repo_id)["config.json"]
    assert status == 200 and body == b""
    assert headers["ETag"] == f'"{git_blob_sha1(data)}"'
    assert headers["X-Repo-Commit"] == commit and int(headers["Content-Length"]) == len(data)
    status, headers, body = request("GET", f"/{repo_id}/resolve/{commit}/config.json")
    assert status == 200 and body == data
    status, headers, _ = request("GET", f"/{repo_id}/resolve/main/nope.bin")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"] == commit
    status, headers, _ = request("GET", f"/{NAMESPACE}/nope/resolve/main/config.json")
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
    status, headers, _ = request("GET", f"/api/models/{NAMESPACE}/nope", token=None)
    assert status == 401 and headers["X-Error-Code"] == "RepoNotFound"  # anonymous: the Hub answers 401
    status, headers, _ = request("GET", f"/api/models/{repo_id}/revision/nope")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    status, _, body = request("GET", f"/api/models/{repo_id}/tree/main?recursive=true")
    tree = {entry["path"]: entry for entry in json.loads(body)}
    assert status == 200 and tree["model.safetensors"]["oid"] == git_blob_sha1(hub.files(repo_id)["model.safetensors"])
    assert request("POST", "/api/repos/create", token=None)[0] == 401  # writes need a token


# ---------------------------------------------------------------------------------------------------------------------
# model cards
# ---------------------------------------------------------------------------------------------------------------------
PAPERS = {"sddlm": "2510.22926", "duo": "2506.10892", "mdlm": "2406.07524", "replaid": "2605.18530"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pushed_card_names_variant_papers_and_only_measured_numbers(variant, pushed, hub):
    card = ModelCard(hub.files(pushed["repos"][variant])["README.md"].decode())
    text = card.text
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"dlm", variant, f"arxiv:{PAPERS[variant]}"} <= set(card.data.tags)
    assert f"`{variant}` (`{VARIANTS[variant][1].__name__}`)" in text
    assert f"https://arxiv.org/abs/{PAPERS[variant]}" in text
    assert f'AutoModel.from_pretrained("{pushed["repos"][variant]}", trust_remote_code=True)' in text
    assert "## Limitations" in text
    if variant == "duo":  # the only folder with a measured evaluation
        measured = pushed["measured"]
        assert "Not evaluated" not in text
        assert f"| {measured['nelbo']:.4f} | {measured['ppl_bound']:.2f} | {measured['bpd']:.4f} | " \
               f"{measured['tokens']} |" in text
        assert "`wiki.test.raw`" in text
    else:
        assert "**Not evaluated**" in text
        assert "| NELBO |" not in text and "perplexity bound |" not in text


def test_card_reads_trainer_results_and_generation_metrics(tmp_path, tokenizer):
    folder = tmp_path / "run"
    _save_checkpoint("sddlm", tokenizer, folder)
    trainer_eval = {"epoch": 0.5, "eval_nelbo": 7.25, "eval_loss": 7.25, "eval_ppl_bound": 1408.1048,
                    "eval_bpd": 10.4597, "eval_tokens": 2048.0}
    (folder / "eval_results.json").write_text(json.dumps(trainer_eval))
    judged = {"nelbo": 7.5, "ppl_bound": 1808.0424, "bpd": 10.8204, "tokens": 4096, "exact_nll": False,
              "gen_ppl": 812.75, "entropy": 4.912, "gen_num_samples": 16, "gen_num_steps": 64,
              "sampler": "greedy_tail", "top_p": 0.9, "dataset": "wikitext", "split": "validation", "seq_len": 64,
              "num_time_samples": 4}
    extra = tmp_path / "judge.json"
    extra.write_text("12:00:00 dlm: log line\n" + json.dumps(judged) + "\n")
    (folder / "dlm_training.json").write_text(json.dumps({"dataset": "Salesforce/wikitext", "seq_len": 64,
                                                           "dataset_config": "wikitext-2-raw-v1"}))
    state = {"global_step": 40, "max_steps": 40, "train_batch_size": 8,
             "log_history": [{"loss": 8.125, "step": 40}]}
    (folder / "checkpoint-40").mkdir()
    (folder / "checkpoint-40" / "trainer_state.json").write_text(json.dumps(state))
    (folder / "checkpoint-20").mkdir()
    (folder / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 20}))

    results = find_eval_results(folder, [extra])
    assert [r["source"] for r in results] == ["eval_results.json", "judge.json"]
    card = build_model_card(folder, "org/sddlm-run", eval_files=[extra], license="apache-2.0")
    text = str(card)
    assert "| 7.2500 | 1408.10 | 10.4597 | 2048 |" in text
    assert "| 7.5000 | 1808.04 | 10.8204 | 4096 |" in text
    assert "| `judge.json` | 812.75 | 4.912 | 16 | 64 | greedy_tail | 0.9 |" in text
    assert "| optimizer steps | 40 (of max_steps 40) |" in text  # the latest checkpoint's state, not checkpoint-20
    assert "`checkpoint-40/trainer_state.json`" in text
    assert "| dataset | `Salesforce/wikitext (wikitext-2-raw-v1)` |" in text
    assert card.data.datasets == ["Salesforce/wikitext"] and card.data.license == "apache-2.0"
    assert "Not evaluated" not in text

    (folder / "dlm_eval_broken.json").write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(ValueError, match="not an evaluation report"):
        find_eval_results(folder)


def test_card_pipeline_snippet_only_when_the_checkpoint_ships_the_pipeline(tmp_path, tokenizer):
    folder = tmp_path / "ckpt"
    _save_checkpoint("mdlm", tokenizer, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("custom_pipelines", None)
    without = str(build_model_card(folder, "org/m", config=config))
    assert "pipeline(" not in without and "Training details were not recorded" in without
    config["custom_pipelines"] = {"dlm-text-generation": {"impl": "pipeline_dlm.DLMTextGenerationPipeline",
                                                          "pt": ["AutoModel"]}}
    with_pipeline = str(build_model_card(folder, "org/m", config=config))
    assert 'pipeline(model="org/m", trust_remote_code=True)' in with_pipeline


def test_trainer_create_model_card_writes_the_dlm_card(tmp_path, tokenizer):
    from datasets import Dataset

    from trainers import DiffusionTrainingArguments, DuoTrainer

    model = tiny_model("duo", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(1000, 2000, (8, SEQ), generator=g).tolist()})
    args = DiffusionTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                      per_device_eval_batch_size=4, report_to=[], use_cpu=True, save_strategy="no",
                                      logging_steps=1, hub_model_id="org/duo-run", dataloader_num_workers=0)
    trainer = DuoTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    trainer.create_model_card(dataset="Salesforce/wikitext")  # what Trainer.push_to_hub calls before uploading
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert {"dlm", "duo", "arxiv:2506.10892"} <= set(card.data.tags)
    assert card.data.datasets == ["Salesforce/wikitext"]
    assert "| optimizer steps | 2 (of max_steps 2) |" in card.text
    assert f"| {metrics['eval_nelbo']:.4f} | {metrics['eval_ppl_bound']:.2f} |" in card.text
    assert 'AutoModel.from_pretrained("org/duo-run", trust_remote_code=True)' in card.text


def test_trainer_push_to_hub_uploads_only_the_allowlist(hub, tmp_path, tokenizer):
    """`DiffusionTrainer.push_to_hub` goes through dlm's allowlist: the EMA weights, config, code, tokenizer and card
    reach the server; `training_args.bin` and checkpoint state (which `Trainer.push_to_hub` would upload) do not."""
    from datasets import Dataset
    from safetensors.torch import load as load_safetensors

    from trainers import DiffusionTrainingArguments, DuoTrainer

    model = tiny_model("duo", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(1000, 2000, (8, SEQ), generator=g).tolist()})
    args = DiffusionTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                      report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
                                      logging_steps=1, hub_model_id="org/duo-trainer-push", hub_token="hf_fake",
                                      ema_decay=0.5, dataloader_num_workers=0)
    trainer = DuoTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    result = trainer.push_to_hub(endpoint=hub.url)
    stored = hub.files("org/duo-trainer-push")
    assert result.commit == hub.get_repo("org/duo-trainer-push").branches["main"]
    assert {"model.safetensors", "config.json", "modeling_dlm.py", "README.md", "tokenizer_config.json"} <= set(stored)
    assert (tmp_path / "out" / "training_args.bin").is_file() and (tmp_path / "out" / "checkpoint-2").is_dir()
    assert not [name for name in stored if name.endswith((".bin", ".pt", ".pth")) or name.startswith("checkpoint")]
    pushed = load_safetensors(stored["model.safetensors"])
    with trainer.ema.swapped(model):  # the exported weights are the EMA ones
        for name, value in model.state_dict().items():
            if name in pushed:
                assert torch.equal(pushed[name], value), name
    assert "duo" in ModelCard(stored["README.md"].decode()).data.tags


def test_card_templates_ship_with_the_package():
    text = (REPO / "pyproject.toml").read_text()
    assert 'dlm_model_cards = "model_cards"' in text and 'dlm_model_cards = ["*.md"]' in text
    from trainers.model_card import template_dir

    folder = template_dir()
    assert (folder / "model_card.md").is_file()
    for variant in (*VARIANTS, "ar"):
        assert (folder / f"method_{variant}.md").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# the real Hub (opt-in)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.environ.get("HF_TOKEN_REAL"),
                    reason="opt-in: set HF_TOKEN_REAL to a Hugging Face write token to push to and pull from the real "
                           "Hub (creates and deletes a private repo)")
def test_real_hub_push_and_pull(tokenizer, tmp_path, bare_python):  # noqa: F811
    from huggingface_hub import HfApi

    token = os.environ["HF_TOKEN_REAL"]
    api = HfApi(endpoint="https://huggingface.co", token=token)
    repo_id = f"{api.whoami()['name']}/dlm-hub-test-{secrets.token_hex(4)}"
    folder = tmp_path / "duo"
    model = _save_checkpoint("duo", tokenizer, folder)
    inputs = _model_inputs("duo", tokenizer)
    save_file(inputs, tmp_path / "inputs.safetensors")
    save_file(outputs(model, inputs), tmp_path / "expected.safetensors")
    env = _hub_env("https://huggingface.co", tmp_path / "home", token=token)
    try:
        _run([sys.executable, "-m", "trainers.cli", "push", str(folder), repo_id, "--private"], "dlm push (real Hub)",
             600, cwd=str(REPO), env=env)
        jobs = tmp_path / "jobs.json"
        jobs.write_text(json.dumps({"duo": {"repo_id": repo_id, "inputs": str(tmp_path / "inputs.safetensors"),
                                            "expected": str(tmp_path / "expected.safetensors"), "text": TEXT}}))
        workdir = tmp_path / "cwd"
        workdir.mkdir()
        proc = _run([str(bare_python), "-I", "-B", str(PULL_SCRIPT), str(jobs)], "pull (real Hub)", 600,
                    cwd=str(workdir), env=_hub_env("https://huggingface.co", tmp_path / "pull_home", token=token))
        result = json.loads([line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)][0]
                            [len(RESULT_PREFIX):])
        checked = result["variants"]["duo"]
        assert "error" not in checked, checked.get("error")
        assert checked["diffs"]["generate"] == 0.0 and checked["diffs"]["logits"] <= LOGITS_ATOL
        assert set(api.list_repo_files(repo_id)) >= {"model.safetensors", "config.json", "README.md",
                                                     "modeling_dlm.py"}
    finally:
        api.delete_repo(repo_id, missing_ok=True)
        shutil.rmtree(tmp_path / "home", ignore_errors=True)
