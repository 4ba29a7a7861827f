"""Found by the chaos harness (seed 5, 3 nodes, faults wipe,pause): a node that
had just rejoined after a wipe answered `member.list` with the member set of
an old snapshot - a stale read, not linearizable.

The cause: the driver released a ReadIndex waiter as soon as the core
reported the read state, assuming the entries up to the read index were
applied in the same Ready. On a follower the read index is the LEADER's
commit index, which the follower may not have received yet. The rule (etcd's
raft: "the application must wait until applied >= ReadState.Index") is
proved here against the driver with a scripted core, no network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import trio
import trio.testing

from gcks.cluster.driver import DriverSettings, RaftDriver
from gcks.cluster.raft.raft import RaftConfig, RawNode
from gcks.cluster.raft.types import ConfState, Entry, ReadState, Ready
from gcks.cluster.state import GroupState


@dataclass
class ScriptedCore:
    """Stands in for `RawNode`: hands out the Readies a test queues."""

    status: Any
    readies: list[Ready] = field(default_factory=list)
    read_index_at: int = 0

    def has_ready(self) -> bool:
        return bool(self.readies)

    def ready(self) -> Ready:
        return self.readies[0]

    def advance(self, ready: Ready) -> None:
        self.readies.remove(ready)

    def read_index(self, context: bytes) -> None:
        # The leader confirmed its commit index `read_index_at` for this read.
        self.readies.append(Ready(read_states=(ReadState(self.read_index_at, context),)))

    def tick(self) -> None:
        pass


def make_driver(core: ScriptedCore) -> RaftDriver:
    return RaftDriver(
        cast(RawNode, core),
        cast(Any, None),  # no entries or hard state to persist in these Readies
        GroupState(),
        cast(Any, None),  # no messages to send either
        DriverSettings(tick_s=3600),
    )


def real_status() -> Any:
    config = RaftConfig(id="n3")
    return RawNode(config, conf=ConfState(voters=frozenset({"n1", "n2", "n3"}))).status


async def test_follower_read_waits_until_the_leaders_commit_index_is_applied() -> None:
    core = ScriptedCore(real_status(), read_index_at=5)
    driver = make_driver(core)
    answered = trio.Event()

    async def read() -> None:
        await driver.read_index(timeout_s=30)
        answered.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert not answered.is_set(), "read answered before entry 5 was applied"
            entries = tuple(Entry(term=1, index=i) for i in range(1, 4))
            await driver.call(lambda _raw: core.readies.append(Ready(committed_entries=entries)))
            await trio.testing.wait_all_tasks_blocked()
            assert driver.state.applied_index == 3
            assert not answered.is_set(), "read answered at applied index 3 < 5"
            entries = tuple(Entry(term=1, index=i) for i in range(4, 6))
            await driver.call(lambda _raw: core.readies.append(Ready(committed_entries=entries)))
            await answered.wait()
            assert driver.state.applied_index == 5
            nursery.cancel_scope.cancel()


async def test_read_already_covered_by_the_applied_index_is_answered_at_once() -> None:
    core = ScriptedCore(real_status(), read_index_at=0)
    driver = make_driver(core)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            await driver.read_index(timeout_s=5)
            nursery.cancel_scope.cancel()
