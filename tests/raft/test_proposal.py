"""Proposals on followers: forwarded to a known leader, or refused with NotLeader."""

from __future__ import annotations

import pytest

from gcks.cluster.raft.errors import NotLeader
from gcks.cluster.raft.types import MessageType

from .network import Network

IDS = ["n1", "n2", "n3"]


def test_proposal_on_follower_forwarded_or_not_leader() -> None:
    net = Network(IDS)
    with pytest.raises(NotLeader) as info:
        net.nodes["n2"].propose(b"early")  # no leader known yet
    assert info.value.leader_hint is None
    net.elect("n1")
    net.nodes["n2"].propose(b"fwd")
    net.deliver()
    assert any(m.type is MessageType.PROP and m.to == "n1" for m in net.sent)
    for app in net.apps.values():
        assert app.commands == [b"fwd"]


def test_proposal_on_candidate_raises_not_leader() -> None:
    net = Network(IDS)
    net.nodes["n2"].campaign()
    with pytest.raises(NotLeader):
        net.nodes["n2"].propose(b"x")


def test_not_leader_message_names_the_hint() -> None:
    err = NotLeader("n7")
    assert err.leader_hint == "n7"
    assert "n7" in str(err)
