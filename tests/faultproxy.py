"""A userspace network fault proxy for integration and chaos tests.

The test machines have no netem, so latency, loss and partitions between
members and nodes are made here: a proxy listens on a loopback address and
forwards to a target on 127.0.0.0/8, either a TCP byte stream or UDP
datagrams, with faults set per direction at run time. "up" is client ->
target, "down" is target -> client.

- delay: every chunk (TCP) or datagram (UDP) is held `delay_ms`, plus a uniform
  jitter of +/- `jitter_ms` from a seeded RNG. TCP keeps byte order (a chunk is
  never delivered before the one read before it); UDP datagrams may reorder.
- drop (UDP only): each datagram is dropped with the given probability (seeded).
- partition (one direction or both): UDP datagrams are dropped; TCP bytes stop
  flowing and wait, as a real TCP stream's retransmissions would, until
  `heal()`; new TCP connections are held before they reach the target. With
  `cut=True` existing TCP connections are also aborted (RST).
- cut: abort every TCP connection now (RST to both ends), or forget every UDP
  session (the target then sees a new source port).

Two ways to use it:

- in-process, in a trio test: `async with FaultProxy(listen, target, "udp") as
  proxy: proxy.set_delay(5)`; `proxy.address` is the bound listen address.
- as a process, for nodes that run as real processes (chaos tests):
  `python -m tests.faultproxy --tcp NAME LISTEN TARGET --udp NAME LISTEN TARGET
  --control 127.0.0.1:0`. It prints one JSON line when ready (`{"control":
  PORT, "routes": {NAME: "127.0.0.1:PORT"}}`) and obeys a line protocol on the
  control port (see `_CONTROL_HELP`); `spawn_fault_proxy()` runs it and gives a
  `ProxyControl` client. The process exits on `quit`, after `--lifetime`
  seconds, or when its stdin closes (`--exit-on-stdin-eof`: the parent died),
  so it can never outlive a test run.

It never connects anywhere but 127.0.0.0/8 and never listens anywhere else.
Test infrastructure only: may import trio and the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import math
import os
import random
import socket
import struct
import subprocess
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, NoReturn, Self

import trio

__all__ = [
    "FaultProxy",
    "FaultProxyError",
    "Faults",
    "ProxyControl",
    "ProxyStats",
    "spawn_fault_proxy",
]

Protocol = Literal["tcp", "udp"]
_Send = Callable[[bytes], Awaitable[int]]
Direction = Literal["up", "down", "both"]
_DIRECTIONS: Final[tuple[Literal["up", "down"], ...]] = ("up", "down")
_ROOT: Final = Path(__file__).resolve().parent.parent  # where `-m tests.faultproxy` resolves
_LOOPBACK: Final = ipaddress.IPv4Network("127.0.0.0/8")
_CHUNK: Final = 64 * 1024
_QUEUED_CHUNKS: Final = 256  # per TCP direction: bounds memory while delayed or blocked
_MAX_DATAGRAM: Final = 65_535
_MAX_IN_FLIGHT: Final = 4_096  # delayed UDP datagrams; beyond this they are dropped
_CONNECT_TIMEOUT_S: Final = 5.0
_MAX_CONTROL_LINE: Final = 1_024
_CONTROL_HELP: Final = (
    "commands (ROUTE is a route name or *, DIR is up|down|both): "
    "delay ROUTE DIR MS [JITTER_MS] | drop ROUTE DIR PROBABILITY | "
    "partition ROUTE DIR [cut] | heal ROUTE | cut ROUTE | reset ROUTE | stats ROUTE | "
    "ping | quit"
)


class FaultProxyError(Exception):
    """The proxy was misused or refused a command; the message says why."""


def _loopback(address: tuple[str, int], what: str) -> tuple[str, int]:
    host, port = address
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise FaultProxyError(f"{what} {host!r} is not an IPv4 address") from None
    if ip not in _LOOPBACK:
        raise FaultProxyError(f"{what} {host} is outside 127.0.0.0/8: refused")
    if not 0 <= port <= 65_535:
        raise FaultProxyError(f"{what} port {port} out of range")
    return str(ip), port


def parse_address(text: str) -> tuple[str, int]:
    """`"127.0.0.1:PORT"` -> ("127.0.0.1", PORT); loopback IPv4 only."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise FaultProxyError(f"expected 127.x.y.z:PORT, got {text[:80]!r}")
    return _loopback((host, int(port)), "address")


@dataclasses.dataclass(slots=True)
class Faults:
    """Faults of one direction."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    drop: float = 0.0  # UDP: probability of dropping a datagram
    blocked: bool = False  # partitioned


@dataclasses.dataclass(slots=True)
class ProxyStats:
    """Counters since start (for assertions in tests)."""

    connections: int = 0  # TCP connections accepted
    refused: int = 0  # TCP connections the target refused (or over the limit)
    cuts: int = 0  # TCP connections aborted by cut
    bytes_up: int = 0
    bytes_down: int = 0
    datagrams_up: int = 0  # UDP datagrams forwarded
    datagrams_down: int = 0
    dropped_up: int = 0  # UDP datagrams dropped (loss, partition, overload)
    dropped_down: int = 0


@dataclasses.dataclass(eq=False, slots=True)
class _Connection:
    scope: trio.CancelScope
    streams: list[trio.SocketStream]
    cut: bool = False


@dataclasses.dataclass(eq=False, slots=True)
class _Session:
    scope: trio.CancelScope
    upstream: trio.socket.SocketType


class FaultProxy:
    """One forwarding route with run-time faults; see the module docstring."""

    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        protocol: Protocol,
        *,
        seed: int = 0,
        max_connections: int = 256,
    ) -> None:
        if protocol not in ("tcp", "udp"):
            raise FaultProxyError(f"protocol must be tcp or udp, not {protocol!r}")
        self.listen = _loopback(listen, "listen address")
        self.target = _loopback(target, "target")
        if self.target[1] == 0:
            raise FaultProxyError("target port must not be 0")
        self.protocol: Protocol = protocol
        self.stats = ProxyStats()
        self.faults = {direction: Faults() for direction in _DIRECTIONS}
        self._rng = random.Random(seed)
        self._max_connections = max_connections
        self._changed = trio.Event()
        self._connections: set[_Connection] = set()
        self._sessions: OrderedDict[tuple[str, int], _Session] = OrderedDict()
        self._in_flight = 0
        self._address: tuple[str, int] | None = None
        self._nursery: trio.Nursery | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect (the bound listen address)."""
        if self._address is None:
            raise FaultProxyError("the proxy is not running")
        return self._address

    # -- lifetime ---------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        nursery = await stack.enter_async_context(trio.open_nursery())
        try:
            await nursery.start(self.run)
        except BaseException:
            nursery.cancel_scope.cancel()
            await stack.aclose()
            raise
        self._exit_stack = stack
        self._nursery = nursery
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._exit_stack is not None
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        stack, self._exit_stack, self._nursery = self._exit_stack, None, None
        await stack.__aexit__(exc_type, exc, traceback)

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Serve until cancelled; reports the bound listen address when ready."""
        if self.protocol == "tcp":
            await self._run_tcp(task_status)
        await self._run_udp(task_status)

    # -- controls ---------------------------------------------------------------

    def set_delay(
        self, delay_ms: float, jitter_ms: float = 0.0, direction: Direction = "both"
    ) -> None:
        """Hold traffic `delay_ms` (+/- `jitter_ms`, seeded) in `direction`."""
        if not (math.isfinite(delay_ms) and math.isfinite(jitter_ms)):
            raise FaultProxyError("delay and jitter must be finite")
        if delay_ms < 0 or jitter_ms < 0 or jitter_ms > delay_ms:
            raise FaultProxyError("need 0 <= jitter_ms <= delay_ms")
        for faults in self._select(direction):
            faults.delay_ms, faults.jitter_ms = delay_ms, jitter_ms
        self._notify()

    def set_drop(self, probability: float, direction: Direction = "both") -> None:
        """Drop each UDP datagram in `direction` with `probability` (seeded)."""
        if self.protocol != "udp":
            raise FaultProxyError("drop applies to UDP; for TCP use partition()")
        if not 0.0 <= probability <= 1.0:
            raise FaultProxyError("probability must be in [0, 1]")
        for faults in self._select(direction):
            faults.drop = probability
        self._notify()

    def partition(self, direction: Direction = "both", *, cut: bool = False) -> None:
        """Stop all traffic in `direction` until `heal()`; `cut` also aborts
        every open TCP connection."""
        for faults in self._select(direction):
            faults.blocked = True
        if cut:
            self.cut_all()
        self._notify()

    def heal(self) -> None:
        """End every partition (delays and drop rates stay)."""
        for faults in self.faults.values():
            faults.blocked = False
        self._notify()

    def reset(self) -> None:
        """No faults at all."""
        for direction in _DIRECTIONS:
            self.faults[direction] = Faults()
        self._notify()

    def cut_all(self) -> None:
        """Abort every TCP connection (RST), or forget every UDP session, now."""
        for connection in self._connections:
            connection.cut = True
            connection.scope.cancel()
        for session in self._sessions.values():
            session.scope.cancel()
        self._sessions.clear()

    def _select(self, direction: Direction) -> list[Faults]:
        if direction == "both":
            return [self.faults["up"], self.faults["down"]]
        if direction in _DIRECTIONS:
            return [self.faults[direction]]
        raise FaultProxyError(f"direction must be up, down or both, not {direction!r}")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_open(self, *directions: Literal["up", "down"]) -> None:
        while any(self.faults[direction].blocked for direction in directions):
            await self._changed.wait()

    def _delay_s(self, direction: Literal["up", "down"]) -> float:
        faults = self.faults[direction]
        jitter = self._rng.uniform(-faults.jitter_ms, faults.jitter_ms) if faults.jitter_ms else 0.0
        return max(0.0, faults.delay_ms + jitter) / 1000.0

    # -- TCP --------------------------------------------------------------------

    async def _run_tcp(self, task_status: trio.TaskStatus[tuple[str, int]]) -> NoReturn:
        listeners = await trio.open_tcp_listeners(self.listen[1], host=self.listen[0])
        (listener,) = listeners
        async with listener, trio.open_nursery() as nursery:
            bound = listener.socket.getsockname()
            self._address = (str(bound[0]), int(bound[1]))
            task_status.started(self._address)
            while True:
                stream = await listener.accept()
                self.stats.connections += 1
                if len(self._connections) >= self._max_connections:
                    self.stats.refused += 1
                    stream.socket.close()
                    continue
                nursery.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, client: trio.SocketStream) -> None:
        connection = _Connection(trio.CancelScope(), [client])
        self._connections.add(connection)
        try:
            with connection.scope:
                # A partitioned network never completes a handshake: hold the
                # new connection until the partition heals (or the client quits).
                await self._wait_open("up", "down")
                try:
                    with trio.fail_after(_CONNECT_TIMEOUT_S):
                        upstream = await trio.open_tcp_stream(*self.target)
                except (OSError, trio.TooSlowError):
                    self.stats.refused += 1
                    return
                connection.streams.append(upstream)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, "up", connection)
                    nursery.start_soon(self._pump, upstream, client, "down", connection)
        finally:
            self._connections.discard(connection)
            for stream in connection.streams:
                if connection.cut:
                    # Linger 0: close sends RST, as a broken path looks to both ends.
                    with contextlib.suppress(OSError):
                        stream.socket.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                stream.socket.close()
            if connection.cut:
                self.stats.cuts += 1

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        direction: Literal["up", "down"],
        connection: _Connection,
    ) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](_QUEUED_CHUNKS)

        async def read() -> None:
            deliver_at = -math.inf
            async with send:
                while True:
                    data = await source.receive_some(_CHUNK)
                    if not data:
                        return
                    # Never before the previous chunk: a byte stream keeps its order.
                    deliver_at = max(deliver_at, trio.current_time() + self._delay_s(direction))
                    await send.send((deliver_at, data))

        async def write() -> None:
            async with receive:
                async for deliver_at, data in receive:
                    while True:
                        await self._wait_open(direction)
                        await trio.sleep_until(deliver_at)
                        if not self.faults[direction].blocked:
                            break
                    # Counted first: the receiver may act on the bytes before we resume.
                    if direction == "up":
                        self.stats.bytes_up += len(data)
                    else:
                        self.stats.bytes_down += len(data)
                    await sink.send_all(data)
            await sink.send_eof()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                nursery.start_soon(write)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # One end broke: the other end must see the connection fail too.
            connection.scope.cancel()

    # -- UDP --------------------------------------------------------------------

    async def _run_udp(self, task_status: trio.TaskStatus[tuple[str, int]]) -> NoReturn:
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind(self.listen)
            bound = sock.getsockname()
            self._address = (str(bound[0]), int(bound[1]))
            async with trio.open_nursery() as nursery:
                task_status.started(self._address)
                while True:
                    data, client = await sock.recvfrom(_MAX_DATAGRAM)
                    session = self._sessions.get(client)
                    if session is None:
                        session = await self._open_session(nursery, sock, client)
                    else:
                        self._sessions.move_to_end(client)
                    self._forward(nursery, data, "up", session.upstream.send)

    async def _open_session(
        self, nursery: trio.Nursery, sock: trio.socket.SocketType, client: tuple[str, int]
    ) -> _Session:
        if len(self._sessions) >= self._max_connections:
            _, oldest = self._sessions.popitem(last=False)
            oldest.scope.cancel()
        upstream = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await upstream.connect(self.target)
        session = _Session(trio.CancelScope(), upstream)
        self._sessions[client] = session

        async def send_to_client(data: bytes) -> int:
            return await sock.sendto(data, client)

        async def relay_down() -> None:
            with upstream, session.scope:
                while True:
                    try:
                        data = await upstream.recv(_MAX_DATAGRAM)
                    except OSError:
                        continue  # ICMP port unreachable from the target: it is down
                    self._forward(nursery, data, "down", send_to_client)

        nursery.start_soon(relay_down)
        return session

    def _forward(
        self,
        nursery: trio.Nursery,
        data: bytes,
        direction: Literal["up", "down"],
        send: _Send,
    ) -> None:
        faults = self.faults[direction]
        if (
            faults.blocked
            or (faults.drop and self._rng.random() < faults.drop)
            or self._in_flight >= _MAX_IN_FLIGHT
        ):
            if direction == "up":
                self.stats.dropped_up += 1
            else:
                self.stats.dropped_down += 1
            return
        self._in_flight += 1
        nursery.start_soon(self._deliver, data, direction, send, self._delay_s(direction))

    async def _deliver(
        self, data: bytes, direction: Literal["up", "down"], send: _Send, delay_s: float
    ) -> None:
        try:
            if delay_s:
                await trio.sleep(delay_s)
            # Counted first: the receiver may act on the datagram before we resume.
            if direction == "up":
                self.stats.datagrams_up += 1
            else:
                self.stats.datagrams_down += 1
            with contextlib.suppress(OSError, trio.ClosedResourceError):
                await send(data)
        finally:
            self._in_flight -= 1


# ---------------------------------------------------------------------------
# Process mode: routes named on the command line, a line protocol for control


def _parse_direction(text: str) -> Direction:
    if text not in ("up", "down", "both"):
        raise FaultProxyError(f"direction must be up, down or both, not {text[:16]!r}")
    return text  # type: ignore[return-value]


def _parse_number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FaultProxyError(f"{what} must be a number, not {text[:32]!r}") from None
    if not math.isfinite(value):
        raise FaultProxyError(f"{what} must be finite")
    return value


def execute(proxies: dict[str, FaultProxy], line: str) -> str:
    """Run one control command against the named proxies; the reply line."""
    words = line.split()
    if not words:
        return "error empty command"
    command, args = words[0].lower(), words[1:]
    try:
        if command == "ping":
            return "ok pong"
        if command == "help":
            return "ok " + _CONTROL_HELP
        if not args:
            raise FaultProxyError("missing ROUTE")
        name = args[0]
        if name == "*":
            targets = list(proxies.values())
        elif name in proxies:
            targets = [proxies[name]]
        else:
            raise FaultProxyError(f"no route named {name[:64]!r}")
        rest = args[1:]
        if command == "stats":
            stats = {
                key: dataclasses.asdict(proxies[key].stats) for key in proxies if name in ("*", key)
            }
            return "ok " + json.dumps(stats, sort_keys=True)
        for proxy in targets:
            _apply(proxy, command, rest)
    except FaultProxyError as exc:
        return f"error {exc}"
    return "ok"


def _apply(proxy: FaultProxy, command: str, rest: list[str]) -> None:
    if command == "delay" and len(rest) in (2, 3):
        jitter = _parse_number(rest[2], "jitter") if len(rest) == 3 else 0.0
        proxy.set_delay(_parse_number(rest[1], "delay"), jitter, _parse_direction(rest[0]))
    elif command == "drop" and len(rest) == 2:
        proxy.set_drop(_parse_number(rest[1], "probability"), _parse_direction(rest[0]))
    elif command == "partition" and len(rest) in (1, 2) and rest[1:] in ([], ["cut"]):
        proxy.partition(_parse_direction(rest[0]), cut=rest[1:] == ["cut"])
    elif command in ("heal", "cut", "reset") and not rest:
        {"heal": proxy.heal, "cut": proxy.cut_all, "reset": proxy.reset}[command]()
    else:
        raise FaultProxyError(f"bad command or arguments; {_CONTROL_HELP}")


async def _serve_control(
    stream: trio.SocketStream, proxies: dict[str, FaultProxy], stop: trio.CancelScope
) -> None:
    buffer = b""
    async with stream:
        while True:
            data = await stream.receive_some(_MAX_CONTROL_LINE)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                line = raw.decode("utf-8", "replace").strip()
                if line.lower() == "quit":
                    await stream.send_all(b"ok bye\n")
                    stop.cancel()
                    return
                await stream.send_all(execute(proxies, line).encode() + b"\n")
            if len(buffer) > _MAX_CONTROL_LINE:
                await stream.send_all(b"error line too long\n")
                return


async def _watch_stdin(stop: trio.CancelScope) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some(_CHUNK):
            pass
    stop.cancel()


async def serve_process(args: argparse.Namespace) -> None:
    """Run the proxies named by `args` until quit, lifetime or stdin EOF."""
    routes = [(name, listen, target, "tcp") for name, listen, target in args.tcp or []]
    routes += [(name, listen, target, "udp") for name, listen, target in args.udp or []]
    if not routes:
        raise FaultProxyError("no route: give --tcp and/or --udp")
    proxies: dict[str, FaultProxy] = {}
    for index, (name, listen, target, protocol) in enumerate(routes):
        if name in proxies or name == "*":
            raise FaultProxyError(f"route name {name!r} is reserved or given twice")
        proxies[name] = FaultProxy(
            parse_address(listen),
            parse_address(target),
            "tcp" if protocol == "tcp" else "udp",
            seed=args.seed + index,
        )
    control_host, control_port = parse_address(args.control)
    with trio.move_on_after(args.lifetime) as stop:
        async with trio.open_nursery() as nursery:
            addresses = {}
            for name, proxy in proxies.items():
                host, port = await nursery.start(proxy.run)
                addresses[name] = f"{host}:{port}"
            listeners = await trio.open_tcp_listeners(control_port, host=control_host)
            control_port = listeners[0].socket.getsockname()[1]

            async def control_handler(stream: trio.SocketStream) -> None:
                await _serve_control(stream, proxies, stop)

            nursery.start_soon(trio.serve_listeners, control_handler, listeners)
            if args.exit_on_stdin_eof:
                nursery.start_soon(_watch_stdin, stop)
            print(json.dumps({"control": control_port, "routes": addresses}), flush=True)


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faultproxy",
        description="Loopback-only TCP/UDP fault proxy for gcks tests. " + _CONTROL_HELP,
    )
    parser.add_argument("--tcp", nargs=3, action="append", metavar=("NAME", "LISTEN", "TARGET"))
    parser.add_argument("--udp", nargs=3, action="append", metavar=("NAME", "LISTEN", "TARGET"))
    parser.add_argument("--control", default="127.0.0.1:0", help="HOST:PORT of the control port")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=600.0, help="exit after this many s")
    parser.add_argument("--exit-on-stdin-eof", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _argument_parser().parse_args(argv)
    try:
        trio.run(serve_process, args)
    except FaultProxyError as exc:
        print(f"faultproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


# ---------------------------------------------------------------------------
# Test-side client for the process mode


class ProxyControl:
    """Commands to a proxy process over its control port (one connection each)."""

    def __init__(self, port: int, routes: dict[str, tuple[str, int]]) -> None:
        self.port = port
        self.routes = routes  # name -> listen address to give to clients

    async def command(self, line: str) -> str:
        """Send one command line; the reply after "ok" (raises on "error")."""
        if "\n" in line:
            raise FaultProxyError("one command per call")
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            async with stream:
                await stream.send_all(line.encode() + b"\n")
                reply = b""
                while not reply.endswith(b"\n"):
                    data = await stream.receive_some(_MAX_CONTROL_LINE * 64)
                    if not data:
                        break
                    reply += data
        text = reply.decode().strip()
        if not text.startswith("ok"):
            raise FaultProxyError(f"{line!r}: {text or 'no reply'}")
        return text[3:]

    async def set_delay(
        self, route: str, delay_ms: float, jitter_ms: float = 0.0, direction: Direction = "both"
    ) -> None:
        await self.command(f"delay {route} {direction} {delay_ms} {jitter_ms}")

    async def set_drop(self, route: str, probability: float, direction: Direction = "both") -> None:
        await self.command(f"drop {route} {direction} {probability}")

    async def partition(
        self, route: str, direction: Direction = "both", *, cut: bool = False
    ) -> None:
        await self.command(f"partition {route} {direction}" + (" cut" if cut else ""))

    async def heal(self, route: str = "*") -> None:
        await self.command(f"heal {route}")

    async def cut_all(self, route: str = "*") -> None:
        await self.command(f"cut {route}")

    async def reset(self, route: str = "*") -> None:
        await self.command(f"reset {route}")

    async def stats(self, route: str) -> ProxyStats:
        values = json.loads(await self.command(f"stats {route}"))
        return ProxyStats(**values[route])


@contextlib.asynccontextmanager
async def spawn_fault_proxy(
    tcp: Sequence[tuple[str, tuple[str, int], tuple[str, int]]] = (),
    udp: Sequence[tuple[str, tuple[str, int], tuple[str, int]]] = (),
    *,
    seed: int = 0,
    lifetime_s: float = 300.0,
) -> AsyncIterator[ProxyControl]:
    """Run `python -m tests.faultproxy` with routes (name, listen, target) and
    yield its control client; the process is stopped (killed if it must) on exit
    and, should this test process die, exits itself when its stdin closes."""
    command = [sys.executable, "-m", "tests.faultproxy", "--exit-on-stdin-eof"]
    command += ["--seed", str(seed), "--lifetime", str(lifetime_s)]
    for flag, routes in (("--tcp", tcp), ("--udp", udp)):
        for name, listen, target in routes:
            command += [flag, name, f"{listen[0]}:{listen[1]}", f"{target[0]}:{target[1]}"]
    process = await trio.lowlevel.open_process(
        command, cwd=_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                data = await process.stdout.receive_some(4096)
                if not data:
                    raise FaultProxyError(f"proxy exited before it was ready: {process.poll()}")
                line += data
        ready = json.loads(line)
        listening = {name: parse_address(address) for name, address in ready["routes"].items()}
        control = ProxyControl(int(ready["control"]), listening)
        yield control
        with contextlib.suppress(FaultProxyError, OSError, trio.TooSlowError):
            await control.command("quit")
        with trio.move_on_after(5):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    await pipe.aclose()


if __name__ == "__main__":
    sys.exit(main())
