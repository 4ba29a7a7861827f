"""Leadership transfer with TimeoutNow."""

from __future__ import annotations

import pytest

from gcks.cluster.raft.errors import NotLeader, TransferRefused
from gcks.cluster.raft.types import MessageType, Role

from .network import Network

IDS = ["n1", "n2", "n3"]


def test_transfer_to_caught_up_follower() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.propose("n1", b"a")
    term = net.nodes["n1"].term
    net.nodes["n1"].transfer_leadership("n2")
    net.deliver()
    assert net.leader() == "n2"
    assert net.nodes["n2"].term == term + 1
    net.propose("n2", b"b")
    assert net.apps["n1"].commands == [b"a", b"b"]


def test_transfer_refused_to_learner() -> None:
    net = Network(IDS, learners=["n4"])
    net.elect("n1")
    with pytest.raises(TransferRefused):
        net.nodes["n1"].transfer_leadership("n4")
    with pytest.raises(TransferRefused):
        net.nodes["n1"].transfer_leadership("n9")
    assert net.nodes["n1"].status.lead_transferee is None


def test_transfer_waits_for_catch_up() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.down.add("n3")
    for i in range(5):
        net.propose("n1", b"%d" % i)
    net.nodes["n1"].transfer_leadership("n3")
    net.deliver()
    assert not any(m.type is MessageType.TIMEOUT_NOW for m in net.sent)
    # Proposals are refused while the transfer is pending, with the target as hint.
    with pytest.raises(NotLeader) as info:
        net.nodes["n1"].propose(b"x")
    assert info.value.leader_hint == "n3"
    net.down.clear()
    net.tick("n1")  # heartbeat: n3 answers, gets the missing entries, then TimeoutNow
    net.deliver()
    assert net.leader() == "n3"
    assert net.apps["n3"].commands == [b"%d" % i for i in range(5)]


def test_transfer_times_out_after_election_timeout() -> None:
    net = Network(IDS, election_tick=10)
    net.elect("n1")
    net.down.add("n3")
    net.propose("n1", b"a")
    net.nodes["n1"].transfer_leadership("n3")
    net.run(10)
    n1 = net.nodes["n1"]
    assert n1.role is Role.LEADER
    assert n1.status.lead_transferee is None
    net.propose("n1", b"b")  # accepted again


def test_transfer_requested_on_follower_is_forwarded() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.nodes["n2"].transfer_leadership("n3")
    net.deliver()
    assert net.leader() == "n3"


def test_transfer_campaign_overrides_leader_lease() -> None:
    # n3 heard from n1 just now (in lease) but votes for the transferee anyway.
    net = Network(IDS)
    net.elect("n1")
    net.tick()
    net.deliver()
    net.nodes["n1"].transfer_leadership("n2")
    net.deliver()
    votes = [m for m in net.sent if m.type is MessageType.VOTE_RESP and m.to == "n2"]
    assert votes
    assert not any(m.reject for m in votes)
