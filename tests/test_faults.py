"""Faulty and malicious devices in real Ray runs: every kind of fault injected, the run survives, the ledger says
what happened, the global model stays finite; median aggregation withstands a scaled update."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fedfar.data import default_glue_dir
from fedfar.federation.launch import PROJECT_DIR, run_simulation
from fedfar.federation.results import read_jsonl

pytestmark = [pytest.mark.ray]
TINY = PROJECT_DIR / "configs" / "tiny.toml"


def _run(tmp: Path, name: str, clients: int, **overrides) -> Path:
    values = {"results-dir": str(tmp), "run-name": name, "data": str(default_glue_dir()), **overrides}
    assert run_simulation(TINY, clients, overrides=values, stream=False) == 0
    return tmp / name


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("faults"), "every-kind", 8,
                faults=str(PROJECT_DIR / "configs" / "faults" / "every_kind.toml"), **{"round-timeout-s": 45.0})


def test_every_kind_of_fault_is_survived_and_recorded(every_kind):
    ledger = read_jsonl(every_kind / "ledger.jsonl")  # JSON keeps the label "nan" a string, as CSV readers do not
    train = ledger[ledger.phase == "train"]
    status = {(r.round, r.partition_id): r.status for r in train.itertuples()}
    error = {(r.round, r.partition_id): r.error for r in train.itertuples()}
    fault = {(r.round, r.partition_id): r.fault for r in train.itertuples()}
    for rnd in (1, 2):
        assert status[rnd, 0] == "ok" and status[rnd, 7] == "ok"                  # honest; scaled is finite: merged
        assert status[rnd, 1] == status[rnd, 2] == status[rnd, 3] == "rejected"  # nan, inf, wrong-shape
        assert status[rnd, 4] == "error" and status[rnd, 6] == "lost"             # crash; drop
        assert [fault[rnd, p] for p in (1, 2, 3, 4, 6, 7)] == ["nan", "inf", "wrong-shape", "crash", "drop",
                                                               "scale:1000"]
    assert status[1, 5] == "lost" and fault[1, 5] == "hang" and "round-timeout-s" in error[1, 5]
    assert status[2, 5] == "ok"  # the hang was for round 1 only: the device is back
    assert "non-finite" in error[1, 1] and "non-finite" in error[1, 2] and "shape (3, 3)" in error[1, 3]
    assert error[1, 4].startswith("ClientApp raised: injected fault") and "dropped" in error[1, 6]
    rounds = pd.read_csv(every_kind / "rounds.csv")
    assert rounds.clients_rejected.tolist()[1:] == [3, 3]
    weights = load_file(every_kind / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    summary = json.loads((every_kind / "summary.json").read_text())
    assert summary["rounds"] == 2


def test_median_moves_the_model_no_more_than_honest_clients_do(tmp_path):
    faults = str(PROJECT_DIR / "configs" / "faults" / "one_scaled.toml")
    run = _run(tmp_path, "median", 4, faults=faults, aggregator="median")
    ledger = read_jsonl(run / "ledger.jsonl")
    train = ledger[ledger.phase == "train"]
    assert (train.status == "ok").all() and (train[train.partition_id == 3].fault == "scale:1000").all()
    rounds = pd.read_csv(run / "rounds.csv").set_index("round")
    for rnd, group in train.groupby("round"):
        honest = group[group.partition_id != 3].update_norm
        # the scaled client's update is 1000x an honest one; the merged change is within what honest clients sent
        assert rounds.loc[rnd, "update_norm"] <= honest.max()
