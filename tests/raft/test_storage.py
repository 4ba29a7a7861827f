"""The durable, encrypted Raft storage: what `DiskStorage` promises across reopen.

Crash and corruption recovery has its own file, `test_storage_crash.py`."""

from __future__ import annotations

import base64
import logging
import os
import stat
from pathlib import Path

import pytest

from gcks.cluster.raft.sealedfile import (
    HEADER_SIZE,
    FileHeader,
    FileKind,
    RecordCipher,
    StorageKey,
)
from gcks.cluster.raft.storage import (
    CorruptLogError,
    CorruptSnapshotError,
    DiskStorage,
    StorageError,
    StorageFailedError,
    StorageKeyError,
    StorageLockedError,
    WrongStorageKeyError,
    load_storage_key,
)
from gcks.cluster.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMeta,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def make_entries(first: int, last: int, term: int = 1, size: int = 16) -> list[Entry]:
    return [
        Entry(term=term, index=i, data=f"t{term}i{i}:".encode().ljust(size, b"."))
        for i in range(first, last + 1)
    ]


def snapshot(index: int, term: int = 1, data: bytes = b"state") -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, ConfState(frozenset({"n1", "n2", "n3"}))), data)


def reopen(
    directory: Path, **kwargs: int
) -> tuple[DiskStorage, HardState, Snapshot | None, list[Entry]]:
    storage = DiskStorage.open(directory, KEY, **kwargs)
    state = storage.initial_state()
    return storage, state.hard_state, state.snapshot, state.entries


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("wal-*.seg"))


def test_entries_and_hard_state_round_trip_across_reopen(tmp_path: Path) -> None:
    written = [
        *make_entries(1, 10),
        Entry(term=2, index=11, type=EntryType.CONF_CHANGE, data=b"cc"),
    ]
    with DiskStorage.open(tmp_path, KEY) as storage:
        assert storage.initial_state().entries == []
        storage.save(HardState(term=1, vote="n2", commit=0), written[:5])
        storage.save(HardState(term=2, vote=None, commit=4), written[5:])
    storage, hard, snap, entries = reopen(tmp_path)
    with storage:
        assert (hard, snap, entries) == (HardState(2, None, 4), None, written)
        assert storage.last_index == 11


def test_conflicting_append_truncates_stored_suffix(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(None, make_entries(1, 10, term=1))
        storage.save(None, make_entries(6, 8, term=2))  # a new leader overwrote 6..10
        assert storage.last_index == 8
        storage.save(None, make_entries(9, 9, term=2))
    storage, _, _, entries = reopen(tmp_path)
    with storage:
        assert entries == make_entries(1, 5, term=1) + make_entries(6, 9, term=2)


def test_conflicting_append_into_an_earlier_segment_survives_reopen(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY, segment_bytes=600) as storage:
        for i in range(1, 31):
            storage.save(None, make_entries(i, i, term=1, size=100))
        assert len(segment_files(tmp_path)) > 3
        storage.save(HardState(3, "n1", 2), make_entries(3, 4, term=3))
    storage, hard, _, entries = reopen(tmp_path, segment_bytes=600)
    with storage:
        assert hard == HardState(3, "n1", 2)
        assert entries == make_entries(1, 2, term=1, size=100) + make_entries(3, 4, term=3)


def test_latest_hard_state_is_durable_without_entries(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(HardState(term=1, vote="n1"), [])
        storage.save(HardState(term=5, vote="n3", commit=0), [])
    storage, hard, _, entries = reopen(tmp_path)
    with storage:
        assert hard == HardState(term=5, vote="n3", commit=0)
        assert entries == []


def test_many_entries_and_the_hard_state_share_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(HardState(1, "n1", 0), make_entries(1, 64))
        storage.save(HardState(1, "n1", 0), [])  # unchanged hard state: nothing to write
    assert len(calls) == 1


def test_files_are_mode_0600_and_directory_0700(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    old_umask = os.umask(0)  # prove the modes are chosen, not inherited from the umask
    try:
        with DiskStorage.open(directory, KEY, segment_bytes=200) as storage:
            storage.save(HardState(1, "n1", 1), make_entries(1, 20, size=50))
            storage.save_snapshot(snapshot(5))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.iterdir())
    assert {p.suffix for p in files} >= {".seg", ".snap"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_wrong_key_is_reported_as_wrong_key_not_corruption(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(HardState(1, "n1", 0), make_entries(1, 3))
        storage.save_snapshot(snapshot(2))
    with pytest.raises(WrongStorageKeyError, match="wrong storage key") as info:
        DiskStorage.open(tmp_path, OTHER_KEY)
    assert KEY.hex() not in str(info.value)
    assert OTHER_KEY.hex() not in str(info.value)
    storage, _, snap, entries = reopen(tmp_path)  # nothing was damaged by the attempt
    with storage:
        assert snap is not None
        assert snap.meta.index == 2
        assert entries == make_entries(3, 3)


def test_nothing_on_disk_reveals_entry_data_votes_or_snapshot_data(tmp_path: Path) -> None:
    secret_entry = b"TEK=0123456789abcdef-entry-payload"
    secret_snapshot = b"KEK=fedcba9876543210-snapshot-payload"
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(
            HardState(7, "node-with-a-long-name", 1),
            [Entry(7, 1, data=secret_entry), Entry(7, 2, data=secret_entry * 3)],
        )
        storage.save_snapshot(snapshot(1, term=7, data=secret_snapshot))
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for needle in (secret_entry[:12], secret_snapshot[:12], b"node-with-a-long-name", KEY):
        assert needle not in blob


def test_segments_roll_at_size_limit(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY, segment_bytes=1000) as storage:
        for i in range(1, 41):
            storage.save(HardState(1, None, i - 1), make_entries(i, i, size=100))
    sizes = [p.stat().st_size for p in segment_files(tmp_path)]
    assert len(sizes) >= 4
    assert all(size < 1000 + 250 for size in sizes)  # at most one save past the limit
    storage, hard, _, entries = reopen(tmp_path, segment_bytes=1000)
    with storage:
        assert entries == make_entries(1, 40, size=100)
        assert hard.commit == 39


def test_each_open_writes_to_a_new_segment(tmp_path: Path) -> None:
    for i in range(1, 4):
        storage, _, _, entries = reopen(tmp_path)
        with storage:
            assert len(entries) == i - 1
            storage.save(None, make_entries(i, i))
    assert [p.name for p in segment_files(tmp_path)] == [f"wal-{seq:016x}.seg" for seq in (1, 2, 3)]


def test_snapshot_round_trip_hides_covered_entries(tmp_path: Path) -> None:
    snap = snapshot(6, term=1, data=bytes(range(256)) * 100)
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(HardState(1, "n1", 6), make_entries(1, 10))
        storage.save_snapshot(snap)
        storage.save(None, make_entries(11, 12))
    storage, hard, got, entries = reopen(tmp_path)
    with storage:
        assert got == snap
        assert entries == make_entries(7, 12)
        assert hard == HardState(1, "n1", 6)


def test_snapshot_that_conflicts_with_the_log_replaces_it(tmp_path: Path) -> None:
    # A lagging follower with a stale tail receives a leader's snapshot.
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(HardState(1, "n1", 3), make_entries(1, 20, term=1))
        storage.save_snapshot(snapshot(15, term=2))
        assert storage.last_index == 15
        storage.save(HardState(2, "n2", 15), make_entries(16, 17, term=2))
    storage, _, snap, entries = reopen(tmp_path)
    with storage:
        assert snap is not None
        assert snap.meta.index == 15
        assert entries == make_entries(16, 17, term=2)


def test_snapshot_beyond_the_log_leaves_an_empty_log(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(None, make_entries(1, 3))
        storage.save_snapshot(snapshot(100, term=4))
    storage, _, snap, entries = reopen(tmp_path)
    with storage:
        assert snap is not None
        assert snap.meta.index == 100
        assert entries == []
        storage.save(None, make_entries(101, 101, term=4))


def test_leftover_snapshot_temp_file_is_ignored_and_removed(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(None, make_entries(1, 5))
        storage.save_snapshot(snapshot(3))
    # A crash while writing snapshot 5 leaves its temporary file behind, half written.
    good = (tmp_path / f"snap-{3:016x}-{1:016x}.snap").read_bytes()
    temp = tmp_path / f"snap-{5:016x}-{1:016x}.snap.tmp"
    temp.write_bytes(good[: len(good) // 2])
    storage, _, snap, entries = reopen(tmp_path)
    with storage:
        assert snap is not None
        assert snap.meta.index == 3
        assert entries == make_entries(4, 5)
    assert not temp.exists()


def test_at_most_two_snapshots_are_kept(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(None, make_entries(1, 10))
        for index in (2, 4, 6, 8):
            storage.save_snapshot(snapshot(index))
    assert sorted(p.name[:21] for p in tmp_path.glob("snap-*")) == [
        f"snap-{6:016x}",
        f"snap-{8:016x}",
    ]


def test_segments_covered_by_the_older_kept_snapshot_are_removed(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY, segment_bytes=400) as storage:
        storage.save(HardState(1, "n1", 0), make_entries(1, 1, size=100))  # hard state: segment 1
        for i in range(2, 41):
            storage.save(None, make_entries(i, i, size=100))
        before = segment_files(tmp_path)
        storage.save_snapshot(snapshot(20))
        assert segment_files(tmp_path) == before  # the log still covers "no snapshot"
        storage.save_snapshot(snapshot(30))
        after = segment_files(tmp_path)
    assert before[0] not in after
    assert len(after) < len(before) - 3
    storage, hard, snap, entries = reopen(tmp_path, segment_bytes=400)
    with storage:
        assert hard == HardState(1, "n1", 0)  # re-written before its segment went
        assert snap is not None
        assert snap.meta.index == 30
        assert entries == make_entries(31, 40, size=100)


def test_corrupt_newest_snapshot_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with DiskStorage.open(tmp_path, KEY, segment_bytes=400) as storage:
        storage.save(HardState(1, "n1", 40), make_entries(1, 40, size=100))
        storage.save_snapshot(snapshot(20, data=b"older"))
        storage.save_snapshot(snapshot(30, data=b"newer"))
    newest = tmp_path / f"snap-{30:016x}-{1:016x}.snap"
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0x40
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        storage, _, snap, entries = reopen(tmp_path, segment_bytes=400)
    with storage:
        assert snap is not None
        assert snap.data == b"older"
        assert entries == make_entries(21, 40, size=100)
    assert "corrupt snapshot" in caplog.text
    assert not newest.exists()
    assert newest.with_name(newest.name + ".corrupt").exists()


def test_corrupt_only_snapshot_without_covering_log_is_a_hard_error(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(None, make_entries(1, 3))
        storage.save_snapshot(snapshot(50, term=2))  # installed from a leader: log replaced
        storage.save(None, make_entries(51, 52, term=2))
    path = tmp_path / f"snap-{50:016x}-{2:016x}.snap"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptSnapshotError, match="no longer covers"):
        DiskStorage.open(tmp_path, KEY)
    assert path.exists()  # a hard error repairs nothing


def test_second_open_of_the_same_directory_is_refused(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY), pytest.raises(StorageLockedError):
        DiskStorage.open(tmp_path, KEY)
    DiskStorage.open(tmp_path, KEY).close()


def test_save_refuses_gaps_and_entries_at_or_below_the_snapshot(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY) as storage:
        with pytest.raises(StorageError, match="gap"):
            storage.save(None, make_entries(2, 3))
        storage.save(None, make_entries(1, 5))
        with pytest.raises(StorageError, match="not contiguous"):
            storage.save(None, [Entry(1, 6), Entry(1, 8)])
        storage.save_snapshot(snapshot(4))
        with pytest.raises(StorageError, match="snapshot index"):
            storage.save(None, make_entries(4, 6))
        with pytest.raises(StorageError, match="not newer"):
            storage.save_snapshot(snapshot(3))
        with pytest.raises(StorageError, match="out of range"):
            storage.save(None, [Entry(-1, 5)])
        with pytest.raises(StorageError, match="out of range"):
            storage.save(HardState(term=-2), [])
        storage.save(None, make_entries(5, 6))


def test_initial_state_is_refused_after_the_first_save(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.initial_state()
        storage.save(None, make_entries(1, 1))
        with pytest.raises(StorageError, match="before the first save"):
            storage.initial_state()


def test_failed_fsync_makes_the_storage_refuse_further_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(None, make_entries(1, 1))
        monkeypatch.setattr(os, "fdatasync", failing)
        with pytest.raises(StorageFailedError):
            storage.save(None, make_entries(2, 2))
        monkeypatch.undo()
        with pytest.raises(StorageFailedError, match="restart"):
            storage.save(None, make_entries(2, 2))


def test_record_moved_to_another_offset_or_file_does_not_open() -> None:
    key = StorageKey(KEY)
    header_a = FileHeader.new(FileKind.SEGMENT)
    header_b = FileHeader(FileKind.SEGMENT, os.urandom(16), header_a.sync)
    cipher_a, cipher_b = RecordCipher(key, header_a), RecordCipher(key, header_b)
    record = cipher_a.seal(HEADER_SIZE, b"payload")
    pad = b"\x00" * HEADER_SIZE
    assert cipher_a.scan(pad + record).records == [(HEADER_SIZE, b"payload")]
    assert cipher_b.scan(pad + record).records == []  # same offset, other file
    moved = cipher_a.scan(pad + cipher_a.seal(HEADER_SIZE, b"x") + record)
    assert [pt for _, pt in moved.records] == [b"x"]  # same file, other offset
    assert moved.later == []


def test_repr_names_the_key_by_fingerprint_only(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY) as storage:
        text = repr(storage) + repr(StorageKey(KEY))
    assert KEY.hex() not in text
    assert repr(KEY) not in text


# -- the node storage key ---------------------------------------------------------


def write_key_file(path: Path, text: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(text)
    path.chmod(mode)
    return path


def test_storage_key_is_read_as_hex_or_base64_from_file_or_environment(tmp_path: Path) -> None:
    key = os.urandom(32)
    assert (
        load_storage_key(write_key_file(tmp_path / "hex", key.hex().encode() + b"\n"), None) == key
    )
    b64 = base64.b64encode(key)
    assert load_storage_key(write_key_file(tmp_path / "b64", b64), None) == key
    assert load_storage_key(None, f"  {key.hex().upper()}\n") == key
    assert load_storage_key(None, b64.decode()) == key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("00" * 31, "62 hex digits"),
        (base64.b64encode(b"k" * 16).decode(), "16 bytes"),
        ("not-a-key!" * 4, "malformed"),
    ],
)
def test_short_or_malformed_storage_key_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(StorageKeyError, match=message) as info:
        load_storage_key(None, text)
    if text:
        assert text not in str(info.value)


def test_missing_or_doubly_given_storage_key_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StorageKeyError, match="no node storage key"):
        load_storage_key(None, None)
    with pytest.raises(StorageKeyError, match="does not exist"):
        load_storage_key(tmp_path / "absent", None)
    path = write_key_file(tmp_path / "key", KEY.hex().encode())
    with pytest.raises(StorageKeyError, match="not both"):
        load_storage_key(path, KEY.hex())
    with pytest.raises(StorageKeyError, match="not text"):
        load_storage_key(write_key_file(tmp_path / "raw", b"\xff" * 32), None)
    with pytest.raises(StorageKeyError, match="32 bytes"):
        DiskStorage.open(tmp_path / "data", KEY[:16])


def test_group_readable_key_file_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_key_file(tmp_path / "key", KEY.hex().encode(), mode=0o640)
    with caplog.at_level(logging.WARNING):
        assert load_storage_key(path, None) == KEY
    assert "group or others" in caplog.text
    assert KEY.hex() not in caplog.text


def test_corrupt_log_error_names_file_and_offset(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY) as storage:
        for i in range(1, 6):
            storage.save(None, make_entries(i, i))
    path = segment_files(tmp_path)[0]
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 12] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError) as info:
        DiskStorage.open(tmp_path, KEY)
    assert info.value.path == path
    assert info.value.offset == HEADER_SIZE
    assert str(path) in str(info.value)
    assert f"offset {HEADER_SIZE}" in str(info.value)


def test_unusable_directory_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="cannot open raft storage"):
        DiskStorage.open(tmp_path / "file" / "data", KEY)
