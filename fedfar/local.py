"""One device's work in a round, plain torch: prime and score, or fine-tune on a received part and return a delta.

A worker process (a Ray actor in simulation, a SuperNode's ClientApp process in deployment) serves many rounds
and, in simulation, many clients: the pretrained model and each tokenized partition are loaded once per
worker and reused (`WorkerCache`), never once per round.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Mapping

import torch

from . import exchange
from .budget import TrainingShape, count_flops
from .config import RunConfig
from .devices import DeviceProfile
from .edge import DevicePlan, client_profile, device_plan
from .gpu import on_device, resolve_device
from .data import compute_metrics, get_task, load_glue, load_partition, make_loader, tokenize
from .far import MethodSpec, ffn_sizes, num_learners, ffn_weights, merge, node_scores, random_learners, select_learners
from .models import load_model, load_tokenizer
from .train import TrainConfig, predict, train


@dataclass
class WorkerCache:
    models: dict = field(default_factory=dict)      # (model ref, num_labels, seed) -> (model, pristine state)
    tokenizers: dict = field(default_factory=dict)
    partitions: dict = field(default_factory=dict)  # (...) -> (train tokenized, eval tokenized | None)
    profiles: dict = field(default_factory=dict)    # (fleet and catalog files, node) -> DeviceProfile | None
    plans: dict = field(default_factory=dict)       # (device profile, run shape) -> DevicePlan

    def model(self, cfg: RunConfig) -> torch.nn.Module:
        """The pretrained model, reset to its pristine weights (a device holds the checkpoint)."""
        task = get_task(cfg.task)
        key = (cfg.model, task.num_labels, cfg.seed)
        if key not in self.models:
            model = load_model(cfg.model, task.num_labels, seed=cfg.seed)
            self.models[key] = (model, {k: v.clone() for k, v in model.state_dict().items()})
        model, pristine = self.models[key]
        merge(model)  # a previous round may have failed mid-way while reconfigured
        model.load_state_dict(pristine)
        return model

    def tokenizer(self, cfg: RunConfig):
        if cfg.model not in self.tokenizers:
            self.tokenizers[cfg.model] = load_tokenizer(cfg.model)
        return self.tokenizers[cfg.model]

    def partition(self, cfg: RunConfig, partition_id: int, num_partitions: int):
        key = (cfg.task, str(cfg.data_source), cfg.model, cfg.max_length, partition_id, num_partitions,
               cfg.max_train_examples, cfg.eval_share if cfg.federated_eval else 0.0,
               tuple(sorted(cfg.partition_kwargs().items())))
        if key not in self.partitions:
            task = get_task(cfg.task)
            ds = load_partition(load_glue(task, "train", cfg.data_source), partition_id, num_partitions,
                                **cfg.partition_kwargs())
            held_out = None
            if cfg.federated_eval and cfg.eval_share > 0 and len(ds) >= 10:
                split = ds.train_test_split(test_size=cfg.eval_share, seed=cfg.partition_seed)
                ds, held_out = split["train"], split["test"]
            if cfg.max_train_examples:
                ds = ds.select(range(min(cfg.max_train_examples, len(ds))))
            tok = self.tokenizer(cfg)
            self.partitions[key] = (tokenize(ds, tok, task, cfg.max_length),
                                    tokenize(held_out, tok, task, cfg.max_length) if held_out else None)
        return self.partitions[key]

    def profile(self, cfg: RunConfig, node_config: Mapping) -> DeviceProfile | None:
        """This node's simulated device (None: devices off), read from the fleet and catalog once per worker."""
        key = (cfg.fleet, cfg.device_catalog, cfg.partition_seed, tuple(sorted(node_config.items())))
        if key not in self.profiles:
            self.profiles[key] = client_profile(cfg, node_config)
        return self.profiles[key]

    def device_plan(self, cfg: RunConfig, node_config: Mapping) -> DevicePlan | None:
        """The node's device budget plan (None: devices off), accounted once per worker: it depends on the
        shape, not on the data."""
        profile = self.profile(cfg, node_config)
        if profile is None:
            return None
        key = (profile, cfg.model, cfg.method, cfg.mask_mode, cfg.batch_size, cfg.max_length, cfg.preact_storage,
               cfg.oom_policy, cfg.seed)
        if key not in self.plans:
            self.plans[key] = device_plan(cfg, self.model(cfg), profile)
        return self.plans[key]


CACHE = WorkerCache()


def train_config(cfg: RunConfig, seed: int, shape: TrainingShape | None = None) -> TrainConfig:
    """The local optimiser settings; with a device plan's shape, its micro-batch and pre-activation storage."""
    micro = shape.micro_batch if shape and shape.micro_batch < shape.batch_size else 0
    return TrainConfig(lr=cfg.lr, seed=seed, priming_share=cfg.priming_share, micro_batch=micro,
                       preact_storage=shape.preact_storage if shape else cfg.preact_storage)


def priming_steps(cfg: RunConfig, steps_per_round: int) -> int:
    """Priming length: `priming_share` of the client's local steps over the whole run, at least one."""
    return max(1, round(cfg.priming_share * steps_per_round * cfg.num_rounds))


def prime_scores(model: torch.nn.Module, loader, steps: int, cfg: RunConfig, seed: int,
                 shape: TrainingShape | None = None, budget_bytes: int | None = None) -> list[torch.Tensor]:
    """Prime for `steps` steps and return each FFN node's L1 weight movement. The model is restored.

    `budget_bytes`: on a CUDA `device`, the real cap on the training process's GPU memory (fedfar.gpu)."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    before = ffn_weights(model)
    # All FFN nodes train; outside the FFN, the policy holds (frozen embeddings stay frozen while priming too).
    spec = MethodSpec("full", policy=cfg.spec.policy)
    with on_device(model, resolve_device(cfg.device), budget_bytes):
        train(model, loader, spec, epochs=steps / len(loader), cfg=train_config(cfg, seed, shape))
    scores = node_scores(before, ffn_weights(model))
    model.load_state_dict(saved)
    return scores


def choose_learners(model, loader, cfg: RunConfig, seed: int, spec: MethodSpec | None = None,
                    shape: TrainingShape | None = None, budget_bytes: int | None = None) -> list[torch.Tensor]:
    """A device's own learner mask (local mask mode), at `spec`'s retention (a device plan may have lowered it);
    `shape` is the priming phase's budget shape."""
    spec = spec or cfg.spec
    if spec.method == "random":
        return random_learners(ffn_sizes(model), spec.retention, seed)
    scores = prime_scores(model, loader, priming_steps(cfg, len(loader)), cfg, seed, shape, budget_bytes)
    return select_learners(scores, spec.retention)


def subset_rows(rows: list[torch.Tensor], retention: float, sizes: list[int], seed: int) -> list[torch.Tensor]:
    """A device that had to lower its retention trains a seeded random subset of the server's learners."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r, d in zip(rows, sizes):
        k = min(len(r), num_learners(d, retention))
        out.append(r[torch.randperm(len(r), generator=gen)[:k]].sort().values)
    return out


def local_update(
    model: torch.nn.Module,
    part_down: dict[str, torch.Tensor],
    plan: exchange.ExchangePlan,
    rows: list[torch.Tensor] | None,
    loader,
    cfg: RunConfig,
    seed: int,
    spec: MethodSpec | None = None,
    shape: TrainingShape | None = None,
    count: bool = False,
    budget_bytes: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Load the received part into the pristine model, fine-tune, and return (delta part, metrics).

    `spec` / `shape`: the method and the budget shape a device plan chose (default: the run's own). `count`:
    count the FLOPs of the training actually done (for the simulated clock). `budget_bytes`: on a CUDA
    `device`, the real cap on GPU memory while training (fedfar.gpu; raises BudgetExceeded past it).
    """
    spec = spec or cfg.spec
    state = model.state_dict()
    exchange.write(state, part_down, plan)
    before = exchange.select(state, plan, rows)
    t0 = time.perf_counter()
    with count_flops() if count else nullcontext() as counter, \
            on_device(model, resolve_device(cfg.device), budget_bytes) as usage:
        result = train(model, loader, spec, cfg.local_epochs, train_config(cfg, seed, shape), learners=rows)
    train_time = time.perf_counter() - t0
    merge(model)
    after = exchange.select(model.state_dict(), plan, rows)
    delta = {k: (after[k] - before[k]) if not k.endswith(".rows") else after[k] for k in after}
    losses = result["losses"]
    metrics = {"train-loss": float(sum(losses) / len(losses)), "train-time-s": train_time, "steps": result["steps"],
               **usage.figures()}
    if counter is not None:
        metrics["train-flops"] = float(counter.get_total_flops())
    return delta, metrics


def evaluate(model, ds_tok, tokenizer, task, batch_size: int = 128) -> dict[str, float]:
    logits, labels = predict(model, make_loader(ds_tok, tokenizer, batch_size, shuffle=False))
    return compute_metrics(task, logits, labels)

