"""`gcks dev init`: everything a local loopback cluster needs, in one directory.

Layout written by `dev_init(DIR, nodes=N, members=M)`::

    DIR/pki/...                   both CAs and every certificate (`gcks.cluster.pki`)
    DIR/secrets/nI.storagekey     each node's storage key (mode 0600, directory 0700)
    DIR/n1.toml ... DIR/nN.toml   node configurations (`gcks node --config DIR/n1.toml`)
    DIR/m1.toml ... DIR/mM.toml   member configurations (`gcks-member join --config ...`)
    DIR/admin.toml                the admin tool's configuration (`gcks admin --config ...`)
    DIR/data/nI/                  made by each node when it first starts

Ports (all on 127.0.0.1), for node I (1-based) and base port P: peer P+I,
member P+100+I, probe P+200+I, ops P+300+I, admin P+400+I; the group's
multicast port is P+500. Every node lists every node in `[peers]` and declares
the group (`[[groups]]`: members `m*` may send and receive, multicast on
239.255.77.1 over the loopback interface), so the first leader creates it and
members can join with no other step. Member `m1` is a sender, the others are
receivers. Raft timing is short (50 ms ticks, 500 ms election timeout): fine
on one host, too eager for a WAN.

Every path in the written files is relative to DIR, so the directory can be
moved or mounted elsewhere. An existing non-empty DIR is refused unless
`force`, which removes only what `dev_init` writes (pki/, secrets/, data/,
nI.toml, mI.toml, admin.toml) and leaves anything else alone. May import
`gcks.proto` and `gcks.cluster.{config,pki}`; never starts a node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gcks.cluster.config import MAX_PEERS, write_storage_key_file
from gcks.cluster.pki import CaKind, PkiLayout, ca_paths, cert_paths, pki_init
from gcks.proto.errors import PolicyError
from gcks.proto.identity import Role
from gcks.proto.policy import GroupPolicy

__all__ = [
    "ADMIN_ID",
    "DEFAULT_BASE_PORT",
    "DEFAULT_GROUP",
    "MULTICAST_ADDRESS",
    "DevInitError",
    "DevLayout",
    "NodePorts",
    "dev_init",
    "node_ports",
]

DEFAULT_BASE_PORT: Final = 7400
DEFAULT_GROUP: Final = "demo"
ADMIN_ID: Final = "admin"
MULTICAST_ADDRESS: Final = "239.255.77.1"  # organization-local scope (RFC 2365)
LOOPBACK: Final = "127.0.0.1"
MAX_MEMBERS: Final = 1000
MIN_BASE_PORT: Final = 1024
MAX_BASE_PORT: Final = 65_535 - 500
_OWNED_FILE_RE: Final = re.compile(r"(n[0-9]+|m[0-9]+|admin)\.toml")
_OWNED_DIRS: Final = ("pki", "secrets", "data")
# Short LAN timing: one host, so a 500 ms election timeout never fires spuriously.
_RAFT_TIMING: Final = {"tick_ms": 50, "election_ticks": 10, "heartbeat_ticks": 1}


class DevInitError(Exception):
    """The dev directory cannot be written as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class NodePorts:
    """The loopback ports of one dev node."""

    peer: int
    member: int
    probe: int
    ops: int
    admin: int


@dataclass(frozen=True)
class DevLayout:
    """What `dev_init` wrote."""

    directory: Path
    pki: PkiLayout
    node_configs: tuple[Path, ...]
    member_configs: tuple[Path, ...]
    admin_config: Path


def node_ports(base_port: int, index: int) -> NodePorts:
    """Ports of node number `index` (1-based)."""
    return NodePorts(
        peer=base_port + index,
        member=base_port + 100 + index,
        probe=base_port + 200 + index,
        ops=base_port + 300 + index,
        admin=base_port + 400 + index,
    )


def dev_init(
    directory: Path,
    *,
    nodes: int,
    members: int,
    base_port: int = DEFAULT_BASE_PORT,
    group: str = DEFAULT_GROUP,
    force: bool = False,
) -> DevLayout:
    """Write a loopback cluster of `nodes` nodes and `members` members into `directory`."""
    if not 1 <= nodes <= min(MAX_PEERS, 99):
        raise DevInitError(f"--nodes must be in 1..{min(MAX_PEERS, 99)}, got {nodes}")
    if not 0 <= members <= MAX_MEMBERS:
        raise DevInitError(f"--members must be in 0..{MAX_MEMBERS}, got {members}")
    if not MIN_BASE_PORT <= base_port <= MAX_BASE_PORT:
        raise DevInitError(
            f"--base-port must be in {MIN_BASE_PORT}..{MAX_BASE_PORT}, got {base_port}"
        )
    policy = _group_policy(group, base_port)
    _prepare(directory, force)
    node_ids = [f"n{i}" for i in range(1, nodes + 1)]
    member_ids = [f"m{i}" for i in range(1, members + 1)]
    layout = pki_init(directory / "pki", nodes=node_ids, members=member_ids, admins=[ADMIN_ID])
    secrets_dir = directory / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(secrets_dir, 0o700)  # the umask may have narrowed it; never widened
    node_configs: list[Path] = []
    for node_id in node_ids:
        write_storage_key_file(secrets_dir / f"{node_id}.storagekey")
        path = directory / f"{node_id}.toml"
        _write_text(path, _node_toml(node_id, node_ids, base_port, policy))
        node_configs.append(path)
    member_configs: list[Path] = []
    for index, member_id in enumerate(member_ids):
        path = directory / f"{member_id}.toml"
        role = "sender" if index == 0 else "receiver"
        _write_text(path, _member_toml(member_id, role, group, node_ids, base_port))
        member_configs.append(path)
    admin_config = directory / "admin.toml"
    _write_text(admin_config, _admin_toml(node_ids, base_port))
    return DevLayout(
        directory=directory,
        pki=layout,
        node_configs=tuple(node_configs),
        member_configs=tuple(member_configs),
        admin_config=admin_config,
    )


def _group_policy(group: str, base_port: int) -> GroupPolicy:
    try:
        return GroupPolicy.from_mapping(
            {
                "group_id": group,
                "multicast_address": MULTICAST_ADDRESS,
                "multicast_port": base_port + 500,
                "authorize": [{"identity": "m*", "roles": ["sender", "receiver"]}],
                # Snappier than the production defaults, for a loopback playground:
                # joins coalesce over 200 ms, a new TEK is used after 500 ms.
                "batch_interval_ms": 200,
                "activation_delay_ms": 500,
                "deactivation_delay_ms": 5000,
            }
        )
    except PolicyError as exc:
        raise DevInitError(f"--group: {exc}") from None


def _prepare(directory: Path, force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise DevInitError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()):
        if not force:
            raise DevInitError(f"{directory} is not empty; use --force to replace a dev cluster")
        for entry in directory.iterdir():
            owned = entry.name in _OWNED_DIRS or _OWNED_FILE_RE.fullmatch(entry.name)
            if not owned:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    directory.mkdir(parents=True, exist_ok=True)


def _write_text(path: Path, text: str) -> None:
    # The TOML files hold no secret (key files are referenced, not embedded).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def _q(value: str | Path) -> str:
    """A TOML basic string (JSON's escapes are a subset of TOML's)."""
    return json.dumps(str(value))


def _address(port: int) -> str:
    return _q(f"{LOOPBACK}:{port}")


def _path_value(path: Path) -> str:
    return _q(path.as_posix())


def _node_toml(node_id: str, node_ids: Sequence[str], base_port: int, policy: GroupPolicy) -> str:
    index = node_ids.index(node_id) + 1
    ports = node_ports(base_port, index)
    cert, key = cert_paths(Path("pki"), Role.NODE, node_id)
    lines = [
        f"# gcks node {node_id} of a loopback dev cluster (written by `gcks dev init`).",
        "# Paths are relative to this file's directory.",
        f"node_id = {_q(node_id)}",
        f"data_dir = {_path_value(Path('data') / node_id)}",
        f"peer_listen = {_address(ports.peer)}",
        f"member_listen = {_address(ports.member)}",
        f"probe_listen = {_address(ports.probe)}",
        f"ops_listen = {_address(ports.ops)}",
        f"admin_listen = {_address(ports.admin)}",
        f"storage_key_file = {_path_value(Path('secrets') / f'{node_id}.storagekey')}",
        'log_level = "info"',
        "",
        "[tls]",
        f"cluster_ca = {_path_value(ca_paths(Path('pki'), CaKind.CLUSTER)[0])}",
        f"member_ca = {_path_value(ca_paths(Path('pki'), CaKind.MEMBER)[0])}",
        f"cert = {_path_value(cert)}",
        f"key = {_path_value(key)}",
        "",
        "[raft]",
        *(f"{name} = {value}" for name, value in _RAFT_TIMING.items()),
        "",
        "[multicast]",
        f"interface = {_q(LOOPBACK)}",
        "ttl = 1",
    ]
    for peer_index, peer_id in enumerate(node_ids, start=1):
        peer_ports = node_ports(base_port, peer_index)
        lines += [
            "",
            f"[peers.{peer_id}]",
            f"peer = {_address(peer_ports.peer)}",
            f"member = {_address(peer_ports.member)}",
            f"probe = {_address(peer_ports.probe)}",
            f"ops = {_address(peer_ports.ops)}",
            f"admin = {_address(peer_ports.admin)}",
        ]
    lines += ["", "[[groups]]"]
    mapping = policy.to_mapping()
    for name, value in mapping.items():
        if name != "authorize":
            lines.append(f"{name} = {_toml_scalar(value)}")
    for authorization in policy.authorize:
        roles = ", ".join(_q(role.value) for role in sorted(authorization.roles))
        lines += [
            "",
            "[[groups.authorize]]",
            f"identity = {_q(authorization.pattern)}",
            f"roles = [{roles}]",
        ]
    return "\n".join(lines) + "\n"


def _toml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _q(value)
    raise DevInitError(f"cannot write {type(value).__name__} as a TOML scalar")


def _member_toml(
    member_id: str, role: str, group: str, node_ids: Sequence[str], base_port: int
) -> str:
    cert, key = cert_paths(Path("pki"), Role.MEMBER, member_id)
    lines = [
        f"# gcks member {member_id} of a loopback dev cluster (written by `gcks dev init`).",
        f"member_id = {_q(member_id)}",
        f"group = {_q(group)}",
        f"role = {_q(role)}",
        "",
        "[tls]",
        f"cluster_ca = {_path_value(ca_paths(Path('pki'), CaKind.CLUSTER)[0])}",
        f"cert = {_path_value(cert)}",
        f"key = {_path_value(key)}",
        "",
        "[rekey]",
        f"multicast_interface = {_q(LOOPBACK)}",
    ]
    for index, node_id in enumerate(node_ids, start=1):
        ports = node_ports(base_port, index)
        lines += [
            "",
            "[[nodes]]",
            f"id = {_q(node_id)}",
            f"member = {_address(ports.member)}",
            f"probe = {_address(ports.probe)}",
        ]
    return "\n".join(lines) + "\n"


def _admin_toml(node_ids: Sequence[str], base_port: int) -> str:
    cert, key = cert_paths(Path("pki"), Role.ADMIN, ADMIN_ID)
    lines = [
        "# gcks admin tool configuration (written by `gcks dev init`):",
        "#   gcks admin --config admin.toml cluster status",
        "timeout_ms = 5000",
        "",
        "[tls]",
        f"cluster_ca = {_path_value(ca_paths(Path('pki'), CaKind.CLUSTER)[0])}",
        f"cert = {_path_value(cert)}",
        f"key = {_path_value(key)}",
    ]
    for index, node_id in enumerate(node_ids, start=1):
        lines += [
            "",
            "[[nodes]]",
            f"id = {_q(node_id)}",
            f"admin = {_address(node_ports(base_port, index).admin)}",
        ]
    return "\n".join(lines) + "\n"
