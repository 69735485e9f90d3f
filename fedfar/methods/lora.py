"""LoRA (Hu et al., 2022) through PEFT: rank-r adapters beside chosen linear layers of the encoder train with the
task head; every pretrained weight stays frozen.

  lora8       rank 8 on each block's attention query and value projections (the LoRA paper's choice), found per
              family through the architecture table (fedfar.methods.arch)
  lora8-all   rank 8 on every linear layer of the encoder blocks (attention and FFN)

Defaults: alpha = 2 x rank (scaling 2, as PEFT's sequence-classification examples use), dropout 0.1 on the adapter
input, no bias training. The head is everything outside the base model (the classifier; DistilBERT's
pre-classifier too); BERT's pretrained pooler stays frozen, as under PEFT's SEQ_CLS task type.

The adapters are attached for good (`attach`, PEFT's `inject_adapter_in_model`): their tensors are part of the
stock layout, so in a federation only they and the head travel, and the server averages A and B like any dense
tensor. `export` merges each adapter into its base weight (PEFT's own merge) and puts the plain linear back, so
`save_pretrained` writes a checkpoint that loads with plain transformers.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from .arch import blocks, get_attr, layout_of, set_attr
from .base import Method

TARGETS = {"qv": "the attention query and value projections", "all": "every linear layer of the encoder blocks"}


def _lora_layer_type() -> type:
    from peft.tuners.lora import LoraLayer  # peft is imported only by runs that use LoRA

    return LoraLayer


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA-wrapped layers of `model` by module name (empty: no adapters attached)."""
    layer = _lora_layer_type()
    return {n: m for n, m in model.named_modules() if isinstance(m, layer)}


@dataclass(frozen=True)
class LoRA(Method):
    rank: int = 8
    targets: str = "qv"
    alpha: float | None = None  # None: 2 x rank
    dropout: float = 0.1

    name = "lora"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA's rank must be a whole number >= 1, e.g. lora8; got {self.rank!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"unknown LoRA target {self.targets!r}: choose " +
                             " or ".join(f"lora{self.rank}{'' if t == 'qv' else '-' + t} ({what})"
                                         for t, what in TARGETS.items()))
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoRA's alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA's dropout must be in [0, 1), got {self.dropout}")

    @property
    def label(self) -> str:
        return f"lora{self.rank}{'' if self.targets == 'qv' else '-' + self.targets}"

    def target_modules(self, model: nn.Module) -> list[str]:
        """Full module names of the linear layers that get an adapter."""
        layout = layout_of(model)
        names = {id(m): n for n, m in model.named_modules()}
        if self.targets == "qv":
            if layout.query is None or layout.value is None:
                raise ValueError(f"LoRA's default targets are the attention query and value projections, and the "
                                 f"layout of model type {model.config.model_type!r} names none: add query= and "
                                 "value= to its Layout in fedfar.methods.arch, or use lora<r>-all")
            return [names[id(get_attr(b, path))] for b in blocks(model) for path in (layout.query, layout.value)]
        return [names[id(m)] for b in blocks(model) for m in b.modules() if isinstance(m, nn.Linear)]

    def attach(self, model: nn.Module, seed: int = 0) -> nn.Module:
        if lora_modules(model):
            return model
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.rank, lora_alpha=self.alpha or 2 * self.rank, lora_dropout=self.dropout,
                            target_modules=self.target_modules(model), bias="none")
        # A is drawn from the seed, B starts at zero: the attached model computes exactly what the pretrained did.
        # A forked generator keeps the caller's random stream (dropout, shuffling) as it would be without LoRA;
        # manual_seed reseeds every CUDA generator too, so those are forked as well.
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(seed)
            inject_adapter_in_model(config, model)
        self.trainable(model)
        return model

    def trainable(self, model: nn.Module) -> None:
        if not lora_modules(model):
            raise ValueError(f"{self.label}: the model has no adapters; attach them first (LoRA.attach)")
        prefix = model.base_model_prefix + "."
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name or not name.startswith(prefix))

    def prepare(self, model: nn.Module, learners: list[torch.Tensor] | None = None, seed: int = 0,
                preact_storage: str = "bfloat16") -> dict:
        self.attach(model, seed)
        self.trainable(model)
        return {}

    @torch.no_grad()
    def export(self, model: nn.Module) -> nn.Module:
        for name, module in lora_modules(model).items():
            module.merge(safe_merge=True)  # raises on a non-finite merged weight instead of saving it
            set_attr(model, name, module.get_base_layer())
        model.__dict__.pop("peft_config", None)
        return model
