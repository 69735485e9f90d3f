"""Device profiles (DESIGN §3): what a device may spend on training, how fast it is, when it can take part.

A *profile* gives a device class its memory budget, sustained compute, link bandwidth and availability.
Profiles live in a TOML *catalog* (configs/devices.toml) written in human units, so adding a device needs no
code. A *fleet* assigns one profile per data partition, by shares or by an explicit list (the simulated clock
that turns bytes and FLOPs into seconds is in fedfar.devices.clock).

Extending the catalog: ``load_catalog(extra=["my_devices.toml"])`` reads the shipped catalog, then each extra
file in order; an entry whose name already exists replaces it (so a user can correct a figure without editing
the shipped file). A fleet file may name such a file itself with ``catalog = "my_devices.toml"`` (relative to
the fleet file).
"""
from __future__ import annotations

import math
import random
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "configs" / "devices.toml"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_budget_bytes: int      # memory available to training (not the device's total RAM)
    flops_per_s: float            # sustained fp32 training throughput (what the chip keeps up, not its peak)
    uplink_bytes_per_s: float
    downlink_bytes_per_s: float
    availability: float           # probability the device can be selected in a round, in (0, 1]
    note: str = ""                # where the figures come from

    def __post_init__(self) -> None:  # profiles built in code are checked like catalog ones
        for field in ("memory_budget_bytes", "flops_per_s", "uplink_bytes_per_s", "downlink_bytes_per_s",
                      "availability"):
            _check(field, getattr(self, field))


def _check(field: str, value: object) -> None:
    if field == "availability":
        if not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise ValueError(f"availability must be a probability in (0, 1], got {value!r}")
    elif not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{field} must be a positive finite number, got {value!r}")


# ---------------------------------------------------------------------------------------------- units
# Decimal prefixes are powers of 1000 and binary ones (KiB, MiB, ...) powers of 1024, as in IEC 80000-13.
# Rates distinguish bits from bytes by spelling ("bit/s", "bps" vs "B/s"): "Mb" alone is too easy to misread.
_BYTES = {"B": 1, "bytes": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_DECIMAL = (("k", 1e3), ("K", 1e3), ("M", 1e6), ("G", 1e9))
_RATE = {"bit/s": 1 / 8, "bps": 1 / 8, "B/s": 1.0,
         **{f"{p}{u}": m / 8 for p, m in _DECIMAL for u in ("bit/s", "bps")},
         **{f"{p}B/s": m for p, m in _DECIMAL},
         **{f"{p}iB/s": float(2**e) for p, e in (("K", 10), ("M", 20), ("G", 30))}}
_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(\S*)\s*$")


def _split(text: object, what: str) -> tuple[float, str]:
    """A number alone (unit-less) or "<number> <unit>"."""
    if isinstance(text, bool):
        raise ValueError(f"expected {what}, got {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise ValueError(f"expected {what}, got {text!r}")
        return float(text), ""
    m = _QUANTITY.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"expected {what}, got {text!r}")
    return float(m.group(1)), m.group(2)


def parse_bytes(text: str | int | float) -> int:
    """ "512 MiB", "2.5 GiB", "3 GB" or a number of bytes -> bytes."""
    what = f'a size such as "512 MiB" or "3 GB" (units: {", ".join(_BYTES)}) or a number of bytes'
    value, unit = _split(text, what)
    if unit and unit not in _BYTES:
        raise ValueError(f"expected {what}, got {text!r}")
    return round(value * _BYTES.get(unit, 1))


def parse_flops(text: str | int | float) -> float:
    """ "6 GFLOPS", "1.2 TFLOPS", "800 GFLOP/s" or a number of FLOP/s -> FLOP/s."""
    what = 'a throughput such as "6 GFLOPS" or "1.2 TFLOP/s" (prefixes k, M, G, T, P) or a number of FLOP/s'
    value, unit = _split(text, what)
    if not unit:
        return value
    m = re.fullmatch(r"([kmgtp]?)flop(?:s|/s)", unit.lower())  # case-free: nobody means milli-FLOPS
    if not m:
        raise ValueError(f"expected {what}, got {text!r}")
    return value * _PREFIX[m.group(1)]


def parse_rate(text: str | int | float) -> float:
    """ "10 Mbit/s", "1 Gbit/s", "2 MB/s", "500 kbit/s" or a number of bytes/s -> bytes/s."""
    what = ('a rate such as "10 Mbit/s" or "2 MB/s" (units: bit/s, kbit/s, Mbit/s, Gbit/s or the same with bps; '
            'B/s, kB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s) or a number of bytes/s')
    value, unit = _split(text, what)
    if unit and unit not in _RATE:
        raise ValueError(f"expected {what}, got {text!r}")
    return value * _RATE.get(unit, 1.0)


# -------------------------------------------------------------------------------------------- catalog
_FIELDS = {  # TOML key -> (DeviceProfile field, parser)
    "memory": ("memory_budget_bytes", parse_bytes),
    "compute": ("flops_per_s", parse_flops),
    "uplink": ("uplink_bytes_per_s", parse_rate),
    "downlink": ("downlink_bytes_per_s", parse_rate),
    "availability": ("availability", lambda v: _split(v, "a probability in (0, 1]")[0]),
}
_OPTIONAL = {"note"}


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None


def _profile(path: Path, name: str, table: object) -> DeviceProfile:
    where = f"{path}: profile [{name}]"
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table of fields ({', '.join(_FIELDS)}), got {table!r}")
    unknown = set(table) - set(_FIELDS) - _OPTIONAL
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; "
                         f"expected {', '.join(_FIELDS)} and optionally {', '.join(sorted(_OPTIONAL))}")
    kwargs: dict[str, object] = {"name": name, "note": str(table.get("note", ""))}
    for key, (field, parse) in _FIELDS.items():
        if key not in table:
            raise ValueError(f"{where}: missing field '{key}'")
        try:
            kwargs[field] = parse(table[key])
            _check(field, kwargs[field])
        except ValueError as e:
            raise ValueError(f"{where}, field '{key}': {e}") from None
    return DeviceProfile(**kwargs)  # type: ignore[arg-type]


def load_catalog(path: str | Path | None = None,
                 extra: str | Path | Sequence[str | Path] = ()) -> dict[str, DeviceProfile]:
    """Profiles by name from `path` (default: the shipped configs/devices.toml), then from each `extra` file;
    a later entry with an existing name replaces the earlier one."""
    extras = [extra] if isinstance(extra, (str, Path)) else list(extra)
    catalog: dict[str, DeviceProfile] = {}
    for p in [Path(path) if path is not None else DEFAULT_CATALOG, *map(Path, extras)]:
        for name, table in _read_toml(p).items():
            catalog[name] = _profile(p, name, table)
    return catalog


# ---------------------------------------------------------------------------------------------- fleets
@dataclass(frozen=True)
class Fleet:
    profiles: tuple[DeviceProfile, ...]   # one per partition id

    def profile_for(self, partition_id: int) -> DeviceProfile:
        if not 0 <= partition_id < len(self.profiles):
            raise ValueError(f"partition id {partition_id} outside the fleet's 0..{len(self.profiles) - 1}")
        return self.profiles[partition_id]


def _lookup(catalog: Mapping[str, DeviceProfile], name: object, where: str) -> DeviceProfile:
    if not isinstance(name, str) or name not in catalog:
        raise ValueError(f"{where}: unknown device profile {name!r}; valid: {', '.join(sorted(catalog))}")
    return catalog[name]


def _largest_remainder(shares: Mapping[str, float], n: int) -> dict[str, int]:
    """Exact counts summing to n; leftover units go to the largest fractional parts (ties: file order)."""
    exact = {k: v * n for k, v in shares.items()}
    counts = {k: math.floor(x) for k, x in exact.items()}
    by_remainder = sorted(shares, key=lambda k: -(exact[k] - counts[k]))  # stable: ties keep file order
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def load_fleet(path: str | Path, num_partitions: int,
               catalog: Mapping[str, DeviceProfile] | None = None, seed: int = 0) -> Fleet:
    """A fleet from TOML with either `shares = {profile = fraction, ...}` (fractions sum to 1; exact counts by
    largest remainder, then a seeded shuffle of which partition gets which) or `devices = [profile, ...]`
    (one per partition). Optional `catalog = "file.toml"` (relative to the fleet file) extends the catalog."""
    path = Path(path)
    doc = _read_toml(path)
    unknown = set(doc) - {"shares", "devices", "catalog", "note"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; expected shares or devices "
                         "(and optionally catalog, note)")
    if num_partitions < 1:
        raise ValueError(f"{path}: num_partitions must be >= 1, got {num_partitions}")
    catalog = dict(catalog) if catalog is not None else load_catalog()
    if "catalog" in doc:
        if not isinstance(doc["catalog"], str):
            raise ValueError(f"{path}: 'catalog' must be a file path (relative to the fleet file), "
                             f"got {doc['catalog']!r}")
        catalog.update(load_catalog(path.parent / doc["catalog"]))
    if ("shares" in doc) == ("devices" in doc):
        raise ValueError(f"{path}: give exactly one of 'shares' (fractions per profile) or 'devices' "
                         f"(one profile per partition), found {'both' if 'shares' in doc else 'neither'}")

    if "devices" in doc:
        names = doc["devices"]
        if not isinstance(names, list) or len(names) != num_partitions:
            got = len(names) if isinstance(names, list) else repr(names)
            raise ValueError(f"{path}: 'devices' must list one profile per partition: "
                             f"{num_partitions} expected, got {got}")
        return Fleet(tuple(_lookup(catalog, n, f"{path}: devices[{i}]") for i, n in enumerate(names)))

    shares = doc["shares"]
    if not isinstance(shares, dict) or not shares:
        raise ValueError(f"{path}: 'shares' must be a table such as {{ \"laptop\" = 0.5, ... }}, got {shares!r}")
    for name, share in shares.items():
        _lookup(catalog, name, f"{path}: shares")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or share < 0:
            raise ValueError(f"{path}: share of {name!r} must be a number >= 0, got {share!r}")
    total = sum(shares.values())
    if abs(total - 1) > 1e-6:
        raise ValueError(f"{path}: shares must sum to 1, they sum to {total:.6g}")
    names = [n for n, c in _largest_remainder(shares, num_partitions).items() for _ in range(c)]
    random.Random(seed).shuffle(names)  # who gets what is reproducible per seed, not tied to data order
    return Fleet(tuple(catalog[n] for n in names))


def fleet_from_node_config(node_config: Mapping, catalog: Mapping[str, DeviceProfile] | None = None
                           ) -> DeviceProfile:
    """A deployed SuperNode's own profile, from `--node-config "... device='jetson-nano'"`."""
    catalog = catalog if catalog is not None else load_catalog()
    if "device" not in node_config:
        raise ValueError("node config has no 'device' key: start the SuperNode with "
                         "--node-config \"partition-id=0 num-partitions=2 device='jetson-nano'\"; "
                         f"valid devices: {', '.join(sorted(catalog))}")
    return _lookup(catalog, node_config["device"], "node config 'device'")
