"""Flower ServerApp: global model, server-side dev evaluation, the FedFar strategy, the results folder. Thin."""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from logging import INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from ..data import get_task, load_glue, partition_summary, tokenize
from ..devices.device import check_fleet
from ..models import load_model, load_tokenizer, quiet_libraries
from . import checkpoint, linkstate
from .client import evaluate
from .config import RunConfig
from .results import RunFolder, device_summary, read_jsonl
from .strategy import FedFar

app = ServerApp()
quiet_libraries()  # per-map and per-file bars from every process bury the round log
# In a simulation this process also runs Flower's engine: deliver messages without scanning every one per node.
linkstate.install()


@app.main()
def main(grid: Grid, context: Context) -> None:
    t_start = time.perf_counter()
    cfg = RunConfig.from_flower(context.run_config)  # validated once, before any compute
    task = get_task(cfg.task)
    resume = None
    if cfg.resume:  # the same run, continued: its folder, its config, its checkpoint
        folder = RunFolder(cfg.resume)
        check_same_run(folder, cfg)
        resume = checkpoint.load(folder.path)
        name = folder.path.name
    else:
        name = cfg.run_name or f"{task.name}-{cfg.label}-{datetime.now():%Y%m%d-%H%M%S}"
        folder = RunFolder(Path(cfg.results_dir) / name)
        folder.write_json("config.json", cfg.as_dict())

    model = load_model(cfg.model, task.num_labels, seed=cfg.seed)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # what FedAvg-full ships
    model = cfg.spec.attach(model, cfg.seed)
    num_nodes = len(list(grid.get_node_ids()))
    check_fleet(cfg, num_nodes, model)  # a device that cannot even run the model fails the run here, not later
    tokenizer = load_tokenizer(cfg.model)
    train, holdout = cfg.split_train(load_glue(task, "train", cfg.data_source))
    where = "dev" if holdout is None else "holdout"  # what the server evaluates on (holdout-examples)
    dev = load_glue(task, task.dev_splits[0], cfg.data_source) if holdout is None else holdout
    if cfg.dev_examples:
        dev = dev.select(range(min(cfg.dev_examples, len(dev))))
    dev_tok = tokenize(dev, tokenizer, task, cfg.max_length)
    folder.write_json("partitions.json", partition_summary(train, num_nodes, cfg.partitioner, task,
                                                           **{k: v for k, v in cfg.partition_kwargs().items()
                                                              if k != "scheme"}))
    strategy = FedFar(cfg, model, folder, evaluate_fn=lambda: evaluate(model, dev_tok, tokenizer, task))
    setup_s = time.perf_counter() - t_start
    out = strategy.run(grid, resume)

    wall = out["wall_before_s"] + time.perf_counter() - t_start
    final = out["history"][-1]
    ledger_up = final["mb_up"]
    summary = {
        "label": cfg.label, "task": task.name, "metric": task.primary_metric,
        "eval_set": "dev" if holdout is None else f"train holdout of {len(dev)}",
        "final_metric": final[task.primary_metric], "initial_metric": out["history"][0][task.primary_metric],
        "mb_up": ledger_up, "mb_down": final["mb_down"], "rounds": cfg.num_rounds, "clients": num_nodes,
        "server_wall_s": wall, "setup_s": setup_s, "busy_s": out["busy_s"],
        "overhead_s": wall - out["busy_s"], "overhead_share": (wall - out["busy_s"]) / wall,
    }
    summary.update(fedavg_full_traffic(folder, full_bytes))
    if out["devices"]:
        summary.update(device_summary(folder, out["history"], task.primary_metric))
    if cfg.save_model:
        cfg.spec.export(model).save_pretrained(folder.path / "model")  # loads with plain transformers
        tokenizer.save_pretrained(folder.path / "model")
    folder.finish(summary)
    full_mb = summary["fedavg_full_mb_up"] + summary["fedavg_full_mb_down"]
    lines = [
        "",
        f"fedfar run {name}: {task.name}, {cfg.model}, {cfg.label}, {num_nodes} clients, {cfg.num_rounds} rounds",
        f"  {where} {task.primary_metric:<8} {summary['initial_metric']:.4f} -> {summary['final_metric']:.4f}",
        f"  uplink   {summary['mb_up']:10.2f} MB   downlink {summary['mb_down']:10.2f} MB   (serialized by Flower)",
        f"  FedAvg-full would have sent {summary['fedavg_full_mb_up']:.2f} MB up and "
        f"{summary['fedavg_full_mb_down']:.2f} MB down for the same {summary['train_messages']} training messages "
        f"(the whole model in float32 each way, {full_bytes / 1e6:.2f} MB): this run sent "
        f"{(summary['mb_up'] + summary['mb_down']) / max(full_mb, 1e-12):.3f}x of that in all",
        f"  wall     {wall:10.1f} s    training+evaluation {out['busy_s']:.1f} s, "
        f"other {summary['overhead_s']:.1f} s ({100 * summary['overhead_share']:.1f}%: set-up, loading, "
        "serialization, aggregation)",
        *([f"  devices  participation {summary['participation']:.0%} of selections "
           f"({summary['selections_oom']} out of memory, {summary['selections_late']} late), simulated time "
           f"{summary['sim_time_s']:.0f} s"] if out["devices"] else []),
        f"  results  {folder.path}  (config.json, rounds.csv, ledger.csv, partitions.json, summary.json, *.png)",
    ]
    for line in lines:
        log(INFO, line)


def fedavg_full_traffic(folder: RunFolder, full_bytes: int) -> dict:
    """What FedAvg with full fine-tuning would have sent for this run's training messages: the whole model's
    parameters in float32 down to every client sent a training message, and a delta of the same size up from
    every client that replied with one (tensor bytes; Flower's framing adds well under 0.1%). Priming and
    evaluation messages are not counted for it, though this run's own totals include them."""
    ledger = read_jsonl(folder.path / "ledger.jsonl")
    train = ledger[ledger["phase"] == "train"] if len(ledger) else ledger
    sent, replied = len(train), int((train["status"] == "ok").sum()) if len(train) else 0
    return {"train_messages": sent, "fedavg_full_mb_down": sent * full_bytes / 1e6,
            "fedavg_full_mb_up": replied * full_bytes / 1e6}


def check_same_run(folder: RunFolder, cfg: RunConfig) -> None:
    """A resumed run must be the run that was checkpointed: every run-config key as it was (but `resume`)."""
    stored = json.loads((folder.path / "config.json").read_text())
    now = cfg.as_dict()
    changed = sorted(k for k in set(stored) | set(now) if k != "resume" and stored.get(k) != now.get(k))
    if changed:
        raise ValueError(f"resume {folder.path}: the run config differs from the checkpointed run's in "
                         f"{', '.join(f'{k} ({stored.get(k)!r} -> {now.get(k)!r})' for k in changed[:5])}; "
                         "resume with the run's own config (fedfar run --resume DIR reads it from config.json)")
