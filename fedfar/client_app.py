"""Flower ClientApp: one simulated edge device. Thin: the work is in fedfar.local."""
from __future__ import annotations

import time

import datasets
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import exchange
from .config import RunConfig
from .data import get_task, make_loader
from .budget import count_flops
from .deltas import decode, encode, reconstruction_error
from .edge import adapted_spec, profile_record
from .far import ffn_sizes
from .gpu import BudgetExceeded
from .local import CACHE, choose_learners, evaluate, local_update, prime_scores, priming_steps, subset_rows

app = ClientApp()
datasets.disable_progress_bars()  # per-map bars from every process bury the round log


def _setup(msg: Message, context: Context):
    """The run config, this node's partition, the pristine model, a seeded loader and the device plan (if any)."""
    cfg = RunConfig.from_flower(context.run_config)
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    server_round = int(msg.content["config"]["server-round"]) if "config" in msg.content else 0
    seed = cfg.seed + 7919 * pid + server_round
    model = CACHE.model(cfg)
    train_ds, held_out = CACHE.partition(cfg, pid, num)
    dplan = CACHE.device_plan(cfg, context.node_config)
    loader = make_loader(train_ds, CACHE.tokenizer(cfg), cfg.batch_size, shuffle=True, seed=seed)
    # Seed last. Dropout draws from the global generator, and so do a worker's first-round chores (loading the
    # model reseeds it and initialises the head; the budget plan runs a real step): seeding before them gave the
    # first client each worker served other masks than a warm worker would, so runs differed with scheduling.
    torch.manual_seed(seed)
    return cfg, pid, seed, model, loader, held_out, dplan


@app.query("register")
def register(msg: Message, context: Context) -> Message:
    """Start of a run: which partition and which simulated device this node is (none if devices are off)."""
    cfg = RunConfig.from_flower(context.run_config)
    profile = CACHE.profile(cfg, context.node_config)
    return Message(RecordDict({
        "metrics": MetricRecord({"partition-id": int(context.node_config["partition-id"])}),
        "device": ConfigRecord(profile_record(profile) if profile else {})}), reply_to=msg)


def _out_of_memory(msg: Message, pid: int, figures: dict, phase: str) -> Message:
    """What a device that cannot fit the work sends instead of an update: its figures, no weights."""
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0, "partition-id": pid}),
                               "device": ConfigRecord({**figures, "status": f"oom-{phase}"})}), reply_to=msg)


def _budget(dplan) -> int | None:
    """The cap a CUDA device enforces for real (fedfar.gpu): the simulated device's budget, if any."""
    return dplan.profile.memory_budget_bytes if dplan else None


def _over_real_budget(msg: Message, pid: int, dplan, err: BudgetExceeded, phase: str) -> Message:
    """The GPU's allocator refused past the cap: report it like a planned out-of-memory, with what it measured."""
    planned = (dplan.figures(dplan.priming if phase == "prime" else None)) if dplan else {}
    return _out_of_memory(msg, pid, {**planned, **err.usage.figures()}, f"{phase}-cuda")


@app.train("prime")
def prime(msg: Message, context: Context) -> Message:
    """Global mask mode, round 0: prime on local data and send node scores (no weights)."""
    cfg, pid, seed, model, loader, _, dplan = _setup(msg, context)
    if dplan and not dplan.priming.fits:
        return _out_of_memory(msg, pid, dplan.figures(dplan.priming), "prime")
    start = time.time()
    try:
        with count_flops() as counter:
            scores = prime_scores(model, loader, priming_steps(cfg, len(loader)), cfg, seed,
                                  dplan.priming.shape if dplan else None, _budget(dplan))
    except BudgetExceeded as err:
        return _over_real_budget(msg, pid, dplan, err, "prime")
    metrics = MetricRecord({"num-examples": len(loader.dataset), "partition-id": pid,
                            "prime-start": start, "prime-end": time.time(),
                            "train-flops": float(counter.get_total_flops())})
    record = encode({f"scores.{i}": s.float() for i, s in enumerate(scores)}, "float32")
    device = ConfigRecord({**dplan.figures(dplan.priming), "status": "ok"} if dplan else {})
    return Message(RecordDict({"scores": record, "metrics": metrics, "device": device}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fine-tune on the received trainable part; reply with the delta of the trainable tensors only."""
    cfg, pid, seed, model, loader, _, dplan = _setup(msg, context)
    plan = exchange.plan_for(model, cfg.spec)
    if dplan and not dplan.train.fits:  # over budget and not allowed (or not able) to adapt: fail like a device
        return _out_of_memory(msg, pid, dplan.figures(), "train")
    spec = adapted_spec(cfg.spec, dplan.train) if dplan else cfg.spec
    shape = dplan.train.shape if dplan else None
    part_down = decode(msg.content["part"])
    rows = exchange.part_rows(part_down, plan)
    start = time.time()  # wall-clock, so the server can tell training time from everything else
    flops = 0.0
    if plan.sliced and cfg.mask_mode == "local":
        if "learners" not in context.state:  # first participation: pick this device's own learners
            if dplan and dplan.priming is not None and not dplan.priming.fits:
                return _out_of_memory(msg, pid, dplan.figures(dplan.priming), "prime")
            try:
                with count_flops() as counter:
                    learners = choose_learners(model, loader, cfg, seed, spec,
                                               dplan.priming.shape if dplan and dplan.priming else None,
                                               _budget(dplan))
            except BudgetExceeded as err:
                return _over_real_budget(msg, pid, dplan, err, "prime")
            flops = float(counter.get_total_flops())
            context.state["learners"] = encode({str(i): rows_i for i, rows_i in enumerate(learners)})
        stored = decode(context.state["learners"])
        rows = [stored[str(i)].long() for i in range(len(plan.ffn))]
    elif plan.sliced and spec.retention != cfg.spec.retention:  # the budget plan lowered this device's retention
        rows = subset_rows(rows, spec.retention, ffn_sizes(model), seed)
    try:
        delta, metrics = local_update(model, part_down, plan, rows, loader, cfg, seed, spec, shape,
                                      count=bool(dplan), budget_bytes=_budget(dplan))
    except BudgetExceeded as err:
        return _over_real_budget(msg, pid, dplan, err, "train")
    metrics.update({"train-start": start, "train-end": time.time()})
    if dplan:
        metrics["train-flops"] += flops
    if plan.sliced and cfg.mask_mode == "global" and spec.retention == cfg.spec.retention:
        delta = {k: v for k, v in delta.items() if not k.endswith(".rows")}  # the server knows its mask
    record = encode(delta, cfg.codec)
    error = reconstruction_error(delta, decode(record)) if cfg.codec != "float32" else {"max_abs": 0.0, "rel_l2": 0.0}
    metrics.update({"num-examples": len(loader.dataset), "partition-id": pid,
                    "codec-rel-l2": error["rel_l2"], "codec-max-abs": error["max_abs"]})
    device = ConfigRecord({**dplan.figures(), "status": "ok"} if dplan else {})
    return Message(RecordDict({"delta": record, "metrics": MetricRecord(metrics), "device": device}),
                   reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Federated evaluation: the global model on this device's held-out share."""
    cfg, pid, _, model, _, held_out, _ = _setup(msg, context)
    if held_out is None:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0, "partition-id": pid})}),
                       reply_to=msg)
    plan = exchange.plan_for(model, cfg.spec)
    exchange.write(model.state_dict(), decode(msg.content["part"]), plan)
    start = time.time()
    metrics = evaluate(model, held_out, CACHE.tokenizer(cfg), get_task(cfg.task))
    metrics.update({"num-examples": len(held_out), "partition-id": pid, "eval-start": start, "eval-end": time.time()})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

