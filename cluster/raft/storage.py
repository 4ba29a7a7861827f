"""Durable, encrypted storage of one node's Raft state: log, hard state, snapshots.

`DiskStorage` keeps, in one data directory (mode 0700, files 0600):

- log segments `wal-<seq>.seg` (`segment.py`): append-only; one `save()` is
  one batch of records made durable by ONE fdatasync; a new segment is started
  once the current one passes `segment_bytes`, and after every open (a recovered
  file is never appended to);
- snapshots `snap-<index>-<term>.snap` (`snapfile.py`), the newest two;
- `LOCK`, held with flock while the storage is open.

Everything is sealed under the node storage key (`sealedfile.py`). Entries
are logical: an entry whose index is at or below the last stored one replaces
the stored suffix from there (a follower overwriting a conflicting tail), so
recovery replays records in order. Each snapshot file records where in the
log it was taken and whether the entries after its index were kept (the log
matched it) or dropped (it replaced a conflicting log); replay applies that
decision at that point. The log is kept back to the OLDER of the two kept
snapshots, so a newest snapshot that fails verification can fall back to the
previous one (set aside as `*.corrupt`, with a warning), provided it had kept
the log; one that had replaced a conflicting log cannot be skipped, and
recovery stops with `CorruptSnapshotError`.

Blocking, synchronous code: the trio driver calls it through
`trio.to_thread.run_sync`, one thread at a time (no internal locking). May
import the standard library, `cryptography`, msgpack, `gcks.proto.sa` and this
package's `types`, `segment`, `snapfile`, `sealedfile` and storage errors.
Must never log, raise or repr key bytes, entry data or snapshot data.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import itertools
import logging
import os
import stat
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final

from .sealedfile import STORAGE_KEY_SIZE, StorageKey, fsync_directory
from .segment import (
    LogRecord,
    RecoveredSegment,
    SegmentWriter,
    WalPosition,
    parse_segment_name,
    recover_segment,
    segment_name,
)
from .snapfile import (
    StoredSnapshot,
    is_snapshot_temp_name,
    parse_snapshot_name,
    read_snapshot,
    write_snapshot,
)
from .storage_errors import (
    CorruptLogError,
    CorruptSnapshotError,
    LogGapError,
    StorageError,
    StorageFailedError,
    StorageKeyError,
    StorageLockedError,
    WrongStorageKeyError,
)
from .types import Entry, HardState, Snapshot

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "CorruptLogError",
    "CorruptSnapshotError",
    "DiskStorage",
    "RecoveredState",
    "StorageError",
    "StorageFailedError",
    "StorageKeyError",
    "StorageLockedError",
    "WrongStorageKeyError",
    "load_storage_key",
]

logger = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES: Final = 64 * 1024 * 1024
_LOCK_NAME: Final = "LOCK"
_CORRUPT_SUFFIX: Final = ".corrupt"
_MAX_KEY_FILE_BYTES: Final = 4096
_MAX_U64: Final = 2**64 - 1


@dataclass(frozen=True, slots=True)
class RecoveredState:
    """What `DiskStorage.open` recovered: the hard state, the snapshot (None: none
    yet), and the log entries after it, in order, conflicts already resolved."""

    hard_state: HardState
    snapshot: Snapshot | None
    entries: list[Entry] = field(repr=False)  # entries can hold group keys


class _Replay:
    """Rebuilds the log from the recovered records and one snapshot.

    `entries` is a contiguous run of the log starting at index `start`. Before
    the snapshot's log position the run "floats": segments dropped by
    compaction leave no trace, so it starts wherever the first record does,
    and a jump restarts it. At the position the snapshot's saved decision
    applies (keep the entries after its index, or drop them all). From there
    on the run may only move by writes a correct storage makes; it may begin
    above `base + 1` only when replaying an older snapshot (the fallback),
    whose first entries compaction may have dropped because later writes
    replaced them, and by the end such a hole must be overwritten, else
    `LogGapError`."""

    def __init__(self, stored: StoredSnapshot | None, segments: dict[int, Path]) -> None:
        self._stored = stored
        self._applied = stored is None
        self._paths = segments
        self._last_written = 0  # last index in record order, for `live`
        self._first_after_base: WalPosition | None = None
        self.base = 0
        self.base_term = 0
        self.start = 1
        self.entries: list[Entry] = []
        self.hard_state = HardState()
        self.hard_state_segment: int | None = None
        # Per segment, the highest index among its entries still in the log
        # (kept conservative: a too-high value only delays deleting a segment).
        self.live: dict[int, int] = dict.fromkeys(segments, 0)

    def feed(self, record: LogRecord) -> None:
        if (
            self._stored is not None
            and not self._applied
            and record.position >= self._stored.position
        ):
            self._apply_snapshot()
        if record.hard_state is not None:
            self.hard_state = record.hard_state
            self.hard_state_segment = record.position.segment
            return
        entry = record.entry
        assert entry is not None
        segment = record.position.segment
        if entry.index <= self._last_written:
            for seq, live in self.live.items():
                self.live[seq] = min(live, entry.index - 1)
        self.live[segment] = max(self.live[segment], entry.index)
        self._last_written = entry.index
        if self._applied and entry.index <= self.base:
            raise CorruptLogError(
                self._paths[segment],
                record.position.offset,
                f"entry {entry.index} was written after the snapshot at index {self.base}",
            )
        last = self.start + len(self.entries) - 1
        if self.entries and self.start <= entry.index <= last + 1:
            del self.entries[entry.index - self.start :]
            self.entries.append(entry)
            return
        if self._applied and self.entries and entry.index > last + 1:
            raise LogGapError(
                self._paths[segment],
                record.position.offset,
                f"entry {entry.index} follows entry {last}: the log has a gap",
            )
        # Empty, or an overwrite from below the run (or, floating, a jump).
        self.entries = [entry]
        self.start = entry.index
        if self._applied:
            self._first_after_base = record.position

    def _apply_snapshot(self) -> None:
        stored = self._stored
        assert stored is not None
        meta = stored.snapshot.meta
        self._applied = True
        if stored.keeps_log:
            self.entries = [e for e in self.entries if e.index > meta.index]
        else:
            self.entries = []
            for seq, live in self.live.items():
                self.live[seq] = min(live, meta.index)
        self.start = self.entries[0].index if self.entries else meta.index + 1
        self.base, self.base_term = meta.index, meta.term

    def finish(self) -> None:
        if not self._applied:
            self._apply_snapshot()
        if self.entries and self.start != self.base + 1:
            where = self._first_after_base
            raise LogGapError(
                self._paths[where.segment] if where else self._paths[max(self._paths)],
                where.offset if where else 0,
                f"the log resumes at entry {self.start}, not right after index {self.base}",
            )
        self.start = self.base + 1

    def holds(self, index: int, term: int) -> bool:
        """Whether the rebuilt log (snapshot included) has entry `index` of `term`."""
        if index == self.base:
            return term == self.base_term
        at = index - self.start
        return 0 <= at < len(self.entries) and self.entries[at].term == term


class DiskStorage:
    """The durable Raft storage of one node (see the module doc).

    Open with `DiskStorage.open(directory, key)`; read `initial_state()` once,
    before the first save; then `save()` and `save_snapshot()`; `close()`."""

    def __init__(
        self,
        *,
        directory: Path,
        key: StorageKey,
        lock_fd: int,
        segment_bytes: int,
        replay: _Replay,
        stored: StoredSnapshot | None,
        segments: dict[int, Path],
        snapshots: dict[int, Path],
    ) -> None:
        self._directory = directory
        self._key = key
        self._lock_fd: int | None = lock_fd
        self._segment_bytes = segment_bytes
        self._segments = segments  # seq -> path, ascending
        self._live = replay.live
        self._snapshots = snapshots  # index -> path of each kept snapshot file
        self._base = replay.base
        self._base_term = replay.base_term
        self._terms = [e.term for e in replay.entries]  # of indexes base+1 ..
        self._hard_state = replay.hard_state
        self._hard_state_segment = replay.hard_state_segment
        self._active: SegmentWriter | None = None
        self._next_seq = max(segments, default=0) + 1
        self._failed = False
        self._recovered: RecoveredState | None = RecoveredState(
            replay.hard_state, stored.snapshot if stored else None, replay.entries
        )

    def __repr__(self) -> str:
        return f"DiskStorage({str(self._directory)!r}, key={self._key.fingerprint})"

    # -- opening and recovery -------------------------------------------------

    @classmethod
    def open(
        cls, directory: Path, key: bytes, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES
    ) -> DiskStorage:
        """Opens (creating if needed) and recovers the storage in `directory`.

        `key` is the 32-byte node storage key. Repairs only what a crash can
        cause (a torn last save, a leftover temporary snapshot file) and raises
        `CorruptLogError`, `CorruptSnapshotError` or `WrongStorageKeyError`,
        touching nothing, for anything else; `StorageError` if the directory
        cannot be read or written."""
        if segment_bytes < 1:
            raise StorageError("segment_bytes must be positive")
        storage_key = StorageKey(key)
        directory = Path(directory)
        try:
            _prepare_directory(directory)
            lock_fd = _lock_directory(directory)
            try:
                return cls._recover(directory, storage_key, lock_fd, segment_bytes)
            except BaseException:
                os.close(lock_fd)
                raise
        except OSError as exc:
            raise StorageError(
                f"cannot open raft storage {directory}: {exc.strerror} ({exc.filename})"
            ) from exc

    @classmethod
    def _recover(
        cls, directory: Path, key: StorageKey, lock_fd: int, segment_bytes: int
    ) -> DiskStorage:
        names = sorted(os.listdir(directory))
        seqs = sorted(s for n in names if (s := parse_segment_name(n)) is not None)
        for prev, seq in itertools.pairwise(seqs):
            if seq != prev + 1:
                missing = directory / segment_name(prev + 1)
                raise CorruptLogError(missing, 0, "this segment file is missing")
        recovered = [
            recover_segment(directory / segment_name(seq), seq, key, is_last=seq == seqs[-1])
            for seq in seqs
        ]
        segments = {r.seq: r.path for r in recovered if not r.discard}
        records = [record for r in recovered for record in r.records]
        snap_files = sorted(
            ((parsed, directory / n) for n in names if (parsed := parse_snapshot_name(n))),
            reverse=True,
        )
        stored, replay, set_aside = _choose_snapshot(snap_files, key, records, segments)
        if stored is not None and stored.position.segment > max(segments, default=0):
            raise CorruptLogError(
                directory / segment_name(stored.position.segment),
                0,
                f"log segments written before snapshot {stored.path.name} are missing",
            )
        _repair(directory, recovered, set_aside, [n for n in names if is_snapshot_temp_name(n)])
        snapshots = {index: path for (index, _term), path in snap_files if path not in set_aside}
        storage = cls(
            directory=directory,
            key=key,
            lock_fd=lock_fd,
            segment_bytes=segment_bytes,
            replay=replay,
            stored=stored,
            segments=segments,
            snapshots=snapshots,
        )
        logger.info(
            "raft storage %s recovered: snapshot index %d, %d entries after it, term %d, "
            "commit %d, %d segments",
            directory,
            replay.base,
            len(replay.entries),
            replay.hard_state.term,
            replay.hard_state.commit,
            len(segments),
        )
        return storage

    # -- the API ----------------------------------------------------------------

    def initial_state(self) -> RecoveredState:
        """What `open` recovered. Only before the first save: the log moves on after."""
        self._check_usable()
        if self._recovered is None:
            raise StorageError("initial_state() is only available before the first save")
        return self._recovered

    @property
    def last_index(self) -> int:
        """Index of the last stored entry (the snapshot index if none follow it)."""
        return self._base + len(self._terms)

    def save(self, hard_state: HardState | None, entries: Sequence[Entry]) -> None:
        """Appends `entries` and records `hard_state`; returns once both are durable.

        An entry at or below the last stored index replaces the stored suffix
        from there. Entries must be contiguous, after the snapshot, and start at
        most one past the last stored index. One fdatasync for the whole call."""
        self._check_usable()
        if hard_state == self._hard_state:
            hard_state = None
        if hard_state is not None and not (
            0 <= hard_state.term <= _MAX_U64 and 0 <= hard_state.commit <= _MAX_U64
        ):
            raise StorageError("hard state term or commit out of range (0 .. 2**64-1)")
        if entries:
            self._check_entries(entries)
        if hard_state is None and not entries:
            return
        items: list[Entry | HardState] = list(entries)
        if hard_state is not None:
            items.append(hard_state)
        writer = self._writer_for_batch()
        try:
            writer.append_batch(items)
        except OSError as exc:
            raise self._fail(exc) from exc
        self._recovered = None
        if entries:
            first = entries[0].index
            if first <= self.last_index:
                for seq, live in self._live.items():
                    self._live[seq] = min(live, first - 1)
                del self._terms[first - self._base - 1 :]
            self._terms.extend(e.term for e in entries)
            self._live[writer.seq] = max(self._live[writer.seq], entries[-1].index)
        if hard_state is not None:
            self._hard_state = hard_state
            self._hard_state_segment = writer.seq

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Stores `snapshot` atomically and durably, then compacts.

        The entries after its index stay if the stored log holds the
        snapshot's last entry (same index and term), else the snapshot
        replaces the whole log. Keeps the newest two snapshots; deletes the
        segments the older of those two covers (never the newest segment)."""
        self._check_usable()
        meta = snapshot.meta
        if meta.index <= self._base:
            raise StorageError(
                f"snapshot at index {meta.index} is not newer than the stored one at {self._base}"
            )
        keeps_log = (
            meta.index <= self.last_index and self._terms[meta.index - self._base - 1] == meta.term
        )
        try:
            path = write_snapshot(self._directory, self._key, snapshot, self._end(), keeps_log)
        except OSError as exc:
            raise self._fail(exc) from exc
        self._recovered = None
        if keeps_log:
            del self._terms[: meta.index - self._base]
        else:
            self._terms = []
            for seq, live in self._live.items():
                self._live[seq] = min(live, meta.index)
        self._base, self._base_term = meta.index, meta.term
        self._snapshots[meta.index] = path
        try:
            self._compact()
        except OSError as exc:
            raise self._fail(exc) from exc

    def close(self) -> None:
        """Releases the files and the directory lock. Writes nothing."""
        if self._active is not None:
            self._active.close()
            self._active = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> DiskStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._lock_fd is None:
            raise StorageError(f"storage {self._directory} is closed")
        if self._failed:
            raise StorageFailedError(
                f"an earlier write to {self._directory} failed; restart the node to recover"
            )

    def _fail(self, exc: OSError) -> StorageFailedError:
        # After a failed write or fsync the kernel may have dropped the dirty
        # pages: retrying could report durability that is not there.
        self._failed = True
        logger.error(
            "raft storage %s: write failed (%s); refusing further work",
            self._directory,
            exc.strerror,
        )
        return StorageFailedError(f"write to {self._directory} failed: {exc.strerror}")

    def _check_entries(self, entries: Sequence[Entry]) -> None:
        first = entries[0].index
        for prev, entry in itertools.pairwise(entries):
            if entry.index != prev.index + 1:
                raise StorageError(f"entries are not contiguous: {entry.index} after {prev.index}")
        if first <= self._base:
            raise StorageError(f"entry {first} is at or below the snapshot index {self._base}")
        if first > self.last_index + 1:
            raise StorageError(f"entry {first} would leave a gap after entry {self.last_index}")
        if not all(0 <= e.term <= _MAX_U64 for e in entries) or entries[-1].index > _MAX_U64:
            raise StorageError("entry term or index out of range (0 .. 2**64-1)")

    def _writer_for_batch(self) -> SegmentWriter:
        if self._active is not None and self._active.size < self._segment_bytes:
            return self._active
        if self._active is not None:
            self._active.close()
            self._active = None
        try:
            writer = SegmentWriter.create(self._directory, self._next_seq, self._key)
        except OSError as exc:
            raise self._fail(exc) from exc
        self._active = writer
        self._segments[writer.seq] = writer.path
        self._live[writer.seq] = 0
        self._next_seq += 1
        return writer

    def _end(self) -> WalPosition:
        """The position after the last durable record: where a snapshot is taken."""
        if self._active is not None:
            return self._active.position
        if not self._segments:
            return WalPosition(0, 0)
        last = max(self._segments)
        return WalPosition(last, self._segments[last].stat().st_size)

    def _compact(self) -> None:
        kept = sorted(self._snapshots)[-2:]
        for index in sorted(self._snapshots)[:-2]:
            self._snapshots.pop(index).unlink()
        if len(kept) == 2:
            cover = kept[0]
            seqs = sorted(self._segments)
            drop: list[int] = []
            # Only a prefix, and never the newest segment: sequence numbers stay
            # contiguous and increasing, which recovery checks and relies on.
            for seq in seqs[:-1]:
                if self._live[seq] > cover:
                    break
                drop.append(seq)
            if self._hard_state_segment in drop:
                writer = self._writer_for_batch()
                writer.append_batch([self._hard_state])
                self._hard_state_segment = writer.seq
            for seq in drop:
                # Oldest first, each deletion durable before the next: a crash
                # can then only leave a shorter prefix deleted, never a hole.
                self._segments.pop(seq).unlink()
                del self._live[seq]
                fsync_directory(self._directory)
        fsync_directory(self._directory)


def _choose_snapshot(
    snap_files: list[tuple[tuple[int, int], Path]],
    key: StorageKey,
    records: list[LogRecord],
    segments: dict[int, Path],
) -> tuple[StoredSnapshot | None, _Replay, list[Path]]:
    """The newest snapshot that verifies and that the log continues, with the replay
    of the log on top of it, and the newer snapshot files to set aside.

    Falling back past a snapshot that does not verify is sound only if that
    snapshot had kept the log (it matched it): then the replayed log still
    holds its last entry, whose index and term its file name gives. A snapshot
    that replaced a conflicting log cannot be skipped: the entries written
    after it continue ITS log, not the one before it."""
    set_aside: list[tuple[tuple[int, int], Path]] = []

    def replay_with(stored: StoredSnapshot | None) -> _Replay:
        replay = _Replay(stored, segments)
        for record in records:
            replay.feed(record)
        replay.finish()
        for (index, term), path in set_aside:
            if not replay.holds(index, term):
                raise LogGapError(path, 0, f"the log does not hold entry {index} of term {term}")
        return replay

    for name, path in snap_files:
        try:
            stored = read_snapshot(path, key)
        except CorruptSnapshotError as exc:
            logger.warning("%s; trying an older snapshot", exc)
            set_aside.append((name, path))
            continue
        try:
            return stored, replay_with(stored), [p for _, p in set_aside]
        except LogGapError as exc:
            if not set_aside:
                raise
            logger.warning("cannot fall back to snapshot %s: %s", path.name, exc)
            set_aside.append((name, path))
    try:
        return None, replay_with(None), [p for _, p in set_aside]
    except LogGapError as exc:
        if not set_aside:
            raise
        raise CorruptSnapshotError(
            set_aside[0][1],
            "it does not verify and the log no longer covers any older snapshot; restore the "
            "node from its peers (wipe the data directory and re-add the node)",
        ) from exc


def _repair(
    directory: Path,
    segments: list[RecoveredSegment],
    set_aside: list[Path],
    temp_names: list[str],
) -> None:
    """Carries out what recovery decided; every step is logged."""
    changed = False
    for segment in segments:
        if segment.discard:
            logger.warning("raft log %s: %s; removing the file", segment.path, segment.reason)
            segment.path.unlink()
            changed = True
        elif segment.truncate_at is not None:
            logger.warning(
                "raft log %s: %s; the unfinished last save is dropped",
                segment.path,
                segment.reason,
            )
            fd = os.open(segment.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, segment.truncate_at)
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in set_aside:
        target = path.with_name(path.name + _CORRUPT_SUFFIX)
        logger.warning("snapshot %s is not usable; kept aside as %s", path, target.name)
        os.replace(path, target)
        changed = True
    for name in temp_names:
        logger.info("removing unfinished snapshot file %s", directory / name)
        (directory / name).unlink()
        changed = True
    if changed:
        fsync_directory(directory)


def _prepare_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True)
        fsync_directory(directory.parent)
    except FileExistsError:
        pass
    info = directory.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise StorageError(f"{directory} is not a directory")
    if info.st_mode & 0o077:
        logger.warning(
            "raft data directory %s has mode %o: group or others can reach key material; "
            "make it 0700",
            directory,
            stat.S_IMODE(info.st_mode),
        )


def _lock_directory(directory: Path) -> int:
    fd = os.open(directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StorageLockedError(
            f"{directory} is in use by another process or storage instance"
        ) from None
    return fd


def load_storage_key(path: Path | None, env_value: str | None) -> bytes:
    """The 32-byte node storage key, from a key file or an environment variable value.

    Either source holds text: 64 hex digits, or the standard base64 of 32 bytes
    (surrounding whitespace ignored), e.g. `openssl rand -hex 32`. Give exactly
    one source. Raises `StorageKeyError` (never showing the key) if missing or
    malformed; warns if the key file is readable by group or others."""
    if path is not None and env_value is not None:
        raise StorageKeyError("give the storage key as a file or an environment variable, not both")
    if path is None and env_value is None:
        raise StorageKeyError("no node storage key given (key file or environment variable)")
    if path is not None:
        source = f"storage key file {path}"
        text = _read_key_file(path)
    else:
        assert env_value is not None
        source = "storage key environment variable"
        text = env_value
    return _parse_key_text(text.strip(), source)


def _read_key_file(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise StorageKeyError(f"storage key file {path} is not a regular file")
            raw = handle.read(_MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise StorageKeyError(f"storage key file {path} does not exist") from None
    except OSError as exc:
        raise StorageKeyError(f"storage key file {path} cannot be read: {exc.strerror}") from None
    if info.st_mode & 0o077:
        logger.warning(
            "storage key file %s has mode %o: group or others can read it; make it 0600",
            path,
            stat.S_IMODE(info.st_mode),
        )
    if len(raw) > _MAX_KEY_FILE_BYTES:
        raise StorageKeyError(f"storage key file {path} is too large to hold a key")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise StorageKeyError(
            f"storage key file {path} is not text: write 64 hex digits or base64 of 32 bytes"
        ) from None


def _parse_key_text(text: str, source: str) -> bytes:
    hint = "expected 64 hex digits or the base64 of 32 bytes (e.g. `openssl rand -hex 32`)"
    if not text:
        raise StorageKeyError(f"{source} is empty: {hint}")
    if len(text) == 2 * STORAGE_KEY_SIZE:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        if all(c in string.hexdigits for c in text):
            raise StorageKeyError(
                f"{source} has {len(text)} hex digits, need {2 * STORAGE_KEY_SIZE}: {hint}"
            ) from None
        raise StorageKeyError(f"{source} is malformed: {hint}") from None
    if len(key) != STORAGE_KEY_SIZE:
        raise StorageKeyError(
            f"{source} decodes to {len(key)} bytes, need {STORAGE_KEY_SIZE}: {hint}"
        )
    return key
