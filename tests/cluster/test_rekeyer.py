"""The rekeyer's batching, against a state machine applied in process.

A stand-in driver applies every proposal to a `GroupState` at once (one node,
its own leader), so the tests see exactly the commands the rekeyer makes.
Trio's MockClock jumps over the batch intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio
import trio.testing

from gcks.cluster.commands import (
    MAX_REKEY_BATCH,
    CreateGroup,
    Join,
    Leave,
    LeaveReason,
    Rekey,
    decode_command,
    encode_command,
)
from gcks.cluster.raft.types import Role as RaftRole
from gcks.cluster.rekeyer import Rekeyer, RekeyerSettings
from gcks.cluster.state import ApplyResult, GroupState
from gcks.proto.policy import Role
from tests.cluster.test_state import policy

T0 = 1_700_000_000_000


@dataclass
class _Status:
    role: RaftRole = RaftRole.FOLLOWER


@dataclass
class _Driver:
    state: GroupState = field(default_factory=GroupState)
    status: _Status = field(default_factory=_Status)
    proposed: list[Rekey] = field(default_factory=list)

    async def propose(self, data: bytes, timeout_s: float) -> ApplyResult:
        await trio.lowlevel.checkpoint()
        command = decode_command(data)
        if isinstance(command, Rekey):
            self.proposed.append(command)
        return self.state.apply(self.state.applied_index + 1, data)


def _driver(**overrides: object) -> _Driver:
    driver = _Driver()
    create = CreateGroup(policy(**overrides), b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, T0)
    driver.state.apply(1, encode_command(create))
    return driver


def _rekeyer(driver: _Driver) -> Rekeyer:
    settings = RekeyerSettings(check_interval_s=3600.0)
    return Rekeyer(driver, settings, clock_ms=lambda: T0 + 1000)  # type: ignore[arg-type]


async def test_a_registration_burst_is_split_into_batches_that_each_fit_one_rekey(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = _driver()
    rekeyer = _rekeyer(driver)
    count = MAX_REKEY_BATCH * 2 + 5
    results: list[ApplyResult] = []

    async def join(i: int) -> None:
        results.append(await rekeyer.join("demo", f"m{i}", Role.RECEIVER, None))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rekeyer.run)
            async with trio.open_nursery() as joiners:
                for i in range(count):
                    joiners.start_soon(join, i)
            nursery.cancel_scope.cancel()
    assert sorted(len(c.joins) for c in driver.proposed) == [5, MAX_REKEY_BATCH, MAX_REKEY_BATCH]
    assert all(r.rejected is None for r in results)
    assert len(driver.state.members("demo")) == count


async def test_join_after_a_leave_this_node_has_not_applied_yet_still_gets_a_tek(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # rekey_on_join hides TEKs older than a member's join from its GSA; the
    # batch that (re-)adds it must therefore bring a fresh TEK, even when the
    # proposing node still believed the member was in the group.
    driver = _driver(rekey_on_join=True)
    stale = _driver(rekey_on_join=True)
    for d in (driver, stale):
        d.state.apply(2, encode_command(_join_command("m1")))
    driver.state.apply(3, encode_command(_leave_command("m1")))
    # `stale` proposes from its old view (m1 still a member); `driver` applies.
    rekeyer = _rekeyer(stale)
    stale.propose = driver.propose  # type: ignore[method-assign]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rekeyer.run)
            result = await rekeyer.join("demo", "m1", Role.RECEIVER, None)
            nursery.cancel_scope.cancel()
    assert ("demo", "m1") in result.joined
    gsa = driver.state.gsa("demo", "m1", request_id=1, nodes=())
    assert gsa.teks, "the re-joined member must hold a TEK it may use"


def _join_command(member: str) -> Rekey:
    return Rekey("demo", (Join(member, Role.RECEIVER),), (), b"\x04" * 32, None, False, T0, "join")


def _leave_command(member: str) -> Rekey:
    leave = Leave(member, LeaveReason.DEREGISTER)
    return Rekey("demo", (), (leave,), b"\x06" * 32, None, False, T0 + 500, "leave")


async def test_a_batch_of_members_with_long_ids_still_commits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The command's reason names the batch's members; ids run to 64 characters
    # and the reason field holds 256, so the naming must not sink the batch.
    driver = _driver()
    rekeyer = _rekeyer(driver)
    results: list[ApplyResult] = []

    async def join(i: int) -> None:
        results.append(await rekeyer.join("demo", f"{i:02d}" + "x" * 62, Role.RECEIVER, None))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rekeyer.run)
            async with trio.open_nursery() as joiners:
                for i in range(12):
                    joiners.start_soon(join, i)
            nursery.cancel_scope.cancel()
    assert len(driver.proposed) == 1
    assert len(driver.state.members("demo")) == 12
    assert driver.proposed[0].reason.startswith("membership +")


async def test_first_registrations_to_many_groups_at_once_all_commit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A reconnect storm: every group gets its first registration in the same
    # scheduling round. Each opens a batch; none may be refused or crash.
    driver = _Driver()
    groups = [f"g{i}" for i in range(1100)]
    for i, group in enumerate(groups, start=1):
        create = CreateGroup(policy(group_id=group), bytes(32), bytes(32), bytes(32), T0)
        driver.state.apply(i, encode_command(create))
    rekeyer = _rekeyer(driver)
    results: list[ApplyResult] = []

    async def join(group: str) -> None:
        results.append(await rekeyer.join(group, "m1", Role.RECEIVER, None))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rekeyer.run)
            async with trio.open_nursery() as joiners:
                for group in groups:
                    joiners.start_soon(join, group)
            nursery.cancel_scope.cancel()
    assert len(results) == len(groups)
    assert all(driver.state.is_member(group, "m1") for group in groups)
