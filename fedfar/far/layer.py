"""The reconfigured FFN: a trainable learner branch beside a frozen branch, and the merge back.

    y = W2_l act(W1_l x + b1_l) + W2_f act(W1_f x + b1_f) + b2

PyTorch freezes whole tensors only, so the learner rows of W1 (columns of W2) become their own contiguous
tensors. The frozen branch computes no weight gradient and keeps no optimizer state. Ordinary autograd would
still save its pre-activation (N x d_frozen floats, the largest tensor of the block) for the activation's
backward; a hand-written backward lets us keep that in bfloat16, or drop it and recompute it from the input
that the learner branch saves anyway. The forward is exact float32 whatever the storage choice: only the
input gradient through the frozen branch sees the narrower copy.

The dropout that follows the FFN in every BERT-like block is folded in as well, to keep its mask as one
byte per element (bool) where CPU dropout keeps a float32 mask.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

PREACT_STORAGE = ("float32", "bfloat16", "recompute")

_PROBE = torch.linspace(-6, 6, 97)


def activation_kind(act: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """'gelu', 'gelu_tanh', 'relu' when `act` is numerically one of them (fused backward), else 'generic'.

    Probing the values instead of matching classes survives the renames of transformers' activation classes.
    """
    with torch.no_grad():
        out = act(_PROBE)
        for kind, ref in (
            ("gelu", F.gelu(_PROBE)),
            ("gelu_tanh", F.gelu(_PROBE, approximate="tanh")),
            ("relu", F.relu(_PROBE)),
        ):
            if torch.equal(out, ref):
                return kind
    return "generic"


def _act_backward(kind: str, act: Callable, grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre, approximate="none")
    if kind == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
    if kind == "relu":
        return grad * (pre > 0)
    with torch.enable_grad():
        pre = pre.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(act(pre), pre, grad)
    return g


class _SplitFFNFunction(torch.autograd.Function):
    """Forward and backward of the split FFN on 2-D (tokens x features) views, with fused addmm calls."""

    @staticmethod
    def forward(ctx, x, w1l, b1l, w2l, w1f, b1f, w2f, b2, act, kind, storage, p):
        x2 = x.reshape(-1, x.shape[-1])
        hl = torch.addmm(b1l, x2, w1l.t())
        hf = torch.addmm(b1f, x2, w1f.t())
        y = torch.addmm(b2, act(hl), w2l.t()).addmm_(act(hf), w2f.t())
        keep = None
        if p > 0:
            keep = torch.empty_like(y, dtype=torch.bool).bernoulli_(1.0 - p)
            y.mul_(keep).mul_(1.0 / (1.0 - p))
        # The learner activation is recomputed in backward (elementwise on d_learner columns: cheap).
        saved_hf = {"recompute": None, "bfloat16": hf.to(torch.bfloat16) if storage == "bfloat16" else None,
                    "float32": hf}[storage]
        ctx.save_for_backward(x, hl, saved_hf, w1l, w2l, w1f, b1f, w2f, keep)
        ctx.act, ctx.kind, ctx.p = act, kind, p
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, hl, saved_hf, w1l, w2l, w1f, b1f, w2f, keep = ctx.saved_tensors
        act, kind = ctx.act, ctx.kind
        x2 = x.reshape(-1, x.shape[-1])
        g2 = gy.reshape(-1, gy.shape[-1])
        if keep is not None:
            g2 = g2.mul(keep).mul_(1.0 / (1.0 - ctx.p))

        grads = [None] * 12
        need = ctx.needs_input_grad
        if need[3]:
            grads[3] = g2.t() @ act(hl)
        if need[7]:
            grads[7] = g2.sum(0)
        ghl = _act_backward(kind, act, g2 @ w2l, hl)
        if need[1]:
            grads[1] = ghl.t() @ x2
        if need[2]:
            grads[2] = ghl.sum(0)
        if need[0]:
            hf = torch.addmm(b1f, x2, w1f.t()) if saved_hf is None else saved_hf.float()
            ghf = _act_backward(kind, act, g2 @ w2f, hf)
            grads[0] = (ghl @ w1l).addmm_(ghf, w1f).reshape(x.shape)
        return tuple(grads)


class SplitFFN(nn.Module):
    """An FFN block split into learner and frozen branches; it takes the place of the block's first linear.

    The block's activation, second linear and output dropout become identities, so the surrounding module code
    (residual, LayerNorm) runs unchanged. `merge()` rebuilds the stock Linear layers.
    """

    def __init__(
        self,
        fc1: nn.Linear,
        fc2: nn.Linear,
        act: Callable[[torch.Tensor], torch.Tensor],
        learners: torch.Tensor,
        preact_storage: str = "bfloat16",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if preact_storage not in PREACT_STORAGE:
            raise ValueError(f"preact_storage {preact_storage!r}: choose one of {PREACT_STORAGE}")
        d_ff = fc1.out_features
        learners = torch.as_tensor(learners, dtype=torch.long).unique(sorted=True)
        if learners.numel() and (learners.min() < 0 or learners.max() >= d_ff):
            raise ValueError(f"learner indices must lie in [0, {d_ff}), got {learners.min()}..{learners.max()}")
        is_learner = torch.zeros(d_ff, dtype=torch.bool)
        is_learner[learners] = True
        frozen = (~is_learner).nonzero().flatten()
        w1, w2 = fc1.weight.detach(), fc2.weight.detach()
        b1 = fc1.bias.detach() if fc1.bias is not None else w1.new_zeros(d_ff)

        # Index buffers live with the weights (a model reconfigured on a GPU mid-training, fedfar.gpu).
        self.register_buffer("learner_index", learners.to(w1.device))
        self.register_buffer("frozen_index", frozen.to(w1.device))
        self.w1_learner = nn.Parameter(w1[learners].clone())
        self.b1_learner = nn.Parameter(b1[learners].clone())
        self.w2_learner = nn.Parameter(w2[:, learners].contiguous())
        self.w1_frozen = nn.Parameter(w1[frozen].clone(), requires_grad=False)
        self.b1_frozen = nn.Parameter(b1[frozen].clone(), requires_grad=False)
        self.w2_frozen = nn.Parameter(w2[:, frozen].contiguous(), requires_grad=False)
        # Keep the very Parameter object: optimizer state and requires_grad carry over untouched.
        self.b2 = fc2.bias if fc2.bias is not None else nn.Parameter(w2.new_zeros(fc2.out_features), False)
        self.act = act
        self.kind = activation_kind(act)
        self.preact_storage = preact_storage
        self.dropout = dropout
        self.has_fc1_bias = fc1.bias is not None
        self.has_fc2_bias = fc2.bias is not None

    @property
    def d_ff(self) -> int:
        return self.learner_index.numel() + self.frozen_index.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SplitFFNFunction.apply(
            x, self.w1_learner, self.b1_learner, self.w2_learner,
            self.w1_frozen, self.b1_frozen, self.w2_frozen, self.b2,
            self.act, self.kind, self.preact_storage, self.dropout if self.training else 0.0,
        )

    @torch.no_grad()
    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W1, b1, W2, b2) in the original node order."""
        d_in, d_out = self.w1_learner.shape[1], self.w2_learner.shape[0]
        w1 = self.w1_learner.new_empty(self.d_ff, d_in)
        b1 = self.b1_learner.new_empty(self.d_ff)
        w2 = self.w2_learner.new_empty(d_out, self.d_ff)
        w1[self.learner_index], w1[self.frozen_index] = self.w1_learner, self.w1_frozen
        b1[self.learner_index], b1[self.frozen_index] = self.b1_learner, self.b1_frozen
        w2[:, self.learner_index], w2[:, self.frozen_index] = self.w2_learner, self.w2_frozen
        return w1, b1, w2, self.b2.detach().clone()

    def merge(self) -> tuple[nn.Linear, nn.Linear]:
        """Stock (fc1, fc2) Linear layers holding the current weights."""
        w1, b1, w2, b2 = self.merged_weights()
        fc1 = nn.Linear(w1.shape[1], w1.shape[0], bias=self.has_fc1_bias, dtype=w1.dtype, device=w1.device)
        fc2 = nn.Linear(w2.shape[1], w2.shape[0], bias=self.has_fc2_bias, dtype=w2.dtype, device=w2.device)
        with torch.no_grad():
            fc1.weight.copy_(w1)
            fc2.weight.copy_(w2)
            if self.has_fc1_bias:
                fc1.bias.copy_(b1)
            if self.has_fc2_bias:
                fc2.bias.copy_(b2)
        return fc1, fc2

    def extra_repr(self) -> str:
        return (f"d_ff={self.d_ff}, learners={self.learner_index.numel()}, act={self.kind}, "
                f"preact_storage={self.preact_storage}, dropout={self.dropout}")
