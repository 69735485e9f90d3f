"""FAR on a whole model: node scores after priming, learner selection, reconfigure and merge.

Node i of an FFN block is row i of its first linear (with bias b1[i]) and column i of its second linear.
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch import blocks, get_attr, layout_of, set_attr
from .layer import SplitFFN
from ..base import Policy, apply_policy


def _ffn(block: nn.Module, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    layout = layout_of(model)
    return get_attr(block, layout.fc1), get_attr(block, layout.fc2)


def is_reconfigured(model: nn.Module) -> bool:
    return any(isinstance(m, SplitFFN) for m in model.modules())


def ffn_sizes(model: nn.Module) -> list[int]:
    """Nodes per FFN block."""
    sizes = []
    for block in blocks(model):
        fc1, _ = _ffn(block, model)
        sizes.append(fc1.d_ff if isinstance(fc1, SplitFFN) else fc1.out_features)
    return sizes


@torch.no_grad()
def ffn_weights(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(W1, b1, W2) of every FFN block in original node order: a snapshot to score priming against."""
    out = []
    for block in blocks(model):
        fc1, fc2 = _ffn(block, model)
        if isinstance(fc1, SplitFFN):
            w1, b1, w2, _ = fc1.merged_weights()
        else:
            w1 = fc1.weight.detach().clone()
            b1 = fc1.bias.detach().clone() if fc1.bias is not None else w1.new_zeros(w1.shape[0])
            w2 = fc2.weight.detach().clone()
        out.append((w1, b1, w2))
    return out


def node_scores(before: list[tuple[torch.Tensor, ...]], after: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """The learning metric: L1 norm of each node's weight change, |dW1[i,:]| + |db1[i]| + |dW2[:,i]|."""
    scores = []
    for (w1a, b1a, w2a), (w1b, b1b, w2b) in zip(before, after):
        scores.append((w1b - w1a).abs().sum(1) + (b1b - b1a).abs() + (w2b - w2a).abs().sum(0))
    return scores


def num_learners(d_ff: int, retention: float) -> int:
    """Learners kept in a block of d_ff nodes: round(retention * d_ff), at least one."""
    return max(1, min(d_ff, round(retention * d_ff)))


def select_learners(scores: list[torch.Tensor], retention: float) -> list[torch.Tensor]:
    """Per block, the indices (ascending) of the nodes with the largest scores. Ties go to the lower index."""
    out = []
    for s in scores:
        k = num_learners(s.numel(), retention)
        # A stable descending sort makes ties deterministic across machines (topk's order is not specified).
        order = torch.sort(s.float(), descending=True, stable=True).indices
        out.append(order[:k].sort().values)
    return out


def random_learners(sizes: list[int], retention: float, seed: int) -> list[torch.Tensor]:
    """The random-selection baseline: the same number of learners per block, drawn uniformly."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(d, generator=gen)[: num_learners(d, retention)].sort().values for d in sizes]


def reconfigure(
    model: nn.Module,
    learners: list[torch.Tensor],
    policy: Policy,
    preact_storage: str = "bfloat16",
) -> dict[nn.Parameter, tuple[nn.Parameter, tuple]]:
    """Split every FFN block in place around the given learner nodes and apply the freeze policy.

    Returns, for each new learner tensor, (the tensor it was cut from, the index that cuts it), so a caller can
    carry optimizer state across (see `fedfar.train.carry_optimizer_state`).
    """
    if is_reconfigured(model):
        merge(model)
    layout = layout_of(model)
    bs = blocks(model)
    if len(learners) != len(bs):
        raise ValueError(f"got learner lists for {len(learners)} FFN blocks, the model has {len(bs)}")
    origin: dict[nn.Parameter, tuple[nn.Parameter, tuple]] = {}
    for block, idx in zip(bs, learners):
        fc1, fc2, act = get_attr(block, layout.fc1), get_attr(block, layout.fc2), get_attr(block, layout.act)
        split = SplitFFN(fc1, fc2, act, idx, preact_storage, dropout=get_attr(block, layout.dropout).p)
        set_attr(block, layout.fc1, split)
        for path in (layout.act, layout.fc2, layout.dropout):
            set_attr(block, path, nn.Identity())
        li = split.learner_index
        origin[split.w1_learner] = (fc1.weight, (li,))
        origin[split.w2_learner] = (fc2.weight, (slice(None), li))
        if fc1.bias is not None:
            origin[split.b1_learner] = (fc1.bias, (li,))
    apply_policy(model, policy)
    return origin


def merge(model: nn.Module) -> nn.Module:
    """Undo `reconfigure` in place: stock Linear layers and activations, current weights, nothing frozen."""
    layout = layout_of(model)
    for block in blocks(model):
        split = get_attr(block, layout.fc1)
        if not isinstance(split, SplitFFN):
            continue
        fc1, fc2 = split.merge()
        set_attr(block, layout.fc1, fc1)
        set_attr(block, layout.act, split.act)
        set_attr(block, layout.fc2, fc2)
        set_attr(block, layout.dropout, nn.Dropout(split.dropout))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def learner_indices(model: nn.Module) -> list[torch.Tensor]:
    """The current learner indices of a reconfigured model, per block."""
    layout = layout_of(model)
    out = []
    for block in blocks(model):
        split = get_attr(block, layout.fc1)
        if not isinstance(split, SplitFFN):
            raise ValueError("model is not reconfigured: call fedfar.methods.far.reconfigure first")
        out.append(split.learner_index.clone())
    return out
