"""What a training step costs in FLOPs, counted from the real work: the simulated clock's compute time is the FLOPs
of the local steps over the device's FLOP/s (fedfar.devices.clock), and `fedfar bench` reports them per method."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    (m, k), (_, n) = a_shape, b_shape
    return 2 * m * k * n


def _baddbmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    (b, m, k), (_, _, n) = a_shape, b_shape
    return 2 * b * m * k * n


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _sdpa_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


_aten = torch.ops.aten
# Ops torch's FlopCounterMode (2.13) does not count although they are matmuls: the in-place addmm_ that SplitFFN
# uses to add the frozen branch (forward) and its input gradient (backward), and the CPU flash attention that
# transformers' "sdpa" attention dispatches to on CPU. Without these, FAR steps and all attention are undercounted.
_EXTRA_FLOP_FORMULAS = {
    _aten.addmm_: _addmm_flops,
    _aten.baddbmm_: _baddbmm_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


@contextmanager
def count_flops() -> Iterator[FlopCounterMode]:
    """Count the FLOPs of the real work done inside: matmul-like ops as torch's FlopCounterMode counts them, plus
    the ones it misses (_EXTRA_FLOP_FORMULAS). Read `.get_total_flops()` afterwards."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        yield counter


def train_step_flops(model: nn.Module, batch: Mapping[str, Tensor]) -> int:
    """FLOPs of one training forward + backward of `batch` on `model` as configured (its requires_grad flags,
    SplitFFN branches), counted by torch's FlopCounterMode: matmul-like ops only (elementwise ops and the optimizer
    step are not counted; they are a small share of a transformer step).

    FlopCounterMode is a dispatch mode, so it sees the aten ops inside SplitFFN's hand-written backward like any
    other: FAR's skipped weight gradients show as fewer FLOPs. Gradients go through torch.autograd.grad, so no
    .grad is left on the model.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.train()
    try:
        with count_flops() as counter:
            out = model(**batch)
            if getattr(out, "loss", None) is None:
                raise ValueError("the batch has no labels: a training step needs a loss")
            if trainable:
                torch.autograd.grad(out.loss, trainable, allow_unused=True)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def step_flops(model: nn.Module, batch: Mapping[str, Tensor]) -> int:
    """FLOPs of one training forward + backward through `.backward()` (what a real step does; gradients are
    zeroed afterwards). The optimizer's elementwise work is not counted."""
    with count_flops() as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())
