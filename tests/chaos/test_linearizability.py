"""The Wing-Gong-Lowe checker itself, on histories whose verdict is known.

A checker that accepts everything would make every chaos run green, so it is
proved here on known non-linearizable histories (stale reads, lost writes,
reads of values never written, real-time order violations) as well as on
tricky linearizable ones (overlapping operations, unknown outcomes).
"""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from tests.chaos.linearizability import Call, MembershipModel, Verdict, check


def add(i: int, t0: float, t1: float | None, member: str) -> Call:
    return Call(i, t0, t1, "add", member)


def remove(i: int, t0: float, t1: float | None, member: str) -> Call:
    return Call(i, t0, t1, "remove", member)


def read(i: int, t0: float, t1: float, *members: str) -> Call:
    return Call(i, t0, t1, "read", result=frozenset(members))


def verdict(*calls: Call) -> Verdict:
    return check(list(calls), MembershipModel()).verdict


def test_empty_history_is_linearizable() -> None:
    assert verdict() is Verdict.LINEARIZABLE


def test_sequential_add_then_read_is_linearizable() -> None:
    assert verdict(add(0, 0, 1, "a"), read(1, 2, 3, "a")) is Verdict.LINEARIZABLE


def test_stale_read_after_acknowledged_add_is_not_linearizable() -> None:
    assert verdict(add(0, 0, 1, "a"), read(1, 2, 3)) is Verdict.NOT_LINEARIZABLE


def test_read_of_a_member_never_added_is_not_linearizable() -> None:
    assert verdict(add(0, 0, 1, "a"), read(1, 2, 3, "a", "b")) is Verdict.NOT_LINEARIZABLE


def test_lost_remove_is_not_linearizable() -> None:
    history = (add(0, 0, 1, "a"), remove(1, 2, 3, "a"), read(2, 4, 5, "a"))
    assert verdict(*history) is Verdict.NOT_LINEARIZABLE


def test_read_concurrent_with_add_may_see_either_state() -> None:
    assert verdict(add(0, 0, 10, "a"), read(1, 1, 2)) is Verdict.LINEARIZABLE
    assert verdict(add(0, 0, 10, "a"), read(1, 1, 2, "a")) is Verdict.LINEARIZABLE


def test_reads_that_flip_back_violate_real_time_order() -> None:
    # Both reads overlap the add, but the second starts after the first saw "a":
    # seeing the set without "a" again is impossible.
    history = (add(0, 0, 10, "a"), read(1, 1, 2, "a"), read(2, 3, 4))
    assert verdict(*history) is Verdict.NOT_LINEARIZABLE


def test_unknown_outcome_may_have_taken_effect_or_not() -> None:
    assert verdict(add(0, 0, None, "a"), read(1, 5, 6, "a")) is Verdict.LINEARIZABLE
    assert verdict(add(0, 0, None, "a"), read(1, 5, 6)) is Verdict.LINEARIZABLE


def test_unknown_outcome_cannot_take_effect_before_its_invocation() -> None:
    assert verdict(read(0, 0, 1, "a"), add(1, 2, None, "a")) is Verdict.NOT_LINEARIZABLE


def test_unknown_outcome_takes_effect_at_most_once() -> None:
    # Seen, then gone with no remove, then seen again: one add cannot do that.
    history = (
        add(0, 0, None, "a"),
        read(1, 1, 2, "a"),
        remove(2, 3, 4, "a"),
        read(3, 5, 6),
        read(4, 7, 8, "a"),
    )
    assert verdict(*history) is Verdict.NOT_LINEARIZABLE


def test_two_concurrent_writers_one_order_explains_the_reads() -> None:
    history = (
        add(0, 0, 5, "a"),
        remove(1, 0, 5, "a"),
        read(2, 6, 7),
        read(3, 8, 9),
    )
    assert verdict(*history) is Verdict.LINEARIZABLE


def test_reads_disagreeing_on_the_order_of_two_writes_are_not_linearizable() -> None:
    # After both overlapping writes complete, two sequential reads must agree.
    history = (
        add(0, 0, 5, "a"),
        remove(1, 0, 5, "a"),
        read(2, 6, 7),
        read(3, 8, 9, "a"),
    )
    assert verdict(*history) is Verdict.NOT_LINEARIZABLE


def evict(i: int, t0: float, t1: float | None, member: str) -> Call:
    return Call(i, t0, t1, "evict", member)


def test_acknowledged_registration_after_eviction_is_not_linearizable() -> None:
    history = (add(0, 0, 1, "a"), evict(1, 2, 3, "a"), add(2, 4, 5, "a"))
    assert verdict(*history) is Verdict.NOT_LINEARIZABLE


def test_unknown_registration_of_an_evicted_member_changes_nothing() -> None:
    history = (add(0, 0, 1, "a"), evict(1, 2, 3, "a"), add(2, 4, None, "a"), read(3, 6, 7))
    assert verdict(*history) is Verdict.LINEARIZABLE


def test_eviction_of_a_non_member_bans_nothing() -> None:
    history = (evict(0, 0, 1, "a"), add(1, 2, 3, "a"), read(2, 4, 5, "a"))
    assert verdict(*history) is Verdict.LINEARIZABLE


def test_failure_report_names_where_the_search_got_stuck() -> None:
    result = check([add(0, 0, 1, "a"), read(1, 2, 3)], MembershipModel())
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    assert result.stuck_at == 1


def test_search_budget_gives_unknown_rather_than_a_wrong_verdict() -> None:
    calls = [add(i, 0, 100, f"m{i}") for i in range(12)] + [read(12, 0, 100, "zz")]
    assert check(calls, MembershipModel(), max_steps=50).verdict is Verdict.UNKNOWN


def sequential_history(seed: int, length: int) -> list[Call]:
    """A history produced by a real sequential set, with operations stretched
    to overlap their neighbours: always linearizable."""
    rng = random.Random(seed)
    state: set[str] = set()
    calls: list[Call] = []
    for i in range(length):
        point = 10.0 * i
        t0, t1 = point - rng.uniform(0, 12), point + rng.uniform(0, 12)
        member = rng.choice("abc")
        action = rng.choice(("add", "remove", "read"))
        if action == "add":
            state.add(member)
            calls.append(add(i, t0, t1, member))
        elif action == "remove":
            state.discard(member)
            calls.append(remove(i, t0, t1, member))
        else:
            # A read must not overlap a write that might be ordered after it.
            calls.append(read(i, point - 0.1, point + 0.1, *state))
    return calls


@given(st.integers(0, 2**32), st.integers(1, 30))
def test_histories_of_a_real_sequential_set_are_linearizable(seed: int, length: int) -> None:
    calls = sequential_history(seed, length)
    assert check(calls, MembershipModel()).verdict is Verdict.LINEARIZABLE


@given(st.integers(0, 2**32), st.integers(2, 30))
def test_a_read_that_adds_a_phantom_member_is_caught(seed: int, length: int) -> None:
    calls = sequential_history(seed, length)
    last = len(calls) * 10.0 + 100
    phantom = read(len(calls), last, last + 1, "phantom")
    assert check([*calls, phantom], MembershipModel()).verdict is Verdict.NOT_LINEARIZABLE
