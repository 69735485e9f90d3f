"""Where each BERT-like family keeps its feed-forward (FFN) blocks, embeddings and attention.

FAR only needs to find, for every transformer block, the FFN's first linear (rows = nodes), its activation
and its second linear (columns = nodes); LoRA, the attention's query and value projections. Families differ only
in attribute names, so one table covers them.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Layout:
    """Dotted attribute paths, relative to `model.base_model` (layers, embeddings) or to one block (the rest)."""

    layers: str
    fc1: str
    act: str
    fc2: str
    dropout: str  # the dropout on the FFN output, folded into the split FFN (see layer.py)
    attention: str
    embeddings: str = "embeddings"
    # the attention's query and value projections (LoRA's default targets); None where a family has no such pair
    query: str | None = None
    value: str | None = None


_BERT_LIKE = Layout(
    layers="encoder.layer",
    fc1="intermediate.dense",
    act="intermediate.intermediate_act_fn",
    fc2="output.dense",
    dropout="output.dropout",
    attention="attention",
    query="attention.self.query",
    value="attention.self.value",
)

# model_type (as in config.json) -> layout. MiniLM checkpoints (e.g. all-MiniLM-L6-v2) are model_type "bert".
ARCHITECTURES: dict[str, Layout] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": Layout(
        layers="transformer.layer", fc1="ffn.lin1", act="ffn.activation", fc2="ffn.lin2", dropout="ffn.dropout",
        attention="attention", query="attention.q_lin", value="attention.v_lin",
    ),
}


def get_attr(root: nn.Module, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def set_attr(root: nn.Module, path: str, value) -> None:
    *parents, last = path.split(".")
    for name in parents:
        root = getattr(root, name)
    setattr(root, last, value)


def layout_of(model: nn.Module) -> Layout:
    """The layout for `model`'s family, or a ValueError naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"FAR does not know where model type {model_type!r} keeps its FFN blocks. "
            f"Supported families: {', '.join(sorted(ARCHITECTURES))}. "
            "Add a Layout for it to fedfar.methods.arch.ARCHITECTURES."
        )
    return ARCHITECTURES[model_type]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `model`, in order."""
    return list(get_attr(model.base_model, layout_of(model).layers))
