"""A member's wait for rekeys that are late, not lost (`rekey.gap_wait_ms`).

The multicast and push paths race, so message N+1 may arrive before N. These
tests feed real rekey datagrams (from the replicated state machine of
`tests.cluster.test_state`) to a `Member` whose keys are set directly, on
trio's MockClock: no cluster, no sockets. A resync shows as the request the
member posts to its supervisor (which would re-register).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from gcks.member.config import MemberConfig, MemberTls, RekeySettings
from gcks.member.member import _AHEAD_DATAGRAMS, Member, _Kind, _Request
from gcks.proto.messages import NodeEndpoint
from gcks.proto.policy import Role
from tests.cluster.test_state import Cluster

WAIT_S = 1.0


@pytest.fixture
def cluster() -> Cluster:
    cluster = Cluster()
    cluster.join("a")  # a steady member: the keys to end up with
    return cluster


@pytest.fixture
async def member(cluster: Cluster) -> AsyncIterator[Member]:
    config = MemberConfig(
        "b",
        "demo",
        Role.RECEIVER,
        MemberTls(Path("unused"), Path("unused"), Path("unused")),
        nodes=(NodeEndpoint("n1", "127.0.0.1:7401", "127.0.0.1:7501"),),  # never reached
        rekey=RekeySettings(gap_wait_ms=int(WAIT_S * 1000)),
    )
    m = Member(
        config,
        multicast=False,
        ssl_context=ssl.create_default_context(),
        clock_ms=lambda: cluster.now,
    )
    m._keys = cluster.join("b")
    async with trio.open_nursery() as tasks:
        m._tasks = tasks
        yield m
        tasks.cancel_scope.cancel()


def rekeys(cluster: Cluster, count: int) -> list[bytes]:
    """`count` consecutive rekey datagrams; every other one changes the KEK."""
    out = []
    for i in range(count):
        (item,) = cluster.rekey(refresh_kek=i % 2 == 0)
        out.append(item.datagram)
    return out


async def resync_asked(m: Member) -> _Request | None:
    await trio.testing.wait_all_tasks_blocked()
    try:
        request = m._requests.receive_nowait()
    except trio.WouldBlock:
        return None
    assert request.kind is _Kind.RESYNC
    return request


async def test_a_late_rekey_fills_the_gap_and_the_held_one_follows_without_a_resync(
    cluster: Cluster, member: Member, autojump_clock: trio.testing.MockClock
) -> None:
    start = member.gsa.msg_id
    first, second, third = rekeys(cluster, 3)
    member.receive_rekey(third, "multicast")
    member.receive_rekey(second, "multicast")
    assert member.gsa.msg_id == start, "nothing applied past the gap"
    await trio.sleep(WAIT_S / 2)
    member.receive_rekey(first, "n1")  # by push, half the wait later
    assert member.gsa.msg_id == start + 3, "applied in order"
    steady = cluster.members["a"]
    for datagram in (first, second, third):
        steady.handle_rekey(datagram, cluster.now)
    assert member.gsa.kek.key == steady.kek.key
    await trio.sleep(2 * WAIT_S)
    assert await resync_asked(member) is None
    assert member.stats.rekeys == 3
    assert not member._ahead
    assert not member._gap_timer, "its wait ended"


async def test_a_gap_not_filled_in_time_asks_a_resync_with_the_newest_held(
    cluster: Cluster, member: Member, autojump_clock: trio.testing.MockClock
) -> None:
    start = member.gsa.msg_id
    _lost, second, third = rekeys(cluster, 3)
    t0 = trio.current_time()
    member.receive_rekey(second, "multicast")
    await trio.sleep(0.3)
    member.receive_rekey(third, "n2")
    with trio.fail_after(10):
        while (request := await resync_asked(member)) is None:
            await trio.sleep(0.01)
    assert trio.current_time() - t0 == pytest.approx(WAIT_S, abs=0.02), "from the first held"
    assert request.msg_id == start + 3
    assert request.node == "n2"
    assert "not filled" in request.reason


async def test_a_second_gap_gets_its_whole_wait_from_its_own_first_datagram(
    cluster: Cluster, member: Member, autojump_clock: trio.testing.MockClock
) -> None:
    start = member.gsa.msg_id
    m1, m2, m3, _lost, m5 = rekeys(cluster, 5)
    member.receive_rekey(m2, "multicast")
    await trio.sleep(0.9)
    member.receive_rekey(m1, "n1")
    member.receive_rekey(m3, "n1")
    assert member.gsa.msg_id == start + 3
    await trio.sleep(0.05)
    gap_at = trio.current_time()
    member.receive_rekey(m5, "multicast")
    with trio.fail_after(10):
        while (request := await resync_asked(member)) is None:
            await trio.sleep(0.01)
    assert trio.current_time() - gap_at == pytest.approx(WAIT_S, abs=0.02)
    assert request.msg_id == start + 5


async def test_copies_of_a_held_rekey_are_dropped_by_header_and_counted_once(
    cluster: Cluster, member: Member, autojump_clock: trio.testing.MockClock
) -> None:
    _missing, ahead = rekeys(cluster, 2)
    for source in ("multicast", "n1", "n2"):
        member.receive_rekey(ahead, source)
    assert member.stats.ahead == 1
    assert member.stats.duplicates == 2


async def test_a_full_hold_keeps_the_lowest_ids_the_gap_closes_on_first(
    cluster: Cluster, member: Member, autojump_clock: trio.testing.MockClock
) -> None:
    start = member.gsa.msg_id
    first, *rest = rekeys(cluster, _AHEAD_DATAGRAMS + 2)
    for datagram in reversed(rest):  # the highest first, until the hold is full
        member.receive_rekey(datagram, "multicast")
    assert len(member._ahead) == _AHEAD_DATAGRAMS
    assert min(member._ahead) == start + 2, "the lowest pushed out the highest"
    member.receive_rekey(first, "n1")
    assert member.gsa.msg_id == start + 1 + _AHEAD_DATAGRAMS


async def test_with_no_wait_a_gap_asks_a_resync_at_once(
    cluster: Cluster, member: Member, autojump_clock: trio.testing.MockClock
) -> None:
    member._gap_wait_s = 0.0  # rekey.gap_wait_ms = 0
    _missing, ahead = rekeys(cluster, 2)
    member.receive_rekey(ahead, "multicast")
    request = await resync_asked(member)
    assert request is not None
    assert "gap" in request.reason
    assert not member._ahead
