"""One device's work in a round: prime and score, or fine-tune on a received part and return a delta.

`Job` is what a ClientApp handler asks for: it opens this node's partition, model and device, runs the work on
the device (fedfar.devices.device: plan, then run or refuse) and returns the reply's records.

A worker process (a Ray actor in simulation, a SuperNode's ClientApp process in deployment) serves many rounds
and, in simulation, many clients: the pretrained model and each tokenized partition are loaded once per
worker and reused (`WorkerCache`), never once per round.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import time
from collections import OrderedDict
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Mapping, TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..data import (PartitionIndex, by_length, compute_metrics, get_task, load_glue, make_loader, reshuffled,
                    tokenize)
from ..devices.budget import TrainingShape
from ..devices.device import Device, DevicePlan, Outcome, client_profile, device_plan, profile_record
from ..devices.flops import count_flops
from ..devices.gpu import on_device, resolve_device
from ..devices.profiles import DeviceProfile
from ..methods import ExchangePlan, Method
from ..methods.far import ffn_sizes, ffn_weights, node_scores, num_learners, select_learners
from ..models import load_model, load_tokenizer, resolve as resolve_model
from ..train import TrainConfig, predict, train
from . import coldstart, exchange
from .codecs import decode, encode, pack, reconstruction_error
from .config import RunConfig
from .faults import corrupt, hang_seconds


V = TypeVar("V")


class Bounded(OrderedDict):
    """A least-recently-used cache of at most `size` entries: a worker that serves thousands of clients keeps
    the last few, so its memory stays flat in the number of clients."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or(self, key: Hashable, make: Callable[[], V]) -> V:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class NodeDisk:
    """What a deployed node keeps on its own disk between messages (node config `cache-dir`): each message is a
    fresh ClientApp process in Flower 1.41 deployments, so without it every message re-reads and re-splits the
    train set, re-tokenizes its share and re-plans its device budget. Entries are named by a hash of everything
    they depend on (and of the data file's size and modification time), written atomically; a damaged entry is
    recomputed. Only this node writes them: they are this node's own results, pickled."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()

    def path(self, kind: str, key: tuple) -> Path:
        return self.folder / kind / (hashlib.sha256(repr(key).encode()).hexdigest()[:32] + ".pkl")

    def get_or(self, kind: str, key: tuple, make: Callable[[], V]) -> V:
        path = self.path(kind, key)
        try:
            with path.open("rb") as fh:
                return pickle.load(fh)
        except FileNotFoundError:
            pass
        except Exception:  # noqa: BLE001 -- a torn or stale entry is recomputed, never fatal
            with suppress(OSError):
                path.unlink(missing_ok=True)
        value = make()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as fh:
                pickle.dump(value, fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)  # two ClientApps of one node may write one entry: the last rename wins, whole
        except OSError:  # a full or read-only disk costs the next message its cache, never this message
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
        return value


def _rows(ds) -> list[dict] | None:
    """A tokenized split as plain rows (what the DataLoader reads from a Dataset, so batches are identical):
    pickled small and fast, and read back without importing `datasets`."""
    return None if ds is None else [dict(row) for row in ds]


def _data_identity(cfg: RunConfig) -> tuple:
    """What a partition depends on beyond the config: the train file's size and modification time (local GLUE)."""
    if str(cfg.data_source) == "hub":
        return ("hub",)
    path = Path(cfg.data_source) / get_task(cfg.task).folder / "train.tsv"
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def _model_identity(ref: str) -> tuple:
    """What a loaded model depends on beyond its reference: the library versions and its files' sizes and
    modification times; empty for a hub id (not keyed, not cached)."""
    import transformers

    versions = (torch.__version__, transformers.__version__, "model/1")
    if ref.startswith("random:"):
        return versions
    source = resolve_model(ref)
    if not isinstance(source, Path):
        return ()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in source.iterdir() if f.is_file())
    return (*versions, str(source), *files)


@dataclass
class WorkerCache:
    """What a worker keeps between messages. The split of a dataset is computed once per worker and each client's
    share is a slice of it, so opening a client costs the same with 10 or 10,000 clients; per-client entries are
    bounded (least recently used go first)."""

    models: dict = field(default_factory=dict)      # (model ref, num_labels, seed, method) -> (model, pristine)
    tokenizers: dict = field(default_factory=dict)
    datasets: Bounded = field(default_factory=lambda: Bounded(2))      # (task, source) -> the train split
    indexes: Bounded = field(default_factory=lambda: Bounded(4))       # (... , N, scheme) -> PartitionIndex
    partitions: Bounded = field(default_factory=lambda: Bounded(64))   # (...) -> (train tokenized, eval | None)
    profiles: Bounded = field(default_factory=lambda: Bounded(4096))   # (fleet, catalog, node) -> DeviceProfile | None
    plans: dict = field(default_factory=dict)       # (device profile, run shape) -> DevicePlan

    def model(self, cfg: RunConfig, disk: NodeDisk | None = None) -> torch.nn.Module:
        """The pretrained model with the method's additions (LoRA's adapters), reset to its pristine weights (a
        device holds the checkpoint)."""
        task = get_task(cfg.task)
        key = (cfg.model, task.num_labels, cfg.seed, cfg.method)
        if key not in self.models:
            def build():
                return cfg.spec.attach(load_model(cfg.model, task.num_labels, seed=cfg.seed), cfg.seed)

            # transformers' from_pretrained spends ~0.6 s per process on its own set-up; a node reads the pickled
            # module back in a fraction (a hub id has no local files to key on: it is always loaded).
            identity = _model_identity(cfg.model) if disk is not None else ()
            model = disk.get_or("models", (*key, *identity), build) if identity else build()
            self.models[key] = (model, {k: v.clone() for k, v in model.state_dict().items()})
            return model  # just built: pristine already
        model, pristine = self.models[key]
        cfg.spec.merge(model)  # a previous client may have failed mid-round with the model still reconfigured
        model.load_state_dict(pristine)
        return model

    def tokenizer(self, cfg: RunConfig):
        if cfg.model not in self.tokenizers:
            self.tokenizers[cfg.model] = load_tokenizer(cfg.model)
        return self.tokenizers[cfg.model]

    @staticmethod
    def _split_key(cfg: RunConfig, num_partitions: int) -> tuple:
        """What a split depends on: the train set (task, source, holdout), the number of partitions and the
        scheme."""
        return (cfg.task, str(cfg.data_source), cfg.holdout_examples, num_partitions,
                tuple(sorted(cfg.partition_kwargs().items())))

    def index(self, cfg: RunConfig, num_partitions: int) -> PartitionIndex:
        """The seeded split of the task's train set into `num_partitions`, once per worker."""
        source = (cfg.task, str(cfg.data_source))
        return self.indexes.get_or(self._split_key(cfg, num_partitions), lambda: PartitionIndex(
            cfg.split_train(self.datasets.get_or(source, lambda: load_glue(cfg.task, "train", cfg.data_source)))[0],
            num_partitions, **cfg.partition_kwargs()))

    def partition(self, cfg: RunConfig, partition_id: int, num_partitions: int, disk: NodeDisk | None = None):
        """(tokenized train share, tokenized held-out share | None) of one partition; with `disk`, read from or
        written to the node's disk (as plain rows)."""
        key = (*self._split_key(cfg, num_partitions), partition_id, cfg.model, cfg.max_length,
               cfg.max_train_examples, cfg.eval_share if cfg.federated_eval else 0.0)

        def make():
            task = get_task(cfg.task)
            ds = self.index(cfg, num_partitions).load(partition_id)
            held_out = None
            if cfg.federated_eval and cfg.eval_share > 0 and len(ds) >= 10:
                split = ds.train_test_split(test_size=cfg.eval_share, seed=cfg.partition_seed)
                ds, held_out = split["train"], split["test"]
            if cfg.max_train_examples:
                ds = ds.select(range(min(cfg.max_train_examples, len(ds))))
            tok = self.tokenizer(cfg)
            return (tokenize(ds, tok, task, cfg.max_length),
                    tokenize(held_out, tok, task, cfg.max_length) if held_out else None)

        if disk is not None:
            return self.partitions.get_or(key, lambda: disk.get_or(
                "partitions", (*key, _data_identity(cfg), "rows/1"), lambda: tuple(_rows(d) for d in make())))
        return self.partitions.get_or(key, make)

    def profile(self, cfg: RunConfig, node_config: Mapping) -> DeviceProfile | None:
        """This node's simulated device (None: devices off), read from the fleet and catalog once per worker."""
        key = (cfg.fleet, cfg.device_catalog, cfg.partition_seed, tuple(sorted(node_config.items())))
        return self.profiles.get_or(key, lambda: client_profile(cfg, node_config))

    def device_plan(self, cfg: RunConfig, node_config: Mapping, disk: NodeDisk | None = None) -> DevicePlan | None:
        """The node's device budget plan (None: devices off), accounted once per worker (and, with `disk`, once
        per node): it depends on the shape, not on the data."""
        profile = self.profile(cfg, node_config)
        if profile is None:
            return None
        key = (profile, cfg.model, cfg.method, cfg.mask_mode, cfg.batch_size, cfg.max_length, cfg.preact_storage,
               cfg.oom_policy, cfg.seed)
        if key not in self.plans:
            plan = lambda: device_plan(cfg, self.model(cfg), profile)  # noqa: E731
            self.plans[key] = disk.get_or("plans", (*key, "plan/1"), plan) if disk is not None else plan()
        return self.plans[key]


CACHE = WorkerCache()


def client_seed(seed: int, partition: int, server_round: int = 0) -> int:
    """A client's seed for one round (round 0: the device's own, round-independent draws such as its learners)."""
    return seed + 7919 * partition + server_round


def train_config(cfg: RunConfig, seed: int, shape: TrainingShape | None = None) -> TrainConfig:
    """The local optimiser settings; with a device plan's shape, its micro-batch and pre-activation storage."""
    micro = shape.micro_batch if shape and shape.micro_batch < shape.batch_size else 0
    return TrainConfig(lr=cfg.lr, seed=seed, priming_share=cfg.priming_share, micro_batch=micro,
                       preact_storage=shape.preact_storage if shape else cfg.preact_storage)


def priming_steps(cfg: RunConfig, steps_per_round: int) -> int:
    """Priming length: `priming_share` of the client's local steps over the whole run, at least one."""
    return max(1, round(cfg.priming_share * steps_per_round * cfg.num_rounds))


def prime_scores(model: torch.nn.Module, loader, steps: int, cfg: RunConfig, seed: int,
                 shape: TrainingShape | None = None, budget_bytes: int | None = None) -> list[torch.Tensor]:
    """Prime for `steps` steps and return each FFN node's L1 weight movement. The model is restored.

    `budget_bytes`: on a CUDA `device`, the real cap on the training process's GPU memory (fedfar.devices.gpu)."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    before = ffn_weights(model)
    # All FFN nodes train; outside the FFN, the policy holds (frozen embeddings stay frozen while priming too).
    with on_device(model, resolve_device(cfg.device), budget_bytes):
        coldstart.mark("step")
        train(model, loader, cfg.spec.priming_method(), steps / len(loader), train_config(cfg, seed, shape))
    scores = node_scores(before, ffn_weights(model))
    model.load_state_dict(saved)
    return scores


def subset_rows(rows: list[torch.Tensor], retention: float, sizes: list[int], seed: int) -> list[torch.Tensor]:
    """A device that had to lower its retention trains a seeded random subset of the server's learners."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r, d in zip(rows, sizes):
        k = min(len(r), num_learners(d, retention))
        out.append(r[torch.randperm(len(r), generator=gen)[:k]].sort().values)
    return out


def local_update(
    model: torch.nn.Module,
    part_down: dict[str, torch.Tensor],
    plan: ExchangePlan,
    rows: list[torch.Tensor] | None,
    loader,
    cfg: RunConfig,
    seed: int,
    method: Method | None = None,
    shape: TrainingShape | None = None,
    count: bool = False,
    budget_bytes: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Load the received part into the pristine model, fine-tune, and return (delta part, metrics).

    `method` / `shape`: the method and the budget shape a device plan chose (default: the run's own). `count`:
    count the FLOPs of the training actually done (for the simulated clock). `budget_bytes`: on a CUDA
    `device`, the real cap on GPU memory while training (fedfar.devices.gpu; raises BudgetExceeded past it).
    """
    method = method or cfg.spec
    state = model.state_dict()
    exchange.write(state, part_down, plan)
    before = exchange.select(state, plan, rows)
    t0 = time.perf_counter()
    with count_flops() if count else nullcontext() as counter, \
            on_device(model, resolve_device(cfg.device), budget_bytes) as usage:
        coldstart.mark("step")
        result = train(model, loader, method, cfg.local_epochs, train_config(cfg, seed, shape), learners=rows)
    train_time = time.perf_counter() - t0
    method.merge(model)
    after = exchange.select(model.state_dict(), plan, rows)
    delta = {k: (after[k] - before[k]) if not k.endswith(".rows") else after[k] for k in after}
    losses = result["losses"]
    metrics = {"train-loss": float(sum(losses) / len(losses)), "train-time-s": train_time, "steps": result["steps"],
               **usage.figures()}
    if counter is not None:
        metrics["train-flops"] = float(counter.get_total_flops())
    return delta, metrics


def evaluate(model, ds_tok, tokenizer, task, batch_size: int = 128) -> dict[str, float]:
    coldstart.mark("step")
    logits, labels = predict(model, make_loader(by_length(ds_tok), tokenizer, batch_size, shuffle=False))
    return compute_metrics(task, logits, labels)



# ------------------------------------------------------------------------------------------ one message
def _records(metrics: dict, device: dict | None = None, **arrays: ArrayRecord) -> RecordDict:
    content: dict = {**arrays, "metrics": MetricRecord(metrics)}
    if device is not None:
        content["device"] = ConfigRecord(device)
    return RecordDict(content)


def handle(kind: str, content: RecordDict, run_config: Mapping, node_config: Mapping, state: RecordDict) -> RecordDict:
    """One message's reply records: `kind` is the ClientApp handler ("register", "prime", "train", "evaluate"),
    `state` the node's Flower state (local masks keep the device's learners in it). Run in the ClientApp's own
    process, or in the node's warm worker (fedfar.federation.node_worker)."""
    if kind == "register":
        return register_reply(run_config, node_config)
    server_round = int(content["config"]["server-round"]) if "config" in content else 0
    job = Job.open(run_config, node_config, server_round)
    if kind == "prime":
        return job.prime(content["part"] if "part" in content else None)
    if kind == "train":
        return job.train(content["part"], state, content["learners"] if "learners" in content else None)
    if kind == "evaluate":
        return job.evaluate(content["part"])
    raise ValueError(f"unknown message kind {kind!r}: expected register, prime, train or evaluate")


def register_reply(run_config: Mapping, node_config: Mapping) -> RecordDict:
    """Start of a run: which partition and which simulated device this node is (none if devices are off)."""
    profile = CACHE.profile(RunConfig.from_flower(run_config), node_config)
    return _records({"partition-id": int(node_config["partition-id"])},
                    profile_record(profile) if profile else {})


@dataclass
class Job:
    """What one message asks of a node: the run config, its partition, the pristine model, a seeded loader, and
    the device it runs on."""

    cfg: RunConfig
    partition_id: int
    seed: int
    model: torch.nn.Module
    loader: object
    held_out: object
    device: Device
    server_round: int = 0
    opened: float = 0.0  # perf_counter when the message arrived: the client's time beyond training is measured
    open_s: float = 0.0  # loading its partition, tokenizing, resetting the model, planning the device
    first: bool = False  # the first message its process serves: it reports the process's cold start

    def overhead(self, train_s: float) -> dict[str, float]:
        """What this message cost beyond the training steps, in seconds (reported per client, so a scale run can
        show that it does not grow with the number of clients)."""
        client_s = time.perf_counter() - self.opened
        return {"open-s": self.open_s, "client-s": client_s, "overhead-s": client_s - train_s,
                **(coldstart.figures() if self.first else {})}

    @classmethod
    def open(cls, run_config: Mapping, node_config: Mapping, server_round: int) -> "Job":
        opened, first = time.perf_counter(), coldstart.message_started()
        cfg = RunConfig.from_flower(run_config)
        pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        seed = client_seed(cfg.seed, pid, server_round)
        disk = NodeDisk(node_config["cache-dir"]) if node_config.get("cache-dir") else None
        model = CACHE.model(cfg, disk)
        train_ds, held_out = CACHE.partition(cfg, pid, num, disk)
        device = Device.for_run(cfg, CACHE.device_plan(cfg, node_config, disk))
        loader = make_loader(train_ds, CACHE.tokenizer(cfg), cfg.batch_size, shuffle=True, seed=seed)
        # Seed last. Dropout draws from the global generator, and so do a worker's first-round chores (loading the
        # model reseeds it and initialises the head; the budget plan runs a real step): seeding before them gave
        # the first client each worker served other masks than a warm worker would, so runs differed with
        # scheduling.
        torch.manual_seed(seed)
        return cls(cfg, pid, seed, model, loader, held_out, device, server_round, opened,
                   time.perf_counter() - opened, first)

    def _refusal(self, outcome: Outcome) -> RecordDict:
        """What a device that cannot fit the work sends instead of an update: its figures, no weights."""
        return _records({"num-examples": 0, "partition-id": self.partition_id},
                        {**outcome.figures, "status": outcome.status})

    def _prime(self, shape: TrainingShape | None, budget: int | None, loader=None,
               seed: int | None = None) -> tuple[list[torch.Tensor], float]:
        """Priming's node scores and the FLOPs it took (on this message's loader and seed unless given)."""
        loader = self.loader if loader is None else loader
        with count_flops() as counter:
            scores = prime_scores(self.model, loader, priming_steps(self.cfg, len(loader)), self.cfg,
                                  self.seed if seed is None else seed, shape, budget)
        return scores, float(counter.get_total_flops())

    def prime(self, part: ArrayRecord | None = None) -> RecordDict:
        """Global mask mode: prime on local data and send node scores (no weights); round 0 primes the pretrained
        model, a mask refresh (reprime-every) the global model whose trainable `part` came with the request."""
        if part is not None:
            exchange.write(self.model.state_dict(), decode(part), self.cfg.spec.exchange_plan(self.model))
        start = time.time()
        outcome = self.device.run("prime", self._prime)
        if not outcome.ok:
            return self._refusal(outcome)
        scores, flops = outcome.value
        metrics = {"num-examples": len(self.loader.dataset), "partition-id": self.partition_id,
                   "prime-start": start, "prime-end": time.time(), "train-flops": flops,
                   **(coldstart.figures() if self.first else {})}
        return _records(metrics, {**outcome.figures, "status": "ok"} if outcome.figures else {},
                        scores=encode({f"scores.{i}": s.float() for i, s in enumerate(scores)}, "float32"))

    def _own_learners(self, method: Method, state: RecordDict) -> tuple[list[torch.Tensor] | None, float, Outcome]:
        """Local mask mode: this device's own learners, chosen (by priming, for FAR) at its first participation
        and kept in the node's state. Returns (learners, FLOPs spent choosing them now, outcome)."""
        flops = 0.0
        if "learners" not in state:
            # The device's learners depend on (seed, partition) only, not on the round it first trains in, and
            # priming draws from its own generator: a resumed run, whose nodes start with empty state, chooses
            # the same learners and trains on the same random stream.
            seed = client_seed(self.cfg.seed, self.partition_id)
            if method.primes:
                loader = reshuffled(self.loader, seed)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    outcome = self.device.run("prime", lambda shape, budget: self._prime(shape, budget, loader, seed))
                if not outcome.ok:
                    return None, 0.0, outcome
                scores, flops = outcome.value
                learners = select_learners(scores, method.retention)
            else:
                learners = method.initial_learners(self.model, seed)
            state["learners"] = encode({str(i): rows for i, rows in enumerate(learners)})
        stored = decode(state["learners"])
        return [stored[str(i)].long() for i in range(len(stored))], flops, Outcome("ok")

    def train(self, part: ArrayRecord, state: RecordDict, learners: ArrayRecord | None = None) -> RecordDict:
        """Fine-tune on the received trainable part; the reply holds the delta of the trainable tensors only.
        `learners`: after a mask refresh the part holds rows that no longer learn; these are the mask's."""
        fault = self.cfg.fault(self.partition_id, self.server_round)
        if fault and fault.kind == "crash":
            raise RuntimeError(f"injected fault: partition {self.partition_id} crashes in round {self.server_round}")
        if fault and fault.kind == "hang":
            time.sleep(hang_seconds(self.cfg.round_timeout_s))  # the server's round timeout lets it go first
        cfg, run_method = self.cfg, self.cfg.spec
        plan = run_method.exchange_plan(self.model)
        if (refused := self.device.refusal("train")) is not None:  # refuse before priming or decoding anything
            return self._refusal(refused)
        method = self.device.method(run_method)  # a budget plan may have lowered FAR's retention
        part_down = decode(part)
        rows = exchange.part_rows(part_down, plan)
        if learners is not None and plan.sliced:
            mask = decode(learners)
            rows = [mask[f"ffn.{i}.rows"].long() for i in range(len(plan.ffn))]
        start = time.time()  # wall-clock, so the server can tell training time from everything else
        flops = 0.0
        if plan.sliced and cfg.mask_mode == "local":
            rows, flops, outcome = self._own_learners(method, state)
            if not outcome.ok:
                return self._refusal(outcome)
        elif plan.sliced and method.retention != run_method.retention:
            rows = subset_rows(rows, method.retention, ffn_sizes(self.model), self.seed)

        def work(shape: TrainingShape | None, budget: int | None):
            return local_update(self.model, part_down, plan, rows, self.loader, cfg, self.seed, method, shape,
                                count=self.device.plan is not None, budget_bytes=budget)

        outcome = self.device.run("train", work)
        if not outcome.ok:
            return self._refusal(outcome)
        delta, metrics = outcome.value
        metrics.update({"train-start": start, "train-end": time.time()})
        if self.device.plan is not None:
            metrics["train-flops"] += flops
        if plan.sliced and cfg.mask_mode == "global" and method.retention == run_method.retention:
            delta = {k: v for k, v in delta.items() if not k.endswith(".rows")}  # the server knows its mask
        metrics["update-norm"] = float(sum(v.double().pow(2).sum() for k, v in delta.items()
                                           if not k.endswith(".rows")) ** 0.5)
        if fault:
            delta = corrupt(delta, fault)
        record = encode(delta, cfg.codec)
        error = (reconstruction_error(delta, decode(record)) if cfg.codec != "float32"
                 else {"max_abs": 0.0, "rel_l2": 0.0})
        metrics.update({"num-examples": len(self.loader.dataset), "partition-id": self.partition_id,
                        "codec-rel-l2": error["rel_l2"], "codec-max-abs": error["max_abs"],
                        **self.overhead(metrics["train-time-s"])})
        device = {**outcome.figures, "status": "ok"} if outcome.figures else {}
        return _records(metrics, {**device, "fault": fault.label} if fault else device, delta=pack(record))

    def evaluate(self, part: ArrayRecord) -> RecordDict:
        """Federated evaluation: the global model on this device's held-out share."""
        if self.held_out is None:
            return _records({"num-examples": 0, "partition-id": self.partition_id})
        exchange.write(self.model.state_dict(), decode(part), self.cfg.spec.exchange_plan(self.model))
        start = time.time()
        metrics = evaluate(self.model, self.held_out, CACHE.tokenizer(self.cfg), get_task(self.cfg.task))
        metrics.update({"num-examples": len(self.held_out), "partition-id": self.partition_id,
                        "eval-start": start, "eval-end": time.time(),
                        **(coldstart.figures() if self.first else {})})
        return _records(metrics)
