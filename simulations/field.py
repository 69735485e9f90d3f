"""FedFAR against the field: which method, at what accuracy per byte and per MiB (issue 14).

    python simulations/field.py                      # SST-2 then CoLA: lr sweep, 3 seeds per variant, tables, plots
    python simulations/field.py --tasks sst2         # one task
    python simulations/field.py --stage sweep        # only the learning-rate sweep
    python simulations/field.py --stage options      # only FedFAR's options, screened on the holdout
    python simulations/field.py --stage report       # tables and figures from the runs finished so far
    python simulations/field.py --quick              # <= 20 min: SST-2, 3 variants, 2 seeds, 3 short rounds

Per task, in this order (every run a real `flwr run` Ray simulation, configs/field_<task>.toml):
1. bench: `fedfar bench` at the study's batch and max length: step time and peak training memory (the exact
   accounting of fedfar.devices.memory) per method, and their ratios to full fine-tuning, measured in one run.
2. sweep: each method (float32 uplink) at each learning rate of its grid, seed 0, evaluated on `holdout-examples`
   rows carved out of train (no client trains on them; dev stays unseen). The lr with the best holdout metric,
   averaged over the last 3 rounds, is the method's (lr.json, sweep.md); its int8 variant uses the same.
3. options: FedFAR's options (a longer priming, mask refresh, local masks, server momentum; a random mask as
   control) at far10-emb's lr, seed 0, on the same holdout (options.json, options.md): the best option joins the
   seeds stage beside far10-emb, the better of the two is FedFAR in the fleet stage.
4. seeds: every variant at its method's lr, seeds 0..n-1, evaluated on dev. Partitions are the same for all runs
   (partition-seed 42); the seed changes the head's initialisation, sampling, dropout and shuffling.
5. fleet: FedAvg-full and the best FedFAR on the mixed edge fleet (simulated memory, speed, bandwidth,
   availability): simulated time to FedAvg-full's final metric (fleet.md).
Then table.md (final metric mean +- sd; uplink and downlink per client per round; total MB; MB to 95% of FedAvg-full's
final metric; peak training memory; step-time ratio), results.json and the figures (metric vs cumulative MB with a
band over seeds; Pareto views against MB and against peak memory).

Resumable run by run: a finished run (summary.json) is kept, a run stopped mid-way continues from its last round's
checkpoint. Each run's small files (config, rounds, ledger, summary, partitions, mask) sit under
docs/studies/field/<task>/runs/ and are committed, so the study continues on another machine from the repository;
checkpoints and models are not committed.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common import Progress, run_variant
from fedfar.federation.launch import PROJECT_DIR, run_config_values

# variant -> (method, run-config overrides beyond the method). The int8 variants reuse their method's lr.
VARIANTS: dict[str, tuple[str, dict]] = {
    "fedavg-full": ("full", {}),
    "fedavg-full-int8": ("full", {"codec": "int8"}),
    "far10-emb": ("far10-emb", {}),
    "far10-attn": ("far10-attn", {}),
    "far10-attn-int8": ("far10-attn", {"codec": "int8"}),
    "lora8": ("lora8", {}),
    "bitfit": ("bitfit", {}),
}
DEFAULT_VARIANTS = tuple(VARIANTS)
# FedFAR's options (issue 14, item 3), each at far10-emb's rate: a longer priming (10% of the run's steps instead
# of 1%), a mask refreshed every 3 rounds, each device's own mask, server momentum, and a random mask as control.
# The options stage screens them on the train holdout (seed 0, like the sweep); the best joins the seeds stage, and
# the fleet stage runs the better of it and far10-emb. The control is reported, never chosen: it is not FAR.
OPTION_BASE = "far10-emb"
CONTROLS = ("random10-emb",)
OPTIONS: dict[str, tuple[str, dict]] = {
    "far10-emb-prime10": ("far10-emb", {"priming-share": 0.1}),
    "far10-emb-reprime3": ("far10-emb", {"reprime-every": 3}),
    "far10-emb-local": ("far10-emb", {"mask-mode": "local"}),
    "far10-emb-fedavgm": ("far10-emb", {"server-opt": "fedavgm", "server-momentum": 0.5}),
    "random10-emb": ("far10-emb", {"method": "random10-emb"}),
}
VARIANTS.update(OPTIONS)
# The fleet stage: the same runs on the mixed edge fleet (simulated memory, speed, bandwidth, availability), where
# full fine-tuning must micro-batch on the small phones; the question is simulated time to FedAvg-full's metric.
FLEET = {"fleet": "configs/fleets/mixed_edge.toml", "oom-policy": "adapt"}
FLEET_VARIANTS = ("fedavg-full", OPTION_BASE)  # OPTION_BASE: the best FedFAR configuration once screened
BASELINE = "fedavg-full"
LAST = 3  # the sweep ranks rates by the mean holdout metric of the last 3 rounds: one seed's final alone is noisy
# Learning-rate grids: full fine-tuning moves every weight and is run lower; the parameter-efficient methods
# train few parameters and are usually run 3-10x higher.
LR_GRID = {"full": (3e-5, 1e-4, 3e-4)}
LR_GRID_PEFT = (1e-4, 3e-4, 1e-3)
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # a sweep whose best rate is at an end goes one step further
# --quick: no sweep; the rates the sweep is expected to pick (lr.json wins where it exists).
QUICK_LR = {"full": 1e-4}
QUICK_LR_PEFT = 3e-4
QUICK_RUN = (("num-rounds", 3), ("max-train-examples", 320))  # 20 local steps a round instead of 30


@dataclass(frozen=True)
class Plan:
    task: str
    config: str
    clients: int
    holdout: int               # rows carved from train for the sweep
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    out: Path
    extra: tuple = ()          # run-config overrides for every run, as (key, value) pairs (--quick shortens them)
    sweep: bool = True         # False: take the rates from lr_file (--quick)
    lr_file: Path | None = None
    report_only: bool = False  # --stage report: tables and figures from the finished runs, nothing run
    fleet: bool = True         # run the fleet stage too (not --quick)

    def run(self, name: str, overrides: dict, progress: Progress, read_only: bool = False) -> Path | None:
        """The finished run `name` of this task: run (or continue) it, or with report_only or read_only, only look
        for it."""
        if self.report_only or read_only:
            return self.find(name)
        return run_variant(self.config, self.clients, self.out / "runs", name, {**overrides, **self.overrides()},
                           progress)

    def find(self, name: str) -> Path | None:
        """The run `name` if it has finished, else None; runs nothing."""
        run_dir = self.out / "runs" / name
        return run_dir if (run_dir / "summary.json").exists() else None

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(VARIANTS[v][0] for v in self.variants))

    def overrides(self) -> dict:
        return dict(self.extra)


def lr_grid(method: str) -> tuple[float, ...]:
    return LR_GRID.get(method, LR_GRID_PEFT)


# ------------------------------------------------------------------------------------------ stages
def bench(plan: Plan, run: bool = True) -> dict[str, dict]:
    """Step time and accounted peak memory per method (fedfar.bench, one interleaved run, ratios to `full`);
    {method string: row}, kept in bench.json. Where a planned method is missing from it and `run` allows, the whole
    bench runs again over the stored methods and the new ones, so every ratio still comes from one run."""
    path = plan.out / "bench.json"
    stored = {row["spec"]: row for row in json.loads(path.read_text())} if path.exists() else {}
    fleet = [VARIANTS[v][0] for v in FLEET_VARIANTS] if plan.fleet else []  # the fleet runs far10-emb in any study
    planned = list(dict.fromkeys([*plan.methods, *fleet]))
    missing = [m for m in planned if m not in stored]
    if not missing:
        return stored
    if not run or plan.report_only:
        if stored:
            print(f"bench: no figures for {', '.join(missing)}; `--stage bench` measures them", flush=True)
        return stored
    from fedfar.bench import format_table, run_bench, write_json

    cfg = run_config_values(plan.config)
    methods = ["full", *[m for m in dict.fromkeys([*stored, *planned]) if m != "full"]]
    print(f"=== bench: {', '.join(methods)} at batch {cfg['batch-size']} x {cfg['max-length']} tokens ===", flush=True)
    rows = run_bench(cfg["model"], methods, cfg["batch-size"], cfg["max-length"], repeats=7)
    for method, row in zip(methods, rows):
        row["spec"] = method
    print(format_table(rows), flush=True)
    write_json(rows, path)
    return {row["spec"]: row for row in json.loads(path.read_text())}


def sweep(plan: Plan, progress: Progress, run: bool = True) -> dict[str, float]:
    """Each method at each lr of its grid on the train holdout; returns {method: chosen lr}. With run=False (the
    stages after it) the runs are only read. lr.json and sweep.md, rewritten after every method, cover every
    method the study knows whose sweep runs exist, so a study of a few variants does not drop the others."""
    chosen, report, curves = {}, {}, {}
    known = dict.fromkeys([*plan.methods, *(VARIANTS[v][0] for v in DEFAULT_VARIANTS)])
    for method in known:
        finals, grid, tried = {}, list(lr_grid(method)), set()
        read_only = plan.report_only or not run or method not in plan.methods
        while grid:
            lr = grid.pop(0)
            tried.add(lr)
            name = f"sweep-{method}-lr{lr:g}"
            run_dir = plan.run(name, {"method": method, "lr": lr, "seed": 0, "holdout-examples": plan.holdout},
                               progress, read_only)
            if run_dir is not None:
                curves[(method, lr)] = curve(run_dir)
                finals[lr] = float(np.mean(curves[(method, lr)][-LAST:]))
            step = extension(finals) if not grid else None
            if step is not None and step not in tried and (
                    not read_only or plan.find(f"sweep-{method}-lr{step:g}") is not None):
                grid.append(step)
        # A method is tuned once its whole grid has run, and the step past a best rate at the grid's end too.
        if set(lr_grid(method)) <= set(finals) and extension(finals) in (None, *finals):
            chosen[method] = max(sorted(finals), key=lambda lr: finals[lr])  # ties: the lower rate
        if finals:
            report[method] = {f"{lr:g}": f for lr, f in finals.items()}
        (plan.out / "lr.json").write_text(json.dumps({"chosen": chosen, f"holdout_mean_last_{LAST}": report,
                                                      "holdout_examples": plan.holdout}, indent=2) + "\n")
        (plan.out / "sweep.md").write_text(sweep_table(plan, curves, chosen) + "\n")
    return chosen


def curve(run_dir: Path) -> list[float]:
    """A finished run's metric after each round, round 0 first."""
    metric = json.loads((run_dir / "summary.json").read_text())["metric"]
    return pd.read_csv(run_dir / "rounds.csv")[metric].tolist()


def extension(finals: dict[float, float]) -> float | None:
    """The next rate of LADDER past the best one when the best is at an end of what has run (the optimum may lie
    beyond it), else None."""
    if not finals:
        return None
    if len(finals) > 1 and len(set(finals.values())) == 1:
        # Every rate ties (on CoLA, BitFit never leaves the majority class at 1e-4 .. 1e-2): the metric gives no
        # direction, so go larger, as methods that train few parameters need, up to the ladder's top; a smaller
        # rate than ones that all stayed at chance is not worth a run.
        hi = LADDER.index(max(finals))
        return LADDER[hi + 1] if hi + 1 < len(LADDER) else None
    best = max(sorted(finals), key=lambda lr: finals[lr])
    i = LADDER.index(best)
    if best == max(finals) and i + 1 < len(LADDER):
        return LADDER[i + 1]
    if best == min(finals) and i > 0:
        return LADDER[i - 1]
    return None


def sweep_table(plan: Plan, curves: dict[tuple[str, float], list[float]], chosen: dict[str, float]) -> str:
    lines = [f"Learning-rate sweep, {plan.task}: seed 0, metric on {plan.holdout} rows carved from train (not dev), "
             f"after each round; **bold**: the rate chosen (best mean of the last {LAST} rounds).", "",
             f"| method | lr | round 0 .. last | mean of the last {LAST} |", "|---|---|---|---|"]
    for (method, lr), c in curves.items():
        mark = "**" if chosen.get(method) == lr else ""
        lines.append(f"| {method} | {mark}{lr:g}{mark} | {' '.join(f'{m:.3f}' for m in c)} | "
                     f"{mark}{np.mean(c[-LAST:]):.3f}{mark} |")
    return "\n".join(lines)


def options(plan: Plan, lrs: dict[str, float], progress: Progress, run: bool = True) -> dict | None:
    """Screen FedFAR's options at far10-emb's rate on the train holdout, seed 0: the sweep's regime, so the sweep's
    far10-emb run at that rate is the reference. With run=False the runs are only read. Once every FAR option has
    run, returns {"best_option": the best of them (it joins the seeds stage beside far10-emb), "fleet_fedfar":
    the best of far10-emb and the options (the FedFAR the fleet runs; far10-emb on a tie)}; else None.
    options.json and options.md are rewritten as runs finish."""
    method = VARIANTS[OPTION_BASE][0]
    if method not in lrs:
        print(f"options: no learning rate for {method} yet (its sweep is not complete): not screened", flush=True)
        return None
    lr = lrs[method]
    runs = {OPTION_BASE: plan.find(f"sweep-{method}-lr{lr:g}")}
    for name in OPTIONS:
        opt_method, extra = VARIANTS[name]
        run_name = f"option-{name}-lr{lr:g}"  # the rate in the name: a rate chosen anew screens anew
        runs[name] = plan.run(run_name, {"method": opt_method, "lr": lr, "seed": 0, "holdout-examples": plan.holdout,
                                         **extra}, progress, read_only=not run)
    curves = {n: curve(d) for n, d in runs.items() if d is not None}
    scores = {n: float(np.mean(c[-LAST:])) for n, c in curves.items()}
    far = [n for n in runs if n not in CONTROLS]  # far10-emb first: it wins ties
    screen = None
    if all(n in scores for n in far):
        screen = {"best_option": max(far[1:], key=lambda n: scores[n]),
                  "fleet_fedfar": max(far, key=lambda n: scores[n])}
    (plan.out / "options.json").write_text(json.dumps({
        "lr": lr, f"holdout_mean_last_{LAST}": scores, **(screen or {}), "controls": list(CONTROLS)}, indent=2) + "\n")
    lines = [f"FedFAR's options, {plan.task}: each at {OPTION_BASE}'s rate ({lr:g}), seed 0, metric on "
             f"{plan.holdout} rows carved from train (not dev). The best option (**bold**) joins the seeds stage "
             f"beside {OPTION_BASE}; the better of the two on this holdout (best mean of the last {LAST} rounds) is the "
             f"FedFAR of the fleet stage. {OPTION_BASE}'s run is the best of its rate sweep on this same holdout and "
             "seed, so the comparison favours it by a little; one seed's mean of 3 rounds moves by about half a "
             f"point. {', '.join(CONTROLS)} is a control, never chosen.", "",
             f"| variant | run-config beyond the method | round 0 .. last | mean of the last {LAST} | "
             f"vs {OPTION_BASE} (points) |", "|---|---|---|---|---|"]
    for n, c in curves.items():
        mark = "**" if screen and n == screen["best_option"] else ""
        extra = ", ".join(f"{k} = {v!r}" for k, v in VARIANTS[n][1].items()) or "(none)"
        lines.append(f"| {mark}{n}{mark} | {extra} | {' '.join(f'{m:.3f}' for m in c)} | {mark}{scores[n]:.3f}{mark} "
                     f"| {100 * (scores[n] - scores.get(OPTION_BASE, np.nan)):+.1f} |")
    if screen:
        lines += ["", f"FedFAR on the fleet: {screen['fleet_fedfar']}."]
    (plan.out / "options.md").write_text("\n".join(lines) + "\n")
    return screen


def seed_runs(plan: Plan, lrs: dict[str, float], progress: Progress, variants: tuple[str, ...] | None = None,
              prefix: str = "", common: dict | None = None) -> list[dict]:
    """Every variant whose method has a rate, at each seed, on dev; returns one record per finished run.
    `prefix` and `common`: the fleet stage's run names and settings."""
    records = []
    for name in variants or plan.variants:
        method, extra = VARIANTS[name]
        if method not in lrs:
            print(f"{name}: no learning rate for {method} yet (its sweep is not complete): skipped", flush=True)
            continue
        for seed in plan.seeds:
            # `extra` may name another method that runs at this one's rate (the random-mask control)
            run_dir = plan.run(f"{prefix}{name}-seed{seed}", {"method": method, "lr": lrs[method], "seed": seed,
                                                              **extra, **(common or {})}, progress)
            if run_dir is not None:
                records.append(run_record(run_dir, name, method, seed))
    return records


def run_record(run_dir: Path, variant: str, method: str, seed: int) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    rounds = pd.read_csv(run_dir / "rounds.csv")
    ledger = pd.read_csv(run_dir / "ledger.csv")
    train = ledger[(ledger.phase == "train") & (ledger.status == "ok")]
    return {"variant": variant, "method": method, "seed": seed, "label": s["label"], "metric": s["metric"],
            "final": s["final_metric"], "curve": rounds[s["metric"]].tolist(),
            "mb_cum": (rounds.mb_up + rounds.mb_down).tolist(),
            "up_mb_client_round": float(train.bytes_up.mean()) / 1e6,
            "down_mb_client_round": float(train.bytes_down.mean()) / 1e6,
            "mb_total": s["mb_up"] + s["mb_down"], "wall_s": s.get("launcher_wall_s", s["server_wall_s"]),
            "sim_cum": rounds["sim_time_s"].tolist() if "sim_time_s" in rounds else None,
            # a fleet run's simulated client time and the local compute in it, summed over its trainings
            **({"sim_client_s": float(train.sim_total_s.sum()), "sim_compute_s": float(train.sim_compute_s.sum())}
               if "sim_total_s" in train else {}),
            "lr": json.loads((run_dir / "config.json").read_text())["lr"], "run_dir": str(run_dir)}


# ------------------------------------------------------------------------------------------ the table
def summarize(records: list[dict], benched: dict[str, dict]) -> list[dict]:
    """One row per variant: mean +- sd over its seeds, bytes, MB to 95% of FedAvg-full's final, memory, time."""
    rows = []
    for name in dict.fromkeys(r["variant"] for r in records):
        runs = [r for r in records if r["variant"] == name]
        finals = np.array([r["final"] for r in runs])
        curves = np.array([r["curve"] for r in runs if len(r["curve"]) == len(runs[0]["curve"])])
        mbs = np.array([r["mb_cum"] for r in runs if len(r["mb_cum"]) == len(runs[0]["mb_cum"])])
        b = benched.get(runs[0]["method"], {})
        rows.append({
            "variant": name, "method": runs[0]["method"], "label": runs[0]["label"], "lr": runs[0]["lr"],
            "metric": runs[0]["metric"], "seeds": len(runs), "final_mean": float(finals.mean()),
            "final_sd": float(finals.std(ddof=1)) if len(finals) > 1 else float("nan"),
            "curve_mean": curves.mean(0).tolist(), "curve_sd": curves.std(0, ddof=1).tolist() if len(curves) > 1
            else [0.0] * curves.shape[1], "mb_cum": mbs.mean(0).tolist(),
            "up_mb_client_round": float(np.mean([r["up_mb_client_round"] for r in runs])),
            "down_mb_client_round": float(np.mean([r["down_mb_client_round"] for r in runs])),
            "mb_total": float(np.mean([r["mb_total"] for r in runs])),
            "wall_s": float(np.mean([r["wall_s"] for r in runs])),
            "peak_mib": b["peak_training_bytes"] / 2**20 if b else float("nan"),
            **({"sim_cum": np.mean([r["sim_cum"] for r in runs], 0).tolist(),
                "sim_total_s": float(np.mean([r["sim_cum"][-1] for r in runs])),
                "sim_client_s": float(sum(r.get("sim_client_s", np.nan) for r in runs)),
                "sim_compute_s": float(sum(r.get("sim_compute_s", np.nan) for r in runs))}
               if all(r.get("sim_cum") for r in runs) else {}),
            "time_ratio": b.get("time_ratio", float("nan")), "memory_ratio": b.get("memory_ratio", float("nan")),
        })
    base = next((r for r in rows if r["variant"] == BASELINE), None)
    for r in rows:
        r["mb_to_target"] = float("nan")
        if base is None:
            continue
        r["target"] = 0.95 * base["final_mean"]
        r["mb_to_target"] = first_reach(r["mb_cum"], r["curve_mean"], r["target"])
        r["bytes_ratio"] = r["mb_total"] / base["mb_total"]
        r["gap_points"] = 100 * (r["final_mean"] - base["final_mean"])
        r["gap_within_spread"] = abs(r["final_mean"] - base["final_mean"]) <= max(r["final_sd"], base["final_sd"])
    return rows


def first_reach(xs: list[float], curve: list[float], target: float) -> float:
    """x (MB, seconds) at the first round whose metric is at least `target`; inf if none is."""
    reached = [i for i, m in enumerate(curve) if m >= target]
    return xs[reached[0]] if reached else float("inf")


GOAL_POINTS, GOAL_BYTES, GOAL_SIM = 1.0, 0.2, 0.6  # issue 14's goal for FedFAR against FedAvg-full
EPS = 1e-9  # "within 1 point" includes 1 point: 100 * (0.87 - 0.88) is -1.0000000000000009
COST_RTOL = 1e-3  # on a Pareto axis, costs within 0.1% of each other are the same cost


def fleet_summary(rows: list[dict]) -> list[dict]:
    """The fleet stage's rows with simulated time: the total, and when each reaches FedAvg-full's final mean
    metric (100%, not 95%), as a share of FedAvg-full's whole simulated time; and, beside it, when each comes
    within the goal's 1 point of it (a mean curve that ends level within the spread may never touch 100%)."""
    base = next((r for r in rows if r["variant"] == BASELINE), None)
    for r in rows:
        if base is not None:
            r["sim_to_baseline_final"] = first_reach(r["sim_cum"], r["curve_mean"], base["final_mean"])
            r["sim_ratio"] = r["sim_to_baseline_final"] / base["sim_total_s"]
            r["sim_to_within_1pt"] = first_reach(r["sim_cum"], r["curve_mean"],
                                                 base["final_mean"] - GOAL_POINTS / 100 - EPS)
            r["sim_ratio_1pt"] = r["sim_to_within_1pt"] / base["sim_total_s"]
    return rows


def fleet_table(rows: list[dict]) -> str:
    metric = rows[0]["metric"]
    lines = [f"| variant (lr) | dev {metric}, mean +- sd (seeds) | simulated time, whole run | simulated time to "
             "FedAvg-full's final | x FedAvg-full's time | to within 1 point of it | x FedAvg-full's time | "
             "local compute, s of client time (all seeds) | total MB |", "|" + "---|" * 9]

    def reach(r: dict, key: str, ratio: str) -> str:
        t = r.get(key, float("nan"))
        return ("not reached | " if t == float("inf") else " | " if np.isnan(t) else
                f"{t / 60:.1f} min | {r[ratio]:.2f}")

    for r in rows:
        lines.append(f"| {r['variant']} ({r['lr']:g}) | {r['final_mean']:.3f} +- {r['final_sd']:.3f} ({r['seeds']}) | "
                     f"{r['sim_total_s'] / 60:.1f} min | {reach(r, 'sim_to_baseline_final', 'sim_ratio')} | "
                     f"{reach(r, 'sim_to_within_1pt', 'sim_ratio_1pt')} | {r['sim_compute_s']:.0f} of "
                     f"{r['sim_client_s']:.0f} ({r['sim_compute_s'] / r['sim_client_s']:.0%}) | {r['mb_total']:.0f} |")
    return "\n".join(lines)


def goals(rows: list[dict], fleet: bool = False) -> str:
    """Each FedFAR variant against issue 14's goal: within 1 point of FedAvg-full's mean final metric at <= 0.2x
    its bytes; on the fleet, FedAvg-full's final metric in <= 0.6x its simulated time."""
    lines = []
    for r in rows:
        if not r["method"].startswith("far") or r["variant"] in CONTROLS or "gap_points" not in r:
            continue
        if fleet:
            ratio = r.get("sim_ratio", np.inf)
            met = ratio <= GOAL_SIM + EPS
            text = (f"FedAvg-full's final metric in {ratio:.2f}x its simulated time" if np.isfinite(ratio)
                    else "never reached FedAvg-full's final metric")
            if np.isfinite(r.get("sim_ratio_1pt", np.inf)):
                text += f" (within 1 point of it in {r['sim_ratio_1pt']:.2f}x)"
        else:
            met = r["gap_points"] >= -GOAL_POINTS - EPS and r["bytes_ratio"] <= GOAL_BYTES + EPS
            text = (f"{r['gap_points']:+.1f} points against FedAvg-full"
                    + (" (inside the spread)" if r["gap_within_spread"] else "") + f", {r['bytes_ratio']:.3f}x its bytes")
        lines.append(f"- {r['variant']}: {text}: goal {'met' if met else 'not met'} ({r['seeds']} seeds)")
    goal = ("FedAvg-full's final metric in <= 0.6x its simulated time" if fleet
            else "within 1 point of FedAvg-full at <= 0.2x its bytes")
    return f"Goal: {goal}.\n" + "\n".join(lines) if lines else ""


def table(rows: list[dict], task: str) -> str:
    metric = rows[0]["metric"]
    lines = [f"| variant (lr) | dev {metric}, mean +- sd (seeds) | vs FedAvg-full (points) | uplink / client / round "
             "| downlink / client / round | total MB | x FedAvg-full bytes | MB to 95% of FedAvg-full | "
             "peak training MiB | step time x full |", "|" + "---|" * 10]
    for r in rows:
        gap = (f"{r['gap_points']:+.1f}" + (" (inside the spread)" if r["gap_within_spread"] else "")
               if "gap_points" in r and r["variant"] != BASELINE else "")
        to_target = ("not reached" if r["mb_to_target"] == float("inf") else
                     "" if np.isnan(r["mb_to_target"]) else f"{r['mb_to_target']:.1f}")
        lines.append(
            f"| {r['variant']} ({r['lr']:g}) | {r['final_mean']:.3f} +- {r['final_sd']:.3f} ({r['seeds']}) | {gap} | "
            f"{r['up_mb_client_round']:.2f} MB | {r['down_mb_client_round']:.2f} MB | {r['mb_total']:.0f} | "
            f"{r.get('bytes_ratio', float('nan')):.3f} | {to_target} | {r['peak_mib']:.0f} | {r['time_ratio']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ figures
def band_plot(rows: list[dict], x_key: str, xlabel: str, path: Path, title: str, log: bool = False,
              scale: float = 1.0) -> Path:
    """Each variant's metric against `x_key` (cumulative MB, simulated seconds; divided by `scale`), the mean over
    seeds with a band of +- sd. On a log axis, rounds at x = 0 are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        x, mean, sd = (np.array(r[k]) for k in (x_key, "curve_mean", "curve_sd"))
        keep = x > 0 if log else np.ones(len(x), bool)
        x = x / scale
        line, = ax.plot(x[keep], mean[keep], marker="o", ms=3, label=f"{r['variant']} (n={r['seeds']})")
        ax.fill_between(x[keep], (mean - sd)[keep], (mean + sd)[keep], color=line.get_color(), alpha=0.15)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"dev {rows[0]['metric']} (mean, band: +- sd over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def annotate_apart(ax, pts: list[tuple]) -> None:
    """Label each point without overprinting: variants at the same point (an int8 variant has its float32
    twin's memory, and often its metric) share one label, and a label that would overlap one already drawn
    moves down a line at a time until it does not (measured with the renderer, after the axes are scaled)."""
    if not pts:
        return
    ys = [y for _, y, _ in pts]
    yspan = (max(ys) - min(ys)) or 1.0
    groups: list[list] = []  # [x, y, names]
    for x, y, r in sorted(pts, key=lambda p: (p[0], -p[1])):
        for g in groups:
            if g[0] == x and abs(g[1] - y) < 0.02 * yspan:
                g[2].append(r["variant"])
                break
        else:
            groups.append([x, y, [r["variant"]]])
    groups.sort(key=lambda g: -g[1])  # top down: a label that moves down stays below the labels of higher points
    ax.figure.canvas.draw()  # fixes the limits, so window extents are final
    renderer = ax.figure.canvas.get_renderer()
    drawn = []
    for x, y, names in groups:
        for line in range(len(groups) + 1):
            label = ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 4 - 10 * line),
                                fontsize=8)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in drawn):
                break
            label.remove()
        drawn.append(box)


def plot(rows: list[dict], out: Path, title: str) -> list[Path]:
    """metric_vs_mb.png (round 0 has sent nothing but FAR's priming scores: no place on the log axis) and
    pareto.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = rows[0]["metric"]
    paths = [band_plot(rows, "mb_cum", "cumulative MB exchanged, up + down (log)", out / "metric_vs_mb.png", title,
                       log=True)]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, xlabel in ((axes[0], "mb_total", "total MB exchanged (log)"),
                            (axes[1], "peak_mib", "peak training memory per device, MiB (accounting)")):
        pts = [(r[key], r["final_mean"], r) for r in rows if np.isfinite(r[key])]
        for x, y, r in pts:
            ax.errorbar(x, y, yerr=0 if np.isnan(r["final_sd"]) else r["final_sd"], fmt="o", capsize=3)
        if key == "mb_total":
            ax.set_xscale("log")
        annotate_apart(ax, pts)
        front = pareto(pts)
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", ls="--", lw=1,
                    label="Pareto front (fewer, higher)")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"final dev {metric} (mean +- sd)")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out / "pareto.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def pareto(points: list[tuple[float, float, dict]], rtol: float = COST_RTOL) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (less x, more y), by increasing x. Costs within `rtol` of each
    other count as equal: server momentum's CoLA runs sent 13 bytes fewer than plain FedFAR's 1.77 GB, which must
    not put a worse metric on the front."""
    def beats(q: tuple, p: tuple) -> bool:
        same_x = abs(q[0] - p[0]) <= rtol * max(abs(q[0]), abs(p[0]))
        return (q[0] < p[0] or same_x) and q[1] >= p[1] and (q[1] > p[1] or not same_x)

    front = [(x, y) for x, y, _ in points if not any(beats(q, (x, y)) for q in points)]
    return sorted(dict.fromkeys(front), key=lambda p: (p[0], -p[1]))


def pareto_winners(rows: list[dict], key: str) -> list[str]:
    pts = [(r[key], r["final_mean"], r) for r in rows if np.isfinite(r[key])]
    on = set(pareto(pts))
    return [r["variant"] for x, y, r in sorted(pts, key=lambda p: p[0]) if (x, y) in on]


# ------------------------------------------------------------------------------------------ main
def run_task(plan: Plan, stage: str, progress: Progress) -> None:
    plan.out.mkdir(parents=True, exist_ok=True)
    benched = bench(plan, run=stage in ("all", "bench"))  # the other stages read the bench that ran
    if stage == "bench":
        return
    if plan.sweep:  # the later stages read the sweep's runs, they do not run what is missing
        lrs = sweep(plan, progress, run=stage in ("all", "sweep"))
    else:
        stored = json.loads(plan.lr_file.read_text())["chosen"] if plan.lr_file and plan.lr_file.exists() else {}
        lrs = {m: stored.get(m, QUICK_LR.get(m, QUICK_LR_PEFT)) for m in plan.methods}
    if stage == "sweep":
        return
    screens = screened(plan)
    screen = options(plan, lrs, progress, run=stage in ("all", "options")) if screens else None
    if stage == "options":
        return
    records = seed_runs(plan, lrs, progress, seed_variants(plan, screen)) if stage != "fleet" else []
    if records:
        write_main(plan, records, benched, lrs)
    if plan.fleet and stage in ("all", "fleet", "report"):
        if screens and screen is None:
            print("fleet: waits for the options screen, which picks the FedFAR configuration it runs", flush=True)
            return
        fleet = seed_runs(plan, lrs, progress, fleet_variants(screen), "fleet-", FLEET)
        if fleet:
            write_fleet(plan, fleet, benched)


def screened(plan: Plan) -> bool:
    """Whether this study screens FedFAR's options: where it sweeps (not --quick) and far10-emb is a variant."""
    return plan.sweep and OPTION_BASE in plan.variants


def seed_variants(plan: Plan, screen: dict | None) -> tuple[str, ...]:
    """The seeds stage's variants: the study's, and the best FedFAR option once screened."""
    best = screen["best_option"] if screen else None
    return plan.variants + ((best,) if best and best not in plan.variants else ())


def fleet_variants(screen: dict | None) -> tuple[str, ...]:
    return tuple(screen["fleet_fedfar"] if screen and v == OPTION_BASE else v for v in FLEET_VARIANTS)


def write_fleet(plan: Plan, records: list[dict], benched: dict) -> None:
    rows = fleet_summary(summarize(records, benched))
    text = fleet_table(rows) + "\n\n" + goals(rows, fleet=True)
    (plan.out / "fleet.md").write_text(text + "\n")
    (plan.out / "fleet_results.json").write_text(json.dumps({"rows": rows, "runs": records}, indent=2,
                                                            default=float) + "\n")
    band_plot(rows, "sim_cum", "simulated time (min)", plan.out / "fleet_metric_vs_time.png",
              f"{plan.task.upper()} on the mixed edge fleet, {len(plan.seeds)} seeds per variant", scale=60)
    print(text)


def write_main(plan: Plan, records: list[dict], benched: dict, lrs: dict[str, float]) -> None:
    rows = summarize(records, benched)
    text = table(rows, plan.task)
    winners = {k: pareto_winners(rows, k) for k in ("mb_total", "peak_mib")}
    (plan.out / "table.md").write_text(
        text + "\n\nUplink and downlink per client per round are the mean training message; priming's messages "
        "(with re-priming, every refresh sends the trainable part of the global model to every client) count in total "
        "MB.\n\nPareto front (no other variant costs less, or the same within 0.1%, and ends higher): by total MB: "
        + ", ".join(winners["mb_total"]) + "; by peak training memory: " + ", ".join(winners["peak_mib"]) + ".\n\n"
        + goals(rows) + "\n")
    (plan.out / "results.json").write_text(json.dumps({"rows": rows, "runs": records, "lr": lrs,
                                                       "pareto": winners}, indent=2, default=float) + "\n")
    paths = plot(rows, plan.out, f"{plan.task.upper()}, MiniLM-L6, {plan.clients} clients, "
                                 f"{len(plan.seeds)} seeds per variant")
    print(text)
    print(f"wrote {plan.out / 'table.md'}, results.json, {', '.join(p.name for p in paths)}", flush=True)


def count_runs(plan: Plan, stage: str) -> int:
    """The runs this start will walk through (kept ones count: progress names each). A sweep that extends its grid
    adds one; Progress takes that in its stride."""
    if plan.report_only:
        return 0
    sweeps = sum(len(lr_grid(m)) for m in plan.methods) if plan.sweep and stage in ("all", "sweep") else 0
    screen = len(OPTIONS) if screened(plan) and stage in ("all", "options") else 0
    variants = len(plan.variants) + screened(plan)  # + the best option
    seeds = variants * len(plan.seeds) if stage in ("all", "seeds") else 0
    fleet = len(FLEET_VARIANTS) * len(plan.seeds) if stage in ("all", "fleet") and plan.fleet else 0
    return sweeps + screen + seeds + fleet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sst2,cola")
    p.add_argument("--stage", choices=("all", "bench", "sweep", "options", "seeds", "fleet", "report"), default="all",
                   help="report: lr.json, sweep.md, the table and figures from the runs finished so far; runs nothing")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"default: all of {', '.join(DEFAULT_VARIANTS)}; FedFAR's options: {', '.join(OPTIONS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--out", default="docs/studies/field")
    p.add_argument("--quick", action="store_true",
                   help="<= 20 min on 2 cores: SST-2, fedavg-full, lora8, far10-emb, 2 seeds, 3 rounds of 20 steps, "
                        "no sweep "
                        "(the rates the study's sweep chose, docs/studies/field/<task>/lr.json, where it has; else "
                        "1e-4 for full, 3e-4 for the others), into results/field-quick")
    args = p.parse_args()
    tasks, variants = args.tasks.split(","), args.variants.split(",")
    if args.quick:
        tasks, variants, args.seeds = ["sst2"], ["fedavg-full", "lora8", "far10-emb"], "0,1"
        args.out = "results/field-quick" if args.out == p.get_default("out") else args.out
    unknown = sorted(set(variants) - set(VARIANTS))
    bad_tasks = [t for t in tasks if not (PROJECT_DIR / f"configs/field_{t}.toml").exists()]
    if unknown or bad_tasks:
        raise SystemExit(f"unknown variant(s) {unknown} (choose from {', '.join(VARIANTS)}) or task(s) {bad_tasks} "
                         "(a task needs configs/field_<task>.toml)")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    holdout = {"sst2": 872, "cola": 1043}  # as many rows as the task's dev set
    plans = [Plan(t, f"configs/field_{t}.toml", args.clients, holdout.get(t, 1000), seeds, tuple(variants),
                  (PROJECT_DIR / args.out / t).resolve(), extra=QUICK_RUN if args.quick else (),
                  sweep=not args.quick, fleet=not args.quick,
                  lr_file=PROJECT_DIR / p.get_default("out") / t / "lr.json", report_only=args.stage == "report")
             for t in tasks]
    progress = Progress(sum(count_runs(pl, args.stage) for pl in plans))
    start = time.perf_counter()
    for plan in plans:
        run_task(plan, args.stage, progress)
    print(f"study wall time: {(time.perf_counter() - start) / 60:.1f} min (runs kept from an earlier start cost "
          "nothing)", flush=True)


if __name__ == "__main__":
    main()
