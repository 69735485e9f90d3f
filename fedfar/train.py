"""The local training and evaluation loops, one for every method (fedfar.methods); FAR primes, then reconfigures.

Plain torch, no Flower: the central `fedfar finetune` command and every federated client run these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .methods import Method
from .methods.far import ffn_weights, node_scores, select_learners


@dataclass
class TrainConfig:
    lr: float = 5e-5
    warmup_share: float = 0.06
    weight_decay: float = 0.0
    priming_share: float = 0.01  # of all local steps, as in every experiment of the paper
    preact_storage: str = "bfloat16"
    max_grad_norm: float = 1.0
    seed: int = 0
    micro_batch: int = 0  # examples per forward/backward, with gradient accumulation; 0 = the whole batch


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to zero (the Hugging Face default)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def carry_optimizer_state(
    old: torch.optim.Optimizer, new: torch.optim.Optimizer, origin: dict[nn.Parameter, tuple[nn.Parameter, tuple]]
) -> None:
    """Move AdamW moments into the optimizer rebuilt after reconfiguring.

    Parameters that survived as objects keep their state; learner tensors cut from a primed tensor take the
    matching rows/columns of its moments, so the learners do not restart their moment estimates.
    """
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]
            elif p in origin and origin[p][0] in old.state:
                src, index = origin[p]
                st = old.state[src]
                new.state[p] = {k: (v[index].clone() if torch.is_tensor(v) and v.dim() else v.clone())
                                for k, v in st.items()}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train(
    model: nn.Module,
    loader,
    method: Method,
    epochs: float,
    cfg: TrainConfig,
    learners: list[torch.Tensor] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> dict:
    """Fine-tune `model` in place with `method`; returns {"learners", "steps", "priming_steps", "losses"}.

    FAR: if `learners` is given (e.g. a mask sent by a federated server) they are used and no priming runs;
    otherwise the first `priming_share` of the steps train all FFN nodes (and whatever else the policy trains),
    nodes are scored, and the model is reconfigured. The optimizer is then rebuilt over the new tensors with the
    learners' moments carried across, and the learning-rate schedule goes on where it was (restarting it leaves
    CoLA predicting one class).
    """
    device = next(model.parameters()).device
    steps_per_epoch = len(loader)
    # rounded first: a step count passed as a fraction of an epoch (21 / 19 * 19 = 21.000000000000004) is exact
    total = max(1, math.ceil(round(epochs * steps_per_epoch, 6)))
    warmup = round(cfg.warmup_share * total)
    priming = 0
    if method.primes and learners is None:
        # Priming trains every FFN node and what the policy trains: a part the policy freezes stays frozen for
        # the whole run, so priming never needs more memory than the policy allows elsewhere.
        method.priming_method().prepare(model)
        priming = max(1, round(cfg.priming_share * total))
        before = ffn_weights(model)
    else:
        if method.selects_rows and learners is None:  # random selection draws its learners from the seed
            learners = method.initial_learners(model, cfg.seed)
        method.prepare(model, learners, seed=cfg.seed, preact_storage=cfg.preact_storage)
    opt = make_optimizer(model, cfg)
    model.train()
    losses: list[float] = []
    step = 0
    epoch = 0
    while step < total:
        for batch in loader:
            if step == priming and priming and learners is None:
                learners = select_learners(node_scores(before, ffn_weights(model)), method.retention)
                origin = method.prepare(model, learners, preact_storage=cfg.preact_storage)
                new_opt = make_optimizer(model, cfg)
                carry_optimizer_state(opt, new_opt, origin)
                opt, before = new_opt, None
            for g in opt.param_groups:
                g["lr"] = cfg.lr * linear_schedule(step, total, warmup)
            loss = _forward_backward(model, _to_device(batch, device), cfg.micro_batch)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss)
            if on_step:
                on_step(step, losses[-1])
            step += 1
            if step >= total:
                break
        epoch += 1
        if on_epoch:
            on_epoch(epoch)
    return {"learners": learners, "steps": total, "priming_steps": priming, "losses": losses}


def _forward_backward(model: nn.Module, batch: dict, micro_batch: int) -> float:
    """Loss of `batch` and its gradient, in micro-batches when `micro_batch` is smaller than the batch.

    Each micro-batch's mean loss is weighted by its share of the batch, so the accumulated gradient is the
    gradient of the batch's mean loss (what one big step computes), up to float rounding. Only one micro-batch's
    activations are alive at a time: that is the memory saving a device over budget buys with time.
    """
    n = len(batch["labels"])
    if not micro_batch or micro_batch >= n:
        loss = model(**batch).loss
        loss.backward()
        return loss.item()
    total = 0.0
    for start in range(0, n, micro_batch):
        part = {k: v[start:start + micro_batch] for k, v in batch.items()}
        loss = model(**part).loss * (len(part["labels"]) / n)
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def predict(model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) over a loader, in eval mode."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = _to_device(batch, device)
        labels.append(batch.pop("labels").cpu().numpy())
        logits.append(model(**batch).logits.float().cpu().numpy())
    model.train(was)
    return np.concatenate(logits), np.concatenate(labels)
