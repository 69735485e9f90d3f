"""Exact training-memory accounting for a model, a method and a batch shape.

peak = weights + gradients of trainable tensors + optimizer state + tensors saved for backward.

The saved tensors are measured, not estimated: one real forward in training mode under
`torch.autograd.graph.saved_tensors_hooks`, counting each storage once (views and tensors saved by two
operations share it) and parameters not at all (they are in `weights` already). The peak is where a training
step holds the most: at the end of the forward, with last step's gradients not yet released and the optimizer
state alive. Allocator slack and the transient buffers of single kernels are not counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class MemoryReport:
    weights_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    saved_tensor_bytes: int
    total_params: int
    trainable_params: int

    @property
    def peak_training_bytes(self) -> int:
        return self.weights_bytes + self.gradient_bytes + self.optimizer_bytes + self.saved_tensor_bytes

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "peak_training_bytes": self.peak_training_bytes}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def adamw_state_bytes(params: list[nn.Parameter]) -> int:
    """torch.optim.AdamW keeps exp_avg and exp_avg_sq like each parameter, plus a float32 step per tensor."""
    return sum(2 * _nbytes(p) + 4 for p in params)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """What an optimizer really holds (after at least one step)."""
    return sum(_nbytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def saved_tensor_bytes(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward of `batch`."""
    # Parameters and buffers are counted in weights_bytes; a saved slice of one (BERT's position ids) is not new.
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in held and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**batch)
        # Release the graph without touching any .grad.
        del out
    finally:
        model.train(was_training)
    return sum(seen.values())


def account(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> MemoryReport:
    """The training-memory figures of `model` as configured now (its requires_grad flags) under AdamW."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return MemoryReport(
        weights_bytes=sum(_nbytes(p) for p in params) + sum(_nbytes(b) for b in model.buffers()),
        gradient_bytes=sum(_nbytes(p) for p in trainable),
        optimizer_bytes=adamw_state_bytes(trainable),
        saved_tensor_bytes=saved_tensor_bytes(model, batch),
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in trainable),
    )


def profiled_peak_bytes(model: nn.Module, batch: Mapping[str, torch.Tensor], lr: float = 1e-5) -> dict[str, int]:
    """An independent check of `account`: the CPU allocator's own allocation and free events, recorded by
    `torch.profiler` (profile_memory=True), over one real training step (forward, backward, AdamW step).

    A warm-up step first creates the optimizer state, as on any step but the first. During the measured step the
    allocator's live bytes are summed event by event; the peak of that curve plus what was already allocated
    (weights, buffers, optimizer state) is the measured peak. It sees everything `account` leaves out (transient
    buffers, non-saved intermediates, the optimizer's temporaries) and sees gradients freed by zero_grad, so the two
    agree only as far as the accounting's model of a step is right.
    """
    from torch.profiler import ProfilerActivity, profile

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr)
    model.train()

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    resident = (sum(_nbytes(p) for p in model.parameters()) + sum(_nbytes(b) for b in model.buffers())
                + optimizer_state_bytes(opt))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return {"resident_bytes": resident, "step_peak_bytes": peak, "measured_peak_bytes": resident + peak}
