"""In-memory model of one node's durable storage for the Raft simulation.

It holds exactly what a crash must not take away: the snapshot, the log entries
and the hard state that `Ready`s handed to the driver for persistence, and the
snapshots the driver made with `compact()`. Everything else a node has (the
RawNode itself, its state machine, its pending reads) lives outside and is lost
on a crash; a restart rebuilds the node from this object only. A `Ready` that
would leave a hole in the log, or write below the snapshot, is a core bug and
raises `InvariantViolation`. Imports the Raft data types and the simulation's
checker error only; performs no I/O.
"""

from __future__ import annotations

import itertools

from gcks.cluster.raft.types import Entry, HardState, Snapshot

from .checker import InvariantViolation


class DurableLog:
    """The persisted snapshot + log + hard state of one node."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self._entries: list[Entry] = []  # self._entries[k].index == self._offset + k + 1
        self._offset = 0  # index of the snapshot (0 without one)
        self._offset_term = 0

    # -- reads --------------------------------------------------------------------

    @property
    def snapshot_index(self) -> int:
        return self._offset

    @property
    def last_index(self) -> int:
        return self._offset + len(self._entries)

    @property
    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries)

    def term(self, index: int) -> int | None:
        """Term of the entry at `index` (the snapshot's term at its index), or None
        when the index is compacted away or beyond the log."""
        if index == self._offset:
            return self._offset_term
        if self._offset < index <= self.last_index:
            return self._entries[index - self._offset - 1].term
        return None

    def entry(self, index: int) -> Entry | None:
        if self._offset < index <= self.last_index:
            return self._entries[index - self._offset - 1]
        return None

    # -- writes -------------------------------------------------------------------

    def install_snapshot(self, snap: Snapshot) -> None:
        """A snapshot from a Ready replaces the whole log, as the core's own log
        restarts from it."""
        if snap.meta.index < self._offset:
            raise InvariantViolation(
                "persist-order",
                f"{self.node_id}: Ready snapshot at {snap.meta.index} is older than the "
                f"persisted one at {self._offset}",
            )
        self.snapshot = snap
        self._entries = []
        self._offset = snap.meta.index
        self._offset_term = snap.meta.term

    def append(self, entries: tuple[Entry, ...]) -> list[Entry]:
        """Write Ready entries: everything from the first new index on is replaced.
        Returns the replaced entries."""
        if not entries:
            return []
        first = entries[0].index
        if first <= self._offset or first > self.last_index + 1:
            raise InvariantViolation(
                "persist-contiguity",
                f"{self.node_id}: Ready entries start at {first}, persisted log holds "
                f"({self._offset}, {self.last_index}]",
            )
        for prev, cur in itertools.pairwise(entries):
            if cur.index != prev.index + 1:
                raise InvariantViolation(
                    "persist-contiguity",
                    f"{self.node_id}: Ready entries jump from {prev.index} to {cur.index}",
                )
        cut = first - self._offset - 1
        replaced = self._entries[cut:]
        del self._entries[cut:]
        self._entries.extend(entries)
        return replaced

    def set_hard_state(self, hs: HardState) -> None:
        self.hard_state = hs

    def compact(self, snap: Snapshot) -> None:
        """A snapshot the driver made with `compact()`: drop the entries it covers."""
        index = snap.meta.index
        if index <= self._offset:
            return
        if index > self.last_index:
            raise InvariantViolation(
                "compact-range",
                f"{self.node_id}: compacted to {index} beyond persisted last index "
                f"{self.last_index}",
            )
        if self.term(index) != snap.meta.term:
            raise InvariantViolation(
                "compact-term",
                f"{self.node_id}: snapshot at {index} says term {snap.meta.term}, "
                f"the persisted entry has term {self.term(index)}",
            )
        del self._entries[: index - self._offset]
        self._offset = index
        self._offset_term = snap.meta.term
        self.snapshot = snap
