"""Central fine-tuning study: FAR vs full, random selection and BitFit on real data, several seeds.

    python simulations/central_cola.py                       # MiniLM-L6 on shared CoLA, 5 methods x 3 seeds
    python simulations/central_cola.py --epochs 1 --seeds 0  # a quick look

Each (method, seed) run is a `fedfar finetune` run with its own results folder; finished runs are skipped when
the study is restarted, so an interrupted study loses at most one run. Writes <out>/table.md, results.json and
a plot of dev metric and training time per method.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import Progress, publish
from fedfar.finetune import FinetuneConfig, finetune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="cola")
    p.add_argument("--model", default="minilm")
    p.add_argument("--methods", default="full,far40,far10,random10,bitfit")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--out", default="results/central_cola")
    p.add_argument("--publish", default="", metavar="DIR",
                   help="also copy the tables and figures to DIR (the docs use docs/studies/central-cola)")
    args = p.parse_args()

    out = Path(args.out)
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    runs, progress = [], Progress(len(methods) * len(seeds))
    for method in methods:
        for seed in seeds:
            run_dir = out / f"{method}-seed{seed}"
            progress.next(run_dir.name)
            if (run_dir / "metrics.json").exists():
                print(f"{run_dir}: done before, kept")
            else:
                progress.ran += 1
                finetune(FinetuneConfig(task=args.task, model=args.model, method=method, epochs=args.epochs,
                                        batch_size=args.batch_size, lr=args.lr, seed=seed,
                                        max_length=args.max_length, out=str(run_dir), save_model=False))
            runs.append(json.loads((run_dir / "metrics.json").read_text()))
    write_table(runs, methods, out, args)
    publish(out, args.publish)


def write_table(runs: list[dict], methods: list[str], out: Path, args) -> None:
    metric = runs[0]["metric"]
    rows = []
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        vals = [100 * r["final"][metric] for r in rs]
        times = [r["train_time_s"] for r in rs]
        rows.append({"method": method, "metric_mean": statistics.mean(vals),
                     "metric_std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals,
                     # the least-disturbed run: other jobs on this shared 2-core machine only ever add time
                     "train_time_s": min(times), "times": times, "trainable_params": rs[0]["trainable_params"]})
    base_time = rows[0]["train_time_s"]
    lines = [f"| method | dev {metric} x100 (mean ± sd, n={len(rows[0]['values'])}) | per seed | "
             f"train time (min over seeds) | vs {rows[0]['method']} | trainable params |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['metric_mean']:.1f} ± {r['metric_std']:.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in r['values'])} | {r['train_time_s']:.0f} s | "
                     f"{r['train_time_s'] / base_time:.2f}x | {r['trainable_params']:,} |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    plot(rows, metric, out / "central.png")
    print(table)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'central.png'}")


def plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.errorbar(r["train_time_s"], r["metric_mean"], yerr=r["metric_std"], fmt="o", capsize=4)
        ax.annotate(r["method"], (r["train_time_s"], r["metric_mean"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("training time per run (s, min over seeds)")
    ax.set_ylabel(f"dev {metric} x100 (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
