"""Group policy: who may join a group, in which role, and how it is rekeyed.

A `GroupPolicy` is what an operator writes (TOML), what the cluster replicates
and what every member receives in its GSA and in policy-changing rekeys. One
mapping form (`to_mapping`/`from_mapping`, plain str/int/bool/list/dict) serves
TOML files, the admin API and the msgpack wire, so the three never drift apart.
`to_mapping` is deterministic (roles sorted, fixed key order) because nodes
must produce byte-identical rekey messages from the same policy.

Every `GroupPolicy` that exists is valid: construction checks types, ranges and
the rules between settings, and raises `PolicyError` naming the bad key
(`"authorize[2].roles"`). Unknown keys are errors, so a typo never silently
becomes a default.

May import: the standard library, `gcks.proto.errors`, `gcks.proto.schema`,
`gcks.proto.sa`. Must never read files or clocks: callers pass the TOML text.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from gcks.proto.errors import DecodeError, PolicyError
from gcks.proto.sa import CipherSuite
from gcks.proto.schema import (
    read_bool,
    read_enum,
    read_int,
    read_list,
    read_map,
    read_str,
)

__all__ = [
    "Authorization",
    "GroupPolicy",
    "MulticastEndpoint",
    "Role",
]

_T = TypeVar("_T")

GROUP_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Identity patterns match member ids (`urn:gcks:member:ID`, see
# `gcks.proto.identity`): the id alphabet plus fnmatch's `* ? [ ] !`.
IDENTITY_PATTERN: Final = re.compile(r"[A-Za-z0-9._\-*?\[\]!]{1,256}")
MAX_AUTHORIZATIONS: Final = 1024
MAX_TOML_CHARS: Final = 1024 * 1024
MAX_POLICY_KEYS: Final = 64

# (minimum, maximum) of every integer setting, inclusive.
_INT_LIMITS: Final[Mapping[str, tuple[int, int]]] = {
    "tek_lifetime_s": (60, 7 * 86_400),
    "kek_lifetime_s": (300, 30 * 86_400),
    "batch_interval_ms": (0, 600_000),
    "retransmit_count": (0, 10),
    "retransmit_interval_ms": (10, 60_000),
    "activation_delay_ms": (0, 3_600_000),
    "deactivation_delay_ms": (0, 3_600_000),
    "replay_window": (64, 4096),
}
_BOOL_KEYS: Final = ("rekey_on_join", "rekey_on_leave", "rekey_on_rejoin", "source_auth")


class Role(enum.StrEnum):
    """What a member may do in a group. A sender is allocated a sender id."""

    SENDER = "sender"
    RECEIVER = "receiver"


def _check(key: str, reader: Callable[..., _T], value: object, *args: object) -> _T:
    """Run a schema reader, reporting its failure as a `PolicyError` on `key`."""
    try:
        return reader(value, key, *args)
    except DecodeError as exc:
        message = str(exc).removeprefix(f"{key}: ")
        raise PolicyError(key, message) from None


@dataclass(frozen=True, slots=True)
class MulticastEndpoint:
    """The group's IP multicast destination for rekey messages (and data)."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise PolicyError("multicast_address", "expected an IPv4 or IPv6 address")
        if isinstance(self.address, ipaddress.IPv6Address) and self.address.scope_id:
            # A zone (%eth0) names an interface of one host, not of the group.
            raise PolicyError("multicast_address", "an IPv6 zone id is not allowed")
        if not self.address.is_multicast:
            raise PolicyError("multicast_address", "not a multicast address")
        if type(self.port) is not int or not 1 <= self.port <= 65_535:
            _check("multicast_port", read_int, self.port, 1, 65_535)

    @classmethod
    def parse(cls, address: object, port: object) -> MulticastEndpoint:
        text = _check("multicast_address", read_str, address, 64)
        try:
            parsed = ipaddress.ip_address(text)
        except ValueError:
            raise PolicyError("multicast_address", "not an IPv4 or IPv6 address") from None
        return cls(parsed, port)  # type: ignore[arg-type]  # the constructor checks it

    def __str__(self) -> str:
        if isinstance(self.address, ipaddress.IPv6Address):
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class Authorization:
    """Member ids matching `pattern` (fnmatch-style, case-sensitive: `"m*"`,
    `"cam-?.lab"`, `"[ab]*"`) may join with `roles`. Empty `roles` is an explicit
    deny for identities that a later, broader pattern would admit."""

    pattern: str
    roles: frozenset[Role]

    def matches(self, identity: str) -> bool:
        return fnmatch.fnmatchcase(identity, self.pattern)


def _read_authorization(value: object, index: int) -> Authorization:
    prefix = f"authorize[{index}]"
    entry = _check(prefix, read_map, value, 16)
    for key in entry:
        if key not in ("identity", "roles"):
            raise PolicyError(f"{prefix}.{key}", "unknown key")
    if "identity" not in entry:
        raise PolicyError(f"{prefix}.identity", "required")
    if "roles" not in entry:
        raise PolicyError(f"{prefix}.roles", "required")
    pattern = _check(f"{prefix}.identity", read_str, entry["identity"], 256)
    items = _check(f"{prefix}.roles", read_list, entry["roles"], len(Role))
    roles: set[Role] = set()
    for position, item in enumerate(items):
        role = _check(f"{prefix}.roles[{position}]", read_enum, item, Role)
        if role in roles:
            raise PolicyError(f"{prefix}.roles[{position}]", f"duplicate role {role.value!r}")
        roles.add(role)
    return Authorization(pattern, frozenset(roles))


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    """The replicated policy of one group (see the README's policy reference).

    Defaults are production settings: hourly TEKs, daily KEKs, backward and
    forward secrecy on every join and leave, coalesced over one second.
    """

    group_id: str
    multicast: MulticastEndpoint
    authorize: tuple[Authorization, ...] = ()
    tek_lifetime_s: int = 3600
    kek_lifetime_s: int = 86_400
    rekey_on_join: bool = True
    rekey_on_leave: bool = True
    rekey_on_rejoin: bool = False
    batch_interval_ms: int = 1000
    retransmit_count: int = 2
    retransmit_interval_ms: int = 1000
    cipher_suite: CipherSuite = CipherSuite.AES_256_GCM
    source_auth: bool = False
    activation_delay_ms: int = 3000
    deactivation_delay_ms: int = 10_000
    replay_window: int = 1024

    def __post_init__(self) -> None:
        if type(self.group_id) is not str or not GROUP_ID_PATTERN.fullmatch(self.group_id):
            _check("group_id", read_str, self.group_id, 64, GROUP_ID_PATTERN)
        if not isinstance(self.multicast, MulticastEndpoint):
            raise PolicyError("multicast_address", "expected a MulticastEndpoint")
        if not isinstance(self.authorize, tuple) or len(self.authorize) > MAX_AUTHORIZATIONS:
            raise PolicyError("authorize", f"expected a tuple of at most {MAX_AUTHORIZATIONS}")
        seen: set[str] = set()
        for index, entry in enumerate(self.authorize):
            if not isinstance(entry, Authorization):
                raise PolicyError(f"authorize[{index}]", "expected an Authorization")
            if type(entry.pattern) is not str or not IDENTITY_PATTERN.fullmatch(entry.pattern):
                _check(
                    f"authorize[{index}].identity", read_str, entry.pattern, 256, IDENTITY_PATTERN
                )
            if not isinstance(entry.roles, frozenset) or not all(
                isinstance(role, Role) for role in entry.roles
            ):
                raise PolicyError(f"authorize[{index}].roles", "expected a frozenset of Role")
            if entry.pattern in seen:
                # Under first-match-wins the second entry could never apply.
                raise PolicyError(f"authorize[{index}].identity", "duplicate pattern")
            seen.add(entry.pattern)
        # Every GSA a member decodes builds a policy: the common case is
        # checked inline, and only a failing value goes through its reader
        # (which raises the error that names it).
        for key, (lo, hi) in _INT_LIMITS.items():
            value = getattr(self, key)
            if type(value) is not int or not lo <= value <= hi:
                _check(key, read_int, value, lo, hi)
        for key in _BOOL_KEYS:
            value = getattr(self, key)
            if type(value) is not bool:
                _check(key, read_bool, value)
        if not isinstance(self.cipher_suite, CipherSuite):
            raise PolicyError("cipher_suite", "expected a CipherSuite")
        self._check_relations()

    def _check_relations(self) -> None:
        tek_ms = self.tek_lifetime_s * 1000
        if self.batch_interval_ms >= tek_ms:
            raise PolicyError("batch_interval_ms", "must be shorter than tek_lifetime_s")
        if self.batch_interval_ms >= self.kek_lifetime_s * 1000:
            raise PolicyError("batch_interval_ms", "must be shorter than kek_lifetime_s")
        if self.retransmit_count * self.retransmit_interval_ms >= tek_ms:
            raise PolicyError(
                "retransmit_interval_ms",
                "retransmissions (count x interval) must end within tek_lifetime_s",
            )
        if self.activation_delay_ms >= tek_ms:
            raise PolicyError("activation_delay_ms", "must be shorter than tek_lifetime_s")
        if self.deactivation_delay_ms >= tek_ms:
            raise PolicyError("deactivation_delay_ms", "must be shorter than tek_lifetime_s")

    def roles_for(self, identity: str) -> frozenset[Role]:
        """The roles `identity` may take: those of the FIRST matching pattern,
        in policy order (like firewall rules), or none when nothing matches.

        First match rather than union, so that an early `roles = []` entry can
        deny identities that a later wildcard admits."""
        for entry in self.authorize:
            if entry.matches(identity):
                return entry.roles
        return frozenset()

    def to_mapping(self) -> dict[str, object]:
        """Plain values in a fixed order; `from_mapping(to_mapping())` is identity."""
        return {
            "group_id": self.group_id,
            "multicast_address": str(self.multicast.address),
            "multicast_port": self.multicast.port,
            "authorize": [
                {"identity": entry.pattern, "roles": sorted(role.value for role in entry.roles)}
                for entry in self.authorize
            ],
            "tek_lifetime_s": self.tek_lifetime_s,
            "kek_lifetime_s": self.kek_lifetime_s,
            "rekey_on_join": self.rekey_on_join,
            "rekey_on_leave": self.rekey_on_leave,
            "rekey_on_rejoin": self.rekey_on_rejoin,
            "batch_interval_ms": self.batch_interval_ms,
            "retransmit_count": self.retransmit_count,
            "retransmit_interval_ms": self.retransmit_interval_ms,
            "cipher_suite": self.cipher_suite.value,
            "source_auth": self.source_auth,
            "activation_delay_ms": self.activation_delay_ms,
            "deactivation_delay_ms": self.deactivation_delay_ms,
            "replay_window": self.replay_window,
        }

    @classmethod
    def from_mapping(cls, mapping: object) -> GroupPolicy:
        """Validate a mapping (from TOML, JSON or msgpack); raises `PolicyError`."""
        try:
            values = read_map(mapping, "policy", MAX_POLICY_KEYS)
        except DecodeError as exc:
            raise PolicyError("<policy>", str(exc).removeprefix("policy: ")) from None
        for key in values:
            if key not in _KNOWN_KEYS:
                raise PolicyError(key, "unknown key")
        for key in ("group_id", "multicast_address", "multicast_port"):
            if key not in values:
                raise PolicyError(key, "required")
        group_id: Any = values["group_id"]  # checked by the constructor
        multicast = MulticastEndpoint.parse(values["multicast_address"], values["multicast_port"])
        authorize: tuple[Authorization, ...] = ()
        if "authorize" in values:
            items = _check("authorize", read_list, values["authorize"], MAX_AUTHORIZATIONS)
            authorize = tuple(_read_authorization(item, i) for i, item in enumerate(items))
        # Integers and booleans go in as they are: the constructor checks
        # every setting (once) and names the bad one.
        settings: dict[str, Any] = {
            key: values[key] for key in (*_INT_LIMITS, *_BOOL_KEYS) if key in values
        }
        if "cipher_suite" in values:
            settings["cipher_suite"] = _check(
                "cipher_suite", read_enum, values["cipher_suite"], CipherSuite
            )
        return cls(group_id, multicast, authorize, **settings)

    @classmethod
    def from_toml(cls, text: str) -> GroupPolicy:
        """Parse and validate a policy file's text; raises `PolicyError`.

        Syntax errors name the key `"<toml>"` and carry tomllib's line/column."""
        if not isinstance(text, str):
            raise PolicyError("<toml>", "expected text")
        if len(text) > MAX_TOML_CHARS:
            raise PolicyError("<toml>", f"longer than {MAX_TOML_CHARS} characters")
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError("<toml>", str(exc)) from None
        except RecursionError:
            raise PolicyError("<toml>", "nested too deeply") from None
        return cls.from_mapping(document)


_KNOWN_KEYS: Final = frozenset(
    {"group_id", "multicast_address", "multicast_port", "authorize", "cipher_suite"}
    | _INT_LIMITS.keys()
    | set(_BOOL_KEYS)
)
