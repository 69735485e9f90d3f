"""Where local training runs, and a device's memory budget enforced for real on a CUDA GPU.

On the CPU (the default, and all this project's own machine has) a budget is enforced by the accounting in
fedfar.devices.budget: a device over budget adapts or refuses before it trains. On a CUDA GPU the same plan runs first,
and then the caching allocator of the training process is capped at the device's budget
(`torch.cuda.set_per_process_memory_fraction`): an allocation past it raises `torch.OutOfMemoryError` exactly as
on a device with that much memory, and the client reports it like a planned out-of-memory, with the allocator's
measured figures. The cap covers what the allocator hands out (weights, gradients, optimizer state, activations,
its own fragmentation), not the CUDA context, which a real device's budget would not include either.

Models live on the CPU between rounds (the worker cache holds one per worker, and a simulated GPU is shared by
several clients); a client moves its model to the GPU for its training only, and back.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

DEVICES = ("cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """The torch device a run-config `device` names; a clear error if it cannot run in this process."""
    if name not in DEVICES:
        raise ValueError(f"device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise RuntimeError(f"device 'cuda': torch {torch.__version__} ({build}) sees no CUDA GPU in this process. "
                           "Set device='cpu', or install a CUDA build of torch on a machine with a GPU (in a "
                           "simulation, also give each client a GPU share: fedfar run --gpus-per-client 0.25).")
    return torch.device(name)


def memory_fraction(budget_bytes: int, total_bytes: int) -> float:
    """The share of the GPU's memory that is `budget_bytes`, capped at 1: a budget larger than the GPU is
    limited by the GPU itself."""
    if budget_bytes <= 0 or total_bytes <= 0:
        raise ValueError(f"budget ({budget_bytes}) and GPU memory ({total_bytes}) must be positive")
    return min(1.0, budget_bytes / total_bytes)


@dataclass
class DeviceUsage:
    """What one stint of training used on its device (GPU figures only; None on the CPU)."""

    device: str
    budget_bytes: int | None = None    # the cap actually set (None: no cap)
    peak_bytes: int | None = None      # the allocator's peak of allocated bytes during the stint

    def figures(self) -> dict[str, int]:
        """For the ledger (numbers only, so they fit a MetricRecord): empty on the CPU."""
        out = {}
        if self.budget_bytes is not None:
            out["enforced-budget-bytes"] = self.budget_bytes
        if self.peak_bytes is not None:
            out["measured-peak-bytes"] = self.peak_bytes
        return out


class BudgetExceeded(RuntimeError):
    """Training ran out of GPU memory under its device's cap: the device could not have done this round."""

    def __init__(self, usage: DeviceUsage, reason: str) -> None:
        super().__init__(f"out of memory on {usage.device} (cap {usage.budget_bytes} bytes): {reason}")
        self.usage = usage


@contextmanager
def on_device(model: nn.Module, device: torch.device, budget_bytes: int | None = None) -> Iterator[DeviceUsage]:
    """Move `model` to `device` for the block, with the process's CUDA allocator capped at `budget_bytes`.

    On exit, even by an out-of-memory error, the model is back on the CPU, the cap is lifted and the cache
    emptied, so the next client in this worker starts clean; `usage.peak_bytes` holds the measured peak.
    A CUDA out-of-memory error leaves as `BudgetExceeded`. The failed step's activations are freed once the
    caller has handled it (its traceback holds them until then), and the next `on_device` empties the cache
    first. On the CPU this only records the device.
    """
    usage = DeviceUsage(str(device))
    if device.type != "cuda":
        yield usage
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.synchronize(index)
    torch.cuda.empty_cache()  # cached blocks of earlier clients would count against this one's budget
    torch.cuda.reset_peak_memory_stats(index)
    if budget_bytes is not None:
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_fraction(budget_bytes, total), index)
        usage.budget_bytes = min(budget_bytes, total)
    reason = None
    try:
        model.to(device)
        yield usage
        torch.cuda.synchronize(index)
    except torch.OutOfMemoryError as err:
        reason = str(err).splitlines()[0]
    finally:
        usage.peak_bytes = torch.cuda.max_memory_allocated(index)
        model.to("cpu")
        torch.cuda.empty_cache()
        if budget_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
    if reason is not None:
        raise BudgetExceeded(usage, reason)
