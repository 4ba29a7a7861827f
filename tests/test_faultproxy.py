"""Specification of the test fault proxy (tests/faultproxy.py) on real loopback
sockets: forwarding, delay, drop, partitions (both and one way) and cut, in
process and as a separate process. Timing is measured with
`trio.current_time()` against lower bounds the proxy must respect (it holds
traffic at least the delay) and generous upper bounds."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import pytest
import trio

from tests.faultproxy import FaultProxy, FaultProxyError, ProxyStats, execute, spawn_fault_proxy

LOOPBACK = "127.0.0.1"
DELAY_MS = 15.0


async def tcp_echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            return


async def start_tcp_echo(nursery: trio.Nursery) -> tuple[str, int]:
    listeners = await nursery.start(partial(trio.serve_tcp, tcp_echo, 0, host=LOOPBACK))
    sockname = listeners[0].socket.getsockname()
    return sockname[0], sockname[1]


async def udp_echo(*, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind((LOOPBACK, 0))
        task_status.started(sock.getsockname())
        while True:
            data, source = await sock.recvfrom(65536)
            await sock.sendto(data, source)


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def read_until_broken(stream: trio.SocketStream) -> None:
    """A cut connection (RST) fails the next read, or at the latest the next write."""
    while await stream.receive_some(10):
        pass
    await stream.send_all(b"x")


async def eventually(condition: Callable[[], Awaitable[bool] | bool], timeout_s: float = 5) -> None:
    """Poll `condition` (the proxy's counters) until it holds; fail after `timeout_s`."""
    with trio.fail_after(timeout_s):
        for _ in iter(int, 1):
            result = condition()
            if result if isinstance(result, bool) else await result:
                return
            await trio.sleep(0.002)


async def nothing_arrives(stream: trio.SocketStream, wait_s: float = 0.1) -> bool:
    with trio.move_on_after(wait_s):
        await stream.receive_some(1)
        return False
    return True


@pytest.fixture
async def tcp_route() -> AsyncIterator[FaultProxy]:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await start_tcp_echo(nursery)
            async with FaultProxy((LOOPBACK, 0), target, "tcp", seed=1) as proxy:
                yield proxy
            nursery.cancel_scope.cancel()


@pytest.fixture
async def udp_route() -> AsyncIterator[FaultProxy]:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await nursery.start(udp_echo)
            async with FaultProxy((LOOPBACK, 0), target, "udp", seed=1) as proxy:
                yield proxy
            nursery.cancel_scope.cancel()


def udp_client() -> trio.socket.SocketType:
    return trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)


# --- TCP -------------------------------------------------------------------------


async def test_tcp_forwards_both_ways_and_passes_half_close(tcp_route: FaultProxy) -> None:
    stream = await trio.open_tcp_stream(*tcp_route.address)
    async with stream:
        await stream.send_all(b"hello gcks")
        assert await receive_exactly(stream, 10) == b"hello gcks"
        await stream.send_eof()
        assert await stream.receive_some(10) == b""  # the echo server closed after our EOF
    assert tcp_route.stats.bytes_up == tcp_route.stats.bytes_down == 10


async def test_tcp_delay_holds_each_direction(tcp_route: FaultProxy) -> None:
    tcp_route.set_delay(DELAY_MS)
    stream = await trio.open_tcp_stream(*tcp_route.address)
    async with stream:
        start = trio.current_time()
        await stream.send_all(b"x")
        assert await receive_exactly(stream, 1) == b"x"
        elapsed = trio.current_time() - start
    assert 2 * DELAY_MS / 1000 <= elapsed < 5.0


async def test_tcp_jitter_never_reorders_the_byte_stream(tcp_route: FaultProxy) -> None:
    tcp_route.set_delay(4.0, jitter_ms=4.0, direction="up")
    payload = b"".join(i.to_bytes(2, "big") for i in range(2000))
    stream = await trio.open_tcp_stream(*tcp_route.address)
    async with stream:
        for offset in range(0, len(payload), 100):
            await stream.send_all(payload[offset : offset + 100])
        assert await receive_exactly(stream, len(payload)) == payload


async def test_tcp_partition_holds_bytes_until_heal(tcp_route: FaultProxy) -> None:
    stream = await trio.open_tcp_stream(*tcp_route.address)
    async with stream:
        await stream.send_all(b"a")
        assert await receive_exactly(stream, 1) == b"a"
        tcp_route.partition()
        await stream.send_all(b"held")
        assert await nothing_arrives(stream)
        tcp_route.heal()
        assert await receive_exactly(stream, 4) == b"held"


async def test_tcp_one_way_partition_blocks_only_that_direction(tcp_route: FaultProxy) -> None:
    stream = await trio.open_tcp_stream(*tcp_route.address)
    async with stream:
        await stream.send_all(b"-")
        assert await receive_exactly(stream, 1) == b"-"
        tcp_route.partition("down")
        await stream.send_all(b"ping")
        assert await nothing_arrives(stream)
        # up never blocked, so the echo server already has (and echoed) the bytes
        assert tcp_route.stats.bytes_up == 5
        assert tcp_route.stats.bytes_down == 1
        tcp_route.heal()
        assert await receive_exactly(stream, 4) == b"ping"


async def test_tcp_partition_holds_new_connections_until_heal(tcp_route: FaultProxy) -> None:
    tcp_route.partition("up")
    stream = await trio.open_tcp_stream(*tcp_route.address)  # the kernel accepts
    async with stream:
        await stream.send_all(b"early")
        assert await nothing_arrives(stream)
        tcp_route.heal()
        assert await receive_exactly(stream, 5) == b"early"


async def test_tcp_cut_aborts_every_connection_and_new_ones_work(tcp_route: FaultProxy) -> None:
    first = await trio.open_tcp_stream(*tcp_route.address)
    second = await trio.open_tcp_stream(*tcp_route.address)
    async with first, second:
        for stream in (first, second):
            await stream.send_all(b"up")
            assert await receive_exactly(stream, 2) == b"up"
        tcp_route.cut_all()
        for stream in (first, second):
            with pytest.raises(trio.BrokenResourceError):
                await read_until_broken(stream)
    assert tcp_route.stats.cuts == 2
    third = await trio.open_tcp_stream(*tcp_route.address)
    async with third:
        await third.send_all(b"again")
        assert await receive_exactly(third, 5) == b"again"


async def test_tcp_partition_with_cut_aborts_and_holds(tcp_route: FaultProxy) -> None:
    stream = await trio.open_tcp_stream(*tcp_route.address)
    async with stream:
        await stream.send_all(b"a")
        assert await receive_exactly(stream, 1) == b"a"
        tcp_route.partition(cut=True)
        with pytest.raises(trio.BrokenResourceError):
            await read_until_broken(stream)
    fresh = await trio.open_tcp_stream(*tcp_route.address)
    async with fresh:
        await fresh.send_all(b"b")
        assert await nothing_arrives(fresh)
        tcp_route.heal()
        assert await receive_exactly(fresh, 1) == b"b"


async def test_tcp_target_down_closes_the_client() -> None:
    # Find a free port, then leave it closed: the target refuses.
    with trio.socket.socket() as probe:
        await probe.bind((LOOPBACK, 0))
        closed_port = probe.getsockname()[1]
    with trio.fail_after(10):
        async with FaultProxy((LOOPBACK, 0), (LOOPBACK, closed_port), "tcp") as proxy:
            stream = await trio.open_tcp_stream(*proxy.address)
            async with stream:
                assert await stream.receive_some(10) == b""
    assert proxy.stats.refused == 1


# --- UDP -------------------------------------------------------------------------


async def test_udp_forwards_both_ways_with_delay(udp_route: FaultProxy) -> None:
    udp_route.set_delay(DELAY_MS)
    with udp_client() as sock:
        start = trio.current_time()
        await sock.sendto(b"probe", udp_route.address)
        data, source = await sock.recvfrom(100)
        elapsed = trio.current_time() - start
    assert data == b"probe"
    assert source == udp_route.address
    assert 2 * DELAY_MS / 1000 <= elapsed < 5.0
    assert udp_route.stats.datagrams_up == udp_route.stats.datagrams_down == 1


async def test_udp_drop_rate_is_close_to_probability_and_seeded(udp_route: FaultProxy) -> None:
    udp_route.set_drop(0.5, direction="up")
    with udp_client() as sock:
        for index in range(200):
            await sock.sendto(index.to_bytes(2, "big"), udp_route.address)
        await eventually(lambda: udp_route.stats.dropped_up + udp_route.stats.datagrams_up == 200)
    dropped = udp_route.stats.dropped_up
    assert 60 <= dropped <= 140
    # The same seed drops the same datagrams.
    replay = FaultProxy((LOOPBACK, 0), (LOOPBACK, 9), "udp", seed=1)
    replay.set_drop(0.5, direction="up")
    assert sum(replay._rng.random() < 0.5 for _ in range(200)) == dropped


async def test_udp_one_way_partition_drops_only_that_direction(udp_route: FaultProxy) -> None:
    udp_route.partition("down")
    with udp_client() as sock:
        await sock.sendto(b"lost-reply", udp_route.address)
        await eventually(lambda: udp_route.stats.dropped_down == 1)
        assert udp_route.stats.datagrams_up == 1
        udp_route.heal()
        await sock.sendto(b"answered", udp_route.address)
        data, _ = await sock.recvfrom(100)
    assert data == b"answered"


async def test_udp_full_partition_drops_everything(udp_route: FaultProxy) -> None:
    udp_route.partition()
    with udp_client() as sock:
        await sock.sendto(b"x", udp_route.address)
        await eventually(lambda: udp_route.stats.dropped_up == 1)
    assert udp_route.stats.datagrams_up == 0


async def test_udp_cut_forgets_sessions_and_forwarding_resumes(udp_route: FaultProxy) -> None:
    with udp_client() as sock:
        await sock.sendto(b"one", udp_route.address)
        assert (await sock.recvfrom(100))[0] == b"one"
        udp_route.cut_all()
        await sock.sendto(b"two", udp_route.address)
        assert (await sock.recvfrom(100))[0] == b"two"


# --- refusals and controls -------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "target"),
    [
        ((LOOPBACK, 0), ("10.0.0.1", 80)),
        ((LOOPBACK, 0), ("localhost", 80)),
        ((LOOPBACK, 0), ("::1", 80)),
        (("0.0.0.0", 0), (LOOPBACK, 80)),
        ((LOOPBACK, 0), (LOOPBACK, 0)),
    ],
)
def test_only_loopback_addresses_accepted(listen: tuple[str, int], target: tuple[str, int]) -> None:
    with pytest.raises(FaultProxyError):
        FaultProxy(listen, target, "tcp")


def test_invalid_controls_refused() -> None:
    proxy = FaultProxy((LOOPBACK, 0), (LOOPBACK, 9), "tcp")
    with pytest.raises(FaultProxyError, match="UDP"):
        proxy.set_drop(0.5)
    with pytest.raises(FaultProxyError, match="jitter"):
        proxy.set_delay(1.0, jitter_ms=2.0)
    with pytest.raises(FaultProxyError, match="direction"):
        proxy.partition("sideways")  # type: ignore[arg-type]


def test_control_commands_parse_and_apply() -> None:
    tcp = FaultProxy((LOOPBACK, 0), (LOOPBACK, 9), "tcp")
    udp = FaultProxy((LOOPBACK, 0), (LOOPBACK, 9), "udp")
    proxies = {"reg": tcp, "probe": udp}
    assert execute(proxies, "delay * up 5 2") == "ok"
    assert tcp.faults["up"].delay_ms == udp.faults["up"].delay_ms == 5.0
    assert tcp.faults["down"].delay_ms == 0.0
    assert execute(proxies, "drop probe both 0.25") == "ok"
    assert udp.faults["down"].drop == 0.25
    assert execute(proxies, "partition reg down") == "ok"
    assert tcp.faults["down"].blocked
    assert execute(proxies, "heal *") == "ok"
    assert not tcp.faults["down"].blocked
    assert execute(proxies, "reset probe") == "ok"
    assert udp.faults["up"].delay_ms == 0.0
    assert execute(proxies, "stats reg").startswith('ok {"reg": {')
    for bad in ("", "delay", "delay nowhere up 5", "delay reg up fast", "drop reg up 0.5", "x *"):
        assert execute(proxies, bad).startswith("error"), bad


async def test_process_mode_forwards_and_obeys_control() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            tcp_target = await start_tcp_echo(nursery)
            udp_target = await nursery.start(udp_echo)
            async with spawn_fault_proxy(
                tcp=[("reg", (LOOPBACK, 0), tcp_target)],
                udp=[("probe", (LOOPBACK, 0), udp_target)],
                seed=7,
                lifetime_s=60,
            ) as control:
                await control.set_delay("*", DELAY_MS)
                stream = await trio.open_tcp_stream(*control.routes["reg"])
                async with stream:
                    start = trio.current_time()
                    await stream.send_all(b"hi")
                    assert await receive_exactly(stream, 2) == b"hi"
                    assert trio.current_time() - start >= 2 * DELAY_MS / 1000
                    await control.cut_all("reg")
                    with pytest.raises(trio.BrokenResourceError):
                        await read_until_broken(stream)
                await control.partition("probe", "down")
                with udp_client() as sock:
                    await sock.sendto(b"p", control.routes["probe"])

                    async def dropped() -> bool:
                        return (await control.stats("probe")).dropped_down == 1

                    await eventually(dropped)
                    await control.heal()
                    await sock.sendto(b"q", control.routes["probe"])
                    assert (await sock.recvfrom(10))[0] == b"q"
                stats = await control.stats("reg")
                assert isinstance(stats, ProxyStats)
                assert stats.cuts == 1
                with pytest.raises(FaultProxyError, match="no route"):
                    await control.heal("nowhere")
            nursery.cancel_scope.cancel()


async def test_process_exits_by_itself_when_its_parent_goes_away() -> None:
    """stdin closing (the test process died) ends the proxy process."""
    command = [sys.executable, "-m", "tests.faultproxy", "--exit-on-stdin-eof"]
    command += ["--udp", "x", "127.0.0.1:0", "127.0.0.1:9"]
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert process.stdin is not None
        assert process.stdout is not None
        ready = b""
        while not ready.endswith(b"\n"):
            ready += await process.stdout.receive_some(4096)
        assert set(json.loads(ready)["routes"]) == {"x"}
        await process.stdin.aclose()
        assert await process.wait() == 0
        await process.stdout.aclose()


async def test_process_refuses_non_loopback_target() -> None:
    command = [sys.executable, "-m", "tests.faultproxy", "--tcp", "x", "127.0.0.1:0", "8.8.8.8:53"]
    with trio.fail_after(30):
        result = await trio.run_process(command, capture_stderr=True, check=False)
    assert result.returncode == 2
    assert b"outside 127.0.0.0/8" in result.stderr
