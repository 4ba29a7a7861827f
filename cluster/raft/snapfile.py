"""Raft snapshot files: one sealed file (`sealedfile.py`) per snapshot.

`snap-<index>-<term>.snap` (16 hex digits each) holds a metadata record, then
the snapshot data in chunks. The metadata also says where in the log the
snapshot was taken and whether the log entries after its index were kept (the
log matched the snapshot) or discarded (the snapshot replaced a conflicting
log): recovery replays the log with exactly the decision taken at save time.

Files are written atomically: a `.tmp` file, fsync, rename, directory fsync. A
leftover `.tmp` file is an unfinished write and is removed at open. Reading
verifies every record and the whole shape; any failure is one
`CorruptSnapshotError` (`WrongStorageKeyError` for a file sealed under another
key).

May import the standard library, `gcks.proto.codec` (msgpack with safe
limits), `.types`, `.sealedfile`, `.segment` (for `WalPosition`) and the
storage errors. Never logs or raises
with snapshot data.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gcks.proto.codec import packb, unpackb
from gcks.proto.errors import DecodeError

from .sealedfile import (
    HEADER_SIZE,
    FileHeader,
    FileKind,
    RecordCipher,
    StorageKey,
    create_private_file,
    decode_header,
    fsync_directory,
    write_all,
)
from .segment import WalPosition
from .storage_errors import CorruptSnapshotError
from .types import ConfState, Snapshot, SnapshotMeta

_NAME = re.compile(r"snap-([0-9a-f]{16})-([0-9a-f]{16})\.snap")
TEMP_SUFFIX: Final = ".tmp"
_CHUNK: Final = 4 * 1024 * 1024
_MAX_U64: Final = 2**64 - 1


def snapshot_name(meta: SnapshotMeta) -> str:
    return f"snap-{meta.index:016x}-{meta.term:016x}.snap"


def parse_snapshot_name(name: str) -> tuple[int, int] | None:
    """(index, term) of a snapshot file name, None for any other name."""
    match = _NAME.fullmatch(name)
    return (int(match.group(1), 16), int(match.group(2), 16)) if match else None


def is_snapshot_temp_name(name: str) -> bool:
    return name.endswith(TEMP_SUFFIX) and parse_snapshot_name(name[: -len(TEMP_SUFFIX)]) is not None


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    """A verified snapshot file: the snapshot, the log position it was taken at,
    and whether the log after its index was kept."""

    path: Path
    snapshot: Snapshot
    position: WalPosition
    keeps_log: bool


def write_snapshot(
    directory: Path, key: StorageKey, snapshot: Snapshot, position: WalPosition, keeps_log: bool
) -> Path:
    """Writes `snapshot` durably and atomically; returns its path."""
    meta = snapshot.meta
    path = directory / snapshot_name(meta)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    temp.unlink(missing_ok=True)
    header = FileHeader.new(FileKind.SNAPSHOT)
    cipher = RecordCipher(key, header)
    chunks = [snapshot.data[i : i + _CHUNK] for i in range(0, len(snapshot.data), _CHUNK)]
    fields = [
        meta.index,
        meta.term,
        sorted(meta.conf.voters),
        sorted(meta.conf.learners),
        position.segment,
        position.offset,
        keeps_log,
        len(snapshot.data),
        len(chunks),
    ]
    fd = create_private_file(temp)
    try:
        offset = HEADER_SIZE
        write_all(fd, header.encode(key))
        for plaintext in [packb(fields), *chunks]:
            record = cipher.seal(offset, plaintext)
            write_all(fd, record)
            offset += len(record)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    fsync_directory(directory)
    return path


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value <= _MAX_U64


def _node_ids(value: object) -> frozenset[str] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return frozenset(value)


def read_snapshot(path: Path, key: StorageKey) -> StoredSnapshot:
    """Reads and verifies one snapshot file."""
    data = path.read_bytes()
    header = decode_header(data, key, path, FileKind.SNAPSHOT)
    if header is None:
        raise CorruptSnapshotError(path, "damaged header")
    scan = RecordCipher(key, header).scan(data)
    if scan.damage is not None:
        raise CorruptSnapshotError(path, f"unreadable record at offset {scan.damage}")
    if not scan.records:
        raise CorruptSnapshotError(path, "no metadata record")
    try:
        fields = unpackb(scan.records[0][1], max_size=len(scan.records[0][1]))
    except DecodeError as exc:
        raise CorruptSnapshotError(path, "metadata is not msgpack") from exc
    if not isinstance(fields, list) or len(fields) != 9:
        raise CorruptSnapshotError(path, "metadata has the wrong shape")
    index, term, voters, learners, seg, off, keeps_log, size, count = fields
    voter_ids, learner_ids = _node_ids(voters), _node_ids(learners)
    if not (
        all(_is_u64(v) for v in (index, term, seg, off, size, count))
        and type(keeps_log) is bool
        and voter_ids is not None
        and learner_ids is not None
    ):
        raise CorruptSnapshotError(path, "metadata fields out of range")
    if parse_snapshot_name(path.name) != (index, term):
        raise CorruptSnapshotError(path, "file name does not match the snapshot it holds")
    chunks = [plaintext for _, plaintext in scan.records[1:]]
    data_bytes = b"".join(chunks)
    if len(chunks) != count or len(data_bytes) != size:
        raise CorruptSnapshotError(path, "snapshot data is incomplete")
    meta = SnapshotMeta(index=index, term=term, conf=ConfState(voter_ids, learner_ids))
    return StoredSnapshot(path, Snapshot(meta, data_bytes), WalPosition(seg, off), keeps_log)
