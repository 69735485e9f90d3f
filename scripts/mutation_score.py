"""Print the mutation score of the last `mutmut run` (run by `make mutants`).

Reads mutants/mutmut-cicd-stats.json (written by `mutmut export-cicd-stats`) and lists the surviving mutants by
name so they can be reviewed (`mutmut show <name>` prints one as a diff). A mutant counts as killed when a test
failed or timed out on it; mutants no fast test reaches count as survivors; skipped ones are left out.
The last line reads `mutation score: X% (K of N killed)`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    stats_path = Path("mutants/mutmut-cicd-stats.json")
    if not stats_path.exists():
        raise SystemExit(f"{stats_path} not found: run `make mutants` (or `mutmut run && mutmut export-cicd-stats`)")
    stats = json.loads(stats_path.read_text())
    killed = int(stats["killed"]) + int(stats["timeout"])
    tested = int(stats["total"]) - int(stats["skipped"])
    mutmut = str(Path(sys.executable).parent / "mutmut")
    results = subprocess.run([mutmut, "results"], capture_output=True, text=True).stdout
    survivors = [line.strip() for line in results.splitlines() if line.strip()]
    if survivors:
        print(f"{len(survivors)} mutants not killed (`mutmut show <name>` shows one):")
        print("\n".join(f"  {s}" for s in survivors))
    print(", ".join(f"{k} {v}" for k, v in stats.items() if isinstance(v, int) and v))
    judged = sum(int(v) for k, v in stats.items() if k != "total" and isinstance(v, int) and not isinstance(v, bool))
    if judged < int(stats["total"]):  # the run stopped early (e.g. its stats run failed): no score to give
        raise SystemExit(f"{int(stats['total']) - judged} of {stats['total']} mutants were never checked: "
                         "run `make mutants` again and read mutmut's output for why it stopped")
    score = 100.0 * killed / tested if tested else 0.0
    print(f"mutation score: {score:.1f}% ({killed} of {tested} killed)")


if __name__ == "__main__":
    main()
