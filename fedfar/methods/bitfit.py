"""BitFit (Ben Zaken et al., 2022): only the bias terms train, plus the task head."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import Method


def apply_bitfit(model: nn.Module) -> None:
    prefix = model.base_model_prefix + "."
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias") or not name.startswith(prefix))


@dataclass(frozen=True)
class BitFit(Method):
    name = "bitfit"

    def trainable(self, model: nn.Module) -> None:
        apply_bitfit(model)
