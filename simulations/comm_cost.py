"""Communication-cost study: FedAvg baselines and FedFAR variants on the same clients, IID and Dirichlet.

    python simulations/comm_cost.py                        # MiniLM-L6 on shared CoLA, 10 clients
    python simulations/comm_cost.py --partitioners iid --variants fedavg-full,far10-emb
    python simulations/comm_cost.py --partitioners iid --variants fedavg-full,far10-emb --rounds 20 \
        --out results/comm_cost_20                         # the same clients, twice the rounds

Every run is a real `flwr run` Ray simulation (fedfar.federation.launch.run_simulation) with its own run folder; runs whose
summary exists are kept when the study is restarted. Writes <out>/table.md, results.json and one figure with
every run (metric vs round and vs cumulative MB). Bytes come from the runs' ledgers (what Flower serialized).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from common import Progress, plot_study, publish, run_variant, write_study
from fedfar.federation.launch import PROJECT_DIR

# name -> run-config overrides
VARIANTS: dict[str, dict] = {
    "fedavg-full": {"method": "full"},
    "fedavg-full-emb": {"method": "full-emb"},
    "far10-emb": {"method": "far10-emb"},
    "far10-emb-local": {"method": "far10-emb", "mask-mode": "local"},
    "far10-emb-bf16": {"method": "far10-emb", "codec": "bfloat16"},
    "far40-emb": {"method": "far40-emb"},
    "far10-attn-int8": {"method": "far10-attn", "codec": "int8"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/comm_cost.toml")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--variants", default="fedavg-full,fedavg-full-emb,far10-emb,far10-emb-local,far10-attn-int8")
    p.add_argument("--partitioners", default="iid,dirichlet")
    p.add_argument("--dirichlet-variants", default="fedavg-full,far10-emb",
                   help="variants run on the Dirichlet split (default: the baseline and FAR10-emb)")
    p.add_argument("--rounds", type=int, default=0, help="override the config's num-rounds (0: keep it)")
    p.add_argument("--out", default="results/comm_cost")
    p.add_argument("--publish", default="", metavar="DIR",
                   help="also copy the tables and figures to DIR (the docs use docs/studies/comm-cost)")
    args = p.parse_args()
    extra = {"num-rounds": args.rounds} if args.rounds else {}

    out = (PROJECT_DIR / args.out).resolve()
    runs = [(part, name) for part in args.partitioners.split(",")
            for name in (args.dirichlet_variants if part == "dirichlet" else args.variants).split(",")]
    unknown = sorted({name for _, name in runs} - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    rows, progress = [], Progress(len(runs))
    for part, name in runs:
        run_dir = run_variant(args.config, args.clients, out / "runs", f"{part}-{name}",
                              {**VARIANTS[name], "partitioner": part, **extra}, progress)
        if run_dir is not None:
            rows.append(summarize(run_dir, name, part))
    write(rows, out)
    publish(out, args.publish)


def summarize(run_dir: Path, name: str, partitioner: str) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    ledger = pd.read_csv(run_dir / "ledger.csv")
    train = ledger[(ledger.phase == "train") & (ledger.status == "ok")]
    return {"partitioner": partitioner, "variant": name, "label": s["label"], "metric": s["metric"],
            "final": s["final_metric"], "initial": s["initial_metric"],
            "best": float(pd.read_csv(run_dir / "rounds.csv")[s["metric"]].max()),
            "up_bytes_per_client_round": float(train.bytes_up.mean()),
            "down_bytes_per_client_round": float(train.bytes_down.mean()),
            "mb_up": s["mb_up"], "mb_down": s["mb_down"], "mb_total": s["mb_up"] + s["mb_down"],
            "rounds": s["rounds"], "clients": s["clients"], "run_dir": str(run_dir)}


def write(rows: list[dict], out: Path) -> None:
    if not rows:
        return
    lines = ["| partition | variant | dev MCC final (best) | uplink / client / round | x FedAvg-full | "
             "downlink / client / round | total MB (up + down) |", "|---|---|---|---|---|---|---|"]
    for part in dict.fromkeys(r["partitioner"] for r in rows):
        group = [r for r in rows if r["partitioner"] == part]
        base = next((r for r in group if r["variant"] == "fedavg-full"), group[0])
        for r in group:
            lines.append(f"| {part} | {r['variant']} ({r['label']}) | {r['final']:.3f} ({r['best']:.3f}) | "
                         f"{r['up_bytes_per_client_round'] / 1e6:.3f} MB | "
                         f"{r['up_bytes_per_client_round'] / base['up_bytes_per_client_round']:.4f} | "
                         f"{r['down_bytes_per_client_round'] / 1e6:.3f} MB | {r['mb_total']:.1f} |")
    table = "\n".join(lines)
    write_study(out, table, rows)
    for part in dict.fromkeys(r["partitioner"] for r in rows):
        runs = [Path(r["run_dir"]) for r in rows if r["partitioner"] == part]
        plot_study(runs, out, rows[0]["metric"], f"CoLA, MiniLM-L6, {part}", f"comm_cost_{part}.png")
    print(table)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out}/comm_cost_*.png")


if __name__ == "__main__":
    main()
