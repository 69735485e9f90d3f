"""fedfar.devices.memory.profiled_peak_bytes, the allocator-level check of the accounting, counted by hand.

On a model of one trainable float32 tensor of n elements (plus a frozen parameter and a buffer that only sit in
memory) every byte of a training step is known: what is resident (weights, buffers, AdamW's two moments and step
counter), and what the step adds at its widest moment inside AdamW's single-tensor CPU update, when the gradient,
sqrt(exp_avg_sq) and the denominator being made are live at once. This proves that the profiler's allocation
events are read, summed in time order from zero and added to the resident bytes, and that the measured step
starts with no gradient held (zero_grad(set_to_none=True) freed it). Fast: a few milliseconds of compute.
"""
from types import SimpleNamespace

import torch
from torch import nn

from fedfar.devices.memory import profiled_peak_bytes


class OneTensor(nn.Module):
    """loss = sum(w * x): autograd saves w (a parameter) and x (an input), so the backward allocates only w's
    gradient."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))
        self.frozen = nn.Parameter(torch.ones(5), requires_grad=False)     # 20 bytes, no optimizer state
        self.register_buffer("table", torch.zeros(3, dtype=torch.float64))  # 24 bytes

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=(self.w * x).sum())


def _profile(n: int) -> dict[str, int]:
    return profiled_peak_bytes(OneTensor(n), {"x": torch.randn(n, generator=torch.Generator().manual_seed(0))})


def test_resident_bytes_are_weights_buffers_and_adamw_state_by_hand():
    n = 1000
    out = _profile(n)
    # w and the frozen parameter, the float64 buffer, then exp_avg and exp_avg_sq like w and a float32 step.
    assert out["resident_bytes"] == 4 * n + 4 * 5 + 8 * 3 + 2 * 4 * n + 4
    assert out["measured_peak_bytes"] == out["resident_bytes"] + out["step_peak_bytes"]


def test_the_step_peak_is_the_gradient_and_adamws_two_temporaries_by_hand():
    """At `denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)` (torch 2.13, the pinned version) a step
    holds w's gradient, sqrt(exp_avg_sq) and the quotient (3 x 4n bytes) and, for the division, the Python float
    wrapped as a float64 scalar and its float32 copy (8 + 4 bytes). Nothing from the previous step is held: a
    gradient left allocated by zero_grad would be reused in place and the peak would lack one 4n."""
    for n in (1000, 4096):
        out = _profile(n)
        assert out["step_peak_bytes"] == 3 * 4 * n + 8 + 4, n
        assert out["measured_peak_bytes"] == (4 * n + 4 * 5 + 8 * 3 + 2 * 4 * n + 4) + 3 * 4 * n + 12, n
