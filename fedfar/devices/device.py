"""One simulated edge device: which profile a client is, whether its training fits the memory budget (and how it
adapts), and the one call a client makes to do work on it: plan, then run or refuse (DESIGN §3).

Profiles, catalog and fleets are in fedfar.devices.profiles; the accounting in .memory; the plan in .budget; the
real cap on a CUDA GPU in .gpu. A run config is read by attribute only (fedfar.config.RunConfig), so this room
does not import the federation's configuration.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Generic, Mapping, TypeVar

import torch

from ..methods import Method
from .budget import BudgetPlan, TrainingShape, check_floor, inference_floor, plan
from .gpu import BudgetExceeded, resolve_device
from .profiles import DeviceProfile, Fleet, fleet_from_node_config, load_catalog, load_fleet

if TYPE_CHECKING:
    from ..config import RunConfig

T = TypeVar("T")


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


PROFILE_FIELDS = ("memory_budget_bytes", "flops_per_s", "uplink_bytes_per_s", "downlink_bytes_per_s", "availability")


def profile_record(profile: DeviceProfile) -> dict[str, object]:
    """A profile as a flat record a node can send (and the server read back with `profile_from_record`)."""
    return {"name": profile.name, **{f: getattr(profile, f) for f in PROFILE_FIELDS}}


def profile_from_record(record: Mapping) -> DeviceProfile | None:
    if "name" not in record:
        return None
    return DeviceProfile(name=str(record["name"]), **{f: record[f] for f in PROFILE_FIELDS})


# ------------------------------------------------------------------------------------------ the plan
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

    def phase(self, name: str) -> BudgetPlan:
        """The plan of phase "prime" or "train"."""
        return self.priming if name == "prime" and self.priming is not None else self.train


def device_plan(cfg: RunConfig, model: torch.nn.Module, profile: DeviceProfile) -> DevicePlan:
    """Account the run's training step on this device's budget and adapt (or not) as `oom-policy` says.

    The plan is measured on copies of `model` (the device's pristine checkpoint) at the padded worst case,
    `batch-size` x `max-length`: a device must not run out of memory on its longest batch.
    """
    method = cfg.spec
    shape = TrainingShape.for_method(cfg.method, cfg.batch_size, cfg.max_length, preact_storage=cfg.preact_storage)
    factory = lambda: copy.deepcopy(model)  # noqa: E731
    budget = profile.memory_budget_bytes
    train_plan = plan(factory, cfg.method, shape, budget, policy=cfg.oom_policy, seed=cfg.seed)
    priming = None
    if method.primes:
        prime = method.priming_method().label
        priming = plan(factory, prime, TrainingShape.for_method(prime, cfg.batch_size, cfg.max_length),
                       budget, policy=cfg.oom_policy, seed=cfg.seed)
    return DevicePlan(profile, train_plan, priming)


def adapted_method(method: Method, budget_plan: BudgetPlan) -> Method:
    """The method at the retention the plan settled on."""
    if not method.selects_rows or budget_plan.shape.retention is None:
        return method
    return replace(method, retention=budget_plan.shape.retention)


# ------------------------------------------------------------------------------------------ run or refuse
@dataclass
class Outcome(Generic[T]):
    """What came of work asked of a device: its value, or a refusal (`status` "oom-<phase>[-cuda]"), and the
    device's figures for the ledger (empty when the run simulates no devices)."""

    status: str
    value: T | None = None
    figures: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Device:
    """Where a client's work runs: a torch device, and the simulated device's plan (None: devices are off)."""

    torch_device: torch.device
    plan: DevicePlan | None = None

    @classmethod
    def for_run(cls, cfg: RunConfig, plan: DevicePlan | None) -> "Device":
        return cls(resolve_device(cfg.device), plan)

    def shape(self, phase: str) -> TrainingShape | None:
        """The budget shape to train with in `phase` (None: no device, the run's own shape)."""
        return self.plan.phase(phase).shape if self.plan else None

    def method(self, method: Method) -> Method:
        """`method` as this device can afford it (a plan may have lowered FAR's retention)."""
        return adapted_method(method, self.plan.train) if self.plan else method

    def refusal(self, phase: str) -> Outcome | None:
        """The refusal of a device whose plan for `phase` does not fit its budget (None: it fits, or no device)."""
        if self.plan is None or self.plan.phase(phase).fits:
            return None
        return Outcome(f"oom-{phase}", figures=self.plan.figures(self.plan.phase(phase)))

    def run(self, phase: str, work: Callable[[TrainingShape | None, int | None], T]) -> Outcome[T]:
        """Plan, then run or refuse. Over budget in the plan: refuse without running. Otherwise run
        `work(shape, budget_bytes)`; on a CUDA device `budget_bytes` is the real cap (fedfar.devices.gpu), and an
        allocation past it becomes a refusal with the allocator's figures, as a device would run out of memory."""
        if (refused := self.refusal(phase)) is not None:
            return refused
        budget = self.plan.phase(phase) if self.plan else None
        planned = self.plan.figures(budget) if self.plan else {}
        try:
            value = work(budget.shape if budget else None, self.plan.profile.memory_budget_bytes if self.plan else None)
        except BudgetExceeded as err:
            return Outcome(f"oom-{phase}-cuda", figures={**planned, **err.usage.figures()})
        return Outcome("ok", value, planned)
