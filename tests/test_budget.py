"""Memory budgets and FLOP counts on tiny random models: exact figures, no timings."""
import re
from dataclasses import replace

import pytest
import torch
from conftest import tiny_batch, tiny_model
from torch import nn

from fedfar.devices.budget import prepare_for_accounting
from fedfar.devices.budget import (
    ADAPT_ORDER,
    TrainingShape,
    check_floor,
    inference_floor,
    inference_floor_bytes,
    no_grad_activation_peak,
    peak_bytes,
    plan,
)
from fedfar.devices.flops import train_step_flops
from fedfar.methods import parse_method
from fedfar.methods.far import num_learners

SHAPE = TrainingShape.for_method("far10", batch_size=8, seq_len=16)  # micro_batch 8, retention 0.1
FULL = TrainingShape.for_method("full", batch_size=8, seq_len=16)


def _peaks(method, shape, micro_batches):
    return {m: peak_bytes(tiny_model, method, replace(shape, micro_batch=m)) for m in micro_batches}


def test_micro_batching_lowers_only_saved_tensors():
    r = _peaks("far10", SHAPE, (8, 2))
    for field in ("weights_bytes", "gradient_bytes", "optimizer_bytes", "trainable_params"):
        assert getattr(r[8], field) == getattr(r[2], field)
    assert r[2].saved_tensor_bytes < r[8].saved_tensor_bytes
    assert r[2].peak_training_bytes < r[8].peak_training_bytes


def test_shape_retention_overrides_the_method_and_non_far_methods_reject_one():
    low = peak_bytes(tiny_model, "far10", replace(SHAPE, retention=0.05))
    high = peak_bytes(tiny_model, "far10", SHAPE)
    assert low.trainable_params < high.trainable_params
    with pytest.raises(ValueError, match="no retention"):
        peak_bytes(tiny_model, "full", replace(FULL, retention=0.1))


def test_plan_adapts_the_micro_batch_until_it_fits():
    r = _peaks("far10", SHAPE, (8, 4, 2))
    budget = (r[2].peak_training_bytes + r[4].peak_training_bytes) // 2
    p = plan(tiny_model, "far10", SHAPE, budget)
    assert p.fits and p.shape == replace(SHAPE, micro_batch=2)
    assert p.steps == ["micro-batch 8 -> 2 (4 accumulation steps)"]
    assert p.report == r[2] and p.report.peak_training_bytes <= budget
    # A budget exactly at a candidate's peak fits it: the first halving is enough.
    at4 = plan(tiny_model, "far10", SHAPE, r[4].peak_training_bytes)
    assert at4.fits and at4.shape.micro_batch == 4 and at4.steps == ["micro-batch 8 -> 4 (2 accumulation steps)"]

    fail = plan(tiny_model, "far10", SHAPE, budget, policy="fail")
    assert not fail.fits and fail.shape == SHAPE and fail.steps == [] and fail.report == r[8]
    assert plan(tiny_model, "far10", SHAPE, r[8].peak_training_bytes, policy="fail").fits


def test_micro_batches_divide_the_batch():
    shape = TrainingShape.for_method("full", batch_size=12, seq_len=16)
    p = plan(tiny_model, "full", shape, 1)
    assert p.steps == ["micro-batch 12 -> 1 (12 accumulation steps)"]
    mid = peak_bytes(tiny_model, "full", replace(shape, micro_batch=3)).peak_training_bytes
    p = plan(tiny_model, "full", shape, mid)
    assert p.fits and p.shape.micro_batch == 3  # 12 -> 6 -> 3, never an uneven 12 -> 6 -> 3 -> 1 detour
    assert plan(tiny_model, "full", shape, 1, min_micro_batch=4).shape.micro_batch == 6


def test_a_budget_below_everything_tries_every_adaptation_in_order():
    p = plan(tiny_model, "far10", SHAPE, 1)
    assert not p.fits
    assert p.shape == TrainingShape(8, 16, 1, 0.01, "recompute")  # the smallest shape tried
    assert p.steps == ["micro-batch 8 -> 1 (8 accumulation steps)", "retention 0.1 -> 0.01",
                       "recompute frozen pre-activations"]
    assert [s.split()[0] for s in p.steps] == ["micro-batch", "retention", "recompute"]
    assert ADAPT_ORDER == ("micro-batch", "retention", "recompute")
    assert p.report == peak_bytes(tiny_model, "far10", p.shape)
    assert p.report.peak_training_bytes < peak_bytes(tiny_model, "far10", SHAPE).peak_training_bytes


def test_retention_stage_stops_at_the_first_retention_that_fits():
    one = replace(SHAPE, micro_batch=1)
    budget = peak_bytes(tiny_model, "far10", replace(one, retention=0.05)).peak_training_bytes
    assert budget < peak_bytes(tiny_model, "far10", one).peak_training_bytes
    p = plan(tiny_model, "far10", SHAPE, budget)
    assert p.fits and p.shape == replace(one, retention=0.05)
    assert p.steps == ["micro-batch 8 -> 1 (8 accumulation steps)", "retention 0.1 -> 0.05"]


def test_full_never_changes_retention_or_storage():
    p = plan(tiny_model, "full-emb", FULL, 1)
    assert not p.fits
    assert p.shape == replace(FULL, micro_batch=1)
    assert p.shape.retention is None and p.shape.preact_storage == FULL.preact_storage
    assert p.steps == ["micro-batch 8 -> 1 (8 accumulation steps)"]


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(ValueError, match="adapt, fail"):
        plan(tiny_model, "far10", SHAPE, 10**9, policy="shrink")


def test_no_grad_activation_peak_counts_what_is_live_at_once():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Linear(4, 1000), nn.ReLU(), nn.Linear(1000, 4))

        def forward(self, x):
            return self.seq(x)

    # When ReLU's output is made, the first Linear's output is still held: 2 x 1000 floats, nothing more.
    assert no_grad_activation_peak(Net(), {"x": torch.randn(1, 4)}) == 2 * 1000 * 4


def test_inference_floor_sits_between_the_weights_and_the_training_peak():
    weights = peak_bytes(tiny_model, "full", replace(FULL, batch_size=1, micro_batch=1)).weights_bytes
    short, long = inference_floor_bytes(tiny_model, 16), inference_floor_bytes(tiny_model, 64)
    assert weights < short < long
    assert long < peak_bytes(tiny_model, "bitfit", TrainingShape(1, 64, 1)).peak_training_bytes


def test_check_floor_rejects_a_budget_below_the_weights():
    weights = peak_bytes(tiny_model, "full", FULL).weights_bytes
    floor = inference_floor_bytes(tiny_model, 16)
    with pytest.raises(ValueError) as err:
        check_floor(weights // 2, "jetson-nano", *inference_floor(tiny_model(), 16))
    msg = str(err.value)
    m = re.search(r"device jetson-nano: memory budget ([\d.]+) MiB is below the ([\d.]+) MiB .*"
                  r"\(weights ([\d.]+) MiB\)", msg)
    assert m, msg
    for got, want in zip(map(float, m.groups()), (weights // 2, floor, weights)):
        assert got == pytest.approx(want / 2**20, rel=0.01)
    check_floor(2**30, "laptop", *inference_floor(tiny_model(), 16))  # no error


def _configured(method, storage="bfloat16"):
    model = tiny_model()
    prepare_for_accounting(model, parse_method(method), seed=0, preact_storage=storage)
    return model


def test_train_step_flops_show_far_skipping_frozen_weight_gradients():
    batch = tiny_batch(batch_size=4, seq_len=9)
    full, far, bitfit = (train_step_flops(_configured(m), batch) for m in ("full", "far10", "bitfit"))
    assert far < full and bitfit < full
    tokens, d, d_ff, n_blocks = 4 * 9, 32, 64, 2
    frozen = d_ff - num_learners(d_ff, 0.10)
    # Per block, FAR skips dW1_frozen (2*N*d*frozen) and dW2_frozen (the same): everything else is identical.
    assert full - far == 2 * tokens * d * frozen * 2 * n_blocks
    # Recompute adds back the frozen pre-activation matmul in backward: the time it trades for memory.
    recompute = train_step_flops(_configured("far10", "recompute"), batch)
    assert recompute - far == 2 * tokens * d * frozen * n_blocks
    model = _configured("far10")
    assert train_step_flops(model, batch) == train_step_flops(model, batch) == far
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


def test_train_step_flops_of_full_match_a_hand_count_with_attention():
    """Every linear costs 3x its forward (forward, input grad, weight grad); attention is 2 batched matmuls
    forward and 5 backward (torch's formula recomputes the scores). Fails if CPU attention were not counted."""
    b, s, d, d_ff, heads, n_blocks, labels = 4, 9, 32, 64, 2, 2, 2
    n = b * s
    linear = n_blocks * (4 * 2 * n * d * d + 2 * 2 * n * d * d_ff) + 2 * b * d * d + 2 * b * d * labels
    attention_bmm = 2 * b * heads * s * s * (d // heads)
    expected = 3 * linear + n_blocks * 7 * attention_bmm
    assert train_step_flops(_configured("full"), tiny_batch(batch_size=b, seq_len=s)) == expected


def test_profiled_peak_counts_the_resident_state_by_hand_and_a_step_holding_every_gradient():
    """The independent check of the accounting, on a tiny model in the fast tests (the MiniLM comparison is a
    realdata test): what was resident is weights + buffers + AdamW's two moments and step counter per trainable
    tensor, counted here from the shapes; a training step holds at least every trainable gradient at once."""
    from fedfar.devices.memory import profiled_peak_bytes

    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad_("embeddings" not in name)  # a frozen part: no gradient, no optimizer state
    trainable = [p for p in model.parameters() if p.requires_grad]
    out = profiled_peak_bytes(model, tiny_batch())
    resident = (sum(4 * p.numel() for p in model.parameters())
                + sum(b.numel() * b.element_size() for b in model.buffers())
                + sum(2 * 4 * p.numel() + 4 for p in trainable))  # exp_avg, exp_avg_sq, a float32 step each
    assert out["resident_bytes"] == resident
    assert out["measured_peak_bytes"] == resident + out["step_peak_bytes"]
    assert out["step_peak_bytes"] >= 4 * sum(p.numel() for p in trainable)
