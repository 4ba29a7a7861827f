"""The Raft log as the core sees it: entries after the last snapshot, in memory.

`RaftLog` knows which entries are committed, which were handed to the state
machine, and which the driver has not yet persisted ("unstable": after
`stabled`). It implements the log rules of the Raft paper: the consistency
check of AppendEntries, conflict truncation, the up-to-date test of §5.4.1 and
the Figure 8 commit rule. Durable storage is the driver's job
(`storage.py`); this module never does I/O and may import only `.types`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .types import Entry, Snapshot

# Per-entry bookkeeping counted on top of the data when batching by bytes.
ENTRY_OVERHEAD = 16


def entry_size(e: Entry) -> int:
    return len(e.data) + ENTRY_OVERHEAD


class LogInvariantError(AssertionError):
    """The core was asked to break a log invariant (e.g. truncate committed entries): a bug."""


class RaftLog:
    """Entries `offset+1 ..` in a list; `offset`/`offset_term` are the snapshot's index/term."""

    __slots__ = (
        "_entries",
        "applied",
        "applying",
        "committed",
        "offset",
        "offset_term",
        "pending_snapshot",
        "snapshot",
        "stabled",
    )

    def __init__(self, snapshot: Snapshot | None, entries: Sequence[Entry], committed: int) -> None:
        self.offset = snapshot.meta.index if snapshot is not None else 0
        self.offset_term = snapshot.meta.term if snapshot is not None else 0
        self.snapshot = snapshot  # newest snapshot, sent to peers that lag behind it
        self.pending_snapshot: Snapshot | None = None  # received, not yet handed out
        # Entries at or below the snapshot are already in it; ignore them.
        self._entries: list[Entry] = [e for e in entries if e.index > self.offset]
        expected = self.offset + 1
        for e in self._entries:
            if e.index != expected:
                raise LogInvariantError(f"entries not contiguous at index {e.index}")
            expected += 1
        self.stabled = self.last_index()
        self.committed = max(self.offset, min(committed, self.last_index()))
        self.applied = self.offset  # the state machine holds the snapshot
        self.applying = self.offset  # highest index handed out for applying

    # -- lookups ---------------------------------------------------------------

    def first_index(self) -> int:
        return self.offset + 1

    def last_index(self) -> int:
        return self.offset + len(self._entries)

    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.offset_term

    def term(self, index: int) -> int | None:
        """Term of the entry at `index`; None if compacted away or not (yet) in the log."""
        i = index - self.offset
        if i == 0:
            return self.offset_term
        if 0 < i <= len(self._entries):
            return self._entries[i - 1].term
        return None

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def entries_from(self, lo: int, max_size: int) -> list[Entry]:
        """Entries from `lo` to the end, cut after `max_size` bytes (always at least one)."""
        start = lo - self.offset - 1
        if start < 0:
            raise LogInvariantError(f"entries from {lo} are compacted")
        ents = self._entries
        end = len(ents)
        size = 0
        i = start
        while i < end:
            size += len(ents[i].data) + ENTRY_OVERHEAD
            if size > max_size and i > start:
                break
            i += 1
        return ents[start:i]

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index < hi (both within the log)."""
        return self._entries[lo - self.offset - 1 : hi - self.offset - 1]

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: may a candidate whose log ends at (last_index, last_term) get our vote?"""
        my_term = self.last_term()
        return last_term > my_term or (last_term == my_term and last_index >= self.last_index())

    # -- conflicts -------------------------------------------------------------

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """Index of the first entry that is new or disagrees with ours in term; 0 if none."""
        for e in entries:
            if self.term(e.index) != e.term:
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """Largest (i, term(i)) with i <= index and term(i) <= term: where our log may agree.

        Lets a leader skip a whole term of mismatching entries per round trip
        instead of one entry (etcd's fast back-off). Returns (offset, 0) when
        the answer lies inside the snapshot."""
        i = min(index, self.last_index())
        while i > self.offset:
            t = self._entries[i - self.offset - 1].term
            if t <= term:
                return i, t
            i -= 1
        return self.offset, (self.offset_term if self.offset_term <= term else 0)

    # -- mutation --------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> None:
        """Append entries, truncating any of ours from entries[0].index on."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.committed:
            raise LogInvariantError(f"truncating committed index {first} <= {self.committed}")
        cut = first - self.offset - 1
        if cut < len(self._entries):
            del self._entries[cut:]
            self.stabled = min(self.stabled, first - 1)
        elif cut > len(self._entries):
            raise LogInvariantError(f"gap before index {first}")
        self._entries.extend(entries)

    def maybe_append(
        self, index: int, log_term: int, committed: int, entries: Sequence[Entry]
    ) -> int | None:
        """AppendEntries consistency check and append; the new last index, or None on mismatch."""
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(entries)
        ci = self.find_conflict(entries)
        if ci:
            self.append(entries[ci - index - 1 :])
        self.commit_to(min(committed, last_new))
        return last_new

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise LogInvariantError(f"commit {index} beyond last index {self.last_index()}")
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Commit up to `index` if its entry is of `term` (the leader's current term).

        Raft Figure 8: an entry of an older term is never committed by counting
        replicas, only indirectly when a current-term entry after it commits."""
        if index > self.committed and self.term(index) == term:
            self.committed = index
            return True
        return False

    def has_unstable(self) -> bool:
        return self.stabled < self.last_index()

    def unstable_entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries[self.stabled - self.offset :])

    def stable_to(self, index: int, term: int) -> None:
        # A truncation since the entries were handed out makes the report stale.
        if self.term(index) == term and index > self.stabled:
            self.stabled = index

    def has_next_committed(self) -> bool:
        return self.committed > self.applying

    def next_committed(self) -> tuple[Entry, ...]:
        lo = self.applying + 1
        if lo > self.committed:
            return ()
        return tuple(self._entries[lo - self.offset - 1 : self.committed - self.offset])

    def compact(self, snap: Snapshot) -> None:
        """Drop entries covered by `snap` (a snapshot of our own applied state)."""
        index = snap.meta.index
        if index <= self.offset or index > self.applied:
            raise LogInvariantError(
                f"compaction index {index} outside ({self.offset}, {self.applied}]"
            )
        del self._entries[: index - self.offset]
        self.offset = index
        self.offset_term = snap.meta.term
        self.snapshot = snap

    def restore(self, snap: Snapshot) -> None:
        """Replace the whole log by a snapshot received from the leader."""
        self._entries = []
        self.offset = snap.meta.index
        self.offset_term = snap.meta.term
        self.snapshot = snap
        self.pending_snapshot = snap
        self.committed = snap.meta.index
        self.stabled = snap.meta.index
        self.applying = snap.meta.index
