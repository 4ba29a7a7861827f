"""The rekeyer's batching, against a state machine applied in process.

A stand-in driver applies every proposal to a `GroupState` at once (one node,
its own leader), so the tests see exactly the commands the rekeyer makes.
Trio's MockClock jumps over the batch intervals.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TypeVar

import msgpack
import pytest
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
from gcks.cluster.membership import MembershipRequest, decode_request, encode_request
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
    return _with_group(_Driver(), **overrides)


_D = TypeVar("_D", bound=_Driver)


def _with_group(driver: _D, **overrides: object) -> _D:
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


# ------------------------------------------------------- leader-side batching


@dataclass
class _ClusterStatus:
    role: RaftRole
    leader: str | None
    commit: int = 0


class _Node:
    """A stand-in driver for one node of a cluster whose leader applies every
    proposal at once and hands each entry to every node's state in turn."""

    def __init__(self, node_id: str, cluster: _Cluster) -> None:
        self.node_id = node_id
        self.cluster = cluster
        self.state = GroupState()
        self.status = _ClusterStatus(RaftRole.FOLLOWER, None)
        self.changed = trio.Event()
        self.rekeyer = Rekeyer(
            self,  # type: ignore[arg-type]
            RekeyerSettings(check_interval_s=3600.0),
            clock_ms=lambda: T0 + 1000,
            forward=self.forward,
        )
        self.sent: list[str] = []
        self.links_up = True  # False: forwarded requests are lost on the way

    def forward(self, peer_id: str, payload: bytes) -> bool:
        self.sent.append(peer_id)
        if self.links_up:
            self.cluster.nodes[peer_id].rekeyer.deliver(self.node_id, payload)
        return True

    async def propose(self, data: bytes, timeout_s: float) -> ApplyResult:
        await trio.lowlevel.checkpoint()
        return self.cluster.commit(data)

    async def wait_status_change(self) -> None:
        await self.changed.wait()

    def set_leader(self, leader: str | None) -> None:
        self.status.leader = leader
        self.status.role = RaftRole.LEADER if leader == self.node_id else RaftRole.FOLLOWER
        self.changed.set()
        self.changed = trio.Event()


class _Cluster:
    def __init__(self, *node_ids: str, **policy_overrides: object) -> None:
        self.nodes = {nid: _Node(nid, self) for nid in node_ids}
        self.index = 0
        self.proposed: list[Rekey] = []
        create = CreateGroup(
            policy(**policy_overrides), b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, T0
        )
        self.commit(encode_command(create))

    def lead(self, leader: str | None) -> None:
        for node in self.nodes.values():
            node.set_leader(leader)

    def commit(self, data: bytes) -> ApplyResult:
        command = decode_command(data)
        if isinstance(command, Rekey):
            self.proposed.append(command)
        self.index += 1
        results = {}
        for node in self.nodes.values():
            results[node.node_id] = node.state.apply(self.index, data)
            node.status.commit = self.index
            node.rekeyer.on_apply(results[node.node_id])
        return next(iter(results.values()))


async def test_followers_forward_joins_to_the_leader_so_one_interval_makes_one_rekey(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = _Cluster("n1", "n2", "n3")
    cluster.lead("n1")
    results: dict[str, ApplyResult] = {}

    async def join(nid: str, member: str) -> None:
        results[member] = await cluster.nodes[nid].rekeyer.join("demo", member, Role.RECEIVER, None)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in cluster.nodes.values():
                await nursery.start(node.rekeyer.run)
            async with trio.open_nursery() as joiners:
                for i, nid in enumerate(["n1", "n2", "n3"] * 4):
                    joiners.start_soon(join, nid, f"m{i}")
            nursery.cancel_scope.cancel()
    assert len(cluster.proposed) == 1, "the leader's one batch carries every node's joins"
    assert {j.member_id for j in cluster.proposed[0].joins} == {f"m{i}" for i in range(12)}
    assert all(("demo", m) in r.joined for m, r in results.items())
    assert cluster.nodes["n2"].sent == ["n1"] * 4
    assert cluster.nodes["n1"].sent == [], "the leader batches its own"


async def test_only_the_entry_with_its_tag_answers_a_forwarded_join(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A follower catching up may first apply an older entry that names the
    # same member (its previous registration): that entry is not the answer.
    cluster = _Cluster("n1", "n2")
    cluster.lead("n1")
    follower = cluster.nodes["n2"]
    follower.links_up = False
    outcome: list[ApplyResult] = []
    tags: list[int] = []
    real_forward = follower.forward

    def capture(peer_id: str, payload: bytes) -> bool:
        tags.append(decode_request(payload).tag)
        return real_forward(peer_id, payload)

    follower.rekeyer._forward = capture

    async def join() -> None:
        outcome.append(await follower.rekeyer.join("demo", "m1", Role.RECEIVER, None))

    older = ApplyResult(joined=(("demo", "m1"),), requests=(12345,))
    own = ApplyResult(joined=(("demo", "m1"),))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(join)
            await trio.testing.wait_all_tasks_blocked()
            follower.rekeyer.on_apply(older)
            await trio.testing.wait_all_tasks_blocked()
            assert outcome == []
            own = dataclasses.replace(own, requests=(99, tags[0]))
            follower.rekeyer.on_apply(own)
    assert outcome[0] is own


async def test_a_forwarded_join_goes_to_each_new_leader_until_its_entry_applies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = _Cluster("n1", "n2", "n3")
    cluster.lead("n1")
    follower = cluster.nodes["n2"]
    follower.links_up = False
    sent = follower.sent
    outcome: list[ApplyResult] = []

    async def join() -> None:
        outcome.append(await follower.rekeyer.join("demo", "m1", Role.RECEIVER, None))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in cluster.nodes.values():
                await nursery.start(node.rekeyer.run)
            nursery.start_soon(join)
            await trio.testing.wait_all_tasks_blocked()
            assert sent == ["n1"]  # ... and lost: n1 fails before it batches it
            cluster.lead(None)
            await trio.testing.wait_all_tasks_blocked()
            assert sent == ["n1"], "nobody to send to during an election"
            follower.links_up = True
            cluster.lead("n3")
            while not outcome:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert ("demo", "m1") in outcome[0].joined
    assert sent == ["n1", "n3"]
    assert [c.joins[0].member_id for c in cluster.proposed] == ["m1"]
    # Stamped by the node the member asked, whose clock reads T0 + 1000.
    assert cluster.proposed[0].joins[0].requested_ms == T0 + 1000


async def test_a_forwarded_join_goes_to_a_new_leader_as_soon_as_it_is_known(
    mock_clock: trio.testing.MockClock,
) -> None:
    # The clock stands still: only the change of leader can send the copy.
    cluster = _Cluster("n1", "n2", "n3")
    cluster.lead("n1")
    follower = cluster.nodes["n2"]
    follower.links_up = False
    outcome: list[ApplyResult] = []

    async def join() -> None:
        outcome.append(await follower.rekeyer.join("demo", "m1", Role.RECEIVER, None))

    async with trio.open_nursery() as nursery:
        for node in cluster.nodes.values():
            await nursery.start(node.rekeyer.run)
        nursery.start_soon(join)
        await trio.testing.wait_all_tasks_blocked()
        assert follower.sent == ["n1"]
        follower.links_up = True
        cluster.lead("n3")
        await trio.testing.wait_all_tasks_blocked()
        assert follower.sent == ["n1", "n3"], "sent on the change, not after resend_s"
        assert trio.current_time() == 0
        mock_clock.jump(1.0)  # n3's batch interval
        await trio.testing.wait_all_tasks_blocked()
        assert outcome
        assert ("demo", "m1") in outcome[0].joined
        nursery.cancel_scope.cancel()


async def test_commands_and_forwarded_requests_are_made_in_the_clusters_version(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A node of the previous version is still in the cluster: it would stop at
    # an entry of version 2, and drop a forwarded join of 5 fields.
    cluster = _Cluster("n1", "n2")
    cluster.lead("n1")
    for node in cluster.nodes.values():
        node.rekeyer.command_version = lambda: 1
    follower = cluster.nodes["n2"]
    payloads: list[bytes] = []
    forward = follower.rekeyer._forward
    assert forward is not None

    def recording(to: str, payload: bytes) -> object:
        payloads.append(payload)
        return forward(to, payload)

    follower.rekeyer._forward = recording
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in cluster.nodes.values():
                await nursery.start(node.rekeyer.run)
            await follower.rekeyer.join("demo", "m1", Role.RECEIVER, None)
            nursery.cancel_scope.cancel()
    assert [len(join) for join in msgpack.unpackb(payloads[0])[3]] == [4]
    assert [c.version for c in cluster.proposed] == [1]


async def test_two_registrations_of_one_member_through_two_nodes_are_both_answered_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A member retrying through another node while its first request is still
    # open: both reach the leader's batch, each with its own tag. The interval
    # spans ten resends of each copy, and other members join meanwhile.
    interval_s = 20.0
    cluster = _Cluster("n1", "n2", "n3", batch_interval_ms=int(interval_s * 1000))
    cluster.lead("n1")
    answered: dict[str, float] = {}
    results: dict[str, ApplyResult] = {}

    async def join(nid: str, member: str, after_s: float = 0.0) -> None:
        await trio.sleep(after_s)
        result = await cluster.nodes[nid].rekeyer.join("demo", member, Role.RECEIVER, None)
        results[f"{member}@{nid}"] = result
        answered[f"{member}@{nid}"] = trio.current_time()

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for node in cluster.nodes.values():
                await nursery.start(node.rekeyer.run)
            start = trio.current_time()
            async with trio.open_nursery() as joiners:
                joiners.start_soon(join, "n2", "m1")
                joiners.start_soon(join, "n3", "m1")
                for i in range(10):
                    joiners.start_soon(join, "n1", f"o{i}", 0.1 + 1.5 * i)
            nursery.cancel_scope.cancel()
    assert max(answered.values()) - start < interval_s + RekeyerSettings().resend_s
    assert all(("demo", member.split("@")[0]) in r.joined for member, r in results.items())
    entries = sorted(([j.member_id for j in c.joins] for c in cluster.proposed), key=len)
    assert [sorted(e) for e in entries] == [["m1"], ["m1", *(f"o{i}" for i in range(10))]], (
        "one entry for the interval's joins, one more for the second registration only"
    )


@dataclass
class _OrderedDriver(_Driver):
    """Logs each proposal when it is made, as the real driver queues it (its
    inbox is first in, first out), and answers it after a yield."""

    order: list[Rekey] = field(default_factory=list)

    async def propose(self, data: bytes, timeout_s: float) -> ApplyResult:
        command = decode_command(data)
        if isinstance(command, Rekey):
            self.order.append(command)
        result = self.state.apply(self.state.applied_index + 1, data)
        await trio.lowlevel.checkpoint()
        return result


def _ordered_driver(*, m1_member: bool) -> _OrderedDriver:
    driver = _with_group(_OrderedDriver(), batch_interval_ms=5000)
    if m1_member:
        driver.state.apply(2, encode_command(_join_command("m1")))
    return driver


async def _m1_requests(driver: _Driver, *kinds: str) -> list[ApplyResult]:
    """Run a rekeyer on `driver` and make m1's requests ("join", or "leave": a
    deregistration) one after another, each queued before the next; their answers."""
    rekeyer = _rekeyer(driver)
    results: dict[int, ApplyResult] = {}

    async def request(position: int, kind: str) -> None:
        if kind == "join":
            results[position] = await rekeyer.join("demo", "m1", Role.RECEIVER, None)
        else:
            results[position] = await rekeyer.leave("demo", "m1", LeaveReason.DEREGISTER)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rekeyer.run)
            async with trio.open_nursery() as pending:
                for position, kind in enumerate(kinds):
                    pending.start_soon(request, position, kind)
                    await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    return [results[position] for position in range(len(kinds))]


async def test_batches_of_one_group_are_proposed_in_the_order_they_opened(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A leave, then two registrations of the same member: each opens a later
    # batch, and all three intervals end at the same instant. No registration
    # may overtake the leave, or the member would end up outside the group.
    for _ in range(10):  # the flushes wake in a random order
        driver = _ordered_driver(m1_member=True)
        await _m1_requests(driver, "leave", "join", "join")
        shapes = [(len(c.leaves), len(c.joins)) for c in driver.order]
        assert shapes == [(1, 0), (0, 1), (0, 1)], "the leave's batch goes first"
        assert driver.state.is_member("demo", "m1")


async def test_a_leave_after_two_registrations_of_a_member_is_not_overtaken_by_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = _ordered_driver(m1_member=False)
    await _m1_requests(driver, "join", "join", "leave")
    shapes = [(len(c.joins), len(c.leaves)) for c in driver.order]
    assert shapes == [(1, 0), (1, 1)], "the leave goes with the later registration"
    assert not driver.state.is_member("demo", "m1"), "the last request was the leave"


async def test_a_node_that_does_not_lead_drops_forwarded_requests_and_malformed_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = _Cluster("n1", "n2")
    cluster.lead("n1")
    follower = cluster.nodes["n2"].rekeyer
    payload = encode_request(MembershipRequest(7, "demo", joins=(Join("m1", Role.RECEIVER),)), 2)
    follower.deliver("n1", payload)  # n2 does not lead: nothing batched
    cluster.nodes["n1"].rekeyer.deliver("n2", b"\xc1 not msgpack")  # logged, not raised
    await trio.sleep(5)
    assert cluster.proposed == []


# ------------------------------------------------------------------ the clock


async def test_a_node_whose_clock_lags_stamps_commands_no_earlier_than_the_newest_applied(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Leadership moves to a node whose clock is 3 s behind: key times must not
    # go back, and the operator is told once.
    driver = _driver()
    # Stamped T0 like the group's creation, the join applies 1 ms after it.
    driver.state.apply(2, encode_command(_join_command("m1")))
    newest = T0 + 1
    lagging = Rekeyer(
        driver,  # type: ignore[arg-type]
        RekeyerSettings(check_interval_s=3600.0),
        clock_ms=lambda: T0 - 3_000,
    )
    with caplog.at_level(logging.WARNING, logger="gcks.cluster.rekeyer"):
        assert lagging.now_ms() == newest
        assert lagging.now_ms() == newest
    warnings = [r for r in caplog.records if "behind the newest committed command" in r.message]
    assert len(warnings) == 1
    assert "3.0 s" in warnings[0].getMessage()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(lagging.run)
            await lagging.join("demo", "m2", Role.RECEIVER, None)
            nursery.cancel_scope.cancel()
    assert driver.proposed[-1].now_ms == newest
    ahead = Rekeyer(driver, RekeyerSettings(), clock_ms=lambda: T0 + 5)  # type: ignore[arg-type]
    assert ahead.now_ms() == T0 + 5


def test_a_clock_far_behind_keeps_its_own_time_so_one_fast_node_cannot_freeze_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The newest command came from a node whose clock ran a minute ahead:
    # following it would stop every proposer's time for that minute.
    driver = _driver()
    driver.state.apply(2, encode_command(_join_command("m1")))  # stamped T0
    behind = Rekeyer(driver, RekeyerSettings(), clock_ms=lambda: T0 - 60_000)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="gcks.cluster.rekeyer"):
        assert behind.now_ms() == T0 - 60_000
    assert "too far to follow" in caplog.text


def test_membership_requests_are_timed_no_earlier_than_the_newest_time_applied() -> None:
    # However far this node's clock lags: having applied a member's leave, it
    # must time that member's next registration after the leave
    # (`_Group.stale`), or the member would be refused until the clock caught up.
    driver = _driver()
    driver.state.apply(2, encode_command(_join_command("m1")))
    behind = Rekeyer(driver, RekeyerSettings(), clock_ms=lambda: T0 - 60_000)  # type: ignore[arg-type]
    assert behind.request_ms() == driver.state.latest_ms == T0 + 1
    ahead = Rekeyer(driver, RekeyerSettings(), clock_ms=lambda: T0 + 5)  # type: ignore[arg-type]
    assert ahead.request_ms() == T0 + 5


def test_the_newest_command_time_survives_a_snapshot_as_a_lower_bound() -> None:
    driver = _driver()
    driver.state.apply(2, encode_command(_join_command("m1")))
    restored = GroupState.restore(driver.state.snapshot())
    # Stamped T0 like the group's creation, the join applied 1 ms after it.
    assert 0 < restored.latest_ms <= driver.state.latest_ms == T0 + 1


async def test_a_forwarded_request_lost_on_the_way_is_sent_again_to_the_same_leader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = _Cluster("n1", "n2")
    cluster.lead("n1")
    follower = cluster.nodes["n2"]
    follower.links_up = False  # the first copy never arrives (a full peer queue, say)
    outcome: list[ApplyResult] = []

    async def join() -> None:
        outcome.append(await follower.rekeyer.join("demo", "m1", Role.RECEIVER, None))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in cluster.nodes.values():
                await nursery.start(node.rekeyer.run)
            nursery.start_soon(join)
            await trio.sleep(1.0)
            assert follower.sent == ["n1"]
            follower.links_up = True
            while not outcome:
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    assert follower.sent == ["n1", "n1"]
    assert ("demo", "m1") in outcome[0].joined


async def test_an_eviction_and_a_deregistration_in_one_batch_stay_an_eviction(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = _driver()
    driver.state.apply(2, encode_command(_join_command("m1")))
    rekeyer = _rekeyer(driver)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rekeyer.run)
            async with trio.open_nursery() as both:
                both.start_soon(rekeyer.leave, "demo", "m1", LeaveReason.EVICT)
                both.start_soon(rekeyer.leave, "demo", "m1", LeaveReason.DEREGISTER)
            nursery.cancel_scope.cancel()
    # The eviction comes first (apply takes a member's first leave); the
    # deregistration rides along for its tag, so its request is answered too.
    reasons = [leave.reason for leave in driver.proposed[-1].leaves]
    assert reasons == [LeaveReason.EVICT, LeaveReason.DEREGISTER]
    assert driver.state.is_banned("demo", "m1")


async def test_a_registration_after_a_deregistration_in_one_interval_takes_effect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = _ordered_driver(m1_member=True)
    _, rejoined = await _m1_requests(driver, "leave", "join")
    assert [(len(c.leaves), len(c.joins)) for c in driver.order] == [(1, 0), (0, 1)]
    assert ("demo", "m1") in rejoined.joined, "the join is not lost behind the leave"
    assert driver.state.is_member("demo", "m1")


async def test_two_leaves_of_one_member_forwarded_by_two_nodes_are_both_answered_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A deregistration through one node and an eviction through another land in
    # one leader batch: one entry, the ban holds, and neither request waits
    # for a resend (each tag is in the entry).
    cluster = _Cluster("n1", "n2", "n3", batch_interval_ms=5000)
    cluster.lead("n1")
    cluster.commit(encode_command(_join_command("m1")))
    answered: dict[str, float] = {}

    async def leave(nid: str, reason: LeaveReason) -> None:
        await cluster.nodes[nid].rekeyer.leave("demo", "m1", reason)
        answered[nid] = trio.current_time()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in cluster.nodes.values():
                await nursery.start(node.rekeyer.run)
            start = trio.current_time()
            async with trio.open_nursery() as requests:
                requests.start_soon(leave, "n2", LeaveReason.DEREGISTER)
                await trio.testing.wait_all_tasks_blocked()
                requests.start_soon(leave, "n3", LeaveReason.EVICT)
            nursery.cancel_scope.cancel()
    assert set(answered) == {"n2", "n3"}
    assert max(answered.values()) - start < 5.0 + RekeyerSettings().resend_s
    leaves = [c.leaves for c in cluster.proposed if c.leaves]
    assert len(leaves) == 1
    assert [x.reason for x in leaves[0]] == [LeaveReason.EVICT, LeaveReason.DEREGISTER]
    assert all(node.state.is_banned("demo", "m1") for node in cluster.nodes.values())
