"""Does a device's training fit its memory budget, how to adapt when it does not, and what a step costs in FLOPs.

DESIGN §3: before training, a client compares its peak training memory (fedfar.devices.memory: weights + gradients +
optimizer state + saved tensors, measured on a real forward of the real shape) with its budget. Over budget it
either adapts or fails the way a device would; it never crashes the run. Every candidate configuration is
accounted for real on a fresh model: no extrapolation from one shape to another.

What a step costs in FLOPs is in fedfar.devices.flops.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..methods import PREACT_STORAGE, Method, NodeSelection, parse_method
from ..methods.far import ffn_sizes, random_learners
from ..models import random_batch
from .memory import MemoryReport, account

MIB = 2**20


@dataclass(frozen=True)
class TrainingShape:
    """What one optimizer step looks like on the device."""

    batch_size: int                 # effective batch (what the optimizer sees)
    seq_len: int                    # padded length budgeted for (max_length)
    micro_batch: int                # examples per forward/backward (gradient accumulation when < batch_size)
    retention: float | None = None  # FAR retention (None for non-FAR methods)
    preact_storage: str = "bfloat16"  # FAR frozen-branch storage

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {self.batch_size} and {self.seq_len}")
        if not 1 <= self.micro_batch <= self.batch_size:
            raise ValueError(f"micro_batch must be in [1, batch_size={self.batch_size}], got {self.micro_batch}")
        if self.retention is not None and not 0.0 < self.retention <= 1.0:
            raise ValueError(f"retention must be in (0, 1] or None, got {self.retention}")
        if self.preact_storage not in PREACT_STORAGE:
            raise ValueError(f"preact_storage {self.preact_storage!r}: choose one of {PREACT_STORAGE}")

    @property
    def accumulation_steps(self) -> int:
        return math.ceil(self.batch_size / self.micro_batch)

    @classmethod
    def for_method(cls, method: str, batch_size: int, seq_len: int, micro_batch: int | None = None,
                   preact_storage: str = "bfloat16") -> "TrainingShape":
        """The unadapted shape of `method` ('far10-emb', 'full', ...): retention from the method for FAR/random."""
        return cls(batch_size, seq_len, micro_batch or batch_size, parse_method(method).retention, preact_storage)


def _method(method: str, shape: TrainingShape) -> Method:
    """The method at the shape's retention (FAR/random) with the method's own policy."""
    m = parse_method(method)
    if m.selects_rows:
        return m if shape.retention is None else replace(m, retention=shape.retention)
    if shape.retention is not None:  # silently ignoring it would report memory for a configuration nobody asked for
        raise ValueError(f"method {method!r} has no retention; give retention=None, got {shape.retention}")
    return m


def prepare_for_accounting(model: nn.Module, method: Method, seed: int = 0,
                           preact_storage: str = "bfloat16") -> None:
    """Put `model` in `method`'s training configuration for measuring memory and time. Which nodes learn does not
    change either, so node-selecting methods get learners drawn at random from `seed`: no priming."""
    learners = None
    if isinstance(method, NodeSelection):
        learners = random_learners(ffn_sizes(model), method.retention, seed)
    method.prepare(model, learners, seed=seed, preact_storage=preact_storage)


def peak_bytes(model_factory: Callable[[], nn.Module], method: str, shape: TrainingShape,
               seed: int = 0) -> MemoryReport:
    """Exact accounting of one micro-batch step of `method` at `shape`, on a fresh model.

    Saved tensors scale with the micro-batch; weights, gradients and optimizer state do not — which is why
    micro-batching is the first adaptation, and why it cannot go below weights + gradients + optimizer state.
    """
    model = model_factory()
    prepare_for_accounting(model, _method(method, shape), seed, shape.preact_storage)
    return account(model, random_batch(model, shape.micro_batch, shape.seq_len, seed))


# -------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class BudgetPlan:
    fits: bool
    shape: TrainingShape    # the shape to train with (the original if it fits as is)
    report: MemoryReport    # accounting of that shape
    steps: list[str]        # human-readable adaptations applied, in order


ADAPT_ORDER = ("micro-batch", "retention", "recompute")
PLAN_POLICIES = ("adapt", "fail")


def _next_micro_batch(batch_size: int, micro_batch: int, minimum: int) -> int | None:
    """The largest divisor of batch_size at most half of micro_batch (plain halving for powers of two).

    Equal micro-batches keep accumulation exact: the mean of per-micro-batch mean losses is the batch mean.
    """
    for m in range(micro_batch // 2, minimum - 1, -1):
        if m >= 1 and batch_size % m == 0:
            return m
    return None


def plan(model_factory: Callable[[], nn.Module], method: str, shape: TrainingShape, budget_bytes: int,
         policy: str = "adapt", min_micro_batch: int = 1, min_retention: float = 0.01, seed: int = 0) -> BudgetPlan:
    """Fit `method` at `shape` into `budget_bytes`, adapting in ADAPT_ORDER, or say that it does not fit.

    policy "fail": fits = peak <= budget, nothing adapted (the device refuses the round).
    policy "adapt", cheapest in accuracy first:
      1. micro-batch: halve (to divisors of the batch) down to min_micro_batch, with gradient accumulation. Exact:
         the optimizer sees the same effective batch and the same gradient; it costs only time (less parallelism).
      2. retention (FAR / random only): halve down to min_retention. Fewer learners means less gradient and
         optimizer state, and it trades accuracy.
      3. recompute (FAR / random only): drop the frozen branch's saved pre-activation and recompute it in
         backward: the same gradients, one more matmul per block; last because on a slow device time is scarce.
    Each stage stops at the first candidate that fits. When nothing fits: fits=False with the smallest shape tried.
    """
    if policy not in PLAN_POLICIES:
        raise ValueError(f"unknown budget policy {policy!r}: choose one of {', '.join(PLAN_POLICIES)}")
    if budget_bytes <= 0 or min_micro_batch < 1 or not 0.0 < min_retention <= 1.0:
        raise ValueError(f"need budget_bytes > 0, min_micro_batch >= 1 and min_retention in (0, 1], got "
                         f"{budget_bytes}, {min_micro_batch}, {min_retention}")
    spec = _method(method, shape)
    if spec.selects_rows and shape.retention is None:  # the plan always says which retention it accounted
        shape = replace(shape, retention=spec.retention)

    def candidate(s: TrainingShape) -> tuple[TrainingShape, MemoryReport, bool]:
        r = peak_bytes(model_factory, method, s, seed)
        return s, r, r.peak_training_bytes <= budget_bytes

    cur, report, fits = candidate(shape)
    if fits or policy == "fail":
        return BudgetPlan(fits, cur, report, [])

    steps: list[str] = []
    while not fits and (m := _next_micro_batch(cur.batch_size, cur.micro_batch, min_micro_batch)) is not None:
        cur, report, fits = candidate(replace(cur, micro_batch=m))
    if cur.micro_batch != shape.micro_batch:
        steps.append(f"micro-batch {shape.micro_batch} -> {cur.micro_batch} "
                     f"({cur.accumulation_steps} accumulation steps)")

    if spec.selects_rows:
        start = cur.retention
        while not fits and cur.retention > min_retention:
            cur, report, fits = candidate(replace(cur, retention=max(cur.retention / 2, min_retention)))
        if cur.retention != start:
            steps.append(f"retention {start:g} -> {cur.retention:g}")
        if not fits and cur.preact_storage != "recompute":
            cur, report, fits = candidate(replace(cur, preact_storage="recompute"))
            steps.append("recompute frozen pre-activations")
    return BudgetPlan(fits, cur, report, steps)


# ---------------------------------------------------------------------------------- the inference floor
class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops produce and that are still referenced, over a stretch of eager code.

    Each output storage is counted once (views and in-place results share it) and released when the last tensor
    seen on it dies. Storages that exist before (weights, inputs) are excluded. Transient buffers inside one
    kernel are not seen, as in fedfar.devices.memory.
    """

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, tensors seen on it still alive]
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in self.exclude:
                continue
            if ptr in self.live:
                self.live[ptr][1] += 1
            else:
                self.live[ptr] = [nbytes, 1]
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, ptr)
        return out


def no_grad_activation_peak(model: nn.Module, inputs: Mapping[str, Tensor]) -> int:
    """Peak bytes of live activations during one eval-mode, no-grad forward (weights and inputs excluded)."""
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *inputs.values()]}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _LiveBytes(exclude) as live:
            out = model(**inputs)
            del out
    finally:
        model.train(was_training)
    return live.peak


def _weights_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def inference_floor(model: nn.Module, seq_len: int, batch_size: int = 1) -> tuple[int, int]:
    """(inference floor, weights) in bytes for `batch_size` sequences of `seq_len` tokens on `model`."""
    batch = random_batch(model, batch_size, seq_len)
    batch.pop("labels")  # inference: no loss
    inputs = sum(t.numel() * t.element_size() for t in batch.values())
    weights = _weights_bytes(model)
    return weights + inputs + no_grad_activation_peak(model, batch), weights


def inference_floor_bytes(model_factory: Callable[[], nn.Module], seq_len: int, batch_size: int = 1) -> int:
    """Weights + inputs + the measured peak of live activations of a no-grad forward: below this a device cannot
    even run the frozen model, let alone train it."""
    return inference_floor(model_factory(), seq_len, batch_size)[0]


def _mib(n: int) -> str:
    x = n / MIB
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def check_floor(budget_bytes: int, device_name: str, floor: int, weights: int) -> None:
    """Reject at start-up a budget below the inference floor (`inference_floor`, measured once for any number
    of budgets): no adaptation can rescue it."""
    if budget_bytes < floor:
        raise ValueError(
            f"device {device_name}: memory budget {_mib(budget_bytes)} MiB is below the {_mib(floor)} MiB the "
            f"model needs even for inference (weights {_mib(weights)} MiB); give it a larger budget or a smaller model")
