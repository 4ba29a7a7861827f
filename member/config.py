"""Member configuration: one TOML file, overridable by `GCKS_MEMBER_*` environment variables.

`load_member_config(path)` reads, validates and returns a `MemberConfig`, or
raises one `ConfigError(key, message)` naming the offending key
(`probe.timeout_ms`, `nodes[1].member`, `tls.cert`), so `gcks-member` stops
with a clear message before it opens a socket. Unknown keys are errors (a typo
never becomes a silent default). Every scalar key can be overridden by the
environment: `GCKS_MEMBER_` + the dotted key with `.` as `_`, upper-cased
(`probe.count` -> `GCKS_MEMBER_PROBE_COUNT`); the `[[nodes]]` list cannot.
The README's member configuration section documents every key; `KEYS` below
is the one list of the scalar keys.

The nodes are found either from a static `[[nodes]]` list (id, member address,
probe address) or from a `[discovery]` DNS name that resolves to one address
per node (a Kubernetes headless service); exactly one of the two is given.

Relative paths in the file are relative to the file's directory; relative
paths from the environment are relative to the working directory. TLS files
are checked to exist here; that they load and carry this member's identity is
checked by `gcks.member.tls` when the member starts. May import the standard
library and `gcks.proto` only; never opens sockets, never reads key contents.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from gcks.proto.errors import DecodeError
from gcks.proto.identity import is_valid_id
from gcks.proto.messages import MAX_NODES, NodeEndpoint, parse_host_port
from gcks.proto.policy import GROUP_ID_PATTERN, Role
from gcks.proto.tomldoc import TomlDocError, decode_toml_bytes, parse_toml

__all__ = [
    "ENV_PREFIX",
    "KEYS",
    "ConfigError",
    "DnsDiscovery",
    "MemberConfig",
    "MemberTls",
    "ProbeSettings",
    "RekeySettings",
    "env_name",
    "load_member_config",
    "parse_member_config",
]

ENV_PREFIX: Final = "GCKS_MEMBER_"
MAX_CONFIG_BYTES: Final = 256 * 1024
_T = TypeVar("_T")


class ConfigError(Exception):
    """The member configuration is invalid. `key` names the setting
    (`probe.count`, `nodes[0].probe`, `<file>`); `message` says what is wrong."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class MemberTls:
    """PEM files: the cluster CA (to verify nodes), this member's certificate and key."""

    cluster_ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class DnsDiscovery:
    """Nodes found by resolving `dns` (one address per node), re-resolved every `interval_s`."""

    dns: str
    member_port: int
    probe_port: int
    interval_s: float = 30.0
    timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    """Nearest-node probing: `count` probes per node and round (the median is
    taken), each lost after `timeout_ms`; a round every `interval_s`. The member
    switches only to a node faster by `switch_margin` (a fraction) and by at
    least `switch_min_ms`."""

    count: int = 5
    timeout_ms: int = 500
    interval_s: float = 30.0
    switch_margin: float = 0.2
    switch_min_ms: float = 2.0


@dataclass(frozen=True, slots=True)
class RekeySettings:
    """Rekey reception: the IPv4 interface address on which to join the group's
    multicast address (`0.0.0.0`: the kernel's choice; `127.0.0.1`: loopback
    demo), the registration deadline, how long before a TEK expires without a
    successor the member re-registers rather than wait, the name of the
    interface to join an IPv6 group on (empty: an IPv6 group's rekeys come by
    push only), and how long a rekey that arrived past a gap waits for the
    missing ones before the member re-registers."""

    multicast_interface: str = "127.0.0.1"
    register_timeout_ms: int = 5000
    resync_margin_ms: int = 10_000
    multicast_interface6: str = ""
    gap_wait_ms: int = 1000


@dataclass(frozen=True)
class MemberConfig:
    """A validated member configuration (see the README for every key)."""

    member_id: str
    group: str
    role: Role
    tls: MemberTls
    nodes: tuple[NodeEndpoint, ...] = ()
    discovery: DnsDiscovery | None = None
    probe: ProbeSettings = ProbeSettings()
    rekey: RekeySettings = RekeySettings()
    data_listen: tuple[str, int] | None = None


KEYS: Final = (
    "member_id",
    "group",
    "role",
    "data_listen",
    "tls.cluster_ca",
    "tls.cert",
    "tls.key",
    "discovery.dns",
    "discovery.member_port",
    "discovery.probe_port",
    "discovery.interval_s",
    "discovery.timeout_s",
    "probe.count",
    "probe.timeout_ms",
    "probe.interval_s",
    "probe.switch_margin",
    "probe.switch_min_ms",
    "rekey.multicast_interface",
    "rekey.multicast_interface6",
    "rekey.register_timeout_ms",
    "rekey.resync_margin_ms",
    "rekey.gap_wait_ms",
)
_SECTIONS: Final = frozenset(key.partition(".")[0] for key in KEYS if "." in key)
_INT_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "discovery.member_port": (1, 65_535),
    "discovery.probe_port": (1, 65_535),
    "probe.count": (1, 64),
    "probe.timeout_ms": (1, 60_000),
    "rekey.register_timeout_ms": (100, 600_000),
    "rekey.resync_margin_ms": (0, 3_600_000),
    "rekey.gap_wait_ms": (0, 600_000),
}
# Inclusive ranges of the decimal keys.
_FLOAT_RANGES: Final[Mapping[str, tuple[float, float]]] = {
    "discovery.interval_s": (1.0, 86_400.0),
    "discovery.timeout_s": (0.1, 600.0),
    "probe.interval_s": (1.0, 86_400.0),
    "probe.switch_margin": (0.0, 0.99),
    "probe.switch_min_ms": (0.0, 10_000.0),
}
_NODE_KEYS: Final = ("id", "member", "probe")
_PROBE_DEFAULTS: Final = ProbeSettings()
_REKEY_DEFAULTS: Final = RekeySettings()
_DNS_DEFAULTS: Final = DnsDiscovery("dns.invalid", 1, 1)
_INT_TEXT_RE: Final = re.compile(r"-?[0-9]{1,20}")
_FLOAT_TEXT_RE: Final = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?")


def env_name(key: str) -> str:
    """The variable that overrides dotted `key`: `probe.count` -> GCKS_MEMBER_PROBE_COUNT."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def load_member_config(path: Path, environ: Mapping[str, str] | None = None) -> MemberConfig:
    """Read and validate the member configuration at `path`, with `environ`
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
    return parse_member_config(
        text, base_dir=path.parent, environ=os.environ if environ is None else environ
    )


def parse_member_config(text: str, *, base_dir: Path, environ: Mapping[str, str]) -> MemberConfig:
    """Validate configuration `text` (relative paths resolved against `base_dir`)."""
    try:
        document = parse_toml(text)
    except TomlDocError as exc:
        raise ConfigError(exc.key, exc.message) from None
    return _Validator(document, base_dir, environ).config()


class _Validator:
    """One pass over a parsed document; every failure is a `ConfigError` on one key."""

    def __init__(
        self, document: dict[str, object], base_dir: Path, environ: Mapping[str, str]
    ) -> None:
        self._base_dir = base_dir
        # dotted key -> (value, True if it came from the environment)
        self._values: dict[str, tuple[object, bool]] = {}
        self._nodes: object = None
        for key, value in document.items():
            if key == "nodes":
                self._nodes = value
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
        for key in KEYS:
            if (value := environ.get(env_name(key))) is not None:
                self._values[key] = (value, True)

    def config(self) -> MemberConfig:
        member_id = self._need("member_id", _convert_id)
        group = self._need("group", _convert_group)
        role = self._need("role", _convert_role)
        tls = MemberTls(
            cluster_ca=self._file("tls.cluster_ca"),
            cert=self._file("tls.cert"),
            key=self._file("tls.key"),
        )
        nodes = self._node_list()
        discovery = self._discovery()
        if nodes and discovery is not None:
            raise ConfigError("discovery", "give either [[nodes]] or [discovery], not both")
        if not nodes and discovery is None:
            raise ConfigError("nodes", "required: a [[nodes]] list or a [discovery] table")
        probe = ProbeSettings(
            count=self._int("probe.count", _PROBE_DEFAULTS.count),
            timeout_ms=self._int("probe.timeout_ms", _PROBE_DEFAULTS.timeout_ms),
            interval_s=self._float("probe.interval_s", _PROBE_DEFAULTS.interval_s),
            switch_margin=self._float("probe.switch_margin", _PROBE_DEFAULTS.switch_margin),
            switch_min_ms=self._float("probe.switch_min_ms", _PROBE_DEFAULTS.switch_min_ms),
        )
        if probe.timeout_ms >= probe.interval_s * 1000:
            raise ConfigError("probe.timeout_ms", "must be shorter than probe.interval_s")
        rekey = RekeySettings(
            multicast_interface=self._get(
                "rekey.multicast_interface", _REKEY_DEFAULTS.multicast_interface, _convert_ipv4
            ),
            multicast_interface6=self._get(
                "rekey.multicast_interface6",
                _REKEY_DEFAULTS.multicast_interface6,
                _convert_interface_name,
            ),
            register_timeout_ms=self._int(
                "rekey.register_timeout_ms", _REKEY_DEFAULTS.register_timeout_ms
            ),
            resync_margin_ms=self._int("rekey.resync_margin_ms", _REKEY_DEFAULTS.resync_margin_ms),
            gap_wait_ms=self._int("rekey.gap_wait_ms", _REKEY_DEFAULTS.gap_wait_ms),
        )
        return MemberConfig(
            member_id=member_id,
            group=group,
            role=role,
            tls=tls,
            nodes=nodes,
            discovery=discovery,
            probe=probe,
            rekey=rekey,
            data_listen=self._get("data_listen", None, _convert_host_port),
        )

    # -- readers ----------------------------------------------------------------

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

    def _int(self, key: str, default: int) -> int:
        lo, hi = _INT_RANGES[key]

        def convert(value: object, from_env: bool) -> int:
            if from_env and isinstance(value, str) and _INT_TEXT_RE.fullmatch(value):
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"expected an integer, got {_describe(value)}")
            if not lo <= value <= hi:
                raise ValueError(f"must be in {lo}..{hi}, got {value}")
            return value

        return self._get(key, default, convert)

    def _float(self, key: str, default: float) -> float:
        lo, hi = _FLOAT_RANGES[key]

        def convert(value: object, from_env: bool) -> float:
            if from_env and isinstance(value, str) and _FLOAT_TEXT_RE.fullmatch(value):
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"expected a number, got {_describe(value)}")
            number = float(value)
            if not (math.isfinite(number) and lo <= number <= hi):
                raise ValueError(f"must be in {lo:g}..{hi:g}, got {number:g}")
            return number

        return self._get(key, default, convert)

    def _file(self, key: str) -> Path:
        def convert(value: object, from_env: bool) -> Path:
            path = Path(_text(value))
            if not (from_env or path.is_absolute()):
                path = self._base_dir / path
            if not path.is_file():
                raise ValueError(f"{path} is not a readable file")
            return path

        return self._need(key, convert)

    def _node_list(self) -> tuple[NodeEndpoint, ...]:
        if self._nodes is None:
            return ()
        if not isinstance(self._nodes, list) or not self._nodes:
            raise ConfigError("nodes", "expected one or more [[nodes]] tables")
        if len(self._nodes) > MAX_NODES:
            raise ConfigError("nodes", f"at most {MAX_NODES} nodes")
        endpoints: list[NodeEndpoint] = []
        seen: dict[tuple[bool, str], str] = {}
        for index, table in enumerate(self._nodes):
            prefix = f"nodes[{index}]"
            if not isinstance(table, dict):
                raise ConfigError(prefix, "expected a table")
            for key in table:
                if key not in _NODE_KEYS:
                    raise ConfigError(f"{prefix}.{key}", "unknown key")
            for key in _NODE_KEYS:
                if key not in table:
                    raise ConfigError(f"{prefix}.{key}", "required")
            values: dict[str, str] = {}
            for key, convert in (
                ("id", _convert_id),
                ("member", _convert_address),
                ("probe", _convert_address),
            ):
                try:
                    values[key] = convert(table[key], False)
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"{prefix}.{key}", str(exc)) from None
                if key == "id":
                    continue
                where = (key == "probe", values[key])  # UDP probes, TCP registration
                if (other := seen.get(where)) is not None:
                    raise ConfigError(f"{prefix}.{key}", f"same address as {other}")
                seen[where] = f"{prefix}.{key}"
            if any(endpoint.node_id == values["id"] for endpoint in endpoints):
                raise ConfigError(f"{prefix}.id", f"duplicate node id {values['id']!r}")
            endpoints.append(NodeEndpoint(values["id"], values["member"], values["probe"]))
        return tuple(endpoints)

    def _discovery(self) -> DnsDiscovery | None:
        if not any(key.startswith("discovery.") for key in self._values):
            return None
        dns = self._need("discovery.dns", _convert_dns)
        member_port = self._int("discovery.member_port", 0)
        probe_port = self._int("discovery.probe_port", 0)
        for key, port in (
            ("discovery.member_port", member_port),
            ("discovery.probe_port", probe_port),
        ):
            if port == 0:
                raise ConfigError(key, f"required with discovery.dns (or as {env_name(key)})")
        return DnsDiscovery(
            dns=dns,
            member_port=member_port,
            probe_port=probe_port,
            interval_s=self._float("discovery.interval_s", _DNS_DEFAULTS.interval_s),
            timeout_s=self._float("discovery.timeout_s", _DNS_DEFAULTS.timeout_s),
        )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_describe(value)}")
    if not value or len(value) > 4096:
        raise ValueError("expected a non-empty string of at most 4096 characters")
    return value


def _describe(value: object) -> str:
    return repr(value[:40]) if isinstance(value, str) else type(value).__name__


def _convert_id(value: object, _from_env: bool) -> str:
    text = _text(value)
    if not is_valid_id(text):
        raise ValueError(f"invalid id {text[:80]!r}: 1..64 characters of [A-Za-z0-9._-]")
    return text


def _convert_group(value: object, _from_env: bool) -> str:
    text = _text(value)
    if not GROUP_ID_PATTERN.fullmatch(text):
        raise ValueError(f"invalid group id {text[:80]!r}: 1..64 characters of [A-Za-z0-9._-]")
    return text


def _convert_role(value: object, _from_env: bool) -> Role:
    text = _text(value)
    try:
        return Role(text)
    except ValueError:
        choices = " or ".join(repr(role.value) for role in Role)
        raise ValueError(f"expected {choices}, got {text[:20]!r}") from None


def _convert_address(value: object, _from_env: bool) -> str:
    text = _text(value)
    try:
        parse_host_port(text, "address")
    except DecodeError as exc:
        raise ValueError(str(exc).removeprefix("address: ")) from None
    return text


def _convert_host_port(value: object, _from_env: bool) -> tuple[str, int]:
    text = _text(value)
    try:
        return parse_host_port(text, "address")
    except DecodeError as exc:
        raise ValueError(str(exc).removeprefix("address: ")) from None


def _convert_dns(value: object, _from_env: bool) -> str:
    text = _text(value)
    try:
        host, _ = parse_host_port(f"{text}:1", "dns")
    except DecodeError:
        raise ValueError(f"invalid DNS name {text[:80]!r}") from None
    return host


def _convert_interface_name(value: object, _from_env: bool) -> str:
    if value == "":
        return ""  # off, as when unset (an environment override can switch it off)
    text = _text(value)
    try:
        socket.if_nametoindex(text)
    except (OSError, ValueError):
        raise ValueError(f"no network interface named {text[:80]!r} here") from None
    return text


def _convert_ipv4(value: object, _from_env: bool) -> str:
    text = _text(value)
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"expected an IPv4 interface address, got {text[:80]!r}") from None
