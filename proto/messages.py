"""Every message that crosses the cluster/member boundary, and the rekey body.

A message is a frozen, slotted dataclass. On the wire it is one msgpack array
`[PROTOCOL_VERSION, type code, field, ...]`, carried as a stream frame on the
member's TLS connection (`gcks.proto.codec.encode_frame`) or as one UDP
datagram (probes). Records inside messages (`KeySA`, `PathKey`, `WrappedKey`,
`NodeEndpoint`, `KekUpdate`) are positional arrays too; a group policy travels
as its mapping (`GroupPolicy.to_mapping`).

`decode_message` turns untrusted bytes into a valid message or raises
`DecodeError` (or its subclass `UnsupportedVersion`), naming the field
(`"GsaAnswer.teks[2].key"`): every type, size, range, uniqueness and
cross-field rule is checked. `encode()` runs the same checks on the local
values first and raises `ValueError` when they fail, so a node never sends
what every member would have to reject. Encoding is a pure function of the
fields: equal messages give equal bytes (nodes rely on it for byte-identical
rekeys).

`RekeyBody` is not a wire message on its own: it is the plaintext that
`gcks.proto.rekey` seals under the KEK. It shares the envelope, with its own
type code, so that a body can never be mistaken for another message, and it is
decoded only by `RekeyBody.decode` (never by `decode_message`).

Reprs never show key material: SA records hide their keys, and messages that
carry many keys summarise them as counts, SPIs and fingerprints.

May import: the standard library and `gcks.proto` (errors, schema, codec, sa,
policy). Must never do I/O, read clocks, or create keys.
"""

from __future__ import annotations

import abc
import enum
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Self, TypeAlias, TypeVar

from gcks.proto.codec import DEFAULT_MAX_FRAME, packb, unpackb
from gcks.proto.errors import DecodeError, PolicyError, UnsupportedVersion
from gcks.proto.policy import GROUP_ID_PATTERN, GroupPolicy, Role
from gcks.proto.sa import MAX_SPI, CipherSuite, KeySA, PathKey, WrappedKey, fingerprint
from gcks.proto.schema import (
    read_bool,
    read_bytes,
    read_enum,
    read_int,
    read_list,
    read_optional,
    read_record,
    read_str,
)

__all__ = [
    "MAX_DATAGRAM",
    "PROTOCOL_VERSION",
    "DeregisterAnswer",
    "DeregisterRequest",
    "ErrorAnswer",
    "ErrorCode",
    "GsaAnswer",
    "KekUpdate",
    "Message",
    "MessageType",
    "NodeEndpoint",
    "ProbeRequest",
    "ProbeResponse",
    "RegisterRequest",
    "RekeyBody",
    "RekeyPush",
    "decode_message",
    "parse_host_port",
]

PROTOCOL_VERSION: Final = 1

MAX_U32: Final = 0xFFFF_FFFF
MAX_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
MAX_TIME_MS: Final = 2**63 - 1
MAX_SENDER_ID: Final = MAX_U32  # the data packet header's sender id is a u32
KEY_SIZE: Final = 32
ED25519_KEY_SIZE: Final = 32
WRAPPED_KEY_SIZE: Final = 40  # RFC 5649 output for a 32-byte key: 8-byte AIV + 32
NONCE_SIZE: Final = 16
MAX_TEKS: Final = 64
MAX_PATH_KEYS: Final = 64  # tree depth; 2^20 members need 21
MAX_NODES: Final = 256
MAX_WRAPPED_KEYS: Final = 2**16
MAX_SENDERS: Final = 2**16
MAX_TEXT: Final = 256
MAX_ADDRESS: Final = 262  # "[" + 45-char IPv6 + "]:" or a 253-char DNS name, + ":65535"
MAX_DATAGRAM: Final = 65_507  # largest UDP payload over IPv4: the limit for probes
# A pushed rekey datagram must fit in one 16 MiB frame with its envelope.
MAX_REKEY_DATAGRAM: Final = DEFAULT_MAX_FRAME - 64

NODE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Free text from a peer ends up in logs: no control characters, no line breaks.
_TEXT_PATTERN: Final = re.compile(r"[^\x00-\x1f\x7f-\x9f]*")
_HOSTNAME_PATTERN: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_HOST_PORT_PATTERN: Final = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})"
)

# Suites by wire value, for the hot path of `read_key_sa`.
_SUITES: Final = {suite.value: suite for suite in CipherSuite}

_T = TypeVar("_T")


class MessageType(enum.IntEnum):
    """Second element of every envelope. Codes are never reused."""

    REGISTER_REQUEST = 1
    GSA_ANSWER = 2
    ERROR_ANSWER = 3
    DEREGISTER_REQUEST = 4
    DEREGISTER_ANSWER = 5
    REKEY_PUSH = 6
    PROBE_REQUEST = 7
    PROBE_RESPONSE = 8
    REKEY_BODY = 9


class ErrorCode(enum.IntEnum):
    """Why a node refused a request. Members retry elsewhere on the transient ones."""

    UNAUTHORIZED = 1  # the policy grants this identity no such role
    UNKNOWN_GROUP = 2
    NO_QUORUM = 3  # transient: the cluster cannot commit right now
    NOT_LEADER = 4  # transient: see leader_hint
    BAD_REQUEST = 5  # the request decoded but breaks a protocol rule
    INTERNAL = 6
    UNSUPPORTED_VERSION = 7
    GROUP_FULL = 8  # no LKH leaf or sender id left
    NOT_REGISTERED = 9  # deregistration of an identity that is not a member
    BUSY = 10  # transient: overloaded, retry later


# ---------------------------------------------------------------------------
# Field readers shared by several messages


def parse_host_port(text: object, name: str) -> tuple[str, int]:
    """`"host:port"`, `"1.2.3.4:port"` or `"[v6]:port"` -> (host, port); the host
    is a DNS name or an IP address (IPv6 without brackets in the result)."""
    return _split_host_port(read_str(text, name, MAX_ADDRESS, min_len=3), name)


def _split_host_port(value: str, name: str) -> tuple[str, int]:
    match = _HOST_PORT_PATTERN.fullmatch(value)
    if match is None:
        raise DecodeError(f"{name}: expected host:port or [ipv6]:port")
    port = int(match["port"])
    if not 1 <= port <= 65_535:
        raise DecodeError(f"{name}: port out of range [1, 65535]")
    if match["v6"] is not None:
        try:
            address = ipaddress.IPv6Address(match["v6"])
        except ValueError:
            raise DecodeError(f"{name}: invalid IPv6 address") from None
        return str(address), port
    host = match["host"]
    if _HOSTNAME_PATTERN.fullmatch(host) is None:
        raise DecodeError(f"{name}: invalid host name")
    return host, port


def _read_address(value: object, name: str) -> str:
    text = read_str(value, name, MAX_ADDRESS, min_len=3)
    _split_host_port(text, name)
    return text


def _read_group(value: object, name: str) -> str:
    return read_str(value, name, 64, GROUP_ID_PATTERN)


def _read_text(value: object, name: str) -> str:
    return read_str(value, name, MAX_TEXT, _TEXT_PATTERN)


def _read_time(value: object, name: str) -> int:
    return read_int(value, name, 0, MAX_TIME_MS)


def _read_spi(value: object, name: str) -> int:
    return read_int(value, name, 1, MAX_SPI)


def _read_items(
    value: object, name: str, max_items: int, reader: Callable[[object, str], _T]
) -> tuple[_T, ...]:
    items = read_list(value, name, max_items)
    try:
        # An item's indexed name is built only for its error: a GSA or a rekey
        # body holds dozens of items, and the names cost more than the checks.
        return tuple(reader(item, name) for item in items)
    except DecodeError:
        for index, item in enumerate(items):
            reader(item, f"{name}[{index}]")  # readers are pure: the bad item raises again
        raise


def _require_unique(values: Sequence[object], name: str, what: str) -> None:
    seen: set[object] = set()
    for index, value in enumerate(values):
        if value in seen:
            raise DecodeError(f"{name}[{index}]: duplicate {what}")
        seen.add(value)


def encode_key_sa(sa: KeySA) -> list[object]:
    return [sa.spi, sa.suite.value, sa.key, sa.activation_ms, sa.expiry_ms]


def read_key_sa(value: object, name: str) -> KeySA:
    # Hot path (every GSA, every rekey): the valid case is checked inline, and
    # anything else goes through the readers below, which name the bad field.
    if type(value) is list and len(value) == 5:
        spi, suite, key, activation, expiry = value
        if (
            type(spi) is int
            and 1 <= spi <= MAX_SPI
            and type(suite) is str
            and suite in _SUITES
            and type(key) is bytes
            and len(key) == KEY_SIZE
            and type(activation) is int
            and type(expiry) is int
            and 0 <= activation < expiry <= MAX_TIME_MS
        ):
            return KeySA(spi, _SUITES[suite], key, activation, expiry)
    spi, suite, key, activation, expiry = read_record(value, name, 5)
    sa = KeySA(
        spi=_read_spi(spi, f"{name}.spi"),
        suite=read_enum(suite, f"{name}.suite", CipherSuite),
        key=read_bytes(key, f"{name}.key", KEY_SIZE, KEY_SIZE),
        activation_ms=_read_time(activation, f"{name}.activation_ms"),
        expiry_ms=_read_time(expiry, f"{name}.expiry_ms"),
    )
    if sa.activation_ms >= sa.expiry_ms:
        raise DecodeError(f"{name}.expiry_ms: must be after activation_ms")
    return sa


def _read_key_sas(value: object, name: str) -> tuple[KeySA, ...]:
    sas = _read_items(value, name, MAX_TEKS, read_key_sa)
    _require_unique([sa.spi for sa in sas], name, "SPI")
    return sas


def _encode_path_key(key: PathKey) -> list[object]:
    return [key.node, key.version, key.key]


def _read_path_key(value: object, name: str) -> PathKey:
    if type(value) is list and len(value) == 3:  # hot path, as in `read_key_sa`
        node, version, key = value
        if (
            type(node) is int
            and 0 <= node <= MAX_U64
            and type(version) is int
            and 0 <= version <= MAX_U64
            and type(key) is bytes
            and len(key) == KEY_SIZE
        ):
            return PathKey(node, version, key)
    node, version, key = read_record(value, name, 3)
    return PathKey(
        node=read_int(node, f"{name}.node", 0, MAX_U64),
        version=read_int(version, f"{name}.version", 0, MAX_U64),
        key=read_bytes(key, f"{name}.key", KEY_SIZE, KEY_SIZE),
    )


def _encode_wrapped_key(key: WrappedKey) -> list[object]:
    return [key.node, key.version, key.under, key.under_version, key.wrapped]


def _read_wrapped_key(value: object, name: str) -> WrappedKey:
    if type(value) is list and len(value) == 5:  # hot path, as in `read_key_sa`
        node, version, under, under_version, wrapped = value
        if (
            type(node) is int
            and 0 <= node <= MAX_U64
            and type(version) is int
            and 0 <= version <= MAX_U64
            and type(under) is int
            and 0 <= under <= MAX_U64
            and type(under_version) is int
            and 0 <= under_version <= MAX_U64
            and type(wrapped) is bytes
            and len(wrapped) == WRAPPED_KEY_SIZE
        ):
            return WrappedKey(node, version, under, under_version, wrapped)
    node, version, under, under_version, wrapped = read_record(value, name, 5)
    return WrappedKey(
        node=read_int(node, f"{name}.node", 0, MAX_U64),
        version=read_int(version, f"{name}.version", 0, MAX_U64),
        under=read_int(under, f"{name}.under", 0, MAX_U64),
        under_version=read_int(under_version, f"{name}.under_version", 0, MAX_U64),
        wrapped=read_bytes(wrapped, f"{name}.wrapped", WRAPPED_KEY_SIZE, WRAPPED_KEY_SIZE),
    )


def _read_sender_key(value: object, name: str) -> tuple[int, bytes]:
    sender_id, public_key = read_record(value, name, 2)
    return (
        read_int(sender_id, f"{name}.sender_id", 0, MAX_SENDER_ID),
        read_bytes(public_key, f"{name}.public_key", ED25519_KEY_SIZE, ED25519_KEY_SIZE),
    )


def _read_sender_keys(value: object, name: str) -> tuple[tuple[int, bytes], ...]:
    pairs = _read_items(value, name, MAX_SENDERS, _read_sender_key)
    _require_unique([sender_id for sender_id, _ in pairs], name, "sender id")
    return pairs


def _read_policy(value: object, name: str) -> GroupPolicy:
    try:
        return GroupPolicy.from_mapping(value)
    except PolicyError as exc:
        raise DecodeError(f"{name}: invalid policy: {exc}") from None


def _summary(sas: Sequence[KeySA]) -> str:
    return "(" + ", ".join(f"spi={sa.spi}/{sa.fingerprint}" for sa in sas) + ")"


# ---------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class NodeEndpoint:
    """A cluster node as a member sees it: where to register and where to probe."""

    node_id: str
    member_addr: str  # "host:port" of the member TLS listener
    probe_addr: str  # "host:port" of the UDP probe responder

    @property
    def member_host_port(self) -> tuple[str, int]:
        """(host, port) to connect to; raises `DecodeError` if malformed."""
        return parse_host_port(self.member_addr, "member_addr")

    @property
    def probe_host_port(self) -> tuple[str, int]:
        """(host, port) to send probes to; raises `DecodeError` if malformed."""
        return parse_host_port(self.probe_addr, "probe_addr")

    def _encode(self) -> list[object]:
        return [self.node_id, self.member_addr, self.probe_addr]

    @classmethod
    def _read(cls, value: object, name: str) -> NodeEndpoint:
        node_id, member_addr, probe_addr = read_record(value, name, 3)
        return cls(
            node_id=read_str(node_id, f"{name}.node_id", 64, NODE_ID_PATTERN),
            member_addr=_read_address(member_addr, f"{name}.member_addr"),
            probe_addr=_read_address(probe_addr, f"{name}.probe_addr"),
        )


@dataclass(frozen=True, slots=True)
class KekUpdate:
    """A new KEK announced in a rekey: SPI, suite and lifetime only.

    The new KEK's key is the LKH root key at `root_version`, which members
    unwrap from the same rekey's wrapped keys. The key itself is never sent
    under the old KEK, so an evicted member that knows the old KEK learns
    nothing from this record."""

    spi: int
    suite: CipherSuite
    activation_ms: int
    expiry_ms: int
    root_version: int

    def _encode(self) -> list[object]:
        return [self.spi, self.suite.value, self.activation_ms, self.expiry_ms, self.root_version]

    @classmethod
    def _read(cls, value: object, name: str) -> KekUpdate:
        spi, suite, activation, expiry, root_version = read_record(value, name, 5)
        update = cls(
            spi=_read_spi(spi, f"{name}.spi"),
            suite=read_enum(suite, f"{name}.suite", CipherSuite),
            activation_ms=_read_time(activation, f"{name}.activation_ms"),
            expiry_ms=_read_time(expiry, f"{name}.expiry_ms"),
            root_version=read_int(root_version, f"{name}.root_version", 0, MAX_U64),
        )
        if update.activation_ms >= update.expiry_ms:
            raise DecodeError(f"{name}.expiry_ms: must be after activation_ms")
        return update


# ---------------------------------------------------------------------------
# Messages


class _Envelope(abc.ABC):
    """Shared encode/decode of `[version, type code, fields...]`.

    Subclasses set `TYPE` and `FIELDS` (the field count) and implement
    `_fields()` (plain values) and `_from_fields()` (validating reader)."""

    __slots__ = ()
    TYPE: ClassVar[MessageType]
    FIELDS: ClassVar[int]

    @abc.abstractmethod
    def _fields(self) -> list[object]:
        """The fields as plain msgpack-ready values, in wire order."""

    @classmethod
    @abc.abstractmethod
    def _from_fields(cls, fields: tuple[object, ...]) -> Self:
        """Validate `FIELDS` plain values (untrusted) and build the message."""

    def encode(self) -> bytes:
        """The msgpack envelope. Raises `ValueError` if a field is invalid."""
        fields = self._fields()
        try:
            self._check(fields)
        except DecodeError as exc:
            raise ValueError(f"refusing to encode an invalid message: {exc}") from None
        return packb([PROTOCOL_VERSION, int(self.TYPE), *fields])

    def _check(self, fields: list[object]) -> None:
        """Raise `DecodeError` if the receiver would refuse `fields`: by reading them back."""
        self._from_fields(tuple(fields))

    @classmethod
    def _decode_body(cls, body: tuple[object, ...]) -> Self:
        return cls._from_fields(read_record(body, cls.__name__, cls.FIELDS))


@dataclass(frozen=True, slots=True)
class RegisterRequest(_Envelope):
    """Member -> node: join `group` as `role`; `last_msg_id` is the last rekey
    message id the member accepted (0 if none), for resynchronisation.
    `sender_key` is the raw Ed25519 public key a sender signs its data packets
    with when the policy requires source authentication (None otherwise): the
    member makes the key pair itself, so no node ever holds its private half."""

    TYPE: ClassVar[MessageType] = MessageType.REGISTER_REQUEST
    FIELDS: ClassVar[int] = 5

    group: str
    role: Role
    last_msg_id: int
    request_id: int
    sender_key: bytes | None = None

    def _fields(self) -> list[object]:
        return [self.group, self.role.value, self.last_msg_id, self.request_id, self.sender_key]

    @classmethod
    def _from_fields(cls, fields: tuple[object, ...]) -> Self:
        group, role, last_msg_id, request_id, sender_key = fields
        return cls(
            group=_read_group(group, "RegisterRequest.group"),
            role=read_enum(role, "RegisterRequest.role", Role),
            last_msg_id=read_int(last_msg_id, "RegisterRequest.last_msg_id", 0, MAX_U64),
            request_id=read_int(request_id, "RegisterRequest.request_id", 0, MAX_U64),
            sender_key=read_optional(
                sender_key,
                "RegisterRequest.sender_key",
                read_bytes,
                ED25519_KEY_SIZE,
                ED25519_KEY_SIZE,
            ),
        )


@dataclass(frozen=True, slots=True)
class GsaAnswer(_Envelope):
    """Node -> member: the GSA, sent only after the member's Join committed.

    `leaf` is the member's LKH leaf, `path_keys` the keys from that leaf to the
    root, `msg_id` the group's current rekey message id, `sender_id` the
    member's data sender id (None for a receiver), `sender_verify_keys` the
    Ed25519 public keys of all senders (source authentication), `nodes` the
    cluster for failover."""

    TYPE: ClassVar[MessageType] = MessageType.GSA_ANSWER
    FIELDS: ClassVar[int] = 12

    request_id: int
    group: str
    policy: GroupPolicy
    kek: KeySA
    teks: tuple[KeySA, ...]
    path_keys: tuple[PathKey, ...]
    leaf: int
    rekey_verify_key: bytes
    msg_id: int
    sender_id: int | None
    sender_verify_keys: tuple[tuple[int, bytes], ...]
    nodes: tuple[NodeEndpoint, ...]

    def _fields(self) -> list[object]:
        return [
            self.request_id,
            self.group,
            self.policy.to_mapping(),
            encode_key_sa(self.kek),
            [encode_key_sa(sa) for sa in self.teks],
            [_encode_path_key(key) for key in self.path_keys],
            self.leaf,
            self.rekey_verify_key,
            self.msg_id,
            self.sender_id,
            [[sender_id, key] for sender_id, key in self.sender_verify_keys],
            [node._encode() for node in self.nodes],
        ]

    def _check(self, fields: list[object]) -> None:
        # The policy is a `GroupPolicy`, which its constructor checked setting by
        # setting, and `from_mapping(to_mapping())` is identity: reading it back
        # was 40 % of this check, paid on every registration. Untrusted bytes
        # never take this path.
        self._from_fields(tuple(fields), policy=self.policy)

    @classmethod
    def _from_fields(cls, fields: tuple[object, ...], *, policy: GroupPolicy | None = None) -> Self:
        (
            request_id,
            group,
            policy_value,
            kek,
            teks,
            path_keys,
            leaf,
            rekey_verify_key,
            msg_id,
            sender_id,
            sender_verify_keys,
            nodes,
        ) = fields
        name = "GsaAnswer"
        answer = cls(
            request_id=read_int(request_id, f"{name}.request_id", 0, MAX_U64),
            group=_read_group(group, f"{name}.group"),
            policy=_read_policy(policy_value, f"{name}.policy") if policy is None else policy,
            kek=read_key_sa(kek, f"{name}.kek"),
            teks=_read_key_sas(teks, f"{name}.teks"),
            path_keys=_read_items(path_keys, f"{name}.path_keys", MAX_PATH_KEYS, _read_path_key),
            leaf=read_int(leaf, f"{name}.leaf", 0, MAX_U64),
            rekey_verify_key=read_bytes(
                rekey_verify_key,
                f"{name}.rekey_verify_key",
                ED25519_KEY_SIZE,
                ED25519_KEY_SIZE,
            ),
            msg_id=read_int(msg_id, f"{name}.msg_id", 0, MAX_U64),
            sender_id=read_optional(sender_id, f"{name}.sender_id", read_int, 0, MAX_SENDER_ID),
            sender_verify_keys=_read_sender_keys(sender_verify_keys, f"{name}.sender_verify_keys"),
            nodes=_read_items(nodes, f"{name}.nodes", MAX_NODES, NodeEndpoint._read),
        )
        if answer.policy.group_id != answer.group:
            raise DecodeError(f"{name}.policy: group_id differs from {name}.group")
        _require_unique([key.node for key in answer.path_keys], f"{name}.path_keys", "node")
        _require_unique([node.node_id for node in answer.nodes], f"{name}.nodes", "node id")
        return answer

    def __repr__(self) -> str:
        return (
            f"GsaAnswer(request_id={self.request_id}, group={self.group!r}, "
            f"kek=spi={self.kek.spi}/{self.kek.fingerprint}, teks={_summary(self.teks)}, "
            f"path_keys={len(self.path_keys)}, leaf={self.leaf}, msg_id={self.msg_id}, "
            f"sender_id={self.sender_id}, "
            f"rekey_verify_key={fingerprint(self.rekey_verify_key)}, "
            f"sender_verify_keys={len(self.sender_verify_keys)}, "
            f"nodes={[node.node_id for node in self.nodes]})"
        )


@dataclass(frozen=True, slots=True)
class ErrorAnswer(_Envelope):
    """Node -> member: the request `request_id` failed. `message` is short,
    human-readable text for logs; `leader_hint` may name where to go instead."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR_ANSWER
    FIELDS: ClassVar[int] = 4

    request_id: int
    code: ErrorCode
    message: str
    leader_hint: str | None = None

    def _fields(self) -> list[object]:
        return [self.request_id, int(self.code), self.message, self.leader_hint]

    @classmethod
    def _from_fields(cls, fields: tuple[object, ...]) -> Self:
        request_id, code, message, leader_hint = fields
        return cls(
            request_id=read_int(request_id, "ErrorAnswer.request_id", 0, MAX_U64),
            code=read_enum(code, "ErrorAnswer.code", ErrorCode),
            message=_read_text(message, "ErrorAnswer.message"),
            leader_hint=read_optional(leader_hint, "ErrorAnswer.leader_hint", _read_text),
        )


@dataclass(frozen=True, slots=True)
class _GroupExchange(_Envelope):
    """A request id and a group: the shape deregistration uses both ways."""

    request_id: int
    group: str

    def _fields(self) -> list[object]:
        return [self.request_id, self.group]

    @classmethod
    def _from_fields(cls, fields: tuple[object, ...]) -> Self:
        request_id, group = fields
        name = cls.__name__
        return cls(
            request_id=read_int(request_id, f"{name}.request_id", 0, MAX_U64),
            group=_read_group(group, f"{name}.group"),
        )


@dataclass(frozen=True, slots=True)
class DeregisterRequest(_GroupExchange):
    """Member -> node: leave `group` (triggers a rekey as the policy says)."""

    TYPE: ClassVar[MessageType] = MessageType.DEREGISTER_REQUEST
    FIELDS: ClassVar[int] = 2


@dataclass(frozen=True, slots=True)
class DeregisterAnswer(_GroupExchange):
    """Node -> member: the Leave of `group` is committed."""

    TYPE: ClassVar[MessageType] = MessageType.DEREGISTER_ANSWER
    FIELDS: ClassVar[int] = 2


@dataclass(frozen=True, slots=True)
class RekeyPush(_Envelope):
    """Node -> member over TLS: the exact bytes of a sealed rekey datagram, for
    members that multicast does not reach. Opened like the multicast copy."""

    TYPE: ClassVar[MessageType] = MessageType.REKEY_PUSH
    FIELDS: ClassVar[int] = 1

    datagram: bytes

    def _fields(self) -> list[object]:
        return [self.datagram]

    @classmethod
    def _from_fields(cls, fields: tuple[object, ...]) -> Self:
        (datagram,) = fields
        return cls(
            datagram=read_bytes(datagram, "RekeyPush.datagram", MAX_REKEY_DATAGRAM, min_len=1)
        )

    def __repr__(self) -> str:
        return f"RekeyPush(datagram=<{len(self.datagram)} bytes>)"


@dataclass(frozen=True, slots=True)
class ProbeRequest(_Envelope):
    """Member -> node, one UDP datagram: measure the round trip; `nonce` is
    random and echoed, so a response matches exactly one request."""

    TYPE: ClassVar[MessageType] = MessageType.PROBE_REQUEST
    FIELDS: ClassVar[int] = 1

    nonce: bytes

    def _fields(self) -> list[object]:
        return [self.nonce]

    @classmethod
    def _from_fields(cls, fields: tuple[object, ...]) -> Self:
        (nonce,) = fields
        return cls(nonce=read_bytes(nonce, "ProbeRequest.nonce", NONCE_SIZE, NONCE_SIZE))


@dataclass(frozen=True, slots=True)
class ProbeResponse(_Envelope):
    """Node -> member, one UDP datagram: the request's nonce and who answered."""

    TYPE: ClassVar[MessageType] = MessageType.PROBE_RESPONSE
    FIELDS: ClassVar[int] = 2

    nonce: bytes
    node_id: str

    def _fields(self) -> list[object]:
        return [self.nonce, self.node_id]

    @classmethod
    def _from_fields(cls, fields: tuple[object, ...]) -> Self:
        nonce, node_id = fields
        return cls(
            nonce=read_bytes(nonce, "ProbeResponse.nonce", NONCE_SIZE, NONCE_SIZE),
            node_id=read_str(node_id, "ProbeResponse.node_id", 64, NODE_ID_PATTERN),
        )


@dataclass(frozen=True, slots=True)
class RekeyBody(_Envelope):
    """The plaintext of a rekey, sealed under the current KEK by `gcks.proto.rekey`.

    - `kek`: a new KEK (SPI, lifetime, LKH root version; no key, see `KekUpdate`);
    - `teks`: new TEKs; `deactivate`: (SPI, time ms) after which an old TEK is dropped;
    - `lkh`: the wrapped keys of the LKH update;
    - `policy`: a changed group policy;
    - `sender_keys_added` (sender id, Ed25519 public key) and
      `sender_keys_removed` (sender ids): changes to the source-authentication keys;
    - `terminate`: the group is ended (RFC 3740 §5.5): members drop its keys;
    - `reason`: short text for key events ("join", "evict m3", "tek-lifetime").
    """

    TYPE: ClassVar[MessageType] = MessageType.REKEY_BODY
    FIELDS: ClassVar[int] = 9

    kek: KekUpdate | None = None
    teks: tuple[KeySA, ...] = ()
    deactivate: tuple[tuple[int, int], ...] = ()
    lkh: tuple[WrappedKey, ...] = ()
    policy: GroupPolicy | None = None
    sender_keys_added: tuple[tuple[int, bytes], ...] = ()
    sender_keys_removed: tuple[int, ...] = ()
    terminate: bool = False
    reason: str = ""

    def _fields(self) -> list[object]:
        return [
            None if self.kek is None else self.kek._encode(),
            [encode_key_sa(sa) for sa in self.teks],
            [[spi, at_ms] for spi, at_ms in self.deactivate],
            [_encode_wrapped_key(key) for key in self.lkh],
            None if self.policy is None else self.policy.to_mapping(),
            [[sender_id, key] for sender_id, key in self.sender_keys_added],
            list(self.sender_keys_removed),
            self.terminate,
            self.reason,
        ]

    @classmethod
    def _from_fields(cls, fields: tuple[object, ...]) -> Self:
        kek, teks, deactivate, lkh, policy, added, removed, terminate, reason = fields
        name = "RekeyBody"
        removed_ids = _read_items(
            removed, f"{name}.sender_keys_removed", MAX_SENDERS, _read_sender_id
        )
        _require_unique(removed_ids, f"{name}.sender_keys_removed", "sender id")
        body = cls(
            kek=read_optional(kek, f"{name}.kek", KekUpdate._read),
            teks=_read_key_sas(teks, f"{name}.teks"),
            deactivate=_read_items(deactivate, f"{name}.deactivate", MAX_TEKS, _read_deactivation),
            lkh=_read_items(lkh, f"{name}.lkh", MAX_WRAPPED_KEYS, _read_wrapped_key),
            policy=read_optional(policy, f"{name}.policy", _read_policy),
            sender_keys_added=_read_sender_keys(added, f"{name}.sender_keys_added"),
            sender_keys_removed=removed_ids,
            terminate=read_bool(terminate, f"{name}.terminate"),
            reason=_read_text(reason, f"{name}.reason"),
        )
        _require_unique([spi for spi, _ in body.deactivate], f"{name}.deactivate", "SPI")
        return body

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = DEFAULT_MAX_FRAME) -> RekeyBody:
        """Decode an opened rekey plaintext; raises `DecodeError`/`UnsupportedVersion`."""
        message_type, body = _open_envelope(data, max_size)
        if message_type is not MessageType.REKEY_BODY:
            raise DecodeError(f"expected a rekey body, got {message_type.name}")
        return cls._decode_body(body)

    def __repr__(self) -> str:
        kek = "None" if self.kek is None else f"spi={self.kek.spi}"
        return (
            f"RekeyBody(kek={kek}, teks={_summary(self.teks)}, "
            f"deactivate={[spi for spi, _ in self.deactivate]}, lkh={len(self.lkh)}, "
            f"policy={'changed' if self.policy is not None else 'None'}, "
            f"sender_keys_added={[sender_id for sender_id, _ in self.sender_keys_added]}, "
            f"sender_keys_removed={list(self.sender_keys_removed)}, "
            f"terminate={self.terminate}, reason={self.reason!r})"
        )


def _read_sender_id(value: object, name: str) -> int:
    return read_int(value, name, 0, MAX_SENDER_ID)


def _read_deactivation(value: object, name: str) -> tuple[int, int]:
    spi, at_ms = read_record(value, name, 2)
    return _read_spi(spi, f"{name}.spi"), _read_time(at_ms, f"{name}.at_ms")


Message: TypeAlias = (
    RegisterRequest
    | GsaAnswer
    | ErrorAnswer
    | DeregisterRequest
    | DeregisterAnswer
    | RekeyPush
    | ProbeRequest
    | ProbeResponse
)

_MESSAGE_CLASSES: Final[dict[MessageType, type[Message]]] = {
    cls.TYPE: cls
    for cls in (
        RegisterRequest,
        GsaAnswer,
        ErrorAnswer,
        DeregisterRequest,
        DeregisterAnswer,
        RekeyPush,
        ProbeRequest,
        ProbeResponse,
    )
}

_FIELD_COUNTS: Final = (*(cls.FIELDS for cls in _MESSAGE_CLASSES.values()), RekeyBody.FIELDS)


def _open_envelope(data: bytes, max_size: int) -> tuple[MessageType, tuple[object, ...]]:
    value = unpackb(data, max_size=max_size)
    envelope = read_list(value, "envelope", 2 + max(_FIELD_COUNTS), min_items=2)
    version = read_int(envelope[0], "envelope.version", 0, MAX_U64)
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {version}, this implementation speaks {PROTOCOL_VERSION}"
        )
    message_type = read_enum(envelope[1], "envelope.type", MessageType)
    return message_type, envelope[2:]


def decode_message(data: bytes, *, max_size: int = DEFAULT_MAX_FRAME) -> Message:
    """Decode one message from a stream frame or a datagram (pass
    `max_size=MAX_DATAGRAM` for UDP). Raises `DecodeError` or `UnsupportedVersion`."""
    message_type, body = _open_envelope(data, max_size)
    cls = _MESSAGE_CLASSES.get(message_type)
    if cls is None:
        raise DecodeError(f"envelope.type: {message_type.name} is not a standalone message")
    return cls._decode_body(body)
