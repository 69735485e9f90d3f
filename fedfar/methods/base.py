"""The one interface every fine-tuning method answers, and the freeze policies the methods share.

A method, like a PEFT tuner, says in one place:
  - `attach(model, seed)` what it adds to the pretrained model for good (LoRA's adapters; nothing for the others):
                         the pretrained model with its additions is the *stock layout* both sides of a federation keep;
  - `trainable(model)`   what trains, on the stock layout (requires_grad flags);
  - `prepare(model, ...)` how to put a model in its training configuration (FAR splits its FFN blocks here);
  - `exchange_plan(model)` what travels between a device and the server (dense tensors, FFN rows);
  - `merge(model)`       how to go back from the training configuration to the stock layout;
  - `export(model)`      how to fold everything into the plain transformers model, so `save_pretrained` writes an
                         ordinary checkpoint (LoRA merges its adapters into the base weights here).
Methods are small frozen dataclasses, parsed from strings such as "far10-emb" (`fedfar.methods.parse_method`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .arch import blocks, get_attr, layout_of


# ------------------------------------------------------------------------------------------ freeze policies
@dataclass(frozen=True)
class Policy:
    """For each part of the model that FAR does not reconfigure, whether it trains. The FFN's second-layer bias
    b2 always trains with the learners (it is shared by all nodes of the block)."""

    embeddings: bool = True  # the embeddings module: word/position/token-type tables and their LayerNorm
    attention: bool = True   # Q, K, V and output projections
    layernorm: bool = True   # every LayerNorm of the transformer blocks
    head: bool = True        # everything outside the base model (classifier, pre-classifier) + the pooler


POLICIES: dict[str, Policy] = {
    # The paper: only the non-learner FFN nodes are frozen.
    "paper": Policy(),
    # The embeddings module frozen too: its gradient (vocab x hidden) and Adam state are the largest single
    # cost, and with nothing below the first block training, no gradient flows into the embeddings at all.
    "frozen-embeddings": Policy(embeddings=False),
    # Attention frozen as well: FFN learners, LayerNorm and the head train.
    "frozen-attention": Policy(embeddings=False, attention=False),
}
POLICY_ALIASES = {"emb": "frozen-embeddings", "attn": "frozen-attention"}
POLICY_SUFFIX = {"paper": "", "frozen-embeddings": "-emb", "frozen-attention": "-attn"}


def get_policy(name: str) -> Policy:
    name = POLICY_ALIASES.get(name, name)
    if name not in POLICIES:
        raise ValueError(f"unknown freeze policy {name!r}: choose one of {', '.join(POLICIES)} "
                         f"(short forms: {', '.join(POLICY_ALIASES)})")
    return POLICIES[name]


def policy_name(name: str) -> str:
    """The full name of a policy written in either form ('emb' -> 'frozen-embeddings'), checked."""
    name = POLICY_ALIASES.get(name, name)
    get_policy(name)
    return name


def _is_layernorm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "layernorm" in type(module).__name__.lower()


def apply_policy(model: nn.Module, policy: Policy) -> None:
    """Set requires_grad on every tensor outside the FFN blocks. FFN tensors are left as they are: no group below
    holds them."""
    layout = layout_of(model)
    base = model.base_model
    in_base = {id(p) for p in base.parameters()}
    in_blocks = {id(p) for b in blocks(model) for p in b.parameters()}
    embedding_params = {id(p) for p in get_attr(base, layout.embeddings).parameters()}
    # Later groups override earlier ones.
    groups: list[tuple[bool, list[nn.Parameter]]] = [
        # Everything the base model holds below the first block: the embeddings and what sits between them and
        # block 1 (ELECTRA's embeddings_project), so frozen embeddings freeze all of it (the pooler: see below).
        (policy.embeddings, [p for p in base.parameters() if id(p) not in in_blocks]),
        (policy.head, [p for p in model.parameters() if id(p) not in in_base]),  # the head, outside the base
        (policy.attention, [p for b in blocks(model) for p in get_attr(b, layout.attention).parameters()]),
    ]
    pooler = getattr(base, "pooler", None)
    if pooler is not None:
        groups.append((policy.head, list(pooler.parameters())))
    # Block LayerNorms last: they override the group they sit in (BERT's attention owns one).
    groups.append((policy.layernorm, [p for m in model.modules() if _is_layernorm(m) for p in m.parameters(False)
                                      if id(p) not in embedding_params]))
    for trains, params in groups:
        for p in params:
            p.requires_grad_(trains)


# ------------------------------------------------------------------------------------------ what travels
@dataclass(frozen=True)
class ExchangePlan:
    """The tensors a method trains, by stock name: `dense` travel whole, `ffn` blocks by rows (fedfar.federation
    .exchange does the arithmetic)."""

    dense: tuple[str, ...]
    ffn: tuple[tuple[str, str | None, str], ...]  # per block: (fc1.weight, fc1.bias or None, fc2.weight)

    @property
    def sliced(self) -> bool:
        return bool(self.ffn)


def ffn_names(model: nn.Module) -> tuple[tuple[str, str | None, str], ...]:
    """Per FFN block, the stock names of (fc1.weight, fc1.bias or None, fc2.weight)."""
    names = {id(p): n for n, p in model.named_parameters()}
    layout = layout_of(model)
    out = []
    for block in blocks(model):
        fc1, fc2 = get_attr(block, layout.fc1), get_attr(block, layout.fc2)
        out.append((names[id(fc1.weight)], names[id(fc1.bias)] if fc1.bias is not None else None,
                    names[id(fc2.weight)]))
    return tuple(out)


# ------------------------------------------------------------------------------------------ the interface
@dataclass(frozen=True)
class Method:
    """A fine-tuning method. Subclasses set `name` and override what differs; the defaults describe a method that
    trains whole tensors of the stock model (full fine-tuning under a policy, BitFit)."""

    name: ClassVar[str]
    selects_rows: ClassVar[bool] = False  # trains a subset of FFN nodes: rows travel, the FFN is split to train
    primes: ClassVar[bool] = False        # chooses those nodes by priming (FAR)

    @property
    def label(self) -> str:
        """The method as written in configs and result names, e.g. 'far10-emb' (parse_method reads it back)."""
        return self.name

    @property
    def retention(self) -> float | None:
        """Share of FFN nodes that learn (None: the method does not select nodes)."""
        return None

    def attach(self, model: nn.Module, seed: int = 0) -> nn.Module:
        """Add what this method keeps beside the pretrained weights, in place (idempotent); returns `model`."""
        return model

    def trainable(self, model: nn.Module) -> None:
        """Set the requires_grad flags of the stock-layout `model` to what this method trains."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, learners: list[torch.Tensor] | None = None, seed: int = 0,
                preact_storage: str = "bfloat16") -> dict:
        """Put `model` in this method's training configuration, in place. Returns, for methods that replace
        parameter tensors, {new tensor: (tensor it was cut from, index)} so optimizer state can be carried over."""
        self.trainable(model)
        return {}

    def exchange_plan(self, model: nn.Module) -> ExchangePlan:
        """What travels for `model` (stock layout) under this method; its requires_grad flags are restored."""
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            self.trainable(model)
            ffn = ffn_names(model) if self.selects_rows else ()
            sliced = {n for entry in ffn for n in entry if n}
            dense = tuple(n for n, p in model.named_parameters() if p.requires_grad and n not in sliced)
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
        return ExchangePlan(dense, ffn)

    def merge(self, model: nn.Module) -> nn.Module:
        """Back to the stock layout (a no-op for methods that never leave it)."""
        return model

    def export(self, model: nn.Module) -> nn.Module:
        """The plain transformers model, in place, ready for `save_pretrained` and for loading without fedfar."""
        return self.merge(model)


@dataclass(frozen=True)
class PolicyMethod(Method):
    """A method whose parts outside the FFN train or freeze by a freeze policy: full fine-tuning, FAR, random
    selection. On the stock layout every FFN node could learn (which ones, per round, is FAR's business)."""

    policy: str = "paper"

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", policy_name(self.policy))

    def trainable(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        apply_policy(model, get_policy(self.policy))
