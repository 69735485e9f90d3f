"""Property-based tests (hypothesis) for the arithmetic everything rests on: the server's merge, the wire codecs
and the federated partitioners. Each property is checked against a reference computed here, in numpy/scipy,
not with the code under test. Examples are derandomized (the same cases every run) and no database is written."""
import math

import numpy as np
import torch
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.stats import trim_mean

from fedfar import data as D
from fedfar.federation import exchange
from fedfar.federation.codecs import decode, encode

SETTINGS = dict(deadline=None, derandomize=True, database=None)
U32 = 2.0**-24  # float32 unit roundoff

# ----------------------------------------------------------------------------------------------- merging

# Two FFN blocks (the second without an fc1 bias: the b1=None branch) plus two dense tensors and one frozen tensor
# outside the plan, which no merge may touch.
PLAN = exchange.ExchangePlan(dense=("norm", "head"), ffn=(("l0.w1", "l0.b1", "l0.w2"), ("l1.w1", None, "l1.w2")))
FFN_TENSORS = [name for block in PLAN.ffn for name in block if name]


@st.composite
def merge_cases(draw, every_row=False):
    """A global state, and per client: a dense delta of every trained tensor, the FFN rows it sends, its examples."""
    hidden = draw(st.integers(1, 4))
    d_ff = [draw(st.integers(1, 8)) for _ in PLAN.ffn]
    n = draw(st.integers(1, 5))
    g = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-3, 3))  # delta magnitude relative to the O(1) state
    shapes = {"norm": (hidden,), "head": (2, hidden), "frozen": (3,)}
    for (w1, b1, w2), k in zip(PLAN.ffn, d_ff):
        shapes.update({w1: (k, hidden), w2: (hidden, k)} | ({b1: (k,)} if b1 else {}))
    state = {name: g.standard_normal(s).astype(np.float32) for name, s in shapes.items()}
    clients = []
    for _ in range(n):
        dense = {name: (g.standard_normal(s) * scale).astype(np.float32)
                 for name, s in shapes.items() if name != "frozen"}
        if every_row:
            rows = [g.permutation(k) for k in d_ff]  # every row, in a client-specific order
        else:  # any subset (empty included), in any order
            rows = [g.permutation(sorted(draw(st.sets(st.integers(0, k - 1), max_size=k)))).astype(np.int64)
                    for k in d_ff]
        weight = float(draw(st.integers(1, 1000)))
        clients.append((dense, rows, weight))
    return state, clients


def _part(dense, rows):
    """What a client sends: dense tensors whole, each FFN block's rows of w1/b1 and columns of w2 (exchange layout)."""
    part = {name: torch.from_numpy(dense[name]) for name in PLAN.dense}
    for i, ((w1, b1, w2), idx) in enumerate(zip(PLAN.ffn, rows)):
        part[f"ffn.{i}.rows"] = torch.tensor(idx, dtype=torch.int32)
        part[f"ffn.{i}.w1"] = torch.from_numpy(dense[w1][idx])
        if b1:
            part[f"ffn.{i}.b1"] = torch.from_numpy(dense[b1][idx])
        part[f"ffn.{i}.w2"] = torch.from_numpy(dense[w2][:, idx])
    return part


def _merge(state, clients, order=None, **kw):
    torch_state = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    order = range(len(clients)) if order is None else order
    touched = exchange.merge_deltas(torch_state, [(_part(clients[c][0], clients[c][1]), clients[c][2])
                                                  for c in order], PLAN, **kw)
    return {k: v.numpy() for k, v in torch_state.items()}, touched


def _sent_masks(name, state, clients):
    """Per client, a boolean array shaped like `name`: True where that client sent the coordinate."""
    masks = []
    for _, rows, _ in clients:
        m = np.zeros(state[name].shape, dtype=bool)
        for i, (w1, b1, w2) in enumerate(PLAN.ffn):
            if name in (w1, b1):
                m[rows[i]] = True
            elif name == w2:
                m[:, rows[i]] = True
        masks.append(np.ones_like(m) if name in PLAN.dense else m)
    return masks


def _tol(state, clients, server_lr):
    """Absolute tolerance for a float32 merge against a float64 reference: each merged coordinate is a mean (or
    order statistic) of at most n float32 deltas added to the state. Summing n terms in float32 costs at most n-1
    roundings of the largest magnitude involved, the divide, the server-lr scale and the add into the state one
    each, so (n + 3) unit roundoffs of (|state| + server_lr |delta|) bound the error; x2 for slack."""
    big = max(np.abs(v).max() for v in state.values())
    big_delta = max(np.abs(v).max() for dense, _, _ in clients for v in dense.values())
    return 2 * (len(clients) + 3) * U32 * (big + server_lr * big_delta)


AGGREGATORS = st.sampled_from(exchange.AGGREGATORS)
SERVER_LR = st.sampled_from([1.0, 0.5, 2.0])
# Binary-exact fractions, and the 0.1 default: floor(trim * k) is the same in float32 and float64.
TRIM = st.sampled_from([0.0, 0.1, 0.25, 0.375])


@settings(max_examples=30, **SETTINGS)
@given(case=merge_cases(), aggregator=AGGREGATORS, trim=TRIM, data=st.data())
def test_merge_is_invariant_to_client_order(case, aggregator, trim, data):
    state, clients = case
    order = data.draw(st.permutations(range(len(clients))))
    first, touched = _merge(state, clients, aggregator=aggregator, trim=trim)
    again, touched_again = _merge(state, clients, order, aggregator=aggregator, trim=trim)
    assert touched == touched_again
    for name in state:
        if aggregator == "mean":  # float32 sums of the dense tensors depend on their order: tolerance as in _tol
            np.testing.assert_allclose(again[name], first[name], rtol=0, atol=_tol(state, clients, 1.0), err_msg=name)
        else:  # median / trimmed mean sort the values first: the order cannot matter at all
            assert np.array_equal(again[name], first[name]), name


@settings(max_examples=40, **SETTINGS)
@given(case=merge_cases(), aggregator=AGGREGATORS, server_lr=SERVER_LR)
def test_rows_nobody_sent_stay_bit_identical(case, aggregator, server_lr):
    state, clients = case
    merged, touched = _merge(state, clients, aggregator=aggregator, server_lr=server_lr)
    assert np.array_equal(merged["frozen"], state["frozen"])  # outside the plan
    for i, (w1, b1, w2) in enumerate(PLAN.ffn):
        union = set().union(*(set(rows[i].tolist()) for _, rows, _ in clients))
        unsent = [r for r in range(state[w1].shape[0]) if r not in union]
        assert touched[i] == len(union)
        assert np.array_equal(merged[w1][unsent], state[w1][unsent]), w1
        assert np.array_equal(merged[w2][:, unsent], state[w2][:, unsent]), w2
        if b1:
            assert np.array_equal(merged[b1][unsent], state[b1][unsent]), b1


@settings(max_examples=40, **SETTINGS)
@given(case=merge_cases(), server_lr=SERVER_LR)
def test_mean_averages_each_coordinate_over_the_clients_that_sent_it(case, server_lr):
    # Local masks: a row's update is the example-weighted mean over its senders only (not over all replies).
    state, clients = case
    merged, _ = _merge(state, clients, server_lr=server_lr)
    for name in PLAN.dense + tuple(FFN_TENSORS):
        masks = _sent_masks(name, state, clients)
        num = sum(m * w * dense[name].astype(np.float64) for m, (dense, _, w) in zip(masks, clients))
        den = sum(m * w for m, (_, _, w) in zip(masks, clients))
        update = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        expected = state[name].astype(np.float64) + server_lr * update
        np.testing.assert_allclose(merged[name], expected, rtol=0, atol=_tol(state, clients, server_lr), err_msg=name)


@settings(max_examples=25, **SETTINGS)
@given(case=merge_cases(every_row=True), server_lr=SERVER_LR)
def test_mean_equals_dense_fedavg_when_every_client_sends_everything(case, server_lr):
    # Plain FedAvg on whole tensors, whatever order each client lists its rows in.
    state, clients = case
    merged, touched = _merge(state, clients, server_lr=server_lr)
    total = sum(w for _, _, w in clients)
    for name in PLAN.dense + tuple(FFN_TENSORS):
        avg = sum(w * dense[name].astype(np.float64) for dense, _, w in clients) / total
        np.testing.assert_allclose(merged[name], state[name] + server_lr * avg, rtol=0,
                                   atol=_tol(state, clients, server_lr), err_msg=name)
    assert touched == {i: state[w1].shape[0] for i, (w1, _, _) in enumerate(PLAN.ffn)}
    assert np.array_equal(merged["frozen"], state["frozen"])


@settings(max_examples=30, **SETTINGS)
@given(case=merge_cases(), aggregator=st.sampled_from(["median", "trimmed-mean"]), trim=TRIM, server_lr=SERVER_LR)
def test_robust_aggregators_match_numpy_and_scipy_over_each_coordinates_senders(case, aggregator, trim, server_lr):
    # Unweighted, coordinate-wise, over the clients that sent the coordinate: np.median / scipy's trim_mean (which
    # cuts int(trim * k) values at each end, as documented for merge_deltas).
    state, clients = case
    merged, _ = _merge(state, clients, aggregator=aggregator, trim=trim, server_lr=server_lr)
    for name in PLAN.dense + tuple(FFN_TENSORS):
        masks = _sent_masks(name, state, clients)
        expected = state[name].astype(np.float64)
        for pos in np.ndindex(state[name].shape):
            values = [dense[name][pos] for m, (dense, _, _) in zip(masks, clients) if m[pos]]
            if values:
                stat = np.median(values) if aggregator == "median" else trim_mean(values, trim)
                expected[pos] += server_lr * stat
        np.testing.assert_allclose(merged[name], expected, rtol=0, atol=_tol(state, clients, server_lr), err_msg=name)


# ----------------------------------------------------------------------------------------------- codecs

SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)


@settings(max_examples=60, **SETTINGS)
@given(arrays=st.lists(hnp.arrays(np.float32, SHAPES, elements=st.floats(width=32)), min_size=1, max_size=3))
def test_float32_round_trip_is_bit_exact(arrays):
    # Any float32 at all (NaN payloads, +-inf, -0.0, subnormals) comes back with the same bits and shape.
    tensors = {f"t{i}": torch.from_numpy(a.copy()) for i, a in enumerate(arrays)}
    out = decode(encode(tensors, "float32"))
    assert list(out) == list(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == torch.float32 and out[name].shape == t.shape
        assert torch.equal(out[name].view(torch.int32), t.view(torch.int32)), name


@st.composite
def float_tensors(draw, min_exp, max_exp):
    """A float32 tensor of random shape and magnitude 10^e; some rows all zero, and rows scaled apart by up to
    10^+-3 from each other (so a per-tensor instead of per-row int8 scale would break the bound)."""
    shape = draw(SHAPES)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** draw(st.integers(min_exp, max_exp))
    if t.dim() >= 2 and t.shape[0]:
        t *= (10.0 ** torch.randint(-3, 4, (t.shape[0],), generator=g)).view(-1, *[1] * (t.dim() - 1))
        zero = draw(st.sets(st.integers(0, t.shape[0] - 1)))
        t[sorted(zero)] = 0.0
    elif draw(st.booleans()):
        t.zero_()
    return t.float()


# Round to nearest: the error is at most half a unit in the last place. With p significand bits that is 2^-p |x|
# for normal numbers and half the smallest subnormal below the normal range.
HALF = {"float16": (2.0**-11, 2.0**-25), "bfloat16": (2.0**-8, 2.0**-134)}
FP16_MAX = 65504.0


@settings(max_examples=60, **SETTINGS)
@given(codec=st.sampled_from(list(HALF)), data=st.data())
def test_half_precision_codecs_round_to_nearest(codec, data):
    # float16 magnitudes up to 10^5 (past its range), bfloat16 up to 10^30 (float32's exponent range).
    t = data.draw(float_tensors(-9, 5) if codec == "float16" else float_tensors(-30, 30))
    out = decode(encode({"t": t}, codec))["t"]
    assert out.dtype == torch.float32 and out.shape == t.shape
    x, y = t.double(), out.double()
    rel, floor = HALF[codec]
    finite = x.abs() <= FP16_MAX if codec == "float16" else torch.ones_like(x, dtype=torch.bool)
    assert torch.all((y - x).abs()[finite] <= torch.maximum(rel * x.abs(), torch.tensor(floor))[finite])
    assert torch.equal(y[x == 0], x[x == 0])  # zeros (and zero rows) stay exactly zero
    # Documented: float16 overflows to inf past +-65504 (round to nearest: from 65520 on), it does not clamp.
    if codec == "float16":
        over = x.abs() >= 65520.0
        assert torch.all(y[over].isinf()) and torch.equal(y[over].sign(), x[over].sign())


def _rows(t):
    """(rows, cols) view as codecs documents: first dim = rows; 0-D and 1-D tensors are one row."""
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], math.prod(t.shape[1:]))


@settings(max_examples=60, **SETTINGS)
@given(t=float_tensors(-25, 25))
def test_int8_error_within_half_a_step_per_row(t):
    # Documented: scale = max|row| / 127, q = round(x / scale), so |error| <= scale / 2 = max|row| / 254. The float32
    # arithmetic (the scale, x / scale, q * scale) adds at most ~2 roundings of max|row|: slack 4 u max|row|.
    out = decode(encode({"t": t}, "int8"))["t"]
    assert out.dtype == torch.float32 and out.shape == t.shape
    if not t.numel():
        return
    x, y = _rows(t).double(), _rows(out).double()
    amax = x.abs().amax(dim=1, keepdim=True)
    assert torch.all((y - x).abs() <= amax / 254 + 4 * U32 * amax)
    assert torch.equal(y[amax.squeeze(1) == 0], x[amax.squeeze(1) == 0])  # all-zero rows decode to exact zeros
    # The largest element of each row is +-127 steps exactly: only float32 rounding separates it from the input.
    top = x.abs().argmax(dim=1, keepdim=True)
    assert torch.all((y.gather(1, top) - x.gather(1, top)).abs() <= 4 * U32 * amax)


# ----------------------------------------------------------------------------------------------- partitioners

SIZE_FN = {"linear": lambda i: i, "square": lambda i: i**2, "exponential": math.exp}  # flwr-datasets' size weights


@st.composite
def partition_cases(draw):
    """A small in-memory dataset (class ids or STS-B-like float scores) and a partitioning that flwr can satisfy."""
    scheme = draw(st.sampled_from(D.PARTITION_SCHEMES))
    n_parts = draw(st.integers(1, 5))
    kw = {"seed": draw(st.integers(0, 2**31 - 1))}
    if scheme == "iid":
        min_n = n_parts
    elif scheme == "dirichlet":
        kw["alpha"] = draw(st.sampled_from([0.5, 1.0, 10.0]))
        min_n = 10 * n_parts  # ample for min_partition_size=2 within flwr's 10 Dirichlet draws
    elif scheme == "shard":
        kw["shards_per_partition"] = draw(st.integers(1, 3))
        min_n = n_parts * kw["shards_per_partition"]
    else:
        kw["quantity_skew"] = skew = draw(st.sampled_from(sorted(SIZE_FN)))
        weights = [SIZE_FN[skew](i) for i in range(1, n_parts + 1)]
        min_n = math.ceil(sum(weights) / weights[0]) + 1  # the smallest partition gets >= 1 example
    n = draw(st.integers(min_n, min_n + 40))
    g = np.random.default_rng(kw["seed"] + 1)
    if draw(st.booleans()):
        labels = g.integers(0, draw(st.integers(1, 4)), n).tolist()
    else:
        labels = np.round(g.uniform(0, 5, n), 2).tolist()  # float scores: label schemes bin them
    ds = Dataset.from_dict({"sentence": [f"s{i}" for i in range(n)], "label": labels, "idx": list(range(n))})
    return ds, scheme, n_parts, kw


@settings(max_examples=25, **SETTINGS)
@given(case=partition_cases(), data=st.data())
def test_partitions_cover_every_example_once_and_repeat_for_the_same_seed(case, data):
    ds, scheme, n_parts, kw = case
    n = len(ds)
    parts = [D.load_partition(ds, pid, n_parts, scheme, **kw) for pid in range(n_parts)]
    idx = [list(p["idx"]) for p in parts]
    flat = [i for p in idx for i in p]
    assert len(flat) == len(set(flat))  # no example in two partitions (each call recomputes the split)
    if scheme == "shard":  # equal shards of n // (N s) examples: the remainder (< N s examples) is dropped
        shard = n // (n_parts * kw["shards_per_partition"])
        assert [len(p) for p in idx] == [kw["shards_per_partition"] * shard] * n_parts
    else:
        assert sorted(flat) == list(range(n))  # every example somewhere
    if scheme == "iid":
        assert [len(p) for p in idx] == [n // n_parts + (pid < n % n_parts) for pid in range(n_parts)]
    if scheme == "quantity":
        assert [len(p) for p in idx] == sorted(len(p) for p in idx)  # size grows with the partition id
    labels = ds["label"]
    for p, ids in zip(parts, idx):
        assert p.column_names == ds.column_names  # the temporary label-bin column is gone
        assert list(p["label"]) == [labels[i] for i in ids]  # rows arrive whole, labels with their examples
    pid = data.draw(st.integers(0, n_parts - 1))
    assert list(D.load_partition(ds, pid, n_parts, scheme, **kw)["idx"]) == idx[pid]  # same seed, same split
