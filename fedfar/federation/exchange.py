"""What crosses the wire between server and devices, and how the server merges it into the global model.

Which tensors travel is the method's answer (`Method.exchange_plan`, fedfar.methods); this module cuts them out
of a state dict, writes them back, and merges client deltas.

Both sides keep the model in the stock layout (plain `state_dict` names). A *part* is a flat dict of tensors:

  <stock name>          a whole tensor that trains under the method (attention, LayerNorm, head, FFN b2, ...)
  ffn.<i>.rows          int32 node indices of FFN block i that travel (learners)
  ffn.<i>.w1 / .b1      those rows of the block's first linear (weight, bias)
  ffn.<i>.w2            those columns of the block's second linear

Devices already hold the pretrained checkpoint and frozen weights never change, so a part is all either side
needs. The server merges client deltas *into* the global model row by row: each row is averaged over the
clients that sent it (weighted by examples), so global masks (every client sends the same rows) and local
masks (each client its own) go through the same arithmetic, and rows nobody sent stay exactly as they were.
"""
from __future__ import annotations

import torch

from ..methods import ExchangePlan
from .server_opt import ServerOptimizer


def select(state: dict[str, torch.Tensor], plan: ExchangePlan, rows: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The part of a stock state dict that travels: dense tensors whole, FFN blocks at `rows` (per block)."""
    part = {n: state[n].detach().clone() for n in plan.dense}
    if plan.sliced:
        if rows is None or len(rows) != len(plan.ffn):
            raise ValueError(f"a sliced plan needs row indices for each of its {len(plan.ffn)} FFN blocks")
        for i, ((w1, b1, w2), idx) in enumerate(zip(plan.ffn, rows)):
            idx = idx.long()
            part[f"ffn.{i}.rows"] = idx.to(torch.int32)
            part[f"ffn.{i}.w1"] = state[w1][idx].clone()
            if b1:
                part[f"ffn.{i}.b1"] = state[b1][idx].clone()
            part[f"ffn.{i}.w2"] = state[w2][:, idx].clone()
    return part


def part_rows(part: dict[str, torch.Tensor], plan: ExchangePlan) -> list[torch.Tensor] | None:
    if not plan.sliced:
        return None
    return [part[f"ffn.{i}.rows"].long() for i in range(len(plan.ffn))]


def _check_keys(part: dict[str, torch.Tensor], plan: ExchangePlan) -> None:
    expected = set(plan.dense)
    for i, (_, b1, _) in enumerate(plan.ffn):
        expected |= {f"ffn.{i}.rows", f"ffn.{i}.w1", f"ffn.{i}.w2"} | ({f"ffn.{i}.b1"} if b1 else set())
    if set(part) != expected:
        missing, extra = sorted(expected - set(part)), sorted(set(part) - expected)
        raise ValueError(f"part does not match the exchange plan: missing {missing[:5]}, unexpected {extra[:5]}")


@torch.no_grad()
def write(state: dict[str, torch.Tensor], part: dict[str, torch.Tensor], plan: ExchangePlan) -> None:
    """Copy a part into a stock state dict (or a model's live state_dict) in place."""
    _check_keys(part, plan)
    for n in plan.dense:
        state[n].copy_(part[n])
    for i, (w1, b1, w2) in enumerate(plan.ffn):
        idx = part[f"ffn.{i}.rows"].long()
        state[w1][idx] = part[f"ffn.{i}.w1"].to(state[w1].dtype)
        if b1:
            state[b1][idx] = part[f"ffn.{i}.b1"].to(state[b1].dtype)
        state[w2][:, idx] = part[f"ffn.{i}.w2"].to(state[w2].dtype)


AGGREGATORS = ("mean", "median", "trimmed-mean")


def check_delta(part: dict[str, torch.Tensor], plan: ExchangePlan, state: dict[str, torch.Tensor],
                allowed_rows: list[torch.Tensor] | None = None, max_norm: float = 0.0) -> None:
    """Raise ValueError naming what is wrong with a client's delta, before anything is merged.

    Keys as the plan says; floating values, finite, of exactly the global tensor's shape; FFN row indices integer,
    1-D, unique, in range and (global mask) within `allowed_rows`; the whole update's L2 norm at most `max_norm`
    (0 = no bound)."""
    _check_keys(part, plan)
    expected: dict[str, tuple[int, ...]] = {n: tuple(state[n].shape) for n in plan.dense}
    for i, (w1, b1, w2) in enumerate(plan.ffn):
        rows = part[f"ffn.{i}.rows"]
        if rows.dtype not in (torch.int32, torch.int64) or rows.dim() != 1:
            raise ValueError(f"ffn.{i}.rows must be a 1-D integer tensor, got {rows.dtype} {tuple(rows.shape)}")
        d_ff = state[w1].shape[0]
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= d_ff):
            raise ValueError(f"ffn.{i}.rows outside [0, {d_ff}): min {int(rows.min())}, max {int(rows.max())}")
        if rows.unique().numel() != rows.numel():
            raise ValueError(f"ffn.{i}.rows has repeated indices")
        if allowed_rows is not None and not torch.isin(rows.long(), allowed_rows[i].long()).all():
            raise ValueError(f"ffn.{i}.rows has indices outside the server's learner mask")
        k = rows.numel()
        expected[f"ffn.{i}.w1"] = (k, *state[w1].shape[1:])
        expected[f"ffn.{i}.w2"] = (state[w2].shape[0], k)
        if b1:
            expected[f"ffn.{i}.b1"] = (k,)
    squares = 0.0
    for name, shape in expected.items():
        t = part[name]
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected floating values, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: non-finite values (NaN or Inf)")
        squares += float(t.double().pow(2).sum())
    if max_norm > 0 and squares ** 0.5 > max_norm:
        raise ValueError(f"update norm {squares ** 0.5:.4g} exceeds the bound max-update-norm = {max_norm:g}")


def _robust(values: torch.Tensor, how: str, trim: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-wise median or trimmed mean over dim 0, among the entries that are not NaN (NaN = that client
    did not send this coordinate). Returns (statistic, sent) where `sent` marks coordinates anyone sent."""
    k = (~values.isnan()).sum(0)
    ordered = values.sort(dim=0).values  # NaN sorts last: the first k entries are the values sent
    sent = k > 0
    if how == "median":
        lo = ((k - 1).clamp_min(0) // 2).unsqueeze(0)
        hi = (k // 2).clamp_max(values.shape[0] - 1).unsqueeze(0)
        stat = (ordered.gather(0, lo) + ordered.gather(0, hi)).squeeze(0) / 2
    else:  # trimmed mean: drop floor(trim * k) values at each end
        cut = (trim * k).floor().long()
        pos = torch.arange(values.shape[0]).view(-1, *([1] * (values.dim() - 1)))
        keep = (pos >= cut) & (pos < k - cut)
        stat = torch.where(keep, ordered.nan_to_num(0.0), 0.0).sum(0) / (k - 2 * cut).clamp_min(1)
    return stat, sent


@torch.no_grad()
def merge_deltas(
    state: dict[str, torch.Tensor],
    deltas: list[tuple[dict[str, torch.Tensor], float]],
    plan: ExchangePlan,
    server_lr: float = 1.0,
    aggregator: str = "mean",
    trim: float = 0.1,
    optimizer: ServerOptimizer | None = None,
) -> dict[str, int]:
    """Aggregate client deltas into a pseudo-gradient and add the server optimizer's step to the global state, in
    place (`optimizer`: fedfar.federation.server_opt; default plain FedAvg at `server_lr`).

    `mean` (FedAvg on what was sent): dense tensors weighted by examples over all replies, FFN rows over the
    replies that sent that row. `median` / `trimmed-mean` (drop `trim` of the values at each end): the same
    coordinate-wise, unweighted, each row over the replies that sent it (as Flower's FedMedian and FedTrimmedAvg,
    but on masked rows). Rows no reply sent are untouched. Validate replies with `check_delta` first: the merge
    computes every update before it writes any, so the state is changed all at once or not at all.
    Returns per-block counts of rows updated (for the run log).
    """
    if aggregator not in AGGREGATORS:
        raise ValueError(f"aggregator {aggregator!r}: choose one of {', '.join(AGGREGATORS)}")
    if not deltas:
        return {}
    for part, _ in deltas:
        _check_keys(part, plan)
    optimizer = optimizer or ServerOptimizer("fedavg", lr=server_lr)
    if aggregator != "mean":
        updates, touched = _aggregate_robust(state, [p for p, _ in deltas], plan, aggregator, trim)
    else:
        updates, touched = _aggregate_mean(state, deltas, plan)
    steps = [(name, index, optimizer.step(name, state[name], index, delta)) for name, index, delta in updates]
    for name, index, step in steps:  # every step computed before any is written: all at once or not at all
        state[name][index] += step  # only coordinates someone sent: the rest stay bit-identical
    return touched


def _aggregate_mean(state: dict[str, torch.Tensor], deltas: list[tuple[dict[str, torch.Tensor], float]],
                    plan: ExchangePlan) -> tuple[list[tuple[str, object, torch.Tensor]], dict[str, int]]:
    """FedAvg's weighted mean: (name, index, aggregate at index) per tensor, and rows updated per block."""
    updates: list[tuple[str, object, torch.Tensor]] = []
    total = sum(w for _, w in deltas)
    for n in plan.dense:
        updates.append((n, ..., sum(w * part[n].to(state[n].dtype) for part, w in deltas) / total))
    touched = {}
    for i, (w1, b1, w2) in enumerate(plan.ffn):
        d_ff = state[w1].shape[0]
        weight = torch.zeros(d_ff, dtype=torch.float64)
        acc_w1 = torch.zeros_like(state[w1], dtype=torch.float64)
        acc_b1 = torch.zeros(d_ff, dtype=torch.float64)
        acc_w2 = torch.zeros_like(state[w2], dtype=torch.float64)
        for part, w in deltas:
            idx = part[f"ffn.{i}.rows"].long()
            weight[idx] += w
            acc_w1[idx] += w * part[f"ffn.{i}.w1"].double()
            if b1:
                acc_b1[idx] += w * part[f"ffn.{i}.b1"].double()
            acc_w2[:, idx] += w * part[f"ffn.{i}.w2"].double()
        sent = weight > 0
        scale = torch.where(sent, 1.0 / weight.clamp_min(1e-300), torch.zeros_like(weight))
        updates.append((w1, sent, (acc_w1[sent] * scale[sent, None]).to(state[w1].dtype)))
        if b1:
            updates.append((b1, sent, (acc_b1[sent] * scale[sent]).to(state[b1].dtype)))
        updates.append((w2, (slice(None), sent), (acc_w2[:, sent] * scale[None, sent]).to(state[w2].dtype)))
        touched[i] = int(sent.sum())
    return updates, touched


def _aggregate_robust(state: dict[str, torch.Tensor], parts: list[dict[str, torch.Tensor]], plan: ExchangePlan,
                      how: str, trim: float) -> tuple[list[tuple[str, object, torch.Tensor]], dict[str, int]]:
    """Median / trimmed mean: each client's rows go into a NaN-filled stack (NaN = not sent), then `_robust`."""
    updates: list[tuple[str, object, torch.Tensor]] = []
    for n in plan.dense:
        stat, sent = _robust(torch.stack([p[n].to(state[n].dtype) for p in parts]), how, trim)
        updates.append((n, sent, stat[sent]))
    touched = {}
    for i, (w1, b1, w2) in enumerate(plan.ffn):
        rows_sent = torch.zeros(state[w1].shape[0], dtype=torch.bool)
        stacks = {name: torch.full((len(parts), *state[name].shape), float("nan"), dtype=state[name].dtype)
                  for name in (w1, b1, w2) if name}
        for c, part in enumerate(parts):
            idx = part[f"ffn.{i}.rows"].long()
            rows_sent[idx] = True
            stacks[w1][c, idx] = part[f"ffn.{i}.w1"].to(state[w1].dtype)
            stacks[w2][c][:, idx] = part[f"ffn.{i}.w2"].to(state[w2].dtype)
            if b1:
                stacks[b1][c, idx] = part[f"ffn.{i}.b1"].to(state[b1].dtype)
        for name, stack in stacks.items():
            stat, sent = _robust(stack, how, trim)
            updates.append((name, sent, stat[sent]))
        touched[i] = int(rows_sent.sum())
    return updates, touched
