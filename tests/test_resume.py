"""Checkpoints and resume: a run killed with SIGKILL after round 1 of 3 ends byte-identical to one never killed."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from fedfar.cli import main
from fedfar.data import default_glue_dir
from fedfar.federation import checkpoint
from fedfar.federation.config import RunConfig
from fedfar.federation.launch import PROJECT_DIR, run_simulation
from fedfar.federation.processes import process_tree
from fedfar.federation.results import RunFolder
from fedfar.federation.server_app import check_same_run

TINY = PROJECT_DIR / "configs" / "tiny.toml"


def test_a_checkpoint_round_trips_tensors_generators_and_history(tmp_path):
    rng = random.Random(3)
    rng.random()
    state = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    checkpoint.save(tmp_path, 1, state, {"a/m": torch.ones(3, 4)}, {"rng": checkpoint.rng_state(rng), "x": [1.5]})
    checkpoint.save(tmp_path, 2, {k: v + 1 for k, v in state.items()}, {}, {"rng": checkpoint.rng_state(rng)})
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["latest.json", "round-0002.safetensors"]
    ck = checkpoint.load(tmp_path)
    assert ck.round == 2 and checkpoint.latest_round(tmp_path) == 2
    assert torch.equal(ck.state["a"], state["a"] + 1) and torch.equal(ck.state["b"], state["b"] + 1)
    twin = random.Random()
    checkpoint.set_rng_state(twin, ck.meta["rng"])
    assert twin.random() == rng.random()


def test_a_resumed_folder_keeps_only_the_rounds_up_to_the_checkpoint(tmp_path):
    folder = RunFolder(tmp_path)
    for rnd in range(4):
        folder.append_round({"round": rnd, "mcc": 0.1 * rnd})
        folder.append_ledger([{"round": rnd, "phase": "train"}, {"round": rnd, "phase": "train"}])
    folder.keep_rounds(1)
    rounds = [json.loads(line)["round"] for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    ledger = [json.loads(line)["round"] for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert rounds == [0, 1] and ledger == [0, 0, 1, 1]


def test_resuming_with_another_config_or_from_a_folder_without_a_checkpoint_is_refused(tmp_path, capsys):
    folder = RunFolder(tmp_path / "run")
    folder.write_json("config.json", RunConfig(num_rounds=3).as_dict())
    with pytest.raises(ValueError, match=r"num-rounds \(3 -> 5\)"):
        check_same_run(folder, RunConfig(num_rounds=5, resume=str(folder.path)))
    check_same_run(folder, RunConfig(num_rounds=3, resume=str(folder.path)))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        RunConfig(resume=str(folder.path)).validate()
    with pytest.raises(SystemExit):
        main(["run", "--resume", str(folder.path)])
    assert "no checkpoint/latest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--resume", str(folder.path), "--set", "num-rounds=5"])
    assert "drop the config file and --set" in capsys.readouterr().err


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.ray
def test_a_run_killed_after_round_1_resumes_to_a_byte_identical_model(tmp_path):
    """Also the determinism test of the federation: the resumed half runs on new, random node ids, and must still
    sample the same partitions, choose the same mask and end bit-identical."""
    common = {"results-dir": str(tmp_path), "data": str(default_glue_dir()), "num-rounds": 3,
              "fraction-train": 0.5,  # one of the two clients a round: the seeded sampler must survive the restart
              "server-opt": "fedadam", "server-lr": 0.01}  # the optimizer's moments must come back too
    assert run_simulation(TINY, 2, overrides={**common, "run-name": "whole"}, stream=False) == 0
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    sets = [arg for k, v in {**common, "run-name": "killed"}.items() for arg in ("--set", f"{k}={v}")]
    proc = subprocess.Popen([sys.executable, "-m", "fedfar.cli", "run", str(TINY), "--supernodes", "2", *sets],
                            cwd=PROJECT_DIR, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 900
        while (checkpoint.latest_round(killed) or 0) < 1:
            assert proc.poll() is None, "the run ended before round 1 was checkpointed"
            assert time.monotonic() < deadline, "round 1 never checkpointed"
            time.sleep(0.05)
    finally:  # SIGKILL to the whole tree at once: the launcher, SuperLink, superexec, flwr-simulation, Ray
        for pid in process_tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert checkpoint.latest_round(killed) < 3 and not (killed / "summary.json").exists()
    main(["run", "--resume", str(killed)])

    assert _sha256(killed / "model" / "model.safetensors") == _sha256(whole / "model" / "model.safetensors")
    runs = {name: (pd.read_csv(run / "rounds.csv"), pd.read_csv(run / "ledger.csv"))
            for name, run in (("whole", whole), ("killed", killed))}
    for rounds, ledger in runs.values():
        assert rounds["round"].tolist() == [0, 1, 2, 3]
        keys = ledger[["round", "phase", "partition_id"]].astype(str).agg("/".join, axis=1)
        assert keys.is_unique and len(ledger.query("phase == 'train'")) == 3 * 1
    trained = [ledger.query("phase == 'train'")[["round", "partition_id"]].values.tolist() for _, ledger in runs.values()]
    assert trained[0] == trained[1]
    for name in ("partitions.json", "mask.json"):
        assert json.loads((whole / name).read_text()) == json.loads((killed / name).read_text())
    assert runs["whole"][0]["mcc"].tolist() == runs["killed"][0]["mcc"].tolist()
    assert runs["whole"][1]["payload_up"].tolist() == runs["killed"][1]["payload_up"].tolist()
