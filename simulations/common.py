"""What the studies share: run a list of variants as real `flwr run` simulations, resumably."""
from __future__ import annotations

from pathlib import Path

from fedfar.launch import run_simulation


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
