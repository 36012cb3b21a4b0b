"""Re-runs the commands behind the README's quickstart figures and pipeline outputs, and compares (issue 21, item 5).

Each README output block names what re-runs it (`<!-- reproduced by: ... -->` above the block). This script covers
the blocks that need the full 500-step quickstart (4 minutes), which is too long for a test:

1. `dlm quickstart` (defaults): the bound before training, the final bound, the perplexity bound and the corpus
   fingerprint in the README's quickstart block;
2. `dlm eval dlm-quickstart --dataset builtin --seq_len 64 --num_time_samples 4` on that checkpoint: the JSON line;
3. the two-process `torchrun ... dlm train` of "Several processes": its logged losses and eval bound;
4. `dlm quickstart --max_steps 60`, then the README's pipeline and streamer snippets on it: their printed outputs
   (tests/test_readme.py checks the same on every CI run).

Every run uses one intra-op thread, as the README's figures do; the figures depend on the machine's threads and BLAS
(and the corpus on the Python version) in their last digits, so a mismatch prints both values instead of failing
silently. Writes bench/results/readme.json (and the 500-step quickstart's log as readme_quickstart.log).

    python bench/readme.py            # about 6 minutes on the 2-core machine
    python bench/readme.py --short    # step 4 only (about 1 minute)
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(REPO)}


def readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The README text under `heading` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n")
    following = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading):], flags=re.MULTILINE)
    return text[start: start + len(heading) + following.start()] if following else text[start:]


def output_block_after(text: str, marker: str) -> str:
    """The first bare ``` block (an output block) after the first occurrence of `marker`."""
    start = text.index(marker)
    return re.search(r"^```\n(.*?)^```", text[start:], flags=re.DOTALL | re.MULTILINE).group(1)


def quickstart_figures(log: str) -> dict:
    """The figures of a quickstart log (the README's block or a real run): the bound before training, the corpus
    fingerprint and the final JSON line's numbers."""
    before = re.search(r"validation bound before: (\d+\.\d+) nats/token", log)
    corpus = re.search(r"standard library: fingerprint ([0-9a-f]{16})", log)
    summary = json.loads([line for line in log.splitlines() if line.startswith('{"nelbo_before"')][-1])
    return {"bound before (printed)": before.group(1) if before else None,
            "corpus fingerprint": corpus.group(1) if corpus else None,
            **{key: summary.get(key) for key in ("nelbo_before", "nelbo", "ppl_bound", "log_vocab")}}


def readme_quickstart(text: str) -> str:
    return output_block_after(text, "`dlm quickstart` needs no network and no arguments")


def run_quickstart(folder: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "trainers.cli", "quickstart", *args], cwd=folder, env=ENV,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"dlm quickstart {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stderr + result.stdout


def pipeline_script(text: str) -> str:
    """The README's pipeline and streamer snippets as one script that prints, like an interactive session, the value
    of every top-level `pipe(...)` call (the README shows those values; other expressions' values are not shown)."""
    blocks = re.findall(r"```python\n(.*?)```", section(text, "## Pipeline and streamers"), flags=re.DOTALL)
    statements = []
    for block in blocks:
        for node in ast.parse(block).body:
            source = ast.get_source_segment(block, node)
            is_pipe_call = (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                            and isinstance(node.value.func, ast.Name) and node.value.func.id == "pipe")
            statements.append(f"print(repr({source}), flush=True)" if is_pipe_call else source)
    return "\n".join(statements) + "\n"


def readme_pipeline_outputs(text: str) -> list[str]:
    """The README's real-output lines for the pipeline block and the streamer block ('...' lines mark cuts)."""
    pipeline = output_block_after(text, "Real output, on a checkpoint from `dlm quickstart --max_steps 60`")
    streamers = output_block_after(text, "Real output (same checkpoint, abridged")
    return [line for line in (pipeline + streamers).splitlines() if line.strip()]


def run_pipeline_snippets(folder: Path, text: str) -> list[str]:
    """Runs the snippets in `folder` (which holds `dlm-quickstart/`); their printed lines."""
    script = folder / "pipeline_snippets.py"
    script.write_text(pipeline_script(text), encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=folder, env=ENV, capture_output=True, text=True,
                            timeout=900, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"the README's pipeline snippets failed:\n{result.stderr[-3000:]}")
    return [line for line in result.stdout.splitlines() if line.strip()]


def missing_lines(shown: list[str], produced: list[str]) -> list[str]:
    """The README lines (in order, '...' lines skipped) that the run did not print in that order."""
    position, missing = 0, []
    for line in shown:
        if line.strip() == "...":
            continue
        try:
            position = produced.index(line, position) + 1
        except ValueError:
            missing.append(line)
    return missing


def readme_torchrun(text: str) -> tuple[list[str], list[str]]:
    """The README's `torchrun ... dlm train` block: the command (argv) and its output lines."""
    block = output_block_after(text, "Real output, 2 processes (gloo) on the 2-core CPU machine:")
    command, lines = [], block.splitlines()
    while lines and (not command or command[-1].endswith("\\")):
        command.append(lines.pop(0))
    output = [line for line in lines if line.strip()]
    argv = " ".join(line.rstrip("\\").strip() for line in command).removeprefix("$ ").split()
    return argv, output


def run_torchrun(folder: Path, argv: list[str]) -> list[str]:
    """The README's torchrun command, as written but for `$(which dlm)` and the output folder under `folder`."""
    assert argv[:2] == ["OMP_NUM_THREADS=1", "torchrun"], argv
    which = str(Path(sys.executable).with_name("dlm"))
    argv = [which if a == "$(which" else a for a in argv[1:] if a != "dlm)"]
    argv[0] = str(Path(sys.executable).with_name("torchrun"))  # this environment's
    argv[argv.index("--output_dir") + 1] = str(folder / "duo-ddp")
    result = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun dlm train failed:\n{result.stderr[-3000:]}")
    return [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]


def training_figures(lines: list[str]) -> dict:
    """The logged losses and the final eval bound of a `dlm train` output."""
    losses = [re.search(r"'loss': '([^']+)'", line).group(1) for line in lines if line.startswith("{'loss'")]
    final = [line for line in lines if line.startswith('{"eval_loss"')]
    nelbo = float(re.search(r'"eval_nelbo": ([0-9.]+)', final[-1]).group(1)) if final else None
    return {"losses": losses, "eval_nelbo": nelbo}


def same(shown, measured) -> bool:
    """Equal, or for floats printed with all their digits (`dlm eval`'s JSON) equal to 1e-6 relative: summation order
    moves the last digits between machines and thread counts."""
    if isinstance(shown, float) and isinstance(measured, float):
        return abs(shown - measured) <= 1e-6 * max(abs(shown), abs(measured))
    return shown == measured


def compare(name: str, shown, measured, rows: list) -> None:
    match = same(shown, measured)
    rows.append({"figure": name, "readme": shown, "now": measured, "match": match})
    print(f"{name:34s} {str(shown):>22s} {str(measured):>22s}  {'same' if match else 'DIFFERENT'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="only the 60-step pipeline outputs")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "readme.json"))
    args = parser.parse_args()
    text, rows = readme(), []
    print(f"{'figure':34s} {'README':>22s} {'this run':>22s}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.short:
            shown = quickstart_figures(readme_quickstart(text))
            log = run_quickstart(folder)
            (REPO / "bench" / "results" / "readme_quickstart.log").write_text(log, encoding="utf-8")
            measured = quickstart_figures(log)
            for key in shown:
                compare(f"quickstart {key}", shown[key], measured[key], rows)
            shown_eval = json.loads(output_block_after(text, "Real output of `dlm eval` and `dlm generate`")
                                    .splitlines()[1])
            result = subprocess.run([sys.executable, "-m", "trainers.cli", "eval", "dlm-quickstart", "--dataset",
                                     "builtin", "--seq_len", "64", "--num_time_samples", "4"], cwd=folder, env=ENV,
                                    capture_output=True, text=True, timeout=900, check=True)
            measured_eval = json.loads(result.stdout.strip().splitlines()[-1])
            for key in ("nelbo", "ppl_bound", "bpd", "tokens", "rows"):
                compare(f"dlm eval {key}", shown_eval[key], measured_eval[key], rows)
            (folder / "dlm-quickstart").rename(folder / "dlm-quickstart-500")
            argv, shown_lines = readme_torchrun(text)
            produced = run_torchrun(folder, argv)
            (REPO / "bench" / "results" / "readme_torchrun.log").write_text("\n".join(produced) + "\n",
                                                                          encoding="utf-8")
            shown_ddp, measured_ddp = training_figures(shown_lines), training_figures(produced)
            for key in shown_ddp:
                compare(f"torchrun {key}", shown_ddp[key], measured_ddp[key], rows)
        run_quickstart(folder, "--max_steps", "60", "--num_samples", "1")
        shown_lines = readme_pipeline_outputs(text)
        missing = missing_lines(shown_lines, run_pipeline_snippets(folder, text))
        compare("pipeline/streamer lines missing", 0, len(missing), rows)
        for line in missing:
            print(f"    not printed now: {line}")
    Path(args.out).write_text(json.dumps({"rows": rows, "python": sys.version.split()[0],
                                          "omp_num_threads": 1}, indent=1) + "\n", encoding="utf-8")
    print(f"{sum(row['match'] for row in rows)} of {len(rows)} figures as in the README; wrote {args.out}")
    return 0 if all(row["match"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
