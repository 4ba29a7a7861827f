"""Test kit: configuration files for a loopback cluster of real nodes.

Writes certificates (cluster and member CAs), a storage key and one node TOML
per node with free loopback ports, so tests can start nodes in-process
(`Node(load_config(path))`) or as `gcks node --config PATH` processes.
"""

from __future__ import annotations

import json
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcks.cluster import pki
from gcks.cluster.admin import AdminClient
from gcks.cluster.config import write_storage_key_file
from gcks.cluster.tls import admin_client_context
from gcks.member.session import Session
from gcks.member.tls import member_client_context
from gcks.proto.identity import Role as CertRole
from gcks.proto.messages import GsaAnswer
from gcks.proto.policy import Role

GROUP = {
    "group_id": "demo",
    "multicast_address": "239.77.0.1",
    "multicast_port": 0,  # replaced by a free port
    "authorize": [{"identity": "m*", "roles": ["sender", "receiver"]}],
    "batch_interval_ms": 50,
    "activation_delay_ms": 0,
    "retransmit_count": 0,
}


# Ports this process handed out lately: a kit's ports stay unbound until its
# nodes start, and another draw meanwhile must not return them.
_HANDED_OUT: deque[int] = deque(maxlen=4096)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(n: int) -> list[int]:
    """Distinct loopback ports free for TCP and UDP now, none handed out lately
    by this process (a kit's, or a fault proxy's, not bound yet).

    They are bound only later, by the nodes. Drawn below the kernel's ephemeral
    range, so the local end of some connection made meanwhile (a peer link
    redialling, a proxy) cannot take one: the likely cause of a node's bind
    failing now and then with "Address already in use" when ports were drawn
    from port 0 (twice in session 4's full runs)."""
    low, high = _ephemeral_range()
    first, last = (10_000, low - 1) if low > 11_000 else (high + 1, 65_535)
    ports: list[int] = []
    while len(ports) < n:
        port = random.randint(first, last)
        if port in ports or port in _HANDED_OUT or not _bindable(port):
            continue
        ports.append(port)
    _HANDED_OUT.extend(ports)
    return ports


def _bindable(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@dataclass
class Kit:
    root: Path
    node_ids: list[str]
    member_ids: list[str]
    ports: dict[str, dict[str, int]]
    multicast_port: int

    def config(self, node_id: str) -> Path:
        return self.root / f"{node_id}.toml"

    def member_files(self, member_id: str) -> tuple[Path, Path, Path]:
        ca, _ = pki.ca_paths(self.root / "pki", pki.CaKind.CLUSTER)
        crt, key = pki.cert_paths(self.root / "pki", CertRole.MEMBER, member_id)
        return ca, crt, key


def make_kit(
    root: Path,
    nodes: int = 3,
    members: int = 4,
    *,
    tick_ms: int = 50,
    snapshot_entries: int = 10_000,
    group: dict[str, object] | None = None,
    peer_address: Callable[[str, str], str] | None = None,
    multicast_interface6: str = "",
) -> Kit:
    """`peer_address(from_node, to_node)`, if given, is the "HOST:PORT" that
    `from_node` dials to reach `to_node`'s peer port (a fault proxy per ordered
    pair in chaos tests); every other address stays the same on every node.
    `multicast_interface6` names the interface IPv6 groups are multicast on."""
    node_ids = [f"n{i}" for i in range(1, nodes + 1)]
    member_ids = [f"m{i}" for i in range(1, members + 1)]
    pki.pki_init(root / "pki", nodes=node_ids, members=member_ids, admins=["admin"])
    write_storage_key_file(root / "storage.key")
    numbers = free_ports(5 * nodes + 1)
    ports = {
        nid: dict(zip(("peer", "member", "probe", "ops", "admin"), numbers[5 * i : 5 * i + 5]))
        for i, nid in enumerate(node_ids)
    }
    multicast_port = numbers[-1]
    peers = {
        nid: {
            "peer": f"127.0.0.1:{p['peer']}",
            "member": f"127.0.0.1:{p['member']}",
            "probe": f"127.0.0.1:{p['probe']}",
            "ops": f"127.0.0.1:{p['ops']}",
            "admin": f"127.0.0.1:{p['admin']}",
        }
        for nid, p in ports.items()
    }
    for nid in node_ids:
        p = ports[nid]
        lines = [
            f'node_id = "{nid}"',
            f'data_dir = "{root / "data" / nid}"',
            f'peer_listen = "127.0.0.1:{p["peer"]}"',
            f'member_listen = "127.0.0.1:{p["member"]}"',
            f'probe_listen = "127.0.0.1:{p["probe"]}"',
            f'ops_listen = "127.0.0.1:{p["ops"]}"',
            f'admin_listen = "127.0.0.1:{p["admin"]}"',
            f'storage_key_file = "{root / "storage.key"}"',
            "[tls]",
            f'cluster_ca = "{root / "pki/ca/cluster.crt"}"',
            f'member_ca = "{root / "pki/ca/member.crt"}"',
            f'cert = "{root / "pki/node" / (nid + ".crt")}"',
            f'key = "{root / "pki/node" / (nid + ".key")}"',
            "[raft]",
            f"tick_ms = {tick_ms}",
            "election_ticks = 10",
            "heartbeat_ticks = 1",
            f"snapshot_entries = {snapshot_entries}",
            "[multicast]",
            'interface = "127.0.0.1"',
            "ttl = 0",
            *([f'interface6 = "{multicast_interface6}"'] if multicast_interface6 else []),
        ]
        for peer_id, entry in peers.items():
            lines.append(f"[peers.{peer_id}]")
            seen_from_here = dict(entry)
            if peer_address is not None and peer_id != nid:
                seen_from_here["peer"] = peer_address(nid, peer_id)
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in seen_from_here.items())
        lines.append("[[groups]]")
        group = {**GROUP, "multicast_port": multicast_port, **(group or {})}
        for k, v in group.items():
            if k != "authorize":
                lines.append(f"{k} = {json.dumps(v)}")
        for auth in group["authorize"]:  # type: ignore[attr-defined]
            lines.append("[[groups.authorize]]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in auth.items())
        (root / f"{nid}.toml").write_text("\n".join(lines) + "\n")
    return Kit(root, node_ids, member_ids, ports, multicast_port)


def admin_context(kit: Kit) -> ssl.SSLContext:
    return admin_client_context(
        cluster_ca=kit.root / "pki/ca/cluster.crt",
        cert=kit.root / "pki/admin/admin.crt",
        key=kit.root / "pki/admin/admin.key",
    )


async def admin_call(kit: Kit, node_id: str, op: str, args: dict[str, object] | None = None) -> Any:
    """One admin API request to one node (raises `AdminError` on a refusal)."""
    client = await AdminClient.connect(
        "127.0.0.1", kit.ports[node_id]["admin"], admin_context(kit), 5
    )
    try:
        return await client.call(op, args)
    finally:
        await client.aclose()


async def connect(kit: Kit, member_id: str, node_id: str) -> Session:
    """A registration connection of `member_id` to `node_id` (the caller closes it)."""
    ca, crt, key = kit.member_files(member_id)
    ctx = member_client_context(cluster_ca=ca, cert=crt, key=key)
    port = kit.ports[node_id]["member"]
    return await Session.connect("127.0.0.1", port, ctx, expected_node=node_id, timeout_s=5)


async def register(kit: Kit, member_id: str, node_id: str, role: Role = Role.RECEIVER) -> GsaAnswer:
    """Register `member_id` at `node_id` over a fresh TLS connection and close it."""
    session = await connect(kit, member_id, node_id)
    try:
        return await session.register("demo", role, last_msg_id=0, sender_key=None, timeout_s=15)
    finally:
        await session.aclose()
