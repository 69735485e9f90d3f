"""Robustness study: faulty and malicious devices in a real federation, and what each aggregator makes of them.

    python simulations/robustness.py                       # MiniLM-L6 on shared SST-2, 12 clients, 3 seeds
    python simulations/robustness.py --seeds 0 --variants clean-mean,faults-median

Seven of the twelve devices misbehave (configs/faults/every_kind.toml, one per kind of fault: nan, inf,
wrong-shape, crash, hang in round 1, drop, and an update scaled by 1000), five are honest. Each variant is a
real `flwr run` Ray simulation per seed. Writes <out>/faults.md (every injected fault by kind: what the server
saw and did, from the runs' ledgers), table.md (dev accuracy per aggregator, mean +- sd over seeds, whether every
run completed and its global model stayed finite), results.json and robustness.png (accuracy per round, mean and
range over seeds). Runs whose summary exists are kept when the study is restarted.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from common import Progress, publish, run_variant, write_study
from fedfar.federation.launch import PROJECT_DIR
from fedfar.federation.results import read_jsonl

EVERY_KIND = str(PROJECT_DIR / "configs" / "faults" / "every_kind.toml")
# name -> run-config overrides
VARIANTS: dict[str, dict] = {
    "clean-mean": {"aggregator": "mean"},
    "faults-mean": {"aggregator": "mean", "faults": EVERY_KIND},
    "faults-median": {"aggregator": "median", "faults": EVERY_KIND},
    "faults-trimmed-mean": {"aggregator": "trimmed-mean", "trim-share": 0.2, "faults": EVERY_KIND},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/robustness.toml")
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="results/robustness")
    p.add_argument("--publish", default="", metavar="DIR",
                   help="also copy the tables and figures to DIR (the docs use docs/studies/robustness)")
    args = p.parse_args()
    names, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    if args.clients < 8 and any("faults" in VARIANTS[n] for n in names):
        raise SystemExit("--clients: every_kind.toml puts faults on partitions 1-7; use at least 8 clients")

    out = (PROJECT_DIR / args.out).resolve()
    runs, progress = [], Progress(len(names) * len(seeds))
    for name in names:
        for seed in seeds:
            run_dir = run_variant(args.config, args.clients, out / "runs", f"{name}-seed{seed}",
                                  {**VARIANTS[name], "seed": seed, "save-model": True}, progress)
            runs.append((name, seed, run_dir))
    write(runs, out)
    publish(out, args.publish)


def run_record(name: str, seed: int, run_dir: Path | None) -> dict:
    if run_dir is None:
        return {"variant": name, "seed": seed, "completed": False}
    s = json.loads((run_dir / "summary.json").read_text())
    rounds = pd.read_csv(run_dir / "rounds.csv")
    model = run_dir / "model" / "model.safetensors"
    finite = all(torch.isfinite(t).all().item() for t in load_file(model).values()) if model.exists() else None
    return {"variant": name, "seed": seed, "completed": True, "metric": s["metric"], "final": s["final_metric"],
            "curve": rounds[s["metric"]].tolist(), "finite": finite,
            "rejected": int(rounds.clients_rejected.sum()), "lost": int(rounds.clients_lost.sum()),
            "update_norm_max": float(rounds.update_norm.max()), "run_dir": str(run_dir)}


def fault_rows(runs: list[tuple[str, int, Path | None]]) -> list[dict]:
    """Every injected fault of every run, by kind: how often, what the server recorded, why."""
    frames = []
    for name, _, run_dir in runs:
        if run_dir is None or "faults" not in VARIANTS[name]:
            continue
        ledger = read_jsonl(run_dir / "ledger.jsonl")
        train = ledger[(ledger.phase == "train") & ledger.get("fault", pd.Series(dtype=object)).notna()]
        frames.append(train.assign(variant=name))
    if not frames:
        return []
    faults = pd.concat(frames)
    rows = []
    for kind, group in faults.groupby("fault", sort=False):
        verdicts = group.status.value_counts()
        rows.append({"kind": kind, "injected": len(group), "verdicts": {k: int(v) for k, v in verdicts.items()},
                     "reasons": sorted({_reason(e) for e in group.error if isinstance(e, str) and e})})
    return rows


def _reason(error: str) -> str:
    """An error without what differs between rounds and tensors, so one kind of fault gives one reason."""
    error = re.sub(r"^\w+Error: [\w.]+: ", "", error)  # "ValueError: <tensor name>: " (always the first tensor)
    return re.sub(r"(partition|round) \d+", r"\1 <n>", error)


def write(runs: list[tuple[str, int, Path | None]], out: Path) -> None:
    records = [run_record(*r) for r in runs]
    done = [r for r in records if r["completed"]]
    if not done:
        return
    metric = done[0]["metric"]
    lines = [f"| variant | runs completed | global model finite | dev {metric} final, mean +- sd | min .. max | "
             "updates rejected / lost or failed per run | largest merged change (L2) |",
             "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["variant"] for r in records):
        group = [r for r in records if r["variant"] == name]
        ok = [r for r in group if r["completed"]]
        finals = [r["final"] for r in ok]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        finite = "yes" if all(r["finite"] for r in ok) else "NO"
        lines.append(f"| {name} | {len(ok)} / {len(group)} | {finite} | "
                     f"{statistics.mean(finals):.3f} +- {sd:.3f} | {min(finals):.3f} .. {max(finals):.3f} | "
                     f"{statistics.mean(r['rejected'] for r in ok):.0f} / {statistics.mean(r['lost'] for r in ok):.0f}"
                     f" | {max(r['update_norm_max'] for r in ok):.3g} |")
    table = "\n".join(lines)
    faults = fault_rows(runs)
    flines = ["| fault kind | client-rounds injected | what the server recorded | why |", "|---|---|---|---|"]
    for f in faults:
        verdict = ", ".join(f"{'merged' if k == 'ok' else k} {v}" for k, v in f["verdicts"].items())
        flines.append(f"| `{f['kind']}` | {f['injected']} | {verdict} | {'; '.join(f['reasons']) or '-'} |")
    write_study(out, table, [{k: v for k, v in r.items()} for r in records])
    (out / "faults.md").write_text("\n".join(flines) + "\n")
    plot(done, out / "robustness.png", metric)
    print(table, "\n\n" + "\n".join(flines))
    print(f"wrote {out / 'table.md'}, {out / 'faults.md'}, {out / 'results.json'}, {out / 'robustness.png'}")


def plot(records: list[dict], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r["variant"] for r in records):
        curves = torch.tensor([r["curve"] for r in records if r["variant"] == name], dtype=torch.float64)
        x = range(curves.shape[1])
        line, = ax.plot(x, curves.mean(0), marker="o", label=f"{name} (n={curves.shape[0]})")
        ax.fill_between(x, curves.min(0).values, curves.max(0).values, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title("SST-2, MiniLM-L6 far10-emb, 12 clients (7 faulty): mean and range over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
