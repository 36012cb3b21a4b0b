"""The prepared GPU check (issue 19): one command, at most 8 minutes on one GPU, one JSON and one PNG.

    python bench/gpu_check.py                          # on a GPU: the papers' `small` size, bf16
    python bench/gpu_check.py --device cpu --tiny      # the same code at a toy size (run by tests/test_bench.py)

At the `small` size of the papers (768 x 12, V = 50258, L = 1024, batch 8), in bf16 autocast, it measures
1. the training step (`compute_loss` + backward, through each trainer) of SDDLM, Duo, MDLM and RePlaid against an
   equal-size `LlamaForCausalLM` and a bare forward+backward of the DiT: time over Llama, tokens/s and MFU (model
   FLOPs utilisation: 6 N + 12 layers L d FLOPs per token over the GPU's bf16 peak), eager and `torch.compile`d
   (`--compile_cases`), and the peak memory of each step;
2. host syncs in the step: under `torch.cuda.set_sync_debug_mode("error")` on CUDA (any synchronising call fails the
   step), `trainers.profiling.HostSyncCounter` elsewhere;
3. sampling tokens/s at 8, 32 and 128 steps against Llama `generate` with its KV cache (same batch and length), and
   Duo at 32 steps with the compiled sampling step (`torch_compile=True`);
4. `--train_seconds` (default 120) of Trainer training of the `small` Duo preset (vocabulary of the built-in BPE)
   on the built-in corpus, with the sync debug mode on between logging steps: the loss must fall.
5. which fused SDPA kernels (flash, memory-efficient) the DiT's attention reaches, unpadded and padded.
Results: `--out` (JSON; every setting, the device, torch version) and the same path with `.png`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from train_step import make_steps  # bench/train_step.py (the script's folder is on sys.path)
from transformers import TrainerCallback

from modeling_dlm.scheduling_absorbing import AbsorbingStateScheduler
from trainers.profiling import HostSyncCounter


RESULTS = Path(__file__).parent / "results"
VARIANT_CASES = {"sddlm": "sddlm", "duo": "duo (elbo)", "mdlm": "mdlm", "replaid": "replaid"}
SYNC_FREE = ("sddlm", "duo", "mdlm", "replaid")  # the steps checked for host syncs
SAMPLING_STEPS = (8, 32, 128)
#: dense bf16 peak FLOP/s by device name (MFU is left out for other devices)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def sizes(args) -> argparse.Namespace:
    if args.tiny:
        size = dict(vocab=256, batch=4, seq=32, hidden=32, layers=2, heads=4, repeats=2)
    else:
        size = dict(vocab=50258, batch=8, seq=1024, hidden=768, layers=12, heads=12, repeats=10)
    return argparse.Namespace(**size, device=args.device, compile=False, cases=None)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _autocast(device):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def peak_flops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def flops_per_token(size) -> float:
    """6 N (N: the matmul parameters of the blocks and the output head) + 12 layers L d (attention scores)."""
    d, n_layers, V, L = size.hidden, size.layers, size.vocab, size.seq
    blocks = n_layers * 12 * d * d
    return 6 * (blocks + d * V) + 12 * n_layers * L * d


def _timed(fn, device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _peak_mib(fn, device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    _sync(device)
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


def sync_check(fn, device) -> dict:
    """Run one (warmed-up) step while counting host syncs: CUDA's sync debug mode, else HostSyncCounter."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            _sync(device)
            return {"sync_free": True, "how": "cuda sync_debug_mode=error"}
        except RuntimeError as err:
            return {"sync_free": False, "how": "cuda sync_debug_mode=error", "error": str(err)[:300]}
        finally:
            torch.cuda.set_sync_debug_mode("default")
    previous = AbsorbingStateScheduler.row_selection
    AbsorbingStateScheduler.row_selection = "fixed"  # MDLM's accelerator path (the CPU's "auto" selects rows)
    try:
        with HostSyncCounter() as counter:
            fn()
    finally:
        AbsorbingStateScheduler.row_selection = previous
    return {"sync_free": len(counter) == 0, "how": "HostSyncCounter",
            "events": [f"{e.op} at {e.where}" for e in counter.events[:5]]}


def train_steps(args, size) -> list[dict]:
    names = ["ar (llama)", "bare dit", *VARIANT_CASES.values()]
    eager = make_steps(size, names)
    compiled_size = argparse.Namespace(**{**vars(size), "compile": True})
    wanted = ["ar (llama)", *(VARIANT_CASES[v] for v in args.compile_cases)]
    compiled = {k: v for k, v in make_steps(compiled_size, wanted).items() if k.endswith(" (compiled)")}
    tokens, peak = size.batch * size.seq, peak_flops(args.device)
    rows = []
    for name, fn in {**eager, **compiled}.items():
        step = functools.partial(_with_autocast, fn, args.device)
        start = time.perf_counter()
        step()  # warm-up (the compilation, for a compiled step)
        _sync(args.device)
        warmup = time.perf_counter() - start
        seconds = statistics.median(_timed(step, args.device, size.repeats))
        row = {"step": name, "seconds": round(seconds, 5), "tokens_per_s": round(tokens / seconds, 1),
               "warmup_s": round(warmup, 2), "peak_mib": _peak_mib(step, args.device)}
        if peak is not None:
            row["mfu"] = round(flops_per_token(size) * tokens / seconds / peak, 4)
        base = name.removesuffix(" (compiled)")
        if base in (VARIANT_CASES[v] for v in SYNC_FREE):
            row["syncs"] = sync_check(step, args.device)
        rows.append(row)
    llama = {r["step"]: r["seconds"] for r in rows if r["step"].startswith("ar (llama)")}
    for row in rows:
        reference = llama["ar (llama) (compiled)"] if row["step"].endswith("(compiled)") else llama["ar (llama)"]
        row["over_llama"] = round(row["seconds"] / reference, 3)
    return rows


def _with_autocast(fn, device) -> None:
    with _autocast(device):
        fn()


def sampling(args, size) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.checkpoints import build_model

    device, B, L = torch.device(args.device), size.batch, size.seq
    rows = []
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
                                         num_attention_heads=size.heads, intermediate_size=4 * size.hidden,
                                         max_position_embeddings=L, tie_word_embeddings=False,
                                         bos_token_id=0, eos_token_id=None, pad_token_id=0)).to(device).eval()
    prompt = torch.zeros(B, 1, dtype=torch.long, device=device)

    def llama_generate():
        with torch.no_grad(), _autocast(device):
            llama.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=L - 1,
                           min_new_tokens=L - 1, do_sample=True, use_cache=True)

    llama_generate()  # warm-up
    seconds = min(_timed(llama_generate, device, 2))
    rows.append({"model": "ar (llama, kv cache)", "steps": L - 1, "tokens_per_s": round(B * (L - 1) / seconds, 1)})
    llama.to("meta")  # free its memory before the diffusion models
    for variant in VARIANT_CASES:
        kwargs = dict(vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
                      num_attention_heads=size.heads, cond_dim=128, max_position_embeddings=L,
                      hidden_dropout_prob=0.0)
        if variant == "replaid":
            kwargs["schedule_hidden_size"] = 1024
        model = build_model(variant, seed=0, **kwargs).to(device).eval()
        settings = [(steps, False) for steps in SAMPLING_STEPS]
        if variant == "duo" and args.compile_cases:
            settings.append((32, True))
        for steps, compiled in settings:
            def generate(steps=steps, compiled=compiled, model=model):
                with _autocast(device):
                    model.generate(batch_size=B, max_new_tokens=L, num_steps=steps, torch_compile=compiled,
                                   generator=torch.Generator(device=device).manual_seed(0))

            generate()  # warm-up (compilation)
            seconds = min(_timed(generate, device, 2))
            rows.append({"model": variant + (" (compiled)" if compiled else ""), "steps": steps,
                         "tokens_per_s": round(B * L / seconds, 1),
                         "over_llama": round(B * L / seconds / rows[0]["tokens_per_s"], 3)})
        model.to("meta")
    return rows


def attention_kernels(args, size) -> list[dict]:
    """Which fused SDPA kernels the DiT's attention reaches: a forward restricted to one backend at a time
    (`torch.nn.attention.sdpa_kernel`) fails when the call cannot use it. Unpadded batches (no mask) should reach
    flash and memory-efficient attention; a padded batch (a boolean mask) the memory-efficient kernel on CUDA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from trainers.checkpoints import build_model

    device, B, L = torch.device(args.device), size.batch, size.seq
    model = build_model("duo", seed=0, vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
                        num_attention_heads=size.heads, cond_dim=128, max_position_embeddings=L,
                        hidden_dropout_prob=0.0).to(device).eval()
    ids = torch.randint(0, size.vocab - 1, (B, L), generator=torch.Generator().manual_seed(0)).to(device)
    padded = torch.ones_like(ids)
    padded[0, L // 2:] = 0
    sigma = torch.ones(B, device=device)
    cases = [("flash", SDPBackend.FLASH_ATTENTION, None), ("efficient", SDPBackend.EFFICIENT_ATTENTION, None),
             ("efficient", SDPBackend.EFFICIENT_ATTENTION, padded)]
    rows = []
    for name, backend, mask in cases:
        row = {"kernel": name, "batch": "unpadded" if mask is None else "padded"}
        try:
            with torch.no_grad(), _autocast(device), sdpa_kernel(backend):
                model(input_ids=ids, sigma=sigma, attention_mask=mask)
            _sync(device)
            row["reached"] = True
        except RuntimeError as err:
            row.update(reached=False, error=str(err).splitlines()[0][:200])
        rows.append(row)
    model.to("meta")
    return rows


class SyncWindow(TrainerCallback):
    """CUDA's sync debug mode "warn" on between two non-logging steps (from step 2 on); `windows` counts them."""

    def __init__(self, logging_steps: int):
        self.logging_steps, self.windows = logging_steps, 0

    def on_step_end(self, args, state, control, **kwargs):
        quiet = state.global_step >= 2 and state.global_step % self.logging_steps != 0
        torch.cuda.set_sync_debug_mode("warn" if quiet else "default")
        self.windows += quiet

    def on_train_end(self, args, state, control, **kwargs):
        torch.cuda.set_sync_debug_mode("default")


def training(args, size) -> dict:
    from trainers import DiffusionTrainingArguments, DuoTrainer
    from trainers.checkpoints import build_model
    from trainers.data import build_datasets, builtin_tokenizer

    tokenizer = builtin_tokenizer()
    train, _ = build_datasets("builtin", tokenizer, seq_len=size.seq)
    kwargs = dict(hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                  cond_dim=128, max_position_embeddings=size.seq)
    if not args.tiny:  # the `small` preset's architecture, the built-in tokenizer's vocabulary
        preset = json.loads((Path(__file__).resolve().parents[1] / "hub_configs" / "duo-small.json").read_text())
        kwargs = {k: v for k, v in preset.items() if k not in ("model_type", "vocab_size")}
    model = build_model("duo", tokenizer=tokenizer, seed=0, **kwargs)
    cuda = torch.device(args.device).type == "cuda"
    logging_steps = 10

    class Deadline(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if time.perf_counter() - self.start > args.train_seconds:
                control.should_training_stop = True

    targs = DiffusionTrainingArguments(
        output_dir=str(Path(args.out).with_suffix("")) + "-train", max_steps=100_000, learning_rate=1e-3,
        warmup_steps=20, per_device_train_batch_size=size.batch, logging_steps=logging_steps, save_strategy="no",
        report_to=[], disable_tqdm=True, bf16=True, use_cpu=not cuda, seed=0, dataloader_num_workers=2 if cuda else 0)
    window = SyncWindow(logging_steps) if cuda else None
    callbacks = [Deadline()] + ([window] if window else [])
    trainer = DuoTrainer(model=model, args=targs, train_dataset=train, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    syncs = sum("synchroniz" in str(w.message) for w in caught) if cuda else None
    return {"steps": trainer.state.global_step, "seconds": round(seconds, 1), "losses": losses,
            "loss_first": round(first, 4), "loss_last": round(last, 4), "loss_fell": last < first,
            "vocab_size": model.config.vocab_size, "sync_warnings_between_logging_steps": syncs,
            "sync_checked_windows": window.windows if window else None}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    rows = report["train_step"]
    names = [r["step"] for r in rows]
    axes[0].barh(names, [r["over_llama"] for r in rows], color=["C1" if "compiled" in n else "C0" for n in names])
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xlabel("training step time / Llama's (eager vs eager, compiled vs compiled)")
    for model in dict.fromkeys(r["model"] for r in report["sampling"]):
        points = [(r["steps"], r["tokens_per_s"]) for r in report["sampling"] if r["model"] == model]
        if model.startswith("ar"):
            axes[1].axhline(points[0][1], color="k", ls="--", label=model)
        else:
            axes[1].plot(*zip(*points), marker="o", label=model)
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("sampling steps")
    axes[1].set_ylabel("tokens / s")
    axes[1].legend(fontsize=8)
    axes[2].plot([10 * (i + 1) for i in range(len(report["training"]["losses"]))], report["training"]["losses"])
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("training loss (Duo)")
    fig.suptitle(f"dlm GPU check: {report['device_name']}, {report['size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a toy size (for the test suite)")
    parser.add_argument("--train_seconds", type=float, default=120.0)
    parser.add_argument("--budget_seconds", type=float, default=480.0,
                        help="the whole check's time limit: the training section is shortened to end within it")
    parser.add_argument("--compile_cases", nargs="*", default=list(VARIANT_CASES), choices=list(VARIANT_CASES),
                        help="variants whose steps are also timed compiled (Llama always is when any is)")
    parser.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    args = parser.parse_args()
    size = sizes(args)
    start = time.perf_counter()
    cuda = torch.device(args.device).type == "cuda"
    report = {"date": time.strftime("%Y-%m-%d"), "device": args.device,
              "device_name": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "size": "tiny" if args.tiny else "small (768 x 12, V 50258, L 1024)",
              "settings": {**{k: v for k, v in vars(size).items() if k not in ("compile", "cases")},
                           "dtype": "bf16 autocast", "compile_cases": args.compile_cases,
                           "train_seconds": args.train_seconds}}
    sections = (("attention", attention_kernels), ("train_step", train_steps), ("sampling", sampling),
                ("training", training))
    for key, fn in sections:
        if key == "training":  # keep the whole check within its budget (30 s left for data, saving and the plot)
            left = args.budget_seconds - (time.perf_counter() - start) - 30
            if left < args.train_seconds:
                print(f"training shortened to {max(left, 10):.0f} s to fit --budget_seconds", file=sys.stderr)
                args.train_seconds = max(left, 10.0)
                report["settings"]["train_seconds"] = args.train_seconds
        t0 = time.perf_counter()
        report[key] = fn(args, size)
        report.setdefault("section_seconds", {})[key] = round(time.perf_counter() - t0, 1)
        print(f"{key}: {report['section_seconds'][key]} s", file=sys.stderr, flush=True)
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    for row in report["train_step"]:
        extra = f"  mfu {row['mfu']:.3f}" if "mfu" in row else ""
        syncs = row.get("syncs", {}).get("sync_free")
        print(f"{row['step']:<26} x llama {row['over_llama']:6.3f}  {row['tokens_per_s']:>10.1f} tok/s{extra}"
              + ("" if syncs is None else f"  sync-free {syncs}"))
    for row in report["attention"]:
        print(f"sdpa {row['kernel']:<10} {row['batch']:<9} reached {row['reached']}")
    for row in report["sampling"]:
        ratio = f"  x llama {row['over_llama']:.3f}" if "over_llama" in row else ""
        print(f"sampling {row['model']:<22} {row['steps']:>5} steps {row['tokens_per_s']:>10.1f} tok/s{ratio}")
    t = report["training"]
    print(f"training duo: {t['steps']} steps in {t['seconds']} s, loss {t['loss_first']} -> {t['loss_last']}")
    print(json.dumps({"out": str(out), "total_seconds": report["total_seconds"],
                      "loss_fell": t["loss_fell"]}))
    if not math.isfinite(t["loss_last"]) or not t["loss_fell"]:
        sys.exit("the Duo training loss did not fall")


if __name__ == "__main__":
    main()
