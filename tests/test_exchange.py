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


def test_select_of_a_sliced_plan_needs_rows_for_every_ffn_block():
    model = tiny_model()
    plan = parse_method("far25-attn").exchange_plan(model)
    state = model.state_dict()
    rows = random_learners(ffn_sizes(model), 0.25, seed=0)
    message = "a sliced plan needs row indices for each of its 2 FFN blocks"
    for bad in (None, rows[:1]):  # no rows at all, or rows for only the first block
        with pytest.raises(ValueError) as err:
            exchange.select(state, plan, bad)
        assert str(err.value) == message


def test_a_part_that_does_not_match_the_plan_names_at_most_five_missing_and_five_unexpected_keys():
    plan = exchange.ExchangePlan(dense=tuple(f"t{j}" for j in range(7)), ffn=())
    part = {f"x{j}": torch.zeros(1) for j in range(7)}
    with pytest.raises(ValueError) as err:
        exchange.write({}, part, plan)
    assert str(err.value) == ("part does not match the exchange plan: missing ['t0', 't1', 't2', 't3', 't4'], "
                              "unexpected ['x0', 'x1', 'x2', 'x3', 'x4']")


def test_the_norm_bound_is_on_the_l2_norm_of_the_whole_update_and_includes_the_bound():
    plan, state = _toy_plan_and_state()
    delta = _delta([1], 0.0, [3.0, -4.0])  # FFN values 0, head (3, -4): norm exactly 5
    exchange.check_delta(delta, plan, state, max_norm=5.0)  # at the bound: accepted
    exchange.check_delta(delta, plan, state, max_norm=0.0)  # 0 = no bound
    for bound in (4.99, 0.5):
        with pytest.raises(ValueError) as err:
            exchange.check_delta(delta, plan, state, max_norm=bound)
        assert str(err.value) == f"update norm 5 exceeds the bound max-update-norm = {bound:g}"


def test_trimmed_mean_averages_the_values_it_keeps_with_the_default_trim_of_a_tenth():
    plan, _ = _toy_plan_and_state()
    # trim 0.25 of 4 values: drop 1 at each end, average the middle two: (2 + 4) / 2
    _, state = _toy_plan_and_state()
    exchange.merge_deltas(state, [(_delta([0], v, [v, -v]), 1.0) for v in (1.0, 2.0, 4.0, 100.0)], plan,
                          aggregator="trimmed-mean", trim=0.25)
    assert state["w1"].flatten().tolist() == [3.0, 0.0, 0.0, 0.0]
    assert state["head"].tolist() == [3.0, -3.0]
    # default trim 0.1 of 10 values: drop 1 at each end, average 1..8 -> 4.5 (the outlier 1000 is gone)
    _, state = _toy_plan_and_state()
    values = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1000.0]
    exchange.merge_deltas(state, [(_delta([2], v, [v, 0.0]), 1.0) for v in values], plan, aggregator="trimmed-mean")
    assert state["b1"].tolist() == [0.0, 0.0, 4.5, 0.0]
    assert state["head"].tolist() == [4.5, 0.0]


def test_the_mean_depends_only_on_the_relative_weights_fractions_included():
    plan, state = _toy_plan_and_state()
    # as test_global_mask_aggregation_is_weighted_fedavg, with weights 1 : 3 given as 0.125 : 0.375
    exchange.merge_deltas(state, [(_delta([1, 3], 4.0, [1.0, 0.0]), 0.125),
                                  (_delta([1, 3], 8.0, [0.0, 2.0]), 0.375)], plan)
    assert state["w1"].flatten().tolist() == [0.0, 7.0, 0.0, 7.0]
    assert state["b1"].tolist() == [0.0, 7.0, 0.0, 7.0]
    assert state["head"].tolist() == [0.25, 1.5]
    # a row one client sent with weight 0.125 moves by exactly that client's delta
    _, state = _toy_plan_and_state()
    exchange.merge_deltas(state, [(_delta([0], 4.0, [0.0, 0.0]), 0.125), (_delta([2], 8.0, [0.0, 0.0]), 0.375)],
                          plan)
    assert state["w2"].flatten().tolist() == [4.0, 0.0, 8.0, 0.0]


def test_ffn_rows_are_accumulated_in_double_precision_and_rounded_once():
    plan, state = _toy_plan_and_state()
    tiny = 2.0**-24  # half a float32 ulp of 1: lost if added to 1 in float32, kept in float64
    exchange.merge_deltas(state, [(_delta([0], v, [0.0, 0.0]), 1.0) for v in (1.0, tiny, tiny)], plan)
    expected = torch.tensor((1.0 + 2 * tiny) / 3, dtype=torch.float64).float().item()  # 0.33333337, not 0.33333334
    assert expected != torch.tensor(1.0 / 3).item()
    for name in ("w1", "b1", "w2"):
        assert state[name].flatten()[0].item() == expected, name


@pytest.mark.parametrize("aggregator", exchange.AGGREGATORS)
def test_a_float64_model_is_merged_in_float64(aggregator):
    plan, state = _toy_plan_and_state()
    state = {k: v.double() for k, v in state.items()}
    f64 = dict(dtype=torch.float64)
    deltas = [({"head": torch.tensor([v, 2 * v], **f64), "ffn.0.rows": torch.tensor([0, 1]),
                "ffn.0.w1": torch.full((2, 1), v, **f64), "ffn.0.b1": torch.full((2,), v, **f64),
                "ffn.0.w2": torch.full((1, 2), v, **f64)}, 1.0) for v in (0.1, 0.2, 0.4)]
    exchange.merge_deltas(state, deltas, plan, aggregator=aggregator, trim=0.0)
    # mean and trimmed mean (trim 0): 0.7 / 3; median: 0.2 -- each in float64, not rounded through float32
    stat = 0.2 if aggregator == "median" else 0.7 / 3
    for name in ("w1", "b1", "w2"):
        assert state[name].dtype == torch.float64
        torch.testing.assert_close(state[name].flatten(), torch.tensor([stat, stat, 0.0, 0.0], dtype=torch.float64),
                                   rtol=1e-15, atol=0)
    torch.testing.assert_close(state["head"], torch.tensor([stat, 2 * stat], dtype=torch.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("aggregator", exchange.AGGREGATORS)
def test_half_precision_deltas_are_merged_in_the_models_float32(aggregator):
    # check_delta accepts any floating delta (the float16 / bfloat16 codecs ship such); the arithmetic must not
    # run in bfloat16, whose 8-bit mantissa cannot hold 1 + 2^-8 or 3 x (1 + 2^-7).
    plan, state = _toy_plan_and_state()
    one_plus = 1.0 + 2.0**-7  # exact in bfloat16
    deltas = [(_delta([1], v, [v, v]), w) for v, w in ((1.0, 1.0), (one_plus, 3.0))]
    deltas = [({k: t.bfloat16() if t.is_floating_point() else t for k, t in d.items()}, w) for d, w in deltas]
    exchange.check_delta(deltas[0][0], plan, state)
    exchange.merge_deltas(state, deltas, plan, aggregator=aggregator, trim=0.0)
    # mean: (1 x 1 + 3 x (1 + 2^-7)) / 4 = 1.005859375; median, trimmed mean (unweighted): (1 + 1 + 2^-7) / 2
    stat = (1.0 + 3 * one_plus) / 4 if aggregator == "mean" else (1.0 + one_plus) / 2
    assert state["head"].dtype == torch.float32 and state["head"].tolist() == [stat, stat]
    assert state["w1"].flatten().tolist() == [0.0, stat, 0.0, 0.0]
