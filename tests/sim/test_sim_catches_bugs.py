"""The simulation can fail: known-broken variants of the Raft core, patched in
here with monkeypatch (never as flags in the core), are caught within the
default seed count: counting old-term entries toward commit (Figure 8), voting
for a less up-to-date log, not persisting the vote, and two ReadIndex
shortcuts that make reads stale.

For each variant the hunt runs the default seeds (3 nodes, then 5) until the
first safety violation, then proves the finding is the patch's doing: the same
seed passes on the real core. A patch that changed nothing could not pass that
second check."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gcks.cluster.raft.log import RaftLog
from gcks.cluster.raft.raft import RawNode
from gcks.cluster.raft.readonly import ReadRequest
from gcks.cluster.raft.types import HardState, Message, NodeId
from tests.sim.cluster import SeedResult, SimOptions, run_seed
from tests.sim.runner import DEFAULT_SEEDS, run_seeds

# Outcomes that are not a safety violation. A liveness failure or an exception
# of the real core is a separate finding and must not count as catching the bug.
NOT_SAFETY = frozenset({None, "liveness", "core-exception"})


def _is_safety_violation(result: SeedResult) -> bool:
    return result.invariant not in NOT_SAFETY


def _hunt(options: SimOptions | None = None) -> SeedResult | None:
    for size in (3, 5):
        results = run_seeds(
            range(DEFAULT_SEEDS),
            size,
            jobs=1,  # a patch lives in this process only (workers are spawned)
            options=options,
            stop_when=_is_safety_violation,
        )
        if results and _is_safety_violation(results[-1]):
            return results[-1]
    return None


def _caught(
    monkeypatch: pytest.MonkeyPatch,
    patch: Callable[[pytest.MonkeyPatch], None],
    options: SimOptions | None = None,
) -> SeedResult:
    patch(monkeypatch)
    found = _hunt(options)
    assert found is not None, "the simulation missed the broken core"
    report = found.report()
    assert f"--first-seed {found.seed}" in report
    assert f"seed={found.seed}" in report
    monkeypatch.undo()
    clean = run_seed(found.seed, found.size, options)
    assert not _is_safety_violation(clean), f"seed {found.seed} fails without the patch too"
    return found


def _commit_old_term_entries_by_count(mp: pytest.MonkeyPatch) -> None:
    def maybe_commit(self: RaftLog, index: int, term: int) -> bool:
        if index > self.committed:  # the Figure 8 term check is gone
            self.committed = index
            return True
        return False

    mp.setattr(RaftLog, "maybe_commit", maybe_commit)


def _vote_for_any_log(mp: pytest.MonkeyPatch) -> None:
    def vote_log_ok(self: RawNode, m: Message) -> bool:
        return True  # no election restriction: shorter or older logs win votes

    mp.setattr(RawNode, "_vote_log_ok", vote_log_ok)


def _hard_state_without_vote(mp: pytest.MonkeyPatch) -> None:
    def hard_state(self: RawNode) -> HardState:
        return HardState(self.term, None, self.log.committed)  # vote never persisted

    mp.setattr(RawNode, "_hard_state", hard_state)


def _read_without_leadership_check(mp: pytest.MonkeyPatch) -> None:
    def leader_read(self: RawNode, frm: NodeId, context: bytes) -> None:
        # Answer at the local commit index at once: no heartbeat quorum confirms
        # that this node is still the leader.
        self._deliver_read(ReadRequest(0, self.log.committed, frm, context))

    mp.setattr(RawNode, "_leader_read", leader_read)


def _read_before_own_term_commit(mp: pytest.MonkeyPatch) -> None:
    def leader_read(self: RawNode, frm: NodeId, context: bytes) -> None:
        # Quorum-confirmed, but at a commit index a new leader inherited and that may
        # still lag what the previous leader acknowledged.
        self._readonly.add(self.log.committed, frm, context)
        if self._voters == {self.id}:
            for req in self._readonly.release(self.id, self._voters):
                self._deliver_read(req)
        else:
            self._read_heartbeat = True

    mp.setattr(RawNode, "_leader_read", leader_read)


def test_counting_old_term_entries_toward_commit_breaks_the_commit_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = _caught(monkeypatch, _commit_old_term_entries_by_count)
    assert found.invariant == "commit-rule"


def test_counting_old_term_entries_toward_commit_loses_a_committed_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the commit-rule check, Figure 8 itself: the wrongly committed entry
    # is missing from a later leader's log (or overwritten, or applied differently).
    found = _caught(monkeypatch, _commit_old_term_entries_by_count, SimOptions(local_checks=False))
    assert found.invariant in {
        "leader-completeness",
        "committed-entry-lost",
        "state-machine-safety",
        "commit-safety",
    }


def test_granting_votes_to_a_less_up_to_date_log_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = _caught(monkeypatch, _vote_for_any_log)
    assert found.invariant in {
        "leader-completeness",
        "state-machine-safety",
        "committed-entry-lost",
    }


def test_forgetting_to_persist_the_vote_is_caught_at_the_first_grant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = _caught(monkeypatch, _hard_state_without_vote)
    assert found.invariant == "vote-not-durable"


def test_forgetting_to_persist_the_vote_elects_two_leaders_in_one_term(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the persist-before-send check, the end-to-end consequence: a voter
    # restarts, votes again in the same term, and the term gets two leaders.
    found = _caught(monkeypatch, _hard_state_without_vote, SimOptions(local_checks=False))
    assert found.invariant == "election-safety"


def test_reads_served_without_confirming_leadership_are_not_linearizable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = _caught(monkeypatch, _read_without_leadership_check)
    assert found.invariant in {"linearizable-read", "linearizability"}


def test_reads_served_before_the_new_leader_commits_in_its_term_are_not_linearizable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = _caught(monkeypatch, _read_before_own_term_commit)
    assert found.invariant in {"linearizable-read", "linearizability"}
