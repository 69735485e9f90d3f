"""What the studies share: run variants as real `flwr run` simulations, resumably, and write their outputs."""
from __future__ import annotations

import json
from pathlib import Path

from fedfar.launch import run_simulation
from fedfar.results import plot_runs


def run_variant(config: str, clients: int, runs_dir: Path, run_name: str, overrides: dict) -> Path | None:
    """One Ray simulation into runs_dir/run_name; a run whose summary.json exists is kept, not rerun.
    Returns the run folder, or None if the run failed (the study goes on with the others)."""
    run_dir = runs_dir / run_name
    if not (run_dir / "summary.json").exists():
        print(f"=== {run_name} ===", flush=True)
        code = run_simulation(config, clients, overrides={**overrides, "results-dir": str(runs_dir),
                                                          "run-name": run_name, "save-model": False})
        if code != 0 or not (run_dir / "summary.json").exists():
            print(f"{run_name}: failed (exit {code}); continuing with the others", flush=True)
            return None
    return run_dir


def write_study(out: Path, table: str, rows: list[dict]) -> None:
    """A study's markdown table and its rows as JSON, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


def plot_study(run_dirs: list[Path], out: Path, metric: str, title: str, name: str) -> Path:
    """All runs of a study on one figure (fedfar.results.plot_runs), saved as out/name."""
    path = plot_runs(run_dirs, out, metric, title=title)[0]
    return path.rename(out / name)
