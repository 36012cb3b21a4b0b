"""RePlaid: does the variance-minimising learned schedule make the per-time cross-entropy linear in t?

    python bench/replaid_schedule.py                  # 9 minutes on the project's (busy) 2-core CPU machine

RePlaid (methods.md §C.3) trains the schedule's shape on E[L_diff^2] and reports that the resulting schedule makes
CE(t) = E[-log x_theta(z_t)[x]] linear in t, while a frozen schedule gives a strongly non-linear CE(t). This script
trains the same tiny RePlaid twice on real text (WikiText-2 raw valid+test, a seeded 5% held out, the built-in
byte-level BPE tokenizer), same seed, data order and steps: once with the learned schedule (the default recipe:
adaptive batch split, variance gradient, Plaid's learning rate 1e-2 for the schedule and gamma bounds) and once with
`freeze_schedule=True` (the random monotone shape of the initialisation, gamma in [-3, 6]). On held-out blocks it then
measures, at `--num_t` evenly spaced t (self-conditioning on, as in evaluation), CE(t) and the diffusion integrand
L_diff(t) = 1/2 exp(-gamma) gamma' E||e - e_hat||^2 (whose spread over t is what the schedule minimises), and the
held-out NELBO. It prints the table, R^2 of a straight-line fit of CE against t for both runs, and the coefficient of
variation of L_diff over t, and writes bench/results/replaid_schedule.{json,png}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def r_squared(x: list[float], y: list[float]) -> float:
    """R^2 of the least-squares line y ~ a + b x."""
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    design = torch.stack([torch.ones_like(xs), xs], -1)  # (n, 2)
    coef = torch.linalg.lstsq(design, ys[:, None]).solution  # (2, 1)
    residual = ys - (design @ coef).squeeze(-1)
    return float(1 - residual.pow(2).sum() / (ys - ys.mean()).pow(2).sum())


@torch.no_grad()
def per_time_metrics(model, blocks: torch.Tensor, ts: list[float], batch_size: int, seed: int) -> list[dict]:
    """CE(t) and L_diff(t), token means over `blocks` (N, L), one shared t per row of the table."""
    model.eval()
    rows = []
    E = model.normalized_embeddings()  # (V, d_e)
    for k, t_value in enumerate(ts):
        generator = torch.Generator().manual_seed(seed + k)
        ce_sum = diff_sum = tokens = 0.0
        for start in range(0, len(blocks), batch_size):
            x = blocks[start:start + batch_size]  # (b, L)
            t = torch.full((len(x),), t_value)
            gamma, dgamma = model.noise_schedule(t)  # (b,) float64 each
            embeds = E[x]  # (b, L, d_e)
            z = model.noise_process.scheduler.add_noise(embeds, gamma, generator=generator)
            logits = model._denoise(z, t, None, self_conditioning=True)  # (b, L, V)
            log_probs = logits.float().log_softmax(-1)
            ce = -log_probs.gather(-1, x[..., None]).squeeze(-1).double()  # (b, L)
            diff = model.noise_process.scheduler.diffusion_loss(embeds, log_probs.exp() @ E, gamma, dgamma)  # (b, L)
            ce_sum += float(ce.sum())
            diff_sum += float(diff.sum())
            tokens += x.numel()
        gamma_value = float(model.noise_schedule(torch.tensor([t_value]))[0])
        rows.append({"t": t_value, "gamma": gamma_value, "ce": ce_sum / tokens, "l_diff": diff_sum / tokens})
    return rows


def main() -> None:
    from common import wikitext_parser

    from modeling_dlm import RePlaidConfig, RePlaidForDiffusionLM
    from trainers import DiffusionTrainingArguments, RePlaidTrainer
    from trainers.data import build_datasets, builtin_tokenizer
    from trainers.evaluation import evaluate_likelihood

    parser = wikitext_parser(__doc__, "replaid_schedule")
    parser.add_argument("--schedule_lr", type=float, default=1e-2, help="schedule and gamma bounds (Plaid: 1e-2)")
    parser.add_argument("--embedding_lr", type=float, default=1e-2, help="embeddings, both runs (Plaid: 1e-2)")
    parser.add_argument("--output_prior_warmup", type=int, default=100)
    parser.add_argument("--num_t", type=int, default=20)
    parser.add_argument("--work_dir", default="runs/bench-replaid-schedule")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start_all = time.perf_counter()

    tokenizer = builtin_tokenizer(args.vocab)
    train_ds, eval_ds = build_datasets(args.dataset, tokenizer, args.seq, "wrap")
    held_out = torch.tensor(eval_ds["input_ids"][: args.eval_blocks])  # (N, L)
    print(f"{len(train_ds)} training and {len(eval_ds)} held-out blocks of {args.seq} tokens "
          f"(using {len(held_out)}), vocabulary {len(tokenizer)}", flush=True)
    ts = [(k + 0.5) / args.num_t for k in range(args.num_t)]

    results = {}
    for name, frozen in (("learned", False), ("frozen", True)):
        torch.manual_seed(args.seed)
        config = RePlaidConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=args.heads, cond_dim=64, max_position_embeddings=args.seq,
                               hidden_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = RePlaidForDiffusionLM(config)
        targs = DiffusionTrainingArguments(
            output_dir=str(Path(args.work_dir) / name), max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr, warmup_steps=50, lr_scheduler_type="cosine", weight_decay=0.0,
            schedule_learning_rate=args.schedule_lr, embedding_learning_rate=args.embedding_lr,
            output_prior_warmup_steps=args.output_prior_warmup, freeze_schedule=frozen, logging_steps=100,
            report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=args.seed)
        trainer = RePlaidTrainer(model=model, args=targs, train_dataset=train_ds)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        rows = per_time_metrics(model, held_out, ts, batch_size=64, seed=args.seed + 1000)
        nelbo = evaluate_likelihood(model, [{"input_ids": r} for r in held_out.tolist()], batch_size=64,
                                    num_time_samples=4, seed=args.seed)["nelbo"]
        ces, diffs = [r["ce"] for r in rows], torch.tensor([r["l_diff"] for r in rows], dtype=torch.float64)
        g0, g1 = (float(v.detach()) for v in model.noise_schedule.endpoints())
        results[name] = {"rows": rows, "r2_ce_vs_t": r_squared(ts, ces),
                         "l_diff_cv": float(diffs.std() / diffs.mean()), "nelbo": nelbo, "gamma_0": g0,
                         "gamma_1": g1, "train_seconds": round(seconds, 1),
                         "final_reconstruction_entries": trainer.split.num_reconstruction(args.batch)}
        print(f"{name}: trained {args.steps} steps in {seconds:.0f} s, held-out NELBO {nelbo:.3f} nats/token, "
              f"gamma_0 {g0:.2f}, gamma_1 {g1:.2f}", flush=True)

    learned, frozen = results["learned"], results["frozen"]
    print(f"{'t':>6} | {'gamma':>7} {'CE':>7} {'L_diff':>7} (learned) | {'gamma':>7} {'CE':>7} {'L_diff':>7} (frozen)")
    for a, b in zip(learned["rows"], frozen["rows"]):
        print(f"{a['t']:>6.3f} | {a['gamma']:>7.3f} {a['ce']:>7.3f} {a['l_diff']:>7.3f}           | "
              f"{b['gamma']:>7.3f} {b['ce']:>7.3f} {b['l_diff']:>7.3f}")
    for name, r in results.items():
        print(f"{name:>8}: R^2 of CE(t) vs a line = {r['r2_ce_vs_t']:.4f}, CV of L_diff over t = {r['l_diff_cv']:.3f},"
              f" NELBO = {r['nelbo']:.3f}")
    verdict = "more" if learned["r2_ce_vs_t"] > frozen["r2_ce_vs_t"] else "NOT more"
    print(f"the learned schedule's CE(t) is {verdict} linear than the frozen one's (R^2 "
          f"{learned['r2_ce_vs_t']:.4f} vs {frozen['r2_ce_vs_t']:.4f}); total {time.perf_counter() - start_all:.0f} s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"config": vars(args), "results": results, "learned_more_linear": verdict == "more",
               "seconds": round(time.perf_counter() - start_all, 1)}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for name, r in results.items():
        t = [row["t"] for row in r["rows"]]
        ax[0].plot(t, [row["ce"] for row in r["rows"]], marker="o", label=f"{name} (R² {r['r2_ce_vs_t']:.3f})")
        ax[1].plot(t, [row["gamma"] for row in r["rows"]], marker="o", label=name)
        ax[2].plot(t, [row["l_diff"] for row in r["rows"]], marker="o", label=f"{name} (CV {r['l_diff_cv']:.2f})")
    for a, label in zip(ax, ("CE(t) = E[-log x_θ(z_t)[x]] (nats)", "γ(t) = log σ²/α²", "L_diff(t) (nats/token)")):
        a.set_xlabel("t")
        a.set_ylabel(label)
        a.legend()
    fig.suptitle(f"RePlaid, learned vs frozen schedule ({args.steps} steps, WikiText-2, hidden {args.hidden})")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
