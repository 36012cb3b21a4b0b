"""Counting host syncs: the places where Python waits for a tensor's value.

On CUDA, `torch.cuda.set_sync_debug_mode("error")` catches device-to-host synchronisations. A CPU has none, but the
same places in the code can be found: a host sync happens exactly where Python reads a tensor's *value* (`bool(t)`,
`float(t)`, `t.item()`, `t.tolist()`, `t.numpy()`) or asks for a shape that depends on values (`nonzero`, boolean-mask
indexing and assignment, `unique`, `masked_select`, `repeat_interleave` without `output_size`). `HostSyncCounter` is a
`TorchFunctionMode` that records each such call with the line of dlm code that made it, so a test on CPU proves what
`set_sync_debug_mode` would prove on a GPU. Ops that run inside the optimizer kernels or in C++ (where a CUDA sync
could also hide) are out of its sight; `bench/gpu_check.py` runs the CUDA check as well.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode


_VALUE_READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "nonzero", "unique",
                "masked_select", "argwhere", "unique_consecutive", "_local_scalar_dense"}


_HOST = threading.local()


@contextlib.contextmanager
def host_side():
    """Marks code that reads values of tensors it built on the host (e.g. a data collator): not a device sync, so
    `HostSyncCounter` does not count it."""
    _HOST.depth = getattr(_HOST, "depth", 0) + 1
    try:
        yield
    finally:
        _HOST.depth -= 1


@dataclass
class HostSync:
    op: str
    where: str  # "file:line in function" of the innermost frame outside torch


@dataclass
class HostSyncCounter(TorchFunctionMode):
    """`with HostSyncCounter() as syncs: ...` then `syncs.events` lists every value read (see the module docstring).
    `enabled` can be toggled inside the block (e.g. from Trainer callbacks) to count only a part of it."""

    events: list[HostSync] = field(default_factory=list)
    enabled: bool = True

    def __post_init__(self):
        super().__init__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled and not getattr(_HOST, "depth", 0):
            name = getattr(func, "__name__", "")
            if name in _VALUE_READS or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                        and len(args) > 1 and isinstance(args[1], torch.Tensor)) or (
                    name in ("__getitem__", "__setitem__") and _has_bool_index(args[1] if len(args) > 1 else None)):
                self.events.append(HostSync(name, _caller()))
        return func(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.events)


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-1]):
        if "/torch/" not in frame.filename and "profiling.py" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "?"
