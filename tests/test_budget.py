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


# ------------------------------------------------------------------------- shapes, plans and floors at their edges
def _message(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    return str(err.value)


def test_training_shape_accepts_its_edges_and_names_what_is_wrong_outside_them():
    assert TrainingShape(1, 1, 1).accumulation_steps == 1  # one sequence of one token is a shape
    assert TrainingShape(8, 16, 3, retention=1.0).accumulation_steps == 3  # retention 1.0: every node learns
    assert _message(lambda: TrainingShape(1, 0, 1)) == "batch_size and seq_len must be >= 1, got 1 and 0"
    assert _message(lambda: TrainingShape(0, 16, 1)) == "batch_size and seq_len must be >= 1, got 0 and 16"
    assert _message(lambda: TrainingShape(8, 16, 9)) == "micro_batch must be in [1, batch_size=8], got 9"
    assert _message(lambda: TrainingShape(8, 16, 0)) == "micro_batch must be in [1, batch_size=8], got 0"
    for bad in (0.0, 1.5):
        assert _message(lambda: TrainingShape(8, 16, 8, bad)) == f"retention must be in (0, 1] or None, got {bad}"
    assert (_message(lambda: TrainingShape(8, 16, 8, None, "fp16"))
            == "preact_storage 'fp16': choose one of ('float32', 'bfloat16', 'recompute')")


def test_for_method_takes_the_methods_retention_and_the_storage_asked_for():
    assert TrainingShape.for_method("far10", 8, 16) == TrainingShape(8, 16, 8, 0.1, "bfloat16")
    assert (TrainingShape.for_method("random25-emb", 8, 16, micro_batch=2, preact_storage="recompute")
            == TrainingShape(8, 16, 2, 0.25, "recompute"))
    assert TrainingShape.for_method("full", 8, 16, preact_storage="float32") == TrainingShape(8, 16, 8, None, "float32")


def test_a_shape_without_retention_is_accounted_and_planned_at_the_methods_retention():
    bare = TrainingShape(8, 16, 8)  # retention None: far10's own 0.1
    assert peak_bytes(tiny_model, "far10", bare) == peak_bytes(tiny_model, "far10", replace(bare, retention=0.1))
    fits = plan(tiny_model, "far10", bare, 10**9)
    assert fits.fits and fits.shape == TrainingShape(8, 16, 8, 0.1) and fits.steps == []  # the plan names it


def test_peak_bytes_accounts_the_frozen_pre_activation_in_the_shapes_storage():
    """far10 on the tiny model keeps 58 of 64 FFN nodes frozen per block; the frozen branch saves its
    pre-activation (tokens x 58) in 4 bytes (float32), 2 (bfloat16) or not at all (recompute)."""
    tokens, frozen, n_blocks = 2 * 8, 64 - num_learners(64, 0.10), 2
    saved = {s: peak_bytes(tiny_model, "far10", TrainingShape(2, 8, 2, 0.1, s)).saved_tensor_bytes
             for s in ("float32", "bfloat16", "recompute")}
    assert saved["float32"] - saved["bfloat16"] == tokens * frozen * 2 * n_blocks
    assert saved["bfloat16"] - saved["recompute"] == tokens * frozen * 2 * n_blocks


def test_lora_is_accounted_with_its_adapters_only_trainable():
    """lora8 on the tiny BERT: A (8x32) and B (32x8) on query and value of 2 blocks, plus the classifier head
    (32x2 + 2): 2114 trainable parameters in 10 tensors, float32."""
    r = peak_bytes(tiny_model, "lora8", TrainingShape(2, 8, 2))
    trainable = 2 * 2 * (8 * 32 + 32 * 8) + 32 * 2 + 2
    assert r.trainable_params == trainable == 2114
    assert r.total_params == 37922 + 2 * 2 * (8 * 32 + 32 * 8)
    assert r.gradient_bytes == 4 * trainable and r.optimizer_bytes == 2 * 4 * trainable + 4 * 10


def test_prepare_for_accounting_is_reproducible_from_its_seed():
    """Node-selecting methods learn the nodes `random_learners` draws from the seed (0 unless given), with the
    frozen branch in bfloat16 unless told; LoRA's adapters are the ones LoRA.attach draws from the same seed."""
    from fedfar.methods.far import SplitFFN, ffn_sizes, random_learners

    model = tiny_model()
    prepare_for_accounting(model, parse_method("far10"))
    splits = [m for m in model.modules() if isinstance(m, SplitFFN)]
    assert [s.preact_storage for s in splits] == ["bfloat16", "bfloat16"]
    drawn = random_learners(ffn_sizes(tiny_model()), 0.1, seed=0)
    assert all(torch.equal(s.learner_index, d) for s, d in zip(splits, drawn, strict=True))

    accounted, attached = tiny_model(), tiny_model()
    prepare_for_accounting(accounted, parse_method("lora8"), seed=3)
    parse_method("lora8").attach(attached, seed=3)
    adapters = {n: p for n, p in attached.named_parameters() if ".lora_A" in n}
    assert len(adapters) == 4
    assert all(torch.equal(p, adapters[n]) for n, p in accounted.named_parameters() if ".lora_A" in n)


def test_micro_batches_step_to_the_largest_divisor_at_most_half():
    shape = TrainingShape.for_method("full", batch_size=18, seq_len=16)
    at3 = peak_bytes(tiny_model, "full", replace(shape, micro_batch=3))
    p = plan(tiny_model, "full", shape, at3.peak_training_bytes)  # 18 -> 9 -> 3 (4 does not divide 18)
    assert p.fits and p.shape == replace(shape, micro_batch=3) and p.report == at3
    assert p.steps == ["micro-batch 18 -> 3 (6 accumulation steps)"]


def test_plan_rejects_bad_arguments_and_names_them():
    def msg(**kw):
        args = dict(budget_bytes=10**9, min_micro_batch=1, min_retention=0.01) | kw
        return _message(lambda: plan(tiny_model, "far10", SHAPE, args.pop("budget_bytes"), **args))

    head = "need budget_bytes > 0, min_micro_batch >= 1 and min_retention in (0, 1], got "
    assert msg(budget_bytes=0) == head + "0, 1, 0.01"
    assert msg(min_micro_batch=0) == head + "1000000000, 0, 0.01"
    assert msg(min_retention=0.0) == head + "1000000000, 1, 0.0"
    assert msg(min_retention=1.5) == head + "1000000000, 1, 1.5"
    # min_retention 1.0 is valid: retention is never lowered, the plan goes from micro-batching to recompute.
    p = plan(tiny_model, "far10", TrainingShape(2, 8, 2, 0.1), 1, min_retention=1.0)
    assert p.steps == ["micro-batch 2 -> 1 (2 accumulation steps)", "recompute frozen pre-activations"]


def test_a_shape_that_already_recomputes_is_not_switched_to_recompute_again():
    p = plan(tiny_model, "far10", TrainingShape(2, 8, 2, 0.1, "recompute"), 1)
    assert not p.fits and p.shape == TrainingShape(2, 8, 1, 0.01, "recompute")
    assert p.steps == ["micro-batch 2 -> 1 (2 accumulation steps)", "retention 0.1 -> 0.01"]


# --------------------------------------------------------------------------- live activation bytes, by hand
def test_released_activations_stop_counting():
    # 4 -> 1000 -> 10 -> 1500 floats: the 1000 are freed once the 10 exist, so the peak is 10 + 1500, not 1000 + ...
    net = nn.Sequential(nn.Linear(4, 1000), nn.Linear(1000, 10), nn.Linear(10, 1500))
    assert no_grad_activation_peak(net, {"input": torch.randn(1, 4)}) == 4 * (10 + 1500)


def test_attention_scores_count_while_their_softmax_is_made():
    """A batched 4-d matmul (attention scores) is a bmm whose result lives on as a reshaped alias after the bmm's
    own tensor is gone: the scores and the probabilities are both live, 2 x batch x heads x seq x seq floats."""
    class Attention(nn.Module):
        def forward(self, q, k):
            return torch.matmul(q, k.transpose(-1, -2)).softmax(-1)

    b, heads, s, d = 2, 3, 10, 4
    q, k = torch.randn(b, heads, s, d), torch.randn(b, heads, s, d)
    assert no_grad_activation_peak(Attention(), {"q": q, "k": k}) == 2 * b * heads * s * s * 4


def test_an_activation_counts_in_the_dtype_it_is_cast_to():
    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1000)

        def forward(self, x):
            return self.fc(x).to(torch.bfloat16)  # 1000 float32, then 1000 bfloat16 while both are live

    assert no_grad_activation_peak(Cast(), {"x": torch.randn(1, 4)}) == 1000 * 4 + 1000 * 2


def test_one_byte_results_count():
    class MaskCheck(nn.Module):  # as transformers asks whether a padding mask is all ones
        def forward(self, attention_mask):
            return attention_mask.bool().all()

    # A bool copy of the 1 x 7 mask (7 bytes) and the one-byte answer, live at once.
    assert no_grad_activation_peak(MaskCheck(), {"attention_mask": torch.ones(1, 7, dtype=torch.long)}) == 7 + 1


def test_inference_floor_is_weights_plus_inputs_plus_the_activation_peak_by_hand():
    """The tiny BERT: 37,922 float32 parameters (embeddings 100x32 + 512x32 + 2x32 + LayerNorm, 2 blocks of
    8,544, pooler 32x32 + 32, classifier 32x2 + 2) and two int64 buffers of 512 (position and token type ids)."""
    from fedfar.models import random_batch

    params = (100 * 32 + 512 * 32 + 2 * 32 + 2 * 32) + 2 * (4 * (32 * 32 + 32) + 2 * 32 + (32 * 64 + 64)
                                                           + (64 * 32 + 32) + 2 * 32) + (32 * 32 + 32) + (32 * 2 + 2)
    assert params == 37922
    weights = 4 * params + 2 * 512 * 8
    model = tiny_model()
    floor, w = inference_floor(model, 16, batch_size=3)
    batch = random_batch(model, 3, 16)
    batch.pop("labels")
    inputs = 2 * 3 * 16 * 8  # input_ids and attention_mask, int64
    assert w == weights
    assert floor == weights + inputs + no_grad_activation_peak(model, batch)
    assert inference_floor_bytes(tiny_model, 16, batch_size=3) == floor
    assert inference_floor_bytes(tiny_model, 16) == inference_floor(tiny_model(), 16)[0] < floor


def test_check_floor_accepts_a_budget_exactly_at_the_floor_and_prints_whole_mib_from_100():
    floor, weights = inference_floor(tiny_model(), 16)
    check_floor(floor, "exact", floor, weights)  # no error: the frozen model just fits
    with pytest.raises(ValueError, match="memory budget"):
        check_floor(floor - 1, "one-byte-short", floor, weights)
    mib = 2**20
    assert _message(lambda: check_floor(1536 * mib, "phone", 2048 * mib, 300 * mib)) == (
        "device phone: memory budget 1536 MiB is below the 2048 MiB the model needs even for inference "
        "(weights 300 MiB); give it a larger budget or a smaller model")
    assert _message(lambda: check_floor(mib // 2, "pi", 3 * mib // 2, mib // 4)).startswith(
        "device pi: memory budget 0.5 MiB is below the 1.5 MiB the model needs even for inference (weights 0.25 MiB)")
