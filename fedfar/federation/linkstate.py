"""Flower's in-memory LinkState delivers a message in time linear in the messages stored, not quadratic.

Flower 1.41's simulation engine sweeps every node ten times a second and asks the in-memory LinkState for that
node's next message (`get_message_ins(node_id, limit=1)`), which scans every stored message to find it. A sweep
therefore costs nodes x stored messages: with 10,000 simulated nodes, asking each which partition it holds (the
register round, 10,000 messages) took longer than the whole 10-minute budget of a 10,000-client run. The same
code is in Flower 1.42.

`install()` gives the store an index from destination node to its messages, kept by the store's own insertions
and deletions, and serves `get_message_ins` from it with Flower's own checks in Flower's order (expired and
invalid messages dropped, insertion order, `limit`, marked delivered). The ServerApp installs it when it starts,
in the process that runs the simulation engine, before it sends anything; a deployment's SuperLink, another
process, is not touched. Other Flower versions are left alone.
"""
from __future__ import annotations

import flwr
from flwr.server.superlink.linkstate import in_memory_linkstate
from flwr.supercore.date import now

FLOWER_VERSION = "1.41.0"  # the version whose get_message_ins this replaces (and reproduces)


class IndexedStore(dict):
    """message id -> Message, with `by_dst`: node id -> that node's message ids in insertion order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.by_dst: dict[int, dict[str, None]] = {}
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __setitem__(self, key: str, value) -> None:
        super().__setitem__(key, value)
        self.by_dst.setdefault(value.metadata.dst_node_id, {})[key] = None

    def __delitem__(self, key: str) -> None:
        message = self[key]
        super().__delitem__(key)
        ids = self.by_dst.get(message.metadata.dst_node_id)
        if ids is not None:
            ids.pop(key, None)
            if not ids:
                del self.by_dst[message.metadata.dst_node_id]

    def pop(self, key: str, *default):
        if key in self:
            value = self[key]
            del self[key]
            return value
        return super().pop(key, *default)

    def clear(self) -> None:
        super().clear()
        self.by_dst.clear()

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list:
    """InMemoryLinkState.get_message_ins of Flower 1.41, scanning only `node_id`'s messages."""
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found = []
    with self.lock:
        if not isinstance(self.message_ins_store, IndexedStore):
            self.message_ins_store = IndexedStore(self.message_ins_store)
        for msg_id in list(self.message_ins_store.by_dst.get(node_id, ())):
            self._check_stored_messages({msg_id})
            message = self.message_ins_store.get(msg_id)
            if (message and message.metadata.dst_node_id == node_id
                    and (run_id is None or message.metadata.run_id == run_id)
                    and message.metadata.delivered_at == ""):
                found.append(message)
            if limit and len(found) == limit:
                break
    delivered_at = now().isoformat()
    for message in found:
        message.metadata.delivered_at = delivered_at
    return found


def install() -> bool:
    """Serve InMemoryLinkState.get_message_ins from the per-node index; True if installed (Flower 1.41 only)."""
    cls = in_memory_linkstate.InMemoryLinkState
    if flwr.__version__ != FLOWER_VERSION:
        return False
    if cls.get_message_ins is not get_message_ins:
        cls.original_get_message_ins = cls.get_message_ins
        cls.get_message_ins = get_message_ins
    return True
