"""The indexed get_message_ins (fedfar.federation.linkstate) against Flower 1.41's own, on a real in-memory
LinkState built the way Flower's simulation builds it, with messages pushed through Flower's InMemoryGrid."""
import secrets

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedfar.federation import linkstate


def _federation(num_nodes: int, monkeypatch):
    """A state with `num_nodes` simulated nodes and a grid on one run, as flwr.simulation.run_simulation has."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=secrets.randbits(63))
    run.primary_task_id, run.federation_id = secrets.randbits(63), NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    for key, value in (("_task_id", 1), ("_run_id", run.run_id), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, key, value)  # what Flower's simulation sets for the ServerApp
    nodes = list(vce_api._register_nodes(num_nodes, factory))
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def _push(grid, nodes: list[int], tag: int) -> list[str]:
    content = RecordDict({"config": ConfigRecord({"tag": tag})})
    return list(grid.push_messages([Message(content=content, dst_node_id=n, message_type="query") for n in nodes]))


def _sweeps(state, nodes: list[int], get) -> list[list[tuple[int, int]]]:
    """Deliver like the simulation engine does (every node, limit 1 per sweep) until nothing is left; (node
    position, tag) per delivered message, as node ids are random."""
    out = []
    while True:
        sweep = [(i, int(m.content["config"]["tag"])) for i, n in enumerate(nodes) for m in get(state, n, 1)]
        if not sweep:
            return out
        out.append(sweep)


@pytest.mark.skipif(not linkstate.install(), reason="the index reproduces Flower 1.41's get_message_ins only")
def test_indexed_delivery_gives_what_flowers_scan_gives_in_the_same_order(monkeypatch):
    original = InMemoryLinkState.original_get_message_ins
    results = []
    for get in (original, linkstate.get_message_ins):
        state, grid, nodes = _federation(6, monkeypatch)
        # Two messages for some nodes, one for others, none for the last: limit 1 holds the second back a sweep.
        _push(grid, nodes[:4], 0)
        _push(grid, nodes[1:3], 1)
        expired = _push(grid, nodes[4:5], 2)
        state.message_ins_store[expired[0]].metadata.__dict__["_ttl"] = 0.0  # expired: dropped, never delivered
        results.append(_sweeps(state, nodes, get))
        assert expired[0] not in state.message_ins_store
        assert all(m.metadata.delivered_at for m in state.message_ins_store.values())
    assert results[0] == results[1]
    assert [sorted(tag for _, tag in sweep) for sweep in results[1]] == [[0, 0, 0, 0], [1, 1]]


def test_the_store_index_follows_insertions_and_deletions(monkeypatch):
    state, grid, nodes = _federation(3, monkeypatch)
    ids = _push(grid, nodes, 0) + _push(grid, nodes[:1], 1)
    store = linkstate.IndexedStore(state.message_ins_store)
    assert list(store.by_dst[nodes[0]]) == [ids[0], ids[3]] and list(store.by_dst[nodes[2]]) == [ids[2]]
    del store[ids[0]]
    store.pop(ids[2])
    assert list(store.by_dst[nodes[0]]) == [ids[3]] and nodes[2] not in store.by_dst
    assert set(store) == {ids[1], ids[3]}
