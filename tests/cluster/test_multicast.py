"""The rekey sender: what it cannot multicast is counted and reported, not lost silently.

Sockets stay on loopback (interface 127.0.0.1, TTL 0); nothing here needs a
listener, since only the datagrams the sender refuses are looked at.
"""

from __future__ import annotations

import ipaddress
import logging

import pytest
import trio
import trio.testing

from gcks.cluster.multicast import MAX_UDP_PAYLOAD, RekeySender
from gcks.cluster.state import Outbound
from gcks.proto.policy import MulticastEndpoint


def _outbound(size: int, address: str = "239.255.0.1", msg_id: int = 1) -> Outbound:
    return Outbound(
        group="demo",
        msg_id=msg_id,
        datagram=bytes(size),
        multicast=MulticastEndpoint(ipaddress.ip_address(address), 5000),
        retransmit_count=0,
        retransmit_interval_ms=1000,
    )


async def _send_all(sender: RekeySender, *outbound: Outbound) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        for item in outbound:
            sender.submit(item)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_a_rekey_over_the_udp_limit_is_counted_and_reported_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender = RekeySender("127.0.0.1", 0)
    big = [_outbound(MAX_UDP_PAYLOAD + 1, msg_id=i) for i in (7, 8, 9)]
    with caplog.at_level(logging.WARNING, logger="gcks.cluster.multicast"):
        await _send_all(sender, *big)
    assert (sender.stats.too_large, sender.stats.sent) == (3, 0)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, "a storm of large rekeys is one line a minute"
    assert "message 7" in warnings[0]
    assert f"{MAX_UDP_PAYLOAD + 1} bytes" in warnings[0]


async def test_a_rekey_at_the_udp_limit_is_multicast() -> None:
    sender = RekeySender("127.0.0.1", 0)
    await _send_all(sender, _outbound(MAX_UDP_PAYLOAD))
    assert (sender.stats.sent, sender.stats.too_large, sender.stats.errors) == (1, 0, 0)


async def test_an_ipv6_group_is_counted_and_reported_as_not_multicast(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender = RekeySender("127.0.0.1", 0)
    with caplog.at_level(logging.WARNING, logger="gcks.cluster.multicast"):
        await _send_all(sender, _outbound(100, "ff05::1"), _outbound(100, "ff05::1", msg_id=2))
    assert (sender.stats.errors, sender.stats.sent) == (2, 0)
    assert len(caplog.records) == 1
    assert "IPv6 multicast is not supported" in caplog.records[0].getMessage()
