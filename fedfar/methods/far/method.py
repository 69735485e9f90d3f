"""FAR and its control, random node selection, as methods: a share of each FFN block's nodes learns, the rest is
frozen, and the FFN is split into a learner and a frozen branch while training (fedfar.methods.far.layer)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..base import POLICY_SUFFIX, Method, PolicyMethod, get_policy
from ..full import Full
from .model import ffn_sizes, merge, random_learners, reconfigure


@dataclass(frozen=True)
class NodeSelection(PolicyMethod):
    """What FAR and random selection share: retention, policy, the split while training, the merge back."""

    retention: float = 0.1
    selects_rows = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.retention <= 1.0:
            raise ValueError(f"retention must be in (0, 1], got {self.retention}")

    @property
    def label(self) -> str:
        return f"{self.name}{round(self.retention * 100):d}{POLICY_SUFFIX[self.policy]}"

    def initial_learners(self, model: nn.Module, seed: int) -> list[torch.Tensor] | None:
        """Learners chosen without training (None: the method must prime first)."""
        return None

    def prepare(self, model: nn.Module, learners: list[torch.Tensor] | None = None, seed: int = 0,
                preact_storage: str = "bfloat16") -> dict:
        learners = learners if learners is not None else self.initial_learners(model, seed)
        if learners is None:
            raise ValueError(f"{self.label} needs its learner nodes: prime first (fedfar.train.train does), or "
                             "pass learners")
        return reconfigure(model, learners, get_policy(self.policy), preact_storage)

    def merge(self, model: nn.Module) -> nn.Module:
        return merge(model)


@dataclass(frozen=True)
class FAR(NodeSelection):
    """Freeze And Reconfigure (Vucetic et al., 2022): learners are the nodes that moved most while priming."""

    name = "far"
    primes = True

    def priming_method(self) -> Method:
        """Priming trains every FFN node under this method's own policy: ordinary fine-tuning of that policy."""
        return Full(policy=self.policy)


@dataclass(frozen=True)
class RandomSelection(NodeSelection):
    """The control of Table III: the same number of learners per block, drawn uniformly from a seed."""

    name = "random"

    def initial_learners(self, model: nn.Module, seed: int) -> list[torch.Tensor]:
        return random_learners(ffn_sizes(model), self.retention, seed)
