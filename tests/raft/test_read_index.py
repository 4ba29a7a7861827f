"""ReadIndex: linearizable reads on the leader and on followers."""

from __future__ import annotations

import pytest

from gcks.cluster.raft.errors import NotLeader
from gcks.cluster.raft.types import MessageType, ReadState

from .network import Network

IDS = ["n1", "n2", "n3"]


def test_read_index_on_leader_needs_heartbeat_quorum() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.propose("n1", b"a")
    n1 = net.nodes["n1"]
    net.down.update({"n2", "n3"})
    n1.read_index(b"r1")
    net.deliver()
    assert net.apps["n1"].reads == []  # no quorum confirmed leadership
    net.down.clear()
    net.tick("n1")  # the next heartbeat round carries the pending read
    net.deliver()
    assert net.apps["n1"].reads == [ReadState(n1.log.committed, b"r1")]


def test_read_index_on_follower_is_linearizable() -> None:
    net = Network(IDS)
    net.elect("n1")
    for i in range(3):
        net.propose("n1", b"%d" % i)
    # n3 misses the last write entirely; a read through n3 must still see it.
    net.down.add("n3")
    net.propose("n1", b"last")
    write_index = net.nodes["n1"].log.committed
    net.down.clear()
    net.filters.append(lambda m: not (m.type is MessageType.APP and m.to == "n3"))
    net.nodes["n3"].read_index(b"follower-read")
    net.deliver()
    (rs,) = net.apps["n3"].reads
    assert rs.context == b"follower-read"
    assert rs.index >= write_index
    assert net.apps["n3"].applied_index < rs.index  # n3 must wait before serving
    net.heal()
    net.run(2)
    assert net.apps["n3"].applied_index >= rs.index
    assert net.apps["n3"].commands[-1] == b"last"


def test_new_leader_defers_reads_until_its_term_commits() -> None:
    net = Network(IDS)
    net.nodes["n1"].campaign()
    net.filters.append(lambda m: m.type is not MessageType.APP)  # the no-op cannot commit
    net.deliver()
    n1 = net.nodes["n1"]
    n1.read_index(b"early")
    net.tick("n1")
    net.deliver()
    assert net.apps["n1"].reads == []
    net.heal()
    net.tick("n1")
    net.deliver()
    net.tick("n1")
    net.deliver()
    assert [r.context for r in net.apps["n1"].reads] == [b"early"]
    assert net.apps["n1"].reads[0].index == n1.log.committed


def test_many_reads_share_one_heartbeat_round() -> None:
    net = Network(IDS)
    net.elect("n1")
    k = len(net.sent)
    for i in range(50):
        net.nodes["n1"].read_index(b"%d" % i)
    net.deliver()
    heartbeats = [m for m in net.sent[k:] if m.type is MessageType.HEARTBEAT]
    assert len(heartbeats) == 2
    assert [r.context for r in net.apps["n1"].reads] == [b"%d" % i for i in range(50)]


def test_single_voter_reads_immediately() -> None:
    net = Network(["n1"])
    net.elect("n1")
    net.nodes["n1"].read_index(b"x")
    net.deliver()
    assert [r.context for r in net.apps["n1"].reads] == [b"x"]


def test_read_without_known_leader_raises_not_leader() -> None:
    net = Network(IDS)
    with pytest.raises(NotLeader) as info:
        net.nodes["n2"].read_index(b"x")
    assert info.value.leader_hint is None


def test_deposed_leader_does_not_serve_stale_reads() -> None:
    net = Network(IDS, check_quorum=False)
    net.elect("n1")
    net.isolate("n1")
    net.nodes["n1"].read_index(b"stale")
    net.run(30)  # n2/n3 elect a new leader meanwhile
    assert net.apps["n1"].reads == []
