"""Ordinary fine-tuning, optionally under a freeze policy ('full', 'full-emb', 'full-attn'): FedAvg's baseline."""
from __future__ import annotations

from dataclasses import dataclass

from .base import POLICY_SUFFIX, PolicyMethod


@dataclass(frozen=True)
class Full(PolicyMethod):
    name = "full"

    @property
    def label(self) -> str:
        return f"full{POLICY_SUFFIX[self.policy]}"
