"""`Member` against a real three-node cluster on loopback (in-process nodes).

Each test starts its own cluster from `clusterkit`, plus one UDP probe
responder per node. Latency between simulated regions comes from the fault
proxy: every member region gets its own TCP proxy (registration) and UDP proxy
(probes) in front of every node. Rekeys are forced through the leader's
rekeyer so that tests never wait for key lifetimes; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

import gcks.member.member as member_module
from gcks.cluster.commands import DeleteGroup, LeaveReason, encode_command
from gcks.cluster.config import load_config
from gcks.cluster.node import Node
from gcks.cluster.probe import ProbeResponder
from gcks.member.config import load_member_config
from gcks.member.datagram import DatagramError, Receiver, data_endpoint, open_multicast_socket
from gcks.member.member import Event, Member, MemberError, _Kind, _Request, wall_clock_ms
from gcks.member.ranking import RankingConfig
from gcks.proto.errors import ProtocolError, ReplayError
from gcks.proto.rekey import parse_rekey_header
from tests.cluster.clusterkit import Kit, free_ports, make_kit
from tests.faultproxy import FaultProxy

GROUP = "demo"
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------- harness


@dataclass
class Cluster:
    """Running nodes with their probe responders; nodes can be stopped one by one."""

    kit: Kit
    nursery: trio.Nursery
    nodes: dict[str, Node] = field(default_factory=dict)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    probes: dict[str, tuple[str, int]] = field(default_factory=dict)

    async def start(self, node_id: str) -> None:
        async def run(task_status: trio.TaskStatus[None]) -> None:
            with trio.CancelScope() as scope:
                self.scopes[node_id] = scope
                node = self.nodes[node_id] = Node(load_config(self.kit.config(node_id)))
                async with trio.open_nursery() as inner:
                    self.probes[node_id] = await inner.start(
                        ProbeResponder(node_id).serve, LOOPBACK, 0
                    )
                    await inner.start(node.run)
                    task_status.started()

        await self.nursery.start(run)

    def stop(self, node_id: str) -> None:
        self.scopes[node_id].cancel()
        del self.nodes[node_id]

    async def wait_for_group(self) -> None:
        with trio.fail_after(20):
            while not all(
                n.driver is not None and n.driver.state.has_group(GROUP)
                for n in self.nodes.values()
            ):
                await trio.sleep(0.02)

    def leader(self) -> Node:
        leaders = [n for n in self.nodes.values() if n.status()["role"] == "leader"]
        if not leaders:
            raise LookupError("no leader")
        return leaders[0]

    async def force_rekey(self, *, kek: bool = False) -> None:
        """One committed rekey; retried while a leader is being elected."""
        with trio.fail_after(20):
            while True:
                try:
                    rekeyer = self.leader().rekeyer
                    assert rekeyer is not None
                    await rekeyer.force(GROUP, tek=True, kek=kek)
                    return
                except Exception:
                    await trio.sleep(0.05)

    async def evict(self, member_id: str) -> None:
        rekeyer = self.leader().rekeyer
        assert rekeyer is not None
        with trio.fail_after(20):
            await rekeyer.leave(GROUP, member_id, LeaveReason.EVICT)

    def msg_id(self) -> int:
        return max(
            n.driver.state.msg_id(GROUP) for n in self.nodes.values() if n.driver is not None
        )


@contextlib.asynccontextmanager
async def running_cluster(tmp_path: Path, members: int = 4) -> AsyncIterator[Cluster]:
    kit = make_kit(tmp_path, members=members)
    async with trio.open_nursery() as nursery:
        cluster = Cluster(kit, nursery)
        for node_id in kit.node_ids:
            await cluster.start(node_id)
        await cluster.wait_for_group()
        yield cluster
        nursery.cancel_scope.cancel()


def member_config(
    cluster: Cluster,
    member_id: str,
    *,
    role: str = "receiver",
    nodes: dict[str, tuple[str, str]] | None = None,
    probe_interval_s: float = 30.0,
    register_timeout_ms: int = 3000,
    dns: tuple[str, int, int] | None = None,
) -> Path:
    """Write a member TOML; `nodes` maps node id -> (member addr, probe addr);
    `dns` = (name, member port, probe port) uses DNS discovery instead."""
    kit = cluster.kit
    ca, cert, key = kit.member_files(member_id)
    if nodes is None:
        nodes = {
            nid: (f"{LOOPBACK}:{kit.ports[nid]['member']}", "{}:{}".format(*cluster.probes[nid]))
            for nid in kit.node_ids
        }
    lines = [
        f'member_id = "{member_id}"',
        f'group = "{GROUP}"',
        f'role = "{role}"',
        "[tls]",
        f'cluster_ca = "{ca}"',
        f'cert = "{cert}"',
        f'key = "{key}"',
        "[probe]",
        "count = 3",
        "timeout_ms = 400",
        f"interval_s = {probe_interval_s}",
        "[rekey]",
        f'multicast_interface = "{LOOPBACK}"',
        f"register_timeout_ms = {register_timeout_ms}",
    ]
    if dns is not None:
        name, member_port, probe_port = dns
        lines += ["[discovery]", f'dns = "{name}"', f"member_port = {member_port}"]
        lines.append(f"probe_port = {probe_port}")
        nodes = {}
    for nid, (member_addr, probe_addr) in nodes.items():
        lines += ["[[nodes]]", f'id = "{nid}"', f'member = "{member_addr}"']
        lines.append(f'probe = "{probe_addr}"')
    path = kit.root / f"{member_id}.member.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def member(cluster: Cluster, member_id: str, **options: object) -> Member:
    multicast = bool(options.pop("multicast", True))
    config = load_member_config(member_config(cluster, member_id, **options))  # type: ignore[arg-type]
    return Member(config, multicast=multicast)


class EventLog:
    """Collects a member's events in a task; tests wait on conditions over them."""

    def __init__(self, m: Member) -> None:
        self.member = m
        self.events: list[Event] = []
        self._changed = trio.Event()

    async def collect(self) -> None:
        async for event in self.member.events():
            self.events.append(event)
            self._changed.set()
            self._changed = trio.Event()

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e["event"] == kind]

    async def wait_for(self, condition: Callable[[], object], timeout_s: float = 15) -> None:
        with trio.fail_after(timeout_s):
            while not condition():
                await self._changed.wait()


async def wait_until(condition: Callable[[], object], timeout_s: float = 15) -> None:
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.01)


def fingerprints(m: Member) -> tuple[int, str, str | None]:
    """What the member's events report: message id, KEK, the TEK a sender uses now.
    (Older TEKs still inside their deactivation delay differ by join time:
    a newcomer never gets TEKs from before its join.)"""
    keys = m.gsa
    tek = keys.sending_tek(wall_clock_ms())
    return keys.msg_id, keys.kek.fingerprint, None if tek is None else tek.fingerprint


# ----------------------------------------------------------------------- tests


async def test_member_registers_follows_rekeys_and_drops_copies_from_other_nodes(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        async with member(cluster, "m1") as m, trio.open_nursery() as nursery:
            log = EventLog(m)
            nursery.start_soon(log.collect)
            await log.wait_for(lambda: log.of("registered"))
            registered = log.of("registered")[0]
            assert registered["group"] == GROUP
            assert registered["node"] in cluster.nodes
            assert set(registered["rtt_ms"]) == set(cluster.nodes)  # type: ignore[arg-type]
            for _ in range(3):
                await cluster.force_rekey()
            target = cluster.msg_id()
            await log.wait_for(lambda: m.gsa.msg_id == target)
            rekeys = log.of("rekey")
            # Once per accepted id, whatever the number of copies (3 multicast + 1 push).
            assert len({e["msg_id"] for e in rekeys}) == len(rekeys)
            await log.wait_for(lambda: m.stats.duplicates >= 3)
            assert rekeys[-1]["kek"] == m.gsa.kek.fingerprint
            leader_state = cluster.leader().driver.state  # type: ignore[union-attr]
            assert m.gsa.kek == leader_state.kek(GROUP)
            nursery.cancel_scope.cancel()
        assert log.of("left") == [] or log.of("left")[0]["reason"] == "deregistered"
        assert m.left_reason == "deregistered"
        with trio.fail_after(10):
            while any(
                n.driver and n.driver.state.is_member(GROUP, "m1") for n in cluster.nodes.values()
            ):
                await trio.sleep(0.02)


@dataclass
class Region:
    """The cluster as seen from one region: per node, addresses behind proxies."""

    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)
    proxies: dict[str, tuple[FaultProxy, FaultProxy]] = field(default_factory=dict)

    def set_delay(self, node_id: str, delay_ms: float) -> None:
        for proxy in self.proxies[node_id]:
            proxy.set_delay(delay_ms)


@contextlib.asynccontextmanager
async def region_proxies(
    cluster: Cluster, home: str, near_ms: float = 1.0, far_ms: float = 40.0
) -> AsyncIterator[Region]:
    """The member-side view of the cluster from the region of node `home`: a
    TCP and a UDP proxy per node, `near_ms` each way to `home`, `far_ms` to others."""
    kit = cluster.kit
    async with contextlib.AsyncExitStack() as stack:
        region = Region()
        for nid in kit.node_ids:
            delay = near_ms if nid == home else far_ms
            tcp = await stack.enter_async_context(
                FaultProxy((LOOPBACK, 0), (LOOPBACK, kit.ports[nid]["member"]), "tcp")
            )
            udp = await stack.enter_async_context(
                FaultProxy((LOOPBACK, 0), cluster.probes[nid], "udp")
            )
            region.proxies[nid] = (tcp, udp)
            region.set_delay(nid, delay)
            region.nodes[nid] = ("{}:{}".format(*tcp.address), "{}:{}".format(*udp.address))
        yield region


async def test_each_member_registers_with_its_own_regions_node_and_fails_over_when_it_stops(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster, contextlib.AsyncExitStack() as stack:
        members: dict[str, Member] = {}
        logs: dict[str, EventLog] = {}
        nursery = await stack.enter_async_context(trio.open_nursery())
        for index, home in enumerate(cluster.kit.node_ids, start=1):
            view = await stack.enter_async_context(region_proxies(cluster, home))
            config = load_member_config(member_config(cluster, f"m{index}", nodes=view.nodes))
            m = members[home] = await stack.enter_async_context(Member(config))
            logs[home] = EventLog(m)
            nursery.start_soon(logs[home].collect)
        for home, m in members.items():
            assert m.node == home
            await logs[home].wait_for(lambda log=logs[home]: log.of("registered"))
            registered = logs[home].of("registered")[0]
            rtts = registered["rtt_ms"]
            assert isinstance(rtts, dict)
            assert rtts[home] < min(ms for nid, ms in rtts.items() if nid != home)

        # The region of n1 loses its node: its member moves to the next nearest.
        mover, log = members["n1"], logs["n1"]
        cluster.stop("n1")
        await log.wait_for(lambda: log.of("failover"))
        failover = log.of("failover")[0]
        assert failover["from"] == "n1"
        assert failover["to"] in ("n2", "n3")
        assert mover.node == failover["to"]
        for _ in range(2):
            await cluster.force_rekey()
        target = cluster.msg_id()
        for m in members.values():
            await wait_until(lambda m=m: m.gsa.msg_id >= target)
        assert len({fingerprints(m) for m in members.values()}) == 1
        # Pushes come over the new session too, not only multicast.
        await log.wait_for(
            lambda: any(
                e.get("node") == failover["to"] for e in log.of("rekey") + log.of("duplicate")
            )
        )
        nursery.cancel_scope.cancel()


async def test_member_that_missed_rekeys_detects_the_gap_and_resynchronises(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster, contextlib.AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        # The test hears the multicast copies itself, to hand one on later.
        endpoint = cluster.leader().driver.state.policy(GROUP).multicast  # type: ignore[union-attr]
        tap = stack.enter_context(
            await open_multicast_socket(str(endpoint.address), endpoint.port, LOOPBACK)
        )
        steady = await stack.enter_async_context(member(cluster, "m1"))
        # m2 gets no multicast at all, and its node stops pushing to it below.
        lossy = await stack.enter_async_context(member(cluster, "m2", multicast=False))
        sender = await stack.enter_async_context(member(cluster, "m3", role="sender"))
        await wait_until(lambda: lossy.gsa.msg_id == cluster.msg_id())
        seen = sender.protect(b"accepted once")
        assert lossy.unprotect(seen)[1] == b"accepted once"
        log = EventLog(lossy)
        nursery.start_soon(log.collect)
        start = lossy.gsa.msg_id
        assert lossy.node is not None
        registrar = cluster.nodes[lossy.node].registrar
        assert registrar is not None
        registrar.detach(GROUP, "m2")
        for _ in range(3):
            await cluster.force_rekey()
        target = cluster.msg_id()
        assert target >= start + 3
        await wait_until(lambda: steady.gsa.msg_id == target)
        assert lossy.gsa.msg_id == start  # it heard none of them
        with trio.fail_after(10):
            while True:
                datagram, _ = await tap.recvfrom(65_536)
                if parse_rekey_header(datagram).msg_id == target:
                    break
        # The newest message arrives (as a late multicast copy would): a gap.
        # The ones before it may still be on their way by the other path; only
        # once `gap_wait_ms` (1 s) has passed without them does it re-register.
        gap_at = trio.current_time()
        lossy.receive_rekey(datagram, "multicast")
        assert lossy.stats.ahead == 1
        await log.wait_for(lambda: lossy.gsa.msg_id == target)
        assert trio.current_time() - gap_at >= 1.0
        (resync,) = log.of("resync")
        assert resync["msg_id"] == target
        assert "gap" in str(resync["reason"])
        assert log.of("registered")[-1]["msg_id"] == target
        assert lossy.stats.resyncs == 1
        assert fingerprints(lossy) == fingerprints(steady)
        # Its new GSA still holds the TEK of that packet: still no replay.
        with pytest.raises(ReplayError):
            lossy.unprotect(seen)
        # Registered again, it is pushed the next rekey.
        await cluster.force_rekey()
        await wait_until(lambda: lossy.gsa.msg_id == cluster.msg_id())
        assert fingerprints(lossy) == fingerprints(steady)
        nursery.cancel_scope.cancel()


async def test_a_rekey_that_overtakes_the_one_before_it_waits_for_it_instead_of_a_resync(
    tmp_path: Path,
) -> None:
    # The multicast and push paths race: message N+1 by one can arrive before
    # N by the other. Re-registering at once would cost the cluster a
    # registration per member that saw the race, for keys about to arrive.
    async with running_cluster(tmp_path) as cluster, contextlib.AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        endpoint = cluster.leader().driver.state.policy(GROUP).multicast  # type: ignore[union-attr]
        tap = stack.enter_context(
            await open_multicast_socket(str(endpoint.address), endpoint.port, LOOPBACK)
        )
        steady = await stack.enter_async_context(member(cluster, "m1"))
        late = await stack.enter_async_context(member(cluster, "m2", multicast=False))
        await wait_until(lambda: late.gsa.msg_id == cluster.msg_id())
        log = EventLog(late)
        nursery.start_soon(log.collect)
        start = late.gsa.msg_id
        assert late.node is not None
        registrar = cluster.nodes[late.node].registrar
        assert registrar is not None
        registrar.detach(GROUP, "m2")  # m2 hears the next two only from this test
        # The first brings a new KEK: the second is under a KEK m2 lacks yet.
        for kek in (True, False):
            await cluster.force_rekey(kek=kek)
        await wait_until(lambda: steady.gsa.msg_id == start + 2)
        heard: dict[int, bytes] = {}
        with trio.fail_after(10):
            while len(heard) < 2:
                datagram, _ = await tap.recvfrom(65_536)
                msg_id = parse_rekey_header(datagram).msg_id
                if msg_id > start:
                    heard[msg_id] = datagram
        late.receive_rekey(heard[start + 2], "multicast")
        assert late.gsa.msg_id == start, "held, not applied past the gap"
        await trio.lowlevel.checkpoint()
        late.receive_rekey(heard[start + 1], "n1")
        assert late.gsa.msg_id == start + 2, "the late one, then the one held, in order"
        assert fingerprints(late) == fingerprints(steady)
        with trio.fail_after(10):
            while late._gap_timer:  # its wait ends without a registration
                await trio.sleep(0.05)
        assert late.stats.resyncs == 0
        assert late.stats.registrations == 1
        assert [e["msg_id"] for e in log.of("rekey")] == [start + 1, start + 2]
        nursery.cancel_scope.cancel()


async def run_members(members: list[Member], nursery: trio.Nursery, stop: trio.Event) -> None:
    """Enter every member concurrently (their joins share rekey batches)."""
    ready = 0
    all_ready = trio.Event()

    async def run(m: Member) -> None:
        nonlocal ready
        async with m:
            ready += 1
            if ready == len(members):
                all_ready.set()
            await stop.wait()

    for m in members:
        nursery.start_soon(run, m)
    with trio.fail_after(30):
        await all_ready.wait()


async def test_twenty_members_through_fifty_rekeys_end_with_identical_fingerprints(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path, members=20) as cluster:
        members = [member(cluster, f"m{i}") for i in range(1, 21)]
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await run_members(members, nursery, stop)
            # A member whose answer was overtaken by the next join's rekey may
            # have missed that one; the next message shows it the gap (resync).
            await cluster.force_rekey()
            settled = cluster.msg_id()
            for m in members:
                await wait_until(lambda m=m: m.gsa.msg_id >= settled)
            resyncs = [m.stats.resyncs for m in members]
            for _ in range(50):
                await cluster.force_rekey()
            target = cluster.msg_id()
            for m in members:
                await wait_until(lambda m=m: m.gsa.msg_id == target)
            assert len({fingerprints(m) for m in members}) == 1
            assert [m.stats.resyncs for m in members] == resyncs
            assert all(m.stats.rekeys >= 50 for m in members)
            stop.set()


async def test_evicted_member_cannot_decrypt_data_sent_after_its_eviction_rekey(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster, contextlib.AsyncExitStack() as stack:
        sender = await stack.enter_async_context(member(cluster, "m1", role="sender"))
        reader = await stack.enter_async_context(member(cluster, "m2"))
        evicted = await stack.enter_async_context(member(cluster, "m3"))
        await wait_until(lambda: sender.gsa.msg_id == reader.gsa.msg_id == evicted.gsa.msg_id)
        before = sender.protect(b"before the eviction")
        assert evicted.unprotect(before)[1] == b"before the eviction"
        keys_of_evicted = evicted.gsa
        await cluster.evict("m3")
        target = cluster.msg_id()
        await wait_until(lambda: sender.gsa.msg_id == target and reader.gsa.msg_id == target)
        with trio.fail_after(15):
            reason = await evicted.wait_left()
        assert "refused" in reason
        after = sender.protect(b"after the eviction")
        assert reader.unprotect(after)[1] == b"after the eviction"
        assert evicted.gsa is keys_of_evicted  # it never got keys past the eviction
        with pytest.raises(ProtocolError):
            evicted.unprotect(after)


async def test_member_that_joins_cannot_decrypt_data_sent_before_its_join_rekey(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster, contextlib.AsyncExitStack() as stack:
        sender = await stack.enter_async_context(member(cluster, "m1", role="sender"))
        before = sender.protect(b"before the join")
        newcomer = await stack.enter_async_context(member(cluster, "m4"))
        await wait_until(lambda: sender.gsa.msg_id >= newcomer.gsa.msg_id)
        with pytest.raises(ProtocolError):
            newcomer.unprotect(before)
        after = sender.protect(b"after the join")
        assert newcomer.unprotect(after)[1] == b"after the join"


async def test_bad_packets_on_the_data_socket_are_counted_and_dropped_and_the_member_runs_on(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster, contextlib.AsyncExitStack() as stack:
        sender = await stack.enter_async_context(member(cluster, "m1", role="sender"))
        reader = await stack.enter_async_context(member(cluster, "m2"))
        group, port = data_endpoint(reader.gsa.policy)
        receiver = stack.enter_context(
            Receiver(await open_multicast_socket(group, port, LOOPBACK), reader.unprotect)
        )
        await wait_until(lambda: sender.gsa.msg_id == reader.gsa.msg_id)
        good = sender.protect(b"hello group")
        tampered = bytearray(sender.protect(b"tampered"))
        tampered[-1] ^= 1
        bad = [b"", b"\x00", b"garbage" * 20, bytes(tampered), good[:20]]
        out = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        out.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
        out.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOOPBACK))
        for packet in [*bad, good, good]:  # the second copy of `good` is a replay
            out.sendto(packet, (group, port))
        last = sender.protect(b"still running")
        out.sendto(last, (group, port))
        with trio.fail_after(10):
            first = await receiver.receive()
            second = await receiver.receive()
        assert (first.payload, second.payload) == (b"hello group", b"still running")
        assert first.sender_id == sender.gsa.sender_id
        assert receiver.stats.bad == len(bad) + 1
        assert receiver.stats.rejected["ReplayError"] == 1
        # The member itself is unharmed: it still follows rekeys.
        await cluster.force_rekey()
        await wait_until(lambda: reader.gsa.msg_id == cluster.msg_id())


async def test_member_switches_only_after_another_node_is_clearly_faster_for_two_rounds(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster, contextlib.AsyncExitStack() as stack:
        region = await stack.enter_async_context(region_proxies(cluster, "n1"))
        path = member_config(cluster, "m1", nodes=region.nodes, probe_interval_s=1.0)
        m = Member(load_member_config(path), ranking=RankingConfig(window=3, holddown_s=0))
        m = await stack.enter_async_context(m)
        log = EventLog(m)
        nursery = await stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(log.collect)
        assert m.node == "n1"
        # The member moves (its region's nearest node is now n2).
        region.set_delay("n1", 40.0)
        region.set_delay("n2", 1.0)
        await log.wait_for(lambda: log.of("failover"), timeout_s=20)
        (switch,) = log.of("failover")
        assert (switch["from"], switch["to"]) == ("n1", "n2")
        assert "2 rounds" in str(switch["reason"])
        assert m.node == "n2"
        assert log.of("registered")[-1]["node"] == "n2"
        await cluster.force_rekey()
        await wait_until(lambda: m.gsa.msg_id == cluster.msg_id())
        nursery.cancel_scope.cancel()


async def test_signed_group_termination_drops_every_key_and_the_member_leaves(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster, contextlib.AsyncExitStack() as stack:
        sender = await stack.enter_async_context(member(cluster, "m1", role="sender"))
        packet = sender.protect(b"before the end")
        leader = cluster.leader().driver
        assert leader is not None
        await leader.propose(encode_command(DeleteGroup(GROUP, wall_clock_ms(), "closing")), 10)
        with trio.fail_after(10):
            reason = await sender.wait_left()
        assert reason == "group terminated: closing"
        assert sender.gsa.teks == ()
        with pytest.raises(ProtocolError):
            sender.unprotect(packet)
        events = [event async for event in sender.events()]
        assert events[-1] == {"event": "left", "group": GROUP, "reason": reason}


async def test_member_with_no_reachable_node_fails_with_member_error(tmp_path: Path) -> None:
    kit = make_kit(tmp_path, members=1)
    cluster = Cluster(kit, nursery=None)  # type: ignore[arg-type]  # nothing runs
    closed = free_ports(4)
    nodes = {"n1": (f"{LOOPBACK}:{closed[0]}", f"{LOOPBACK}:{closed[1]}")}
    nodes["n2"] = (f"{LOOPBACK}:{closed[2]}", f"{LOOPBACK}:{closed[3]}")
    config = load_member_config(member_config(cluster, "m1", nodes=nodes))
    with trio.fail_after(10), pytest.raises(MemberError, match="could not register") as error:
        async with Member(config):
            pass
    assert "n1" in str(error.value)
    assert "n2" in str(error.value)


async def test_member_found_by_dns_learns_node_ids_from_probes_and_registers_with_the_nearest(
    tmp_path: Path,
) -> None:
    """A headless service: one name, one address per node, the same ports on each."""
    async with running_cluster(tmp_path) as cluster, contextlib.AsyncExitStack() as stack:
        member_port, probe_port = free_ports(2)
        addresses = {"n1": "127.0.0.2", "n2": "127.0.0.3", "n3": "127.0.0.4"}
        for nid, address in addresses.items():
            kit_port = cluster.kit.ports[nid]["member"]
            tcp = FaultProxy((address, member_port), (LOOPBACK, kit_port), "tcp")
            udp = FaultProxy((address, probe_port), cluster.probes[nid], "udp")
            for proxy in (
                await stack.enter_async_context(tcp),
                await stack.enter_async_context(udp),
            ):
                proxy.set_delay(1.0 if nid == "n2" else 20.0)

        async def resolver(name: str) -> list[str]:
            assert name == "gcks-nodes.test"
            return list(addresses.values())

        path = member_config(cluster, "m1", dns=("gcks-nodes.test", member_port, probe_port))
        m = await stack.enter_async_context(Member(load_member_config(path), resolver=resolver))
        assert m.node == "n2"
        with trio.fail_after(5):
            registered = await anext(aiter(m.events()))
        assert registered["event"] == "registered"
        assert set(registered["rtt_ms"]) == set(addresses)  # type: ignore[arg-type]
        await cluster.force_rekey()
        await wait_until(lambda: m.gsa.msg_id == cluster.msg_id())


async def test_a_member_with_a_static_list_learns_a_node_from_the_clusters_address_book(
    tmp_path: Path,
) -> None:
    """Configured with n1 only: the GSA answer's address book names n2 and n3,
    the next probe round measures them, and when n1 stops the member fails
    over to one of them instead of having nowhere to go."""
    async with running_cluster(tmp_path) as cluster, contextlib.AsyncExitStack() as stack:
        kit = cluster.kit
        nodes = {
            "n1": (f"{LOOPBACK}:{kit.ports['n1']['member']}", "{}:{}".format(*cluster.probes["n1"]))
        }
        m = await stack.enter_async_context(
            member(cluster, "m1", nodes=nodes, probe_interval_s=1.0)
        )
        assert m.node == "n1"
        await wait_until(lambda: all(m.ranking.median_ms(n) is not None for n in ("n2", "n3")))
        cluster.stop("n1")
        await wait_until(lambda: m.node in {"n2", "n3"} and m.stats.failovers == 1, timeout_s=30)
        await cluster.force_rekey()
        await wait_until(lambda: m.gsa.msg_id == cluster.msg_id())


async def _drained(m: Member) -> None:
    """Wait until the supervisor has taken every request posted so far."""
    await wait_until(lambda: m._send_request.statistics().current_buffer_used == 0)


async def test_lifetime_resyncs_asked_while_the_member_waits_register_once(
    tmp_path: Path,
) -> None:
    # The lifetime watch asks every few seconds, also while a failover waits for
    # a node: once one is back, a single registration answers them all.
    async with running_cluster(tmp_path) as cluster, member(cluster, "m1") as m:
        for _ in range(5):
            m._ask_resync("TEK about to expire without a successor")
        await _drained(m)
        await wait_until(lambda: m.stats.registrations == 2)
        await _drained(m)
        assert m.stats.resyncs == 1
        assert m.stats.registrations == 2


async def test_a_lost_connection_already_replaced_by_a_resync_is_no_failover(
    tmp_path: Path,
) -> None:
    # The old connection of a resync at the same node ends while the new one
    # registers: the push reader's report names the old session, not the node.
    async with running_cluster(tmp_path) as cluster, member(cluster, "m1") as m:
        home, old = m.node, m._session
        assert old is not None
        m._ask_resync("test")
        await wait_until(lambda: m.stats.registrations == 2)
        assert m.node == home
        assert m._session is not old
        m._post(_Request(_Kind.LOST, node=old.node_id, reason="dropped", session=old))
        m._ask_resync("served after the report: a failover, if any, came first")
        await wait_until(lambda: m.stats.registrations == 3)
        assert m.stats.failovers == 0
        assert m.node == home


async def test_failover_without_probe_answers_retries_nodes_that_failed_before(
    tmp_path: Path,
) -> None:
    # A firewalled probe port: no node ever answers a probe, so no failed mark
    # is cleared by one. n1 fails (its link cut), the member moves to n2; n1's
    # link heals, n2 stops: with every known node marked failed, the member
    # must try them again rather than none for good.
    async with running_cluster(tmp_path) as cluster, contextlib.AsyncExitStack() as stack:
        kit = cluster.kit
        link = await stack.enter_async_context(
            FaultProxy((LOOPBACK, 0), (LOOPBACK, kit.ports["n1"]["member"]), "tcp")
        )
        dead = free_ports(4)
        nodes = {
            "n1": ("{}:{}".format(*link.address), f"{LOOPBACK}:{dead[0]}"),
            "n2": (f"{LOOPBACK}:{kit.ports['n2']['member']}", f"{LOOPBACK}:{dead[1]}"),
            # Listed, so not learned from the address book: n1 and n2 are all it can reach.
            "n3": (f"{LOOPBACK}:{dead[2]}", f"{LOOPBACK}:{dead[3]}"),
        }
        m = await stack.enter_async_context(member(cluster, "m1", nodes=nodes))
        nursery = await stack.enter_async_context(trio.open_nursery())
        log = EventLog(m)
        nursery.start_soon(log.collect)
        assert m.node == "n1", "no RTT known: the first node by id"
        link.partition(cut=True)
        await log.wait_for(lambda: len(log.of("failover")) == 1, timeout_s=30)
        assert m.node == "n2"
        link.heal()
        cluster.stop("n2")
        await log.wait_for(lambda: len(log.of("failover")) == 2, timeout_s=30)
        assert m.node == "n1"
        nursery.cancel_scope.cancel()


async def test_a_multicast_group_that_cannot_be_joined_at_first_is_joined_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interface is not up yet when the member starts: it lives on pushes,
    # then takes multicast copies once a later attempt joins the group.
    attempts: list[str] = []

    async def not_yet_then_open(*args: str) -> trio.socket.SocketType:
        attempts.append(args[0])
        if len(attempts) < 3:
            raise DatagramError("no such interface (yet)")
        return await open_multicast_socket(*args)

    monkeypatch.setattr(member_module, "open_multicast_socket", not_yet_then_open)
    monkeypatch.setattr(member_module, "_MULTICAST_RETRY_S", 0.05)
    async with running_cluster(tmp_path) as cluster, member(cluster, "m1") as m:
        await wait_until(lambda: len(attempts) == 3)
        sources: list[str] = []
        with trio.fail_after(20):
            while member_module.MULTICAST not in sources:
                await cluster.force_rekey()
                target = cluster.msg_id()
                await wait_until(lambda: m.gsa.msg_id >= target)
                sources = [str(e.get("node")) for e in list(m._events)]
