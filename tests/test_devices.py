"""Device profiles, catalogs, fleets and the simulated clock: pure Python, milliseconds."""
import random
from collections import Counter
from pathlib import Path

import pytest

from fedfar.devices.clock import available, round_duration, round_time
from fedfar.devices.profiles import (DEFAULT_CATALOG, DeviceProfile, fleet_from_node_config, load_catalog, load_fleet,
                                     parse_bytes, parse_flops, parse_rate)

FLEETS = DEFAULT_CATALOG.parent / "fleets"
REQUIRED = ["raspberry-pi-4-4gb", "raspberry-pi-4-8gb", "jetson-nano", "jetson-xavier-nx",
            "phone-budget", "phone-midrange", "phone-flagship", "laptop"]
GOOD = 'memory = "1 GiB"\ncompute = "5 GFLOPS"\nuplink = "10 Mbit/s"\ndownlink = "40 Mbit/s"\navailability = 0.8\n'


def write(tmp_path: Path, text: str, name: str = "f.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def prof(name="d", mem=2**30, flops=1e8, up=1e6, down=1e6, avail=1.0) -> DeviceProfile:
    return DeviceProfile(name, mem, flops, up, down, avail)


# ---------------------------------------------------------------------------------------- units, catalog
def test_parse_units_by_hand():
    assert parse_bytes("2.5 GiB") == 2684354560
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("3 GB") == 3_000_000_000
    assert parse_bytes(4096) == 4096
    assert parse_rate("10 Mbit/s") == 1_250_000
    assert parse_rate("2 MB/s") == 2_000_000
    assert parse_rate("1 Gbit/s") == 125_000_000
    assert parse_rate("800 kbit/s") == 100_000
    assert parse_rate(5e5) == 5e5
    assert parse_flops("1.2 TFLOPS") == 1.2e12
    assert parse_flops("6 GFLOPS") == parse_flops("6 GFLOP/s") == 6e9
    assert parse_flops(3e7) == 3e7
    for bad, parse in [("2.5 Gib", parse_bytes), ("10 Mb", parse_rate), ("fast", parse_flops), (True, parse_bytes)]:
        with pytest.raises(ValueError, match="expected"):
            parse(bad)


def test_shipped_catalog_loads_and_is_sane():
    cat = load_catalog()
    assert set(REQUIRED) <= set(cat)
    for name, p in cat.items():
        assert p.name == name and p.note
        assert p.memory_budget_bytes > 0 and p.flops_per_s > 0
        assert p.uplink_bytes_per_s > 0 and p.downlink_bytes_per_s > 0 and 0 < p.availability <= 1
    assert cat["raspberry-pi-4-4gb"].memory_budget_bytes < 4 * 2**30  # a budget, not the RAM
    assert cat["phone-budget"].memory_budget_bytes < cat["phone-flagship"].memory_budget_bytes
    assert cat["phone-budget"].availability < cat["jetson-nano"].availability


@pytest.mark.parametrize("line, field, says", [
    ('memory = "-1 GiB"', "memory", "positive"),
    ('memory = 0', "memory", "positive"),
    ('availability = 1.5', "availability", "(0, 1]"),
    ('uplink = "10 furlongs/s"', "uplink", "Mbit/s"),
    ('compute = "5 GHz"', "compute", "GFLOPS"),
])
def test_bad_catalog_entry_names_file_profile_field(tmp_path, line, field, says):
    key = line.split(" = ")[0]
    body = "".join(ln + "\n" for ln in GOOD.splitlines() if not ln.startswith(key)) + line + "\n"
    path = write(tmp_path, "[my-board]\n" + body)
    with pytest.raises(ValueError) as e:
        load_catalog(path)
    msg = str(e.value)
    assert str(path) in msg and "[my-board]" in msg and f"'{field}'" in msg and says in msg


def test_unknown_and_missing_catalog_fields(tmp_path):
    with pytest.raises(ValueError, match=r"\[my-board\].*unknown field.*'ram'.*expected memory"):
        load_catalog(write(tmp_path, "[my-board]\n" + GOOD + "ram = 4\n"))
    with pytest.raises(ValueError, match=r"\[my-board\]: missing field 'downlink'"):
        load_catalog(write(tmp_path, "[my-board]\n" + GOOD.replace('downlink = "40 Mbit/s"\n', "")))


def test_extra_catalog_adds_and_overrides(tmp_path):
    extra = write(tmp_path, "[my-board]\n" + GOOD + '\n[laptop]\n' + GOOD.replace('"5 GFLOPS"', '"1 TFLOPS"'))
    cat = load_catalog(extra=extra)
    assert cat["my-board"].memory_budget_bytes == 2**30
    assert cat["laptop"].flops_per_s == 1e12          # replaced
    assert "jetson-nano" in cat                       # shipped entries kept


# ---------------------------------------------------------------------------------------------- fleets
def test_shares_give_exact_counts_and_seeded_shuffle(tmp_path):
    path = write(tmp_path, 'shares = { "raspberry-pi-4-4gb" = 0.3, "phone-midrange" = 0.5, "laptop" = 0.2 }\n')
    names = lambda f: [p.name for p in f.profiles]  # noqa: E731
    a, b, c = (load_fleet(path, 10, seed=s) for s in (0, 0, 1))
    assert Counter(names(a)) == {"raspberry-pi-4-4gb": 3, "phone-midrange": 5, "laptop": 2}
    assert names(a) == names(b) and names(a) != names(c)
    assert a.profile_for(7).name == names(a)[7]
    with pytest.raises(ValueError, match="outside"):
        a.profile_for(10)
    # largest remainder: 7 x (0.3, 0.5, 0.2) = 2.1, 3.5, 1.4 -> 2, 4, 1 (the 0.5 remainder wins the spare one)
    assert Counter(names(load_fleet(path, 7))) == {"raspberry-pi-4-4gb": 2, "phone-midrange": 4, "laptop": 1}


def test_fleet_errors(tmp_path):
    with pytest.raises(ValueError, match="sum to 0.9"):
        load_fleet(write(tmp_path, 'shares = { "laptop" = 0.4, "jetson-nano" = 0.5 }\n'), 4)
    with pytest.raises(ValueError, match=r"unknown device profile 'toaster'.*valid: .*jetson-nano.*laptop"):
        load_fleet(write(tmp_path, 'shares = { "toaster" = 1.0 }\n'), 4)
    with pytest.raises(ValueError, match="3 expected, got 2"):
        load_fleet(write(tmp_path, 'devices = ["laptop", "jetson-nano"]\n'), 3)
    with pytest.raises(ValueError, match="found both"):
        load_fleet(write(tmp_path, 'devices = ["laptop"]\nshares = { "laptop" = 1.0 }\n'), 1)
    with pytest.raises(ValueError, match="found neither"):
        load_fleet(write(tmp_path, 'note = "empty"\n'), 1)
    explicit = load_fleet(write(tmp_path, 'devices = ["laptop", "jetson-nano"]\n'), 2)
    assert [p.name for p in explicit.profiles] == ["laptop", "jetson-nano"]


def test_shipped_fleets_load():
    mixed = load_fleet(FLEETS / "mixed_edge.toml", 20)
    small = sum(0.3 * 2**30 <= p.memory_budget_bytes <= 1.5 * 2**30 for p in mixed.profiles)
    assert small >= 10  # "a good share" of small budgets
    assert len(load_fleet(FLEETS / "phones.toml", 5).profiles) == 5
    assert len(load_fleet(FLEETS / "edge_lab.toml", 6).profiles) == 6


def test_node_config():
    assert fleet_from_node_config({"partition-id": 0, "device": "jetson-nano"}).name == "jetson-nano"
    with pytest.raises(ValueError, match="no 'device' key.*--node-config"):
        fleet_from_node_config({"partition-id": 0})
    with pytest.raises(ValueError, match="unknown device profile 'pager'"):
        fleet_from_node_config({"device": "pager"})


# --------------------------------------------------------------------------------------------- the clock
def test_round_time_is_the_formula():
    p = prof(flops=1e8, up=parse_rate("4 Mbit/s"), down=parse_rate("8 Mbit/s"))
    t = round_time(p, bytes_down=2_000_000, bytes_up=1_000_000, train_flops=1e9)
    assert t == {"download_s": 2.0, "compute_s": 10.0, "upload_s": 2.0, "total_s": 14.0}


def test_round_duration_slowest_and_deadline():
    assert round_duration([3.0, 9.0, 5.0]) == (9.0, [True, True, True])
    assert round_duration([3.0, 9.0, 5.0], deadline_s=6.0) == (6.0, [True, False, True])
    assert round_duration([3.0, 5.0], deadline_s=6.0) == (5.0, [True, True])  # nobody late: slowest wins


def test_available():
    always = [prof(avail=1.0)] * 50
    assert all(available(always, random.Random(123)))
    mixed = [prof(avail=a) for a in (0.1, 0.3, 0.5, 0.9)] * 25
    draw = available(mixed, random.Random(7))
    assert draw == available(mixed, random.Random(7)) and draw != available(mixed, random.Random(8))
    # One independent draw per device, in order, from the caller's rng: exactly the rng's next len(mixed) numbers.
    rng, replay = random.Random(7), random.Random(7)
    assert available(mixed, rng) == [replay.random() < p.availability for p in mixed]
    assert rng.random() == replay.random()  # and no more than one each
    # Devices of one availability do not share a draw: at 0.5, a shared draw would make all 25 agree.
    halves = [d for d, p in zip(draw, mixed) if p.availability == 0.5]
    assert 0 < sum(halves) < len(halves)
    # Each class is available about as often as its availability says (500 devices a class; 4.5 sd either way).
    many = available([prof(avail=a) for a in (0.1, 0.3, 0.5, 0.9)] * 500, random.Random(11))
    for k, a in enumerate((0.1, 0.3, 0.5, 0.9)):
        assert abs(sum(many[k::4]) / 500 - a) < 4.5 * (a * (1 - a) / 500) ** 0.5, a


def test_a_draw_equal_to_the_availability_leaves_the_device_out():
    # available is u < availability with u uniform on [0, 1): exactly a share `availability` of the draws. A device
    # whose availability is the very number the rng draws next is not available; one of availability 1.0 always is.
    u = random.Random(5).random()
    assert available([prof(avail=u), prof(avail=1.0)], random.Random(5)) == [False, True]
    assert available([prof(avail=u)], random.Random(5)) == [False]
