"""UDP sockets of a member: the multicast rekey socket, and protected data.

Rekeys arrive on the group's multicast endpoint (`GroupPolicy.multicast`);
`open_multicast_socket` joins it on a configured IPv4 interface (loopback in
tests and the local demo). Protected data travels on the same multicast
address one port up (`data_endpoint`: the policy's port + `DATA_PORT_OFFSET`),
or by unicast to a receiver's `data_listen` address where multicast does not
reach. `Sender` and `Receiver` are thin trio wrappers around one socket each:
the sender protects and sends, the receiver verifies and decrypts through a
callable (normally `Member.unprotect`), and counts and drops every packet that
fails, so garbage on the data port never stops a member.

Sockets bound for multicast set `SO_REUSEADDR` (several members on one host
share the port) and, on Linux, clear `IP_MULTICAST_ALL`: a socket then hears
only the groups it joined itself, not every group some other socket of the
host joined on that port.

May import trio, the standard library and `gcks.proto`; never `gcks.cluster`.
Never logs payloads or key material.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import trio

from gcks.proto.errors import ProtocolError
from gcks.proto.policy import GroupPolicy

__all__ = [
    "DATA_PORT_OFFSET",
    "DataPacket",
    "DatagramError",
    "Receiver",
    "ReceiverStats",
    "Sender",
    "data_endpoint",
    "open_multicast_socket",
    "open_send_socket",
    "open_unicast_socket",
]

log = logging.getLogger(__name__)

DATA_PORT_OFFSET: Final = 1
"""Protected data uses the group's multicast address on the rekey port + 1."""

MAX_DATAGRAM: Final = 65_535
# Linux <linux/in.h> and <linux/in6.h>; Python 3.11 exports neither.
_IP_MULTICAST_ALL: Final = 49
_IPV6_MULTICAST_ALL: Final = 29


class DatagramError(Exception):
    """A data or rekey socket could not be opened as asked; the message says why."""


def data_endpoint(policy: GroupPolicy) -> tuple[str, int]:
    """Where a group's protected data is multicast: its address, rekey port + 1."""
    port = policy.multicast.port + DATA_PORT_OFFSET
    if port > 65_535:
        raise DatagramError(
            f"group {policy.group_id}: multicast port {policy.multicast.port} leaves no data port"
        )
    return str(policy.multicast.address), port


def _ipv4(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise DatagramError(f"{what} {text!r} is not an IPv4 address") from None


def _interface_index(name: str) -> int:
    if not name:
        raise DatagramError("an IPv6 group needs an interface name (rekey.multicast_interface6)")
    try:
        return socket.if_nametoindex(name)
    except (OSError, ValueError):
        raise DatagramError(f"no network interface named {name!r}") from None


async def open_multicast_socket(
    group: str, port: int, interface: str, interface6: str = ""
) -> trio.socket.SocketType:
    """A UDP socket bound to `group:port` and joined to `group`: an IPv4 group
    on `interface` (an IPv4 interface address), an IPv6 group on the interface
    named `interface6`. The caller closes it."""
    try:
        address = ipaddress.ip_address(group)
    except ValueError:
        raise DatagramError(f"multicast address {group!r} is not an IP address") from None
    if not address.is_multicast:
        raise DatagramError(f"{group} is not a multicast address")
    bind: tuple[str, int] | tuple[str, int, int, int]
    if address.version == 4:
        family, level, join = socket.AF_INET, socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP
        membership = address.packed + _ipv4(interface, "multicast interface").packed
        multicast_all, via, bind = _IP_MULTICAST_ALL, interface, (str(address), port)
        where = f"{address}:{port}"
    else:
        index = _interface_index(interface6)
        family, level, join = socket.AF_INET6, socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP
        membership = address.packed + struct.pack("@I", index)
        # With the interface as scope: link-local groups (ff02::) need one to bind.
        multicast_all, via, bind = _IPV6_MULTICAST_ALL, interface6, (str(address), port, 0, index)
        where = f"[{address}]:{port}"
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sys.platform == "linux":
            sock.setsockopt(level, multicast_all, 0)
        # Bound to the group address, the socket receives that group's
        # datagrams only, not unicast sent to the same port.
        await sock.bind(bind)
        sock.setsockopt(level, join, membership)
    except OSError as exc:
        sock.close()
        raise DatagramError(f"cannot join {where} on {via}: {exc}") from None
    return sock


async def open_unicast_socket(host: str, port: int) -> trio.socket.SocketType:
    """A UDP socket bound to `host:port` (port 0: any free port). The caller closes it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        await sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DatagramError(f"cannot listen on {host}:{port}: {exc}") from None
    return sock


def open_send_socket(
    interface: str, ttl: int, *, ipv6_interface: str | None = None
) -> trio.socket.SocketType:
    """A UDP socket whose multicast leaves by `interface` with `ttl` (0 stays on
    this host) and loops back to local members. Unicast destinations work too.
    With `ipv6_interface` (an interface name; empty: the kernel's choice) it is
    an IPv6 socket, for IPv6 destinations, and `interface` is not used."""
    if not 0 <= ttl <= 255:
        raise DatagramError(f"multicast TTL {ttl} out of range 0..255")
    if ipv6_interface is not None:
        index = _interface_index(ipv6_interface) if ipv6_interface else 0
        family, level = socket.AF_INET6, socket.IPPROTO_IPV6
        options: list[tuple[int, int | bytes]] = [
            (socket.IPV6_MULTICAST_HOPS, ttl),
            (socket.IPV6_MULTICAST_IF, index),
            (socket.IPV6_MULTICAST_LOOP, 1),
        ]
        via = ipv6_interface or "the default IPv6 interface"
    else:
        local = _ipv4(interface, "multicast interface")
        family, level, via = socket.AF_INET, socket.IPPROTO_IP, interface
        options = [
            (socket.IP_MULTICAST_TTL, ttl),
            (socket.IP_MULTICAST_IF, local.packed),
            (socket.IP_MULTICAST_LOOP, 1),
        ]
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        for option, value in options:
            sock.setsockopt(level, option, value)
    except OSError as exc:
        sock.close()
        raise DatagramError(f"cannot send multicast by {via}: {exc}") from None
    return sock


@dataclass(frozen=True, slots=True)
class DataPacket:
    """One accepted packet: who sent it (group sender id), what, and from where."""

    sender_id: int
    payload: bytes = field(repr=False)
    source: tuple[str, int]


@dataclass(slots=True)
class ReceiverStats:
    """Counters of a receiver; `rejected` by error class name (`DecryptError`, ...)."""

    received: int = 0
    accepted: int = 0
    bad: int = 0
    receive_errors: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class Receiver:
    """Receives protected packets on one socket it owns.

    `unprotect(packet)` returns (sender id, payload) or raises `ProtocolError`;
    such packets are counted in `stats` and dropped, and receiving goes on."""

    def __init__(
        self, sock: trio.socket.SocketType, unprotect: Callable[[bytes], tuple[int, bytes]]
    ) -> None:
        self._sock = sock
        self._unprotect = unprotect
        self.stats = ReceiverStats()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    async def receive(self) -> DataPacket:
        """The next packet that verifies and decrypts."""
        while True:
            try:
                packet, source = await self._sock.recvfrom(MAX_DATAGRAM)
            except OSError as exc:
                # e.g. an ICMP error queued on the socket: the next read waits again.
                self.stats.receive_errors += 1
                log.debug("data socket receive error: %s", exc)
                continue
            self.stats.received += 1
            try:
                sender_id, payload = self._unprotect(packet)
            except ProtocolError as exc:
                self.stats.bad += 1
                kind = type(exc).__name__
                self.stats.rejected[kind] = self.stats.rejected.get(kind, 0) + 1
                log.debug("data packet from %s dropped: %s", _source(source), kind)
                continue
            self.stats.accepted += 1
            return DataPacket(sender_id, payload, (str(source[0]), int(source[1])))

    async def __aiter__(self) -> AsyncIterator[DataPacket]:
        while True:
            yield await self.receive()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Sender:
    """Protects payloads with `protect` and sends them to `destination` over a
    socket it owns (from `open_send_socket`)."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        protect: Callable[[bytes], bytes],
        destination: tuple[str, int],
    ) -> None:
        self._sock = sock
        self._protect = protect
        self.destination = destination
        self.sent = 0

    async def send(self, payload: bytes) -> int:
        """Protect and send one payload; the packet's size in bytes."""
        packet = self._protect(payload)
        send: Callable[[bytes, tuple[str, int]], Awaitable[int]] = self._sock.sendto
        try:
            await send(packet, self.destination)
        except OSError as exc:
            raise DatagramError(f"cannot send to {_source(self.destination)}: {exc}") from None
        self.sent += 1
        return len(packet)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _source(address: Any) -> str:
    try:
        return f"{address[0]}:{address[1]}"
    except (TypeError, IndexError):
        return "?"
