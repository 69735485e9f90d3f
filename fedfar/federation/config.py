"""The federated run configuration: one dataclass, read once from Flower's run config and validated up front.

Defaults live in pyproject.toml's [tool.flwr.app.config]; configs/*.toml override them
(`flwr run . --run-config configs/X.toml`). Keys use Flower's dashed style.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..data import PARTITION_SCHEMES, carve_holdout, get_task, resolve_source
from ..devices.budget import PLAN_POLICIES
from ..devices.gpu import DEVICES
from ..methods import PREACT_STORAGE, Method, parse_method
from .codecs import CODECS
from .exchange import AGGREGATORS
from .faults import Fault, fault_for, load_faults
from .server_opt import ServerOptimizer

if TYPE_CHECKING:
    from datasets import Dataset

MASK_MODES = ("global", "local")


@dataclass(frozen=True)
class RunConfig:
    task: str = "cola"
    model: str = "minilm"
    data: str = ""                 # "" = local GLUE folder (../shared/data/glue or $FEDFAR_GLUE_DIR), "hub", or a path
    method: str = "far10-emb"      # see fedfar.methods.METHOD_HELP
    mask_mode: str = "global"      # global: server picks learners from aggregated scores; local: each client
    codec: str = "float32"         # uplink delta encoding: float32 | float16 | bfloat16 | int8
    num_rounds: int = 3
    fraction_train: float = 1.0
    local_epochs: float = 1.0
    batch_size: int = 32
    lr: float = 5e-5
    max_length: int = 64
    priming_share: float = 0.01    # of a client's local steps over the whole run (at least one step)
    priming_clients: int = 16      # global mask: how many (seeded sample of the available) clients prime in round 0
    reprime_every: int = 0         # global mask: re-prime the current global model and choose a new mask every k
                                   # rounds (before rounds k+1, 2k+1, ...); 0 = keep round 0's mask
    preact_storage: str = "bfloat16"
    partitioner: str = "iid"
    alpha: float = 0.5
    shards_per_partition: int = 2
    partition_seed: int = 42
    max_train_examples: int = 0    # per client; 0 = its whole partition
    dev_examples: int = 0          # server-side evaluation subset; 0 = the whole dev set
    # Tuning without touching dev: carve this many train rows (seeded by partition-seed) out of every partition and
    # evaluate on them instead of dev. 0 = evaluate on dev.
    holdout_examples: int = 0
    federated_eval: bool = False
    eval_share: float = 0.1        # of each partition held out for federated evaluation
    server_lr: float = 1.0
    # Server optimizer (fedfar.federation.server_opt), applied to what was sent: fedavg | fedavgm | fedadam | fedyogi
    server_opt: str = "fedavg"
    server_momentum: float = 0.9   # fedavgm
    server_beta1: float = 0.9      # fedadam, fedyogi
    server_beta2: float = 0.99     # fedadam, fedyogi
    server_tau: float = 1e-3       # fedadam, fedyogi: adaptivity (Reddi et al. 2021)
    seed: int = 0
    results_dir: str = "results/runs"
    run_name: str = ""
    save_model: bool = True        # the final global model as an ordinary save_pretrained folder
    # Simulated devices (fedfar.devices, DESIGN §3). fleet = "" simulates none: no budgets, no simulated clock.
    fleet: str = ""                # fleet TOML (configs/fleets/*.toml): one device profile per partition
    device_catalog: str = ""       # extra device catalog on top of configs/devices.toml (same names replace)
    oom_policy: str = "adapt"      # over budget: adapt (micro-batch, retention, recompute) or fail like a device
    deadline_s: float = 0.0        # simulated round deadline; slower clients are dropped; 0 = none
    device: str = "cpu"            # where clients train: cpu, or cuda (budgets also capped for real: fedfar.devices.gpu)
    # Robustness (fedfar.federation.exchange, .faults): every reply is validated before any is merged.
    aggregator: str = "mean"       # mean (FedAvg on what was sent) | median | trimmed-mean, each row over its senders
    trim_share: float = 0.1        # trimmed-mean: share of values dropped at each end, in [0, 0.5)
    max_update_norm: float = 0.0   # reject a client update whose L2 norm exceeds this; 0 = no bound
    round_timeout_s: float = 0.0   # stop waiting for a round's replies after this many seconds (late = lost); 0 = none
    faults: str = ""               # fault-injection TOML ([[fault]] partition, rounds, kind); "" = none
    resume: str = ""               # a run folder to continue from its last checkpoint (`fedfar run --resume DIR`)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's run config (dashed keys); unknown keys and bad values fail here, before compute."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"unknown run-config key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        values = {}
        for key, value in run_config.items():
            f = known[key]
            kind = type(getattr(cls, f.name))
            try:
                if (kind is bool) != isinstance(value, bool) or (kind is int and isinstance(value, float)):
                    raise TypeError  # no silent 2.5 -> 2, and no true -> 1
                values[f.name] = kind(value) if kind is not bool else value
            except (TypeError, ValueError):
                raise ValueError(f"run-config {key} = {value!r}: expected {'an' if kind is int else 'a'} "
                                 f"{kind.__name__}") from None
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        get_task(self.task)
        parse_method(self.method)
        checks = [
            (self.mask_mode in MASK_MODES, f"mask-mode {self.mask_mode!r}: choose {' or '.join(MASK_MODES)}"),
            (self.codec in CODECS, f"codec {self.codec!r}: choose one of {', '.join(CODECS)}"),
            (self.partitioner in PARTITION_SCHEMES,
             f"partitioner {self.partitioner!r}: choose one of {', '.join(PARTITION_SCHEMES)}"),
            (self.preact_storage in PREACT_STORAGE, f"preact-storage: choose one of {', '.join(PREACT_STORAGE)}"),
            (self.num_rounds >= 1, "num-rounds must be at least 1"),
            (0 < self.fraction_train <= 1, "fraction-train must be in (0, 1]"),
            (self.local_epochs > 0 and self.batch_size > 0 and self.lr > 0,
             "local-epochs, batch-size and lr must be positive"),
            (self.alpha > 0, "alpha (Dirichlet concentration) must be positive"),
            (0 <= self.eval_share < 1, "eval-share must be in [0, 1)"),
            (0 < self.priming_share <= 1, "priming-share must be in (0, 1]"),
            (self.priming_clients >= 1, "priming-clients must be >= 1 (clients that prime in round 0)"),
            (self.reprime_every >= 0, "reprime-every must be >= 0 (0 = keep round 0's mask)"),
            (not self.reprime_every or (self.spec.primes and self.mask_mode == "global"),
             f"reprime-every = {self.reprime_every} refreshes a global FAR mask: set method to far<N>[-emb|-attn] "
             f"and mask-mode = \"global\" (method {self.method!r}, mask-mode {self.mask_mode!r}), or reprime-every "
             "= 0"),
            (self.oom_policy in PLAN_POLICIES, f"oom-policy {self.oom_policy!r}: choose {' or '.join(PLAN_POLICIES)}"),
            (self.deadline_s >= 0, "deadline-s must be >= 0 (0 = no deadline)"),
            (self.device in DEVICES, f"device {self.device!r}: choose {' or '.join(DEVICES)}"),
            (self.max_length > 0 and self.shards_per_partition > 0,
             "max-length and shards-per-partition must be positive"),
            (self.max_train_examples >= 0, "max-train-examples must be >= 0 (0 = the whole partition)"),
            (self.dev_examples >= 0, "dev-examples must be >= 0 (0 = the whole dev set)"),
            (self.holdout_examples >= 0, "holdout-examples must be >= 0 (0 = evaluate on dev)"),
            (self.aggregator in AGGREGATORS, f"aggregator {self.aggregator!r}: choose one of {', '.join(AGGREGATORS)}"),
            (0 <= self.trim_share < 0.5, "trim-share must be in [0, 0.5)"),
            (self.max_update_norm >= 0, "max-update-norm must be >= 0 (0 = no bound)"),
            (self.round_timeout_s >= 0, "round-timeout-s must be >= 0 (0 = wait for every reply)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.server_optimizer()  # its own checks name the key
        if any(f.kind == "hang" for f in self.fault_list) and not self.round_timeout_s:
            raise ValueError(f"faults {self.faults}: a 'hang' fault never replies: set round-timeout-s (e.g. 60) "
                             "so the round goes on without it")
        for key, path in (("fleet", self.fleet), ("device-catalog", self.device_catalog)):
            if path and not Path(path).expanduser().is_file():
                raise FileNotFoundError(f"{key} {path!r}: no such file (paths are relative to the directory the "
                                        "run starts in, e.g. configs/fleets/mixed_edge.toml)")
        if self.resume and not (Path(self.resume) / "checkpoint" / "latest.json").is_file():
            raise FileNotFoundError(f"resume {self.resume!r}: no checkpoint/latest.json there: the run stopped "
                                    "before its first round was saved, or it is not a fedfar run folder")
        if self.data not in ("", "hub") and not Path(self.data).expanduser().is_dir():
            raise FileNotFoundError(f"data folder {self.data} does not exist (classic GLUE layout "
                                    "<dir>/<Task>/train.tsv); use '' for the local default or 'hub'")

    def server_optimizer(self) -> ServerOptimizer:
        """A fresh server optimizer as configured (its state starts empty)."""
        return ServerOptimizer(self.server_opt, self.server_lr, self.server_momentum, self.server_beta1,
                               self.server_beta2, self.server_tau)

    def split_train(self, train: Dataset) -> tuple[Dataset, Dataset | None]:
        """(the rows clients partition, the holdout the server evaluates on instead of dev, or None)."""
        if not self.holdout_examples:
            return train, None
        return carve_holdout(train, self.holdout_examples, self.partition_seed)

    @property
    def spec(self) -> Method:
        """The fine-tuning method (fedfar.methods) that `method` names."""
        return parse_method(self.method)

    @cached_property
    def fault_list(self) -> tuple[Fault, ...]:
        """The injected faults (fedfar.federation.faults), read from `faults`; () when none."""
        return load_faults(self.faults)

    def fault(self, partition: int, server_round: int) -> Fault | None:
        return fault_for(self.fault_list, partition, server_round)

    @property
    def data_source(self) -> str | Path:
        return resolve_source(self.data)

    @property
    def label(self) -> str:
        spec = self.spec
        extra = ""
        if spec.primes:
            extra = f"-{self.mask_mode}" + (f"-reprime{self.reprime_every}" if self.reprime_every else "")
        opt = f"-{self.server_opt}" if self.server_opt != "fedavg" else ""
        return f"{spec.label}{extra}-{self.codec}{opt}"

    def as_dict(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def partition_kwargs(self) -> dict[str, Any]:
        return dict(scheme=self.partitioner, alpha=self.alpha, seed=self.partition_seed,
                    shards_per_partition=self.shards_per_partition)
