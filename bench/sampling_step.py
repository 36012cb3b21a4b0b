"""Cost of one denoising step against a bare forward pass of the same network, measured side by side.

    python bench/sampling_step.py [--vocab 50258 --batch 8 --seq 128 --hidden 256 --layers 4 --heads 4 --repeats 7]
    python bench/sampling_step.py --profile replaid      # operator table of one step

For each variant, one "step" is exactly what `generate` does per step (network call + filtering + the noise process
step); the "forward" is `model(...)` alone under `torch.no_grad()`. The two are timed interleaved, and the ratio of
medians is reported (absolute seconds on shared machines are noise). Results go to bench/results/sampling_step.json.
The MDLM caching sampler is also compared with plain ancestral sampling over a whole generation.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from common import build as build_model
from common import size_parser  # bench/common.py (the script's folder is on sys.path)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build(variant: str, args):
    model = build_model(variant, args).eval()
    with torch.no_grad():  # untrained zero-init heads give uniform x_hat; randomise them for realistic sampling work
        for name, p in model.named_parameters():
            if "output_layer" in name or "adaLN" in name:
                p.normal_(0, 0.02)
    return model


def make_fns(variant: str, args):
    """(forward, step): a bare network call, and one sampling step as `generate` runs it, on the same input."""
    model = build(variant, args)
    B, L = args.batch, args.seq
    gen = model.generation_config_class(num_steps=args.steps, max_new_tokens=L)
    canvas = torch.zeros(B, L, dtype=torch.long)
    given = torch.zeros(B, L, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    t, s = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.5 - 1 / args.steps, dtype=torch.float64)

    if variant == "replaid":
        z = torch.randn(B, L, model.config.embedding_dim)

        def forward():
            model(noisy_embeds=z, t=torch.full((B,), 0.5))
    else:
        ids = torch.randint(0, args.vocab - 1, (B, L))

        def forward():
            model(input_ids=ids, sigma=torch.full((B,), 0.7))

    process = model.noise_process
    start_z = process.fix(process.prior_sample(canvas.shape, g, canvas.device), canvas, given)
    if variant == "mdlm":  # a partly unmasked canvas, as in the middle of sampling
        start_z = torch.where(torch.rand(B, L, generator=g) < 0.5, start_z, ids)
    options = model._step_options(gen)

    def step():  # one iteration of `generate`'s loop, from the same input every time (no cache hit for MDLM)
        state = {"mask": None, "forward_passes": 0, "forward_sequences": 0}
        logits = model._sampling_logits(process, start_z, t, state, gen)
        z = process.step(logits, start_z, t, s, generator=g, final=False, **options)
        process.fix(z, canvas, given, s, generator=g, final=False)

    return forward, step


def bench_variant(variant: str, args) -> dict:
    forward, step = make_fns(variant, args)
    with torch.no_grad():
        forward(), step()  # warm-up
        f_times, s_times = [], []
        for _ in range(args.repeats):
            f_times.append(timed(forward))
            s_times.append(timed(step))
    f, st = statistics.median(f_times), statistics.median(s_times)
    return {
        "variant": variant,
        "forward_s": round(f, 4),
        "step_s": round(st, 4),
        "step_over_forward": round(st / f, 3),
    }


def bench_mdlm_cache(args) -> dict:
    model = build("mdlm", args)
    with torch.no_grad():
        for p in model.backbone.output_layer.parameters():
            p.normal_(0, 0.5)
        g = torch.Generator().manual_seed(0)
        out = model.generate(
            batch_size=2, max_new_tokens=min(32, args.seq), num_steps=128, generator=g, return_dict_in_generate=True
        )
    return {
        "mdlm_cache_forward_passes": out.num_forward_passes,
        "mdlm_steps": 128,
        "mdlm_cache_saving": round(1 - out.num_forward_passes / 128, 3),
    }


def profile(variant: str, args) -> None:
    """Operator table of one sampling step (everything beyond the forward is what the step adds)."""
    _, step = make_fns(variant, args)
    with torch.no_grad():
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    parser = size_parser(__doc__, repeats=7)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=["duo", "sddlm", "mdlm", "replaid"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling_step.json"))
    parser.add_argument("--profile", default=None, help="print the operator profile of one step of this variant")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.profile is not None:
        profile(args.profile, args)
        return
    rows = [bench_variant(v, args) for v in args.variants]
    cache = bench_mdlm_cache(args)
    header = f"{'variant':<8} {'forward s':>10} {'step s':>10} {'step/forward':>13}"
    lines = [header] + [
        f"{r['variant']:<8} {r['forward_s']:>10.4f} {r['step_s']:>10.4f} {r['step_over_forward']:>13.3f}" for r in rows
    ]
    print("\n".join(lines))
    print(json.dumps(cache))
    result = {"config": vars(args), "rows": rows, **cache}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
