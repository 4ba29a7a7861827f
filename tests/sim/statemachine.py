"""The replicated state machine of the Raft simulation: the list of client write
ids in the order they were applied, each id once.

Client writes are NORMAL entries whose data is `b"w<id>"`; a write that the
network delivered twice to the leader is in the log twice but applied once, as
a real state machine with client sessions would. A snapshot is the applied index
plus the id list. Pure data, no I/O; imports the Raft data types only.
"""

from __future__ import annotations

from gcks.cluster.raft.types import Entry, EntryType, Snapshot


def write_data(wid: int) -> bytes:
    return b"w%d" % wid


def write_id(entry: Entry) -> int | None:
    """The client write id an entry carries, or None (no-op, membership change)."""
    if entry.type is EntryType.NORMAL and entry.data[:1] == b"w":
        return int(entry.data[1:])
    return None


class AppliedState:
    """One node's state machine."""

    __slots__ = ("_seen", "index", "writes")

    def __init__(self, index: int = 0, writes: list[int] | None = None) -> None:
        self.index = index
        self.writes: list[int] = writes if writes is not None else []
        self._seen = set(self.writes)

    def apply(self, entry: Entry) -> None:
        self.index = entry.index
        wid = write_id(entry)
        if wid is not None and wid not in self._seen:
            self._seen.add(wid)
            self.writes.append(wid)

    def encode(self) -> bytes:
        return b",".join(b"%d" % w for w in self.writes)

    @classmethod
    def from_snapshot(cls, snap: Snapshot | None) -> AppliedState:
        if snap is None:
            return cls()
        data = snap.data
        writes = [int(x) for x in data.split(b",")] if data else []
        return cls(snap.meta.index, writes)
