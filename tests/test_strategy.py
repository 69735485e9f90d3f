"""The strategy's ledger and aggregation, with real Flower messages (no Ray needed)."""
import pytest
import torch
from conftest import tiny_model
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.common.serde import message_to_proto

from fedfar.federation import exchange
from fedfar.federation.config import RunConfig
from fedfar.federation.codecs import encode
from fedfar.federation.results import RunFolder
from fedfar.federation.strategy import FedFar, union_seconds


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
    delta = {k: torch.zeros_like(v) for k, v in exchange.select(s.state, s.plan, s.rows).items()
             if not k.endswith(".rows")}
    reply = _reply(msg, delta, 0)
    entry = s._ledger_entry(1, "train", msg, reply)
    assert entry["bytes_down"] == len(message_to_proto(msg).SerializeToString())
    assert entry["bytes_up"] == len(message_to_proto(reply).SerializeToString())
    assert entry["status"] == "ok" and entry["partition_id"] == 0
    lost = s._ledger_entry(1, "train", msg, None)
    assert lost["status"] == "lost" and lost["bytes_up"] == 0


def test_aggregate_train_merges_into_the_global_model_and_skips_failures(tmp_path, task_identity):
    s = _strategy(tmp_path)
    before = {k: v.clone() for k, v in s.state.items()}
    msg = s._messages([1], RecordDict({"part": s._down_part()}), "train")[0]
    part = exchange.select(s.state, s.plan, s.rows)
    ones = {k: torch.ones_like(v) for k, v in part.items() if not k.endswith(".rows")}
    threes = {k: 3 * torch.ones_like(v) for k, v in part.items() if not k.endswith(".rows")}
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
