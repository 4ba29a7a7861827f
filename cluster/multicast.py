"""Sends REKEY datagrams: IP multicast to the group address, with retransmissions.

Every node applies the same command and gets the same sealed bytes; this
module sends them, unchanged, to the group's multicast endpoint now and again
`retransmit_count` times every `retransmit_interval_ms` (identical copies, as
RFC 9838 asks). Members drop the copies they already have by message id.
The interfaces and TTL come from the node configuration (loopback and TTL 0
in tests); IPv6 groups are sent on the interface named by `interface6`, and
without one get their rekeys by push only. A datagram too large for UDP is
not multicast: members then get it by unicast push, or notice the gap and
re-register.

May import trio and `gcks.cluster.state`. Sends only what apply produced.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import trio

from gcks.cluster.logthrottle import LogThrottle
from gcks.cluster.state import Outbound

log = logging.getLogger(__name__)

MAX_UDP_PAYLOAD = 65_507


@dataclass
class MulticastStats:
    sent: int = 0
    retransmitted: int = 0
    too_large: int = 0
    errors: int = 0
    dropped: int = 0


class RekeySender:
    """Owns the UDP sockets for multicast (IPv4, and IPv6 when `interface6`, an
    interface name, is given) and the retransmission schedule."""

    def __init__(
        self, interface: str, ttl: int, *, interface6: str = "", queue_size: int = 1024
    ) -> None:
        self._sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        self._sock.setsockopt(
            socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface)
        )
        # Members on the same host (the local demo, tests) must hear it too.
        self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        self._sock6: trio.socket.SocketType | None = None
        if interface6:
            # The interface's index is taken now: an interface deleted and made
            # again later counts send errors until the node restarts.
            try:
                self._sock6 = trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                self._sock6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl)
                self._sock6.setsockopt(
                    socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex(interface6)
                )
                self._sock6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
            except OSError as exc:
                self._sock.close()
                if self._sock6 is not None:
                    self._sock6.close()
                raise OSError(
                    exc.errno,
                    f"cannot multicast IPv6 groups on [multicast] interface6 {interface6!r}: "
                    f"{exc.strerror or exc}",
                ) from None
        self._send, self._queue = trio.open_memory_channel[Outbound](queue_size)
        self.stats = MulticastStats()
        self._warnings = LogThrottle()  # each kind repeats on every rekey

    def submit(self, outbound: Outbound) -> None:
        """Queue a datagram (never blocks; a full queue drops and counts)."""
        try:
            self._send.send_nowait(outbound)
        except trio.WouldBlock:
            self.stats.dropped += 1
            log.warning(
                "rekey send queue full: message %d of %s dropped", outbound.msg_id, outbound.group
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                async for outbound in self._queue:
                    await self._send_once(outbound)
                    if outbound.retransmit_count:
                        nursery.start_soon(self._retransmit, outbound)
        finally:
            self._sock.close()
            if self._sock6 is not None:
                self._sock6.close()

    async def _retransmit(self, outbound: Outbound) -> None:
        for _ in range(outbound.retransmit_count):
            await trio.sleep(outbound.retransmit_interval_ms / 1000)
            self.stats.retransmitted += 1
            await self._send_once(outbound)

    async def _send_once(self, outbound: Outbound) -> None:
        sock = self._sock if outbound.multicast.address.version == 4 else self._sock6
        if sock is None:
            self.stats.errors += 1
            if self._warnings.ready("ipv6"):
                log.warning(
                    "group %s: no [multicast] interface6 for IPv6 groups; rekeys go by push only",
                    outbound.group,
                )
            return
        if len(outbound.datagram) > MAX_UDP_PAYLOAD:
            self.stats.too_large += 1
            if self._warnings.ready("too_large"):
                log.warning(
                    "group %s: rekey message %d is %d bytes, over the %d of a UDP datagram; "
                    "it goes by push only (a smaller batch interval keeps rekeys smaller)",
                    outbound.group,
                    outbound.msg_id,
                    len(outbound.datagram),
                    MAX_UDP_PAYLOAD,
                )
            return
        try:
            await sock.sendto(
                outbound.datagram, (str(outbound.multicast.address), outbound.multicast.port)
            )
            self.stats.sent += 1
        except OSError as exc:
            self.stats.errors += 1
            log.warning(
                "multicast of %s message %d failed: %s", outbound.group, outbound.msg_id, exc
            )
