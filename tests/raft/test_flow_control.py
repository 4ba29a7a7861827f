"""Units: quorum arithmetic, progress states and in-flight bounds, log rules."""

from __future__ import annotations

import pytest

from gcks.cluster.raft.log import LogInvariantError, RaftLog
from gcks.cluster.raft.progress import Inflights, Progress, ProgressState
from gcks.cluster.raft.quorum import VoteResult, committed_index, has_quorum, vote_result
from gcks.cluster.raft.types import ConfState, Entry, Snapshot, SnapshotMeta


def test_committed_index_is_majority_match() -> None:
    v3 = {"a", "b", "c"}
    assert committed_index(v3, {"a": 5, "b": 3, "c": 1}) == 3
    assert committed_index(v3, {"a": 5}) == 0
    v4 = {"a", "b", "c", "d"}
    assert committed_index(v4, {"a": 9, "b": 8, "c": 2, "d": 1}) == 2
    assert committed_index(set(), {}) == 0


def test_vote_result_ignores_non_voters() -> None:
    v = {"a", "b", "c"}
    assert vote_result(v, {"a": True}) is VoteResult.PENDING
    assert vote_result(v, {"a": True, "x": True, "y": True}) is VoteResult.PENDING
    assert vote_result(v, {"a": True, "b": True}) is VoteResult.WON
    assert vote_result(v, {"a": True, "b": False, "c": False}) is VoteResult.LOST
    assert has_quorum(v, {"a", "b"})
    assert not has_quorum(v, {"a", "z"})


def test_inflights_bounded_by_count_and_bytes() -> None:
    inf = Inflights(3, 100)
    inf.add(1, 10)
    inf.add(2, 10)
    assert not inf.full()
    inf.add(3, 10)
    assert inf.full()
    inf.free_le(2)
    assert len(inf) == 1
    assert not inf.full()
    inf.add(4, 95)
    assert inf.full()
    inf.free_first_one()
    assert not inf.full()


def _pr() -> Progress:
    return Progress(10, Inflights(4, 1 << 20), is_learner=False)


def test_probe_pauses_after_one_append_until_answer() -> None:
    pr = _pr()
    assert pr.state is ProgressState.PROBE
    assert not pr.is_paused()
    pr.probe_sent = True
    assert pr.is_paused()
    assert pr.maybe_update(9)
    assert not pr.is_paused()
    assert pr.next == 10


def test_stale_rejection_ignored() -> None:
    pr = _pr()
    assert not pr.maybe_decr_to(5, 3)  # we probed at 9, not 5
    assert pr.maybe_decr_to(9, 3)
    assert pr.next == 4
    pr.match = 6
    pr.become_replicate()
    assert not pr.maybe_decr_to(6, 0)  # already matched
    assert pr.maybe_decr_to(8, 0)
    assert pr.next == 7


def test_snapshot_state_paused_and_probe_resumes_after_snapshot() -> None:
    pr = _pr()
    snap = Snapshot(SnapshotMeta(20, 2, ConfState()))
    pr.become_snapshot(snap)
    assert pr.is_paused()
    pr.become_probe()
    assert pr.next == 21


def _log(terms: list[int]) -> RaftLog:
    return RaftLog(None, [Entry(t, i) for i, t in enumerate(terms, start=1)], 0)


def test_up_to_date_compares_last_term_then_length() -> None:
    log = _log([1, 2, 2])
    assert log.is_up_to_date(3, 2)
    assert log.is_up_to_date(1, 3)
    assert not log.is_up_to_date(2, 2)
    assert not log.is_up_to_date(9, 1)


def test_maybe_commit_only_current_term() -> None:
    log = _log([1, 2, 3])
    assert not log.maybe_commit(2, 3)
    assert log.maybe_commit(3, 3)
    assert log.committed == 3


def test_find_conflict_by_term_skips_whole_terms() -> None:
    log = _log([1, 1, 2, 2, 2, 5, 5])
    assert log.find_conflict_by_term(7, 4) == (5, 2)
    assert log.find_conflict_by_term(7, 5) == (7, 5)
    assert log.find_conflict_by_term(3, 0) == (0, 0)
    assert log.find_conflict_by_term(99, 1) == (2, 1)


def test_maybe_append_truncates_conflict_but_never_committed() -> None:
    log = _log([1, 1, 1])
    log.commit_to(1)
    assert log.maybe_append(1, 1, 1, [Entry(2, 2)]) == 2
    assert log.last_index() == 2
    assert log.term(2) == 2
    assert log.maybe_append(2, 9, 1, [Entry(9, 3)]) is None
    with pytest.raises(LogInvariantError):
        log.append([Entry(3, 1)])


def test_entries_from_respects_max_size_but_sends_one() -> None:
    log = RaftLog(None, [Entry(1, i, data=b"x" * 100) for i in range(1, 6)], 0)
    assert len(log.entries_from(1, 1)) == 1
    assert len(log.entries_from(1, 250)) == 2
    assert len(log.entries_from(3, 1 << 20)) == 3
