"""The driver-facing contract of `RawNode`: Ready/advance, status, config checks."""

from __future__ import annotations

import pytest

from gcks.cluster.raft.errors import RaftUsageError
from gcks.cluster.raft.progress import ProgressState
from gcks.cluster.raft.raft import RaftConfig, RawNode
from gcks.cluster.raft.types import ConfState, EntryType, HardState, Message, Role

from .network import Network

IDS = ["n1", "n2", "n3"]


def test_bootstrap_ready_persists_configuration_entries_first() -> None:
    node = RawNode(RaftConfig(id="n1"), conf=ConfState(frozenset(IDS)))
    rd = node.ready()
    assert [e.type for e in rd.entries] == [EntryType.CONF_CHANGE] * 3
    assert rd.hard_state == HardState(term=1, vote=None, commit=3)
    assert rd.committed_entries == rd.entries
    assert rd.messages == ()
    node.advance(rd)
    assert not node.has_ready()


def test_ready_twice_without_advance_is_refused() -> None:
    node = RawNode(RaftConfig(id="n1"), conf=ConfState(frozenset(IDS)))
    rd = node.ready()
    assert not node.has_ready()
    with pytest.raises(RaftUsageError):
        node.ready()
    with pytest.raises(RaftUsageError):
        node.advance(type(rd)())
    node.advance(rd)


def test_votes_leave_only_with_the_hard_state_that_records_them() -> None:
    net = Network(IDS)
    n1 = net.nodes["n1"]
    net.process_all()
    net.queue.clear()
    n1.campaign()
    rd = n1.ready()
    assert {m.to for m in rd.messages} == {"n2", "n3"}
    n1.advance(rd)
    n1.step(next(m for m in _answers(net, rd.messages) if m.frm == "n2"))
    rd = n1.ready()
    assert rd.hard_state is not None
    assert rd.hard_state.vote == "n1"
    assert all(m.term == rd.hard_state.term for m in rd.messages)


def _answers(net: Network, msgs: tuple[Message, ...]) -> list[Message]:
    out: list[Message] = []
    for m in msgs:
        node = net.nodes[m.to]
        node.step(m)
        rd = node.ready()
        out.extend(rd.messages)
        node.advance(rd)
    return out


def test_status_reports_progress_on_leader_only() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.propose("n1", b"a")
    st = net.nodes["n1"].status
    assert st.role is Role.LEADER
    assert st.leader == "n1"
    assert st.commit == st.applied
    assert set(st.progress) == set(IDS)
    assert all(p.match == st.commit for p in st.progress.values())
    assert st.progress["n2"].state is ProgressState.REPLICATE
    assert net.nodes["n2"].status.progress == {}


def test_report_unreachable_stops_pipelining() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.nodes["n1"].report_unreachable("n2")
    assert net.nodes["n1"].status.progress["n2"].state is ProgressState.PROBE
    net.propose("n1", b"a")
    assert net.apps["n2"].commands == [b"a"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"id": ""},
        {"id": "n1", "heartbeat_tick": 0},
        {"id": "n1", "election_tick": 1, "heartbeat_tick": 1},
        {"id": "n1", "max_inflight_msgs": 0},
        {"id": "n1", "snapshot_chunk_size": 0},
    ],
)
def test_bad_config_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(RaftUsageError):
        RaftConfig(**kwargs)  # type: ignore[arg-type]


def test_messages_for_someone_else_ignored() -> None:
    net = Network(IDS)
    net.elect("n1")
    (hb,) = [m for m in net.sent if m.to == "n2"][:1]
    n3 = net.nodes["n3"]
    term = n3.term
    n3.step(hb)  # addressed to n2
    assert n3.term == term
    assert not n3.has_ready()
