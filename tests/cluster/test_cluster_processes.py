"""Three `gcks node` processes on loopback: the node rules of issue 4, end to end.

Real processes, real sockets, real signals: registration at every node gives
the same GSA, every node sends byte-identical rekeys by multicast and push,
SIGKILL of the leader does not stop registration, a restarted node rejoins
on its data directory, a wiped node comes back through a snapshot, only the
right certificates pass, and garbage at every port changes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import ssl
from collections import defaultdict
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization

from gcks.cluster import pki
from gcks.cluster.admin import AdminError
from gcks.cluster.tls import peer_client_context
from gcks.member.session import Session
from gcks.member.tls import member_client_context
from gcks.proto.identity import Role as CertRole
from gcks.proto.policy import Role
from gcks.proto.rekey import parse_rekey_header
from tests.cluster.clusterkit import Kit, admin_call, make_kit, register
from tests.cluster.processes import ProcessCluster, running_cluster

pytestmark = pytest.mark.slow


async def retry_register(kit: Kit, member: str, node: str, timeout_s: float = 20) -> object:
    with trio.fail_after(timeout_s):
        while True:
            try:
                return await register(kit, member, node)
            except Exception:
                await trio.sleep(0.1)


async def admin_retry(kit: Kit, nodes: list[str], op: str, args: dict[str, object]) -> object:
    """An admin request that follows the leader, bounded in time."""
    with trio.fail_after(20):
        while True:
            for node in nodes:
                try:
                    return await admin_call(kit, node, op, args)
                except (AdminError, OSError, trio.TooSlowError):
                    continue
            await trio.sleep(0.2)


async def test_registration_at_each_node_returns_the_same_gsa(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    async with running_cluster(kit) as cluster:
        await cluster.wait_group()
        leader = await cluster.leader()
        follower = next(n for n in kit.node_ids if n != leader)
        first = await register(kit, "m1", follower)  # forwarded to the leader
        for node in kit.node_ids:
            again = await register(kit, "m1", node)
            assert dataclasses.replace(again, request_id=first.request_id) == first


async def test_every_node_sends_byte_identical_rekeys_by_multicast_and_push(
    tmp_path: Path,
) -> None:
    kit = make_kit(tmp_path)
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("239.77.0.1", kit.multicast_port))
    membership = socket.inet_aton("239.77.0.1") + socket.inet_aton("127.0.0.1")
    listener.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    listener.setblocking(False)
    copies: dict[int, list[tuple[bytes, int]]] = defaultdict(list)
    pushed: dict[int, bytes] = {}
    async with running_cluster(kit) as cluster:
        await cluster.wait_group()
        ca, crt, key = kit.member_files("m1")
        ctx = member_client_context(cluster_ca=ca, cert=crt, key=key)
        session = await Session.connect(
            "127.0.0.1", kit.ports["n2"]["member"], ctx, expected_node="n2", timeout_s=5
        )
        await session.register("demo", Role.RECEIVER, last_msg_id=0, sender_key=None, timeout_s=15)
        sock = trio.socket.from_stdlib_socket(listener)

        async def collect_multicast() -> None:
            while True:
                data, (_host, port) = await sock.recvfrom(65536)
                copies[parse_rekey_header(data).msg_id].append((data, port))

        async def collect_pushes() -> None:
            async for datagram in session.pushes():
                pushed[parse_rekey_header(datagram).msg_id] = datagram

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect_multicast)
            nursery.start_soon(collect_pushes)
            for _ in range(3):
                await admin_retry(kit, kit.node_ids, "rekey", {"group": "demo"})
            with trio.fail_after(10):
                while len(pushed) < 3 or any(len(copies[m]) < 3 for m in pushed):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        await session.aclose()
    for msg_id, datagram in pushed.items():
        received = copies[msg_id]
        assert {data for data, _ in received} == {datagram}, "copies differ"
        assert len({port for _, port in received}) == 3, "not every node sent it"


async def test_sigkill_of_the_leader_registration_goes_on(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    async with running_cluster(kit) as cluster:
        await cluster.wait_group()
        await register(kit, "m1", "n1")
        leader = await cluster.leader()
        await cluster.nodes[leader].kill()
        survivors = [n for n in kit.node_ids if n != leader]
        start = trio.current_time()
        answer = await retry_register(kit, "m2", survivors[0])
        assert answer is not None
        # Bounded by the election timeout plus a registration: generous on 2 cores.
        assert trio.current_time() - start < 15
        new_leader = await cluster.leader(among=survivors)
        assert new_leader in survivors


async def test_restarted_node_rejoins_on_its_data_directory(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    async with running_cluster(kit) as cluster:
        await cluster.wait_group()
        leader = await cluster.leader()
        victim = next(n for n in kit.node_ids if n != leader)
        await cluster.nodes[victim].kill()
        for i in range(3):
            await register(kit, f"m{i + 1}", leader)
        await cluster.nodes[victim].start()
        await converge(cluster)


async def converge(cluster: ProcessCluster, timeout_s: float = 20) -> dict[str, object]:
    """Wait until every node applied the same index and holds the same group state."""
    with trio.fail_after(timeout_s):
        while True:
            statuses = [await node.status() for node in cluster.nodes.values()]
            if all(statuses):
                views = {
                    (s["applied_index"], repr(s["groups"]))  # type: ignore[index]
                    for s in statuses
                }
                if len(views) == 1:
                    return statuses[0]  # type: ignore[return-value]
            await trio.sleep(0.1)


async def test_wiped_node_removed_and_readded_catches_up_by_snapshot(tmp_path: Path) -> None:
    kit = make_kit(tmp_path, snapshot_entries=4)
    async with running_cluster(kit) as cluster:
        await cluster.wait_group()
        leader = await cluster.leader()
        victim = next(n for n in kit.node_ids if n != leader)
        others = [n for n in kit.node_ids if n != victim]
        await admin_retry(kit, others, "cluster.remove-node", {"node": victim})
        await cluster.nodes[victim].kill()
        for path in sorted((kit.root / "data" / victim).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        for _ in range(10):  # enough entries for the leader to compact past them
            await admin_retry(kit, others, "rekey", {"group": "demo"})
        await cluster.nodes[victim].start(env={"GCKS_JOIN": "true"})
        await admin_retry(kit, others, "cluster.add-node", {"node": victim})
        await converge(cluster)
        assert "installed snapshot" in cluster.nodes[victim].log_tail(400)


async def tls_refused(port: int, context: ssl.SSLContext) -> bool:
    """True if the node closes a TLS connection made with `context` right after the
    handshake (TLS 1.3: the client finishes first, then the server judges it)."""
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname=None
    )
    try:
        with trio.fail_after(5):
            await stream.do_handshake()
            return await stream.receive_some(1) == b""
    except (trio.BrokenResourceError, ssl.SSLError):
        return True
    finally:
        await trio.aclose_forcefully(stream)


async def test_member_and_unknown_node_certificates_are_refused_where_they_do_not_belong(
    tmp_path: Path,
) -> None:
    kit = make_kit(tmp_path)
    root = kit.root / "pki"
    cluster_ca = root / "ca/cluster.crt"
    pki.pki_init(root, nodes=["n9"])  # signed by the cluster CA, but in no configuration
    _, member_crt, member_key = kit.member_files("m1")
    member_as_peer = peer_client_context(cluster_ca=cluster_ca, cert=member_crt, key=member_key)
    stranger = peer_client_context(
        cluster_ca=cluster_ca, cert=root / "node/n9.crt", key=root / "node/n9.key"
    )
    async with running_cluster(kit) as cluster:
        await cluster.wait_group()
        n1 = kit.ports["n1"]
        assert await tls_refused(n1["peer"], member_as_peer)
        assert await tls_refused(n1["admin"], member_as_peer)
        assert await tls_refused(n1["peer"], stranger)
        await cluster.leader()  # the cluster is unharmed
        log = cluster.nodes["n1"].log_tail(200)
        assert "peer link from" in log
        assert "refused" in log
        assert "admin connection refused" in log


async def test_a_node_presents_a_renewed_certificate_after_sighup_without_a_restart(
    tmp_path: Path,
) -> None:
    kit = make_kit(tmp_path)
    ca, member_crt, member_key = kit.member_files("m1")
    member = member_client_context(cluster_ca=ca, cert=member_crt, key=member_key)
    cluster_ca = pki.CertificateAuthority.load(
        pki.CaKind.CLUSTER, *pki.ca_paths(kit.root / "pki", pki.CaKind.CLUSTER)
    )
    renewed = pki.issue(cluster_ca, CertRole.NODE, "n1", tmp_path / "renewed", ips=["127.0.0.1"])

    async def presented() -> bytes:
        tcp = await trio.open_tcp_stream("127.0.0.1", kit.ports["n1"]["member"])
        stream = trio.SSLStream(tcp, member, server_hostname=None)
        try:
            await stream.do_handshake()
            der = stream.getpeercert(binary_form=True)
            assert der is not None
            return der
        finally:
            await trio.aclose_forcefully(stream)

    async with running_cluster(kit) as cluster:
        await cluster.wait_group()
        before = await presented()
        crt, key = pki.cert_paths(kit.root / "pki", CertRole.NODE, "n1")
        for source, target in ((renewed.cert_path, crt), (renewed.key_path, key)):
            staged = target.with_suffix(".new")
            staged.write_bytes(source.read_bytes())
            staged.replace(target)
        await cluster.nodes["n1"].signal(signal.SIGHUP)
        new = renewed.certificate.public_bytes(serialization.Encoding.DER)
        with trio.fail_after(10):
            while (now := await presented()) == before:
                await trio.sleep(0.05)
        assert now == new
        assert cluster.nodes["n1"].alive
        _, metrics = await cluster.nodes["n1"].http("/metrics")
        assert "gcks_tls_reloads_total 1" in metrics
        await cluster.leader()  # peers still talk to it


async def test_random_bytes_at_every_listener_change_nothing(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    rng = os.urandom
    async with running_cluster(kit) as cluster:
        await cluster.wait_group()
        before = await converge(cluster)
        ports = kit.ports["n1"]

        async def garbage(kind: str, size: int) -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", ports[kind])
            try:
                await stream.send_all(rng(size))
                # The node answers or hangs up by its own handshake/read deadline.
                with trio.move_on_after(10):
                    while await stream.receive_some(1024):
                        pass
            except trio.BrokenResourceError:
                pass
            finally:
                await trio.aclose_forcefully(stream)

        async with trio.open_nursery() as nursery:
            for kind in ("peer", "member", "admin", "ops"):
                for size in (1, 7, 300, 5000):
                    nursery.start_soon(garbage, kind, size)
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with udp:
            for size in (0, 1, 21, 600):
                await udp.sendto(rng(size), ("127.0.0.1", ports["probe"]))
        for node in cluster.nodes.values():
            assert node.alive
        await cluster.leader()
        after = await converge(cluster)
        assert after["groups"] == before["groups"]  # type: ignore[index]
        await register(kit, "m1", "n1")  # and it still serves
        log = cluster.nodes["n1"].log_tail(400)
        assert "peer link from" in log
        assert "member connection from" in log
        assert "admin connection refused" in log


async def test_sigterm_on_the_leader_hands_leadership_over_and_exits_cleanly(
    tmp_path: Path,
) -> None:
    kit = make_kit(tmp_path)
    async with running_cluster(kit) as cluster:
        await cluster.wait_group()
        leader = await cluster.leader()
        assert await cluster.nodes[leader].stop() == 0
        survivors = [n for n in kit.node_ids if n != leader]
        new_leader = await cluster.leader(among=survivors)
        assert "transferring leadership" in cluster.nodes[leader].log_tail(50)
        assert new_leader in survivors
