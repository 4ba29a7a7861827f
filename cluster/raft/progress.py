"""Leader-side replication flow control for one peer: `Progress` and `Inflights`.

The leader keeps one `Progress` per peer. Its state says how entries flow:
PROBE sends one append at a time until the peer's log position is known;
REPLICATE pipelines appends optimistically, bounded by `Inflights` (count and
bytes); SNAPSHOT sends InstallSnapshot chunks and no appends. Pure state: may
import only `.types`; never builds messages (that is `raft.py`'s job).
"""

from __future__ import annotations

import enum
from collections import deque

from .types import Snapshot


class ProgressState(enum.StrEnum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """Appends sent but not yet acknowledged, as (last index, bytes), oldest first."""

    __slots__ = ("_bytes", "_items", "max_bytes", "max_count")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._items: deque[tuple[int, int]] = deque()
        self._bytes = 0

    def add(self, last_index: int, size: int) -> None:
        self._items.append((last_index, size))
        self._bytes += size

    def free_le(self, index: int) -> None:
        """Forget every append whose last entry is at or below `index` (acknowledged)."""
        items = self._items
        while items and items[0][0] <= index:
            self._bytes -= items.popleft()[1]

    def free_first_one(self) -> None:
        if self._items:
            self._bytes -= self._items.popleft()[1]

    def full(self) -> bool:
        return len(self._items) >= self.max_count or self._bytes >= self.max_bytes

    def reset(self) -> None:
        self._items.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class Progress:
    """What the leader knows of one peer's log, and how it may send to it."""

    __slots__ = (
        "inflights",
        "is_learner",
        "match",
        "next",
        "pending_snapshot",
        "probe_sent",
        "recent_active",
        "sent_commit",
        "snap",
        "snap_offset",
        "snap_stall",
        "state",
    )

    def __init__(self, next_index: int, inflights: Inflights, *, is_learner: bool) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False  # PROBE: one append is outstanding; wait for its answer
        self.recent_active = True  # heard from within the current election timeout
        self.is_learner = is_learner
        self.inflights = inflights
        self.sent_commit = 0  # highest commit index told to the peer by an append
        self.pending_snapshot = 0  # SNAPSHOT: index of the snapshot being sent
        self.snap: Snapshot | None = None  # SNAPSHOT: the snapshot being sent, pinned
        self.snap_offset = 0  # SNAPSHOT: bytes the peer has acknowledged
        self.snap_stall = 0  # SNAPSHOT: heartbeats answered since the last chunk ack

    def _reset_state(self, state: ProgressState) -> None:
        self.state = state
        self.probe_sent = False
        self.pending_snapshot = 0
        self.snap = None
        self.snap_offset = 0
        self.snap_stall = 0
        self.inflights.reset()

    def become_probe(self) -> None:
        # Coming back from a snapshot, the peer holds at least the snapshot.
        if self.state is ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snap: Snapshot) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snap.meta.index
        self.snap = snap

    def maybe_update(self, index: int) -> bool:
        """The peer acknowledged entries up to `index`; False if that is old news."""
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """The peer rejected an append at `rejected`; back off towards `match_hint`.

        False when the rejection is stale (answers an append we no longer care about)."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True
