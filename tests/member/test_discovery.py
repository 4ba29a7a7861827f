"""Specification of node discovery (gcks.member.discovery): a static list, or a
DNS name re-resolved periodically. Resolvers are injected: no real DNS except
`localhost`."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing

from gcks.member.discovery import Candidate, Discovery, DiscoveryError, DnsConfig
from gcks.proto.messages import NodeEndpoint

DNS = DnsConfig("gcks.default.svc.cluster.local", member_port=7400, probe_port=7401, interval_s=30)


class FakeResolver:
    """Answers from a script: a list of addresses, or an exception to raise."""

    def __init__(self, *answers: Sequence[str] | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []

    async def __call__(self, name: str) -> Sequence[str]:
        self.calls.append(name)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def hang(name: str) -> Sequence[str]:
    await trio.sleep_forever()


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# --- static ----------------------------------------------------------------------


async def test_static_list_gives_candidates_with_known_ids() -> None:
    discovery = Discovery.static(
        [NodeEndpoint("n1", "10.0.0.1:7400", "10.0.0.1:7401"), NodeEndpoint("n2", "a:1", "a:2")]
    )
    assert await discovery.refresh() == (
        Candidate("10.0.0.1:7400", "10.0.0.1:7401", "n1"),
        Candidate("a:1", "a:2", "n2"),
    )


def test_static_list_learns_nodes_from_the_clusters_address_book() -> None:
    configured = Candidate("10.0.0.1:7400", "10.0.0.1:7401", "n1")
    discovery = Discovery.static([NodeEndpoint("n1", "10.0.0.1:7400", "10.0.0.1:7401")])
    book = [NodeEndpoint("n1", "n1.internal:1", "n1.internal:2"), NodeEndpoint("n4", "d:1", "d:2")]
    assert discovery.learn(book)
    # A configured node keeps the address this member reaches it by.
    assert discovery.candidates == (configured, Candidate("d:1", "d:2", "n4"))
    assert not discovery.learn(book)
    # A node the book no longer names is dropped again; a configured one never is.
    assert discovery.learn([NodeEndpoint("n5", "e:1", "e:2")])
    assert discovery.candidates == (configured, Candidate("e:1", "e:2", "n5"))
    assert discovery.learn([])
    assert discovery.candidates == (configured,)


async def test_a_dns_list_learns_nothing_from_an_address_book() -> None:
    async def resolver(name: str) -> list[str]:
        return ["10.0.0.1"]

    discovery = Discovery.dns(DNS, resolver)
    before = await discovery.refresh()
    assert not discovery.learn([NodeEndpoint("n4", "d:1", "d:2")])
    assert discovery.candidates == before


def test_static_list_rejects_bad_address_and_duplicate_id() -> None:
    with pytest.raises(ValueError, match="n1"):
        Discovery.static([NodeEndpoint("n1", "no-port", "a:2")])
    with pytest.raises(ValueError, match="twice"):
        Discovery.static([NodeEndpoint("n1", "a:1", "a:2"), NodeEndpoint("n1", "b:1", "b:2")])


def test_discovery_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="needs"):
        Discovery()
    with pytest.raises(ValueError, match="not both"):
        Discovery(static=[NodeEndpoint("n1", "a:1", "a:2")], dns=DNS)


# --- DNS -------------------------------------------------------------------------


async def test_dns_each_address_is_a_node_with_configured_ports() -> None:
    resolver = FakeResolver(["10.0.0.2", "10.0.0.1", "10.0.0.2", "fd00::5"])
    discovery = Discovery.dns(DNS, resolver)
    assert discovery.candidates == ()
    assert await discovery.refresh() == (
        Candidate("10.0.0.1:7400", "10.0.0.1:7401"),
        Candidate("10.0.0.2:7400", "10.0.0.2:7401"),
        Candidate("[fd00::5]:7400", "[fd00::5]:7401"),
    )
    assert resolver.calls == [DNS.name]
    assert discovery.resolutions == 1


async def test_dns_failure_raises_and_keeps_last_good_list() -> None:
    resolver = FakeResolver(["10.0.0.1"], OSError("NXDOMAIN"), ["not-an-ip"])
    discovery = Discovery.dns(DNS, resolver)
    good = await discovery.refresh()
    with pytest.raises(DiscoveryError, match="NXDOMAIN"):
        await discovery.refresh()
    with pytest.raises(DiscoveryError, match="no usable address"):
        await discovery.refresh()
    assert discovery.candidates == good
    assert discovery.failures == 2


async def test_dns_resolution_has_a_deadline(mock_clock: trio.testing.MockClock) -> None:
    discovery = Discovery.dns(DnsConfig("gcks", 1, 2, timeout_s=5.0), hang)
    start = trio.current_time()
    with pytest.raises(DiscoveryError, match="longer than"):
        await discovery.refresh()
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_dns_answer_is_capped_at_max_nodes() -> None:
    addresses = [f"10.0.0.{i}" for i in range(1, 11)]
    discovery = Discovery.dns(DnsConfig("gcks", 1, 2, max_nodes=3), FakeResolver(addresses))
    candidates = await discovery.refresh()
    assert [candidate.probe_addr for candidate in candidates] == [
        "10.0.0.1:2",
        "10.0.0.2:2",
        "10.0.0.3:2",
    ]


async def test_watch_reports_first_list_then_only_changes(
    mock_clock: trio.testing.MockClock,
) -> None:
    resolver = FakeResolver(
        ["10.0.0.1"], ["10.0.0.1"], OSError("timeout"), ["10.0.0.1", "10.0.0.2"]
    )
    changes: list[tuple[Candidate, ...]] = []
    async with trio.open_nursery() as nursery:
        first = await nursery.start(Discovery.dns(DNS, resolver).watch, changes.append)
        await trio.sleep(DNS.interval_s * 3 + 1)  # three re-resolutions (mock clock)
        nursery.cancel_scope.cancel()
    assert first == (Candidate("10.0.0.1:7400", "10.0.0.1:7401"),)
    assert changes == [
        (Candidate("10.0.0.1:7400", "10.0.0.1:7401"), Candidate("10.0.0.2:7400", "10.0.0.2:7401"))
    ]
    assert len(resolver.calls) == 4


async def test_watch_on_static_list_reports_once_and_waits(
    mock_clock: trio.testing.MockClock,
) -> None:
    changes: list[tuple[Candidate, ...]] = []
    discovery = Discovery.static([NodeEndpoint("n1", "a:1", "a:2")])
    async with trio.open_nursery() as nursery:
        first = await nursery.start(discovery.watch, changes.append)
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    assert first == (Candidate("a:1", "a:2", "n1"),)
    assert changes == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "bad name!"},
        {"member_port": 0},
        {"probe_port": 70000},
        {"interval_s": 0.0},
        {"max_nodes": 0},
    ],
)
def test_invalid_dns_config_rejected(kwargs: dict[str, object]) -> None:
    settings: dict[str, object] = {"name": "gcks", "member_port": 1, "probe_port": 2} | kwargs
    with pytest.raises(ValueError, match=r"invalid|range|must be"):
        DnsConfig(**settings)  # type: ignore[arg-type]


async def test_default_resolver_resolves_localhost() -> None:
    with trio.fail_after(10):
        discovery = Discovery.dns(DnsConfig("localhost", 7400, 7401))
        candidates = await discovery.refresh()
    assert Candidate("127.0.0.1:7400", "127.0.0.1:7401") in candidates
