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


@torch.no_grad()
def merge_deltas(
    state: dict[str, torch.Tensor],
    deltas: list[tuple[dict[str, torch.Tensor], float]],
    plan: ExchangePlan,
    server_lr: float = 1.0,
) -> dict[str, int]:
    """Add the weighted mean of client deltas to the global state in place (FedAvg on what was sent).

    Dense tensors: mean over all replies. FFN rows: mean over the replies that sent that row; rows no reply
    sent are untouched. Returns per-block counts of rows updated (for the run log).
    """
    if not deltas:
        return {}
    for part, _ in deltas:
        _check_keys(part, plan)
    total = sum(w for _, w in deltas)
    for n in plan.dense:
        state[n] += server_lr * sum(w * part[n].to(state[n].dtype) for part, w in deltas) / total
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
        scale = torch.where(sent, server_lr / weight.clamp_min(1e-300), torch.zeros_like(weight))
        state[w1][sent] += (acc_w1[sent] * scale[sent, None]).to(state[w1].dtype)
        if b1:
            state[b1][sent] += (acc_b1[sent] * scale[sent]).to(state[b1].dtype)
        state[w2][:, sent] += (acc_w2[:, sent] * scale[None, sent]).to(state[w2].dtype)
        touched[i] = int(sent.sum())
    return touched
