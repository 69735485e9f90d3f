"""Faulty and malicious devices, on purpose: fault injection for robustness studies and tests.

A run-config key `faults` names a TOML file of entries such as

    [[fault]]
    partition = 2          # which client (partition id)
    rounds = [2, 3]        # training rounds it misbehaves in; [] or absent = every round
    kind = "scale:1000"    # nan | inf | scale:<factor> | wrong-shape | crash | hang | drop

nan / inf / scale / wrong-shape corrupt the delta the client sends (the server must reject or withstand it);
crash makes the ClientApp raise (Flower replies with an error); hang makes it reply only after the round
timeout (`round-timeout-s` must be set), when the server no longer listens; drop loses the reply on its way to the server (simulated by the server, which
never sees it). The file is validated when the run config is, before anything starts.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = ("nan", "inf", "scale:<factor>", "wrong-shape", "crash", "hang", "drop")
HANG_PAST_TIMEOUT_S = 10.0  # a hanging client replies this long after the server stopped waiting for it


def hang_seconds(round_timeout_s: float) -> float:
    """How long a `hang` fault holds its reply: past the round timeout, so the server counts the client lost,
    yet bounded, so the simulation engine (which finishes in-flight work before it shuts down) can end the run."""
    return round_timeout_s + HANG_PAST_TIMEOUT_S


@dataclass(frozen=True)
class Fault:
    partition: int
    rounds: tuple[int, ...]  # empty: every round
    kind: str                # nan, inf, scale, wrong-shape, crash, hang, drop
    factor: float = 1.0      # for scale

    def applies(self, partition: int, server_round: int) -> bool:
        return partition == self.partition and (not self.rounds or server_round in self.rounds)

    @property
    def label(self) -> str:
        return f"scale:{self.factor:g}" if self.kind == "scale" else self.kind


def _entry(path: Path, i: int, entry: object) -> Fault:
    where = f"{path}: [[fault]] #{i + 1}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table with partition, rounds and kind")
    unknown = set(entry) - {"partition", "rounds", "kind"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected partition, rounds, kind")
    partition, rounds, kind = entry.get("partition"), entry.get("rounds", []), entry.get("kind")
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
        raise ValueError(f"{where}: partition must be a partition id >= 0, got {partition!r}")
    if not isinstance(rounds, list) or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rounds):
        raise ValueError(f"{where}: rounds must be a list of training rounds >= 1 ([] = every round), got {rounds!r}")
    if not isinstance(kind, str):
        raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    factor = 1.0
    if kind.startswith("scale:"):
        try:
            factor = float(kind.split(":", 1)[1])
        except ValueError:
            factor = float("nan")
        if not math.isfinite(factor):
            raise ValueError(f"{where}: scale needs a finite factor, e.g. scale:1000, got {kind!r}")
        kind = "scale"
    elif kind not in KINDS:
        raise ValueError(f"{where}: kind {kind!r}: choose one of {', '.join(KINDS)}")
    return Fault(partition, tuple(rounds), kind, factor)


def load_faults(path: str | Path) -> tuple[Fault, ...]:
    """The faults of a file ("" = none), validated; errors name the file, the entry and the field."""
    if not path:
        return ()
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"faults file {path}: no such file (paths are relative to the directory the run "
                                "starts in)") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"faults file {path}: not valid TOML: {err}") from None
    if set(doc) - {"fault"} or not isinstance(doc.get("fault", []), list):
        raise ValueError(f"faults file {path}: expected only [[fault]] entries, got keys {sorted(doc)}")
    return tuple(_entry(path, i, e) for i, e in enumerate(doc.get("fault", [])))


def fault_for(faults: tuple[Fault, ...], partition: int, server_round: int) -> Fault | None:
    """The first fault of `partition` in `server_round`, if any."""
    return next((f for f in faults if f.applies(partition, server_round)), None)


def corrupt(delta: dict[str, torch.Tensor], fault: Fault) -> dict[str, torch.Tensor]:
    """The delta a faulty device sends instead of `delta` (row indices are left alone: the values go bad)."""
    values = {k: v for k, v in delta.items() if not k.endswith(".rows")}
    if fault.kind == "wrong-shape":
        name = next(iter(values))
        return {**delta, name: torch.zeros(3, 3)}
    fill = {"nan": float("nan"), "inf": float("inf")}
    if fault.kind in fill:
        return {**delta, **{k: torch.full_like(v, fill[fault.kind]) for k, v in values.items()}}
    if fault.kind == "scale":
        return {**delta, **{k: v * fault.factor for k, v in values.items()}}
    return delta
