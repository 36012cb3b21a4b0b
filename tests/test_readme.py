"""The README's Python snippets, run exactly as written (extracted from README.md, not copied).

The folder they run in holds what a reader of the README has: a quickstart checkpoint (`dlm quickstart`, shortened
with `--max_steps`), the GPT-2 tokenizer as `gpt2/` (offline, a local folder of that name is what
`from_pretrained("gpt2")` finds first) and a text corpus as `my_corpus/`.
"""

from __future__ import annotations

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


def python_blocks(section: str) -> list[str]:
    """The ```python blocks under the README heading `section` (up to the next heading of the same level)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    level = section.split(" ", 1)[0]
    start = text.index(section + "\n")
    following = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(section):], flags=re.MULTILINE)
    body = text[start: start + len(section) + following.start()] if following else text[start:]
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


def test_readme_python_snippets_run_as_written(tmp_path):
    python = python_blocks("## Python")
    pipeline = python_blocks("## Pipeline and streamers")
    adaptive = python_blocks("### Adaptive decoding: commit what the model is sure of")
    assert len(python) == 2 and pipeline and len(adaptive) == 1, "the README's snippets moved: update this test"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    quickstart = subprocess.run([sys.executable, "-m", "trainers.cli", "quickstart", "--max_steps", "20",
                                 "--num_samples", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
    assert quickstart.returncode == 0, quickstart.stderr[-3000:]
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
