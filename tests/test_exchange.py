"""What travels and how the server merges it: plans per method, row slices, hand-computed aggregation."""
import pytest
import torch
from conftest import tiny_batch, tiny_model

from fedfar.federation import exchange
from fedfar.methods import BitFit, Full, parse_method
from fedfar.methods.far import ffn_sizes, random_learners


def test_plans_name_exactly_the_trainable_tensors():
    model = tiny_model()
    full = Full().exchange_plan(model)
    assert set(full.dense) == set(dict(model.named_parameters())) and not full.sliced
    emb = parse_method("far10-emb").exchange_plan(model)
    assert "bert.embeddings.word_embeddings.weight" not in emb.dense
    assert "bert.encoder.layer.0.attention.self.query.weight" in emb.dense
    assert "bert.encoder.layer.0.output.dense.bias" in emb.dense  # b2 trains with the learners
    assert emb.ffn[0] == ("bert.encoder.layer.0.intermediate.dense.weight",
                          "bert.encoder.layer.0.intermediate.dense.bias", "bert.encoder.layer.0.output.dense.weight")
    attn = parse_method("far10-attn").exchange_plan(model)
    assert not any("attention.self" in n for n in attn.dense)
    bitfit = BitFit().exchange_plan(model)
    assert all(n.endswith("bias") or n.startswith("classifier") for n in bitfit.dense)
    assert all(p.requires_grad for p in model.parameters())  # planning leaves the model as it was


def test_select_then_write_round_trips_rows():
    model = tiny_model()
    plan = parse_method("far25-attn").exchange_plan(model)
    rows = random_learners(ffn_sizes(model), 0.25, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    part = exchange.select(state, plan, rows)
    assert part["ffn.0.w1"].shape == (16, 32) and part["ffn.0.w2"].shape == (32, 16)
    assert part["ffn.0.rows"].dtype == torch.int32
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    exchange.write(target, part, plan)
    w1 = plan.ffn[0][0]
    assert torch.equal(target[w1][rows[0]], state[w1][rows[0]])
    others = torch.ones(64, dtype=torch.bool)
    others[rows[0]] = False
    assert torch.count_nonzero(target[w1][others]) == 0
    with pytest.raises(ValueError, match="missing"):
        exchange.write(target, {k: v for k, v in part.items() if k != "ffn.1.w2"}, plan)


def _toy_plan_and_state():
    plan = exchange.ExchangePlan(dense=("head",), ffn=(("w1", "b1", "w2"),))
    state = {"head": torch.zeros(2), "w1": torch.zeros(4, 1), "b1": torch.zeros(4), "w2": torch.zeros(1, 4),
             "frozen": torch.ones(3)}
    return plan, state


def _delta(rows, value, head):
    k = len(rows)
    return {"head": torch.tensor(head), "ffn.0.rows": torch.tensor(rows, dtype=torch.int32),
            "ffn.0.w1": torch.full((k, 1), value), "ffn.0.b1": torch.full((k,), value), "ffn.0.w2": torch.full((1, k), value)}


def test_global_mask_aggregation_is_weighted_fedavg():
    plan, state = _toy_plan_and_state()
    # Two clients with the same mask {1, 3}; weights 1 and 3 examples.
    touched = exchange.merge_deltas(state, [(_delta([1, 3], 4.0, [1.0, 0.0]), 1.0),
                                            (_delta([1, 3], 8.0, [0.0, 2.0]), 3.0)], plan)
    # rows 1, 3: (1*4 + 3*8) / 4 = 7; rows 0, 2 untouched; head: (1*[1,0] + 3*[0,2]) / 4
    assert state["w1"].flatten().tolist() == [0.0, 7.0, 0.0, 7.0]
    assert state["w2"].flatten().tolist() == [0.0, 7.0, 0.0, 7.0]
    assert state["head"].tolist() == [0.25, 1.5]
    assert torch.equal(state["frozen"], torch.ones(3)) and touched == {0: 2}


def test_local_mask_aggregation_averages_each_row_over_its_senders():
    plan, state = _toy_plan_and_state()
    state["w1"] += 10.0
    exchange.merge_deltas(state, [(_delta([0, 1], 2.0, [0.0, 0.0]), 1.0),
                                  (_delta([1, 2], 6.0, [0.0, 0.0]), 1.0)], plan)
    # row 0: only client A -> +2; row 1: both -> +(2+6)/2 = 4; row 2: only B -> +6; row 3: nobody -> unchanged
    assert state["w1"].flatten().tolist() == [12.0, 14.0, 16.0, 10.0]
    assert state["b1"].tolist() == [2.0, 4.0, 6.0, 0.0]


def test_local_update_delta_holds_only_trainable_tensors_and_frozen_weights_stay():
    from fedfar.federation.config import RunConfig
    from fedfar.federation.client import local_update

    model = tiny_model()
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = RunConfig(method="far25-emb", lr=1e-2, local_epochs=1)
    plan = cfg.spec.exchange_plan(model)
    rows = random_learners(ffn_sizes(model), 0.25, seed=3)
    down = exchange.select(model.state_dict(), plan, rows)
    delta, metrics = local_update(model, down, plan, rows, [tiny_batch(seed=s) for s in range(3)], cfg, seed=0)
    assert set(delta) == set(down)
    assert metrics["steps"] == 3
    after = model.state_dict()
    sent = set(plan.dense) | {n for entry in plan.ffn for n in entry}
    for name, before in pristine.items():
        if name not in sent:
            assert torch.equal(after[name], before), name
    w1 = plan.ffn[0][0]
    frozen_rows = torch.ones(64, dtype=torch.bool)
    frozen_rows[rows[0]] = False
    assert torch.equal(after[w1][frozen_rows], pristine[w1][frozen_rows])
    assert not torch.equal(after[w1][rows[0]], pristine[w1][rows[0]])
    torch.testing.assert_close(delta["ffn.0.w1"], after[w1][rows[0]] - pristine[w1][rows[0]])


def _robust_deltas():
    """Three clients on the toy plan; C is an outlier. Rows: A {0, 1}, B {1, 2}, C {1, 2}; row 3 nobody."""
    return [(_delta([0, 1], 1.0, [1.0, 1.0]), 1.0), (_delta([1, 2], 3.0, [2.0, 2.0]), 5.0),
            (_delta([1, 2], 1000.0, [1000.0, -1000.0]), 1.0)]


def test_median_runs_over_the_clients_that_sent_each_row():
    plan, state = _toy_plan_and_state()
    touched = exchange.merge_deltas(state, _robust_deltas(), plan, aggregator="median")
    # row 0: A only -> 1; row 1: {1, 3, 1000} -> 3; row 2: {3, 1000} -> mean of the two middles 501.5; row 3: none
    assert state["w1"].flatten().tolist() == [1.0, 3.0, 501.5, 0.0]
    assert state["w2"].flatten().tolist() == [1.0, 3.0, 501.5, 0.0]
    assert state["head"].tolist() == [2.0, 1.0]  # unweighted: the examples do not count
    assert torch.equal(state["frozen"], torch.ones(3)) and touched == {0: 3}


def test_trimmed_mean_drops_the_extremes_of_each_row():
    plan, state = _toy_plan_and_state()
    exchange.merge_deltas(state, _robust_deltas(), plan, aggregator="trimmed-mean", trim=0.34)
    # trim floor(0.34 k) at each end: row 1 (k=3) keeps the middle 3; rows 0 and 2 (k=1, 2) keep everything
    assert state["b1"].tolist() == [1.0, 3.0, 501.5, 0.0]
    assert state["head"].tolist() == [2.0, 1.0]


def test_a_scaled_outlier_moves_the_median_no_more_than_honest_clients_do():
    plan, _ = _toy_plan_and_state()
    honest = [(_delta([0, 1, 2, 3], v, [v, v]), 1.0) for v in (0.9, 1.0, 1.1, 1.2)]
    attack = (_delta([0, 1, 2, 3], 1000.0, [1000.0, 1000.0]), 1.0)  # scale:1000 of an honest update
    for aggregator in ("median", "mean"):
        _, state = _toy_plan_and_state()
        exchange.merge_deltas(state, honest + [attack], plan, aggregator=aggregator)
        # the median lands among the honest updates (1.1); the mean is dragged to ~200
        assert (state["w1"].abs().max() <= 1.2) == (aggregator == "median"), aggregator


@pytest.mark.parametrize("bad, reason", [
    (lambda d: d.update({"head": torch.tensor([float("nan"), 0.0])}), "non-finite"),
    (lambda d: d.update({"ffn.0.w1": torch.full((2, 1), float("inf"))}), "non-finite"),
    (lambda d: d.update({"head": torch.zeros(1)}), "shape"),
    (lambda d: d.update({"ffn.0.rows": torch.tensor([-1, 3], dtype=torch.int32)}), "outside"),
    (lambda d: d.update({"ffn.0.rows": torch.tensor([3, 4], dtype=torch.int32)}), "outside"),
    (lambda d: d.update({"ffn.0.rows": torch.tensor([1, 1], dtype=torch.int32)}), "repeated"),
    (lambda d: d.update({"ffn.0.rows": torch.tensor([1.0, 3.0])}), "integer"),
    (lambda d: d.update({"head": torch.tensor([1, 0])}), "floating"),
    (lambda d: d.pop("ffn.0.b1"), "missing"),
    (lambda d: d.update({"extra": torch.zeros(1)}), "unexpected"),
])
def test_check_delta_names_what_is_wrong(bad, reason):
    plan, state = _toy_plan_and_state()
    delta = _delta([1, 3], 1.0, [0.0, 0.0])
    exchange.check_delta(delta, plan, state)  # the good one passes
    bad(delta)
    with pytest.raises(ValueError, match=reason):
        exchange.check_delta(delta, plan, state)


def test_check_delta_enforces_the_mask_and_the_norm_bound():
    plan, state = _toy_plan_and_state()
    delta = _delta([1, 3], 1.0, [0.0, 0.0])  # norm sqrt(2 * 3 * 1) over w1, b1, w2
    exchange.check_delta(delta, plan, state, allowed_rows=[torch.tensor([1, 3])], max_norm=2.45)
    with pytest.raises(ValueError, match="learner mask"):
        exchange.check_delta(delta, plan, state, allowed_rows=[torch.tensor([1, 2])])
    with pytest.raises(ValueError, match="norm 2.449"):
        exchange.check_delta(delta, plan, state, max_norm=2.4)
