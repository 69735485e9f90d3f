"""Simulated devices wired into training: budget plans per run config, micro-batch accumulation, the clock."""
import copy

import pytest
import torch

from conftest import ListLoader, tiny_batch, tiny_model
from fedfar.devices.flops import count_flops
from fedfar.federation.config import RunConfig
from fedfar.devices.clock import clock_round
from fedfar.devices.profiles import DeviceProfile
from fedfar.devices.device import adapted_method, check_fleet, client_profile, device_plan, profile_from_record, profile_record
from fedfar.methods import Full, parse_method
from fedfar.train import TrainConfig, train

MIB = 2**20


def _profile(name="dev", memory=1 << 30, flops=1e9, up=1e6, down=4e6, availability=1.0):
    return DeviceProfile(name, memory, flops, up, down, availability)


def _cfg(**kw):
    return RunConfig(**{"model": "random:bert-tiny", "method": "full", "batch_size": 8, "max_length": 16, **kw})


def test_micro_batches_accumulate_the_same_step_as_the_whole_batch():
    batch = tiny_batch(batch_size=6, seq_len=7)
    results = []
    for micro in (0, 2, 4):  # 4 leaves an uneven last micro-batch of 2: weighting by share keeps it exact
        model = tiny_model()
        out = train(model, ListLoader([batch]), Full(), 1.0, TrainConfig(lr=1e-2, micro_batch=micro))
        results.append((out["losses"][0], model.state_dict()))
    (loss0, ref), *others = results
    for loss, state in others:
        assert loss == pytest.approx(loss0, rel=1e-5)
        for k in ref:  # AdamW's first step moves every weight by ~lr; rounding may differ by far less than that
            torch.testing.assert_close(state[k], ref[k], rtol=0, atol=1e-2 * 1e-2)


def test_micro_batch_gradients_equal_the_whole_batch_gradient():
    from fedfar.train import _forward_backward
    batch = tiny_batch(batch_size=6, seq_len=7)
    grads = []
    for micro in (0, 4):  # AdamW and clipping hide a wrongly scaled gradient: compare the gradients themselves
        model = tiny_model()
        _forward_backward(model, batch, micro)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def model():
    from fedfar.models import load_model
    return load_model("random:bert-tiny", 2, seed=0)


def test_over_budget_device_fails_or_adapts_as_configured(model):
    cfg = _cfg()
    whole = device_plan(cfg, model, _profile(memory=1 << 34)).train
    assert whole.fits and whole.shape.micro_batch == 8 and not whole.steps
    budget = whole.report.peak_training_bytes - 1  # one byte short of what the step needs
    fail = device_plan(RunConfig(**{**cfg.__dict__, "oom_policy": "fail"}), model, _profile(memory=budget))
    assert not fail.train.fits and fail.train.report.peak_training_bytes == whole.report.peak_training_bytes
    assert fail.figures()["peak-bytes"] > fail.figures()["budget-bytes"] == budget
    adapt = device_plan(cfg, model, _profile(memory=budget))
    assert adapt.train.fits and adapt.train.shape.micro_batch == 4  # the first halving already fits
    assert adapt.train.report.peak_training_bytes <= budget and adapt.train.steps == ["micro-batch 8 -> 4 "
                                                                                       "(2 accumulation steps)"]
    assert adapt.figures()["adapted"].startswith("micro-batch 8 -> 4")


def test_far_priming_is_planned_as_full_training_of_the_same_policy(model):
    dp = device_plan(_cfg(method="far25-emb"), model, _profile(memory=1 << 34))
    full_emb = device_plan(_cfg(method="full-emb"), model, _profile(memory=1 << 34)).train
    assert dp.priming.report == full_emb.report  # priming trains every FFN node: FAR's own plan is not enough
    assert dp.train.report.peak_training_bytes < dp.priming.report.peak_training_bytes
    assert device_plan(_cfg(method="full"), model, _profile()).priming is None


def test_adapted_retention_reaches_the_method(model):
    tight = device_plan(_cfg(method="far50"), model, _profile(memory=1 << 34))
    squeezed = copy.copy(tight.train)
    object.__setattr__(squeezed, "shape", type(tight.train.shape)(8, 16, 1, 0.125))
    assert adapted_method(parse_method("far50"), squeezed).retention == 0.125
    assert adapted_method(parse_method("full"), tight.train) == parse_method("full")


def test_a_fleet_with_a_budget_below_inference_is_rejected_at_start_up(model, tmp_path):
    (tmp_path / "cat.toml").write_text('[tiny]\nmemory = "1 MiB"\ncompute = "1 GFLOPS"\nuplink = "1 Mbit/s"\n'
                                       'downlink = "1 Mbit/s"\navailability = 1.0\n')
    (tmp_path / "fleet.toml").write_text('devices = ["laptop", "tiny"]\n')
    cfg = _cfg(fleet=str(tmp_path / "fleet.toml"), device_catalog=str(tmp_path / "cat.toml"))
    with pytest.raises(ValueError, match=r"fleet .*fleet.toml: device 'tiny': memory budget 1 MiB is below the "
                                         r".* MiB the model needs even for inference"):
        check_fleet(cfg, 2, model)
    (tmp_path / "fleet.toml").write_text('devices = ["laptop", "jetson-nano"]\n')
    assert [p.name for p in check_fleet(cfg, 2, model).profiles] == ["laptop", "jetson-nano"]
    assert client_profile(cfg, {"partition-id": 1, "num-partitions": 2}).name == "jetson-nano"
    # A deployed SuperNode names its own device; the run's extra catalog applies to it too.
    assert client_profile(cfg, {"partition-id": 0, "num-partitions": 2, "device": "tiny"}).memory_budget_bytes == MIB
    assert client_profile(_cfg(), {"partition-id": 0, "num-partitions": 2}) is None  # devices off


def test_profiles_travel_as_records_unchanged():
    p = _profile("x", 123, 4.5e9, 1.25e6, 5e6, 0.3)
    assert profile_from_record(profile_record(p)) == p
    assert profile_from_record({}) is None


def test_clock_round_is_the_formula_and_the_deadline_drops_stragglers():
    fast, slow = _profile("fast", flops=1e10, up=1e6, down=2e6), _profile("slow", flops=1e9, up=1e5, down=1e6)
    entries = [
        {"node_id": 1, "status": "ok", "bytes_down": 2_000_000, "bytes_up": 1_000_000, "train_flops": 5e10},
        {"node_id": 2, "status": "ok", "bytes_down": 1_000_000, "bytes_up": 100_000, "train_flops": 2e9},
        {"node_id": 3, "status": "oom", "bytes_down": 1_000_000, "bytes_up": 500},
        {"node_id": 4, "status": "error", "bytes_down": 1_000_000, "bytes_up": 0},
    ]
    profiles = {1: fast, 2: slow, 3: slow, 4: slow}
    duration = clock_round(copy.deepcopy(entries), profiles)
    # node 1: 2e6/2e6 + 5e10/1e10 + 1e6/1e6 = 1 + 5 + 1; node 2: 1 + 2 + 1 = 4; node 3: 1 + 0 + 0.005
    assert duration == pytest.approx(7.0)
    timed = copy.deepcopy(entries)
    assert clock_round(timed, profiles, deadline_s=5.0) == 5.0
    assert [e["status"] for e in timed] == ["late", "ok", "oom", "error"]
    assert timed[0]["sim_total_s"] == pytest.approx(7.0) and timed[2]["sim_upload_s"] == pytest.approx(0.005)
    assert "sim_total_s" not in timed[3]  # no answer, no simulated time


def test_counted_flops_of_far_training_are_fewer_than_full():
    batch = tiny_batch(batch_size=8, seq_len=9)
    flops = {}
    for method in ("full-emb", "far25-emb"):
        model = tiny_model()
        with count_flops() as counter:
            train(model, ListLoader([batch] * 3), parse_method(method), 1.0, TrainConfig(lr=1e-3),
                  learners=None if method == "full-emb" else [torch.arange(16)] * 2)
        flops[method] = counter.get_total_flops()
    assert 0 < flops["far25-emb"] < flops["full-emb"]


@pytest.mark.parametrize("key, value, message", [
    ("oom-policy", "retry", "oom-policy 'retry': choose adapt or fail"),
    ("deadline-s", -1.0, "deadline-s must be >= 0"),
    ("fleet", "no/such/fleet.toml", "fleet 'no/such/fleet.toml': no such file"),
])
def test_device_keys_are_validated(key, value, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        RunConfig.from_flower({key: value})


def test_fedfar_run_rejects_a_fleet_below_the_inference_floor_before_starting_flower(tmp_path, capsys):
    from fedfar.cli import main
    from fedfar.federation.processes import process_tree
    import os

    (tmp_path / "cat.toml").write_text('[watch]\nmemory = "2 MiB"\ncompute = "1 GFLOPS"\nuplink = "1 Mbit/s"\n'
                                       'downlink = "1 Mbit/s"\navailability = 0.5\n')
    (tmp_path / "fleet.toml").write_text('shares = { "watch" = 0.5, "laptop" = 0.5 }\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "configs/tiny.toml", "--supernodes", "2", "--set", f"fleet={tmp_path / 'fleet.toml'}",
              "--set", f"device-catalog={tmp_path / 'cat.toml'}"])
    assert exit_info.value.code == 2
    assert "device 'watch': memory budget 2 MiB is below" in capsys.readouterr().err
    assert not process_tree(os.getpid()) - {os.getpid()}  # nothing was started


@pytest.mark.parametrize("arg", ["bytes_down", "bytes_up", "train_flops"])
def test_round_time_rejects_each_negative_input_by_name(arg):
    from fedfar.devices.clock import round_time
    from fedfar.devices.profiles import load_catalog

    kw = {"bytes_down": 10, "bytes_up": 10, "train_flops": 1.0, arg: -1}
    with pytest.raises(ValueError, match=f"{arg}=-1"):
        round_time(load_catalog()["laptop"], **kw)


def test_round_duration_bounds_its_deadline_and_an_empty_round_lasts_nothing():
    from fedfar.devices.clock import round_duration

    with pytest.raises(ValueError, match="deadline_s must be > 0, got 0"):
        round_duration([1.0], deadline_s=0)
    assert round_duration([0.2, 0.7], deadline_s=0.5) == (0.5, [True, False])  # a deadline under 1 s is valid
    assert round_duration([]) == (0.0, [])
