"""Snapshots, log compaction and chunked InstallSnapshot."""

from __future__ import annotations

import pytest

from gcks.cluster.raft.errors import RaftUsageError
from gcks.cluster.raft.progress import ProgressState
from gcks.cluster.raft.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Message,
    MessageType,
    SnapshotMeta,
)

from .network import Network

IDS = ["n1", "n2", "n3"]


def _compact_leader(net: Network, nid: str) -> None:
    node = net.nodes[nid]
    app = net.apps[nid]
    net.disks[nid].snapshot = node.compact(app.applied_index, app.snapshot_data())


def test_compaction_drops_entries_and_keeps_snapshot() -> None:
    net = Network(IDS)
    net.elect("n1")
    for i in range(10):
        net.propose("n1", b"%d" % i)
    node = net.nodes["n1"]
    applied = node.log.applied
    snap = node.compact(applied, net.apps["n1"].snapshot_data())
    assert snap.meta.index == applied
    assert snap.meta.term == node.term
    assert snap.meta.conf == node.conf
    assert node.log.first_index() == applied + 1
    assert node.log.term(applied - 1) is None


def test_compaction_beyond_applied_refused() -> None:
    net = Network(IDS)
    net.elect("n1")
    node = net.nodes["n1"]
    with pytest.raises(RaftUsageError):
        node.compact(node.log.applied + 1, b"")


def test_lagging_follower_caught_up_by_chunked_snapshot() -> None:
    net = Network(IDS, snapshot_chunk_size=64)
    net.elect("n1")
    net.down.add("n3")
    for i in range(40):
        net.nodes["n1"].propose(b"command-%02d" % i)
    net.deliver()
    _compact_leader(net, "n1")
    net.nodes["n1"].propose(b"after")
    net.deliver()
    net.down.clear()
    net.run(5)
    snaps = [m for m in net.sent if m.type is MessageType.SNAP and m.to == "n3"]
    size = len(net.disks["n1"].snapshot.data)  # type: ignore[union-attr]
    assert len(snaps) >= size // 64 >= 5, "the snapshot travels in several chunks"
    assert snaps[-1].done
    assert not snaps[0].done
    assert sorted({m.offset for m in snaps}) == list(range(0, size, 64))
    want = [b"command-%02d" % i for i in range(40)] + [b"after"]
    assert net.apps["n3"].commands == want
    assert net.disks["n3"].snapshot is not None
    # Back to normal replication afterwards.
    assert net.nodes["n1"].status.progress["n3"].state is ProgressState.REPLICATE
    net.propose("n1", b"more")
    assert net.apps["n3"].commands[-1] == b"more"


def test_lost_snapshot_chunk_is_resent() -> None:
    net = Network(IDS, snapshot_chunk_size=32)
    net.elect("n1")
    net.down.add("n3")
    for i in range(20):
        net.propose("n1", b"c%d" % i)
    _compact_leader(net, "n1")
    net.down.clear()
    dropped: list[int] = []

    def drop_second_chunk_once(m):  # type: ignore[no-untyped-def]
        if m.type is MessageType.SNAP and m.offset == 32 and not dropped:
            dropped.append(m.offset)
            return False
        return True

    net.filters.append(drop_second_chunk_once)
    net.run(10)
    assert dropped == [32]
    assert net.apps["n3"].commands == [b"c%d" % i for i in range(20)]


def test_follower_restarts_from_received_snapshot() -> None:
    net = Network(IDS, snapshot_chunk_size=1 << 20)
    net.elect("n1")
    net.down.add("n3")
    for i in range(5):
        net.propose("n1", b"c%d" % i)
    _compact_leader(net, "n1")
    net.down.clear()
    net.run(3)
    node = net.restart("n3")
    assert node.log.first_index() > 1
    net.run(3)
    assert net.apps["n3"].commands == [b"c%d" % i for i in range(5)]


def test_snapshot_carries_configuration_to_new_member() -> None:
    net = Network(IDS)
    net.elect("n1")
    for i in range(5):
        net.propose("n1", b"c%d" % i)
    _compact_leader(net, "n1")
    net.add_node("n4", conf=ConfState())  # empty storage, knows nothing
    net.nodes["n1"].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "n4"))
    net.run(5)
    n4 = net.nodes["n4"]
    assert n4.conf.voters == frozenset(IDS)
    assert "n4" in n4.conf.learners
    assert net.apps["n4"].commands == [b"c%d" % i for i in range(5)]


def test_snapshot_transfer_survives_follower_restart_and_stale_chunks() -> None:
    net = Network(IDS, snapshot_chunk_size=8)
    net.elect("n1")
    net.down.add("n3")
    for i in range(10):
        net.propose("n1", b"c%d" % i)
    _compact_leader(net, "n1")
    net.down.clear()
    net.tick("n1")  # heartbeat -> n3 answers -> the leader starts the transfer
    chunks: list[Message] = []
    for _ in range(12):  # deliver until three chunks went through
        net.process_all()
        m = net.queue.popleft()
        if m.type is MessageType.SNAP:
            chunks.append(m)
            if len(chunks) == 3:
                break
        net.nodes[m.to].step(m)
    assert [c.offset for c in chunks] == [0, 8, 16]
    net.queue.clear()
    net.restart("n3")  # the partial copy is gone
    net.nodes["n3"].step(chunks[2])  # the leader goes on from offset 16 ...
    net.nodes["n3"].step(chunks[0])  # ... and a stale first chunk shows up too
    net.nodes["n3"].step(chunks[0])
    net.run(10)
    assert net.apps["n3"].commands == [b"c%d" % i for i in range(10)]


def test_chunks_of_different_leaders_never_mixed() -> None:
    # Two leaders may serialize the same snapshot (same index, term, conf) to
    # different bytes; a follower must assemble one sender's bytes only.
    net = Network(IDS)
    n3 = net.nodes["n3"]
    net.process_all()
    term = n3.term
    meta = SnapshotMeta(9, term, n3.conf)
    first = Message(MessageType.SNAP, "n3", "n1", term, snapshot=meta, data=b"A" * 8)
    n3.step(first)
    second = Message(
        MessageType.SNAP, "n3", "n2", term + 1, snapshot=meta, offset=8, data=b"B" * 8, done=True
    )
    n3.step(second)
    rd = n3.ready()
    assert rd.snapshot is None
    (answer,) = [m for m in rd.messages if m.to == "n2"]
    assert answer.type is MessageType.SNAP_RESP
    assert answer.reject
