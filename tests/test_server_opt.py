"""Server optimizers on partial updates, against a scalar hand computation of Reddi et al.'s Algorithm 2."""
import math

import pytest
import torch

from fedfar.federation import exchange
from fedfar.federation.config import RunConfig
from fedfar.federation.server_opt import SERVER_OPTS, ServerOptimizer

HYPER = dict(lr=0.5, momentum=0.8, beta1=0.7, beta2=0.9, tau=0.05)


class ByHand:
    """One coordinate's optimizer, in Python floats, written from the paper's formulas."""

    def __init__(self, kind: str) -> None:
        self.kind, self.m, self.v = kind, 0.0, HYPER["tau"] ** 2

    def step(self, delta: float) -> float:
        lr, tau, b1, b2 = HYPER["lr"], HYPER["tau"], HYPER["beta1"], HYPER["beta2"]
        if self.kind == "fedavg":
            return lr * delta
        if self.kind == "fedavgm":
            self.m = HYPER["momentum"] * self.m + delta
            return lr * self.m
        self.m = b1 * self.m + (1 - b1) * delta
        if self.kind == "fedadam":
            self.v = b2 * self.v + (1 - b2) * delta ** 2
        else:
            self.v = self.v - (1 - b2) * delta ** 2 * math.copysign(1.0, self.v - delta ** 2) * (self.v != delta ** 2)
        return lr * self.m / (math.sqrt(self.v) + tau)


def _plan_and_state():
    plan = exchange.ExchangePlan(dense=("head",), ffn=(("w1", "b1", "w2"),))
    state = {"head": torch.zeros(2), "w1": torch.zeros(4, 1), "b1": torch.zeros(4), "w2": torch.zeros(1, 4)}
    return plan, state


def _delta(rows, value, head):
    k = len(rows)
    return {"head": torch.tensor(head), "ffn.0.rows": torch.tensor(rows, dtype=torch.int32),
            "ffn.0.w1": torch.full((k, 1), value), "ffn.0.b1": torch.full((k,), value),
            "ffn.0.w2": torch.full((1, k), value)}


@pytest.mark.parametrize("kind", SERVER_OPTS)
def test_each_optimizer_matches_the_hand_computation_over_rounds_with_a_global_mask(kind):
    plan, state = _plan_and_state()
    opt = ServerOptimizer(kind, **HYPER)
    head, row = [ByHand(kind), ByHand(kind)], ByHand(kind)
    expected_head, expected_row = [0.0, 0.0], 0.0
    # three rounds, two clients (1 and 3 examples) with the same mask {1, 3}; pseudo-gradient = weighted mean
    for a, b in [(4.0, 8.0), (-2.0, 1.0), (0.5, 0.5)]:
        exchange.merge_deltas(state, [(_delta([1, 3], a, [a, -a]), 1.0), (_delta([1, 3], b, [b, 2 * b]), 3.0)],
                              plan, optimizer=opt)
        mean = (a + 3 * b) / 4
        expected_row += row.step(mean)
        for i, d in enumerate([mean, (-a + 6 * b) / 4]):
            expected_head[i] += head[i].step(d)
    for name in ("w1", "b1"):
        got = state[name].flatten().tolist()
        assert got[1] == pytest.approx(expected_row, rel=1e-5) and got[3] == pytest.approx(expected_row, rel=1e-5)
        assert got[0] == 0.0 and got[2] == 0.0  # never sent: bit-identical
    assert state["w2"].flatten().tolist() == state["w1"].flatten().tolist()
    assert state["head"].tolist() == pytest.approx(expected_head, rel=1e-5)


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi"])
def test_with_local_masks_rows_nobody_sent_keep_their_weights_and_their_moments(kind):
    plan, state = _plan_and_state()
    opt = ServerOptimizer(kind, **HYPER)
    rows = [ByHand(kind) for _ in range(4)]
    expected = [0.0] * 4
    # round 1: A sends rows {0, 1}, B sends {1}; round 2: only A, row {2}; row 3 is never sent
    exchange.merge_deltas(state, [(_delta([0, 1], 2.0, [0.0, 0.0]), 1.0), (_delta([1], 6.0, [0.0, 0.0]), 1.0)],
                          plan, optimizer=opt)
    expected[0] += rows[0].step(2.0)
    expected[1] += rows[1].step(4.0)  # row 1 over its two senders
    after_one = {k: v.clone() for k, v in state.items()}
    moments_one = {k: t.clone() for k, t in opt.state_dict().items()}
    exchange.merge_deltas(state, [(_delta([2], -3.0, [0.0, 0.0]), 1.0)], plan, optimizer=opt)
    expected[2] += rows[2].step(-3.0)
    assert state["w1"].flatten().tolist() == pytest.approx(expected, rel=1e-5)
    for name in ("w1", "b1"):  # rows 0 and 1 were not sent in round 2: weights and moments bit-identical
        assert torch.equal(state[name][:2], after_one[name][:2]), name
        for key in [k for k in moments_one if k.startswith(f"{name}/")]:
            assert torch.equal(opt.state_dict()[key][:2], moments_one[key][:2]), key
    assert torch.equal(state["w2"][:, :2], after_one["w2"][:, :2])
    assert state["w1"][3].item() == 0.0 and opt.state_dict()["w1/m"][3].item() == 0.0
    if kind != "fedavgm":
        assert opt.state_dict()["w1/v"][3].item() == pytest.approx(HYPER["tau"] ** 2)


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
def test_robust_aggregators_feed_the_optimizer_only_the_coordinates_sent(aggregator):
    plan, state = _plan_and_state()
    opt = ServerOptimizer("fedadam", **HYPER)
    deltas = [(_delta([0, 1], v, [v, v]), 1.0) for v in (1.0, 2.0, 30.0)]
    exchange.merge_deltas(state, deltas, plan, aggregator=aggregator, trim=0.34, optimizer=opt)
    # median of (1, 2, 30) = 2; trimming one of three at each end leaves 2 as well
    step = ByHand("fedadam").step(2.0)
    assert state["w1"].flatten().tolist() == pytest.approx([step, step, 0.0, 0.0], rel=1e-5)
    assert opt.state_dict()["w1/m"].flatten().tolist() == pytest.approx([0.6, 0.6, 0.0, 0.0], rel=1e-6)


def test_a_restored_optimizer_takes_the_same_next_step():
    plan, state = _plan_and_state()
    opt = ServerOptimizer("fedyogi", **HYPER)
    exchange.merge_deltas(state, [(_delta([1, 2], 3.0, [1.0, -1.0]), 2.0)], plan, optimizer=opt)
    twin_state = {k: v.clone() for k, v in state.items()}
    twin = ServerOptimizer("fedyogi", **HYPER)
    twin.load_state_dict(opt.state_dict())
    for s, o in ((state, opt), (twin_state, twin)):
        exchange.merge_deltas(s, [(_delta([2, 3], -1.0, [0.5, 0.5]), 1.0)], plan, optimizer=o)
    assert all(torch.equal(state[k], twin_state[k]) for k in state)


def test_fedavg_is_the_default_and_equals_server_lr_times_the_mean():
    plan, a = _plan_and_state()
    _, b = _plan_and_state()
    deltas = [(_delta([1], 4.0, [1.0, 2.0]), 1.0), (_delta([1], 2.0, [3.0, 0.0]), 1.0)]
    exchange.merge_deltas(a, deltas, plan, server_lr=0.5)
    exchange.merge_deltas(b, deltas, plan, optimizer=ServerOptimizer("fedavg", lr=0.5))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["w1"][1].item() == 1.5


@pytest.mark.parametrize("key, value, named", [
    ("server-opt", "adam", "choose one of fedavg, fedavgm, fedadam, fedyogi"),
    ("server-momentum", 1.0, "server-momentum must be in"), ("server-beta1", -0.1, "server-beta1"),
    ("server-beta2", 1.0, "server-beta2"), ("server-tau", 0.0, "server-tau must be > 0"),
    ("server-lr", 0.0, "server-lr must be > 0"),
])
def test_a_bad_server_optimizer_setting_is_named_before_anything_runs(key, value, named):
    with pytest.raises(ValueError, match=named):
        RunConfig.from_flower({key: value})
