"""The benchmark scripts under bench/ run end to end at tiny sizes and write the tables and plots the README quotes.

They are scripts, not timed tests: these checks only guard them against rot (an API they call changing under them).
Each runs in a fresh process, as a user would run it, with its output redirected under tmp_path so that the recorded
results in bench/results/ are never touched.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
TINY = ["--vocab", "64", "--batch", "2", "--seq", "16", "--hidden", "32", "--layers", "1", "--heads", "2"]

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / name), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)
    assert proc.returncode == 0, f"bench/{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_train_step_bench(tmp_path):
    out = tmp_path / "train_step.json"
    stdout = run_script("train_step.py", *TINY, "--repeats", "1", "--cases", "duo (curric. top-2)", "--out", str(out))
    result = json.loads(out.read_text())
    rows = {r["step"]: r for r in result["rows"]}
    assert set(rows) == {"ar (llama)", "bare dit", "duo (curric. top-2)"}
    assert rows["ar (llama)"]["over_ar"] == 1.0 and rows["bare dit"]["over_bare"] == 1.0
    assert all(positive(r["seconds"]) and positive(r["over_ar"]) and positive(r["over_bare"]) for r in rows.values())
    memory = {m["step"]: m for m in result["memory"]}
    assert set(memory) == set(rows) and memory["ar (llama)"]["over_ar"] == 1.0
    assert all(positive(m["peak_mib"]) for m in memory.values())
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "x AR" in stdout and "peak MiB" in stdout


def test_sampling_benches(tmp_path):
    step_out = tmp_path / "sampling_step.json"
    run_script("sampling_step.py", *TINY, "--repeats", "1", "--steps", "4", "--out", str(step_out))
    step = json.loads(step_out.read_text())
    assert [r["variant"] for r in step["rows"]] == ["duo", "sddlm", "mdlm", "replaid"]
    assert all(positive(r["step_over_forward"]) for r in step["rows"])
    assert 1 <= step["mdlm_cache_forward_passes"] <= step["mdlm_steps"]

    tput_out = tmp_path / "sampling_throughput.json"
    stdout = run_script("sampling_throughput.py", *TINY, "--steps", "2", "4", "--out", str(tput_out))
    assert "x AR tokens/s" in stdout
    assert tput_out.with_suffix(".png").stat().st_size > 1000


def test_quality_bench_resumes(tmp_path):
    """Two variants through the real `dlm` CLI (GPT-2 tokenizer, WikiText-2): trained, bounded on held-out text and
    their samples judged by the AR model; a second invocation reads the finished runs back instead of retraining."""
    args = ["--max_steps", "2", "--hidden", "32", "--layers", "1", "--heads", "2", "--seq", "32", "--batch", "2",
            "--eval_blocks", "2", "--num_time_samples", "1", "--num_samples", "2", "--gen_steps", "2",
            "--runs", "ar", "mdlm", "--parallel", "2", "--workdir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "quality.json")]
    run_script("quality.py", *args)
    result = json.loads((tmp_path / "quality.json").read_text())["results"]
    assert list(result) == ["ar", "mdlm"]
    assert result["ar"]["exact_nll"] is True and result["mdlm"]["exact_nll"] is False
    assert positive(result["ar"]["nelbo"]) and positive(result["mdlm"]["nelbo"])
    assert positive(result["mdlm"]["samples"]["2"]["gen_ppl"]) and result["mdlm"]["samples"]["2"]["entropy"] >= 0
    assert (tmp_path / "quality.png").stat().st_size > 1000
    model_file = tmp_path / "runs" / "mdlm" / "model" / "model.safetensors"
    stamp = model_file.stat().st_mtime_ns
    again = run_script("quality.py", *args)
    assert model_file.stat().st_mtime_ns == stamp  # not retrained
    assert json.loads((tmp_path / "quality.json").read_text())["results"] == result
    assert "mdlm" in again


def test_replaid_embedding_bench(tmp_path):
    out = tmp_path / "replaid_embedding.json"
    stdout = run_script("replaid_embedding.py", "--vocab", "300", "--seq", "16", "--hidden", "32", "--layers", "1",
                        "--heads", "2", "--steps", "2", "--batch", "4", "--eval_blocks", "4",
                        "--runs", "d16 unit_norm shared", "d32 normal plaid", "mdlm", "--out", str(out))
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"d16 unit_norm shared", "d32 normal plaid", "mdlm"}
    assert all(positive(r["nelbo"]) for r in rows.values())
    assert 1 <= rows["d16 unit_norm shared"]["participation_ratio"] <= 16
    assert abs(rows["d32 normal plaid"]["mean_cosine"]) < 1
    assert "best:" in stdout


def test_equal_steps_bound_bench(tmp_path):
    out = tmp_path / "equal_steps_bound.json"
    stdout = run_script("equal_steps_bound.py", "--vocab", "300", "--seq", "16", "--hidden", "32", "--layers", "1",
                        "--heads", "2", "--steps", "2", "--batch", "4", "--eval_blocks", "4",
                        "--variants", "mdlm", "replaid", "--out", str(out))
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"mdlm", "replaid"} and rows["mdlm"]["nelbo_over_mdlm"] == 1.0
    assert all(positive(r["nelbo"]) and positive(r["ppl_bound"]) for r in rows.values())
    assert "NELBO / MDLM" in stdout


def test_sddlm_vocab_bench(tmp_path):
    out = tmp_path / "sddlm_vocab.json"
    stdout = run_script("sddlm_vocab.py", "--sources", "markov16", "--steps", "2", "--seeds", "0", "1",
                        "--cases", "duo", "sddlm (default: hinge + 0.1 NELBO)", "--out", str(out))
    result = json.loads(out.read_text())
    assert [(r["case"], r["seed"]) for r in result["rows"]] == [
        ("duo", 0), ("duo", 1), ("sddlm (default: hinge + 0.1 NELBO)", 0), ("sddlm (default: hinge + 0.1 NELBO)", 1)]
    assert all(positive(r["nelbo"]) and len(r["integrand"]) == len(result["t_grid"]) for r in result["rows"])
    assert all(positive(v) for r in result["rows"] for v in r["integrand"])
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "/ Duo" in stdout and "1.000x" in stdout


def test_gpu_check_runs_on_cpu_at_tiny_size(tmp_path):
    """bench/gpu_check.py, the prepared GPU check, end to end with `--device cpu --tiny` (Duo and Llama compiled)."""
    out = tmp_path / "gpu_check.json"
    stdout = run_script("gpu_check.py", "--device", "cpu", "--tiny", "--train_seconds", "4", "--compile_cases", "duo",
                        "--out", str(out))
    report = json.loads(out.read_text())
    steps = {r["step"]: r for r in report["train_step"]}
    assert {"ar (llama)", "bare dit", "sddlm", "duo (elbo)", "mdlm", "replaid", "ar (llama) (compiled)",
            "duo (elbo) (compiled)"} == set(steps)
    assert steps["ar (llama)"]["over_llama"] == 1.0 and steps["ar (llama) (compiled)"]["over_llama"] == 1.0
    assert all(positive(r["tokens_per_s"]) and positive(r["over_llama"]) for r in steps.values())
    for name in ("sddlm", "duo (elbo)", "mdlm", "replaid", "duo (elbo) (compiled)"):  # no value read on the host
        assert steps[name]["syncs"] == {"sync_free": True, "how": "HostSyncCounter", "events": []}, name
    # the CPU has a flash kernel too: an unpadded batch (no mask) reaches it; a padded one is a masked call
    attention = {(r["kernel"], r["batch"]): r for r in report["attention"]}
    assert attention[("flash", "unpadded")]["reached"], attention
    assert set(attention) == {("flash", "unpadded"), ("efficient", "unpadded"), ("efficient", "padded")}
    sampling = {(r["model"], r["steps"]): r["tokens_per_s"] for r in report["sampling"]}
    for variant in ("sddlm", "duo", "mdlm", "replaid"):
        assert all(positive(sampling[(variant, s)]) for s in (8, 32, 128))
        assert sampling[(variant, 8)] > sampling[(variant, 128)]  # fewer network calls, faster
    assert positive(sampling[("duo (compiled)", 32)]) and positive(sampling[("ar (llama, kv cache)", 31)])
    assert all(positive(r["over_llama"]) for r in report["sampling"] if not r["model"].startswith("ar"))
    assert report["settings"]["train_seconds"] == 4 and report["total_seconds"] < 480
    training = report["training"]
    assert training["loss_fell"] and training["steps"] >= 10 and len(training["losses"]) >= 1
    assert out.with_suffix(".png").stat().st_size > 1000
    assert json.loads(stdout.strip().splitlines()[-1])["loss_fell"] is True
