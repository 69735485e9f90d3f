"""The strategy's ledger and aggregation, with real Flower messages (no Ray needed)."""
import torch
from conftest import tiny_model
from flwr.app import Error, Message, MetricRecord, RecordDict
from test_deltas import array_record_bytes, message_bytes, metric_record_bytes, packed_record_bytes, record_dict_bytes

from fedfar.federation import exchange
from fedfar.federation.config import RunConfig
from fedfar.federation.codecs import encode
from fedfar.federation.results import RunFolder
from fedfar.federation.strategy import FedFar, error_reason, union_seconds


def _strategy(tmp_path, method="far25-emb"):
    model = tiny_model()
    s = FedFar(RunConfig(method=method, model="random:bert-tiny"), model, RunFolder(tmp_path), lambda: {"mcc": 0.0})
    s.rows = [torch.arange(16), torch.arange(16, 32)]
    return s


def _reply(msg, delta, partition_id, examples=10.0):
    content = RecordDict({"delta": encode(delta, "float32"),
                          "metrics": MetricRecord({"num-examples": examples, "partition-id": partition_id})})
    return Message(content, reply_to=msg)


def test_ledger_bytes_are_the_serialized_sizes(tmp_path, task_identity):
    s = _strategy(tmp_path)
    msg = s._messages([7], RecordDict({"part": s._down_part()}), "train")[0]
    part = exchange.select(s.state, s.plan, s.rows)
    delta = {k: torch.zeros_like(v) for k, v in part.items() if not k.endswith(".rows")}
    reply = _reply(msg, delta, 0)
    entry = s._ledger_entry(1, "train", msg, reply)
    # Payload: 4 bytes an element, float32 weights and (down only) the int32 row indices of the 2 x 16 learners.
    n_weights = sum(v.numel() for v in delta.values())
    assert entry["payload_down"] == 4 * (n_weights + 32) and entry["payload_up"] == 4 * n_weights
    # Whole messages, metadata and framing included, counted by hand from the tensors (see tests/test_deltas.py).
    # The server packs what it sends (one array); this reply is not packed, and is accepted as well.
    down = record_dict_bytes({"part": (2, packed_record_bytes(part))})
    up = record_dict_bytes({"delta": (2, array_record_bytes(delta)),
                            "metrics": (3, metric_record_bytes({"num-examples": 10.0, "partition-id": 0}))})
    assert entry["bytes_down"] == message_bytes(msg.metadata, down)
    assert entry["bytes_up"] == message_bytes(reply.metadata, up)
    assert entry["status"] == "ok" and entry["partition_id"] == 0
    lost = s._ledger_entry(1, "train", msg, None)
    assert lost["status"] == "lost" and lost["bytes_up"] == 0


def _round(tmp_path):
    """A strategy, a copy of its global state, one train message, and a maker of deltas filled with a value."""
    s = _strategy(tmp_path)
    before = {k: v.clone() for k, v in s.state.items()}
    msg = s._messages([1], RecordDict({"part": s._down_part()}), "train")[0]
    part = exchange.select(s.state, s.plan, s.rows)
    return s, before, msg, lambda x: {k: torch.full_like(v, x) for k, v in part.items() if not k.endswith(".rows")}


def test_aggregate_train_merges_into_the_global_model_and_skips_failures(tmp_path, task_identity):
    s, before, msg, filled = _round(tmp_path)
    ones, threes = filled(1.0), filled(3.0)
    failed = Message(Error(code=1, reason="out of memory"), reply_to=msg)  # a client that crashed
    s.aggregate_train(1, [_reply(msg, ones, 0, 1.0), failed, _reply(msg, threes, 1, 3.0)])
    w1 = s.plan.ffn[0][0]
    # Rows 0..15 of block 0: (1*1 + 3*3) / 4 = 2.5 added; the other rows and every frozen tensor untouched.
    torch.testing.assert_close(s.state[w1][:16], before[w1][:16] + 2.5)
    assert torch.equal(s.state[w1][16:], before[w1][16:])
    assert torch.equal(s.state["bert.embeddings.word_embeddings.weight"], before["bert.embeddings.word_embeddings.weight"])
    torch.testing.assert_close(s.state["classifier.weight"], before["classifier.weight"] + 2.5)


def test_union_of_busy_intervals():
    assert union_seconds([(0, 2), (1, 3), (5, 6)]) == 4
    assert union_seconds([]) == 0


def _bad_replies(s, msg):
    """One reply per way a client can send garbage."""
    part = exchange.select(s.state, s.plan, s.rows)
    good = {k: torch.ones_like(v) for k, v in part.items() if not k.endswith(".rows")}
    w1 = s.plan.ffn[0][0]
    nan = {**good, "classifier.weight": torch.full_like(good["classifier.weight"], float("nan"))}
    inf = {**good, "ffn.0.w1": torch.full_like(good["ffn.0.w1"], float("inf"))}
    shape = {**good, "classifier.weight": torch.ones(1)}  # would broadcast silently
    small = {**good, "ffn.1.w2": torch.ones(3, 3)}
    rows1 = {"ffn.1.rows": s.rows[1].to(torch.int32)}
    off_mask = {**good, **rows1, "ffn.0.rows": torch.arange(16, 32, dtype=torch.int32)}  # rows not sent to it
    negative = {**good, **rows1, "ffn.0.rows": torch.tensor([-1, *range(1, 16)], dtype=torch.int32)}
    missing = {k: v for k, v in good.items() if k != "ffn.0.w2"}
    assert w1 in s.state
    replies = [_reply(msg, d, i) for i, d in enumerate((nan, inf, shape, small, off_mask, negative, missing))]
    replies.append(_reply(msg, good, 7, examples=0.0))            # would divide by zero
    replies.append(_reply(msg, good, 8, examples=float("nan")))
    replies.append(Message(RecordDict({"metrics": MetricRecord({"num-examples": 1.0, "partition-id": 9})}),
                           reply_to=msg))                           # no delta at all
    return replies


def test_no_reply_a_client_can_send_reaches_the_global_model(tmp_path, task_identity):
    s, before, msg, _ = _round(tmp_path)
    replies = _bad_replies(s, msg)
    accepted, rejected = s._accept(replies)
    assert accepted == [] and sorted(rejected) == list(range(len(replies)))
    assert "non-finite" in rejected[0] and "shape" in rejected[2] and "mask" in rejected[4]
    assert "outside" in rejected[5] and "missing" in rejected[6] and "num-examples" in rejected[7]
    s.aggregate_train(1, replies)
    for k, v in before.items():  # with no valid reply the global model stays bit-identical
        assert torch.equal(s.state[k], v), k


def test_bad_replies_are_left_out_and_good_ones_still_merge(tmp_path, task_identity):
    s, before, msg, filled = _round(tmp_path)
    s.aggregate_train(1, [*_bad_replies(s, msg), _reply(msg, filled(1.0), 11, 2.0)])
    torch.testing.assert_close(s.state["classifier.weight"], before["classifier.weight"] + 1.0)
    assert torch.isfinite(s.state["classifier.weight"]).all()


def test_update_norm_bound_rejects_a_scaled_update(tmp_path, task_identity):
    s, _, msg, filled = _round(tmp_path)
    s.cfg = RunConfig(method="far25-emb", model="random:bert-tiny", max_update_norm=100.0)
    small, big = filled(1e-3), filled(1.0)
    accepted, rejected = s._accept([_reply(msg, small, 0), _reply(msg, big, 1)])
    assert len(accepted) == 1 and list(rejected) == [1] and "max-update-norm" in rejected[1]


def test_median_aggregation_in_the_strategy_resists_a_scaled_client(tmp_path, task_identity):
    s, before, msg, filled = _round(tmp_path)
    s.cfg = RunConfig(method="far25-emb", model="random:bert-tiny", aggregator="median")
    deltas = [filled(1.0), filled(2.0), filled(3.0), filled(1000.0)]  # three honest clients, one scaled 1000x
    s.aggregate_train(1, [_reply(msg, d, i) for i, d in enumerate(deltas)])
    torch.testing.assert_close(s.state["classifier.weight"], before["classifier.weight"] + 2.5)  # median


def test_error_reason_keeps_what_the_client_raised_not_rays_wrapping():
    ray_text = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
                "(pid=1, ip=127.0.0.1)\n        ^^^^^^^^\nException ClientAppException occurred. Message: disk full'>")
    assert error_reason(ray_text) == "ClientApp raised: disk full"
    assert error_reason("Traceback:\n  File x\nValueError: bad rows\n") == "ValueError: bad rows"
    assert len(error_reason("x" * 1000)) == 300


def test_federated_evaluation_averages_the_metrics_every_reply_has_weighted_by_examples(tmp_path, task_identity):
    """A reply may carry more than the others (the first message of a process adds its cold start): the mean is
    over the metrics every valid reply has, weighted by examples, and timings are never averaged as metrics."""
    s = _strategy(tmp_path)
    msg = s._messages([1], RecordDict({"part": s._down_part()}), "evaluate")[0]

    def reply(metrics):
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    base = {"eval-start": 1.0, "eval-end": 2.0, "partition-id": 0}
    out = s.aggregate_evaluate(1, [
        reply({**base, "num-examples": 10, "mcc": 0.5, "accuracy": 0.75, "cold-start-s": 12.0, "import-s": 8.0}),
        reply({**base, "num-examples": 30, "mcc": 0.1, "accuracy": 0.25}),
        reply({**base, "num-examples": 5, "mcc": float("nan"), "accuracy": 1.0}),  # not finite: skipped
    ])
    assert dict(out) == {"mcc": (10 * 0.5 + 30 * 0.1) / 40, "accuracy": (10 * 0.75 + 30 * 0.25) / 40}
    assert s.aggregate_evaluate(1, []) is None
