"""The README's Python snippets, run exactly as written (extracted from README.md, not copied).

The folder they run in holds what a reader of the README has: a quickstart checkpoint (`dlm quickstart`, shortened
with `--max_steps`), the GPT-2 tokenizer as `gpt2/` (offline, a local folder of that name is what
`from_pretrained("gpt2")` finds first) and a text corpus as `my_corpus/`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import shared_data


REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bench_readme():
    """bench/readme.py (the script that re-runs the README's figures), imported from its path."""
    spec = importlib.util.spec_from_file_location("bench_readme", REPO / "bench" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_blocks(section: str) -> list[str]:
    """The ```python blocks under the README heading `section` (up to the next heading of the same level)."""
    figures = bench_readme()
    return re.findall(r"```python\n(.*?)```", figures.section(figures.readme(), section), flags=re.DOTALL)


def test_readme_python_snippets_run_as_written(tmp_path):
    python = python_blocks("## Python")
    pipeline = python_blocks("## Pipeline and streamers")
    adaptive = python_blocks("### Adaptive decoding: commit what the model is sure of")
    assert len(python) == 2 and pipeline and len(adaptive) == 1, "the README's snippets moved: update this test"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    # 60 steps: the checkpoint the README's pipeline and streamer outputs come from
    quickstart = subprocess.run([sys.executable, "-m", "trainers.cli", "quickstart", "--max_steps", "60",
                                 "--num_samples", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
    assert quickstart.returncode == 0, quickstart.stderr[-3000:]
    # issue 21, item 5: the README's numbers are this run's (one thread, as the README says)
    figures = bench_readme()
    readme = figures.readme()
    shown = figures.quickstart_figures(figures.readme_quickstart(readme))
    measured = figures.quickstart_figures(quickstart.stderr + quickstart.stdout)
    assert measured["corpus fingerprint"] == shown["corpus fingerprint"], (
        "the built-in corpus differs from the README's (it is read from this Python's standard library)", measured)
    assert measured["bound before (printed)"] == shown["bound before (printed)"]
    assert measured["nelbo_before"] == shown["nelbo_before"] and measured["log_vocab"] == shown["log_vocab"]
    printed = figures.run_pipeline_snippets(tmp_path, readme)
    assert figures.missing_lines(figures.readme_pipeline_outputs(readme), printed) == [], printed
    shutil.copytree(shared_data("tokenizers", "gpt2"), tmp_path / "gpt2")
    (tmp_path / "my_corpus").mkdir()
    text = shared_data("tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    (tmp_path / "my_corpus" / "shakespeare.txt").write_text(text[:60_000], encoding="utf-8")
    checks = '''
assert ids.shape == (4, 64)
assert out.sequences[0, : prompt.shape[1]].tolist() == prompt[0].tolist()       # the prompt is kept
assert prompt[0, 0].item() == AutoTokenizer.from_pretrained("dlm-quickstart", trust_remote_code=True).bos_token_id
assert nelbo.shape == (4,) and bool((nelbo > 0).all())
assert 1 <= fast.num_forward_passes <= 64 and fast.num_forward_passes_per_sequence.shape == (2,)
assert fast.sequences.shape == (2, 64)
assert trainer.state.global_step == 100 and model.config.vocab_size == len(tok) == 50258
metrics = trainer.evaluate()
assert metrics["eval_loss"] == metrics["eval_nelbo"] > 0
print("README snippets ran")
'''
    script = tmp_path / "snippets.py"
    script.write_text("\n".join([*python[:1], *adaptive, *python[1:], *pipeline[:1], checks]), encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "README snippets ran" in result.stdout


def test_readme_sft_snippet_runs_as_written(tmp_path):
    """The SFT section's snippet: data from the synthetic task, a short Duo SFT run with the real Trainer, the
    conditional bound and generated answers; in a folder holding the GPT-2 tokenizer as `gpt2/`."""
    sft = python_blocks("## Conditional fine-tuning (SFT): prompt -> response")
    assert len(sft) == 1, "the README's SFT snippet moved: update this test"
    shutil.copytree(shared_data("tokenizers", "gpt2"), tmp_path / "gpt2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    checks = '''
assert train_ds.column_names == ["input_ids", "attention_mask", "prompt_mask"]
row = train_ds[0]
prompt_len = 1 + len(tok(rows[0]["prompt"], add_special_tokens=False).input_ids)   # [BOS] "map: d d d"
assert sum(row["prompt_mask"]) == prompt_len and row["input_ids"][-1] == tok.eos_token_id
assert stats == {"rows": 900, "kept": 900, "no_room": 0, "too_long": 0, "response_tokens": 900 * (16 - prompt_len)}
assert trainer.state.global_step == 60
bound = trainer.evaluate()
assert 0 < bound["eval_nelbo"] < 20 and bound["eval_tokens"] == 100 * (16 - prompt_len)
scores = sft_accuracy(model, tok, rows[900:932], seq_len=16, num_steps=16)
assert scores["rows"] == 32 and 0 <= scores["token_accuracy"] <= 1
print("SFT snippet ran")
'''
    script = tmp_path / "sft_snippet.py"
    script.write_text(sft[0] + checks, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SFT snippet ran" in result.stdout


def test_every_output_block_names_what_reproduces_it():
    """Issue 21, item 5: every output block of the README (a bare ``` fence) is tagged `<!-- reproduced by: ... -->`
    on the line above, and every test (`tests/file.py::name`) and script (`bench/name.py`) a tag names exists. The
    layout block, the one block that is not an output, names the folders that must exist."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").split("\n")
    inside, untagged, tags = False, [], []
    for number, line in enumerate(lines, 1):
        if not line.startswith("```"):
            continue
        if not inside and line.strip() == "```":
            above = lines[number - 2]
            tag = re.fullmatch(r"<!-- reproduced by: (.+) -->", above)
            (tags.append((number, tag.group(1))) if tag else untagged.append((number, lines[number][:60])))
        inside = not inside
    assert untagged == [], f"README output blocks without a 'reproduced by' tag: {untagged}"
    assert len(tags) >= 20
    for number, tag in tags:
        tests = re.findall(r"(tests/[\w/]+\.py)::(\w+)", tag)
        scripts = re.findall(r"(bench/\w+\.py)", tag)
        assert tests or scripts or tag.startswith("not an output"), (number, tag)
        for path, name in tests:
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(encoding="utf-8"), flags=re.MULTILINE), (
                f"README line {number} names {path}::{name}, which does not exist")
        for path in scripts:
            assert (REPO / path).is_file(), f"README line {number} names {path}, which does not exist"
    layout = "\n".join(lines).split("## Layout\n", 1)[1].split("```", 2)[1]
    folders = re.findall(r"^(\w[\w.]*)/\s", layout, flags=re.MULTILINE)
    assert {"modeling_dlm", "trainers", "bench", "tests"} <= set(folders)
    assert all((REPO / folder).is_dir() for folder in folders), folders
    assert (REPO / "setup.py").is_file() and "setup.py" in layout
