"""What trains outside the FFN learner branches: named freeze policies and the fine-tuning methods.

A policy says, for each part of the model that FAR does not reconfigure, whether it trains. The FFN's
second-layer bias b2 always trains with the learners (it is shared by all nodes of the block).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .arch import blocks, get_attr, layout_of


@dataclass(frozen=True)
class Policy:
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

METHODS = ("full", "far", "random", "bitfit")


def get_policy(name: str) -> Policy:
    name = POLICY_ALIASES.get(name, name)
    if name not in POLICIES:
        raise ValueError(f"unknown freeze policy {name!r}: choose one of {', '.join(POLICIES)} "
                         f"(short forms: {', '.join(POLICY_ALIASES)})")
    return POLICIES[name]


@dataclass(frozen=True)
class MethodSpec:
    """A fine-tuning method: 'full', 'bitfit', or FAR / random selection at a retention under a policy."""

    method: str
    retention: float = 1.0
    policy: str = "paper"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method in ("far", "random") and not 0.0 < self.retention <= 1.0:
            raise ValueError(f"retention must be in (0, 1], got {self.retention}")
        object.__setattr__(self, "policy", POLICY_ALIASES.get(self.policy, self.policy))
        get_policy(self.policy)

    @property
    def reconfigures(self) -> bool:
        return self.method in ("far", "random")

    @property
    def label(self) -> str:
        suffix = {"paper": "", "frozen-embeddings": "-emb", "frozen-attention": "-attn"}[self.policy]
        if self.method == "bitfit":
            return "bitfit"
        if self.method == "full":
            return f"full{suffix}"
        return f"{self.method}{round(self.retention * 100):d}{suffix}"

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        """'full', 'full-emb', 'bitfit', 'far10', 'far40-emb', 'random10-attn' -> MethodSpec.

        'full-emb' / 'full-attn' are ordinary fine-tuning (no FFN split) under a freeze policy.
        """
        m = re.fullmatch(r"(bitfit)|(full)|(far|random)(\d+(?:\.\d+)?)", text.strip().lower().removesuffix("-emb")
                         .removesuffix("-attn").removesuffix("-paper"))
        if not m:
            raise ValueError(f"cannot read method {text!r}: write full[-emb|-attn], bitfit, "
                             "far<retention %>[-emb|-attn] or random<retention %>[-emb|-attn], e.g. far10-emb")
        policy = next((p for p in ("emb", "attn") if text.strip().lower().endswith("-" + p)), "paper")
        if m.group(1):
            if policy != "paper":
                raise ValueError("bitfit has its own freeze rule (biases and head train): drop the -emb/-attn suffix")
            return cls("bitfit")
        if m.group(2):
            return cls("full", policy=policy)
        return cls(m.group(3), float(m.group(4)) / 100.0, policy)


def _is_layernorm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "layernorm" in type(module).__name__.lower()


def apply_policy(model: nn.Module, policy: Policy) -> None:
    """Set requires_grad on every tensor outside the FFN blocks. FFN tensors are left as they are."""
    layout = layout_of(model)
    base = model.base_model
    ffn_params: set[int] = set()
    for block in blocks(model):
        for path in (layout.fc1, layout.fc2):
            ffn_params.update(id(p) for p in get_attr(block, path).parameters())
    groups: list[tuple[bool, list[nn.Parameter]]] = [
        (policy.head, [p for n, p in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")]),
        (policy.embeddings, list(get_attr(base, layout.embeddings).parameters())),
        (policy.attention, [p for b in blocks(model) for p in get_attr(b, layout.attention).parameters()]),
    ]
    pooler = getattr(base, "pooler", None)
    if pooler is not None:
        groups.append((policy.head, list(pooler.parameters())))
    # Block LayerNorms last: they override the group they sit in (BERT's attention owns one).
    embedding_params = {id(p) for p in get_attr(base, layout.embeddings).parameters()}
    groups.append((policy.layernorm, [p for m in model.modules() if _is_layernorm(m) for p in m.parameters(False)
                                      if id(p) not in embedding_params]))
    for trains, params in groups:
        for p in params:
            if id(p) not in ffn_params:
                p.requires_grad_(trains)


def apply_bitfit(model: nn.Module) -> None:
    """BitFit (Ben Zaken et al., 2022): only bias terms train, plus the task head."""
    prefix = model.base_model_prefix + "."
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias") or not name.startswith(prefix))
