"""The reconfigured FFN: a trainable learner branch beside a frozen branch, and the merge back.

    y = W2_l act(W1_l x + b1_l) + W2_f act(W1_f x + b1_f) + b2

PyTorch freezes whole tensors only, so the learner rows of W1 (columns of W2) become their own parameters:
slices of one storage per weight, learners first, so the forward and the input gradient still run as one
full-width matmul each. The frozen branch computes no weight gradient and keeps no optimizer state. Ordinary
autograd would still save its pre-activation (N x d_frozen floats, the largest tensor of the block) for the
activation's backward; a hand-written backward lets us keep that in bfloat16, or drop it and recompute it from
the input that the learner branch saves anyway. The forward is exact float32 whatever the storage choice: only the
input gradient through the frozen branch sees the narrower copy.

The dropout that follows the FFN in every BERT-like block is folded in as well, to keep its mask as one
byte per element (bool) where CPU dropout keeps a float32 mask, drawn by comparing uniforms (faster on CPU than
bernoulli_).
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


def _joined(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """`a` and `b` side by side along `dim`: a view when they sit that way in one storage (as SplitFFN lays them
    out), else a copy (after `.to()` or a deepcopy, which give every parameter its own storage)."""
    if a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.stride() == b.stride() \
            and b.storage_offset() == a.storage_offset() + a.shape[dim] * a.stride(dim):
        shape = list(a.shape)
        shape[dim] += b.shape[dim]
        joined = a.as_strided(shape, a.stride(), a.storage_offset())
        if joined.is_contiguous():
            return joined
    return torch.cat([a, b], dim)


class _SplitFFNFunction(torch.autograd.Function):
    """Forward and backward of the split FFN on 2-D (tokens x features) views.

    Learner rows of W1 (columns of W2) sit first, then the frozen ones, in one storage per weight, so the forward
    and the input gradient are each one full-width GEMM as in the stock FFN: separate learner and frozen GEMMs
    would pay for two narrow, less efficient calls. Only the learners' weight gradients use their slice.
    """

    @staticmethod
    def forward(ctx, x, w1l, b1l, w2l, w1f, b1f, w2f, b2, act, kind, storage, p):
        k = w1l.shape[0]
        w1, b1, w2 = _joined(w1l, w1f, 0), _joined(b1l, b1f, 0), _joined(w2l, w2f, 1)
        x2 = x.reshape(-1, x.shape[-1])
        h = torch.addmm(b1, x2, w1.t())
        y = torch.addmm(b2, act(h), w2.t())
        keep = None
        if p > 0:
            keep = torch.rand_like(y) >= p  # a bool mask: one byte per element, and faster than bernoulli_
            y.mul_(keep).mul_(1.0 / (1.0 - p))
        # Saved: the learner pre-activation (its activation is recomputed in backward: d_learner columns, cheap)
        # and the frozen one as `storage` says. float32 keeps `h` whole, which holds both.
        if storage == "float32":
            saved_h, saved_hf = h, None
        else:
            saved_h = h[:, :k].contiguous()
            saved_hf = h[:, k:].to(torch.bfloat16) if storage == "bfloat16" else None
        ctx.save_for_backward(x, saved_h, saved_hf, w1, b1, w2, keep)
        ctx.act, ctx.kind, ctx.p, ctx.k, ctx.storage = act, kind, p, k, storage
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, saved_h, saved_hf, w1, b1, w2, keep = ctx.saved_tensors
        act, kind, k = ctx.act, ctx.kind, ctx.k
        x2 = x.reshape(-1, x.shape[-1])
        g2 = gy.reshape(-1, gy.shape[-1])
        if keep is not None:
            g2 = g2.mul(keep).mul_(1.0 / (1.0 - ctx.p))
        hl = saved_h[:, :k]

        grads = [None] * 12
        need = ctx.needs_input_grad
        if need[3]:
            grads[3] = g2.t() @ act(hl)
        if need[7]:
            grads[7] = g2.sum(0)
        if need[0]:  # the input gradient flows through every node: one full-width GEMM each way
            if ctx.storage == "float32":
                pre = saved_h
            else:
                pre = torch.empty(g2.shape[0], w1.shape[0], dtype=g2.dtype, device=g2.device)
                pre[:, :k] = hl
                pre[:, k:] = saved_hf if saved_hf is not None else torch.addmm(b1[k:], x2, w1[k:].t())
            gh = _act_backward(kind, act, g2 @ w2, pre)
            ghl = gh[:, :k]
            grads[0] = (gh @ w1).reshape(x.shape)
        else:  # nothing below needs a gradient (e.g. the first block under frozen embeddings): learners only
            ghl = _act_backward(kind, act, g2 @ w2[:, :k], hl)
        if need[1]:
            grads[1] = ghl.t() @ x2
        if need[2]:
            grads[2] = ghl.sum(0)
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

        # Index buffers live with the weights (a model reconfigured on a GPU mid-training, fedfar.devices.gpu).
        self.register_buffer("learner_index", learners.to(w1.device))
        self.register_buffer("frozen_index", frozen.to(w1.device))
        # One storage per weight, learner nodes first: the branches are slices of it (see _SplitFFNFunction).
        k, order = len(learners), torch.cat([learners, frozen]).to(w1.device)
        w1s, b1s, w2s = w1[order].contiguous(), b1[order].contiguous(), w2[:, order].contiguous()
        self.w1_learner = nn.Parameter(w1s[:k])
        self.b1_learner = nn.Parameter(b1s[:k], requires_grad=fc1.bias is not None)  # no bias: zeros that stay
        self.w2_learner = nn.Parameter(w2s[:, :k])
        self.w1_frozen = nn.Parameter(w1s[k:], requires_grad=False)
        self.b1_frozen = nn.Parameter(b1s[k:], requires_grad=False)
        self.w2_frozen = nn.Parameter(w2s[:, k:], requires_grad=False)
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
