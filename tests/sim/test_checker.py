"""The simulation's own machinery is trustworthy: the network obeys its fault
settings and partitions, the storage model keeps exactly what was persisted, and
each invariant check fires on a hand-made history that breaks it (and stays
quiet on one that does not)."""

from __future__ import annotations

import random

import pytest

from gcks.cluster.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)
from tests.sim.checker import InvariantViolation, SafetyChecker
from tests.sim.linearizability import READ, WRITE, Op, ReadWriteHistory, check_linearizable
from tests.sim.network import LinkFaults, SimNetwork
from tests.sim.statemachine import AppliedState, write_data, write_id
from tests.sim.storage import DurableLog


def _msg(frm: str = "n1", to: str = "n2", index: int = 0) -> Message:
    return Message(MessageType.APP, to=to, frm=frm, term=1, index=index)


def _drain(net: SimNetwork, now: int) -> list[Message]:
    out = []
    while (m := net.pop_due(now)) is not None:
        out.append(m)
    return out


def _log(node: str, *terms: int) -> DurableLog:
    log = DurableLog(node)
    log.append(
        tuple(Entry(t, i + 1, data=b"%s%d" % (node.encode(), i)) for i, t in enumerate(terms))
    )
    return log


# -- network -------------------------------------------------------------------------


def test_network_without_faults_delivers_everything_once_in_the_same_tick() -> None:
    net = SimNetwork(random.Random(1))
    for i in range(20):
        net.send(_msg(index=i), now=5)
    got = _drain(net, 5)
    assert sorted(m.index for m in got) == list(range(20))
    assert len(net) == 0


def test_network_reorders_messages_due_in_the_same_tick() -> None:
    net = SimNetwork(random.Random(2))
    for i in range(20):
        net.send(_msg(index=i), now=0)
    assert [m.index for m in _drain(net, 0)] != list(range(20))


def test_network_delay_holds_messages_until_their_tick() -> None:
    net = SimNetwork(random.Random(3))
    net.faults = LinkFaults(max_delay=3)
    for i in range(50):
        net.send(_msg(index=i), now=0)
    seen = []
    for now in range(4):
        seen.extend(_drain(net, now))
        if now == 0:
            assert len(seen) < 50
    assert len(seen) == 50


def test_network_drop_and_duplicate_follow_their_rates() -> None:
    net = SimNetwork(random.Random(4))
    net.faults = LinkFaults(drop=0.5)
    for i in range(1000):
        net.send(_msg(index=i), now=0)
    assert 400 < len(_drain(net, 0)) < 600
    net.faults = LinkFaults(duplicate=1.0)
    net.send(_msg(index=7), now=0)
    assert [m.index for m in _drain(net, 0)] == [7, 7]


def test_symmetric_partition_blocks_both_ways_and_eats_in_flight_messages() -> None:
    net = SimNetwork(random.Random(5))
    net.send(_msg("n1", "n3"), now=0)
    net.partition([["n1", "n2"], ["n3"]])
    net.send(_msg("n3", "n1"), now=0)
    net.send(_msg("n1", "n2"), now=0)
    assert [(m.frm, m.to) for m in _drain(net, 0)] == [("n1", "n2")]
    net.heal()
    net.send(_msg("n3", "n1"), now=0)
    assert len(_drain(net, 0)) == 1


def test_one_way_block_leaves_the_reverse_direction_open() -> None:
    net = SimNetwork(random.Random(6))
    net.block_one_way(["n1"], ["n2", "n3"])
    assert net.is_blocked("n1", "n2")
    assert not net.is_blocked("n2", "n1")
    net.isolate("n4", ["n1", "n4"])
    assert net.is_blocked("n4", "n1")
    assert net.is_blocked("n1", "n4")


def test_network_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[int]:
        net = SimNetwork(random.Random(seed))
        net.faults = LinkFaults(drop=0.1, duplicate=0.1, max_delay=2)
        for i in range(100):
            net.send(_msg(index=i), now=0)
        return [m.index for now in range(3) for m in _drain(net, now)]

    assert run(9) == run(9)
    assert run(9) != run(10)


# -- storage model -------------------------------------------------------------------


def test_storage_append_replaces_the_conflicting_suffix() -> None:
    log = _log("n1", 1, 1, 1)
    log.append((Entry(2, 2), Entry(2, 3), Entry(2, 4)))
    assert [e.term for e in log.entries] == [1, 2, 2, 2]
    assert log.term(4) == 2


def test_storage_rejects_a_ready_that_leaves_a_hole() -> None:
    log = _log("n1", 1)
    with pytest.raises(InvariantViolation, match="persist-contiguity"):
        log.append((Entry(1, 3),))


def test_storage_compaction_keeps_the_suffix_and_the_snapshot() -> None:
    log = _log("n1", 1, 1, 2, 2)
    log.compact(Snapshot(SnapshotMeta(2, 1, ConfState()), b"x"))
    assert log.snapshot_index == 2
    assert log.term(2) == 1
    assert log.term(1) is None
    assert [e.index for e in log.entries] == [3, 4]
    with pytest.raises(InvariantViolation, match="compact-term"):
        log.compact(Snapshot(SnapshotMeta(3, 1, ConfState()), b"x"))


def test_storage_installed_snapshot_replaces_the_whole_log() -> None:
    log = _log("n1", 1, 1)
    log.install_snapshot(Snapshot(SnapshotMeta(5, 3, ConfState()), b""))
    assert log.entries == ()
    assert log.last_index == 5
    log.append((Entry(3, 6),))
    assert log.last_index == 6


# -- safety checker ------------------------------------------------------------------


def test_two_leaders_in_one_term_violate_election_safety() -> None:
    checker = SafetyChecker()
    checker.on_leader("n1", 3, _log("n1"))
    checker.on_leader("n1", 3, _log("n1"))
    with pytest.raises(InvariantViolation, match="election-safety"):
        checker.on_leader("n2", 3, _log("n2"))


def test_same_index_and_term_with_different_data_violates_log_matching() -> None:
    checker = SafetyChecker()
    a = _log("a", 1)
    checker.on_persist("a", a, a.entries, None)
    b = _log("b", 1)
    with pytest.raises(InvariantViolation, match="log-matching"):
        checker.on_persist("b", b, b.entries, None)


def test_same_entry_after_different_predecessors_violates_log_matching() -> None:
    checker = SafetyChecker()
    shared = Entry(3, 2, data=b"x")
    a = DurableLog("a")
    a.append((Entry(1, 1), shared))
    checker.on_persist("a", a, a.entries, None)
    b = DurableLog("b")
    b.append((Entry(2, 1), shared))
    with pytest.raises(InvariantViolation, match="log-matching"):
        checker.on_persist("b", b, b.entries, None)


def test_leader_without_an_entry_committed_in_an_earlier_term_violates_completeness() -> None:
    checker = SafetyChecker()
    a = _log("a", 1, 1)
    checker.on_persist("a", a, a.entries, HardState(term=1, vote="a", commit=2))
    checker.on_leader("a", 2, _log("a", 1, 1))  # has both: fine
    with pytest.raises(InvariantViolation, match="leader-completeness"):
        checker.on_leader("b", 3, DurableLog("b"))


def test_committed_entry_overwritten_in_a_log_is_a_lost_acknowledged_entry() -> None:
    checker = SafetyChecker()
    a = _log("a", 1, 1)
    checker.on_persist("a", a, a.entries, HardState(term=1, commit=2))
    new = (Entry(2, 2, data=b"other"),)
    checker.on_persist("b", _log("b", 1), new, None)  # a stale leader may write there
    replaced = a.append(new)
    with pytest.raises(InvariantViolation, match="committed-entry-lost"):
        checker.on_persist("a", a, new, None, replaced)


def _committed_log(node: str, entry: Entry) -> DurableLog:
    log = DurableLog(node)
    log.append((entry,))
    log.set_hard_state(HardState(term=entry.term, commit=entry.index))
    return log


def test_two_nodes_applying_different_entries_at_one_index_violate_state_machine_safety() -> None:
    checker = SafetyChecker()
    x = Entry(1, 1, data=b"x")
    checker.on_apply("a", x, _committed_log("a", x))
    checker.on_apply("b", x, _committed_log("b", x))
    y = Entry(2, 1, data=b"y")
    with pytest.raises(InvariantViolation, match="state-machine-safety"):
        checker.on_apply("c", y, _committed_log("c", y))


def test_applying_an_entry_not_yet_committed_in_storage_is_caught() -> None:
    log = _log("n1", 1, 1)
    log.set_hard_state(HardState(term=1, commit=1))
    checker = SafetyChecker()
    checker.on_apply("n1", log.entries[0], log)
    with pytest.raises(InvariantViolation, match="apply-before-durable"):
        checker.on_apply("n1", log.entries[1], log)


def test_vote_granted_before_it_is_persisted_is_caught() -> None:
    checker = SafetyChecker()
    log = DurableLog("n1")
    log.set_hard_state(HardState(term=4, vote=None))
    grant = Message(MessageType.VOTE_RESP, to="n2", frm="n1", term=4)
    with pytest.raises(InvariantViolation, match="vote-not-durable"):
        checker.on_send("n1", log, grant)
    log.set_hard_state(HardState(term=4, vote="n2"))
    checker.on_send("n1", log, grant)


def test_append_acknowledged_before_it_is_persisted_is_caught() -> None:
    checker = SafetyChecker()
    log = _log("n1", 1)
    checker.on_send("n1", log, Message(MessageType.APP_RESP, to="n2", frm="n1", index=1))
    with pytest.raises(InvariantViolation, match="ack-not-durable"):
        checker.on_send("n1", log, Message(MessageType.APP_RESP, to="n2", frm="n1", index=2))


def test_hard_state_may_not_change_vote_or_go_back() -> None:
    checker = SafetyChecker()
    log = DurableLog("n1")
    checker.on_persist("n1", log, (), HardState(term=2, vote="n2"))
    with pytest.raises(InvariantViolation, match="vote-changed"):
        checker.on_persist("n1", log, (), HardState(term=2, vote="n3"))
    with pytest.raises(InvariantViolation, match="term-regressed"):
        checker.on_persist("n1", log, (), HardState(term=1))


# -- linearizability -----------------------------------------------------------------


def _w(rank: int, invoked: int, completed: int) -> Op:
    return Op(WRITE, invoked, completed, rank, f"w{rank}")


def _r(seen: int, invoked: int, completed: int) -> Op:
    return Op(READ, invoked, completed, seen, f"r{seen}@{invoked}")


def test_concurrent_history_is_linearizable() -> None:
    ops = [_w(1, 0, 10), _w(2, 1, 12), _r(0, 2, 3), _r(2, 11, 13), _r(1, 5, 20)]
    assert check_linearizable(ops) is None


def test_stale_read_after_an_acknowledged_write_is_not_linearizable() -> None:
    assert check_linearizable([_w(1, 0, 5), _r(0, 6, 7)]) is not None


def test_read_going_back_in_time_is_not_linearizable() -> None:
    ops = [_w(1, 0, 100), _w(2, 1, 100), _r(2, 2, 3), _r(1, 4, 5)]
    assert check_linearizable(ops) is not None


def test_read_seeing_a_write_invoked_after_it_returned_is_not_linearizable() -> None:
    assert check_linearizable([_r(1, 0, 1), _w(1, 2, 3)]) is not None


def test_writes_committed_against_real_time_order_are_not_linearizable() -> None:
    assert check_linearizable([_w(2, 0, 1), _w(1, 2, 3)]) is not None


def test_history_flags_a_read_missing_an_acknowledged_write_when_it_completes() -> None:
    h = ReadWriteHistory()
    h.write_invoked(1, 1)
    h.index_committed(1, 1, 2)
    h.read_invoked(b"r1", 3)
    with pytest.raises(InvariantViolation, match="linearizable-read"):
        h.read_served(b"r1", 0, 4, "n2")


def test_history_flags_a_refused_write_that_commits() -> None:
    h = ReadWriteHistory()
    h.write_invoked(1, 1)
    h.write_refused(1)
    with pytest.raises(InvariantViolation, match="refused-write-committed"):
        h.index_committed(1, 1, 2)


def test_history_flags_a_first_apply_that_skips_an_index() -> None:
    h = ReadWriteHistory()
    with pytest.raises(InvariantViolation, match="apply-order"):
        h.index_committed(2, None, 1)


# -- state machine -------------------------------------------------------------------


def test_state_machine_applies_each_write_once_and_round_trips_snapshots() -> None:
    sm = AppliedState()
    for i, data in enumerate((write_data(7), b"", write_data(7), write_data(9)), start=1):
        sm.apply(Entry(1, i, data=data))
    assert sm.writes == [7, 9]
    assert write_id(Entry(1, 1, EntryType.CONF_CHANGE, b"w1")) is None
    snap = Snapshot(SnapshotMeta(sm.index, 1, ConfState()), sm.encode())
    back = AppliedState.from_snapshot(snap)
    assert (back.index, back.writes) == (4, [7, 9])


def test_leader_advancing_commit_to_an_older_term_entry_breaks_the_commit_rule() -> None:
    checker = SafetyChecker()
    log = _log("n1", 1, 2)
    log.set_hard_state(HardState(term=3, vote="n1", commit=0))
    checker.on_persist("n1", log, (), HardState(term=3, vote="n1", commit=0), leading=True)
    with pytest.raises(InvariantViolation, match="commit-rule"):
        checker.on_persist("n1", log, (), HardState(term=3, vote="n1", commit=2), leading=True)
    # A follower learning the same commit from its leader is fine.
    SafetyChecker().on_persist("n2", log, (), HardState(term=3, commit=2))
