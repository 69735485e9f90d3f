"""End to end through `flwr run` with Ray: a tiny random BERT on a sliver of the shared CoLA files.

Each run takes ~60 s on 2 cores, almost all of it Flower and Ray start-up, so the runs are shared by module, and
one of them (LoRA) runs its clients on a Ray cluster the fixture starts for it. Same-seed determinism is checked
by the resume test (tests/test_resume.py), whose resumed half runs on new, random node ids.
"""
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import mcc_by_hand
from transformers import AutoModelForSequenceClassification

from fedfar.federation import exchange
from fedfar.devices.budget import TrainingShape, peak_bytes
from fedfar.federation.config import RunConfig
from fedfar.devices.profiles import load_catalog
from fedfar.data import by_length, carve_holdout, default_glue_dir, get_task, load_glue, make_loader, tokenize
from fedfar.federation.launch import PROJECT_DIR, bin_path, flower_env, free_port, port_in_use, run_simulation
from fedfar.federation.processes import process_tree, stop_process_tree
from fedfar.federation.client import WorkerCache
from fedfar.models import load_model, load_tokenizer
from fedfar.train import predict

pytestmark = [pytest.mark.ray]
TINY = PROJECT_DIR / "configs" / "tiny.toml"


def _run(tmp: Path, name: str, ray_address: str = "", **overrides) -> Path:
    values = {"results-dir": str(tmp), "run-name": name, "data": str(default_glue_dir()), **overrides}
    assert run_simulation(TINY, 2, overrides=values, stream=False, ray_address=ray_address) == 0
    return tmp / name


def _run_on_ray_head(tmp: Path, name: str, **overrides) -> tuple[Path, dict]:
    """A run whose clients run on a Ray head started here (127.0.0.1, its own port, our child), stopped by its
    process id afterwards. Returns the run and what the test checks of the head: its pid and its workers' logs."""
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # Ray's socket paths must stay under 107 characters
    head = subprocess.Popen(
        [bin_path("ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
        env=flower_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not port_in_use(port):
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head never listened"
            time.sleep(0.5)
        run = _run(tmp, name, ray_address=f"127.0.0.1:{port}", **overrides)
        logs = [p.read_text(errors="replace") for p in temp.glob("session_*/logs/worker-*") if p.is_file()]
    finally:
        stop_process_tree(head)
        shutil.rmtree(temp, ignore_errors=True)
    return run, {"pid": head.pid, "worker_logs": logs}


def _fleet(tmp: Path) -> dict:
    """Two devices for configs/tiny.toml trained with `full`: 'roomy' fits, 'cramped' is short of the whole-batch
    peak but fits with micro-batches of 4 (budgets from the accounting itself, so they bite whatever the model)."""
    factory = lambda: load_model("random:bert-tiny", 2, seed=0)  # noqa: E731
    whole = peak_bytes(factory, "full", TrainingShape.for_method("full", 8, 32)).peak_training_bytes
    half = peak_bytes(factory, "full", TrainingShape.for_method("full", 8, 32, micro_batch=4)).peak_training_bytes
    assert half < whole
    (tmp / "devices.toml").write_text(
        f'[roomy]\nmemory = {4 * whole}\ncompute = "2 GFLOPS"\nuplink = "1 Mbit/s"\ndownlink = "4 Mbit/s"\n'
        'availability = 1.0\n'
        f'[cramped]\nmemory = {(half + whole) // 2}\ncompute = "1 GFLOPS"\nuplink = "0.5 Mbit/s"\n'
        'downlink = "2 Mbit/s"\navailability = 1.0\n')
    (tmp / "fleet.toml").write_text('devices = ["roomy", "cramped"]\n')
    return {"method": "full", "fleet": str(tmp / "fleet.toml"), "device-catalog": str(tmp / "devices.toml")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    fleet = _fleet(tmp)
    lora, head = _run_on_ray_head(tmp, "lora", **{"method": "lora4", "num-rounds": 1})
    return {
        "oom-fail": _run(tmp, "oom-fail", **fleet, **{"oom-policy": "fail"}),
        # 'cramped' needs ~350 simulated s a round (a ~17.6 MB model each way at 2 / 0.5 Mbit/s), 'roomy' ~180 s.
        "oom-adapt": _run(tmp, "oom-adapt", **fleet, **{"oom-policy": "adapt", "num-rounds": 1,
                                                        "deadline-s": 250.0}),
        "global": _run(tmp, "global"),
        "local": _run(tmp, "local", **{"mask-mode": "local", "codec": "int8", "num-rounds": 1,
                                        "federated-eval": True, "eval-share": 0.25, "holdout-examples": 100}),
        "lora": lora,
        "ray-head": head,
    }


def _cfg(run: Path) -> RunConfig:
    return RunConfig.from_flower(json.loads((run / "config.json").read_text()))


def _payload(cfg: RunConfig, rows: list[list[int]] | None, codec: str = "float32", with_rows: bool = True) -> int:
    """Bytes of array data in a part of this run's plan, built independently of the run from the plan alone and
    counted from the tensors, not by the codec: numel x the codec's element size, int8 with a float32 scale per
    row (a 1-D tensor is one row), row indices as int32 (codecs.py's documented wire layout)."""
    model = cfg.spec.attach(load_model(cfg.model, 2, seed=cfg.seed), cfg.seed)
    plan = cfg.spec.exchange_plan(model)
    part = exchange.select(model.state_dict(), plan, [torch.tensor(r, dtype=torch.long) for r in rows] if rows else None)
    size = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}[codec]
    total = 0
    for name, t in part.items():
        if name.endswith(".rows"):
            total += 4 * t.numel() if with_rows else 0
        else:
            total += size * t.numel() + (4 * (t.shape[0] if t.dim() > 1 else 1) if codec == "int8" else 0)
    return total


def test_ledger_counts_exactly_what_was_serialized(runs):
    run = runs["global"]
    ledger = pd.read_csv(run / "ledger.csv")
    mask = json.loads((run / "mask.json").read_text())
    down = _payload(_cfg(run), mask["learners"])
    up = _payload(_cfg(run), mask["learners"], with_rows=False)
    n_rows = sum(len(r) for r in mask["learners"])  # int32 row indices travel down only
    prime = ledger[ledger.phase == "prime"]
    train = ledger[ledger.phase == "train"]
    assert len(prime) == 2 and len(train) == 2 * 2 and (ledger.status == "ok").all()
    # Priming sends scores only: one float32 per FFN node, no weights.
    assert (prime.payload_up == 4 * sum(mask["ffn_sizes"])).all()
    # Down: the trainable part of the global model + the mask (int32); up: the delta without the mask.
    assert (train.payload_down == up + 4 * n_rows).all() and (train.payload_down == down).all()
    assert (train.payload_up == up).all()
    # Flower's protobuf framing and the metadata come on top of the payload, and are counted too.
    assert (train.bytes_up > train.payload_up).all() and (train.bytes_up < train.payload_up * 1.01 + 4096).all()
    assert ledger.cum_bytes_up.iloc[-1] == ledger.bytes_up.sum()
    summary = json.loads((run / "summary.json").read_text())
    # The totals hold every training and priming message (priming: scores up, small requests down).
    assert summary["mb_up"] == pytest.approx((train.bytes_up.sum() + prime.bytes_up.sum()) / 1e6, rel=1e-12)
    assert summary["mb_down"] == pytest.approx((train.bytes_down.sum() + prime.bytes_down.sum()) / 1e6, rel=1e-12)
    assert prime.bytes_up.sum() > 0 and prime.bytes_down.sum() > 0
    # Beside it, what FedAvg-full would have sent for the same 4 training messages: every parameter, float32.
    full = 4 * sum(p.numel() for p in load_model(_cfg(run).model, 2, seed=0).parameters())
    assert summary["train_messages"] == 4
    assert summary["fedavg_full_mb_down"] == summary["fedavg_full_mb_up"] == pytest.approx(4 * full / 1e6, rel=1e-12)


def test_frozen_parameters_of_the_global_model_never_change(runs):
    run = runs["global"]
    cfg = _cfg(run)
    initial = load_model(cfg.model, 2, seed=cfg.seed).state_dict()
    final = type(load_model(cfg.model, 2)).from_pretrained(run / "model").state_dict()
    plan = cfg.spec.exchange_plan(load_model(cfg.model, 2))
    learners = json.loads((run / "mask.json").read_text())["learners"]
    sent = set(plan.dense)
    for name, before in initial.items():
        if name in sent:
            continue
        ffn = [(i, entry.index(name)) for i, entry in enumerate(plan.ffn) if name in entry]
        if not ffn:
            assert torch.equal(final[name], before), name  # embeddings: frozen under far25-emb
            continue
        block, which = ffn[0]
        frozen = torch.ones(before.shape[0 if which < 2 else 1], dtype=torch.bool)
        frozen[learners[block]] = False
        if which < 2:
            assert torch.equal(final[name][frozen], before[frozen]), name
            assert not torch.equal(final[name][~frozen], before[~frozen]), name
        else:
            assert torch.equal(final[name][:, frozen], before[:, frozen]), name
    assert not torch.equal(final["classifier.weight"], initial["classifier.weight"])


def test_lora_sends_adapters_and_head_only_and_saves_a_merged_plain_checkpoint(runs):
    run = runs["lora"]
    cfg = _cfg(run)
    train = pd.read_csv(run / "ledger.csv").query("phase == 'train'")
    assert len(train) == 2 and (train.status == "ok").all()
    # rank 4 on query and value of 2 blocks of hidden 128, and the 128 x 2 + 2 head: nothing else travels
    adapters = 2 * 2 * 4 * (128 + 128) + 258
    assert _payload(cfg, None) == 4 * adapters
    assert (train.payload_up == 4 * adapters).all() and (train.payload_down == 4 * adapters).all()
    initial = load_model(cfg.model, 2, seed=cfg.seed).state_dict()
    final = AutoModelForSequenceClassification.from_pretrained(run / "model").state_dict()  # plain transformers
    assert final.keys() == initial.keys()
    changed = {n for n in initial if not torch.equal(final[n], initial[n])}
    assert changed == {f"bert.encoder.layer.{i}.attention.self.{p}.weight" for i in range(2) for p in ("query", "value")
                       } | {"classifier.weight", "classifier.bias"}


def test_local_mask_mode_sends_row_indices_and_int8_deltas(runs):
    run = runs["local"]
    ledger = pd.read_csv(run / "ledger.csv")
    assert set(ledger.phase) == {"register", "train", "evaluate"} and (ledger.status == "ok").all()  # no priming
    # Federated evaluation's traffic is in the ledger too: the part down, metrics (no arrays) up, one per device,
    # and its totals in the round's row beside (not in) the training's.
    evals, rounds = ledger[ledger.phase == "evaluate"], pd.read_csv(run / "rounds.csv")
    assert sorted(evals.partition_id) == [0, 1] and (evals.payload_up == 0).all() and (evals.bytes_up > 0).all()
    exact = dict(rel=1e-12)  # pandas' CSV reader does not round-trip every float to the last bit
    assert rounds.eval_mb_down.iloc[-1] == pytest.approx(evals.bytes_down.sum() / 1e6, **exact)
    assert rounds.eval_mb_up.iloc[-1] == pytest.approx(evals.bytes_up.sum() / 1e6, **exact)
    assert rounds.mb_down.iloc[-1] == pytest.approx(ledger[ledger.phase == "train"].bytes_down.sum() / 1e6, **exact)
    ledger = ledger[ledger.phase == "train"]
    cfg = _cfg(run)
    rows = [list(range(128))] * 2  # bert-tiny: 2 FFN blocks of 512 nodes, 25% learners (sizes are what count)
    # int8 (a byte per element + a float32 scale per row) with each device's own int32 row indices.
    assert (ledger.payload_up == _payload(cfg, rows, "int8")).all()
    assert (ledger.payload_up < 0.3 * _payload(cfg, rows, "float32")).all()
    assert (ledger.codec_rel_l2 > 0).all() and (ledger.codec_rel_l2 < 0.02).all()
    # Round 1 downlink carries no FFN rows yet: nobody has trained any.
    assert (ledger.payload_down == _payload(cfg, [[]] * 2)).all()
    # Federated evaluation on each device's held-out quarter, next to the server's metric, here on 100 train rows
    # carved out of every partition (holdout-examples; its first 64, dev-examples). Both evaluated the global model
    # after the only round, the one saved: recompute both from it, the MCC counted by hand, the federated one
    # weighted by each device's held-out examples.
    rounds = pd.read_csv(run / "rounds.csv")
    assert {"mcc", "fed_mcc"} <= set(rounds.columns) and len(rounds) == 2
    model = type(load_model(cfg.model, 2)).from_pretrained(run / "model")
    tokenizer, task = load_tokenizer(cfg.model), get_task(cfg.task)
    train = load_glue(task, "train", cfg.data_source)
    rest, holdout = carve_holdout(train, 100, cfg.partition_seed)
    assert json.loads((run / "summary.json").read_text())["eval_set"] == "train holdout of 64"
    assert rounds.mcc.iloc[-1] == pytest.approx(_mcc(model, tokenize(holdout.select(range(64)), tokenizer, task,
                                                                      cfg.max_length), tokenizer), abs=1e-9)
    # No client trains on a holdout row: the partitions split the rest of train, all of it.
    index = WorkerCache().index(cfg, 2)
    parts = [set(index.load(p)["idx"]) for p in range(2)]
    assert parts[0] | parts[1] == set(rest["idx"]) and not (parts[0] | parts[1]) & set(holdout["idx"])
    held_out = [WorkerCache().partition(cfg, partition, 2)[1] for partition in range(2)]
    fed = sum(_mcc(model, h, tokenizer) * len(h) for h in held_out) / sum(len(h) for h in held_out)
    assert rounds.fed_mcc.iloc[-1] == pytest.approx(fed, abs=1e-9)


def _mcc(model, ds_tok, tokenizer) -> float:
    """Matthews correlation of the model's predictions on a tokenized set, from the confusion counts by hand."""
    logits, gold = predict(model, make_loader(by_length(ds_tok), tokenizer, 128, shuffle=False))  # as evaluated
    return mcc_by_hand(logits.argmax(1), gold)


def _clock_matches_the_formula(ledger: pd.DataFrame, catalog: dict) -> None:
    for _, e in ledger[ledger.phase == "train"].iterrows():
        p = catalog[e.device]
        flops = 0.0 if pd.isna(e.get("train_flops")) else e.train_flops
        want = e.bytes_down / p.downlink_bytes_per_s + flops / p.flops_per_s + e.bytes_up / p.uplink_bytes_per_s
        assert e.sim_total_s == pytest.approx(want, rel=1e-9)


def test_a_device_over_budget_fails_as_configured_and_the_run_goes_on(runs):
    run = runs["oom-fail"]
    cfg = _cfg(run)
    catalog = load_catalog(extra=cfg.device_catalog)
    ledger = pd.read_csv(run / "ledger.csv")
    assert dict(zip(ledger[ledger.phase == "register"].partition_id, ledger[ledger.phase == "register"].device)) \
        == {0: "roomy", 1: "cramped"}
    train = ledger[ledger.phase == "train"]
    cramped, roomy = train[train.device == "cramped"], train[train.device == "roomy"]
    assert len(cramped) == len(roomy) == 2
    assert (cramped.status == "oom").all() and (roomy.status == "ok").all()
    assert (cramped.peak_bytes > cramped.budget_bytes).all() and (cramped.budget_bytes == catalog["cramped"]
                                                                 .memory_budget_bytes).all()
    assert (cramped.payload_up == 0).all() and (cramped.error == "oom-train").all()  # figures, no weights
    assert (roomy.train_flops > 0).all() and (roomy.micro_batch == 8).all()
    rounds = pd.read_csv(run / "rounds.csv")
    assert rounds.clients_ok.tolist()[1:] == [1, 1] and rounds.clients_oom.tolist()[1:] == [1, 1]
    # The simulated clock: per device the formula; per round the slowest; cumulative in rounds.csv.
    _clock_matches_the_formula(ledger, catalog)
    slowest = train.groupby("round").sim_total_s.max()
    assert rounds.sim_round_s.tolist()[1:] == pytest.approx(slowest.tolist())
    assert rounds.sim_time_s.iloc[-1] == pytest.approx(slowest.sum())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["participation"] == 0.5 and summary["devices_never_trained"] == ["1:cramped"]
    # FedAvg-full's comparison counts what was sent down (4 messages) and the updates that came back (2).
    assert summary["fedavg_full_mb_down"] == pytest.approx(2 * summary["fedavg_full_mb_up"], rel=1e-12)


def test_a_device_over_budget_adapts_and_a_straggler_misses_the_deadline(runs):
    run = runs["oom-adapt"]
    ledger = pd.read_csv(run / "ledger.csv")
    train = ledger[ledger.phase == "train"].set_index("device")
    # Both trained; 'cramped' adapted, then finished after the 250 s deadline: its update is dropped.
    assert train.loc["roomy", "status"] == "ok" and train.loc["cramped", "status"] == "late"
    assert train.loc["roomy", "sim_total_s"] < 250 < train.loc["cramped", "sim_total_s"]
    rounds = pd.read_csv(run / "rounds.csv")
    assert rounds.sim_round_s.iloc[-1] == 250 and rounds.clients_late.iloc[-1] == 1
    assert rounds.clients_ok.iloc[-1] == 1
    assert train.loc["cramped", "micro_batch"] == 4 and train.loc["roomy", "micro_batch"] == 8
    assert train.loc["cramped", "peak_bytes"] <= train.loc["cramped", "budget_bytes"]
    assert train.loc["cramped", "adapted"] == "micro-batch 8 -> 4 (2 accumulation steps)"
    # Micro-batching changes memory, not work: both devices count the same FLOPs per example.
    per_example = train.train_flops / train.num_examples
    assert per_example.loc["cramped"] == pytest.approx(per_example.loc["roomy"], rel=0.3)
    _clock_matches_the_formula(ledger, load_catalog(extra=_cfg(run).device_catalog))


def test_no_process_is_left_behind(runs):
    import os

    # Everything the runs started (SuperLink, superexec, flwr-simulation, Ray) was stopped by its own pid.
    assert not process_tree(os.getpid()) - {os.getpid()}


def test_a_simulation_runs_its_client_actors_on_a_ray_head_started_for_it(runs):
    """`fedfar run --ray-address` (RAY_ADDRESS for Flower's Ray backend): the run completed, and Ray names the
    actor each worker hosts in that worker's log in the head's session folder, so the ClientApp actors ran on this
    head, not on a Ray instance the simulation started for itself. The head is gone after its stop."""
    assert (runs["lora"] / "summary.json").exists()
    assert any(":actor_name:ClientAppActor" in text for text in runs["ray-head"]["worker_logs"])
    assert not process_tree(runs["ray-head"]["pid"])
