"""What the studies share: run variants as real `flwr run` simulations, resumably, and write their outputs."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from fedfar.federation.launch import run_config_values, run_simulation
from fedfar.federation.results import plot_runs


class Progress:
    """Which run of a study is on, out of how many, and about how long the rest will take (from the runs this
    process has done; runs kept from an earlier start cost nothing)."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.ran, self.start = total, 0, 0, time.perf_counter()

    def next(self, name: str) -> None:
        self.index += 1
        self.total = max(self.total, self.index)  # a study may add a run it could not count ahead
        elapsed = time.perf_counter() - self.start
        left = (f", about {elapsed / self.ran * (self.total - self.index + 1) / 60:.0f} min left" if self.ran else "")
        print(f"=== run {self.index}/{self.total}: {name} (study {elapsed / 60:.0f} min in{left}) ===", flush=True)


def run_variant(config: str, clients: int, runs_dir: Path, run_name: str, overrides: dict,
                progress: Progress | None = None) -> Path | None:
    """One Ray simulation into runs_dir/run_name; a run whose summary.json exists is kept, not rerun, and a run
    stopped mid-way continues from its last checkpoint (the same config, so the same result as one that never
    stopped). Returns the run folder, or None if the run failed (the study goes on with the others)."""
    run_dir = runs_dir / run_name
    if progress:
        progress.next(run_name)
    if not (run_dir / "summary.json").exists():
        resume = {}
        if (run_dir / "checkpoint" / "latest.json").exists():
            print(f"{run_name}: continuing from its last checkpoint", flush=True)
            resume = {"resume": str(run_dir)}
        elif run_dir.exists():  # stopped before its first checkpoint: start clean (its logs would be appended to)
            shutil.rmtree(run_dir)
        # Studies read rounds and ledgers, not models; a study that needs the model sets save-model itself.
        code = run_simulation(config, clients, overrides={"save-model": False, **overrides,
                                                          "results-dir": str(runs_dir), "run-name": run_name,
                                                          **resume})
        if progress:
            progress.ran += 1
        if code != 0 or not (run_dir / "summary.json").exists():
            print(f"{run_name}: failed (exit {code}); continuing with the others", flush=True)
            return None
    else:
        check_kept(run_dir, config, overrides)
        print(f"{run_name}: kept from an earlier start ({run_dir})", flush=True)
    return run_dir


WHERE = ("results-dir", "run-name", "save-model", "resume")  # where and how a run is written, not what it is


def check_kept(run_dir: Path, config: str, overrides: dict) -> None:
    """A kept run must be the run the study would start now: every key as the defaults, its config file and the
    study set it, but where the run was written. Otherwise the study stops and says which (a changed config would
    silently mix two regimes)."""
    stored = json.loads((run_dir / "config.json").read_text())
    wanted = run_config_values(config, overrides)
    changed = sorted(k for k, v in wanted.items() if k in stored and k not in WHERE and stored[k] != v)
    if changed:
        raise SystemExit(f"{run_dir}: kept from an earlier start with other settings ("
                         + ", ".join(f"{k} {stored[k]!r} -> {wanted[k]!r}" for k in changed)
                         + "): delete the folder to rerun it, or give the study another --out")


def write_study(out: Path, table: str, rows: list[dict]) -> None:
    """A study's markdown table and its rows as JSON, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


def plot_study(run_dirs: list[Path], out: Path, metric: str, title: str, name: str) -> Path:
    """All runs of a study on one figure (fedfar.federation.results.plot_runs), saved as out/name; each line is
    labelled with its run's name (the study's variant), since two variants may share a method label."""
    path = plot_runs(run_dirs, out, metric, title=title, labels=[Path(r).name for r in run_dirs])[0]
    return path.rename(out / name)


def publish(out: Path, dest: str) -> None:
    """Copy a study's tables (*.md) and figures (*.png), not its runs, into a committed folder such as
    docs/studies/<study>/, so the docs show what the last run of the command produced."""
    if not dest:
        return
    target = Path(dest)
    target.mkdir(parents=True, exist_ok=True)
    copied = [shutil.copy2(f, target / f.name) for f in sorted(out.iterdir()) if f.suffix in (".md", ".png")]
    print(f"published {len(copied)} files to {target}: " + ", ".join(Path(c).name for c in copied))
