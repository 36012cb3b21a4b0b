"""Tokens per second of generating 128 tokens: every diffusion variant at 8, 32 and 128 steps against
`LlamaForCausalLM.generate` (KV cache, sampling) of the same size, plus MDLM's caching sampler against plain
ancestral sampling (the same samples; the network runs only on the sequences that changed).

    python bench/sampling_throughput.py [--vocab 50258 --batch 8 --seq 128 --hidden 256 --layers 4 --heads 4]
    python bench/sampling_throughput.py --device cuda

Untrained models generate as fast as trained ones (the work per step does not depend on the weights), except for
MDLM's cache, whose saving depends on how often a step unmasks nothing: its row uses a randomised output layer so
that x_hat is not uniform. All runs of one step count are timed interleaved with the Llama run; medians.
Results: bench/results/sampling_throughput.{json,png}.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from common import build, size_parser  # bench/common.py (the script's folder is on sys.path)
from transformers import LlamaConfig, LlamaForCausalLM


RESULTS = Path(__file__).parent / "results"


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = size_parser(__doc__, repeats=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--variants", nargs="+", default=["duo", "mdlm", "replaid"],
                        help="sddlm samples exactly like duo (same uniform-state sampler and network)")
    parser.add_argument("--out", default=str(RESULTS / "sampling_throughput.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    B, L = args.batch, args.seq
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                         intermediate_size=4 * args.hidden, max_position_embeddings=L + 1,
                                         tie_word_embeddings=False, pad_token_id=0)).to(device).eval()
    bos = torch.ones(B, 1, dtype=torch.long, device=device)  # any id but the pad id 0
    models = {}
    for variant in args.variants:
        model = build(variant, args).to(device).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "output_layer" in name or "adaLN" in name:
                    p.normal_(0, 0.5 if variant == "mdlm" else 0.02, generator=None)
        models[variant] = model
    runs = {"ar (llama, kv cache)": lambda: llama.generate(
        bos, max_new_tokens=L, min_new_tokens=L, do_sample=True, top_k=0, use_cache=True)}
    for steps in args.steps:
        for variant, model in models.items():
            runs[f"{variant} @ {steps}"] = (lambda m=model, s=steps: m.generate(
                batch_size=B, max_new_tokens=L, num_steps=s, generator=torch.Generator(device).manual_seed(0)))
        if "mdlm" in models:
            runs[f"mdlm no-cache @ {steps}"] = (lambda m=models["mdlm"], s=steps: m.generate(
                batch_size=B, max_new_tokens=L, num_steps=s, cache_predictions=False,
                generator=torch.Generator(device).manual_seed(0)))
    times = {name: [] for name in runs}
    with torch.no_grad():
        for name, fn in runs.items():
            if "@ 8" in name or name.startswith("ar"):
                fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in runs.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    ar = statistics.median(times["ar (llama, kv cache)"])
    rows = []
    for name, values in times.items():
        seconds = statistics.median(values)
        rows.append({"run": name, "seconds": round(seconds, 3), "tokens_per_s": round(B * L / seconds, 1),
                     "over_ar_tokens_per_s": round(ar / seconds, 3)})
    calls = {}
    with torch.no_grad():
        for s in args.steps if "mdlm" in models else []:
            out = models["mdlm"].generate(batch_size=B, max_new_tokens=L, num_steps=s, return_dict_in_generate=True,
                                          generator=torch.Generator(device).manual_seed(0))
            calls[s] = {"calls": out.num_forward_passes, "sequences": out.num_forward_sequences,
                        "sequences_without_cache": s * B}
    print(f"{'run':<24} {'seconds':>8} {'tokens/s':>9} {'x AR tokens/s':>14}")
    for r in rows:
        print(f"{r['run']:<24} {r['seconds']:>8.3f} {r['tokens_per_s']:>9.1f} {r['over_ar_tokens_per_s']:>14.3f}")
    if calls:
        print("mdlm with the per-sequence cache (network calls, sequences run):", json.dumps(calls))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "rows": rows, "mdlm_cache_calls": calls}, indent=2) + "\n")
    plot(rows, args, out.with_suffix(".png"))


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_name = {r["run"]: r["tokens_per_s"] for r in rows}
    for variant in args.variants + (["mdlm no-cache"] if "mdlm" in args.variants else []):
        ax.plot(args.steps, [by_name[f"{variant} @ {s}"] for s in args.steps], marker="o", label=variant)
    ax.axhline(by_name["ar (llama, kv cache)"], color="k", ls="--", label="Llama generate (KV cache)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("denoising steps (network calls) for 128 tokens")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"generating {args.seq} tokens, batch {args.batch}, hidden {args.hidden}, V = {args.vocab}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
