"""Errors of the durable Raft storage (`storage.py`, `segment.py`, `snapfile.py`).

Every error the storage raises on purpose is a `StorageError`; each says which
file (and offset) is at fault and what the operator can do. The storage holds
group keys, so no message ever contains key bytes, entry data or snapshot
data: at most a key fingerprint. May import only the standard library.
"""

from __future__ import annotations

from pathlib import Path


class StorageError(Exception):
    """Base of every error the durable Raft storage raises on purpose."""


class StorageKeyError(StorageError):
    """The node storage key is missing, unreadable or malformed (configuration error)."""


class WrongStorageKeyError(StorageError):
    """A file was written under a different node storage key than the one given."""


class StorageLockedError(StorageError):
    """Another process (or another open storage) already holds this data directory."""


class StorageFailedError(StorageError):
    """An earlier write or fsync failed: what reached the disk is unknown, so the
    storage refuses further work. Restart the node; recovery repairs the log."""


class CorruptLogError(StorageError):
    """A log segment holds damage that recovery must not repair silently: a corrupt
    record followed by records of later saves, a damaged segment that is not the
    last, a missing segment. Nothing was truncated or deleted."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(
            f"corrupt Raft log {path} at byte offset {offset}: {reason}; nothing was repaired. "
            "Restore the node from its peers (wipe the data directory and re-add the node)."
        )
        self.path = path
        self.offset = offset


class LogGapError(CorruptLogError):
    """The log does not continue from the chosen snapshot (entries are missing)."""


class CorruptSnapshotError(StorageError):
    """A snapshot file failed verification, and no older snapshot that the log still
    covers can replace it (or the file was asked for directly)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"corrupt snapshot {path}: {reason}")
        self.path = path
