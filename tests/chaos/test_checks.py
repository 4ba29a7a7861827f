"""The post-run checks catch what they are meant to, on hand-made records.

A chaos run is only as strong as its judge: each check here is fed a small
history with exactly one planted fault (a lost acknowledgement, two key sets
for one message id, a replayed id, an evicted member that kept reading) and
must name it, while the clean variants pass.
"""

from __future__ import annotations

from tests.chaos.checks import (
    FinalState,
    check_agreement,
    check_forward_secrecy,
    check_history,
    check_lost_acknowledgements,
    check_monotonic,
)
from tests.chaos.history import History, KeyEvent, Outcome


def op(
    history: History,
    kind: str,
    member: str | None,
    t0: float,
    t1: float,
    outcome: Outcome = Outcome.OK,
    value: tuple[str, ...] | None = None,
) -> None:
    record = history.invoke("c", kind, member, t0)
    history.complete(record, outcome, t1, value=value)


def final(*members: str, msg_id: int = 10, retransmit: int = 0) -> FinalState:
    return FinalState(frozenset(members), msg_id, retransmit)


def test_acknowledged_registration_missing_at_the_end_is_lost() -> None:
    history = History()
    op(history, "register", "m1", 0, 1)
    assert check_lost_acknowledgements(history, final("m1")) == []
    [violation] = check_lost_acknowledgements(history, final())
    assert violation.check == "lost-ack"
    assert "m1" in violation.message


def test_registration_overtaken_by_an_unknown_deregistration_is_not_lost() -> None:
    history = History()
    op(history, "register", "m1", 0, 1)
    op(history, "deregister", "m1", 2, 3, Outcome.INFO)
    assert check_lost_acknowledgements(history, final()) == []
    assert check_lost_acknowledgements(history, final("m1")) == []


def test_acknowledged_eviction_undone_is_lost() -> None:
    history = History()
    op(history, "register", "m1", 0, 1)
    op(history, "evict", "m1", 2, 3, value=("5",))
    assert len(check_lost_acknowledgements(history, final("m1"))) == 1
    assert check_lost_acknowledgements(history, final()) == []


def test_acknowledged_rekey_above_the_final_message_id_is_lost() -> None:
    history = History()
    op(history, "rekey", None, 0, 1, value=("12",))
    assert len(check_lost_acknowledgements(history, final(msg_id=11))) == 1
    assert check_lost_acknowledgements(history, final(msg_id=12)) == []


def test_final_policy_must_be_the_last_acknowledged_update_or_a_later_one() -> None:
    history = History()
    op(history, "policy", None, 0, 1, value=("2",))
    op(history, "policy", None, 2, 3, value=("3",))
    assert check_lost_acknowledgements(history, final(retransmit=3)) == []
    assert len(check_lost_acknowledgements(history, final(retransmit=2))) == 1
    op(history, "policy", None, 4, 5, Outcome.INFO, value=("1",))
    assert check_lost_acknowledgements(history, final(retransmit=1)) == []


def test_two_key_sets_for_one_message_id_break_agreement() -> None:
    history = History()
    history.key_events += [
        KeyEvent("m1", 1, 7, "kek-a", "tek-a", "rekey"),
        KeyEvent("m2", 1, 7, "kek-a", "tek-a", "gsa"),
    ]
    assert check_agreement(history) == []
    history.key_events.append(KeyEvent("m3", 2, 7, "kek-b", "tek-a", "rekey"))
    [violation] = check_agreement(history)
    assert "message id 7" in violation.message


def test_accepting_an_old_or_repeated_message_id_breaks_monotonicity() -> None:
    history = History()
    history.key_events += [
        KeyEvent("m1", 1, 3, "k", "t", "gsa"),
        KeyEvent("m1", 2, 3, "k", "t", "gsa again"),  # a re-registration may see the same id
        KeyEvent("m1", 3, 4, "k", "t", "rekey"),
    ]
    assert check_monotonic(history) == []
    history.key_events.append(KeyEvent("m1", 4, 4, "k", "t", "rekey"))
    history.key_events.append(KeyEvent("m1", 5, 2, "k", "t", "gsa"))
    assert len(check_monotonic(history)) == 2


def test_evicted_member_accepting_its_eviction_message_breaks_forward_secrecy() -> None:
    history = History()
    op(history, "register", "m1", 0, 1)
    op(history, "evict", "m1", 2, 3, value=("5", "6"))
    history.key_events.append(KeyEvent("m1", 1, 4, "k", "t", "rekey"))
    assert check_forward_secrecy(history) == []
    history.key_events.append(KeyEvent("m1", 4, 5, "k2", "t", "rekey"))
    [violation] = check_forward_secrecy(history)
    assert violation.check == "forward-secrecy"


def test_stale_member_list_is_reported_as_not_linearizable() -> None:
    history = History()
    op(history, "register", "m1", 0, 1)
    op(history, "read", None, 2, 3, value=())
    _, violations = check_history(history, final("m1"))
    assert [v.check for v in violations] == ["linearizable"]


def test_failed_operations_are_not_taken_as_effects() -> None:
    history = History()
    op(history, "register", "m1", 0, 1, Outcome.FAIL)
    op(history, "read", None, 2, 3, value=())
    result, violations = check_history(history, final())
    assert violations == []
    assert result.verdict == "linearizable"


def test_an_operation_still_open_may_have_taken_effect() -> None:
    # Seen by a chaos run: an eviction cancelled at the end of the workload had
    # happened; ignoring it made the final read look impossible.
    history = History()
    op(history, "register", "m1", 0, 1)
    op(history, "read", None, 2, 3, value=("m1",))
    history.invoke("admin", "evict", "m1", 4)
    op(history, "read", None, 6, 7, value=())
    result, violations = check_history(history, final())
    assert violations == []
    assert result.verdict == "linearizable"
