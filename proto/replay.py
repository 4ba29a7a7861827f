"""Sliding anti-replay window over 64-bit sequence numbers (RFC 4303 §3.4.3, RFC 6479).

A receiver keeps one window per (DATA SA, sender). The API has two steps on
purpose: `check(seq)` runs BEFORE decryption, so replayed or stale packets
cost no cryptography; `commit(seq)` runs only AFTER the packet authenticated,
so a forged packet carrying a huge sequence number can never slide the window
forward and lock out the genuine sender.

The window of `size` sequence numbers is a ring of flags (RFC 6479, "without
bit shifting"): sequence `s` lives in slot `s % size`. Moving forward clears
only the slots skipped over, so the in-order case costs the same for a window
of 64 or 4096, where a shifted integer bitmask would copy the whole mask on
every packet. Nothing an input does can grow the state beyond `size` bytes.

May import: the standard library and `gcks.proto.errors`. Must never: read a
clock, do I/O, or raise anything but `ReplayError` on untrusted input.
"""

from __future__ import annotations

from gcks.proto.errors import ReplayError

__all__ = ["MAX_SEQUENCE", "MAX_WINDOW_SIZE", "MIN_WINDOW_SIZE", "ReplayWindow"]

MIN_WINDOW_SIZE = 32
MAX_WINDOW_SIZE = 1 << 16
MAX_SEQUENCE = (1 << 64) - 1


class ReplayWindow:
    """Anti-replay state for one sender under one SA. Not thread-safe; sans-IO.

    `highest` is the highest sequence number accepted so far (-1: none yet).
    It is read-only for callers: hot paths read it to skip `check` for a
    sequence number above it, which is always new.
    """

    __slots__ = ("_seen", "_size", "highest")

    def __init__(self, size: int) -> None:
        if not MIN_WINDOW_SIZE <= size <= MAX_WINDOW_SIZE:
            raise ValueError(
                f"replay window size {size} outside {MIN_WINDOW_SIZE}..{MAX_WINDOW_SIZE}"
            )
        self._size = size
        # Slot s % size is 1 iff sequence s, within the window, was accepted.
        self._seen = bytearray(size)
        # -1: nothing accepted yet, so every sequence number (0 included) is new.
        self.highest = -1

    @property
    def size(self) -> int:
        return self._size

    def check(self, seq: int) -> None:
        """Raise `ReplayError` if `seq` was already accepted or is older than the window."""
        top = self.highest
        if seq > top:
            return
        if top - seq >= self._size or seq < 0:
            raise ReplayError(f"sequence {seq} is older than the replay window (highest {top})")
        if self._seen[seq % self._size]:
            raise ReplayError(f"sequence {seq} was already accepted")

    def commit(self, seq: int) -> None:
        """Record `seq` as accepted. Call only after the packet authenticated.

        Re-checks, so a commit that would accept a duplicate raises `ReplayError`
        instead of silently succeeding: accepting a sequence number is atomic.
        """
        top = self.highest
        size = self._size
        if seq > top:
            if seq > MAX_SEQUENCE:
                raise ReplayError(f"sequence {seq} beyond 2^64-1")
            if seq - top > 1:
                self._forget_skipped(top, seq)
            # The slot held seq - size (or older): it just left the window.
            self._seen[seq % size] = 1
            self.highest = seq
            return
        self.check(seq)
        self._seen[seq % size] = 1

    def _forget_skipped(self, top: int, seq: int) -> None:
        """Clear the slots of top+1 .. seq-1: they still hold flags of numbers that
        have now left the window, and those numbers themselves were never seen."""
        size = self._size
        skipped = seq - top - 1
        if skipped >= size:
            self._seen[:] = bytes(size)
            return
        first = (top + 1) % size
        end = first + skipped
        if end <= size:
            self._seen[first:end] = bytes(skipped)
        else:
            self._seen[first:] = bytes(size - first)
            self._seen[: end - size] = bytes(end - size)

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self._size}, highest={self.highest})"
