"""Raft log segments: the append-only files of the write-ahead log.

A segment is a sealed file (`sealedfile.py`) named `wal-<seq>.seg`, `seq` a
16-digit hex counter (not the first entry index: a follower overwriting a
conflicting tail writes lower indexes into a later segment). Its records are
entries and hard states, written in *batches*: one `DiskStorage.save()` call
is one batch, written in one go and made durable by one fdatasync. Each record
carries its batch number (counted per segment) and whether it closes its
batch. Batches never span segments.

Recovery keeps whole batches only, so one save is all-or-nothing. The disk may
persist the pages of an unfinished write in any order, so inside the LAST
batch of the LAST segment, a damaged record followed by valid records of the
same batch is a torn write: the batch is cut off with a warning. A damaged
record followed by a record of a later batch (whose save began only after the
damaged one was fsynced), or damage in any segment but the last, is real
corruption: `CorruptLogError`, and nothing is touched.

May import the standard library, `gcks.proto.codec` (msgpack with safe
limits), `.types`, `.sealedfile` and the storage errors. Never logs or raises with entry data.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

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
from .storage_errors import CorruptLogError, StorageError
from .types import Entry, EntryType, HardState

_NAME = re.compile(r"wal-([0-9a-f]{16})\.seg")
_MAX_U64: Final = 2**64 - 1
_ENTRY_TYPES: Final = frozenset(t.value for t in EntryType)


def segment_name(seq: int) -> str:
    return f"wal-{seq:016x}.seg"


def parse_segment_name(name: str) -> int | None:
    """The sequence number of a segment file name, None for any other name."""
    match = _NAME.fullmatch(name)
    return int(match.group(1), 16) if match else None


class WalPosition(NamedTuple):
    """A place in the log: segment sequence number, byte offset. Orders like the log."""

    segment: int
    offset: int


class _Kind(enum.IntEnum):
    ENTRY = 1
    HARD_STATE = 2


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One recovered record: exactly one of `entry` and `hard_state` is set."""

    position: WalPosition
    batch: int
    closes_batch: bool
    entry: Entry | None = None
    hard_state: HardState | None = None


def _encode(item: Entry | HardState, batch: int, closes_batch: bool) -> bytes:
    if isinstance(item, Entry):
        fields: list[object] = [
            _Kind.ENTRY,
            batch,
            closes_batch,
            item.term,
            item.index,
            int(item.type),
            item.data,
        ]
    else:
        fields = [_Kind.HARD_STATE, batch, closes_batch, item.term, item.vote, item.commit]
    return packb(fields)


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value <= _MAX_U64


def _decode(plaintext: bytes, path: Path, position: WalPosition) -> LogRecord:
    """A record's authenticated plaintext. It was sealed by this storage, so a bad
    shape means a bug or a foreign format: an error, never a silent skip."""

    def bad(what: str) -> CorruptLogError:
        return CorruptLogError(path, position.offset, f"authenticated record is malformed ({what})")

    try:
        fields = unpackb(plaintext, max_size=len(plaintext))
    except DecodeError as exc:
        raise bad("not msgpack") from exc
    if not isinstance(fields, list) or len(fields) < 3:
        raise bad("not a record array")
    kind, batch, closes = fields[0], fields[1], fields[2]
    if not _is_u64(batch) or type(closes) is not bool:
        raise bad("batch fields")
    if kind == _Kind.ENTRY and len(fields) == 7:
        _, _, _, term, index, etype, data = fields
        if not (_is_u64(term) and _is_u64(index) and index >= 1 and isinstance(data, bytes)):
            raise bad("entry fields")
        if etype not in _ENTRY_TYPES:
            raise bad("entry type")
        entry = Entry(term=term, index=index, type=EntryType(etype), data=data)
        return LogRecord(position, batch, closes, entry=entry)
    if kind == _Kind.HARD_STATE and len(fields) == 6:
        _, _, _, term, vote, commit = fields
        if not (_is_u64(term) and _is_u64(commit) and (vote is None or isinstance(vote, str))):
            raise bad("hard state fields")
        return LogRecord(position, batch, closes, hard_state=HardState(term, vote, commit))
    raise bad("unknown kind")


class SegmentWriter:
    """Appends batches to one new segment. Never opens an existing file: a
    recovered segment is only read, so no (file, offset) is sealed twice."""

    __slots__ = ("_cipher", "_fd", "_next_batch", "path", "seq", "size")

    def __init__(self, fd: int, path: Path, seq: int, cipher: RecordCipher) -> None:
        self._fd: int | None = fd
        self._cipher = cipher
        self._next_batch = 0
        self.path = path
        self.seq = seq
        self.size = HEADER_SIZE

    @classmethod
    def create(cls, directory: Path, seq: int, key: StorageKey) -> SegmentWriter:
        """A new, durable, empty segment (header written and fsynced, directory fsynced)."""
        path = directory / segment_name(seq)
        header = FileHeader.new(FileKind.SEGMENT)
        fd = create_private_file(path)
        try:
            write_all(fd, header.encode(key))
            os.fsync(fd)
            fsync_directory(directory)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, seq, RecordCipher(key, header))

    @property
    def position(self) -> WalPosition:
        """Where the next record will go."""
        return WalPosition(self.seq, self.size)

    def append_batch(self, items: Sequence[Entry | HardState]) -> None:
        """Writes `items` as one batch and returns once they are on stable storage."""
        if self._fd is None:
            raise StorageError(f"segment {self.path} is closed")
        if not items:
            return
        batch = self._next_batch
        chunks: list[bytes] = []
        offset = self.size
        for i, item in enumerate(items):
            record = self._cipher.seal(offset, _encode(item, batch, i == len(items) - 1))
            chunks.append(record)
            offset += len(record)
        write_all(self._fd, b"".join(chunks))
        # fdatasync also flushes the file size, which is all the metadata an
        # appended record needs to be found again.
        os.fdatasync(self._fd)
        self._next_batch += 1
        self.size = offset

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True, slots=True)
class RecoveredSegment:
    """The durable content of one segment file and what recovery must do to it.

    `truncate_at` is the offset to cut a torn tail at (None: intact);
    `discard` means the file holds nothing (a torn or bare header) and goes."""

    path: Path
    seq: int
    records: list[LogRecord]
    truncate_at: int | None = None
    discard: bool = False
    reason: str = ""


def recover_segment(path: Path, seq: int, key: StorageKey, is_last: bool) -> RecoveredSegment:
    """Reads one segment and decides what of it is durable (see the module doc).

    Raises `CorruptLogError` for damage that must not be repaired silently and
    `WrongStorageKeyError` for a file sealed under another key."""
    data = path.read_bytes()
    header = decode_header(data, key, path, FileKind.SEGMENT)
    if header is None:
        # A segment's header is fsynced before any record is written, so a
        # damaged header with bytes after it cannot be a torn creation.
        if is_last and len(data) <= HEADER_SIZE:
            return RecoveredSegment(path, seq, [], discard=True, reason="torn segment header")
        raise CorruptLogError(path, 0, "damaged segment header")
    scan = RecordCipher(key, header).scan(data)
    records = [_decode(pt, path, WalPosition(seq, off)) for off, pt in scan.records]
    last_closed = not records or records[-1].closes_batch
    if scan.damage is None and last_closed:
        if is_last and not records:
            return RecoveredSegment(path, seq, [], discard=True, reason="segment holds no record")
        return RecoveredSegment(path, seq, records)
    if last_closed:
        open_batch = records[-1].batch + 1 if records else 0
        assert scan.damage is not None
        cut = scan.damage
    else:
        open_batch = records[-1].batch
        cut = next(r.position.offset for r in records if r.batch == open_batch)
    where = scan.damage if scan.damage is not None else cut
    if not is_last:
        raise CorruptLogError(
            path, where, "damaged or unfinished segment followed by later segments"
        )
    for offset, plaintext in scan.later:
        later = _decode(plaintext, path, WalPosition(seq, offset))
        if later.batch != open_batch:
            raise CorruptLogError(
                path,
                where,
                f"unreadable record followed by a valid record at offset {offset} written by a "
                "later save",
            )
    kept = [r for r in records if r.batch < open_batch]
    if scan.damage is None:
        reason = f"last save unfinished (cut at its first record, offset {cut})"
    else:
        reason = f"torn or corrupt tail from offset {scan.damage} (cut at offset {cut})"
    if not kept:
        return RecoveredSegment(path, seq, [], discard=True, reason=reason)
    return RecoveredSegment(path, seq, kept, truncate_at=cut, reason=reason)
