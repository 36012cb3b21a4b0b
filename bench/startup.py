"""Start-up time of the `dlm` command (issue 21, item 2): `dlm --help` and `dlm <command> --help` against the
interpreter importing torch and transformers, measured side by side in one run (medians of interleaved repeats).

`dlm train --help` and `dlm distill --help` list every `TrainingArguments` field, and importing
`transformers.training_args` costs seconds (it imports peft, accelerate and torch.distributed), so their text is cached
under `$DLM_CACHE/help/`: "cold" runs start from an empty cache, "warm" ones from the cache the cold run wrote.
`--compare REV` runs the same command lines from a git worktree of another commit as well (PYTHONPATH), e.g. the
commit before the lazy imports.

    python bench/startup.py --repeats 5 --compare 731ad96
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
BASELINE = ("import torch, transformers", [sys.executable, "-c", "import torch, transformers"])
COMMANDS = ("--help", "train --help", "distill --help", "eval --help", "generate --help", "quickstart --help",
            "push --help", "convert --help")
HEAVY = ("datasets", "accelerate", "peft", "matplotlib", "evaluate", "lm_eval", "deepspeed")


def timed(argv: list[str], env: dict, cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def heavy_modules(command: str, root: Path, cache: str) -> list[str]:
    """The heavy libraries that `dlm COMMAND` has imported when it exits (run in `root`, help cache `cache`)."""
    code = (f"import sys\nfrom trainers.cli import main\ntry:\n    main({command.split()!r})\nexcept SystemExit:\n"
            f"    pass\nprint('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": str(root), "DLM_CACHE": cache}
    err = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True, capture_output=True,
                         text=True).stderr
    line = [row for row in err.splitlines() if row.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare", default=None, help="Another commit to measure side by side (git worktree).")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "startup.json"))
    args = parser.parse_args()

    roots = {"this tree": REPO}
    if args.compare:
        worktree = Path(tempfile.mkdtemp()) / "compare"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.compare],
                       check=True, capture_output=True)
        roots[args.compare] = worktree
    times: dict[str, list[float]] = {}
    try:
        for _ in range(args.repeats):
            times.setdefault(BASELINE[0], []).append(timed(BASELINE[1], dict(os.environ), REPO))
            for label, root in roots.items():
                cold = tempfile.mkdtemp()  # an empty help cache, then the one the cold run filled
                for command in COMMANDS:
                    argv = [sys.executable, "-m", "trainers.cli", *command.split()]
                    env = {**os.environ, "PYTHONPATH": str(root), "DLM_CACHE": cold}
                    key = f"{label}: dlm {command}"
                    cached = command.split()[0] in ("train", "distill")
                    times.setdefault(key + (" (cold)" if cached else ""), []).append(timed(argv, env, root))
                    if cached:
                        times.setdefault(key + " (warm)", []).append(timed(argv, env, root))
        heavy = {}
        for label, root in roots.items():
            cache = tempfile.mkdtemp()
            for command in COMMANDS:
                cached = command.split()[0] in ("train", "distill")
                key = f"{label}: dlm {command}"
                heavy[key + (" (cold)" if cached else "")] = heavy_modules(command, root, cache)
                if cached:
                    heavy[key + " (warm)"] = heavy_modules(command, root, cache)
    finally:
        if args.compare:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(roots[args.compare])],
                           check=False, capture_output=True)
    base = statistics.median(times[BASELINE[0]])
    print(f"{'command':<44} {'median s':>9} {'x import':>9}  heavy libraries imported")
    rows = []
    for key, values in times.items():
        median = statistics.median(values)
        loaded = heavy.get(key, [])
        rows.append({"command": key, "median_s": round(median, 3), "ratio_to_import": round(median / base, 3),
                     "heavy_imports": loaded})
        print(f"{key:<44} {median:9.2f} {median / base:9.2f}  {', '.join(loaded) or '-'}")
    Path(args.out).write_text(json.dumps({"repeats": args.repeats, "compare": args.compare,
                                          "python": sys.version.split()[0], "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
