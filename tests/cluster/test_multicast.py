"""The rekey sender: what it cannot multicast is counted and reported, not lost
silently, and IPv6 groups reach members on the interface the config names.

Sockets stay on loopback (interface 127.0.0.1, TTL 0); the IPv6 test runs in
a private network namespace on a veth pair of its own (`tests.netns`), with
hop limit 0.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing

from gcks.cluster.multicast import MAX_UDP_PAYLOAD, RekeySender
from gcks.cluster.state import Outbound
from gcks.member.datagram import open_multicast_socket, open_send_socket
from gcks.member.session import Session
from gcks.member.tls import member_client_context
from gcks.proto.policy import MulticastEndpoint, Role
from tests import netns
from tests.cluster.clusterkit import make_kit
from tests.cluster.processes import running_cluster


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


async def test_an_ipv6_group_without_an_ipv6_interface_is_counted_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender = RekeySender("127.0.0.1", 0)
    with caplog.at_level(logging.WARNING, logger="gcks.cluster.multicast"):
        await _send_all(sender, _outbound(100, "ff05::1"), _outbound(100, "ff05::1", msg_id=2))
    assert (sender.stats.errors, sender.stats.sent) == (2, 0)
    assert len(caplog.records) == 1
    assert "no [multicast] interface6" in caplog.records[0].getMessage()


def _ipv6_group_in_a_namespace() -> None:
    """Run inside a private namespace: a node's sender multicasts a rekey to an
    IPv6 group, members hear it and the group's data on the named interface."""
    netns.veth_pair("gv0")

    async def one_group(group: str) -> dict[str, object]:
        rekeys = await open_multicast_socket(group, 5000, "127.0.0.1", "gv0")
        data = await open_multicast_socket(group, 5001, "127.0.0.1", "gv0")
        sender = RekeySender("127.0.0.1", 0, interface6="gv0")
        with rekeys, data, open_send_socket("127.0.0.1", 0, ipv6_interface="gv0") as out:
            async with trio.open_nursery() as nursery:
                await nursery.start(sender.run)
                sender.submit(_outbound(1200, group, msg_id=3))
                with trio.fail_after(10):
                    rekey, _ = await rekeys.recvfrom(65535)
                await out.sendto(b"protected data", (group, 5001))
                with trio.fail_after(10):
                    packet, _ = await data.recvfrom(65535)
                nursery.cancel_scope.cancel()
        return {"rekey_bytes": len(rekey), "sent": sender.stats.sent, "data": packet.decode()}

    async def main() -> dict[str, object]:
        # A site-local group, and a link-local one (ff02::, what TTL 1 reaches).
        return {group: await one_group(group) for group in ("ff15::7", "ff02::7")}

    print(json.dumps(trio.run(main)))


@pytest.mark.skipif(not netns.available(), reason="needs root for a private network namespace")
def test_an_ipv6_group_is_multicast_on_the_named_interface_and_members_hear_it() -> None:
    done = netns.run_in_netns(
        "from tests.cluster.test_multicast import _ipv6_group_in_a_namespace as run; run()"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    heard = {"rekey_bytes": 1200, "sent": 1, "data": "protected data"}
    assert json.loads(done.stdout.splitlines()[-1]) == {"ff15::7": heard, "ff02::7": heard}


def _ipv6_group_of_a_node_in_a_namespace() -> None:
    """Run inside a private namespace: a `gcks node` process whose group is IPv6
    multicasts the rekey of a member's join on the interface its config names."""
    netns.veth_pair("gv0")

    async def main() -> dict[str, object]:
        with tempfile.TemporaryDirectory() as tmp:
            kit = make_kit(
                Path(tmp),
                nodes=1,
                members=1,
                group={"multicast_address": "ff15::77"},
                multicast_interface6="gv0",
            )
            rekeys = await open_multicast_socket("ff15::77", kit.multicast_port, "", "gv0")
            async with running_cluster(kit) as cluster:
                await cluster.wait_group(timeout_s=30)
                ca, crt, key = kit.member_files("m1")
                context = member_client_context(cluster_ca=ca, cert=crt, key=key)
                port = kit.ports["n1"]["member"]
                session = await Session.connect(
                    "127.0.0.1", port, context, expected_node="n1", timeout_s=10
                )
                with rekeys, trio.fail_after(30):
                    gsa = await session.register(
                        "demo", Role.RECEIVER, last_msg_id=0, sender_key=None, timeout_s=10
                    )
                    await session.aclose()
                    datagram, _ = await rekeys.recvfrom(65535)
                _, metrics = await cluster.nodes["n1"].http("/metrics")
        counters = dict(
            line.split() for line in metrics.splitlines() if line.startswith("gcks_rekeys_se")
        )
        return {
            "multicast_is_v6": str(gsa.policy.multicast.address) == "ff15::77",
            "datagram": len(datagram) > 0,
            "sent": int(float(counters["gcks_rekeys_sent_total"])) >= 1,
            "send_errors": counters["gcks_rekeys_send_errors_total"],
        }

    print(json.dumps(trio.run(main)))


@pytest.mark.skipif(not netns.available(), reason="needs root for a private network namespace")
def test_a_node_multicasts_an_ipv6_groups_rekeys_on_the_interface_its_config_names() -> None:
    done = netns.run_in_netns(
        "from tests.cluster.test_multicast import _ipv6_group_of_a_node_in_a_namespace as run; "
        "run()",
        timeout_s=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "multicast_is_v6": True,
        "datagram": True,
        "sent": True,
        "send_errors": "0",
    }
