"""A simulated edge device around the plain-torch core: which profile a client is, whether its training fits its
memory budget (and how it adapts), and how much work it did, for the simulated clock (DESIGN §3).

The device catalog, fleets and the clock formulas are in fedfar.devices; the memory accounting and the plan in
fedfar.budget. This module ties them to a run config and to a Flower node.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Mapping

import torch

from .budget import BudgetPlan, TrainingShape, check_floor, inference_floor, plan
from .config import RunConfig
from .devices import DeviceProfile, Fleet, fleet_from_node_config, load_catalog, load_fleet
from .far import MethodSpec


def catalog_for(cfg: RunConfig) -> dict[str, DeviceProfile]:
    """The shipped catalog (configs/devices.toml), extended or corrected by `device-catalog` if given."""
    return load_catalog(extra=[cfg.device_catalog] if cfg.device_catalog else [])


def load_run_fleet(cfg: RunConfig, num_partitions: int) -> Fleet | None:
    """The run's fleet (one profile per partition), or None when the run simulates no devices (fleet = "")."""
    if not cfg.fleet:
        return None
    return load_fleet(cfg.fleet, num_partitions, catalog=catalog_for(cfg), seed=cfg.partition_seed)


def check_fleet(cfg: RunConfig, num_partitions: int, model: torch.nn.Module) -> Fleet | None:
    """Load the fleet and reject, before any training, a profile whose budget cannot even hold the frozen model
    for inference (weights + one sequence of `max-length` tokens): no adaptation could rescue it."""
    fleet = load_run_fleet(cfg, num_partitions)
    if fleet is None:
        return None
    floor = inference_floor(model, cfg.max_length)  # one forward, however many profiles the fleet has
    for profile in sorted(set(fleet.profiles), key=lambda p: p.memory_budget_bytes):
        try:
            check_floor(profile.memory_budget_bytes, repr(profile.name), *floor)
        except ValueError as err:
            raise ValueError(f"fleet {cfg.fleet}: {err} (or take the profile out of the fleet)") from None
    return fleet


def client_profile(cfg: RunConfig, node_config: Mapping) -> DeviceProfile | None:
    """A deployed SuperNode names its device (`--node-config "... device='jetson-nano'"`); in simulation the
    fleet assigns one by partition id. None: devices are not simulated in this run."""
    if "device" in node_config:
        return fleet_from_node_config(node_config, catalog_for(cfg))
    fleet = load_run_fleet(cfg, int(node_config["num-partitions"]))
    return fleet.profile_for(int(node_config["partition-id"])) if fleet else None


@dataclass(frozen=True)
class DevicePlan:
    """What a device trains with this run: the budget plan of the method and of FAR's priming phase."""

    profile: DeviceProfile
    train: BudgetPlan
    priming: BudgetPlan | None   # FAR only: priming trains every FFN node, so it needs more memory

    def figures(self, which: BudgetPlan | None = None) -> dict[str, object]:
        """For the ledger: device, budget, accounted peak, and what was adapted (of the training plan by default,
        or of `which`, e.g. the priming plan)."""
        p = which or self.train
        return {"device": self.profile.name, "budget-bytes": self.profile.memory_budget_bytes,
                "peak-bytes": p.report.peak_training_bytes, "fits": int(p.fits),
                "micro-batch": p.shape.micro_batch, "retention": p.shape.retention or 0.0,
                "adapted": "; ".join(p.steps)}


PROFILE_FIELDS = ("memory_budget_bytes", "flops_per_s", "uplink_bytes_per_s", "downlink_bytes_per_s", "availability")


def profile_record(profile: DeviceProfile) -> dict[str, object]:
    """A profile as a flat record a node can send (and the server read back with `profile_from_record`)."""
    return {"name": profile.name, **{f: getattr(profile, f) for f in PROFILE_FIELDS}}


def profile_from_record(record: Mapping) -> DeviceProfile | None:
    if "name" not in record:
        return None
    return DeviceProfile(name=str(record["name"]), **{f: record[f] for f in PROFILE_FIELDS})


def priming_method(spec: MethodSpec) -> str:
    """FAR primes with every FFN node learning under the method's own policy: ordinary fine-tuning of that policy."""
    return MethodSpec("full", policy=spec.policy).label


def device_plan(cfg: RunConfig, model: torch.nn.Module, profile: DeviceProfile) -> DevicePlan:
    """Account the run's training step on this device's budget and adapt (or not) as `oom-policy` says.

    The plan is measured on copies of `model` (the device's pristine checkpoint) at the padded worst case,
    `batch-size` x `max-length`: a device must not run out of memory on its longest batch.
    """
    spec = cfg.spec
    shape = TrainingShape.for_method(cfg.method, cfg.batch_size, cfg.max_length, preact_storage=cfg.preact_storage)
    factory = lambda: copy.deepcopy(model)  # noqa: E731
    budget = profile.memory_budget_bytes
    train_plan = plan(factory, cfg.method, shape, budget, policy=cfg.oom_policy, seed=cfg.seed)
    priming = None
    if spec.method == "far":
        prime = priming_method(spec)
        priming = plan(factory, prime, TrainingShape.for_method(prime, cfg.batch_size, cfg.max_length),
                       budget, policy=cfg.oom_policy, seed=cfg.seed)
    return DevicePlan(profile, train_plan, priming)


def adapted_spec(spec: MethodSpec, budget_plan: BudgetPlan) -> MethodSpec:
    """The method at the retention the plan settled on."""
    if not spec.reconfigures or budget_plan.shape.retention is None:
        return spec
    return replace(spec, retention=budget_plan.shape.retention)

