"""The server's side of priming, masks, merging and the round clock, driven in-process (no Ray).

The real FedFar strategy talks to a stand-in Grid: only the transport is replaced. Every message crosses it as
Flower's protobuf (as it would over gRPC), and the replies are either the real client Job's (fedfar.federation
.client) or real Messages built with the codecs, where a test needs scores or deltas it knows by heart.
"""
import functools
import json

import pytest
import torch
from conftest import ListLoader, tiny_batch, tiny_model
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from test_strategy import _reply, _round

from fedfar.devices.budget import TrainingShape, peak_bytes
from fedfar.devices.device import Device, device_plan
from fedfar.devices.profiles import DeviceProfile
from fedfar.federation.client import Job
from fedfar.federation.codecs import decode, encode
from fedfar.federation.config import RunConfig
from fedfar.federation.results import RunFolder, read_jsonl
from fedfar.federation.strategy import FedFar

D_FF = 64  # tiny_model: 2 FFN blocks of 64 nodes; far25 keeps round(0.25 * 64) = 16 per block


def _wire(msg):
    """A message as the other side receives it: through Flower's protobuf, metadata and all."""
    return message_from_proto(message_to_proto(msg))


class _Grid:
    """The transport only: node id -> handler(message) -> reply. Answers everything at once, so the strategy's
    poll loop never sleeps. Message ids are set as Flower's grids set them, when a message is pushed."""

    def __init__(self, handlers):
        self.handlers, self.pushed, self.replies, self.answered = handlers, [], [], {}

    def get_node_ids(self):
        return list(self.handlers)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{len(self.pushed)}"
            self.pushed.append(m)
            ids.append(m.metadata.message_id)
            reply = _wire(self.handlers[m.metadata.dst_node_id](_wire(m)))
            self.replies.append(reply)
            self.answered[m.metadata.dst_node_id] = reply
        return ids

    def pull_messages(self, ids):
        out = [r for r in self.replies if r.metadata.reply_to_message_id in ids]
        self.replies = [r for r in self.replies if r not in out]
        return out


def _cfg(**kw):
    return RunConfig(**{"method": "far25-emb", "model": "random:bert-tiny", "batch_size": 4, "max_length": 16,
                        "lr": 1e-3, **kw})


def _server(tmp_path, **kw):
    return FedFar(_cfg(**kw), tiny_model(), RunFolder(tmp_path), lambda: {"mcc": 0.0})


@functools.lru_cache
def _plan(cfg, profile):
    """A device's budget plan: accounted once per (run, device), as a worker's cache does."""
    return device_plan(cfg, tiny_model(), profile)


def _job(cfg, pid, examples, profile=None):
    """The real client Job of partition `pid` on a pristine tiny model, with `examples` examples (one batch of
    4 sequences: each round is a single step), on a simulated device when `profile` is given."""
    loader = ListLoader([tiny_batch(4, seed=pid)])
    loader.dataset = range(examples)
    plan = _plan(cfg, profile) if profile else None
    return Job(cfg, pid, cfg.seed + 7919 * pid, tiny_model(), loader, None, Device(torch.device("cpu"), plan))


def _prime(job):
    return lambda msg: Message(job.prime(), reply_to=msg)


def _train(job, state):
    return lambda msg: Message(job.train(msg.content["part"], state), reply_to=msg)


@functools.lru_cache
def _small_device(retention):
    """A device whose budget is exactly the peak of far25 training at micro-batch 1 and `retention`: priming
    (every FFN node trains) never fits it; training fits at micro-batch 1 only after lowering the retention."""
    peak = peak_bytes(tiny_model, "far25-emb", TrainingShape(4, 16, 1, retention)).peak_training_bytes
    return DeviceProfile("small", peak, 1e9, 1e6, 1e6, 1.0)


def _scores_reply(msg, scores, examples, pid):
    content = RecordDict({
        "scores": encode({f"scores.{i}": s for i, s in enumerate(scores)}, "float32"),
        "metrics": MetricRecord({"num-examples": float(examples), "partition-id": pid,
                                 "prime-start": 0.0, "prime-end": 1.0})})
    return Message(content, reply_to=msg)


def _ledger(tmp_path, phase):
    rows = read_jsonl(tmp_path / "ledger.jsonl")
    return rows[rows.phase == phase].sort_values("node_id").to_dict("records")


# ----------------------------------------------------------------------------------------- priming
def _block(pairs):
    """A block's scores: 0 except value v on rows range(a, b) for each (a, b, v)."""
    s = torch.zeros(D_FF)
    for a, b, v in pairs:
        s[a:b] = v
    return s


def test_priming_scores_are_averaged_by_examples_and_pick_the_mask(tmp_path, task_identity):
    # Partition 0 has 30 examples, partition 1 has 10: weights 3/4 and 1/4. Per block, the rows each scores:
    #   block 0: p0 rows 0..5 at 1.0 (mean 0.75); p1 rows 20..29 at 3.6 (0.9) and rows 10..19 at 2.0 (0.5)
    #   block 1: p0 rows 50..59 at 1.0 (0.75); p1 rows 30..35 at 2.8 (0.7) and rows 40..49 at 2.0 (0.5)
    # The top 16 of the weighted mean take rows from both partitions. An unweighted mean would rank p1's rows
    # 10..19 / 40..49 (1.0) over p0's (0.5); taking the larger partition's scores alone would miss p1's rows.
    heavy = [_block([(0, 6, 1.0)]), _block([(50, 60, 1.0)])]
    light = [_block([(20, 30, 3.6), (10, 20, 2.0)]), _block([(30, 36, 2.8), (40, 50, 2.0)])]
    s = _server(tmp_path)
    grid = _Grid({5: lambda m: _scores_reply(m, light, 10, 1), 9: lambda m: _scores_reply(m, heavy, 30, 0)})
    s.choose_global_mask(grid)
    assert [m.metadata.message_type for m in grid.pushed] == ["train.prime", "train.prime"]
    assert [r.tolist() for r in s.rows] == [[*range(0, 6), *range(20, 30)], [*range(30, 36), *range(50, 60)]]
    assert json.loads((tmp_path / "mask.json").read_text())["learners"] == [r.tolist() for r in s.rows]
    assert [e["status"] for e in _ledger(tmp_path, "prime")] == ["ok", "ok"]


def test_priming_with_no_valid_answer_stops_the_run(tmp_path, task_identity):
    s = _server(tmp_path)
    bad_shape = [torch.ones(D_FF - 1), torch.ones(D_FF)]
    grid = _Grid({
        1: lambda m: Message(Error(code=1, reason="ValueError: disk full"), reply_to=m),  # the client crashed
        2: _prime(_job(s.cfg, 1, 8, _small_device(0.125))),                             # out of memory
        3: lambda m: _scores_reply(m, bad_shape, 8, 2),                                  # garbage
    })
    with pytest.raises(RuntimeError, match="no client answered"):
        s.choose_global_mask(grid)
    # The ledger is written before the run stops, with why each reply did not count.
    entries = _ledger(tmp_path, "prime")
    assert [e["status"] for e in entries] == ["error", "oom", "rejected"]
    assert entries[0]["error"] == "ValueError: disk full" and entries[1]["error"] == "oom-prime"
    assert "scores.0" in entries[2]["error"]


def test_an_out_of_memory_priming_reply_is_recorded_and_left_out_of_the_mean(tmp_path, task_identity):
    s = _server(tmp_path)
    grid = _Grid({1: _prime(_job(s.cfg, 0, 8)), 2: _prime(_job(s.cfg, 1, 8, _small_device(0.125)))})
    s.choose_global_mask(grid)
    ok, oom = _ledger(tmp_path, "prime")
    # The refusal: the device's figures and no scores, recorded as "oom" (not rejected, not ok).
    assert ok["status"] == "ok" and ok["payload_up"] > 0
    assert oom["status"] == "oom" and oom["error"] == "oom-prime" and oom["device"] == "small"
    assert oom["payload_up"] == 0 and oom["fits"] == 0 and oom["num_examples"] == 0
    assert oom["peak_bytes"] > oom["budget_bytes"]
    # The mask is the top 16 of the one device that primed, ranked here by hand.
    scores = decode(grid.answered[1].content["scores"])
    for i in range(2):
        by_hand = sorted(range(D_FF), key=lambda r: -float(scores[f"scores.{i}"][r]))[:16]
        assert s.rows[i].tolist() == sorted(by_hand)


def test_the_random_global_mask_is_seeded_and_needs_no_priming(task_identity, tmp_path):
    def mask(seed):
        s = _server(tmp_path / str(seed), method="random10-emb", seed=seed)
        grid = _Grid({1: lambda m: pytest.fail("random selection must not ask clients anything")})
        s.choose_global_mask(grid)
        assert grid.pushed == []
        return [r.tolist() for r in s.rows]

    a, again, other = mask(0), mask(0), mask(1)
    assert [len(r) for r in a] == [6, 6]  # round(0.10 * 64) = 6 learners per block
    for r in a + other:
        assert r == sorted(set(r)) and 0 <= r[0] and r[-1] < D_FF
    assert a == again and a != other
    assert a[0] != a[1]  # each block has its own draw


# ----------------------------------------------------------------------------------------- merging
def test_local_masks_accumulate_into_the_union_across_rounds(tmp_path, task_identity):
    s = _server(tmp_path, mask_mode="local")
    before = {k: v.clone() for k, v in s.state.items()}
    jobs = {1: (_job(s.cfg, 0, 8), RecordDict()), 2: (_job(s.cfg, 1, 8), RecordDict())}
    deltas, sent_rows = {}, {}
    for rnd, node in ((1, 1), (2, 2)):  # one device per round, each with its own learners
        grid = _Grid({node: _train(*jobs[node])})
        messages, replies = _sent(s, grid, rnd)
        received = decode(_wire(messages[0]).content["part"])
        # Local mode: the server sends the rows anyone has trained so far (none before round 1).
        assert [received[f"ffn.{i}.rows"].tolist() for i in range(2)] == [r.tolist() for r in s.rows]
        deltas[node] = decode(replies[0].content["delta"])
        sent_rows[node] = [set(deltas[node][f"ffn.{i}.rows"].tolist()) for i in range(2)]
        s.aggregate_train(rnd, replies)
    a, b = sent_rows[1], sent_rows[2]
    for i in range(2):
        assert len(a[i]) == len(b[i]) == 16 and a[i] != b[i]  # the two devices chose differently
        assert s.rows[i].tolist() == sorted(a[i] | b[i])       # the union, sorted
    for i, (w1, b1, w2) in enumerate(s.plan.ffn):
        expected = {n: before[n].double().clone() for n in (w1, b1, w2)}
        for node in (1, 2):
            for j, r in enumerate(deltas[node][f"ffn.{i}.rows"].tolist()):
                expected[w1][r] += deltas[node][f"ffn.{i}.w1"][j].double()
                expected[b1][r] += deltas[node][f"ffn.{i}.b1"][j].double()
                expected[w2][:, r] += deltas[node][f"ffn.{i}.w2"][:, j].double()
        for n in (w1, b1, w2):
            torch.testing.assert_close(s.state[n].double(), expected[n], rtol=1e-6, atol=1e-7)
        never = sorted(set(range(D_FF)) - a[i] - b[i])
        assert torch.equal(s.state[w1][never], before[w1][never])  # rows nobody chose: bit-identical
        assert torch.equal(s.state[b1][never], before[b1][never])
        assert torch.equal(s.state[w2][:, never], before[w2][:, never])
        changed = sorted(a[i] | b[i])
        assert (s.state[w1][changed] != before[w1][changed]).any(dim=1).all()
    cls = "classifier.weight"
    torch.testing.assert_close(s.state[cls], before[cls] + deltas[1][cls] + deltas[2][cls])
    emb = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(s.state[emb], before[emb])


def test_a_device_that_lowered_its_retention_trains_and_sends_a_subset_the_server_merges(tmp_path, task_identity):
    s = _server(tmp_path)
    s.rows = [torch.arange(0, D_FF, 4), torch.arange(1, D_FF, 4)]  # the server's mask: 16 scattered rows a block
    mask = [set(r.tolist()) for r in s.rows]
    before = {k: v.clone() for k, v in s.state.items()}
    small = _job(s.cfg, 1, 1, _small_device(0.125))
    grid = _Grid({1: _train(_job(s.cfg, 0, 3), RecordDict()), 2: _train(small, RecordDict())})
    _, replies = _sent(s, grid)
    full, part = (decode(r.content["delta"]) for r in replies)
    device = dict(replies[1].content["device"])
    assert device["retention"] == 0.125 and "retention 0.25 -> 0.125" in device["adapted"]
    assert device["micro-batch"] == 1 and device["status"] == "ok"
    # The roomy device sends the whole mask without row indices (the server knows them); the small one sends
    # round(0.125 * 64) = 8 of the server's rows per block, and names them.
    assert not any(k.endswith(".rows") for k in full)
    sub = [part[f"ffn.{i}.rows"].tolist() for i in range(2)]
    assert [len(r) for r in sub] == [8, 8] and all(set(r) <= mask[i] for i, r in enumerate(sub))
    s.aggregate_train(1, replies)
    # By hand: rows both sent are the example-weighted mean (3 and 1 examples); rows only the roomy device sent
    # take its delta whole (not diluted by the device that did not train them); the rest stay bit-identical.
    for i, (w1, _, w2) in enumerate(s.plan.ffn):
        for j, r in enumerate(s.rows[i].tolist()):
            d_full = full[f"ffn.{i}.w1"][j].double()
            if r in sub[i]:
                d = (3 * d_full + part[f"ffn.{i}.w1"][sub[i].index(r)].double()) / 4
            else:
                d = d_full
            torch.testing.assert_close(s.state[w1][r].double(), before[w1][r].double() + d, rtol=1e-6, atol=1e-7)
        outside = sorted(set(range(D_FF)) - mask[i])
        assert torch.equal(s.state[w1][outside], before[w1][outside])
        assert torch.equal(s.state[w2][:, outside], before[w2][:, outside])
    cls = "classifier.weight"
    torch.testing.assert_close(s.state[cls].double(), before[cls].double() + (3 * full[cls].double()
                               + part[cls].double()) / 4, rtol=1e-6, atol=1e-7)


def _sent(s, grid, rnd=1):
    """The strategy's own messages for one train round, and the replies to them."""
    messages = list(s.configure_train(rnd, None, {}, grid))
    return messages, grid.pull_messages(grid.push_messages(messages))


@pytest.mark.parametrize("server_lr", [0.5, 2.0])
def test_server_lr_scales_the_mean_delta(tmp_path, task_identity, server_lr):
    s, before, msg, filled = _round(tmp_path)
    s.cfg = RunConfig(method="far25-emb", model="random:bert-tiny", server_lr=server_lr)
    s.server_opt = s.cfg.server_optimizer()
    gen = torch.Generator().manual_seed(3)
    d1, d2 = ({k: torch.randn(v.shape, generator=gen) for k, v in filled(0.0).items()} for _ in range(2))
    s.aggregate_train(1, [_reply(msg, d1, 0, 1.0), _reply(msg, d2, 1, 3.0)])
    change = {k: server_lr * (d1[k].double() + 3 * d2[k].double()) / 4 for k in d1}  # lr x example-weighted mean
    for k in ("classifier.weight", "classifier.bias", "bert.pooler.dense.weight"):
        torch.testing.assert_close(s.state[k].double(), before[k].double() + change[k], rtol=1e-6, atol=1e-6)
    for i, (w1, b1, w2) in enumerate(s.plan.ffn):
        rows = s.rows[i]
        torch.testing.assert_close(s.state[w1][rows].double(), before[w1][rows].double() + change[f"ffn.{i}.w1"],
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.state[w2][:, rows].double(),
                                   before[w2][:, rows].double() + change[f"ffn.{i}.w2"], rtol=1e-6, atol=1e-6)
        assert torch.equal(s.state[w1][32:], before[w1][32:])  # outside both blocks' masks


def test_the_strategy_keeps_server_momentum_across_rounds_on_the_rows_it_sent(tmp_path, task_identity):
    s, before, msg, filled = _round(tmp_path)
    s.cfg = RunConfig(method="far25-emb", model="random:bert-tiny", server_opt="fedavgm", server_lr=0.5,
                      server_momentum=0.8)
    s.server_opt = s.cfg.server_optimizer()
    s.aggregate_train(1, [_reply(msg, filled(1.0), 0, 1.0), _reply(msg, filled(3.0), 1, 3.0)])  # mean 2.5
    s.aggregate_train(2, [_reply(msg, filled(-1.0), 0, 1.0)])                                   # mean -1
    # m1 = 2.5, x += 0.5 * 2.5; m2 = 0.8 * 2.5 - 1 = 1, x += 0.5 * 1: 1.75 in all
    w1, w2 = s.plan.ffn[0][0], s.plan.ffn[0][2]
    torch.testing.assert_close(s.state[w1][:16], before[w1][:16] + 1.75)
    torch.testing.assert_close(s.state["classifier.bias"], before["classifier.bias"] + 1.75)
    assert torch.equal(s.state[w1][16:], before[w1][16:]) and torch.equal(s.state[w2][:, 16:], before[w2][:, 16:])
    moments = s.server_opt.state_dict()
    assert torch.equal(moments[f"{w1}/m"][16:], torch.zeros_like(moments[f"{w1}/m"][16:]))  # never sent: no state


# ----------------------------------------------------------------------------------------- the clock
def test_the_round_deadline_is_inclusive_and_out_of_memory_is_not_late(tmp_path, task_identity):
    s = _server(tmp_path, oom_policy="fail", deadline_s=3.0)
    s.rows = [torch.arange(16), torch.arange(16, 32)]
    roomy = DeviceProfile("roomy", 1 << 30, 1e9, 1e6, 1e6, 1.0)
    small = _small_device(0.25)  # with oom-policy fail, training refuses outright
    grid = _Grid({1: _train(_job(s.cfg, 0, 8, roomy), RecordDict()),
                  2: _train(_job(s.cfg, 1, 8, roomy), RecordDict()),
                  3: _train(_job(s.cfg, 2, 8, small), RecordDict())})
    messages, replies = _sent(s, grid)
    replies = {r.metadata.src_node_id: r for r in replies}
    entries = [s._ledger_entry(1, "train", m, replies[m.metadata.dst_node_id]) for m in messages]
    assert [e["status"] for e in entries] == ["ok", "ok", "oom"]
    e1, e2, e3 = entries
    # Registered speeds chosen so that each part of a round takes a whole number of simulated seconds:
    # node 1 takes 1 + 1 + 1 = 3 s, exactly the deadline; node 2 uploads at half speed (4 s); node 3 (out of
    # memory, so no compute) downloads at a quarter of the speed: 4 + 0 + 1 = 5 s.
    def prof(e, down=1.0, up=1.0):
        return DeviceProfile("x", 1 << 30, float(e.get("train_flops", 1.0)), e["bytes_up"] / up,
                             e["bytes_down"] / down, 1.0)
    s.profiles = {1: prof(e1), 2: prof(e2, up=2.0), 3: prof(e3, down=4.0)}
    assert s.clock(entries) == 3.0 and s.sim_time == 3.0  # the round ends at the deadline
    assert [e["sim_total_s"] for e in entries] == [3.0, 4.0, 5.0]
    assert [e["status"] for e in entries] == ["ok", "late", "oom"]


def test_a_seeded_priming_cohort_primes_and_the_rest_of_the_fleet_does_not(tmp_path, task_identity):
    scores = [_block([(0, 16, 1.0)]), _block([(0, 16, 1.0)])]
    handlers = {node: (lambda pid: lambda m: _scores_reply(m, scores, 8, pid))(node - 100) for node in range(100, 106)}
    cohorts = []
    for run in ("a", "b"):
        s = _server(tmp_path / run, priming_clients=2)
        s.partition_of = {node: node - 100 for node in handlers}
        before = s.rng.getstate()
        grid = _Grid(handlers)
        s.choose_global_mask(grid)
        assert s.rng.getstate() == before  # the training rounds' sampler is untouched
        primed = sorted(m.metadata.dst_node_id - 100 for m in grid.pushed)
        assert len(primed) == 2 and [e["partition_id"] for e in _ledger(tmp_path / run, "prime")] == primed
        assert json.loads((tmp_path / run / "mask.json").read_text())["primed_partitions"] == primed
        cohorts.append(primed)
    assert cohorts[0] == cohorts[1]  # seeded: the same cohort run after run
    big = _server(tmp_path / "c", priming_clients=6)
    grid = _Grid(handlers)
    big.choose_global_mask(grid)
    assert len(grid.pushed) == 6  # a cohort as large as the fleet: everyone primes


# ----------------------------------------------------------------------------------------- mask refresh
def _node(job, state):
    """A node's handlers as the ClientApp dispatches them, on the real Job (its round is fixed: seeds only)."""
    from fedfar.federation.client import _records

    def handle(msg):
        kind, content = msg.metadata.message_type, msg.content
        if kind == "query.register":
            return Message(_records({"partition-id": job.partition_id}, {}), reply_to=msg)
        if kind == "train.prime":
            return Message(job.prime(content["part"] if "part" in content else None), reply_to=msg)
        learners = content["learners"] if "learners" in content else None
        return Message(job.train(content["part"], state, learners), reply_to=msg)
    return handle


def test_priming_the_pristine_part_scores_as_priming_nothing_and_a_trained_part_scores_otherwise(task_identity):
    from fedfar.federation import exchange

    cfg = _cfg()
    model = tiny_model()
    plan = cfg.spec.exchange_plan(model)
    rows = [torch.arange(0, D_FF, 4)] * 2
    pristine = encode(exchange.select(model.state_dict(), plan, rows), "float32")
    moved = {k: v if k.endswith(".rows") else v + 0.05 for k, v in exchange.select(model.state_dict(), plan,
                                                                                    rows).items()}
    scores = [decode(_job(cfg, 0, 8).prime(part)["scores"]) for part in (None, pristine, encode(moved, "float32"))]
    assert all(torch.equal(scores[0][k], scores[1][k]) for k in scores[0])
    assert not all(torch.equal(scores[0][k], scores[2][k]) for k in scores[0])


def test_a_mask_refresh_reprimes_the_global_model_and_keeps_every_changed_row_travelling(tmp_path, task_identity):
    from fedfar.federation import checkpoint, exchange

    s = _server(tmp_path, reprime_every=1, num_rounds=3)
    pristine = {k: v.clone() for k, v in s.state.items()}
    grid = _Grid({1: _node(_job(s.cfg, 0, 8), RecordDict()), 2: _node(_job(s.cfg, 1, 8), RecordDict())})
    s.run(grid)
    kinds = [m.metadata.message_type for m in grid.pushed]
    assert kinds == ["query.register"] * 2 + ["train.prime"] * 2 + ["train"] * 2 + (["train.prime"] * 2 +
                                                                                    ["train"] * 2) * 2
    msgs = [_wire(m) for m in grid.pushed]
    primes, trains = [m for m in msgs if kinds[msgs.index(m)] == "train.prime"], [m for m in msgs if
                                                                                   kinds[msgs.index(m)] == "train"]
    masks = [json.loads((tmp_path / "mask.json").read_text()) if r == 3 else
             json.loads((tmp_path / f"mask-round{r}.json").read_text()) if r else None for r in (0, 2, 3)]
    masks[0] = [exchange.part_rows(decode(trains[0].content["part"]), s.plan)[i].tolist() for i in range(2)]
    masks[1], masks[2] = masks[1]["learners"], masks[2]["learners"]
    assert masks[2] == [r.tolist() for r in s.rows]
    assert masks[1] != masks[0]  # one round of training moved other nodes most: the refresh changed the mask
    # Round 0 primes the pretrained model (no part); a refresh sends the global model's trainable part with the
    # request: the rows sent so far, valued as the global model is then (as the next training message has them).
    assert "part" not in primes[0].content and "learners" not in trains[0].content
    for prime, train, sent in ((primes[2], trains[2], masks[0]), (primes[4], trains[4], None)):
        p, t = decode(prime.content["part"]), decode(train.content["part"])
        for i in range(2):
            p_rows, t_rows = p[f"ffn.{i}.rows"].tolist(), t[f"ffn.{i}.rows"].tolist()
            if sent is not None:
                assert p_rows == sent[i]
            where = [t_rows.index(r) for r in p_rows]
            assert torch.equal(p[f"ffn.{i}.w1"], t[f"ffn.{i}.w1"][where])
    # After a refresh the part carries every row any mask has held, and the learners record says which learn.
    for train, union, mask in ((trains[2], [masks[0]], masks[1]), (trains[4], masks[:2], masks[2])):
        part, learners = decode(train.content["part"]), decode(train.content["learners"])
        for i in range(2):
            expected = sorted(set(mask[i]).union(*(m[i] for m in union)))
            assert part[f"ffn.{i}.rows"].tolist() == expected and learners[f"ffn.{i}.rows"].tolist() == mask[i]
    # Round 2 trained round 2's mask only: rows that left it kept their round-1 values, the others moved.
    p2, p3 = decode(trains[2].content["part"]), decode(trains[4].content["part"])
    for i in range(2):
        r2, r3 = p2[f"ffn.{i}.rows"].tolist(), p3[f"ffn.{i}.rows"].tolist()
        for r in r2:
            same = torch.equal(p2[f"ffn.{i}.w1"][r2.index(r)], p3[f"ffn.{i}.w1"][r3.index(r)])
            assert same == (r not in masks[1][i]), (i, r)
    # Rows no mask ever held are the pretrained ones, bit for bit.
    for i, (w1, _, _) in enumerate(s.plan.ffn):
        never = [r for r in range(D_FF) if r not in set(masks[0][i]) | set(masks[1][i]) | set(masks[2][i])]
        assert never and torch.equal(s.state[w1][never], pristine[w1][never])
    # Every byte counts: each round's totals include its refresh's priming, requests and scores.
    ledger, rounds = read_jsonl(tmp_path / "ledger.jsonl"), read_jsonl(tmp_path / "rounds.jsonl")
    for rnd in range(4):
        sent = ledger[(ledger["round"] <= rnd) & ledger.phase.isin(["prime", "train"])]
        assert rounds.mb_down[rnd] == pytest.approx(sent.bytes_down.sum() / 1e6, rel=1e-12)
        assert rounds.mb_up[rnd] == pytest.approx(sent.bytes_up.sum() / 1e6, rel=1e-12)
    assert sorted(ledger[ledger.phase == "prime"]["round"]) == [0, 0, 2, 2, 3, 3]
    # A resumed server gets the rows that travel back from its checkpoint.
    again = _server(tmp_path / "again", reprime_every=1, num_rounds=3)
    again.partition_of = dict(s.partition_of)
    again.restore(checkpoint.load(tmp_path))
    assert [r.tolist() for r in again.sent_rows] == [r.tolist() for r in s.sent_rows]
    assert [r.tolist() for r in again.rows] == masks[2]


def test_a_mask_refresh_nobody_answers_keeps_the_mask_and_the_run_going(tmp_path, task_identity):
    s = _server(tmp_path, reprime_every=1)
    heavy = [_block([(0, 16, 1.0)]), _block([(48, 64, 1.0)])]
    s.choose_global_mask(_Grid({1: lambda m: _scores_reply(m, heavy, 8, 0)}))
    mask = [r.tolist() for r in s.rows]
    bad = [torch.ones(D_FF - 1), torch.ones(D_FF)]
    grid = _Grid({1: lambda m: _scores_reply(m, bad, 8, 0)})
    entries = s.choose_global_mask(grid, 3)
    assert [e["status"] for e in entries] == ["rejected"] and entries[0]["round"] == 3
    assert [r.tolist() for r in s.rows] == mask and s.sent_rows is None  # nothing changed, nothing more travels
    assert "learners" not in s._down_content(3)
