"""Three real nodes in one process on loopback: registration, identical keys, failover.

Faster to debug than separate processes; the multi-process tests cover the
same rules with `gcks node` processes and SIGKILL.
"""

from __future__ import annotations

import dataclasses
from contextlib import suppress
from pathlib import Path

import pytest
import trio

from gcks.cluster.commands import COMMAND_VERSION
from gcks.cluster.config import load_config
from gcks.cluster.driver import NoQuorum
from gcks.cluster.node import _VERSIONS, Node, _PeerChannel
from gcks.cluster.state import UpgradeRequired
from gcks.cluster.versions import PeerVersions
from gcks.member.session import Refused
from gcks.proto.codec import packb
from gcks.proto.messages import GsaAnswer
from gcks.proto.policy import Role
from tests.cluster.clusterkit import Kit, admin_call, connect, make_kit, register


async def start_cluster(kit: Kit, nursery: trio.Nursery) -> dict[str, Node]:
    """Every node of `kit`, started in `nursery`, once each has the demo group."""
    nodes = {}
    for nid in kit.node_ids:
        node = Node(load_config(kit.config(nid)))
        await nursery.start(node.run)
        nodes[nid] = node
    await wait_for_group(nodes)
    return nodes


async def wait_for_group(nodes: dict[str, Node], group: str = "demo") -> None:
    with trio.fail_after(20):
        while not all(
            n.driver is not None and n.driver.state.has_group(group) for n in nodes.values()
        ):
            await trio.sleep(0.05)


async def test_registration_at_every_node_gives_the_same_keys(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    async with trio.open_nursery() as nursery:
        nodes = await start_cluster(kit, nursery)
        answers = [await register(kit, f"m{i + 1}", nid) for i, nid in enumerate(kit.node_ids)]
        last = answers[-1]
        # Every member registered at a different node; the last answer is the
        # newest GSA: every node's state agrees with it.
        for node in nodes.values():
            assert node.driver is not None
            with trio.fail_after(10):
                while node.driver.state.msg_id("demo") < last.msg_id:
                    await trio.sleep(0.02)
            assert node.driver.state.kek("demo") == last.kek
        nursery.cancel_scope.cancel()


async def test_members_that_hung_up_leave_no_trace_in_the_registrar(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    async with trio.open_nursery() as nursery:
        nodes = await start_cluster(kit, nursery)
        for i in range(3):
            await register(kit, f"m{i + 1}", "n1")
        registrar = nodes["n1"].registrar
        assert registrar is not None
        with trio.fail_after(10):
            while registrar.attached:
                await trio.sleep(0.02)
        # No per-group or per-member leftovers: what a storm of short
        # registrations would otherwise pile up.
        assert not registrar._attached
        assert not registrar._pending
        assert not registrar._waiting
        assert not registrar._connections
        nursery.cancel_scope.cancel()


async def test_registrations_at_every_node_within_one_interval_make_one_rekey(
    tmp_path: Path,
) -> None:
    # Followers forward their joins to the leader's batch: the policy's one
    # rekey per batch interval holds for the cluster, not once per node.
    kit = make_kit(tmp_path, members=6, group={"batch_interval_ms": 1500})
    async with trio.open_nursery() as nursery:
        nodes = await start_cluster(kit, nursery)
        driver = nodes["n1"].driver
        assert driver is not None
        before = driver.state.msg_id("demo")
        answers: list[GsaAnswer] = []

        async def join(member: str, nid: str) -> None:
            answers.append(await register(kit, member, nid))

        async with trio.open_nursery() as joiners:
            for i, nid in enumerate(kit.node_ids * 2):
                joiners.start_soon(join, f"m{i + 1}", nid)
        assert {a.msg_id for a in answers} == {before + 1}, "one rekey message for all six"
        for node in nodes.values():
            assert node.driver is not None
            with trio.fail_after(10):
                while node.driver.state.member_count("demo") < 6:
                    await trio.sleep(0.02)
            assert node.driver.state.msg_id("demo") == before + 1
        nursery.cancel_scope.cancel()


async def test_re_registration_at_any_node_returns_the_identical_gsa(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    async with trio.open_nursery() as nursery:
        await start_cluster(kit, nursery)
        first = await register(kit, "m1", "n1")
        again = [await register(kit, "m1", nid) for nid in kit.node_ids]
        for answer in again:
            assert dataclasses.replace(answer, request_id=first.request_id) == first
        nursery.cancel_scope.cancel()


async def test_a_new_member_is_pushed_the_entries_after_its_gsa_not_the_one_in_it(
    tmp_path: Path,
) -> None:
    kit = make_kit(tmp_path)
    async with trio.open_nursery() as nursery:
        nodes = await start_cluster(kit, nursery)
        registrar = nodes["n1"].registrar
        assert registrar is not None
        session = await connect(kit, "m1", "n1")
        try:
            first = await session.register(
                "demo", Role.RECEIVER, last_msg_id=0, sender_key=None, timeout_s=15
            )
            # The join's own rekey is already in the GSA: it is not pushed.
            assert registrar.stats.pushes == 0
            second = await register(kit, "m2", "n2")
            assert second.msg_id == first.msg_id + 1
            with trio.fail_after(10):
                async for datagram in session.pushes():
                    break
            assert datagram, "the next entry's rekey reaches the open connection"
            assert registrar.stats.pushes == 1
        finally:
            await session.aclose()
        nursery.cancel_scope.cancel()


async def test_registration_goes_on_after_the_leader_stops(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    async with trio.open_nursery() as nursery:
        scopes: dict[str, trio.CancelScope] = {}
        nodes: dict[str, Node] = {}

        async def run_node(nid: str, task_status: trio.TaskStatus[None]) -> None:
            with trio.CancelScope() as scope:
                scopes[nid] = scope
                node = nodes[nid] = Node(load_config(kit.config(nid)))
                await node.run(task_status=task_status)

        for nid in kit.node_ids:
            await nursery.start(run_node, nid)
        await wait_for_group(nodes)
        await register(kit, "m1", "n1")
        leader = next(n for n, node in nodes.items() if node.status()["role"] == "leader")
        scopes[leader].cancel()
        survivors = [n for n in kit.node_ids if n != leader]
        with trio.fail_after(20):
            while True:
                try:
                    answer = await register(kit, "m2", survivors[0])
                    break
                except Exception:
                    await trio.sleep(0.1)
        assert answer.group == "demo"
        nursery.cancel_scope.cancel()


async def test_an_evicted_members_connection_gets_no_more_pushes_and_the_others_still_do(
    tmp_path: Path,
) -> None:
    kit = make_kit(tmp_path)
    async with trio.open_nursery() as nursery:
        nodes = await start_cluster(kit, nursery)
        registrar = nodes["n1"].registrar
        assert registrar is not None
        sessions = [await connect(kit, member, "n1") for member in ("m1", "m2")]
        try:
            for session in sessions:
                await session.register(
                    "demo", Role.RECEIVER, last_msg_id=0, sender_key=None, timeout_s=15
                )
            assert registrar.attached == 2
            await admin_call(kit, "n2", "member.evict", {"group": "demo", "member": "m2"})
            with trio.fail_after(10):
                while registrar.attached != 1:
                    await trio.sleep(0.02)
            pushes = registrar.stats.pushes
            await register(kit, "m3", "n3")
            with trio.fail_after(10):
                while registrar.stats.pushes == pushes:
                    await trio.sleep(0.02)
            assert registrar.stats.pushes == pushes + 1, "m1 only"
        finally:
            for session in sessions:
                await session.aclose()
        nursery.cancel_scope.cancel()


async def test_admin_evicts_a_member_and_lists_groups_from_any_node(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    async with trio.open_nursery() as nursery:
        await start_cluster(kit, nursery)
        await register(kit, "m1", "n1")
        await register(kit, "m2", "n2")
        members = await admin_call(kit, "n3", "member.list", {"group": "demo"})
        assert [m["member"] for m in members] == ["m1", "m2"]  # type: ignore[index, union-attr]
        await admin_call(kit, "n2", "member.evict", {"group": "demo", "member": "m2"})
        members = await admin_call(kit, "n1", "member.list", {"group": "demo"})
        assert [m["member"] for m in members] == ["m1"]  # type: ignore[index, union-attr]
        groups = await admin_call(kit, "n3", "group.list")
        assert groups[0]["group"] == "demo"  # type: ignore[index]
        status = await admin_call(kit, "n1", "status")
        assert set(status) >= {
            "id",
            "role",
            "term",
            "leader",
            "commit_index",
            "applied_index",
            "peers",
        }  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


async def test_an_admin_policy_update_that_drops_a_members_authorization_removes_it(
    tmp_path: Path,
) -> None:
    kit = make_kit(tmp_path)
    async with trio.open_nursery() as nursery:
        nodes = await start_cluster(kit, nursery)
        await register(kit, "m1", "n1")
        await register(kit, "m2", "n2")
        driver = nodes["n1"].driver
        assert driver is not None
        narrowed = driver.state.policy("demo").to_mapping()
        narrowed["authorize"] = [{"identity": "m1", "roles": ["receiver"]}]
        answer = await admin_call(kit, "n3", "group.update", {"policy": narrowed})
        assert len(answer["msg_ids"]) == 3, "policy, then the KEK past m2, then the TEK"
        members = await admin_call(kit, "n1", "member.list", {"group": "demo"})
        assert [m["member"] for m in members] == ["m1"]  # type: ignore[index, union-attr]
        with pytest.raises(Refused, match="UNAUTHORIZED"):
            await register(kit, "m2", "n2")
        nursery.cancel_scope.cancel()


async def test_an_entry_from_a_newer_version_stops_each_node_that_reaches_it(
    tmp_path: Path,
) -> None:
    # What a mixed-version cluster meets when a newer leader proposes a command
    # this version cannot read: a node that reaches the entry stops right
    # before it, none skips it. The leader stops first, a follower takes over
    # and reaches the entry too; the last node, alone, has no quorum left.
    kit = make_kit(tmp_path)
    stopped: dict[str, int] = {}
    nodes: dict[str, Node] = {}

    async def run_node(nid: str, task_status: trio.TaskStatus[None]) -> None:
        node = nodes[nid] = Node(load_config(kit.config(nid)))
        try:
            await node.run(task_status=task_status)
        except* UpgradeRequired:
            assert node.driver is not None
            stopped[nid] = node.driver.state.applied_index

    async def propose(data: bytes) -> None:
        with suppress(NoQuorum):  # the leader stopped before applying it
            assert leader.driver is not None
            await leader.driver.propose(data, 30.0)

    async with trio.open_nursery() as nursery:
        for nid in kit.node_ids:
            await nursery.start(run_node, nid)
        await wait_for_group(nodes)
        leader = next(n for n in nodes.values() if n.status()["role"] == "leader")
        nursery.start_soon(propose, packb([COMMAND_VERSION + 1, 1, "from the future"]))
        with trio.fail_after(20):
            while len(stopped) < 2:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    (before,) = set(stopped.values())
    for node in nodes.values():
        assert node.driver is not None
        assert node.driver.state.applied_index <= before


async def test_a_node_of_the_previous_version_holds_proposals_at_it_until_it_upgrades(
    tmp_path: Path,
) -> None:
    # A rolling upgrade: n3 still runs a gcks from before the version gate, so
    # it says nothing. Entries of version 2 would stop it (the test above).
    kit = make_kit(tmp_path)
    nodes: dict[str, Node] = {}

    async def says_nothing(channel: object) -> None:
        await trio.sleep_forever()

    def newest_clocks() -> set[int]:
        return {n.driver.state._groups["demo"].clock_ms for n in nodes.values() if n.driver}

    async with trio.open_nursery() as nursery:
        for nid in kit.node_ids:
            nodes[nid] = Node(load_config(kit.config(nid)))
            if nid == "n3":  # were it leader, it would propose what it knows
                nodes[nid]._advertise = says_nothing  # type: ignore[method-assign]
                nodes[nid].versions = PeerVersions("n3", own=1)
            await nursery.start(nodes[nid].run)
        await wait_for_group(nodes)
        with trio.fail_after(20):  # n1 and n2 have told each other
            while not all(
                nodes[a].versions.of(b, trio.current_time()) == COMMAND_VERSION
                for a, b in (("n1", "n2"), ("n2", "n1"))
            ):
                await trio.sleep(0.05)
        assert {n.command_version() for n in nodes.values()} == {1}
        await register(kit, "m1", "n1")
        await register(kit, "m2", "n2")
        assert newest_clocks() == {0}, "no entry of version 2 was applied"
        # n3 is upgraded: it now says what it applies, and proposals follow.
        del nodes["n3"]._advertise
        n3 = nodes["n3"]
        n3.versions = PeerVersions("n3")
        assert n3.transport is not None
        nursery.start_soon(n3._advertise, _PeerChannel(n3.transport, _VERSIONS))
        with trio.fail_after(20):
            while {n.command_version() for n in nodes.values()} != {COMMAND_VERSION}:
                await trio.sleep(0.05)
        last = await register(kit, "m3", "n3")
        with trio.fail_after(10):
            while any(
                n.driver and n.driver.state.msg_id("demo") < last.msg_id for n in nodes.values()
            ):
                await trio.sleep(0.02)
        (clock,) = newest_clocks()
        assert clock > 0, "the join applied as a command of version 2, on every node"
        nursery.cancel_scope.cancel()


async def test_metrics_count_what_each_peer_link_carries(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    async with trio.open_nursery() as nursery:
        nodes = await start_cluster(kit, nursery)
        await register(kit, "m1", "n2")
        # The leader replicates to both others (followers talk to the leader only).
        leader = next(n for n in nodes.values() if n.status()["role"] == "leader")
        families = {family.name: family for family in leader.metrics()}
        others = set(kit.node_ids) - {leader.config.node_id}
        for name in ("gcks_peer_frames_sent_total", "gcks_peer_bytes_sent_total"):
            samples = {s.labels["peer"]: s.value for s in families[name].samples}
            assert set(samples) == others
            assert all(value > 0 for value in samples.values()), name
        disconnects = families["gcks_peer_disconnects_total"].samples
        assert {s.labels["peer"] for s in disconnects} == others
        # What multicast could not carry is visible too (nothing here).
        for name in (
            "gcks_rekeys_too_large_total",
            "gcks_rekeys_send_errors_total",
            "gcks_rekeys_dropped_total",
        ):
            assert [s.value for s in families[name].samples] == [0], name
        # A connection that hangs up before its handshake is counted as refused.
        member_port = kit.ports[leader.config.node_id]["member"]
        await (await trio.open_tcp_stream("127.0.0.1", member_port)).aclose()

        def member_link(name: str) -> float:
            return next(iter(f for f in leader.metrics() if f.name == name)).samples[0].value

        with trio.fail_after(10):
            while member_link("gcks_member_connections_refused_total") != 1:
                await trio.sleep(0.01)
        assert member_link("gcks_member_handshakes_waiting") == 0
        nursery.cancel_scope.cancel()
