"""Server optimizers on partial updates: FedAvg, FedAvgM, FedAdam and FedYogi (Reddi et al., ICLR 2021).

The aggregate of the clients' deltas is a pseudo-gradient Δ (fedfar.federation.exchange computes it per tensor, or
per FFN row for masked deltas). The optimizer turns it into the step added to the global model:

  fedavg    x += lr Δ
  fedavgm   m = momentum m + Δ;                                  x += lr m
  fedadam   m = β1 m + (1 - β1) Δ;  v = β2 v + (1 - β2) Δ²;        x += lr m / (√v + τ)
  fedyogi   m as fedadam;           v = v - (1 - β2) Δ² sign(v - Δ²); x += lr m / (√v + τ)

as Reddi et al.'s Algorithm 2 writes them: no bias correction, v starts at τ². Only the coordinates that were
sent move, and only their optimizer state is updated: rows nobody sent keep their moments and their weights stay
bit-identical, in global and in local mask mode alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

SERVER_OPTS = ("fedavg", "fedavgm", "fedadam", "fedyogi")


@dataclass
class ServerOptimizer:
    kind: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9  # fedavgm
    beta1: float = 0.9     # fedadam, fedyogi
    beta2: float = 0.99
    tau: float = 1e-3
    state: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # tensor name -> {"m", "v"}, full shape

    def __post_init__(self) -> None:
        problems = [
            (self.kind in SERVER_OPTS, f"server-opt {self.kind!r}: choose one of {', '.join(SERVER_OPTS)}"),
            (self.lr > 0, f"server-lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"server-momentum must be in [0, 1), got {self.momentum}"),
            (0 <= self.beta1 < 1, f"server-beta1 must be in [0, 1), got {self.beta1}"),
            (0 <= self.beta2 < 1, f"server-beta2 must be in [0, 1), got {self.beta2}"),
            (self.tau > 0, f"server-tau must be > 0 (it keeps the adaptive step finite), got {self.tau}"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)

    def _moment(self, name: str, key: str, like: Tensor, start: float = 0.0) -> Tensor:
        slot = self.state.setdefault(name, {})
        if key not in slot:
            slot[key] = torch.full_like(like, start)
        return slot[key]

    @torch.no_grad()
    def step(self, name: str, param: Tensor, index, delta: Tensor) -> Tensor:
        """The step for `param[index]` given its pseudo-gradient `delta` (shaped like `param[index]`); updates
        the optimizer state at `index` only."""
        delta = delta.to(param.dtype)
        if self.kind == "fedavg":
            return self.lr * delta
        m = self._moment(name, "m", param)
        if self.kind == "fedavgm":
            m_new = self.momentum * m[index] + delta
            m[index] = m_new
            return self.lr * m_new
        v = self._moment(name, "v", param, self.tau ** 2)
        m_new = self.beta1 * m[index] + (1 - self.beta1) * delta
        square, v_old = delta * delta, v[index]
        if self.kind == "fedadam":
            v_new = self.beta2 * v_old + (1 - self.beta2) * square
        else:
            v_new = v_old - (1 - self.beta2) * square * torch.sign(v_old - square)
        m[index], v[index] = m_new, v_new
        return self.lr * m_new / (v_new.sqrt() + self.tau)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat {"<tensor>/<m|v>": moment}, e.g. for a safetensors checkpoint."""
        return {f"{name}/{key}": t for name, slot in self.state.items() for key, t in slot.items()}

    def load_state_dict(self, flat: dict[str, Tensor]) -> None:
        self.state = {}
        for key, t in flat.items():
            name, _, moment = key.rpartition("/")
            self.state.setdefault(name, {})[moment] = t.clone()
