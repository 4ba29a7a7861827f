"""UDP helpers of the member: the rekey/data multicast socket, `Sender`, `Receiver`.

Real sockets on loopback only (multicast with IP_MULTICAST_IF 127.0.0.1 and
TTL 0, so nothing leaves the host); packet protection is a stand-in callable,
the real one is covered by the member and proto tests.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

import pytest
import trio

from gcks.member.datagram import (
    DATA_PORT_OFFSET,
    DatagramError,
    Receiver,
    Sender,
    data_endpoint,
    open_multicast_socket,
    open_send_socket,
    open_unicast_socket,
)
from gcks.proto.errors import DecodeError, DecryptError
from gcks.proto.policy import GroupPolicy, MulticastEndpoint
from tests.cluster.clusterkit import free_ports

LOOPBACK = "127.0.0.1"
GROUP_ADDRESS = "239.77.0.42"


def fake_unprotect(packet: bytes) -> tuple[int, bytes]:
    """Stand-in for `Member.unprotect`: b"ok:<payload>" is sender 7's packet."""
    if packet.startswith(b"ok:"):
        return 7, packet[3:]
    if packet.startswith(b"tamper"):
        raise DecryptError("authentication tag mismatch")
    raise DecodeError("not a data packet")


def policy(port: int) -> GroupPolicy:
    return GroupPolicy(
        group_id="demo", multicast=MulticastEndpoint(ipaddress.IPv4Address(GROUP_ADDRESS), port)
    )


def test_data_travels_one_port_above_the_rekey_port() -> None:
    assert data_endpoint(policy(5000)) == (GROUP_ADDRESS, 5000 + DATA_PORT_OFFSET)


def test_a_rekey_port_at_the_top_of_the_range_leaves_no_data_port() -> None:
    with pytest.raises(DatagramError, match="no data port"):
        data_endpoint(policy(65_535))


async def test_bad_packets_are_counted_by_kind_and_dropped_and_receiving_goes_on() -> None:
    with Receiver(await open_unicast_socket(LOOPBACK, 0), fake_unprotect) as receiver:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            for packet in (b"", b"junk", b"tamper!", b"x" * 2000, b"ok:hello"):
                out.sendto(packet, receiver.address)
            with trio.fail_after(5):
                packet = await receiver.receive()
        assert (packet.sender_id, packet.payload) == (7, b"hello")
        assert packet.source[0] == LOOPBACK
        stats = receiver.stats
        assert (stats.received, stats.accepted, stats.bad) == (5, 1, 4)
        assert stats.rejected == {"DecodeError": 3, "DecryptError": 1}


async def test_sender_protects_every_payload_and_sends_it_to_its_destination() -> None:
    with Receiver(await open_unicast_socket(LOOPBACK, 0), fake_unprotect) as receiver:
        with Sender(
            open_send_socket(LOOPBACK, 0), lambda payload: b"ok:" + payload, receiver.address
        ) as sender:
            sizes = [await sender.send(b"one"), await sender.send(b"two")]
        assert sizes == [6, 6]
        assert sender.sent == 2
        with trio.fail_after(5):
            payloads = [(await receiver.receive()).payload for _ in range(2)]
        assert payloads == [b"one", b"two"]


@pytest.mark.skipif(sys.platform != "linux", reason="IP_MULTICAST_ALL is Linux-only")
async def test_multicast_socket_hears_its_joined_group_only() -> None:
    (port,) = free_ports(1)
    joined = await open_multicast_socket(GROUP_ADDRESS, port, LOOPBACK)
    # Another group on the same port, joined by a second socket of this host:
    # without IP_MULTICAST_ALL cleared, the first socket would hear it too.
    other = await open_multicast_socket("239.77.0.43", port, LOOPBACK)
    with joined, other, open_send_socket(LOOPBACK, 0) as out:
        await out.sendto(b"to the other group", ("239.77.0.43", port))
        await out.sendto(b"to our group", (GROUP_ADDRESS, port))
        with trio.fail_after(5):
            data, _ = await joined.recvfrom(100)
            heard_by_other, _ = await other.recvfrom(100)
        assert data == b"to our group"
        assert heard_by_other == b"to the other group"


async def test_two_members_on_one_host_both_hear_the_group() -> None:
    (port,) = free_ports(1)
    first = await open_multicast_socket(GROUP_ADDRESS, port, LOOPBACK)
    second = await open_multicast_socket(GROUP_ADDRESS, port, LOOPBACK)
    with first, second, open_send_socket(LOOPBACK, 0) as out:
        await out.sendto(b"rekey", (GROUP_ADDRESS, port))
        with trio.fail_after(5):
            assert (await first.recvfrom(100))[0] == b"rekey"
            assert (await second.recvfrom(100))[0] == b"rekey"


@pytest.mark.parametrize(
    ("group", "interface", "message"),
    [
        ("10.0.0.1", LOOPBACK, "not a multicast address"),
        ("ff02::1", LOOPBACK, r"needs an interface name \(rekey.multicast_interface6\)"),
        (GROUP_ADDRESS, "lo", "not an IPv4 address"),
        ("group.example", LOOPBACK, "not an IP address"),
    ],
)
async def test_multicast_socket_refuses_what_it_cannot_join(
    group: str, interface: str, message: str
) -> None:
    with pytest.raises(DatagramError, match=message):
        await open_multicast_socket(group, 5000, interface)


async def test_an_ipv6_group_is_joined_on_a_named_interface_that_exists() -> None:
    with pytest.raises(DatagramError, match="no network interface named 'nonesuch0'"):
        await open_multicast_socket("ff15::1", 5000, LOOPBACK, "nonesuch0")
    with pytest.raises(DatagramError, match="no network interface named"):
        open_send_socket(LOOPBACK, 0, ipv6_interface="nonesuch0")


def test_send_socket_refuses_a_ttl_out_of_range() -> None:
    with pytest.raises(DatagramError, match="TTL"):
        open_send_socket(LOOPBACK, 256)


async def test_unicast_socket_on_a_used_port_is_a_datagram_error() -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        await taken.bind((LOOPBACK, 0))
        with pytest.raises(DatagramError, match="cannot listen"):
            await open_unicast_socket(LOOPBACK, taken.getsockname()[1])
