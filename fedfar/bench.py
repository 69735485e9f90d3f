"""`fedfar bench`: step time and training memory of fine-tuning methods on one model and batch shape, one run.

Every method gets a fresh copy of the same model and the same batch; step time is the median over repeats of
forward + backward + AdamW step + zero_grad, after warm-up steps, methods interleaved round by round. Memory
figures (fedfar.devices.memory) and the FLOPs of forward + backward (fedfar.devices.flops) are exact and need no
repeats: the FLOP ratio is the floor a method's time ratio can reach through its matmuls alone. Ratios are to
the first method (normally `full`) measured in the same run.
FAR's step time does not depend on which nodes learn, so the bench selects learners at random: no priming.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from .devices.budget import prepare_for_accounting
from .devices.flops import step_flops
from .devices.memory import account
from .methods import parse_method
from .models import load_model, random_batch


class _Stepper:
    """One method's model, batch and AdamW, ready to take training steps."""

    def __init__(self, model, batch, lr: float = 2e-5) -> None:
        self.model, self.batch = model.train(), batch
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        t0 = time.perf_counter()
        self.model(**self.batch).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if record:
            self.times.append(time.perf_counter() - t0)


def run_bench(
    model_ref: str,
    methods: list[str],
    batch_size: int = 16,
    seq_len: int = 128,
    repeats: int = 5,
    warmup: int = 2,
    num_labels: int = 2,
    preact_storage: str = "bfloat16",
    seed: int = 0,
    progress=print,
) -> list[dict]:
    """Memory per method, then step times taken round-robin: one step of each method per round, so a burst of
    load on a shared machine slows every method alike instead of whichever happened to be running."""
    parsed = [parse_method(m) for m in methods]
    steppers, rows = [], []
    for method in parsed:
        model = load_model(model_ref, num_labels, seed=seed)
        prepare_for_accounting(model, method, seed, preact_storage)
        batch = random_batch(model, batch_size, seq_len, seed)
        rows.append({"method": method.label, **account(model, batch).as_dict(), "step_flops": step_flops(model, batch)})
        steppers.append(_Stepper(model, batch))
    for i in range(warmup + repeats):
        for stepper in steppers:
            stepper.step(record=i >= warmup)
        if i >= warmup:
            progress(f"  round {i - warmup + 1}/{repeats}: " + "  ".join(
                f"{r['method']} {s.times[-1]:.2f}s" for r, s in zip(rows, steppers)))
    for row, stepper in zip(rows, steppers):
        row.update(step_time_s=statistics.median(stepper.times), step_times_s=stepper.times)
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["step_time_s"] / base["step_time_s"]
        row["memory_ratio"] = row["peak_training_bytes"] / base["peak_training_bytes"]
        row["saved_ratio"] = row["saved_tensor_bytes"] / base["saved_tensor_bytes"]
        row["flops_ratio"] = row["step_flops"] / base["step_flops"]
    return rows


def format_table(rows: list[dict]) -> str:
    mib = 2**20
    head = (f"{'method':<16}{'step s':>8}{'x time':>8}{'GFLOP':>7}{'x flops':>8}{'peak MiB':>10}{'x mem':>7}"
            f"{'weights':>9}{'grads':>8}{'optim':>8}{'saved':>8}{'x saved':>8}{'trainable':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<16}{r['step_time_s']:>8.3f}{r['time_ratio']:>8.2f}{r['step_flops'] / 1e9:>7.0f}"
            f"{r['flops_ratio']:>8.2f}{r['peak_training_bytes'] / mib:>10.1f}"
            f"{r['memory_ratio']:>7.2f}{r['weights_bytes'] / mib:>9.1f}{r['gradient_bytes'] / mib:>8.1f}"
            f"{r['optimizer_bytes'] / mib:>8.1f}{r['saved_tensor_bytes'] / mib:>8.1f}{r['saved_ratio']:>8.2f}"
            f"{r['trainable_params']:>12,}"
        )
    return "\n".join(lines)


def write_json(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=2))
