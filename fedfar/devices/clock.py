"""The simulated clock: a client's round is download + compute + upload at its device's speeds; a round lasts as
long as its slowest selected client, or its deadline. Availability draws say who can be selected at all."""
from __future__ import annotations

import random
from typing import Mapping, Sequence

from .profiles import DeviceProfile


def round_time(profile: DeviceProfile, bytes_down: int, bytes_up: int, train_flops: float) -> dict[str, float]:
    """One client's simulated round: receive, train, send, one after the other (no overlap)."""
    if min(bytes_down, bytes_up, train_flops) < 0:
        raise ValueError(f"bytes and FLOPs must be >= 0, got {bytes_down=}, {bytes_up=}, {train_flops=}")
    t = {"download_s": bytes_down / profile.downlink_bytes_per_s,
         "compute_s": train_flops / profile.flops_per_s,
         "upload_s": bytes_up / profile.uplink_bytes_per_s}
    t["total_s"] = t["download_s"] + t["compute_s"] + t["upload_s"]
    return t


def round_duration(times: Sequence[float], deadline_s: float | None = None) -> tuple[float, list[bool]]:
    """The round waits for its slowest selected client; with a deadline, clients over it are stragglers
    (False in the mask, their updates dropped) and the round ends at the deadline."""
    if deadline_s is not None and deadline_s <= 0:
        raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
    slowest = max(times, default=0.0)
    if deadline_s is None:
        return slowest, [True] * len(times)
    return min(deadline_s, slowest), [t <= deadline_s for t in times]


def clock_round(entries: list[dict], profiles: Mapping[int, DeviceProfile], deadline_s: float | None = None) -> float:
    """One round of the simulated clock over ledger entries (dicts with node_id, status, bytes_down, bytes_up and,
    for devices that trained, train_flops). Adds sim_download_s / sim_compute_s / sim_upload_s / sim_total_s to each
    entry of a simulated device that answered ("ok", or "oom": it received the part and sent its refusal), marks
    an "ok" entry that missed the deadline "late", and returns the round's duration."""
    timed = [e for e in entries if e["node_id"] in profiles and e["status"] in ("ok", "oom")]
    for e in timed:
        t = round_time(profiles[e["node_id"]], e["bytes_down"], e["bytes_up"], e.get("train_flops", 0.0))
        e.update({f"sim_{k}": v for k, v in t.items()})
    duration, in_time = round_duration([e["sim_total_s"] for e in timed], deadline_s)
    for e, ok in zip(timed, in_time):
        if not ok and e["status"] == "ok":
            e["status"] = "late"
    return duration


def available(profiles: Sequence[DeviceProfile], rng: random.Random) -> list[bool]:
    """Who can be selected this round: one Bernoulli(availability) draw each, from the caller's seeded rng."""
    return [rng.random() < p.availability for p in profiles]
