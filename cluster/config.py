"""Node configuration: one TOML file, overridable by `GCKS_*` environment variables.

`load_config(path)` reads, validates and returns a `NodeConfig`, or raises one
`ConfigError(key, message)` naming the offending key, so that `gcks node`
stops (exit 2) before it binds anything. Validation is complete: types,
ranges, relations (election vs heartbeat ticks), unknown keys (a typo never
becomes a silent default), the TLS files (they load, and the certificate
carries `urn:gcks:node:<node_id>`), the storage key, and the bootstrap groups
(`gcks.proto.policy.GroupPolicy`). The README's configuration section documents
every key; `KEYS` below is the one list of them.

The `[peers]` table is the cluster's address book, the same on every node
(this node included), so a Kubernetes StatefulSet can mount one ConfigMap in
every pod and set only `GCKS_NODE_ID` from the pod name.

Relative paths in the file are relative to the file's directory; relative paths
from the environment are relative to the working directory. May import
`gcks.proto` and `gcks.cluster.tls`. The storage key never appears in a repr,
a log line or an error message.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from gcks.cluster import tls
from gcks.cluster.raft.storage import load_storage_key
from gcks.cluster.raft.storage_errors import StorageKeyError
from gcks.proto.errors import PolicyError
from gcks.proto.identity import Identity, Role, is_valid_id
from gcks.proto.policy import GroupPolicy
from gcks.proto.tomldoc import TomlDocError, decode_toml_bytes, parse_toml

ENV_PREFIX: Final = "GCKS_"
STORAGE_KEY_ENV: Final = "GCKS_STORAGE_KEY"
STORAGE_KEY_BYTES: Final = 32
MAX_CONFIG_BYTES: Final = 1024 * 1024
MAX_PEERS: Final = 64
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_T = TypeVar("_T")
_HOST_RE: Final = re.compile(r"[A-Za-z0-9.-]{1,253}")


class ConfigError(Exception):
    """The configuration is invalid. `key` names the setting (`raft.tick_ms`,
    `peers.n2.peer`, `groups[0].multicast_port`); `message` says what is wrong."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class Address:
    """A `HOST:PORT` (IPv6 hosts in brackets: `[::1]:7401`); HOST may be a DNS name."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse `HOST:PORT`; raises `ValueError` with a message for people."""
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT, got {text[:80]!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"invalid IPv6 address {host[:80]!r}") from None
        elif ":" in host:
            raise ValueError(f"an IPv6 host must be in brackets: [{host[:80]}]:PORT")
        elif not _HOST_RE.fullmatch(host):
            raise ValueError(f"invalid host {host[:80]!r}")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65_535:
            raise ValueError(f"port must be 1..65535, got {port_text[:16]!r}")
        return cls(host, int(port_text))


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """Where one cluster node is reached: by other nodes (`peer`), by members
    (`member` for registration, `probe` for latency probes), by tools (`ops`, `admin`)."""

    id: str
    peer: Address
    member: Address
    probe: Address
    ops: Address | None = None
    admin: Address | None = None


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """PEM files: both CA certificates, this node's certificate and its (unencrypted) key."""

    cluster_ca: Path
    member_ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class RaftTiming:
    """Raft clock: one tick every `tick_ms`; a follower that hears nothing for
    `election_ticks` (randomised up to twice that) starts an election; a leader
    sends heartbeats every `heartbeat_ticks`. LAN defaults: 1 s election timeout."""

    tick_ms: int = 100
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    snapshot_entries: int = 10_000  # applied entries between snapshots (log compaction)


@dataclass(frozen=True, slots=True)
class PeerLinkConfig:
    """Deadlines, reconnect backoff and memory bounds of the peer transport."""

    connect_timeout_ms: int = 3000
    handshake_timeout_ms: int = 3000
    write_timeout_ms: int = 5000
    backoff_min_ms: int = 100
    backoff_max_ms: int = 5000
    keepalive_ms: int = 1000
    idle_timeout_ms: int = 10_000
    send_queue_frames: int = 4096
    send_queue_bytes: int = 64 * 1024 * 1024
    receive_queue_frames: int = 256
    max_pending_handshakes: int = 64
    max_frame_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class MemberLinkConfig:
    """Bounds of the member listener: open connections (all, and of one member
    id), and the deadline of a TLS handshake."""

    max_connections: int = 100_000
    max_connections_per_member: int = 64
    handshake_timeout_ms: int = 5000


@dataclass(frozen=True, slots=True)
class MulticastConfig:
    """Outgoing multicast: the IPv4 address of the interface to send on (0.0.0.0:
    the routing table decides), the name of the interface IPv6 groups are sent
    on (IPv6 picks interfaces by index; empty: IPv6 groups get their rekeys by
    push only) and the TTL or hop limit (1: never leaves the local network)."""

    interface: str = "0.0.0.0"  # noqa: S104 - an interface selector, not a bind address
    interface6: str = ""
    ttl: int = 1


@dataclass(frozen=True)
class NodeConfig:
    """A validated node configuration (see the README for every key)."""

    node_id: str
    data_dir: Path
    peer_listen: Address
    member_listen: Address
    probe_listen: Address
    ops_listen: Address
    admin_listen: Address
    peers: Mapping[str, PeerEntry]
    tls: TlsConfig
    storage_key: bytes = field(repr=False)
    raft: RaftTiming = RaftTiming()
    peer_link: PeerLinkConfig = PeerLinkConfig()
    member_link: MemberLinkConfig = MemberLinkConfig()
    multicast: MulticastConfig = MulticastConfig()
    groups: tuple[GroupPolicy, ...] = ()
    log_level: str = "info"
    # True: a node added to a running cluster (scale-out, a learner, a wiped node
    # re-added): it starts with no configuration and waits for the leader, instead
    # of bootstrapping a cluster of every [peers] entry.
    join: bool = False

    @property
    def other_peers(self) -> dict[str, PeerEntry]:
        """The address book without this node: whom the peer transport dials."""
        return {i: entry for i, entry in self.peers.items() if i != self.node_id}

    @property
    def logging_level(self) -> int:
        return int(logging.getLevelName(self.log_level.upper()))


# Every scalar key, dotted. Sections are the part before the dot. The
# environment variable of a key is GCKS_ + the name with '.' as '_', upper-cased.
KEYS: Final = (
    "node_id",
    "data_dir",
    "peer_listen",
    "member_listen",
    "probe_listen",
    "ops_listen",
    "admin_listen",
    "storage_key_file",
    "log_level",
    "join",
    "tls.cluster_ca",
    "tls.member_ca",
    "tls.cert",
    "tls.key",
    "raft.tick_ms",
    "raft.election_ticks",
    "raft.heartbeat_ticks",
    "raft.snapshot_entries",
    "peer_link.connect_timeout_ms",
    "peer_link.handshake_timeout_ms",
    "peer_link.write_timeout_ms",
    "peer_link.backoff_min_ms",
    "peer_link.backoff_max_ms",
    "peer_link.keepalive_ms",
    "peer_link.idle_timeout_ms",
    "peer_link.send_queue_frames",
    "peer_link.send_queue_bytes",
    "peer_link.receive_queue_frames",
    "peer_link.max_pending_handshakes",
    "peer_link.max_frame_bytes",
    "member_link.max_connections",
    "member_link.max_connections_per_member",
    "member_link.handshake_timeout_ms",
    "multicast.interface",
    "multicast.interface6",
    "multicast.ttl",
)
_SECTIONS: Final = frozenset(key.partition(".")[0] for key in KEYS if "." in key)
# Inclusive ranges of the integer keys.
_INT_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "raft.tick_ms": (1, 60_000),
    "raft.election_ticks": (2, 10_000),
    "raft.heartbeat_ticks": (1, 1_000),
    "raft.snapshot_entries": (1, 100_000_000),
    "peer_link.connect_timeout_ms": (1, 600_000),
    "peer_link.handshake_timeout_ms": (1, 600_000),
    "peer_link.write_timeout_ms": (1, 600_000),
    "peer_link.backoff_min_ms": (1, 600_000),
    "peer_link.backoff_max_ms": (1, 3_600_000),
    "peer_link.keepalive_ms": (1, 600_000),
    "peer_link.idle_timeout_ms": (1, 3_600_000),
    "peer_link.send_queue_frames": (1, 1_000_000),
    "peer_link.send_queue_bytes": (1024, 1 << 40),
    "peer_link.receive_queue_frames": (1, 1_000_000),
    "peer_link.max_pending_handshakes": (1, 10_000),
    "peer_link.max_frame_bytes": (1024, 0xFFFF_FFFF),
    "member_link.max_connections": (1, 10_000_000),
    "member_link.max_connections_per_member": (1, 10_000_000),
    "member_link.handshake_timeout_ms": (1, 600_000),
    "multicast.ttl": (0, 255),
}
_PEER_KEYS: Final = ("peer", "member", "probe", "ops", "admin")
_PEER_REQUIRED: Final = ("peer", "member", "probe")


def env_name(key: str) -> str:
    """The variable that overrides dotted `key`: `raft.tick_ms` -> GCKS_RAFT_TICK_MS."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read and validate the node configuration at `path`, with `environ`
    (default: `os.environ`) overriding; raises `ConfigError` naming the bad key."""
    try:
        with path.open("rb") as config_file:
            text = decode_toml_bytes(
                config_file.read(MAX_CONFIG_BYTES + 1), name=str(path), max_bytes=MAX_CONFIG_BYTES
            )
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {path}: {exc.strerror or exc}") from None
    except TomlDocError as exc:
        raise ConfigError(exc.key, exc.message) from None
    return parse_config(
        text, base_dir=path.parent, environ=os.environ if environ is None else environ
    )


def parse_config(text: str, *, base_dir: Path, environ: Mapping[str, str]) -> NodeConfig:
    """Validate configuration `text` (relative paths resolved against `base_dir`)."""
    try:
        document = parse_toml(text)
    except TomlDocError as exc:
        raise ConfigError(exc.key, exc.message) from None
    return _Validator(document, base_dir, environ).config()


def write_storage_key_file(path: Path) -> None:
    """Create a new random storage key file (64 hex digits, mode 0600); never overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(secrets.token_hex(STORAGE_KEY_BYTES) + "\n")


_ENV_BOOLS: Final = {"true": True, "1": True, "false": False, "0": False}


class _Validator:
    """One pass over a parsed document; every failure is a `ConfigError` on one key."""

    def __init__(self, document: dict[str, object], base_dir: Path, environ: Mapping[str, str]):
        self._base_dir = base_dir
        self._environ = environ
        # dotted key -> (value, True if it came from the environment)
        self._values: dict[str, tuple[object, bool]] = {}
        self._peers: object = None
        self._groups: object = None
        self._flatten(document)
        for key in KEYS:
            if (value := environ.get(env_name(key))) is not None:
                self._values[key] = (value, True)

    def _flatten(self, document: dict[str, object]) -> None:
        for key, value in document.items():
            if key == "peers":
                self._peers = value
            elif key == "groups":
                self._groups = value
            elif key in _SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(key, "expected a table")
                for sub, sub_value in value.items():
                    dotted = f"{key}.{sub}"
                    if dotted not in KEYS:
                        raise ConfigError(dotted, "unknown key")
                    self._values[dotted] = (sub_value, False)
            elif key in KEYS and "." not in key:
                self._values[key] = (value, False)
            else:
                raise ConfigError(key, "unknown key")

    def config(self) -> NodeConfig:
        node_id = self._id("node_id")
        raft = RaftTiming(**self._ints("raft", RaftTiming()))
        if raft.election_ticks <= 2 * raft.heartbeat_ticks:
            raise ConfigError(
                "raft.election_ticks",
                f"must be more than twice raft.heartbeat_ticks ({raft.heartbeat_ticks}), "
                "so that one lost heartbeat does not start an election",
            )
        peer_link = PeerLinkConfig(**self._ints("peer_link", PeerLinkConfig()))
        if peer_link.backoff_max_ms < peer_link.backoff_min_ms:
            raise ConfigError("peer_link.backoff_max_ms", "must be at least backoff_min_ms")
        if peer_link.idle_timeout_ms <= 2 * peer_link.keepalive_ms:
            raise ConfigError(
                "peer_link.idle_timeout_ms",
                "must be more than twice keepalive_ms, so that one late keepalive is not fatal",
            )
        if peer_link.send_queue_bytes < peer_link.max_frame_bytes:
            raise ConfigError(
                "peer_link.send_queue_bytes", "must be at least max_frame_bytes (one frame)"
            )
        member_link = MemberLinkConfig(**self._ints("member_link", MemberLinkConfig()))
        multicast = MulticastConfig(
            interface=self._get("multicast.interface", MulticastConfig().interface, self._ipv4),
            interface6=self._get(
                "multicast.interface6", MulticastConfig().interface6, self._interface_name
            ),
            ttl=self._int("multicast.ttl", MulticastConfig().ttl),
        )
        tls_config = TlsConfig(
            cluster_ca=self._path("tls.cluster_ca"),
            member_ca=self._path("tls.member_ca"),
            cert=self._path("tls.cert"),
            key=self._path("tls.key"),
        )
        data_dir = self._path("data_dir")
        if data_dir.exists() and not data_dir.is_dir():
            raise ConfigError("data_dir", f"{data_dir} exists and is not a directory")
        config = NodeConfig(
            node_id=node_id,
            data_dir=data_dir,
            peer_listen=self._address("peer_listen"),
            member_listen=self._address("member_listen"),
            probe_listen=self._address("probe_listen"),
            ops_listen=self._address("ops_listen"),
            admin_listen=self._address("admin_listen"),
            peers=self._peer_table(node_id),
            tls=tls_config,
            storage_key=self._storage_key(),
            raft=raft,
            peer_link=peer_link,
            member_link=member_link,
            multicast=multicast,
            groups=self._group_list(),
            log_level=self._get("log_level", "info", self._log_level),
            join=self._bool("join", False),
        )
        _check_tls(config)
        return config

    # -- scalar readers -------------------------------------------------------

    def _get(self, key: str, default: _T, convert: Callable[[object, bool], _T]) -> _T:
        if key not in self._values:
            return default
        return self._need(key, convert)

    def _need(self, key: str, convert: Callable[[object, bool], _T]) -> _T:
        if key not in self._values:
            raise ConfigError(key, f"required (in the file or as {env_name(key)})")
        value, from_env = self._values[key]
        try:
            return convert(value, from_env)
        except (ValueError, TypeError) as exc:
            source = f" (from environment {env_name(key)})" if from_env else ""
            raise ConfigError(key, f"{exc}{source}") from None

    def _ints(self, section: str, defaults: object) -> dict[str, int]:
        """Every integer key of `section`, defaulting to the fields of `defaults`."""
        prefix = f"{section}."
        return {
            key.removeprefix(prefix): self._int(key, getattr(defaults, key.removeprefix(prefix)))
            for key in _INT_RANGES
            if key.startswith(prefix)
        }

    def _int(self, key: str, default: int) -> int:
        lo, hi = _INT_RANGES[key]

        def convert(value: object, from_env: bool) -> int:
            if from_env and isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,20}", value):
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"expected an integer, got {_describe(value)}")
            if not lo <= value <= hi:
                raise ValueError(f"must be in {lo}..{hi}, got {value}")
            return value

        return self._get(key, default, convert)

    def _bool(self, key: str, default: bool) -> bool:
        def convert(value: object, from_env: bool) -> bool:
            if from_env and isinstance(value, str) and value.lower() in _ENV_BOOLS:
                return _ENV_BOOLS[value.lower()]
            if not isinstance(value, bool):
                raise TypeError(f"expected true or false, got {_describe(value)}")
            return value

        return self._get(key, default, convert)

    def _string(self, key: str) -> str:
        return self._need(key, lambda value, _: _text(value))

    def _id(self, key: str) -> str:
        text = self._string(key)
        if not is_valid_id(text):
            raise ConfigError(key, f"invalid id {text[:80]!r}: 1..64 characters of [A-Za-z0-9._-]")
        return text

    def _path(self, key: str) -> Path:
        def convert(value: object, from_env: bool) -> Path:
            path = Path(_text(value))
            return path if from_env or path.is_absolute() else self._base_dir / path

        return self._need(key, convert)

    def _address(self, key: str) -> Address:
        return self._need(key, lambda value, _: Address.parse(_text(value)))

    @staticmethod
    def _ipv4(value: object, _from_env: bool) -> str:
        text = _text(value)
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise ValueError(f"expected an IPv4 interface address, got {text[:80]!r}") from None

    @staticmethod
    def _interface_name(value: object, _from_env: bool) -> str:
        if value == "":
            return ""  # off, as when unset (an environment override can switch it off)
        text = _text(value)
        try:
            socket.if_nametoindex(text)
        except (OSError, ValueError):
            raise ValueError(f"no network interface named {text[:80]!r} here") from None
        return text

    @staticmethod
    def _log_level(value: object, _from_env: bool) -> str:
        text = _text(value).lower()
        if text not in LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {text[:20]!r}")
        return text

    # -- structured values ----------------------------------------------------

    def _storage_key(self) -> bytes:
        # The environment variable, when set, wins over the file: a Secret
        # mounted as a variable needs no file on disk.
        env_value = self._environ.get(STORAGE_KEY_ENV)
        if env_value is not None:
            try:
                return load_storage_key(None, env_value)
            except StorageKeyError as exc:
                raise ConfigError(STORAGE_KEY_ENV, str(exc)) from None
        if "storage_key_file" not in self._values:
            raise ConfigError(
                "storage_key_file", f"required (or the key itself in {STORAGE_KEY_ENV})"
            )
        try:
            return load_storage_key(self._path("storage_key_file"), None)
        except StorageKeyError as exc:
            raise ConfigError("storage_key_file", str(exc)) from None

    def _peer_table(self, node_id: str) -> dict[str, PeerEntry]:
        if self._peers is None:
            raise ConfigError("peers", "required: a [peers.<id>] table for every node")
        if not isinstance(self._peers, dict) or not self._peers:
            raise ConfigError("peers", "expected tables [peers.<id>], at least this node's")
        if len(self._peers) > MAX_PEERS:
            raise ConfigError("peers", f"at most {MAX_PEERS} nodes")
        entries: dict[str, PeerEntry] = {}
        # Probes are UDP, every other listener TCP: one port number may serve both.
        seen: dict[tuple[bool, Address], str] = {}
        for peer_id, table in self._peers.items():
            prefix = f"peers.{peer_id}"
            if not is_valid_id(peer_id):
                raise ConfigError(prefix, "invalid node id: 1..64 characters of [A-Za-z0-9._-]")
            if not isinstance(table, dict):
                raise ConfigError(prefix, "expected a table")
            for key in table:
                if key not in _PEER_KEYS:
                    raise ConfigError(f"{prefix}.{key}", "unknown key")
            for key in _PEER_REQUIRED:
                if key not in table:
                    raise ConfigError(f"{prefix}.{key}", "required")
            addresses: dict[str, Address] = {}
            for key, value in table.items():
                try:
                    addresses[key] = Address.parse(_text(value))
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"{prefix}.{key}", str(exc)) from None
                where = (key == "probe", addresses[key])
                if (other := seen.get(where)) is not None:
                    raise ConfigError(f"{prefix}.{key}", f"same address as {other}")
                seen[where] = f"{prefix}.{key}"
            entries[peer_id] = PeerEntry(id=peer_id, **addresses)
        if node_id not in entries:
            raise ConfigError(
                "node_id", f"{node_id!r} has no [peers.{node_id}] entry in the address book"
            )
        return entries

    def _group_list(self) -> tuple[GroupPolicy, ...]:
        if self._groups is None:
            return ()
        if not isinstance(self._groups, list):
            raise ConfigError("groups", "expected [[groups]] tables")
        groups: list[GroupPolicy] = []
        for index, mapping in enumerate(self._groups):
            try:
                policy = GroupPolicy.from_mapping(mapping)
            except PolicyError as exc:
                message = str(exc).removeprefix(f"policy key {exc.key!r}: ")
                raise ConfigError(f"groups[{index}].{exc.key}", message) from None
            if any(g.group_id == policy.group_id for g in groups):
                raise ConfigError(f"groups[{index}].group_id", f"duplicate {policy.group_id!r}")
            groups.append(policy)
        return tuple(groups)


def _check_tls(config: NodeConfig) -> None:
    """Load the TLS files as the node will, and check that the certificate is this node's."""
    files = config.tls
    try:
        tls.peer_server_context(cluster_ca=files.cluster_ca, cert=files.cert, key=files.key)
        tls.member_server_context(member_ca=files.member_ca, cert=files.cert, key=files.key)
        identity = tls.certificate_identity(files.cert)
    except tls.TlsSetupError as exc:
        raise ConfigError(f"tls.{exc.what}", exc.message) from None
    expected = Identity(Role.NODE, config.node_id)
    if identity != expected:
        raise ConfigError(
            "tls.cert", f"{files.cert} is the certificate of {identity}, not of {expected}"
        )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_describe(value)}")
    if not value or len(value) > 4096:
        raise ValueError("expected a non-empty string of at most 4096 characters")
    return value


def _describe(value: object) -> str:
    return type(value).__name__ if not isinstance(value, str) else repr(value[:40])
