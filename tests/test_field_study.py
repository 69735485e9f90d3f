"""The field study's arithmetic (simulations/field.py): seeds to mean +- sd, MB to 95% of FedAvg-full, the Pareto
front, and the kept-run check that stops a study from mixing two regimes. Its runs are real simulations; these
tests feed it runs whose numbers are known."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfar.federation.launch import PROJECT_DIR

sys.path.insert(0, str(PROJECT_DIR / "simulations"))
import field  # noqa: E402
from common import check_kept  # noqa: E402


def _run(variant, method, seed, curve, mb_per_round, up=1.0, down=2.0):
    return {"variant": variant, "method": method, "seed": seed, "label": method, "metric": "accuracy",
            "final": curve[-1], "curve": curve, "mb_cum": [mb_per_round * r for r in range(len(curve))],
            "up_mb_client_round": up, "down_mb_client_round": down, "mb_total": mb_per_round * (len(curve) - 1),
            "wall_s": 60.0, "lr": 1e-4, "run_dir": "x"}


def test_seeds_become_mean_and_sd_and_the_mb_to_95_percent_is_read_off_the_mean_curve():
    records = [
        _run("fedavg-full", "full", 0, [0.5, 0.70, 0.80, 0.90], 100.0),
        _run("fedavg-full", "full", 1, [0.5, 0.72, 0.84, 0.86], 100.0),
        _run("far10-emb", "far10-emb", 0, [0.5, 0.60, 0.86, 0.88], 20.0),
        _run("far10-emb", "far10-emb", 1, [0.5, 0.62, 0.84, 0.86], 20.0),
        _run("bitfit", "bitfit", 0, [0.5, 0.55, 0.60, 0.65], 1.0),
    ]
    bench = {"full": {"peak_training_bytes": 512 * 2**20, "time_ratio": 1.0, "memory_ratio": 1.0},
             "far10-emb": {"peak_training_bytes": 256 * 2**20, "time_ratio": 0.7, "memory_ratio": 0.5}}
    rows = {r["variant"]: r for r in field.summarize(records, bench)}
    full, far, bitfit = rows["fedavg-full"], rows["far10-emb"], rows["bitfit"]
    assert full["final_mean"] == pytest.approx(0.88) and full["final_sd"] == pytest.approx(np.std([0.9, 0.86], ddof=1))
    assert far["curve_mean"] == pytest.approx([0.5, 0.61, 0.85, 0.87])
    # 95% of FedAvg-full's 0.88 is 0.836: its own mean curve reaches it at round 3 (300 MB), FAR's at round 2.
    assert far["target"] == pytest.approx(0.836)
    assert full["mb_to_target"] == 300.0 and far["mb_to_target"] == 40.0 and bitfit["mb_to_target"] == float("inf")
    assert far["bytes_ratio"] == pytest.approx(60 / 300) and far["gap_points"] == pytest.approx(-1.0)
    assert far["gap_within_spread"]  # 1 point apart, FedAvg-full's sd is 2.8 points
    assert not bitfit["gap_within_spread"] and np.isnan(bitfit["final_sd"])  # one seed: no spread
    assert far["peak_mib"] == 256 and far["time_ratio"] == 0.7 and np.isnan(bitfit["peak_mib"])
    text = field.table(list(rows.values()), "sst2")
    assert "| far10-emb (0.0001) | 0.870 +- 0.014 (2) | -1.0 (inside the spread) |" in text
    assert "| not reached |" in text
    assert field.goals(list(rows.values())).splitlines()[1:] == [
        "- far10-emb: -1.0 points against FedAvg-full (inside the spread), 0.200x its bytes: goal met (2 seeds)"]
    far["gap_points"] = -1.2
    assert field.goals([far]).endswith("goal not met (2 seeds)")
    far.update(gap_points=0.5, bytes_ratio=0.25)  # level, but too many bytes
    assert field.goals([far]).endswith("0.250x its bytes: goal not met (2 seeds)")
    control = {**far, "variant": "random10-emb", "bytes_ratio": 0.1}  # the random mask is not FedFAR
    assert field.goals([far, control]).count("\n- ") == 1 and field.goals([control]) == ""


def test_the_pareto_front_keeps_only_points_nothing_beats_on_both_axes():
    pts = [(10.0, 0.80, {}), (1.0, 0.60, {}), (100.0, 0.85, {}), (50.0, 0.79, {}), (10.0, 0.70, {}),
           (1.0, 0.65, {})]
    assert field.pareto(pts) == [(1.0, 0.65), (10.0, 0.80), (100.0, 0.85)]
    rows = [{"variant": v, "mb_total": x, "final_mean": y} for v, x, y in
            (("a", 10.0, 0.8), ("b", 1.0, 0.6), ("c", 50.0, 0.79), ("d", float("nan"), 0.99))]
    assert field.pareto_winners(rows, "mb_total") == ["b", "a"]


def test_a_few_bytes_fewer_do_not_put_a_worse_metric_on_the_pareto_front():
    # CoLA: server momentum sent 13 bytes fewer than plain FedFAR in 1.77 GB, at a lower MCC
    far, momentum = (1768.9514313, 0.219, {}), (1768.9514187, 0.216, {})
    assert field.pareto([far, momentum]) == [far[:2]]
    assert field.pareto([far, (far[0] * 0.99, 0.216, {})]) == [(far[0] * 0.99, 0.216), far[:2]]  # 1% less: a cost
    assert field.pareto([far, far]) == [far[:2]]  # a tie on both axes is one point, on the front


def test_a_kept_run_with_other_settings_stops_the_study(tmp_path):
    config = tmp_path / "study.toml"  # a study's config file, fixed here (the real ones change with the study)
    config.write_text('task = "sst2"\nmax-train-examples = 480\nnum-rounds = 10\n')
    run = tmp_path / "run"
    run.mkdir()
    stored = {"task": "sst2", "lr": 0.0003, "method": "far10-emb", "max-train-examples": 480, "num-rounds": 10}
    (run / "config.json").write_text(json.dumps(stored))
    check_kept(run, config, {"lr": 3e-4, "method": "far10-emb"})  # the same run: kept
    with pytest.raises(SystemExit, match=r"lr 0.0003 -> 0.001\).*delete the folder"):
        check_kept(run, config, {"lr": 1e-3, "method": "far10-emb"})
    with pytest.raises(SystemExit, match=r"max-train-examples 480 -> 320"):
        check_kept(run, config, {"lr": 3e-4, "method": "far10-emb", "max-train-examples": 320})
    # Defaults count too (a default changed since would change the run), where the run was written does not.
    (run / "config.json").write_text(json.dumps({**stored, "results-dir": "elsewhere", "priming-share": 0.05}))
    with pytest.raises(SystemExit, match=r"\(priming-share 0.05 -> 0.01\)"):
        check_kept(run, config, {"lr": 3e-4, "method": "far10-emb"})


def test_every_variant_and_grid_names_a_method_the_run_config_accepts():
    from fedfar.federation.config import RunConfig

    for name, (method, extra) in field.VARIANTS.items():
        for lr in field.lr_grid(method):
            RunConfig.from_flower({"method": method, "lr": lr, **extra})
    assert Path(PROJECT_DIR / "configs/field_sst2.toml").exists()


def test_the_sweep_picks_the_rate_with_the_best_mean_of_the_last_rounds_and_waits_for_a_whole_grid(tmp_path):
    plan = field.Plan("sst2", "configs/field_sst2.toml", 10, 872, (0,), ("fedavg-full", "far10-emb"), tmp_path,
                      report_only=True)
    curves = {  # 3e-4 has the best final (0.90) but a worse mean of the last 3 rounds than 1e-4
        ("full", 3e-5): [0.5, 0.70, 0.75, 0.78], ("full", 1e-4): [0.5, 0.86, 0.87, 0.88],
        ("full", 3e-4): [0.5, 0.60, 0.70, 0.90], ("far10-emb", 1e-4): [0.5, 0.6, 0.7, 0.8]}
    for (method, lr), curve in curves.items():
        run = tmp_path / "runs" / f"sweep-{method}-lr{lr:g}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"metric": "accuracy", "final_metric": curve[-1]}))
        (run / "rounds.csv").write_text("round,accuracy\n" + "".join(f"{i},{m}\n" for i, m in enumerate(curve)))
    chosen = field.sweep(plan, field.Progress(0))
    assert chosen == {"full": 1e-4}  # far10-emb has run one rate of three: not tuned yet
    stored = json.loads((tmp_path / "lr.json").read_text())
    assert stored["chosen"] == {"full": 1e-4}
    assert stored["holdout_mean_last_3"]["full"]["0.0003"] == pytest.approx(np.mean([0.6, 0.7, 0.9]))
    assert "| full | **0.0001** | 0.500 0.860 0.870 0.880 | **0.870** |" in (tmp_path / "sweep.md").read_text()


def test_the_fleet_stage_reads_simulated_time_to_fedavg_fulls_final_metric():
    def run(variant, seed, curve, seconds_per_round):
        r = _run(variant, "full" if variant == "fedavg-full" else "far10-emb", seed, curve, 10.0)
        r["sim_cum"] = [seconds_per_round * i for i in range(len(curve))]
        r.update(sim_client_s=seconds_per_round * (len(curve) - 1), sim_compute_s=seconds_per_round / 2)
        return r

    records = [run("fedavg-full", 0, [0.5, 0.7, 0.80, 0.82], 600.0),
               run("fedavg-full", 1, [0.5, 0.7, 0.80, 0.84], 600.0),
               run("far10-emb", 0, [0.5, 0.8, 0.84, 0.85], 200.0),
               run("far10-emb", 1, [0.5, 0.8, 0.82, 0.83], 200.0)]
    rows = {r["variant"]: r for r in field.fleet_summary(field.summarize(records, {}))}
    full, far = rows["fedavg-full"], rows["far10-emb"]
    assert full["sim_total_s"] == 1800.0 and far["sim_total_s"] == 600.0
    # FedAvg-full ends at 0.83 (mean); FAR's mean curve (0.5, 0.8, 0.83, 0.84) reaches it at round 2, 400 s.
    assert far["sim_to_baseline_final"] == 400.0 and far["sim_ratio"] == pytest.approx(400 / 1800)
    assert full["sim_to_baseline_final"] == 1800.0 and full["sim_ratio"] == 1.0
    # Within 1 point of 0.83 is 0.82: FAR's mean curve is there at round 2 too, FedAvg-full's (0.5, 0.7, 0.8,
    # 0.83) only at its last round.
    assert far["sim_to_within_1pt"] == 400.0 and full["sim_to_within_1pt"] == 1800.0
    text = field.fleet_table(list(rows.values()))
    assert ("| far10-emb (0.0001) | 0.840 +- 0.014 (2) | 10.0 min | 6.7 min | 0.22 | 6.7 min | 0.22 | "
            "200 of 1200 (17%) | 30 |") in text  # client time summed over both seeds: 2 x 600 s, 2 x 100 s local compute
    assert field.goals([far], fleet=True).splitlines()[1:] == [
        "- far10-emb: FedAvg-full's final metric in 0.22x its simulated time (within 1 point of it in 0.22x): "
        "goal met (2 seeds)"]
    # A FedFAR that ends 0.5 point below never reaches FedAvg-full's final, but comes within 1 point of it.
    records[2:] = [run("far10-emb", 0, [0.5, 0.7, 0.81, 0.825], 200.0),
                   run("far10-emb", 1, [0.5, 0.7, 0.82, 0.825], 200.0)]
    rows = {r["variant"]: r for r in field.fleet_summary(field.summarize(records, {}))}
    far = rows["far10-emb"]
    assert far["sim_ratio"] == float("inf") and far["sim_to_within_1pt"] == 600.0
    assert "| 10.0 min | not reached |  | 10.0 min | 0.33 | 200 of 1200 (17%) | 30 |" in field.fleet_table(
        list(rows.values()))
    assert field.goals([far], fleet=True).endswith(
        "never reached FedAvg-full's final metric (within 1 point of it in 0.33x): goal not met (2 seeds)")


def test_a_sweep_whose_best_rate_is_at_an_end_goes_one_step_further():
    assert field.extension({1e-4: 0.8, 3e-4: 0.85, 1e-3: 0.82}) is None  # the best is inside
    assert field.extension({1e-4: 0.57, 3e-4: 0.77, 1e-3: 0.83}) == 3e-3
    assert field.extension({3e-5: 0.86, 1e-4: 0.84, 3e-4: 0.80}) == 1e-5
    assert field.extension({1e-2: 0.9, 3e-3: 0.8}) is None  # the ladder ends
    assert field.extension({}) is None


def test_a_flat_sweep_goes_to_larger_rates_up_to_the_ladders_top():
    flat = {1e-4: 0.0, 3e-4: 0.0, 1e-3: 0.0}  # BitFit on CoLA: the majority class at every rate of the grid
    assert field.extension(flat) == 3e-3
    assert field.extension({**flat, 3e-3: 0.0}) == 1e-2
    assert field.extension({**flat, 3e-3: 0.0, 1e-2: 0.0}) is None  # the top: tuned, the tie picks 1e-4
    assert field.extension({1e-3: 0.0}) == 3e-3  # one rate alone is its own best, at the top


def _finished(run_dir: Path, curve: list[float]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"metric": "accuracy", "final_metric": curve[-1]}))
    (run_dir / "rounds.csv").write_text("round,accuracy\n" + "".join(f"{i},{m}\n" for i, m in enumerate(curve)))


def test_the_options_screen_picks_the_best_far_configuration_on_the_holdout_and_never_the_control(tmp_path):
    plan = field.Plan("sst2", "configs/field_sst2.toml", 10, 872, (0,), ("fedavg-full", "far10-emb"), tmp_path,
                      report_only=True)
    runs = tmp_path / "runs"
    _finished(runs / "sweep-far10-emb-lr0.0003", [0.5, 0.80, 0.84, 0.85])  # the sweep's run is the reference
    scores = {"far10-emb-prime10": 0.84, "far10-emb-reprime3": 0.82, "far10-emb-local": 0.83,
              "far10-emb-fedavgm": 0.81, "random10-emb": 0.90}
    assert set(scores) == set(field.OPTIONS)
    for name, last in scores.items():
        if name not in ("far10-emb-local", "random10-emb"):
            _finished(runs / f"option-{name}-lr0.0003", [0.5, last, last, last])
    assert field.options(plan, {"far10-emb": 3e-4}, field.Progress(0)) is None  # a FAR option has not run
    assert field.options(plan, {"full": 1e-4}, field.Progress(0)) is None  # FAR's rate is not chosen yet
    _finished(runs / "option-far10-emb-local-lr0.0003", [0.5, 0.83, 0.83, 0.83])
    # The control has not run: no matter, it is never chosen. prime10 (0.84) is the best option; far10-emb's last
    # 3 rounds (0.83) are below it, so prime10 is also the fleet's FedFAR.
    screen = field.options(plan, {"far10-emb": 3e-4}, field.Progress(0))
    assert screen == {"best_option": "far10-emb-prime10", "fleet_fedfar": "far10-emb-prime10"}
    _finished(runs / "option-random10-emb-lr0.0003", [0.5, 0.9, 0.9, 0.9])
    assert field.options(plan, {"far10-emb": 3e-4}, field.Progress(0)) == screen  # the control scores best
    stored = json.loads((tmp_path / "options.json").read_text())
    assert stored["best_option"] == "far10-emb-prime10" and stored["lr"] == 3e-4
    assert stored["holdout_mean_last_3"]["far10-emb"] == pytest.approx(np.mean([0.80, 0.84, 0.85]))
    text = (tmp_path / "options.md").read_text()
    assert "| **far10-emb-prime10** | priming-share = 0.1 | 0.500 0.840 0.840 0.840 | **0.840** | +1.0 |" in text
    assert "| random10-emb | method = 'random10-emb' | 0.500 0.900 0.900 0.900 | 0.900 | +7.0 |" in text
    # The best option joins the seeds stage beside far10-emb; the fleet runs the better of the two.
    assert field.seed_variants(plan, screen) == ("fedavg-full", "far10-emb", "far10-emb-prime10")
    assert field.fleet_variants(screen) == ("fedavg-full", "far10-emb-prime10")
    # When far10-emb beats every option on the holdout (a tie too), the fleet runs far10-emb itself.
    (runs / "sweep-far10-emb-lr0.0003" / "rounds.csv").write_text("round,accuracy\n0,0.5\n1,0.84\n2,0.84\n3,0.84\n")
    screen = field.options(plan, {"far10-emb": 3e-4}, field.Progress(0))
    assert screen == {"best_option": "far10-emb-prime10", "fleet_fedfar": "far10-emb"}
    assert field.fleet_variants(screen) == ("fedavg-full", "far10-emb")
    # Another rate for far10-emb screens anew: the option runs at 3e-4 do not count for 1e-3.
    _finished(runs / "sweep-far10-emb-lr0.001", [0.5, 0.9, 0.9, 0.9])
    assert field.options(plan, {"far10-emb": 1e-3}, field.Progress(0)) is None
    # A study without far10-emb screens nothing and adds nothing to its seeds.
    other = field.Plan("sst2", "configs/field_sst2.toml", 10, 872, (0,), ("fedavg-full", "far10-emb-local"), tmp_path)
    assert not field.screened(other) and field.seed_variants(other, None) == ("fedavg-full", "far10-emb-local")
    assert field.fleet_variants(None) == ("fedavg-full", "far10-emb")


def test_a_sweep_of_a_few_methods_keeps_the_rates_the_others_have(tmp_path):
    for method, lr, last in (("full", 3e-5, 0.8), ("full", 1e-4, 0.86), ("full", 3e-4, 0.84),
                             ("bitfit", 1e-4, 0.7), ("bitfit", 3e-4, 0.75), ("bitfit", 1e-3, 0.74)):
        _finished(tmp_path / "runs" / f"sweep-{method}-lr{lr:g}", [0.5, last, last, last])
    plan = field.Plan("sst2", "configs/field_sst2.toml", 10, 872, (0,), ("bitfit",), tmp_path, report_only=True)
    assert field.sweep(plan, field.Progress(0)) == {"full": 1e-4, "bitfit": 3e-4}
    assert json.loads((tmp_path / "lr.json").read_text())["chosen"] == {"full": 1e-4, "bitfit": 3e-4}


@pytest.fixture
def ax():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def _labels(ax, pts) -> list[tuple]:
    """Plot the points, label them with annotate_apart, and return each label's (text, rendered box)."""
    for x, y, _ in pts:
        ax.plot(x, y, "o")
    field.annotate_apart(ax, pts)
    renderer = ax.figure.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]


def test_pareto_labels_share_a_point_and_never_overprint(ax):
    # fedavg-full and its int8 twin at one point; four more labels crowded within a pixel or two of each other
    pts = [(567, 0.848, {"variant": "fedavg-full"}), (567, 0.848, {"variant": "fedavg-full-int8"}),
           (222, 0.843, {"variant": "far10-attn"}), (222.5, 0.8425, {"variant": "far10-attn-int8"}),
           (223, 0.8431, {"variant": "far10-attn-long-name"}), (243, 0.811, {"variant": "bitfit"})]
    labels = _labels(ax, pts)
    assert sorted(text for text, _ in labels) == sorted(
        ["fedavg-full, fedavg-full-int8", "far10-attn", "far10-attn-int8", "far10-attn-long-name", "bitfit"])
    boxes = [box for _, box in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_crowded_pareto_labels_keep_their_points_order(ax):
    # CoLA's far10-emb and its momentum twin: the same bytes but for a rounding, 0.3 points apart, on a log axis;
    # the lower point comes first by x, and its label must still end up under the higher point's
    pts = [(1768.6, 0.216, {"variant": "lower"}), (1769.0, 0.219, {"variant": "higher"}),
           (9086.5, 0.252, {"variant": "fedavg-full"})]
    ax.set_xscale("log")
    ax.set_ylim(0.18, 0.30)  # as the error bars set it: the two points' labels would overlap where they stand
    box = dict(_labels(ax, pts))
    assert box["higher"].y0 > box["lower"].y0 and not box["higher"].overlaps(box["lower"])


def test_a_bench_missing_a_planned_method_runs_again_over_every_method_so_ratios_share_one_run(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text('model = "random:bert-tiny"\nbatch-size = 2\nmax-length = 8\n')

    def plan(*variants):
        return field.Plan("sst2", str(config), 2, 0, (0,), variants, tmp_path, fleet=False)

    path = tmp_path / "bench.json"
    assert field.bench(plan("fedavg-full", "far10-emb"), run=False) == {}  # a stage that only reads: no bench yet
    assert not path.exists()
    first = field.bench(plan("fedavg-full", "far10-emb"))
    assert list(first) == ["full", "far10-emb"] and first["full"]["time_ratio"] == 1.0
    assert field.bench(plan("fedavg-full"), run=True) == first  # nothing missing: nothing runs
    assert field.bench(plan("fedavg-full", "lora8"), run=False) == first  # a reading stage names what is missing
    assert "no figures for lora8; `--stage bench` measures them" in capsys.readouterr().out
    # Adding LoRA re-benches all three in one run: far10-emb is measured again beside it, not kept from the old run.
    second = field.bench(plan("fedavg-full", "lora8"))
    assert list(second) == ["full", "far10-emb", "lora8"]
    assert json.loads(path.read_text()) == list(second.values())
    assert second["far10-emb"]["step_times_s"] != first["far10-emb"]["step_times_s"]
    assert second["lora8"]["trainable_params"] < second["far10-emb"]["trainable_params"] < second["full"]["trainable_params"]
    # --report names what is missing and runs nothing; a study with the fleet stage benches the fleet's far10-emb.
    report = field.Plan("sst2", str(config), 2, 0, (0,), ("bitfit",), tmp_path, report_only=True)
    assert field.bench(report) == second and "no figures for bitfit" in capsys.readouterr().out
    assert list(field.bench(field.Plan("sst2", str(config), 2, 0, (0,), ("bitfit",), tmp_path / "f"))) == [
        "full", "bitfit", "far10-emb"]
