"""The Raft driver's handling of installed snapshots, also from a newer version."""

from __future__ import annotations

from typing import Any, cast

import msgpack
import pytest

import gcks.cluster.state as state_module
from gcks.cluster.driver import DriverSettings, RaftDriver
from gcks.cluster.raft.raft import RaftConfig, RawNode
from gcks.cluster.raft.types import ConfState, Snapshot, SnapshotMeta
from gcks.cluster.state import GroupState, UpgradeRequired


async def test_a_snapshot_from_a_newer_version_stops_the_node_and_keeps_its_state() -> None:
    state = GroupState()
    driver = RaftDriver(
        RawNode(RaftConfig(id="n1"), conf=ConfState(voters=frozenset({"n1"}))),
        cast(Any, None),  # only the snapshot install runs: no storage, no transport
        state,
        cast(Any, None),
        DriverSettings(tick_s=3600),
    )
    fields = msgpack.unpackb(GroupState().snapshot())
    fields[0] = state_module.SNAPSHOT_FORMAT + 1
    newer = Snapshot(SnapshotMeta(index=9, term=2, conf=ConfState()), msgpack.packb(fields))
    with pytest.raises(UpgradeRequired, match="snapshot written by a newer gcks"):
        await driver._install_snapshot(newer)
    assert driver.state is state


async def test_an_installed_snapshot_is_reported_with_its_state() -> None:
    installed: list[GroupState] = []
    driver = RaftDriver(
        RawNode(RaftConfig(id="n1"), conf=ConfState(voters=frozenset({"n1"}))),
        cast(Any, None),
        GroupState(),
        cast(Any, None),
        DriverSettings(tick_s=3600),
        on_install=installed.append,
    )
    snapshot = Snapshot(SnapshotMeta(index=9, term=2, conf=ConfState()), GroupState().snapshot())
    await driver._install_snapshot(snapshot)
    assert installed == [driver.state]
    assert driver.state.applied_index == 9
