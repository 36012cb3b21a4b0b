"""Adaptive decoding: network calls per sequence against quality (gen-PPL, unigram entropy) of 128-token samples.

    python bench/quality.py --max_steps 240 --learning_rate 2e-3 --runs ar mdlm sddlm duo \
        --workdir runs/quality_240 ...                       # the checkpoints (see bench/README.md)
    dlm distill --teacher runs/quality_240/duo/model ... --output_dir runs/dcd_student      # the DCD student
    python bench/adaptive_sampling.py --workdir runs/quality_240 --student runs/dcd_student --models mdlm duo

For each checkpoint: ancestral and greedy-tail sampling at 8, 16, 32, 64 and 128 steps, then the adaptive samplers
(MDLM: `confidence` and `entropy_bound`; Duo, SDDLM and the DCD student: `entropy_bound` without and with revision)
over a sweep of their setting, and semi-autoregressive blocks (`--block_size`). Every configuration draws the same
`--num_samples` sequences from the same seed; the AR model of the quality benchmark judges them (gen-PPL) and their
unigram entropy is reported beside it. The figure of merit: the fewest network calls per sequence of any
configuration whose gen-PPL is at most that of ancestral sampling at 128 steps, at an entropy of at least 0.95x its
entropy; the ratio 128 / those calls is printed per model (for the adaptive samplers, and for the fixed grid).
Wall-clock tokens per second are reported next to `LlamaForCausalLM.generate` (KV cache, sampling) of the judge's
size, timed in the same run. Results: --out JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


RESULTS = Path(__file__).parent / "results"


def configurations(variant: str, steps: list[int], block_size: int, student: bool) -> list[dict]:
    grid = [{"sampler": s, "num_steps": n} for s in ("ancestral", "greedy_tail") for n in steps]
    if variant == "mdlm":
        adaptive = [{"sampler": "confidence", "num_steps": 128, "confidence_threshold": c} for c in (0.9, 0.5, 0.3)]
        adaptive += [{"sampler": "entropy_bound", "num_steps": 128, "entropy_bound": b} for b in (4.0, 16.0, 64.0)]
    else:
        adaptive = [{"sampler": "entropy_bound", "num_steps": 128, "entropy_bound": b} for b in (4.0, 16.0, 64.0)]
        adaptive += [{"sampler": "entropy_bound", "num_steps": 128, "entropy_bound": b, "allow_revision": True}
                     for b in (16.0, 64.0)]
    if student:
        grid = [c for c in grid if c["sampler"] == "greedy_tail"]  # the student's distilled sampler
    blocks = [{**c, "block_size": block_size} for c in (grid[-1], adaptive[1])]
    return grid + adaptive + blocks


def label(config: dict) -> str:
    keys = [k for k in config if k not in ("sampler",)]
    return config["sampler"] + "(" + ", ".join(f"{k}={config[k]}" for k in keys) + ")"


def run_config(model, tokenizer, judge, judge_tokenizer, config: dict, args) -> dict:
    from trainers.evaluation import judge_samples

    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    out = model.generate(batch_size=args.num_samples, max_new_tokens=args.seq, generator=generator, stop_at_eos=False,
                         return_dict_in_generate=True, **config)
    seconds = time.perf_counter() - start
    scored = judge_samples(out.sequences, tokenizer, judge, judge_tokenizer)
    per_seq = out.num_forward_passes_per_sequence.double()
    return {"config": config, "label": label(config), "calls": out.num_forward_passes,
            "calls_per_sequence": round(float(per_seq.mean()), 2), "gen_ppl": round(scored["gen_ppl"], 1),
            "entropy": round(scored["entropy"], 3), "seconds": round(seconds, 2),
            "tokens_per_second": round(args.num_samples * args.seq / seconds, 1)}


def llama_tokens_per_second(judge, args) -> float:
    ids = torch.full((args.num_samples, 1), judge.config.bos_token_id or 0)
    start = time.perf_counter()
    judge.generate(ids, max_new_tokens=args.seq, min_new_tokens=args.seq, do_sample=True, use_cache=True,
                   pad_token_id=0)
    return args.num_samples * args.seq / (time.perf_counter() - start)


REFERENCE = {"sampler": "ancestral", "num_steps": 128}


def merit(rows: list[dict], ref: dict) -> dict:
    """Calls-to-equal-quality against `ref` (ancestral at 128 steps): the fewest calls per sequence of a configuration
    in `rows` with gen-PPL <= the reference's and entropy >= 0.95x its entropy (adaptive and fixed-grid apart)."""
    ok = [r for r in rows if r["gen_ppl"] <= ref["gen_ppl"] and r["entropy"] >= 0.95 * ref["entropy"]]
    result = {"reference": ref["label"], "reference_gen_ppl": ref["gen_ppl"], "reference_entropy": ref["entropy"]}
    for family, members in (("adaptive", [r for r in ok if r["config"]["sampler"] in ("confidence", "entropy_bound")]),
                            ("fixed_grid", [r for r in ok if r["config"]["sampler"] in ("ancestral", "greedy_tail")])):
        best = min(members, key=lambda r: r["calls_per_sequence"], default=None)
        result[family] = None if best is None else {
            "label": best["label"], "calls_per_sequence": best["calls_per_sequence"],
            "ratio": round(128 / best["calls_per_sequence"], 2)}
    return result


def summarize(results: dict) -> None:
    """Each model's merit; the DCD student is held to its teacher's (Duo's) ancestral sampling at 128 steps."""
    for name, entry in results["models"].items():
        owner = "duo" if name == "dcd" else name
        ref = next((r for r in results["models"].get(owner, {}).get("rows", []) if r["config"] == REFERENCE), None)
        entry["merit"] = None if ref is None else merit(entry["rows"], ref)
        entry.pop("partial", None)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = results["models"][name]["rows"]
        families = {}
        for r in rows:
            key = r["config"]["sampler"] + (" +revision" if r["config"].get("allow_revision") else "") + \
                (f" blocks {r['config']['block_size']}" if "block_size" in r["config"] else "")
            families.setdefault(key, []).append(r)
        for key, members in families.items():
            members = sorted(members, key=lambda r: r["calls_per_sequence"])
            ax.plot([r["calls_per_sequence"] for r in members], [r["gen_ppl"] for r in members], marker="o",
                    label=key, ls="-" if len(members) > 1 else "none")
        ref = results["models"][name]["merit"]
        ax.axhline(ref["reference_gen_ppl"], color="k", lw=0.8, ls=":", label="ancestral @128")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("network calls per sequence")
        ax.set_ylabel("gen-PPL (AR judge)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['num_samples']} samples of {results['seq']} tokens per point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/quality_240", help="quality benchmark folder (<model>/model)")
    parser.add_argument("--models", nargs="+", default=["mdlm", "duo", "sddlm"])
    parser.add_argument("--student", default=None, help="a DCD student checkpoint (added as `dcd`)")
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "adaptive_sampling.json"))
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out (same label)")
    parser.add_argument("--redo", default=None, help="with --resume: re-run the rows whose label contains this")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="only combine these result JSONs (runs split over processes) into --out and its PNG")
    args = parser.parse_args()
    if args.merge:
        merged = None
        for part in args.merge:
            data = json.loads(Path(part).read_text())
            merged = data if merged is None else {**merged, "models": {**merged["models"], **data["models"]}}
        summarize(merged)
        Path(args.out).write_text(json.dumps(merged, indent=2) + "\n")
        plot({**merged, "models": {k: v for k, v in merged["models"].items() if v["merit"]}},
             Path(args.out).with_suffix(".png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_dlm import VARIANTS

    workdir = Path(args.workdir)
    judge = AutoModelForCausalLM.from_pretrained(workdir / "ar" / "model").eval()
    judge_tokenizer = AutoTokenizer.from_pretrained(workdir / "ar" / "model")
    paths = {name: workdir / name / "model" for name in args.models}
    if args.student:
        paths["dcd"] = Path(args.student)
    results = {"num_samples": args.num_samples, "seq": args.seq, "models": {}}
    out = Path(args.out)
    previous = json.loads(out.read_text())["models"] if args.resume and out.is_file() else {}
    results["models"].update(previous)  # models not re-run this time stay in the results
    for name, path in paths.items():
        variant = json.loads((path / "config.json").read_text())["model_type"]
        model = VARIANTS[variant][1].from_pretrained(path).eval()  # this checkout's code, not the checkpoint's copy
        tokenizer = AutoTokenizer.from_pretrained(path)
        rows = []
        kept = {r["label"]: r for r in previous.get(name, {}).get("rows", [])}
        for config in configurations(variant, args.steps, args.block_size, student=name == "dcd"):
            if label(config) in kept and not (args.redo and args.redo in label(config)):
                rows.append(kept[label(config)])
                continue
            row = run_config(model, tokenizer, judge, judge_tokenizer, config, args)
            rows.append(row)
            results["models"][name] = {"rows": rows, "merit": None, "partial": True}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{name:6s} {row['label']:70s} calls/seq {row['calls_per_sequence']:7.1f}  gen-PPL "
                  f"{row['gen_ppl']:9.1f}  H {row['entropy']:.3f}  tok/s {row['tokens_per_second']:8.1f}", flush=True)
        llama = llama_tokens_per_second(judge, args)
        results["models"][name] = {"rows": rows, "llama_tokens_per_second": round(llama, 1)}
        summarize(results)
        print(f"{name}: Llama generate (KV cache) {llama:.1f} tok/s; merit "
              f"{json.dumps(results['models'][name]['merit'])}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    plot({**results, "models": {k: v for k, v in results["models"].items() if v["merit"]}}, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
