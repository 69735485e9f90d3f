"""Fine-tuning methods, no Flower: one interface (`Method`: trainable / prepare / exchange_plan / merge), one room
per method, and the registry that reads method strings.

Adding a method: a module (or folder) with a `Method` subclass and one `REGISTRY` line below.
Method strings: <name>[<number>][-<suffix>], e.g. full, full-emb, bitfit, far10, far40-emb, random10-attn, lora8,
lora8-all.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

from .arch import ARCHITECTURES, Layout, blocks, layout_of
from .base import POLICIES, ExchangePlan, Method, Policy, PolicyMethod, apply_policy, get_policy, policy_name
from .bitfit import BitFit, apply_bitfit
from .far import FAR, PREACT_STORAGE, NodeSelection, RandomSelection
from .full import Full
from .lora import LoRA


def _no_number(name: str, number: str | None) -> None:
    if number is not None:
        raise ValueError(f"{name} takes no number: write {name}")


def _full(number: str | None, suffix: str | None) -> Method:
    _no_number("full", number)
    return Full(policy=policy_name(suffix or "paper"))


def _bitfit(number: str | None, suffix: str | None) -> Method:
    _no_number("bitfit", number)
    if suffix:
        raise ValueError("bitfit has its own freeze rule (biases and head train): drop the -emb/-attn suffix")
    return BitFit()


def _selection(cls: type[NodeSelection], number: str | None, suffix: str | None) -> Method:
    if number is None:
        raise ValueError(f"{cls.name} needs its retention in percent, e.g. {cls.name}10")
    return cls(retention=float(number) / 100.0, policy=policy_name(suffix or "paper"))


def _lora(number: str | None, suffix: str | None) -> Method:
    if number is None or not number.isdigit():
        raise ValueError(f"lora needs its rank as a whole number, e.g. lora8 or lora8-all; got {number!r}")
    return LoRA(rank=int(number), targets=suffix or "qv")


# method name -> builder from the string's number and suffix (called when a string is read, never at import: a
# builder built at import would hide its own bugs from the mutation tests, see docs/testing.md)
REGISTRY: dict[str, Callable[[str | None, str | None], Method]] = {
    "full": _full,
    "bitfit": _bitfit,
    "far": partial(_selection, FAR),
    "random": partial(_selection, RandomSelection),
    "lora": _lora,
}
METHOD_HELP = ("full[-emb|-attn], bitfit, far<retention %>[-emb|-attn], random<retention %>[-emb|-attn] or "
               "lora<rank>[-all], e.g. far10-emb or lora8")


def parse_method(text: str) -> Method:
    """'far10-emb' -> FAR(retention=0.1, policy='frozen-embeddings'); a ValueError naming the valid forms."""
    m = re.fullmatch(r"([a-z]+)(\d+(?:\.\d+)?)?(?:-([a-z-]+))?", str(text).strip().lower())
    if not m or m.group(1) not in REGISTRY:
        raise ValueError(f"cannot read method {text!r}: write {METHOD_HELP}")
    name, number, suffix = m.groups()
    if suffix == "paper":
        suffix = None
    try:
        return REGISTRY[name](number, suffix)
    except ValueError as err:
        raise ValueError(f"method {text!r}: {err} (method strings: {METHOD_HELP})") from None


__all__ = [
    "ARCHITECTURES", "Layout", "blocks", "layout_of", "POLICIES", "ExchangePlan", "Method", "Policy", "PolicyMethod",
    "apply_policy", "get_policy", "policy_name", "BitFit", "apply_bitfit", "FAR", "PREACT_STORAGE",
    "NodeSelection", "RandomSelection", "Full", "LoRA", "REGISTRY", "METHOD_HELP", "parse_method",
]
