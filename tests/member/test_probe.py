"""Specification of the UDP latency probes: the member's prober
(gcks.member.probe) and the node's responder (gcks.cluster.probe).

The prober's logic runs over an in-memory datagram network under
`trio.testing.MockClock`, so RTTs are exact; one loopback test runs the real
prober against the real responder."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from gcks.cluster.probe import ProbeResponder, RateLimiter, ResponderConfig
from gcks.member.discovery import Candidate
from gcks.member.probe import ProbeConfig, Prober, open_probe_socket
from gcks.member.ranking import Ranking
from gcks.proto.messages import ProbeRequest, ProbeResponse, decode_message
from tests.faultproxy import FaultProxy

CONFIG = ProbeConfig(probes_per_round=3, timeout_s=0.5, spacing_s=0.01)


class FakeNetwork:
    """Datagrams in memory. A node at an address answers every ProbeRequest
    with `ProbeResponse(nonce, node_id)` after its delay; `None` drops it."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.nodes: dict[tuple[str, int], tuple[str, float | None]] = {}
        self.failing: set[tuple[str, int]] = set()
        self.nonces: list[bytes] = []
        self._send, self._receive = trio.open_memory_channel[tuple[bytes, Any]](1000)

    def inject(self, data: bytes) -> None:
        self._send.send_nowait((data, ("127.0.0.9", 9)))

    async def sendto(self, data: bytes, address: tuple[str, int], /) -> int:
        if address in self.failing:
            raise OSError("network unreachable")
        request = decode_message(data)
        assert isinstance(request, ProbeRequest)
        self.nonces.append(request.nonce)
        node_id, delay = self.nodes.get(address, ("", None))
        if delay is not None:
            response = ProbeResponse(request.nonce, node_id).encode()
            self._nursery.start_soon(self._deliver, response, address, delay)
        return len(data)

    async def _deliver(self, data: bytes, source: tuple[str, int], delay: float) -> None:
        await trio.sleep(delay)
        self._send.send_nowait((data, source))

    async def recvfrom(self, bufsize: int, /) -> tuple[bytes, Any]:
        return await self._receive.receive()


def candidate(node_id: str | None, port: int) -> Candidate:
    return Candidate(f"127.0.0.1:{port + 1000}", f"127.0.0.1:{port}", node_id)


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def run_round(
    setup: Callable[[FakeNetwork], None],
    candidates: list[Candidate],
    ranking: Ranking,
    config: ProbeConfig = CONFIG,
    prober: Prober | None = None,
) -> tuple[Prober, FakeNetwork, float]:
    async with trio.open_nursery() as nursery:
        network = FakeNetwork(nursery)
        setup(network)
        if prober is None:
            prober = Prober(network, config)
        else:
            prober._sock = network  # a later round, on a fresh network
        start = trio.current_time()
        await prober.probe_round(candidates, ranking)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    return prober, network, elapsed


# --- member side ---------------------------------------------------------------


async def test_rtt_measured_from_send_to_answer(mock_clock: trio.testing.MockClock) -> None:
    def setup(network: FakeNetwork) -> None:
        network.nodes[("127.0.0.1", 1)] = ("near", 0.005)
        network.nodes[("127.0.0.1", 2)] = ("far", 0.040)

    ranking = Ranking()
    prober, _, elapsed = await run_round(
        setup, [candidate("near", 1), candidate("far", 2)], ranking
    )
    assert ranking.median_ms("near") == pytest.approx(5.0)
    assert ranking.median_ms("far") == pytest.approx(40.0)
    assert prober.counters.sent == 6
    assert prober.counters.answered == 6
    # The round ends when the last answer arrives, not at the deadline.
    assert elapsed == pytest.approx(2 * CONFIG.spacing_s + 0.040)


async def test_round_result_lists_outcomes_and_endpoints(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        network = FakeNetwork(nursery)
        network.nodes[("127.0.0.1", 1)] = ("n1", 0.002)
        result = await Prober(network, CONFIG).probe_round([candidate("n1", 1)], Ranking())
        nursery.cancel_scope.cancel()
    assert result.rtts == {"n1": [pytest.approx(2.0)] * 3}
    assert result.endpoints["n1"].member_addr == "127.0.0.1:1001"
    assert result.endpoints["n1"].probe_addr == "127.0.0.1:1"
    assert result.silent == ()


async def test_silent_node_is_lost_and_round_bounded_by_deadline(
    mock_clock: trio.testing.MockClock,
) -> None:
    def setup(network: FakeNetwork) -> None:
        network.nodes[("127.0.0.1", 1)] = ("up", 0.001)
        network.nodes[("127.0.0.1", 2)] = ("down", None)

    ranking = Ranking()
    prober, _, elapsed = await run_round(setup, [candidate("up", 1), candidate("down", 2)], ranking)
    assert ranking.median_ms("down") is None
    assert ranking.ranking()[0][0] == "up"
    assert ranking.median_ms("up") == pytest.approx(1.0)
    assert prober.counters.lost == 3
    assert elapsed == pytest.approx(2 * CONFIG.spacing_s + CONFIG.timeout_s)


async def test_answer_after_deadline_is_lost_and_counted_late(
    mock_clock: trio.testing.MockClock,
) -> None:
    # Probes leave at 0, 10 and 20 ms with 500 ms deadlines; answers take 505 ms,
    # so two arrive after their own deadline while the round still listens.
    def setup(network: FakeNetwork) -> None:
        network.nodes[("127.0.0.1", 1)] = ("slow", 0.505)

    ranking = Ranking()
    prober, _, elapsed = await run_round(setup, [candidate("slow", 1)], ranking)
    assert prober.counters.late == 2
    assert prober.counters.lost == 3
    assert ranking.median_ms("slow") is None
    assert elapsed == pytest.approx(2 * CONFIG.spacing_s + CONFIG.timeout_s)


async def test_answer_from_an_earlier_round_is_unmatched(
    mock_clock: trio.testing.MockClock,
) -> None:
    config = ProbeConfig(probes_per_round=1, timeout_s=0.5, spacing_s=0.0)
    async with trio.open_nursery() as nursery:
        network = FakeNetwork(nursery)
        network.nodes[("127.0.0.1", 1)] = ("n1", 2.0)
        prober = Prober(network, config)
        ranking = Ranking()
        await prober.probe_round([candidate("n1", 1)], ranking)  # ends at 0.5 s
        await trio.sleep(1.6)
        network.nodes[("127.0.0.1", 1)] = ("n1", 0.001)
        await prober.probe_round([candidate("n1", 1)], ranking)  # hears the 2.0 s answer
        nursery.cancel_scope.cancel()
    assert prober.counters.unmatched == 1
    assert prober.counters.answered == 1
    assert ranking.median_ms("n1") is None  # 1 of 2 lost: the median is infinite


async def test_garbage_and_forged_datagrams_are_counted_and_ignored(
    mock_clock: trio.testing.MockClock,
) -> None:
    def setup(network: FakeNetwork) -> None:
        network.nodes[("127.0.0.1", 1)] = ("n1", 0.01)
        network.inject(b"\xc1 not msgpack")
        network.inject(ProbeRequest(b"\x01" * 16).encode())  # right codec, wrong message
        network.inject(ProbeResponse(b"\x02" * 16, "n1").encode())  # guessed nonce

    ranking = Ranking()
    prober, _, _ = await run_round(setup, [candidate("n1", 1)], ranking)
    assert prober.counters.malformed == 2
    assert prober.counters.unmatched == 1
    assert prober.counters.answered == 3
    assert ranking.median_ms("n1") == pytest.approx(10.0)


async def test_static_node_answering_with_another_id_counts_as_lost(
    mock_clock: trio.testing.MockClock,
) -> None:
    def setup(network: FakeNetwork) -> None:
        network.nodes[("127.0.0.1", 1)] = ("impostor", 0.001)

    ranking = Ranking()
    prober, _, _ = await run_round(setup, [candidate("n1", 1)], ranking)
    assert prober.counters.wrong_node == 3
    assert ranking.median_ms("n1") is None
    assert "impostor" not in ranking.nodes


async def test_dns_candidate_learns_node_id_then_losses_count_against_it(
    mock_clock: trio.testing.MockClock,
) -> None:
    ranking = Ranking()
    dns = candidate(None, 1)

    def answering(network: FakeNetwork) -> None:
        network.nodes[("127.0.0.1", 1)] = ("gcks-0", 0.003)

    prober, _, _ = await run_round(answering, [dns], ranking)
    assert ranking.median_ms("gcks-0") == pytest.approx(3.0)

    result_prober, _, _ = await run_round(lambda _: None, [dns], ranking, prober=prober)
    assert result_prober.counters.lost == 3
    assert ranking.median_ms("gcks-0") is None  # 3 of the last 5 lost


async def test_dns_candidate_that_never_answered_is_reported_silent(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        network = FakeNetwork(nursery)
        result = await Prober(network, CONFIG).probe_round([candidate(None, 5)], Ranking())
        nursery.cancel_scope.cancel()
    assert result.silent == (candidate(None, 5),)
    assert result.rtts == {}


async def test_send_error_is_a_lost_probe(mock_clock: trio.testing.MockClock) -> None:
    def setup(network: FakeNetwork) -> None:
        network.failing.add(("127.0.0.1", 1))

    ranking = Ranking()
    prober, _, elapsed = await run_round(setup, [candidate("n1", 1)], ranking)
    assert prober.counters.send_errors == 3
    assert prober.counters.lost == 3
    assert ranking.median_ms("n1") is None
    assert elapsed == pytest.approx(2 * CONFIG.spacing_s)  # nothing to wait for


async def test_every_probe_carries_a_fresh_nonce(mock_clock: trio.testing.MockClock) -> None:
    def setup(network: FakeNetwork) -> None:
        for port in range(1, 5):
            network.nodes[("127.0.0.1", port)] = (f"n{port}", 0.001)

    _, network, _ = await run_round(
        setup, [candidate(f"n{port}", port) for port in range(1, 5)], Ranking()
    )
    assert len(network.nonces) == 12
    assert len(set(network.nonces)) == 12


async def test_repeated_nonce_source_is_refused(mock_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        network = FakeNetwork(nursery)
        prober = Prober(network, CONFIG, nonces=lambda size: b"\x00" * size)
        with pytest.raises(RuntimeError, match="nonce"):
            await prober.probe_round([candidate("n1", 1)], Ranking())
        nursery.cancel_scope.cancel()


async def test_concurrent_rounds_on_one_prober_refused(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        network = FakeNetwork(nursery)
        prober = Prober(network, CONFIG)
        nursery.start_soon(prober.probe_round, [candidate("n1", 1)], Ranking())
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="already running"):
            await prober.probe_round([candidate("n1", 1)], Ranking())
        nursery.cancel_scope.cancel()


def test_invalid_probe_config_rejected() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        ProbeConfig(timeout_s=0)
    with pytest.raises(ValueError, match="probes_per_round"):
        ProbeConfig(probes_per_round=0)


# --- node side (sans-IO parts) ---------------------------------------------------


def test_responder_answers_request_with_nonce_and_node_id() -> None:
    responder = ProbeResponder("n1")
    reply = responder.handle(ProbeRequest(b"\x05" * 16).encode(), "10.0.0.1", 0.0)
    assert reply is not None
    assert decode_message(reply) == ProbeResponse(b"\x05" * 16, "n1")
    assert responder.counters.received == 1


def test_responder_drops_and_counts_undecodable_and_unexpected() -> None:
    responder = ProbeResponder("n1")
    assert responder.handle(b"", "10.0.0.1", 0.0) is None
    assert responder.handle(b"\x92\x01", "10.0.0.1", 0.0) is None
    # A response reflected at us (a forged source) must not be answered: no loops.
    assert responder.handle(ProbeResponse(b"\x05" * 16, "n2").encode(), "10.0.0.1", 0.0) is None
    assert responder.counters.malformed == 2
    assert responder.counters.unexpected == 1


requests = st.binary(min_size=16, max_size=16).map(lambda nonce: ProbeRequest(nonce).encode())
datagrams = st.one_of(
    st.binary(max_size=600),
    requests,
    requests.flatmap(lambda data: st.integers(0, len(data) - 1).map(lambda cut: data[:cut])),
    st.binary(min_size=16, max_size=16).map(lambda nonce: ProbeResponse(nonce, "x").encode()),
)


@given(data=datagrams)
def test_responder_never_raises_on_arbitrary_datagrams(data: bytes) -> None:
    responder = ProbeResponder("n1")
    reply = responder.handle(data, "10.0.0.1", 0.0)
    if reply is not None:
        request = decode_message(data)
        assert decode_message(reply) == ProbeResponse(getattr(request, "nonce", b""), "n1")
    counters = responder.counters
    assert counters.received == 1
    assert counters.malformed + counters.unexpected + (reply is not None) == 1


@given(data=datagrams)
def test_prober_decode_never_raises_on_arbitrary_datagrams(data: bytes) -> None:
    prober = Prober(FakeNetwork.__new__(FakeNetwork), CONFIG)
    response = prober._decode(data)
    assert response is None or isinstance(response, ProbeResponse)
    assert prober.counters.malformed == (response is None)


def test_responder_rejects_invalid_node_id() -> None:
    with pytest.raises(ValueError, match="node_id"):
        ProbeResponder("not a valid id!")


def test_responder_drop_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    responder = ProbeResponder("n1", ResponderConfig(log_interval_s=10.0))
    with caplog.at_level(logging.DEBUG, logger="gcks.cluster.probe"):
        for _ in range(100):
            responder.handle(b"junk", "10.0.0.1", 1.0)
        responder.handle(b"junk", "10.0.0.1", 11.0)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert "malformed=1 " in lines[0]
    assert "malformed=100 " in lines[1]  # the 99 held back plus this one
    assert "junk" not in "".join(lines)


def test_per_source_bucket_bounds_answers_and_refills() -> None:
    limiter = RateLimiter(ResponderConfig(per_source_rate=10.0, per_source_burst=5.0))
    assert [limiter.allow("10.0.0.1", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert limiter.allow("10.0.0.2", 0.0)  # other sources are not affected
    assert not limiter.allow("10.0.0.1", 0.05)  # half a token
    assert limiter.allow("10.0.0.1", 0.1)
    assert [limiter.allow("10.0.0.1", 100.0) for _ in range(6)] == [True] * 5 + [False]


def test_total_bucket_bounds_answers_across_many_sources() -> None:
    config = ResponderConfig(total_rate=100.0, total_burst=10.0, max_sources=4)
    limiter = RateLimiter(config)
    allowed = sum(limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0) for i in range(1000))
    assert allowed == 10
    assert len(limiter) == 4  # the table stays bounded under source churn


def test_responder_rate_limits_per_source_ip() -> None:
    responder = ProbeResponder("n1", ResponderConfig(per_source_rate=1.0, per_source_burst=2.0))
    request = ProbeRequest(b"\x05" * 16).encode()
    replies = [responder.handle(request, "10.0.0.1", 0.0) for _ in range(4)]
    assert [reply is not None for reply in replies] == [True, True, False, False]
    assert responder.counters.rate_limited == 2


# --- real sockets on loopback ------------------------------------------------------


async def test_real_prober_measures_real_responder_on_loopback() -> None:
    responder = ProbeResponder("n1")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(responder.serve, "127.0.0.1", 0)
            with open_probe_socket() as sock:
                await sock.sendto(b"garbage", (host, port))
                prober = Prober(sock, ProbeConfig(timeout_s=2.0, spacing_s=0.0))
                ranking = Ranking()
                await prober.probe_round(
                    [Candidate("127.0.0.1:1", f"{host}:{port}", "n1")], ranking
                )
            nursery.cancel_scope.cancel()
    rtt = ranking.median_ms("n1")
    assert rtt is not None
    assert 0.0 <= rtt < 2000.0
    assert prober.counters.answered == 3
    assert responder.counters.answered == 3
    assert responder.counters.malformed == 1


def _host_has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _host_has_ipv6_loopback(), reason="this host has no IPv6 loopback")
async def test_one_probe_socket_reaches_ipv4_and_ipv6_nodes() -> None:
    """A mixed address book: one node on 127.0.0.1, one on ::1, both answer
    every probe of one round over the member's one socket."""
    responders = {"v4": ProbeResponder("v4"), "v6": ProbeResponder("v6")}
    ranking = Ranking()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            v4_host, v4_port = await nursery.start(responders["v4"].serve, "127.0.0.1", 0)
            v6_host, v6_port = await nursery.start(responders["v6"].serve, "::1", 0)
            candidates = [
                Candidate("127.0.0.1:1", f"{v4_host}:{v4_port}", "v4"),
                Candidate("[::1]:1", f"[{v6_host}]:{v6_port}", "v6"),
            ]
            with open_probe_socket() as sock:
                prober = Prober(sock, ProbeConfig(timeout_s=2.0, spacing_s=0.0))
                await prober.probe_round(candidates, ranking)
            nursery.cancel_scope.cancel()
    assert prober.counters.answered == 6
    assert prober.counters.send_errors == 0
    assert responders["v4"].counters.answered == 3
    assert responders["v6"].counters.answered == 3


async def test_probe_socket_is_ipv4_on_a_host_without_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    real_socket = trio.socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> Any:
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    monkeypatch.setattr(trio.socket, "socket", no_ipv6)
    with open_probe_socket() as sock:
        assert sock.family == socket.AF_INET


async def test_nearest_node_chosen_through_delaying_proxies() -> None:
    """Two nodes behind proxies adding 2 ms and 25 ms each way: the member's
    ranking puts the near one first and the RTTs include the added delay."""
    responders = {"near": ProbeResponder("near"), "far": ProbeResponder("far")}
    ranking = Ranking()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            candidates = []
            for node_id, delay_ms in (("near", 2.0), ("far", 25.0)):
                address = await nursery.start(responders[node_id].serve, "127.0.0.1", 0)
                proxy = FaultProxy(("127.0.0.1", 0), address, "udp")
                host, port = await nursery.start(proxy.run)
                proxy.set_delay(delay_ms)
                candidates.append(Candidate("127.0.0.1:1", f"{host}:{port}", node_id))
            with open_probe_socket() as sock:
                prober = Prober(sock, ProbeConfig(timeout_s=5.0, spacing_s=0.001))
                await prober.probe_round(candidates, ranking)
            nursery.cancel_scope.cancel()
    choice = ranking.choose_initial()
    assert choice is not None
    assert choice.node_id == "near"
    assert choice.rtts["near"] >= 4.0
    assert choice.rtts["far"] >= 50.0
