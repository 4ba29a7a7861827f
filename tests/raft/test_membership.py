"""Membership changes one server at a time: learners, promotion, removal."""

from __future__ import annotations

import pytest

from gcks.cluster.raft.errors import ProposalDropped
from gcks.cluster.raft.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    MessageType,
    Role,
)

from .network import Network

IDS = ["n1", "n2", "n3"]


def _change(net: Network, leader: str, kind: ConfChangeType, nid: str) -> None:
    net.nodes[leader].propose_conf_change(ConfChange(kind, nid))
    net.deliver()


def test_new_node_learns_configuration_from_log() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.add_node("n4", conf=ConfState())
    assert net.nodes["n4"].role is Role.FOLLOWER
    assert not net.nodes["n4"].conf.voters
    _change(net, "n1", ConfChangeType.ADD_VOTER, "n4")
    net.run(3)
    for nid in [*IDS, "n4"]:
        assert net.nodes[nid].conf.voters == frozenset([*IDS, "n4"]), nid


def test_learner_does_not_vote_and_is_promoted() -> None:
    net = Network(["n1", "n2"])
    net.elect("n1")
    net.add_node("n3", conf=ConfState())
    _change(net, "n1", ConfChangeType.ADD_LEARNER, "n3")
    net.run(3)
    assert net.nodes["n3"].role is Role.LEARNER
    # With n1 down, n2 cannot win: the learner's answer is not a vote of {n1, n2}.
    net.down.add("n1")
    net.run(40)
    assert net.leaders() == []
    assert net.nodes["n3"].role is Role.LEARNER
    # The learner replicates like anyone else ...
    net.down.clear()
    net.run(40)
    leader = net.leader()
    net.propose(leader, b"x")
    assert net.apps["n3"].commands == [b"x"]
    # ... and ADD_VOTER promotes it; now it counts in quorums.
    _change(net, leader, ConfChangeType.ADD_VOTER, "n3")
    net.run(3)
    assert net.nodes["n3"].status.role is Role.FOLLOWER
    assert net.nodes[leader].conf == ConfState(frozenset(["n1", "n2", "n3"]), frozenset())
    other = "n2" if leader == "n1" else "n1"
    net.down.add(other)
    net.propose(leader, b"y")  # the leader and n3 make a majority of three
    assert net.apps["n3"].commands == [b"x", b"y"]


def test_learner_not_counted_for_commit() -> None:
    net = Network(["n1", "n2", "n3"], learners=["n4"])
    net.elect("n1")
    net.down.update({"n2", "n3"})
    net.nodes["n1"].propose(b"x")
    net.deliver()
    assert net.apps["n4"].commands == []  # replicated to the learner, but not committed
    assert net.nodes["n4"].log.last_index() == net.nodes["n1"].log.last_index()
    assert net.nodes["n1"].log.committed < net.nodes["n1"].log.last_index()


def test_remove_follower() -> None:
    net = Network(IDS)
    net.elect("n1")
    _change(net, "n1", ConfChangeType.REMOVE_NODE, "n3")
    assert net.nodes["n1"].conf.voters == frozenset({"n1", "n2"})
    net.down.add("n3")
    net.propose("n1", b"a")  # quorum of two is n1 + n2
    assert net.apps["n2"].commands == [b"a"]


def test_remove_leader_steps_down() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.propose("n1", b"a")
    _change(net, "n1", ConfChangeType.REMOVE_NODE, "n1")
    assert net.nodes["n1"].role is Role.FOLLOWER
    net.run(30)
    leader = net.leader()
    assert leader in {"n2", "n3"}
    net.propose(leader, b"b")
    for nid in ("n2", "n3"):
        assert net.apps[nid].commands == [b"a", b"b"]
    assert net.nodes[leader].conf.voters == frozenset({"n2", "n3"})
    # The removed node never campaigns again.
    k = len(net.sent)
    net.run(30)
    assert not any(m.frm == "n1" and m.type is MessageType.PRE_VOTE for m in net.sent[k:])


def test_removed_leader_hands_over_with_timeout_now() -> None:
    net = Network(IDS)
    net.elect("n1")
    _change(net, "n1", ConfChangeType.REMOVE_NODE, "n1")
    assert any(m.type is MessageType.TIMEOUT_NOW and m.frm == "n1" for m in net.sent)
    assert len(net.leaders()) == 1
    assert net.leader() != "n1"


def test_only_one_conf_change_pending() -> None:
    net = Network(IDS)
    net.elect("n1")
    n1 = net.nodes["n1"]
    n1.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "n4"))
    with pytest.raises(ProposalDropped):
        n1.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "n5"))
    net.deliver()
    n1.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "n5"))  # applied: allowed


def test_conf_change_refused_before_new_leader_applied_old_entries() -> None:
    net = Network(IDS)
    net.nodes["n1"].campaign()
    net.process("n1")  # elected not yet: a fresh leader must apply its no-op first
    net.deliver()
    n1 = net.nodes["n1"]
    assert n1.role is Role.LEADER
    n1.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "n4"))


def test_invalid_conf_changes_refused() -> None:
    net = Network(["n1"])
    net.elect("n1")
    n1 = net.nodes["n1"]
    with pytest.raises(ProposalDropped):
        n1.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, "n1"))  # last voter
    with pytest.raises(ProposalDropped):
        n1.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, "n9"))  # not a member
    with pytest.raises(ProposalDropped):
        n1.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "n1"))  # demotion


def test_conf_change_forwarded_by_follower() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.nodes["n2"].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "n4"))
    net.deliver()
    assert net.nodes["n1"].conf.learners == frozenset({"n4"})


def test_conf_survives_restart_by_replaying_log() -> None:
    net = Network(IDS)
    net.elect("n1")
    _change(net, "n1", ConfChangeType.ADD_LEARNER, "n4")
    _change(net, "n1", ConfChangeType.REMOVE_NODE, "n3")
    node = net.restart("n2")
    assert node.conf == ConfState(frozenset({"n1", "n2"}), frozenset({"n4"}))


def test_removed_leader_with_longer_log_does_not_block_election() -> None:
    # n1 leads {n1, n2} and removes itself. The change commits on n1, but n2 never
    # hears so, and n1 appended one more entry meanwhile; then n1 crashes. n2
    # still counts n1 as a voter, and n1 (removed, longer log) refuses its vote:
    # the refusal must tell n2 that the change is committed, so n2 leads alone.
    net = Network(["n1", "n2"])
    net.elect("n1")
    n1, n2 = net.nodes["n1"], net.nodes["n2"]
    n1.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, "n1"))
    net.process("n1")
    (app,) = [m for m in net.queue if m.type is MessageType.APP]
    net.queue.clear()
    n2.step(app)
    net.process("n2")
    (ack,) = net.queue
    net.queue.clear()
    n1.step(ack)  # the removal commits on n1 ...
    n1.propose(b"tail")  # ... and n1, still leading, appends past it
    net.isolate("n1")
    net.process("n1")  # n1 applies its removal and persists the tail
    net.queue.clear()  # what n1 sent now is lost
    assert n2.log.committed < n1.log.committed
    n1 = net.restart("n1")
    assert n1.conf.voters == frozenset({"n2"})
    assert n1.log.last_index() > n2.log.last_index()
    net.heal()
    net.run(60)
    assert net.leader() == "n2"
    assert net.nodes["n2"].conf.voters == frozenset({"n2"})


def test_removed_node_can_be_added_again() -> None:
    net = Network(IDS)
    net.elect("n1")
    _change(net, "n1", ConfChangeType.REMOVE_NODE, "n3")
    net.propose("n1", b"while-out")
    _change(net, "n1", ConfChangeType.ADD_VOTER, "n3")
    net.propose("n1", b"back")
    assert net.apps["n3"].commands == [b"while-out", b"back"]
    net.nodes["n1"].transfer_leadership("n3")
    net.deliver()
    assert net.leader() == "n3"
