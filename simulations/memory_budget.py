"""Memory-budget study: the same mixed edge fleet fine-tunes with FedAvg (ordinary full fine-tuning) and FedFAR.

    python simulations/memory_budget.py                 # MiniLM-L6 on shared SST-2, 10 devices of mixed_edge
    python simulations/memory_budget.py --target 0.80

Every device checks its accounted peak training memory against its budget before it trains (fedfar.devices.device).
With oom-policy "fail" a device over budget refuses, as a real one would run out of memory: FedAvg-full loses the
small-memory phones, FedFAR keeps them. "fedavg-full-adapt" shows the other way out, micro-batches with gradient
accumulation. Each run is a real Ray simulation with the simulated clock (FLOPs counted from the work done,
bytes from Flower's serialization, each device's compute and bandwidth from configs/devices.toml).

Writes <out>/table.md, results.json, memory_check.md (accounted vs profiler-measured peak memory), one figure of
the metric vs round / MB / simulated time and one bar figure of participation, final metric, bytes and
simulated time-to-target. Runs whose summary exists are kept when the study is restarted.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from common import Progress, plot_study, publish, run_variant, write_study
from fedfar.federation.config import RunConfig
from fedfar.federation.launch import PROJECT_DIR, run_config_values
from fedfar.federation.results import time_to_target

VARIANTS: dict[str, dict] = {
    "fedavg-full": {"method": "full", "oom-policy": "fail"},
    "fedavg-full-adapt": {"method": "full", "oom-policy": "adapt"},
    "fedfar-far10-emb": {"method": "far10-emb", "oom-policy": "fail"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/memory_budget.toml")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--target", type=float, default=0.80, help="dev metric for the time-to-target column")
    p.add_argument("--out", default="results/memory_budget")
    p.add_argument("--publish", default="", metavar="DIR",
                   help="also copy the tables and figures to DIR (the docs use docs/studies/memory-budget)")
    args = p.parse_args()

    out = (PROJECT_DIR / args.out).resolve()
    cfg = RunConfig.from_flower(run_config_values(args.config))
    # The fleet file is read in the project directory by the app; make it absolute for the launcher's check too.
    fleet = str((PROJECT_DIR / cfg.fleet).resolve())
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    rows, progress = [], Progress(len(names))
    for name in names:
        run_dir = run_variant(args.config, args.clients, out / "runs", name, {**VARIANTS[name], "fleet": fleet},
                              progress)
        if run_dir is not None:
            rows.append(summarize(run_dir, name, args.target))
    write(rows, out, args.target)
    memory_check(cfg, out)
    publish(out, args.publish)


def summarize(run_dir: Path, name: str, target: float) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    rounds = pd.read_csv(run_dir / "rounds.csv")
    return {"variant": name, "label": s["label"], "metric": s["metric"], "final": s["final_metric"],
            "best": s["best_metric"], "participation": s["participation"], "selections": s["selections"],
            "oom": s["selections_oom"], "never_trained": s["devices_never_trained"],
            "mb_total": s["mb_up"] + s["mb_down"], "sim_time_s": s["sim_time_s"],
            "time_to_target_s": time_to_target(rounds, s["metric"], target), "run_dir": str(run_dir)}


def write(rows: list[dict], out: Path, target: float) -> None:
    if not rows:
        return
    metric = rows[0]["metric"]
    lines = [f"| variant | participation (trained / selected) | devices that never trained | dev {metric} final "
             f"(best) | MB up + down | simulated time | time to {metric} {target:g} |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ttt = f"{r['time_to_target_s'] / 60:.1f} min" if r["time_to_target_s"] is not None else "not reached"
        lines.append(f"| {r['variant']} ({r['label']}) | {r['participation']:.0%} "
                     f"({r['selections'] - r['oom']} / {r['selections']}; {r['oom']} out of memory) | "
                     f"{', '.join(r['never_trained']) or 'none'} | {r['final']:.3f} ({r['best']:.3f}) | "
                     f"{r['mb_total']:.0f} | {r['sim_time_s'] / 60:.1f} min | {ttt} |")
    table = "\n".join(lines)
    write_study(out, table, rows)
    plot_study([Path(r["run_dir"]) for r in rows], out, metric, "SST-2, MiniLM-L6, mixed edge fleet",
               "memory_budget_curves.png")
    bars(rows, out / "memory_budget_bars.png", target)
    print(table)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out}/memory_budget_*.png")


def bars(rows: list[dict], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    panels = [("participation", [100 * r["participation"] for r in rows], "% of selections that trained"),
              ("final", [r["final"] for r in rows], f"final dev {rows[0]['metric']}"),
              ("bytes", [r["mb_total"] for r in rows], "MB exchanged (up + down)"),
              ("time", [(r["time_to_target_s"] or float("nan")) / 60 for r in rows],
               f"simulated min to {rows[0]['metric']} {target:g}")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (_, values, title) in zip(axes, panels):
        ax.bar(names, values, color=["tab:red", "tab:orange", "tab:green", "tab:blue"][: len(names)])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def memory_check(cfg: RunConfig, out: Path) -> None:
    """Accounted peak (fedfar.devices.memory) vs the CPU allocator's own events under torch.profiler, at the run's shape."""
    from fedfar.data import get_task
    from fedfar.devices.budget import prepare_for_accounting
    from fedfar.devices.memory import account, profiled_peak_bytes
    from fedfar.methods import parse_method
    from fedfar.models import load_model, random_batch

    lines = ["| method | accounted peak | measured (torch.profiler, CPU allocator) | measured / accounted |",
             "|---|---|---|---|"]
    for method in ("full", "full-emb", "far10-emb", "far10-attn"):
        model = load_model(cfg.model, get_task(cfg.task).num_labels, seed=cfg.seed)
        prepare_for_accounting(model, parse_method(method))
        batch = random_batch(model, cfg.batch_size, cfg.max_length)
        accounted = account(model, batch).peak_training_bytes
        measured = profiled_peak_bytes(model, batch)["measured_peak_bytes"]
        lines.append(f"| {method} | {accounted / 2**20:.0f} MiB | {measured / 2**20:.0f} MiB | "
                     f"{measured / accounted:.2f} |")
    text = "\n".join(lines)
    (out / "memory_check.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
