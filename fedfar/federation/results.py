"""A run folder: resolved config, per-round metrics, the byte ledger, partitions, summary and plots.

Rows are appended as JSON lines and flushed as they happen, so a run that dies keeps everything up to its last
round; CSV copies with cumulative totals and the plots are written at the end (and by `fedfar plot`).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, obj) -> None:
        (self.path / name).write_text(json.dumps(obj, indent=2, default=_jsonable))

    def _append(self, name: str, rows: list[dict]) -> None:
        with open(self.path / name, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row, default=_jsonable) + "\n")

    def append_round(self, row: dict) -> None:
        self._append("rounds.jsonl", [row])

    def append_ledger(self, rows: list[dict]) -> None:
        self._append("ledger.jsonl", rows)

    def keep_rounds(self, last: int) -> None:
        """Drop the rows of rounds after `last` from the round log and the ledger (a resumed run redoes them)."""
        import os

        for name in ("rounds.jsonl", "ledger.jsonl"):
            path = self.path / name
            if not path.exists():
                continue
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line)["round"] <= last]
            tmp = path.with_name(name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)

    def write_mask(self, rows, sizes, primed: list[int] | None = None, server_round: int = 0) -> None:
        """The global mask, and the partitions whose scores chose it: mask.json is the current one; a refresh
        (reprime-every) before round N also keeps its own as mask-round<N>.json."""
        mask = {"ffn_sizes": sizes, "learners": [r.tolist() for r in rows],
                **({"primed_partitions": primed} if primed is not None else {}),
                **({"server_round": server_round} if server_round else {})}
        self.write_json("mask.json", mask)
        if server_round:
            self.write_json(f"mask-round{server_round}.json", mask)

    def finish(self, summary: dict) -> None:
        """CSV copies with cumulative byte totals, the summary and the plots."""
        ledger = read_jsonl(self.path / "ledger.jsonl")
        if not ledger.empty:
            ledger["cum_bytes_up"] = ledger["bytes_up"].cumsum()
            ledger["cum_bytes_down"] = ledger["bytes_down"].cumsum()
            ledger.to_csv(self.path / "ledger.csv", index=False)
        rounds = read_jsonl(self.path / "rounds.jsonl")
        rounds.to_csv(self.path / "rounds.csv", index=False)
        self.write_json("summary.json", summary)
        plot_runs([self.path], self.path, summary.get("metric"))


def read_jsonl(path: Path) -> pd.DataFrame:
    if not Path(path).exists():
        return pd.DataFrame()
    # dtype=False: values keep their JSON types; pandas would otherwise read the strings "nan" and "inf" (the
    # labels of injected faults) as floats.
    return pd.read_json(path, lines=True, dtype=False)


def device_summary(folder: RunFolder, history: list[dict], metric: str) -> dict:
    """Participation and the simulated clock of a run with simulated devices (train rounds only); devices that
    never trained are listed as "<partition id>:<profile>"."""
    ledger = read_jsonl(folder.path / "ledger.jsonl")
    train = ledger[ledger["phase"] == "train"]
    registered = ledger[ledger["phase"] == "register"].sort_values("partition_id")
    trained = set(train.loc[train["status"] == "ok", "partition_id"])
    n = max(1, len(train))
    return {"participation": float((train["status"] == "ok").sum() / n), "selections": int(len(train)),
            "selections_oom": int((train["status"] == "oom").sum()),
            "selections_late": int((train["status"] == "late").sum()),
            "devices_never_trained": [f"{int(r.partition_id)}:{r.device}" for r in registered.itertuples()
                                      if r.partition_id not in trained],
            "sim_time_s": float(history[-1]["sim_time_s"]), "best_metric": max(h[metric] for h in history)}


def time_to_target(rounds: pd.DataFrame, metric: str, target: float) -> float | None:
    """Simulated seconds until the dev metric first reaches `target` (None if it never does)."""
    hit = rounds[rounds[metric] >= target]
    return float(hit["sim_time_s"].iloc[0]) if not hit.empty else None


def plot_runs(run_dirs: list[Path], out_dir: Path, metric: str | None = None, title: str = "",
              labels: list[str] | None = None) -> list[Path]:
    """Metric vs round, vs cumulative MB (up + down) and, for runs with simulated devices, vs simulated time,
    for one or many runs on shared axes. Lines are labelled `labels`, else each run's method label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    clocked = any("sim_time_s" in read_jsonl(Path(r) / "rounds.jsonl").columns for r in run_dirs)
    fig, axes = plt.subplots(1, 3 if clocked else 2, figsize=(16 if clocked else 11, 4))
    ax_r, ax_mb = axes[0], axes[1]
    for i, run in enumerate(run_dirs):
        run = Path(run)
        rounds = read_jsonl(run / "rounds.jsonl")
        if rounds.empty:
            continue
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
        label = labels[i] if labels else summary.get("label", run.name)
        m = metric or summary.get("metric") or [c for c in rounds.columns if c not in ("round",)][0]
        mb = rounds["mb_up"] + rounds["mb_down"]
        ax_r.plot(rounds["round"], rounds[m], marker="o", label=label)
        ax_mb.plot(mb, rounds[m], marker="o", label=label)
        if clocked and "sim_time_s" in rounds.columns:
            axes[2].plot(rounds["sim_time_s"] / 60, rounds[m], marker="o", label=label)
        metric = m
    labels = [(ax_r, "round"), (ax_mb, "cumulative MB exchanged (up + down)")]
    if clocked:
        labels.append((axes[2], "simulated time (min)"))
    for ax, xlabel in labels:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"dev {metric}")
        ax.grid(alpha=0.3)
    ax_mb.set_xscale("symlog", linthresh=1.0)
    ax_r.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = out_dir / "metric_vs_round_and_mb.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__}")
