"""Specification of the anti-replay window (gcks.proto.replay)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcks.proto.errors import ReplayError
from gcks.proto.replay import MAX_SEQUENCE, ReplayWindow


def examples(floor: int) -> int:
    """`floor` examples, or more when a deeper hypothesis profile is loaded."""
    return max(floor, settings().max_examples)


def accept(window: ReplayWindow, seq: int) -> None:
    window.check(seq)
    window.commit(seq)


def test_fresh_window_accepts_any_sequence_including_zero() -> None:
    window = ReplayWindow(64)
    accept(window, 0)
    assert window.highest == 0
    other = ReplayWindow(64)
    accept(other, MAX_SEQUENCE)
    assert other.highest == MAX_SEQUENCE


def test_in_window_duplicate_rejected() -> None:
    window = ReplayWindow(64)
    for seq in (1, 2, 3, 10):
        accept(window, seq)
    for seq in (1, 2, 3, 10):
        with pytest.raises(ReplayError):
            window.check(seq)


def test_out_of_order_within_window_accepted_once() -> None:
    window = ReplayWindow(64)
    accept(window, 100)
    accept(window, 37)  # 100 - 63: the oldest slot of a 64-wide window
    accept(window, 99)
    with pytest.raises(ReplayError):
        window.check(37)
    assert window.highest == 100


def test_too_old_rejected() -> None:
    window = ReplayWindow(64)
    accept(window, 100)
    with pytest.raises(ReplayError, match="older"):
        window.check(36)  # 100 - 64: just outside


def test_check_alone_never_moves_the_window() -> None:
    window = ReplayWindow(64)
    accept(window, 10)
    window.check(1_000_000)  # e.g. a forged packet that will fail authentication
    assert window.highest == 10
    accept(window, 9)


def test_commit_refuses_a_duplicate_so_acceptance_is_atomic() -> None:
    window = ReplayWindow(64)
    accept(window, 5)
    with pytest.raises(ReplayError):
        window.commit(5)


def test_jump_beyond_window_forgets_history_without_huge_shift() -> None:
    window = ReplayWindow(4096)
    accept(window, 0)
    accept(window, MAX_SEQUENCE)  # shifting by 2^64 would exhaust memory
    accept(window, MAX_SEQUENCE - 4095)
    with pytest.raises(ReplayError):
        window.check(MAX_SEQUENCE - 4096)


def test_sequence_beyond_64_bits_rejected() -> None:
    with pytest.raises(ReplayError):
        ReplayWindow(64).commit(MAX_SEQUENCE + 1)


@pytest.mark.parametrize("size", [0, 31, (1 << 16) + 1])
def test_window_size_outside_limits_refused(size: int) -> None:
    with pytest.raises(ValueError, match="window size"):
        ReplayWindow(size)


@settings(max_examples=examples(300))
@given(
    size=st.sampled_from([32, 64, 1024]),
    seqs=st.lists(st.integers(min_value=0, max_value=3000), max_size=200),
)
def test_window_matches_the_set_model(size: int, seqs: list[int]) -> None:
    """Accepted iff never accepted before and within `size` of the highest accepted."""
    window = ReplayWindow(size)
    seen: set[int] = set()
    for seq in seqs:
        expected = seq not in seen and (not seen or seq > max(seen) - size)
        try:
            accept(window, seq)
        except ReplayError:
            assert not expected
        else:
            assert expected
            seen.add(seq)


@settings(max_examples=examples(300))
@given(
    size=st.sampled_from([32, 33, 100]),
    start=st.integers(min_value=0, max_value=MAX_SEQUENCE - 20_000),
    steps=st.lists(st.integers(min_value=-120, max_value=150), max_size=150),
)
def test_window_matches_the_set_model_on_mostly_increasing_sequences(
    size: int, start: int, steps: list[int]
) -> None:
    """Like real traffic: mostly forward, with reordering, gaps and wrap-around of slots."""
    window = ReplayWindow(size)
    seen: set[int] = set()
    seq = start
    for step in steps:
        seq = max(0, seq + step)
        expected = seq not in seen and (not seen or seq > max(seen) - size)
        try:
            accept(window, seq)
        except ReplayError:
            assert not expected
        else:
            assert expected
            seen.add(seq)


def test_gap_clears_stale_slots_across_the_ring_boundary() -> None:
    window = ReplayWindow(32)
    for seq in range(40):
        accept(window, seq)
    accept(window, 70)  # skips 40..69, whose slots (8..31, 0..5) wrap around the ring
    for seq in range(40, 70):
        accept(window, seq)
    for seq in range(39, 71):
        with pytest.raises(ReplayError):
            window.check(seq)
