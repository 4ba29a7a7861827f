"""Security negatives against a real three-node cluster (DESIGN.md "What must hold").

- The peer port refuses a member, an admin, a self-signed and an expired
  certificate, and the cluster keeps its leader.
- Members drop a replayed rekey, a modified one, and one forged by a member
  who knows the KEK (signed with its own key): their keys do not change, and
  the genuine next rekey still applies.
- An evicted member cannot read data sent after its eviction, and cannot
  register again.
- Random bytes at every port of every node: every node keeps serving.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gcks.cluster import pki
from gcks.cluster.admin import AdminError
from gcks.cluster.tls import peer_client_context
from gcks.member.group import GroupKeys
from gcks.member.group import Outcome as RekeyOutcome
from gcks.member.member import wall_clock_ms
from gcks.member.session import Refused, Session
from gcks.member.tls import member_client_context
from gcks.proto.errors import ProtocolError
from gcks.proto.identity import Role as CertRole
from gcks.proto.messages import ErrorCode, RekeyBody
from gcks.proto.policy import Role
from gcks.proto.rekey import parse_rekey_header, seal_rekey
from gcks.proto.sa import CipherSuite, KeySA
from tests.cluster.clusterkit import Kit, admin_call, make_kit
from tests.cluster.processes import ProcessCluster, running_cluster

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------ helpers


def self_signed_node(directory: Path, node_id: str) -> tuple[Path, Path]:
    """A certificate that names a real node but is signed by nobody we trust."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"self-made {node_id}")])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    uri = x509.UniformResourceIdentifier(f"urn:gcks:node:{node_id}")
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([uri]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True)
    cert, key_path = directory / f"{node_id}.crt", directory / f"{node_id}.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key_path


def expired_node(kit: Kit, node_id: str) -> tuple[Path, Path]:
    """A node certificate from the real cluster CA that expired long ago."""
    ca_cert, ca_key = pki.ca_paths(kit.root / "pki", pki.CaKind.CLUSTER)
    ca = pki.CertificateAuthority.load(pki.CaKind.CLUSTER, ca_cert, ca_key)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    issued = pki.issue(ca, CertRole.NODE, node_id, kit.root / "expired", days=1, now=long_ago)
    return issued.cert_path, issued.key_path


async def refused(port: int, context: ssl.SSLContext) -> bool:
    """True if the node ends a TLS connection made with `context` at or right after
    the handshake (in TLS 1.3 the client finishes first; the server judges after)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname=None)
    try:
        with trio.fail_after(10):
            await stream.do_handshake()
            return await stream.receive_some(1) == b""
    except (trio.BrokenResourceError, ssl.SSLError):
        return True
    finally:
        await trio.aclose_forcefully(stream)


async def admin_retry(kit: Kit, op: str, args: dict[str, object]) -> object:
    """An admin change at whichever node can make it, bounded in time."""
    with trio.fail_after(30):
        while True:
            for node in kit.node_ids:
                try:
                    return await admin_call(kit, node, op, args)
                except (AdminError, OSError, trio.TooSlowError):
                    continue
            await trio.sleep(0.2)


@dataclass
class Held:
    """A member with its registration stream open and its keys kept current."""

    member_id: str
    session: Session
    keys: GroupKeys
    datagrams: list[bytes]

    async def follow(self) -> None:
        async for datagram in self.session.pushes():
            self.datagrams.append(datagram)
            # Bytes that are not ours to follow (e.g. after eviction) are dropped.
            with contextlib.suppress(ProtocolError):
                self.keys.handle_rekey(datagram, wall_clock_ms())


def member_context(kit: Kit, member_id: str) -> ssl.SSLContext:
    ca, crt, key = kit.member_files(member_id)
    return member_client_context(cluster_ca=ca, cert=crt, key=key)


async def join(kit: Kit, member_id: str, node: str, role: Role = Role.RECEIVER) -> Held:
    with trio.fail_after(30):
        while True:
            session = await Session.connect(
                "127.0.0.1",
                kit.ports[node]["member"],
                member_context(kit, member_id),
                expected_node=node,
                timeout_s=5,
            )
            try:
                gsa = await session.register(
                    "demo", role, last_msg_id=0, sender_key=None, timeout_s=10
                )
            except Refused as exc:
                await session.aclose()
                if exc.answer.code is not ErrorCode.NO_QUORUM:
                    raise
                await trio.sleep(0.2)
                continue
            return Held(member_id, session, GroupKeys(gsa, now_ms=wall_clock_ms()), [])


async def group_msg_id(kit: Kit) -> int:
    shown = await admin_retry(kit, "group.show", {"group": "demo"})
    assert isinstance(shown, dict)
    return int(shown["msg_id"])


async def until(predicate: object, timeout_s: float = 15) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.05)


async def close_all(*held: Held) -> None:
    for one in held:
        await one.session.aclose()


async def ready(cluster: ProcessCluster) -> None:
    await cluster.wait_group()
    await cluster.leader()


# -------------------------------------------------------------------- tests


async def test_peer_port_refuses_member_admin_self_signed_and_expired_certificates(
    tmp_path: Path,
) -> None:
    kit = make_kit(tmp_path)
    cluster_ca = kit.root / "pki/ca/cluster.crt"
    _, member_crt, member_key = kit.member_files("m1")
    admin_crt, admin_key = kit.root / "pki/admin/admin.crt", kit.root / "pki/admin/admin.key"
    self_crt, self_key = self_signed_node(tmp_path / "self", "n2")
    old_crt, old_key = expired_node(kit, "n2")
    offered = {
        "member": (member_crt, member_key),
        "admin": (admin_crt, admin_key),
        "self-signed": (self_crt, self_key),
        "expired": (old_crt, old_key),
    }
    async with running_cluster(kit) as cluster:
        await ready(cluster)
        for node in kit.node_ids:
            for what, (crt, key) in offered.items():
                context = peer_client_context(cluster_ca=cluster_ca, cert=crt, key=key)
                assert await refused(kit.ports[node]["peer"], context), f"{what} at {node}"
        leader = await cluster.leader()
        assert leader in kit.node_ids
        log = cluster.nodes["n1"].log_tail(400)
        assert "refused" in log or "handshake" in log


async def test_members_drop_replayed_modified_and_member_forged_rekeys(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    async with running_cluster(kit) as cluster:
        await ready(cluster)
        m1 = await join(kit, "m1", "n1")
        m2 = await join(kit, "m2", "n2")
        async with trio.open_nursery() as nursery:
            for one in (m1, m2):
                nursery.start_soon(one.follow)
            await admin_retry(kit, "rekey", {"group": "demo"})
            target = await group_msg_id(kit)
            await until(lambda: m1.keys.msg_id == target and m2.keys.msg_id == target)
            genuine = next(d for d in m1.datagrams if _msg_id(d) == target)
            # m2 holds the KEK; it tries to lead m1 astray in every way it can.
            before = (m1.keys.msg_id, m1.keys.kek.fingerprint, _teks(m1.keys))

            replay = m1.keys.handle_rekey(genuine, wall_clock_ms())
            assert replay.outcome is RekeyOutcome.DUPLICATE

            forged_tek = KeySA(0xBEEF, CipherSuite.AES_256_GCM, os.urandom(32), 0, 2**62)
            forged = seal_rekey(
                group="demo",
                kek=m2.keys.kek,
                msg_id=target + 1,
                body=RekeyBody(teks=(forged_tek,), reason="forged").encode(),
                signer=Ed25519PrivateKey.generate(),
            )
            with pytest.raises(ProtocolError):
                m1.keys.handle_rekey(forged, wall_clock_ms())
            assert (m1.keys.msg_id, m1.keys.kek.fingerprint, _teks(m1.keys)) == before

            await admin_retry(kit, "rekey", {"group": "demo"})
            await until(lambda: m2.keys.msg_id == target + 1)
            # m1 stops following: it is fed the next rekey by hand, modified first.
            next_genuine = next(d for d in m2.datagrams if _msg_id(d) == target + 1)
            for position in (len(next_genuine) // 2, len(next_genuine) - 70, len(next_genuine) - 1):
                modified = bytearray(next_genuine)
                modified[position] ^= 0x01
                try:
                    result = m1.keys.handle_rekey(bytes(modified), wall_clock_ms())
                except ProtocolError:
                    continue
                # A bit flip the header parser takes for an older id is a duplicate.
                assert result.outcome is not RekeyOutcome.ACCEPTED
            still = (m1.keys.msg_id, m1.keys.kek.fingerprint)
            assert still in {before[:2], (target + 1, m2.keys.kek.fingerprint)}
            if m1.keys.msg_id == target:
                accepted = m1.keys.handle_rekey(next_genuine, wall_clock_ms())
                assert accepted.outcome is RekeyOutcome.ACCEPTED
            assert m1.keys.kek.fingerprint == m2.keys.kek.fingerprint
            nursery.cancel_scope.cancel()
        await close_all(m1, m2)


def _msg_id(datagram: bytes) -> int:
    return parse_rekey_header(datagram).msg_id


def _teks(keys: GroupKeys) -> tuple[str, ...]:
    return tuple(t.fingerprint for t in keys.teks)


async def test_evicted_member_cannot_read_data_sent_after_its_eviction(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    async with running_cluster(kit) as cluster:
        await ready(cluster)
        sender = await join(kit, "m1", "n1", Role.SENDER)
        stays = await join(kit, "m2", "n2")
        evicted = await join(kit, "m3", "n3")
        async with trio.open_nursery() as nursery:
            for one in (sender, stays, evicted):
                nursery.start_soon(one.follow)
            await until(lambda: len({m.keys.msg_id for m in (sender, stays, evicted)}) == 1)
            before = sender.keys.protect(b"before eviction", wall_clock_ms())
            assert evicted.keys.unprotect(before, wall_clock_ms())[1] == b"before eviction"

            await admin_retry(kit, "member.evict", {"group": "demo", "member": "m3"})
            await admin_retry(kit, "rekey", {"group": "demo"})  # a new TEK under the new KEK
            target = await group_msg_id(kit)
            await until(lambda: sender.keys.msg_id == target and stays.keys.msg_id == target)

            after = sender.keys.protect(b"after eviction", wall_clock_ms())
            assert stays.keys.unprotect(after, wall_clock_ms())[1] == b"after eviction"
            assert evicted.keys.msg_id < target
            assert evicted.keys.kek.fingerprint != sender.keys.kek.fingerprint
            with pytest.raises(ProtocolError):
                evicted.keys.unprotect(after, wall_clock_ms())
            nursery.cancel_scope.cancel()
        await close_all(sender, stays, evicted)
        with pytest.raises(Refused) as refusal:
            await join(kit, "m3", "n2")
        assert refusal.value.answer.code is ErrorCode.UNAUTHORIZED


async def test_random_bytes_at_every_port_of_every_node_leave_all_nodes_serving(
    tmp_path: Path,
) -> None:
    kit = make_kit(tmp_path)
    async with running_cluster(kit) as cluster:
        await ready(cluster)
        before = await group_msg_id(kit)

        async def garbage(port: int, size: int) -> None:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return
            try:
                await stream.send_all(os.urandom(size))
                with trio.move_on_after(6):  # the node hangs up by its own deadline
                    while await stream.receive_some(4096):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(stream)

        async with trio.open_nursery() as nursery:
            for node in kit.node_ids:
                for kind in ("peer", "member", "admin", "ops"):
                    for size in (1, 64, 5000):
                        nursery.start_soon(garbage, kit.ports[node][kind], size)
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with udp:
            for node in kit.node_ids:
                for size in (0, 1, 40, 1200):
                    await udp.sendto(os.urandom(size), ("127.0.0.1", kit.ports[node]["probe"]))
                    await udp.sendto(os.urandom(size), ("239.77.0.1", kit.multicast_port))
        assert all(node.alive for node in cluster.nodes.values())
        await cluster.leader()
        assert await group_msg_id(kit) == before  # garbage changed nothing
        for node in kit.node_ids:
            held = await join(kit, f"m{kit.node_ids.index(node) + 1}", node)
            await held.session.aclose()
            status = await cluster.nodes[node].status()
            assert status is not None
            assert status["role"] in ("leader", "follower")
