"""A 2-process CPU (gloo) training job, launched by tests/test_distributed.py with
`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_train_script.py OUT_DIR`.

Each rank trains the same tiny Duo model with `DuoTrainer` (DDP; 2 ranks x 2 accumulation micro-batches x 4
sequences = a global batch of 16), then a LoRA-wrapped copy for two more steps, and writes OUT_DIR/rank{R}.json:
the sha256 of its final weights (and adapter weights), what every micro-batch saw (its rows, its times t, its local
loss) and the trainer's log history, so the test can check what DDP and the stratified time sampling promise.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import torch  # noqa: E402

from modeling_dlm import DuoConfig, DuoForDiffusionLM  # noqa: E402
from trainers import DiffusionTrainingArguments, DuoTrainer, apply_lora  # noqa: E402


VOCAB, SEQ, ROWS = 61, 7, 64
BATCH, ACCUMULATION, STEPS = 4, 2, 3


class RecordingDuoTrainer(DuoTrainer):
    """DuoTrainer that remembers, per training micro-batch, the step, its rows, its t and its local loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []
        self._t = None

    def sample_times(self, batch_size, device, shared, micro):
        self._t = super().sample_times(batch_size, device, shared, micro)
        return self._t

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.records.append({"step": self.state.global_step + 1, "rows": inputs["input_ids"].tolist(),
                                 "t": self._t.tolist(), "loss": float(loss.detach())})
        return loss


def weights_hash(model, trainable_only: bool = False) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if trainable_only and "lora_" not in name and "modules_to_save" not in name:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def frozen_weights_unchanged(peft_model, base) -> bool:
    """Whether the frozen weights inside a LoRA-wrapped model still equal those of `base`."""
    reference = base.state_dict()
    for name, tensor in peft_model.get_base_model().state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        key = name.replace(".base_layer", "").replace(".original_module", "")
        if not torch.equal(tensor, reference[key]):
            return False
    return True


def tiny_duo(seed: int = 0) -> DuoForDiffusionLM:
    torch.manual_seed(seed)
    model = DuoForDiffusionLM(DuoConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        cond_dim=16, max_position_embeddings=16, hidden_dropout_prob=0.0))
    with torch.no_grad():  # perturb the zero-initialised layers, as a trained model would have them
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "output_layer.linear" in name:
                p.normal_(0, 0.2)
    return model


def run(trainer_args: dict, model, dataset) -> RecordingDuoTrainer:
    args = DiffusionTrainingArguments(**trainer_args)
    trainer = RecordingDuoTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return trainer


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(3))
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    common = dict(per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-2,
                  logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, ddp_backend="gloo",
                  disable_tqdm=True, seed=0, lr_scheduler_type="constant", dataloader_num_workers=0)
    model = tiny_duo()
    initial = weights_hash(model)
    full = run(dict(common, output_dir=f"{out_dir}/full", max_steps=STEPS), model, dataset)
    rank = full.args.process_index
    lora_model = apply_lora(tiny_duo(), r=4, alpha=8)
    lora_initial = weights_hash(lora_model, trainable_only=True)
    lora = run(dict(common, output_dir=f"{out_dir}/lora", max_steps=2), lora_model, dataset)
    report = {
        "rank": rank,
        "world_size": full.args.world_size,
        "initial_hash": initial,
        "final_hash": weights_hash(model),
        "records": full.records,
        "log_history": full.state.log_history,
        "lora_initial_adapter_hash": lora_initial,
        "lora_adapter_hash": weights_hash(lora_model, trainable_only=True),
        "lora_base_unchanged": frozen_weights_unchanged(lora_model, tiny_duo()),
        "lora_log_history": lora.state.log_history,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
