"""Shared fixtures: tiny odd-sized configs (vocab 61, hidden 32, 2 layers, 4 heads, sequence 7, batch 3) on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modeling_dlm import VARIANTS
from trainers.checkpoints import build_model, model_config


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB, HIDDEN, LAYERS, HEADS, COND, SEQ, BATCH = 61, 32, 2, 4, 16, 7, 3


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; a missing file fails the test (never a silent skip)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"shared test data missing: {path} (the repo expects ../shared/data beside it)")
    return path


def free_port() -> int:
    """A free local TCP port, for a multi-process job that must not collide with another one beside it."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_processes(script: Path, out: Path, launcher: str = "torchrun") -> list[dict]:
    """Run `script OUT` as a real 2-process CPU job (`torchrun`, or `accelerate launch --multi_gpu`) and return the
    `OUT/rank{0,1}.json` reports it writes (a failed job fails the test with its output)."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    result = subprocess.run([*command, str(script), str(out)], capture_output=True, text=True, timeout=600, env=env,
                            cwd=repo)
    if result.returncode != 0:
        pytest.fail(f"{launcher} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world_size"] == 2 for r in reports)
    return reports


def tiny_kwargs(variant: str, **overrides) -> dict:
    kwargs = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  cond_dim=COND, max_position_embeddings=16, hidden_dropout_prob=0.0)
    if variant == "replaid":
        kwargs["schedule_hidden_size"] = 8
    kwargs.update(overrides)
    return kwargs


def tiny_config(variant: str, **overrides):
    return model_config(variant, **tiny_kwargs(variant, **overrides))


def tiny_model(variant: str, seed: int = 0, randomize: bool = True, **overrides):
    """A tiny model; `randomize` perturbs the zero-initialised layers so outputs depend on inputs and time."""
    model = build_model(variant, seed=seed, **tiny_kwargs(variant, **overrides))
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or "output_layer.linear" in name or "self_cond_proj" in name:
                    p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture
def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB - 1, (BATCH, SEQ), generator=g)  # never the MDLM mask id (VOCAB - 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny tensors: one intra-op thread is faster and immune to oversubscription on a busy 2-core runner
    (restored afterwards, so other test modules are unaffected)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
