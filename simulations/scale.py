"""Cross-device scale: how wall time, round 0, per-client overhead and memory grow with the number of clients.

    python simulations/scale.py                                # N = 100, 1,000, 10,000; about 15 min here
    python simulations/scale.py --clients 100,1000 --rounds 5

Each N is a real `flwr run` Ray simulation of configs/scale.toml (random-weight bert-tiny, SST-2, at most 8
sentences per client, FedFAR far10-emb with a priming cohort of 16), 1% of the clients sampled per round. While a
run goes, every process it started (SuperLink, the simulation, Ray's GCS, raylet and workers) is sampled once a
second, and their proportional set sizes (PSS: shared pages split between the processes that map them, so the sum
is the memory the run holds) are summed. Writes <out>/table.md, results.json and scale.png; runs whose summary and
memory samples exist are kept when the study is restarted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import matplotlib
import psutil

from common import publish, run_variant, write_study
from fedfar.data import get_task, load_glue, load_partition, tokenize
from fedfar.federation.client import WorkerCache
from fedfar.federation.config import RunConfig
from fedfar.federation.launch import PROJECT_DIR, run_config_values
from fedfar.federation.processes import process_tree
from fedfar.federation.results import read_jsonl

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GOAL_WALL_MIN, GOAL_STEADY_GB = 10.0, 6.0  # issue 12's goal for 10,000 clients on this 2-core machine


def role(proc: psutil.Process) -> str:
    """Which part of the run a process is: the simulation (ServerApp and Flower's engine), a ClientApp worker, the
    SuperLink, or the rest of Ray (GCS, raylet, agents)."""
    cmd = " ".join(proc.cmdline())
    for needle, name in (("flwr-simulation", "simulation"), ("ClientAppActor", "workers"),
                         ("flower-superlink", "superlink")):
        if needle in cmd or needle in proc.name():
            return name
    return "ray and other"


class MemorySampler(threading.Thread):
    """Sums the memory of every process this one started every `period` seconds, also by role: the processes
    fedfar.federation.processes.process_tree finds (descendants, and the daemons Ray re-parents), this one left
    out."""

    def __init__(self, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self.stop = period, [], threading.Event()

    def run(self) -> None:
        start, me = time.perf_counter(), os.getpid()
        while not self.stop.is_set():
            pss = rss = 0
            by_role: dict[str, int] = {}
            procs = process_tree(me) - {me}
            for pid in procs:
                try:
                    proc = psutil.Process(pid)
                    info, name = proc.memory_full_info(), role(proc)
                    by_role[name] = by_role.get(name, 0) + info.pss
                    pss, rss = pss + info.pss, rss + info.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.samples.append({"t": time.perf_counter() - start, "time": time.time(), "pss": pss, "rss": rss,
                                 "procs": len(procs), "by_role": by_role})
            self.stop.wait(self.period)


def run_one(config: str, clients: int, rounds: int, sample: float, runs_dir: Path) -> Path | None:
    """One N: the run folder, with memory.json (samples and total wall) beside its results."""
    name = f"clients-{clients}"
    run_dir = runs_dir / name
    if (run_dir / "summary.json").exists() and (run_dir / "memory.json").exists():
        print(f"{name}: kept from an earlier start ({run_dir})", flush=True)
        return run_dir
    print(f"=== {name}: {rounds} rounds, {max(1, round(sample * clients))} clients per round ===", flush=True)
    sampler = MemorySampler()
    sampler.start()
    t0 = time.perf_counter()
    try:
        run = run_variant(config, clients, runs_dir, name, {"num-rounds": rounds, "fraction-train": sample})
    finally:
        sampler.stop.set()
        sampler.join()
    if run is None:
        return None
    (run_dir / "memory.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0,
                                                     "samples": sampler.samples}))
    return run_dir


def figures(run_dir: Path) -> dict:
    """The row of one N: times from rounds.jsonl, overhead from the ledger's train entries, memory from samples."""
    rounds = read_jsonl(run_dir / "rounds.jsonl").to_dict("records")
    ledger = [e for e in read_jsonl(run_dir / "ledger.jsonl").to_dict("records")
              if e["phase"] == "train" and e["status"] == "ok"]
    mem = json.loads((run_dir / "memory.json").read_text())
    samples, wall = mem["samples"], mem["wall_s"]
    n_rounds = len(rounds) - 1
    # Steady: the samples of the second half of the training rounds (every worker started and warmed up), from
    # the first training step of round n/2 + 1 to the last of the last round (the clients' wall-clock stamps).
    second_half = [e for e in ledger if e["round"] > n_rounds // 2]
    window = (min(e["train_start"] for e in second_half), max(e["train_end"] for e in second_half))
    steady = [s for s in samples if window[0] <= s["time"] <= window[1]] or samples[-1:]
    roles = sorted({r for s in steady for r in s["by_role"]})
    return {
        "clients": int(run_dir.name.split("-")[1]),
        "sampled": int(rounds[1]["clients"]),
        "rounds": n_rounds,
        "wall_s": wall,
        "outside_s": wall - rounds[-1]["wall_s"],  # Flower's and Ray's start-up and shutdown
        "round0_s": rounds[0]["wall_s"],
        "mean_round_s": (rounds[-1]["wall_s"] - rounds[0]["wall_s"]) / n_rounds,
        "train_ms": 1000 * statistics.median(e["train_time_s"] for e in ledger),
        "overhead_ms": 1000 * statistics.median(e["overhead_s"] for e in ledger),
        "overhead_p90_ms": 1000 * statistics.quantiles([e["overhead_s"] for e in ledger], n=10)[-1],
        "open_ms": 1000 * statistics.median(e["open_s"] for e in ledger),
        "peak_gb": max(s["pss"] for s in samples) / 1e9,
        "steady_gb": statistics.median(s["pss"] for s in steady) / 1e9,
        "steady_by_role_gb": {r: statistics.median(s["by_role"].get(r, 0) for s in steady) / 1e9 for r in roles},
        "peak_rss_gb": max(s["rss"] for s in samples) / 1e9,
        "processes": max(s["procs"] for s in samples),
        "final_accuracy": rounds[-1].get("accuracy"),
    }


def open_costs(config: str, sizes: list[int], clients: int = 5) -> list[dict]:
    """Milliseconds to open one client's partition (read, split, tokenize) in a worker, two ways, in this run:
    each client re-reading and re-splitting the train set (what fedfar did before the worker cache kept one
    split), and a slice of the worker's split (WorkerCache, what a worker does now), for clients it has not
    served yet. Medians over `clients` clients."""
    cfg = RunConfig.from_flower(run_config_values(config, {}))
    task, rows = get_task(cfg.task), []
    for n in sizes:
        cache, per_client, sliced = WorkerCache(), [], []
        cache.partition(cfg, 0, n)  # the worker's first client pays for the split once
        for pid in range(1, clients + 1):
            t0 = time.perf_counter()
            ds = load_partition(load_glue(task, "train", cfg.data_source), pid, n, **cfg.partition_kwargs())
            tokenize(ds.select(range(min(cfg.max_train_examples, len(ds)))), cache.tokenizer(cfg), task,
                     cfg.max_length)
            per_client.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cache.partition(cfg, pid, n)
            sliced.append(time.perf_counter() - t0)
        row = {"clients": n, "per_client_split_ms": 1000 * statistics.median(per_client),
               "worker_split_ms": 1000 * statistics.median(sliced)}
        rows.append({**row, "ratio": row["worker_split_ms"] / row["per_client_split_ms"]})
    return rows


def open_table(rows: list[dict]) -> str:
    lines = ["| clients | open a client: each client splits the data (before) | a slice of the worker's split (now) "
             "| ratio |", "|---|---|---|---|"]
    lines += [f"| {r['clients']:,} | {r['per_client_split_ms']:.0f} ms | {r['worker_split_ms']:.0f} ms | "
              f"{r['ratio']:.3f}x |" for r in rows]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| clients | sampled per round | wall | Flower + Ray start-up and shutdown | round 0 (register + priming) | "
             "mean round | per-client overhead, median (p90) | of which opening the client | local training | "
             "memory peak | memory steady | steady: simulation (server + engine) / 2 workers / rest |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        by = r["steady_by_role_gb"]
        rest = sum(v for k, v in by.items() if k not in ("simulation", "workers"))
        lines.append(f"| {r['clients']:,} | {r['sampled']} | {r['wall_s'] / 60:.1f} min | {r['outside_s']:.0f} s | "
                     f"{r['round0_s']:.0f} s | {r['mean_round_s']:.1f} s | {r['overhead_ms']:.0f} ms "
                     f"({r['overhead_p90_ms']:.0f} ms) | {r['open_ms']:.0f} ms | {r['train_ms']:.0f} ms | "
                     f"{r['peak_gb']:.2f} GB | {r['steady_gb']:.2f} GB | {by.get('simulation', 0):.2f} / "
                     f"{by.get('workers', 0):.2f} / {rest:.2f} GB |")
    return "\n".join(lines)


def plot(rows: list[dict], runs: list[Path], out: Path) -> Path:
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    n = [r["clients"] for r in rows]
    for key, label in (("wall_s", "whole run"), ("round0_s", "round 0 (register + priming)"),
                       ("mean_round_s", "one training round")):
        ax_t.plot(n, [r[key] for r in rows], "o-", label=label)
    ax_t.axhline(GOAL_WALL_MIN * 60, color="grey", ls=":", label=f"goal: {GOAL_WALL_MIN:.0f} min")
    ax_t.set(xscale="log", yscale="log", xlabel="clients (1% sampled per round)", ylabel="seconds",
             title="Time")
    ax_t.legend(fontsize=8)
    for run_dir, r in zip(runs, rows):
        samples = json.loads((run_dir / "memory.json").read_text())["samples"]
        ax_m.plot([s["t"] / 60 for s in samples], [s["pss"] / 1e9 for s in samples], label=f"{r['clients']:,} clients")
    ax_m.axhline(GOAL_STEADY_GB, color="grey", ls=":", label=f"goal: steady <= {GOAL_STEADY_GB:.0f} GB")
    ax_m.set(xlabel="minutes into the run", ylabel="GB (PSS summed over the run's processes)",
             title="Memory over the run")
    ax_m.legend(fontsize=8)
    fig.tight_layout()
    path = out / "scale.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/scale.toml")
    p.add_argument("--clients", default="100,1000,10000", help="comma-separated fleet sizes")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--sample", type=float, default=0.01, help="share of the clients sampled per round")
    p.add_argument("--out", default="results/scale")
    p.add_argument("--publish", default="", metavar="DIR",
                   help="also copy the table and figure to DIR (the docs use docs/studies/scale)")
    args = p.parse_args()
    try:
        sizes = [int(c) for c in args.clients.split(",")]
    except ValueError:
        raise SystemExit(f"--clients {args.clients!r}: expected comma-separated whole numbers, e.g. 100,1000") from None
    if min(sizes) < 1 or args.rounds < 1 or not 0 < args.sample <= 1:
        raise SystemExit("--clients and --rounds must be >= 1 and --sample in (0, 1]")
    out = (PROJECT_DIR / args.out).resolve()
    runs = [r for n in sizes if (r := run_one(args.config, n, args.rounds, args.sample, out / "runs"))]
    if not runs:
        raise SystemExit("no run finished")
    rows = [figures(r) for r in runs]
    opens = open_costs(args.config, sizes)
    text = table(rows) + "\n\n" + open_table(opens)
    print(text)
    write_study(out, text, rows)
    (out / "open_cost.json").write_text(json.dumps(opens, indent=2))
    print(f"figure: {plot(rows, runs, out)}")
    big = max(rows, key=lambda r: r["clients"])
    print(f"largest fleet, {big['clients']:,} clients: {big['wall_s'] / 60:.1f} min (goal <= {GOAL_WALL_MIN:.0f}), "
          f"steady memory {big['steady_gb']:.2f} GB (goal <= {GOAL_STEADY_GB:.0f})")
    publish(out, args.publish)


if __name__ == "__main__":
    main()
