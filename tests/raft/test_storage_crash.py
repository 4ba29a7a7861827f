"""Crash and corruption recovery of the durable Raft storage.

Crash model: every `save()` that returned was fsynced, so a crash can only
damage the bytes of the save in progress, which is the tail of the last
segment. We replay seeded random histories (appends, conflicting overwrites,
hard states, snapshots), then damage that tail the ways a crash can (cut it
anywhere, fill it with zeros or garbage, flip bytes in it, also with later
pages of the same write intact) and reopen: the storage must hold exactly the
state after the previous save, or after the last one if its bytes are intact.
Damage before a later save's records is corruption, not a crash, and must be a
`CorruptLogError` that touches nothing. Random work with reopens, snapshots
and compaction is checked against the same model, and so is the fallback
when the newest snapshot rots.

fsync is stubbed out here: these tests damage files by hand, so durability
itself is not what they check, and 2 shared cores cannot afford the syncs.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from gcks.cluster.raft.sealedfile import HEADER_SIZE
from gcks.cluster.raft.storage import CorruptLogError, CorruptSnapshotError, DiskStorage
from gcks.cluster.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMeta

KEY = bytes(range(100, 132))
SEEDS = int(os.environ.get("GCKS_STORAGE_CRASH_SEEDS", "30"))  # per block; raise for a deeper run
SEGMENT_BYTES = 1500


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)


@dataclass(frozen=True)
class State:
    """What the storage must hold after a save: the model."""

    hard_state: HardState
    snapshot_index: int
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class Save:
    """One save() of a history: where its bytes went, and the model around it."""

    segment: str
    start: int  # size of the segment before the save (0: the save created it)
    end: int
    before: State
    after: State


def recovered(directory: Path, segment_bytes: int = SEGMENT_BYTES) -> State:
    with DiskStorage.open(directory, KEY, segment_bytes=segment_bytes) as storage:
        state = storage.initial_state()
        index = state.snapshot.meta.index if state.snapshot else 0
        return State(state.hard_state, index, tuple(state.entries))


def last_segment(directory: Path) -> tuple[Path, int]:
    path = max(directory.glob("wal-*.seg"))
    return path, path.stat().st_size


class Model:
    """The log a correct storage holds, and random Raft-like work on it."""

    def __init__(self) -> None:
        self.log: list[Entry] = []
        self.base = 0
        self.hard = HardState()
        self.term = 1
        # Each snapshot taken: (meta, whether it kept the log, the log just before it).
        self.snapshots: list[tuple[SnapshotMeta, bool, tuple[Entry, ...]]] = []

    @property
    def state(self) -> State:
        return State(self.hard, self.base, tuple(self.log))

    def random_snapshot(self, rng: random.Random) -> Snapshot:
        """A snapshot near the end of the log; sometimes from a leader whose log
        differs (another term), which then replaces the log."""
        last = self.log[-1].index
        index = rng.randint(max(self.base + 1, last - 6), last + 3)
        term = self.term if rng.random() < 0.2 else self.log[min(index, last) - self.base - 1].term
        at = index - self.base - 1
        keep = index <= last and self.log[at].term == term
        meta = SnapshotMeta(index, term, ConfState(frozenset({"n1"})))
        self.snapshots.append((meta, keep, tuple(self.log)))
        self.log = self.log[at + 1 :] if keep else []
        self.base = index
        return Snapshot(meta, b"s")

    def after_newest_snapshot_lost(self) -> State | None:
        """What recovery must give if the newest snapshot no longer verifies: the
        previous snapshot and the log from there (the newest had kept the log and
        so the log continues the previous one), or None: a hard error."""
        newest, keep, log_before = self.snapshots[-1]
        if not keep:
            return None
        older = self.snapshots[-2][0].index if len(self.snapshots) > 1 else 0
        kept = tuple(e for e in log_before if e.index <= newest.index)
        return State(self.hard, older, kept + tuple(self.log))

    def random_save(self, rng: random.Random) -> tuple[HardState, list[Entry]]:
        """Appends, or overwrites part of the tail as a new leader, and/or a new hard state."""
        last = self.log[-1].index if self.log else self.base
        first = last + 1
        if self.log and rng.random() < 0.3:
            self.term += 1
            first = rng.randint(max(self.base + 1, last - 4), last)
        new = [
            Entry(self.term, i, data=rng.randbytes(rng.choice([0, 10, 60, 200])))
            for i in range(first, first + rng.choice([0, 1, 1, 2, 5, 12]))
        ]
        if not new or rng.random() < 0.5:
            self.hard = HardState(self.term, rng.choice([None, "n1", "n2"]), rng.randint(0, 50))
        if new:
            self.log = [e for e in self.log if e.index < first] + new
        return self.hard, new


def random_history(directory: Path, rng: random.Random) -> list[Save]:
    """Performs 5..25 random saves and some snapshots; returns the saves a crash
    can hit: those in the last segment after the last snapshot (the last save
    always among them). Each, cut short, is the state of a crash during it."""
    model = Model()
    crashable: list[Save] = []
    with DiskStorage.open(directory, KEY, segment_bytes=SEGMENT_BYTES) as storage:
        saves = rng.randint(5, 25)
        for n in range(saves):
            if n < saves - 1 and model.log and rng.random() < 0.15:
                storage.save_snapshot(model.random_snapshot(rng))
                crashable = []  # a crash before it would not have left its files
            before = model.state
            segment_before = last_segment(directory) if any(directory.glob("wal-*")) else None
            storage.save(*model.random_save(rng))
            path, end = last_segment(directory)
            start = segment_before[1] if segment_before and segment_before[0] == path else 0
            crashable.append(Save(path.name, start, end, before, model.state))
    final = last_segment(directory)[0].name
    return [save for save in crashable if save.segment == final]


def test_random_work_with_reopens_and_compaction_recovers_the_model(tmp_path: Path) -> None:
    for seed in range(SEEDS):
        rng = random.Random(seed)
        directory = tmp_path / str(seed)
        model = Model()
        storage = DiskStorage.open(directory, KEY, segment_bytes=300)
        for step in range(60):
            roll = rng.random()
            if roll < 0.1:
                storage.close()
                assert recovered(directory, segment_bytes=300) == model.state, (seed, step)
                storage = DiskStorage.open(directory, KEY, segment_bytes=300)
            elif roll < 0.25 and model.log:
                storage.save_snapshot(model.random_snapshot(rng))
            else:
                storage.save(*model.random_save(rng))
        storage.close()
        assert recovered(directory, segment_bytes=300) == model.state, seed
        snapshots = sorted(directory.glob("snap-*.snap"))
        assert len(snapshots) <= 2
        if not snapshots:
            continue
        # Bit rot in the newest snapshot: fall back only where that is sound.
        data = bytearray(snapshots[-1].read_bytes())
        data[rng.randrange(HEADER_SIZE, len(data))] ^= 0x10
        snapshots[-1].write_bytes(bytes(data))
        fallback = model.after_newest_snapshot_lost()
        if fallback is None:
            with pytest.raises(CorruptSnapshotError):
                recovered(directory, segment_bytes=300)
        else:
            assert recovered(directory, segment_bytes=300) == fallback, seed


def crash_during(directory: Path, save: Save, rng: random.Random) -> bool:
    """Leaves `directory` as a crash during `save` can: later saves never happened,
    and its own bytes are cut, zeroed, garbled or partly lost. True if any of
    its bytes changed (so it must not be recovered)."""
    path, start, end = directory / save.segment, save.start, save.end
    data = bytearray(path.read_bytes()[:end])
    if start == 0:  # the save began a segment, whose header is fsynced first
        if rng.random() < 0.3:  # crash while creating it: part of the header, maybe garbled
            torn = data[: rng.randint(0, HEADER_SIZE)]
            if torn and rng.random() < 0.5:
                torn[rng.randrange(len(torn))] ^= 0xFF
            path.write_bytes(bytes(torn))
            return True
        start = HEADER_SIZE
    intact = bytes(data)
    cut = rng.randint(start, end)
    mode = rng.choice(["cut", "zeros", "garbage", "flips", "flips"])
    if mode == "cut":
        del data[cut:]
    elif mode == "zeros":
        data[cut:] = bytes(len(data) - cut)
    elif mode == "garbage":
        data[cut:] = rng.randbytes(rng.randint(0, 2 * (end - cut) + 20))
    elif end > start:  # a few pages of the write lost or garbled, later ones intact
        for at in rng.sample(range(start, end), min(3, end - start, rng.randint(1, 3))):
            data[at] ^= rng.randint(1, 255)
    path.write_bytes(bytes(data))
    return data[:end] != intact


@pytest.mark.parametrize("block", range(3))
def test_crash_at_random_points_recovers_exactly_the_saves_that_returned(
    tmp_path: Path, block: int, caplog: pytest.LogCaptureFixture
) -> None:
    for seed in range(block * SEEDS, (block + 1) * SEEDS):
        rng = random.Random(seed)
        original = tmp_path / f"history-{seed}"
        saves = random_history(original, rng)
        assert recovered(original) == saves[-1].after, f"seed {seed}: clean reopen"
        for variant in range(4):
            directory = tmp_path / f"crash-{seed}-{variant}"
            shutil.copytree(original, directory)
            save = rng.choice(saves)
            lost = crash_during(directory, save, rng)
            expected = save.before if lost else save.after
            where = f"seed {seed} variant {variant}"
            assert recovered(directory) == expected, where
            # The repair is durable and the storage goes on: a second open sees the
            # same state, silently, and a new save lands after it.
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                assert recovered(directory) == expected, where
            assert caplog.text == "", where
            with DiskStorage.open(directory, KEY, segment_bytes=SEGMENT_BYTES) as storage:
                nxt = (
                    expected.entries[-1].index if expected.entries else expected.snapshot_index
                ) + 1
                storage.save(HardState(99, "n9", 0), [Entry(99, nxt, data=b"after crash")])
            after = recovered(directory)
            assert after.entries == (*expected.entries, Entry(99, nxt, data=b"after crash")), where
            shutil.rmtree(directory)
        shutil.rmtree(original)


def saves_in_one_segment(directory: Path, batches: list[int]) -> list[int]:
    """Saves one batch of that many 100-byte entries per element; the segment
    size after each save (all in one segment)."""
    sizes = []
    index = 1
    with DiskStorage.open(directory, KEY) as storage:
        for count in batches:
            storage.save(
                HardState(1, "n1", index - 1),
                [Entry(1, i, data=b"d" * 100) for i in range(index, index + count)],
            )
            index += count
            sizes.append(last_segment(directory)[1])
    return sizes


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


def test_corrupt_record_followed_by_later_saves_is_a_hard_error_that_repairs_nothing(
    tmp_path: Path,
) -> None:
    rng = random.Random(7)
    for trial in range(20):
        directory = tmp_path / str(trial)
        sizes = saves_in_one_segment(directory, [rng.randint(1, 4) for _ in range(8)])
        victim = rng.randrange(len(sizes) - 1)  # any save but the last
        start = sizes[victim - 1] if victim else HEADER_SIZE
        path = last_segment(directory)[0]
        flip(path, rng.randrange(start, sizes[victim]))
        before = path.read_bytes()
        with pytest.raises(CorruptLogError, match="later save") as info:
            DiskStorage.open(directory, KEY)
        assert info.value.path == path
        assert start <= info.value.offset < sizes[victim]
        assert path.read_bytes() == before


def test_torn_write_with_later_records_of_the_same_save_intact_drops_that_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sizes = saves_in_one_segment(tmp_path, [3, 6])
    path = last_segment(tmp_path)[0]
    flip(path, sizes[0] + 20)  # first record of the last save; its 5 others are intact
    with caplog.at_level(logging.WARNING):
        state = recovered(tmp_path)
    assert [e.index for e in state.entries] == [1, 2, 3]
    assert state.hard_state == HardState(1, "n1", 0)
    assert "torn or corrupt tail" in caplog.text
    assert path.stat().st_size == sizes[0]


def test_unfinished_last_save_cut_at_a_record_boundary_is_dropped_whole(tmp_path: Path) -> None:
    sizes = saves_in_one_segment(tmp_path, [2, 4])
    path = last_segment(tmp_path)[0]
    record = (sizes[1] - sizes[0] - 0) // 5  # 4 entries and the hard state, all alike in size
    with open(path, "r+b") as handle:
        handle.truncate(sizes[0] + 2 * record + 3)  # two records and a bit of the third
    assert [e.index for e in recovered(tmp_path).entries] == [1, 2]
    # Also exactly on a record boundary, so no record is damaged at all.
    sizes = saves_in_one_segment(tmp_path / "b", [2, 4])
    path = last_segment(tmp_path / "b")[0]
    data = path.read_bytes()
    length = int.from_bytes(data[sizes[0] : sizes[0] + 4], "big") + 8
    path.write_bytes(data[: sizes[0] + length])
    assert [e.index for e in recovered(tmp_path / "b").entries] == [1, 2]


def test_damage_in_a_segment_that_is_not_the_last_is_a_hard_error(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY, segment_bytes=300) as storage:
        for i in range(1, 10):
            storage.save(None, [Entry(1, i, data=b"x" * 100)])
    first = sorted(tmp_path.glob("wal-*.seg"))[0]
    with open(first, "r+b") as handle:
        handle.truncate(first.stat().st_size - 5)  # a torn tail, but segments follow
    with pytest.raises(CorruptLogError, match="followed by later segments"):
        DiskStorage.open(tmp_path, KEY)


def test_missing_middle_segment_is_a_hard_error(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY, segment_bytes=300) as storage:
        for i in range(1, 10):
            storage.save(None, [Entry(1, i, data=b"x" * 100)])
    sorted(tmp_path.glob("wal-*.seg"))[1].unlink()
    with pytest.raises(CorruptLogError, match="missing"):
        DiskStorage.open(tmp_path, KEY)


def test_torn_segment_header_of_a_new_segment_is_removed(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(None, [Entry(1, 1, data=b"x")])
    torn = tmp_path / f"wal-{2:016x}.seg"
    torn.write_bytes((tmp_path / f"wal-{1:016x}.seg").read_bytes()[: HEADER_SIZE - 7])
    assert [e.index for e in recovered(tmp_path).entries] == [1]
    assert not torn.exists()


def test_crash_after_snapshot_rename_before_compaction_recovers_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta = SnapshotMeta(5, 1, ConfState(frozenset({"n1"})))
    with DiskStorage.open(tmp_path, KEY) as storage:
        storage.save(HardState(1, "n1", 5), [Entry(1, i) for i in range(1, 9)])
        monkeypatch.setattr(DiskStorage, "_compact", lambda self: None)
        storage.save_snapshot(Snapshot(meta, b"state"))
    monkeypatch.undo()
    with DiskStorage.open(tmp_path, KEY) as storage:
        state = storage.initial_state()
        assert state.snapshot == Snapshot(meta, b"state")
        assert [e.index for e in state.entries] == [6, 7, 8]
