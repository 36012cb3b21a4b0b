"""Cost and peak memory of one training step (`compute_loss` + backward) of each dlm objective, against an
equal-size stock `LlamaForCausalLM` step and against a bare forward+backward of the same DiT.

    python bench/train_step.py [--vocab 50258 --batch 8 --seq 128 --hidden 256 --layers 4 --heads 4 --repeats 5]
    python bench/train_step.py --device cuda        # the same on a GPU
    python bench/train_step.py --profile "duo (elbo)"   # the top operators of one step (torch.profiler)
    python bench/train_step.py --compile --no_memory --cases mdlm "duo (elbo)"   # + torch.compile'd steps

With `--compile`, every step is also timed with its network under `torch.compile` (inductor; the Trainer's
`--torch_compile` compiles the same module), as "NAME (compiled)", interleaved with the eager ones, and the rows gain
"x eager", the compiled step's time over the eager one.

Every model has the same hidden size, layers, heads and (untied) vocabulary; all steps use the same batch and are
timed interleaved (each median over the Llama median). "bare dit" is the same network as the diffusion models with a
plain cross-entropy on clean tokens: the ratio to it is the cost of the objective itself (the reference code: 1.6x).

Memory: each step runs once in a fresh process. Peak memory of the step = the high-water mark during the step minus
what was resident just before it (model, batch and inputs included in both, so the difference is activations, saved
tensors, gradients and temporaries). CPU: the kernel's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs after `malloc_trim`); CUDA: `torch.cuda.max_memory_allocated`.
Results go to bench/results/train_step{,_memory}.json and a PNG.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import build, size_parser  # bench/common.py (the script's folder is on sys.path)
from transformers import LlamaConfig, LlamaForCausalLM

from trainers import TRAINERS, DiffusionTrainingArguments


RESULTS = Path(__file__).parent / "results"
#: (name, variant, trainer arguments, config overrides)
CASES = [
    ("sddlm", "sddlm", {}, {}),
    ("sddlm (no reg.)", "sddlm", {}, {"regularizer": "none"}),
    ("sddlm (simple loss only)", "sddlm", {}, {"elbo_weight": 0.0}),
    ("duo (elbo)", "duo", {}, {}),
    ("duo (curriculum)", "duo", {"curriculum_steps": 10}, {}),
    ("duo (curric. top-2)", "duo", {"curriculum_steps": 10, "curriculum_top_k": 2}, {}),
    ("mdlm", "mdlm", {}, {}),
    ("replaid", "replaid", {}, {}),
]


def make_steps(args, names: list[str] | None = None) -> dict:
    """name -> zero-argument training step (zero grads, loss, backward), on `args.device`."""
    device = torch.device(args.device)
    ids = torch.randint(0, args.vocab - 1, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    steps = {}

    def want(name):
        return names is None or name in names

    if want("ar (llama)"):
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                             intermediate_size=4 * args.hidden, max_position_embeddings=args.seq,
                                             tie_word_embeddings=False)).to(device).train()

        def llama_step(llama=llama):
            llama.zero_grad(set_to_none=True)
            llama(input_ids=ids, labels=ids).loss.backward()

        steps["ar (llama)"] = llama_step
        if args.compile:
            compiled = torch.compile(llama)
            steps["ar (llama) (compiled)"] = lambda fn=llama_step, m=compiled: fn(m)
    if want("bare dit"):
        dit = build("duo", args).to(device).train()
        sigma = torch.full((args.batch,), 1.0, device=device)

        def bare_step(net=dit):
            dit.zero_grad(set_to_none=True)
            logits = net(input_ids=ids, sigma=sigma).logits
            F.cross_entropy(logits.view(-1, logits.shape[-1]), ids.view(-1)).backward()

        steps["bare dit"] = bare_step
        if args.compile:
            compiled = torch.compile(dit)
            steps["bare dit (compiled)"] = lambda fn=bare_step, m=compiled: fn(m)
    for name, variant, extra, overrides in CASES:
        if not want(name):
            continue
        model = build(variant, args, **overrides).to(device).train()
        targs = DiffusionTrainingArguments(output_dir="/tmp/dlm-bench", report_to=[],
                                           use_cpu=device.type == "cpu", **extra)
        trainer = TRAINERS[variant](model=model, args=targs)
        inputs = {"input_ids": ids}

        def step(net=model, model=model, trainer=trainer, inputs=inputs):
            model.zero_grad(set_to_none=True)
            trainer.compute_loss(net, inputs).backward()

        steps[name] = step
        if args.compile:
            compiled = torch.compile(model)
            steps[f"{name} (compiled)"] = lambda fn=step, m=compiled: fn(m)
    return steps


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(args) -> list[dict]:
    steps = make_steps(args, ["ar (llama)", "bare dit", *args.cases] if args.cases else None)
    times = {name: [] for name in steps}
    for fn in steps.values():
        fn()  # warm-up
    _sync(args.device)
    for _ in range(args.repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            _sync(args.device)
            times[name].append(time.perf_counter() - start)
    ar, bare = statistics.median(times["ar (llama)"]), statistics.median(times["bare dit"])
    rows = [{"step": name, "seconds": round(statistics.median(v), 4), "over_ar": round(statistics.median(v) / ar, 3),
             "over_bare": round(statistics.median(v) / bare, 3)} for name, v in times.items()]
    for row in rows:
        if row["step"].endswith(" (compiled)"):
            eager = statistics.median(times[row["step"][: -len(" (compiled)")]])
            row["over_eager"] = round(statistics.median(times[row["step"]]) / eager, 3)
    return rows


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(args, name: str) -> float:
    """Peak memory (MiB) of one step of `name`, in this (fresh) process."""
    step = make_steps(args, [name])[name]
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set high-water mark
    before = _kib("VmRSS")
    step()
    return (_kib("VmHWM") - before) / 1024


def memory_table(args) -> list[dict]:
    names = ["ar (llama)", "bare dit"] + (args.cases or [c[0] for c in CASES])
    peaks = {}
    for name in names:
        cmd = [sys.executable, __file__, "--_memory_case", name, "--device", args.device]
        for key in ("vocab", "batch", "seq", "hidden", "layers", "heads"):
            cmd += [f"--{key}", str(getattr(args, key))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    ar = peaks["ar (llama)"]
    return [{"step": n, "peak_mib": round(p, 1), "over_ar": round(p / ar, 3)} for n, p in peaks.items()]


def profile(args, name: str) -> None:
    step = make_steps(args, [name])[name]
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(args.device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
    sort = "self_cuda_time_total" if len(activities) > 1 else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))


def plot(rows: list[dict], mem: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["step"] for r in rows]
    axes[0].barh(names, [r["over_ar"] for r in rows], color="tab:blue")
    axes[0].axvline(1.15, color="tab:red", ls="--", lw=1, label="goal 1.15x")
    axes[0].set_xlabel("training step time / Llama step")
    axes[0].legend()
    axes[0].invert_yaxis()
    axes[1].barh([m["step"] for m in mem], [m["over_ar"] for m in mem], color="tab:green")
    axes[1].axvline(1.2, color="tab:red", ls="--", lw=1, label="goal 1.2x")
    axes[1].set_xlabel("peak memory of a step / Llama step")
    axes[1].legend()
    axes[1].invert_yaxis()
    fig.suptitle("one training step (compute_loss + backward), same size as an untied Llama")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = size_parser(__doc__, repeats=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", default=None, help="print the operator profile of one step of this case")
    parser.add_argument("--no_memory", action="store_true", help="skip the per-process memory measurements")
    parser.add_argument("--compile", action="store_true", help="also time every step with torch.compile")
    parser.add_argument("--cases", nargs="+", default=None, choices=[c[0] for c in CASES],
                        help="measure only these (plus the Llama and bare-DiT references)")
    parser.add_argument("--out", default=str(RESULTS / "train_step.json"))
    parser.add_argument("--_memory_case", default=None, help=argparse_hidden())
    args = parser.parse_args()
    if args._memory_case is not None:
        print(json.dumps({"peak_mib": measure_memory(args, args._memory_case)}))
        return
    if args.profile is not None:
        profile(args, args.profile)
        return
    rows = time_steps(args)
    print(f"{'step':<31} {'median s':>9} {'x AR':>7} {'x bare':>7} {'x eager':>8}")
    for r in rows:
        eager = f"{r['over_eager']:>8.3f}" if "over_eager" in r else ""
        print(f"{r['step']:<31} {r['seconds']:>9.4f} {r['over_ar']:>7.3f} {r['over_bare']:>7.3f} {eager}")
    mem = []
    if not args.no_memory:
        mem = memory_table(args)
        print(f"\n{'step':<20} {'peak MiB':>9} {'x AR':>7}")
        for m in mem:
            print(f"{m['step']:<20} {m['peak_mib']:>9.1f} {m['over_ar']:>7.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    out.write_text(json.dumps({"config": config, "rows": rows, "memory": mem}, indent=2) + "\n")
    if mem:
        plot(rows, mem, out.with_suffix(".png"))


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
