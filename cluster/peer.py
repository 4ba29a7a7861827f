"""The mTLS peer transport: opaque frames between GCKS nodes, a thin trio driver.

Each node listens for peers and dials every other node in its address book, so
every ordered pair of nodes has one TLS 1.3 connection, written by the dialer
only (as etcd's stream transport does). Payloads are opaque bytes (Raft
messages encoded elsewhere) in length-prefixed frames (`gcks.proto.codec`).

- Inbound: the TLS handshake runs under `handshake_timeout_ms`; right after it
  `verify_peer` requires the node role and an id in the address book; at most
  `max_pending_handshakes` unauthenticated handshakes run at once. Anything
  else - a member or admin certificate, a foreign or self-signed one, an
  expired one, an unknown node id - is refused, counted and logged, and the
  connection closed before a byte of payload is read. Frames are delivered as
  `(from_id, payload)` to `incoming`; `from_id` is the authenticated identity,
  so the consumer must check that a decoded message claims the same sender. A
  new connection from a node replaces its older one, so a node holds at most
  one inbound link per peer however often that peer reconnects.
- Outbound: one task per peer with a bounded send queue (frames and bytes).
  `send()` never blocks and never grows memory: when the queue is full the
  OLDEST frame is dropped and counted (for Raft the newest message matters
  most). The task dials under `connect_timeout_ms`, handshakes under
  `handshake_timeout_ms`, checks that the server is the node it dialed, writes
  under `write_timeout_ms`, and after any failure waits a capped exponential
  backoff with jitter before it dials again, cut short when that peer
  connects to us (a restarted node is reachable both ways at once).
- Liveness: an idle outbound link carries an empty keepalive frame every
  `keepalive_ms`; an inbound link silent for `idle_timeout_ms` is closed, so a
  peer that vanished without closing its socket does not pin a connection.
  Empty frames are the transport's own and never delivered.

Everything runs inside `run()`, started in a nursery the caller owns
(`await nursery.start(transport.run)`); cancelling that nursery stops every
task and closes every socket. May import trio, `gcks.proto` and `gcks.cluster`
(config, tls). Never logs payloads.
"""

from __future__ import annotations

import logging
import math
import random
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from gcks.cluster.config import Address, PeerLinkConfig
from gcks.cluster.tls import verify_peer
from gcks.proto.codec import FrameDecoder, encode_frame
from gcks.proto.errors import DecodeError, IdentityError
from gcks.proto.identity import Role, is_valid_id

log = logging.getLogger(__name__)

_RECEIVE_CHUNK = 64 * 1024
# Frames written in one TLS record batch: large enough to amortise the write,
# small enough that the write deadline stays meaningful.
_BATCH_BYTES = 256 * 1024
_KEEPALIVE = encode_frame(b"")


@dataclass
class PeerStats:
    """Counters of one outbound link (exported as metrics)."""

    frames_sent: int = 0
    bytes_sent: int = 0
    frames_dropped: int = 0
    connects: int = 0
    connect_failures: int = 0
    handshake_failures: int = 0
    disconnects: int = 0
    connected: bool = False
    queued_frames: int = 0
    queued_bytes: int = 0


@dataclass
class ListenerStats:
    """Counters of the peer listener."""

    accepted: int = 0
    handshake_failures: int = 0
    refused: int = 0
    frames_received: int = 0
    decode_errors: int = 0
    idle_timeouts: int = 0


@dataclass
class TransportStats:
    """Every counter of a transport: the listener and one `PeerStats` per peer ever dialed."""

    listener: ListenerStats = field(default_factory=ListenerStats)
    peers: dict[str, PeerStats] = field(default_factory=dict)


class _SendQueue:
    """A FIFO of encoded frames bounded in count and bytes; one consumer."""

    def __init__(self, max_frames: int, max_bytes: int, stats: PeerStats) -> None:
        self._frames: deque[bytes] = deque()
        self._bytes = 0
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._stats = stats
        self._nonempty = trio.Event()

    def put(self, frame: bytes) -> None:
        while self._frames and (
            len(self._frames) >= self._max_frames or self._bytes + len(frame) > self._max_bytes
        ):
            self._bytes -= len(self._frames.popleft())
            self._stats.frames_dropped += 1
        self._frames.append(frame)
        self._bytes += len(frame)
        self._update_stats()
        self._nonempty.set()

    def _update_stats(self) -> None:
        self._stats.queued_frames = len(self._frames)
        self._stats.queued_bytes = self._bytes

    async def take(self, max_bytes: int, timeout_s: float) -> list[bytes]:
        """Frames from the head: at least one, and at most `max_bytes` unless the first
        alone is larger; none if none came within `timeout_s`. No checkpoint after
        the wait, so a cancel never loses frames."""
        if not self._frames:
            # A timeout scope only when there is something to wait for: a busy
            # link takes frames without one.
            with trio.move_on_after(timeout_s):
                while not self._frames:
                    self._nonempty = trio.Event()
                    await self._nonempty.wait()
        batch: list[bytes] = []
        size = 0
        while self._frames and (not batch or size + len(self._frames[0]) <= max_bytes):
            frame = self._frames.popleft()
            batch.append(frame)
            size += len(frame)
        self._bytes -= size
        self._update_stats()
        return batch


@dataclass
class _Link:
    """The outbound side of one peer: its address, queue, counters and task scope."""

    peer_id: str
    address: Address
    queue: _SendQueue
    stats: PeerStats
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    failing: bool = False
    # The backoff sleep before the next dial, while there is one: cancelled
    # when the peer connects to us, which proves it is up again.
    backoff: trio.CancelScope | None = None


class PeerTransport:
    """Frames to and from the other nodes of the address book; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        listen: Address,
        peers: Mapping[str, Address],
        *,
        server_context: ssl.SSLContext,
        client_context: ssl.SSLContext,
        settings: PeerLinkConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not is_valid_id(node_id):
            raise ValueError(f"invalid node id {node_id!r}")
        self.node_id = node_id
        self._listen = listen
        self._server_context = server_context
        self._client_context = client_context
        self._settings = settings or PeerLinkConfig()
        self._rng = rng or random.SystemRandom()
        self.stats = TransportStats()
        self._links: dict[str, _Link] = {}
        self._inbound: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._started = False
        self._handshake_slots = trio.CapacityLimiter(self._settings.max_pending_handshakes)
        self._incoming_send, self.incoming = trio.open_memory_channel[tuple[str, bytes]](
            self._settings.receive_queue_frames
        )
        self.set_peers(peers)

    # -- public API -------------------------------------------------------------

    def set_peers(self, peers: Mapping[str, Address]) -> None:
        """Replace the address book (this node's own entry is ignored): new peers are
        dialed, removed ones hung up on and refused from now on, moved ones redialed."""
        wanted = {i: a for i, a in peers.items() if i != self.node_id}
        for peer_id in wanted:
            if not is_valid_id(peer_id):
                raise ValueError(f"invalid peer id {peer_id!r}")
        for peer_id, link in list(self._links.items()):
            if wanted.get(peer_id) != link.address:
                link.scope.cancel()
                del self._links[peer_id]
                if peer_id not in wanted and (scope := self._inbound.get(peer_id)):
                    scope.cancel()
        for peer_id, address in wanted.items():
            if peer_id not in self._links:
                stats = self.stats.peers.setdefault(peer_id, PeerStats())
                settings = self._settings
                queue = _SendQueue(settings.send_queue_frames, settings.send_queue_bytes, stats)
                self._links[peer_id] = link = _Link(peer_id, address, queue, stats)
                if self._nursery is not None:
                    self._nursery.start_soon(self._run_link, link)

    def send(self, peer_id: str, payload: bytes) -> bool:
        """Queue `payload` for `peer_id` without blocking; False if the peer is unknown.
        When the peer's queue is full the oldest queued frame is dropped (and counted).
        Raises `ValueError` for an empty or oversize payload: a local bug."""
        if not payload:
            raise ValueError("empty payloads are reserved for keepalives")
        link = self._links.get(peer_id)
        if link is None:
            return False
        link.queue.put(encode_frame(payload, max_size=self._settings.max_frame_bytes))
        return True

    @property
    def peer_ids(self) -> frozenset[str]:
        return frozenset(self._links)

    async def run(
        self, *, task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and dial until cancelled; call once per transport (a restarted node
        makes a new one). Reports the bound listen addresses as its start value; when
        it returns, `incoming` ends."""
        if self._started:
            raise RuntimeError("PeerTransport.run() may be called only once")
        self._started = True
        listeners = await trio.open_tcp_listeners(self._listen.port, host=self._listen.host)
        bound = [_bound_address(listener) for listener in listeners]
        log.info("peer listener of %s on %s", self.node_id, ", ".join(map(str, bound)))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for link in self._links.values():
                    nursery.start_soon(self._run_link, link)
                await nursery.start(trio.serve_listeners, self._handle_inbound, listeners)
                task_status.started(bound)
        finally:
            self._nursery = None
            # Consumers iterating over `incoming` see the end instead of waiting forever.
            self._incoming_send.close()

    # -- outbound ----------------------------------------------------------------

    async def _run_link(self, link: _Link) -> None:
        settings = self._settings
        attempt = 0
        with link.scope:
            while True:
                stream = await self._dial(link)
                if stream is not None:
                    started = trio.current_time()
                    await self._pump(link, stream)
                    # A link that stayed up for a while earns a fresh backoff; one that
                    # breaks at once (e.g. the peer refuses our certificate) backs off.
                    if trio.current_time() - started >= settings.backoff_max_ms / 1000:
                        attempt = 0
                with trio.CancelScope() as link.backoff:
                    await trio.sleep(backoff_delay(attempt, settings, self._rng))
                link.backoff = None
                attempt += 1

    async def _dial(self, link: _Link) -> trio.SSLStream[trio.SocketStream] | None:
        settings = self._settings
        address = link.address
        try:
            with trio.fail_after(settings.connect_timeout_ms / 1000):
                tcp = await trio.open_tcp_stream(address.host, address.port)
        except (OSError, trio.TooSlowError) as exc:
            link.stats.connect_failures += 1
            self._report_failure(link, f"cannot connect to {address}: {_reason(exc)}")
            return None
        stream = trio.SSLStream(tcp, self._client_context, server_hostname=None)
        try:
            with trio.fail_after(settings.handshake_timeout_ms / 1000):
                await stream.do_handshake()
            verify_peer(stream, Role.NODE, expected_id=link.peer_id)
        except (trio.BrokenResourceError, trio.TooSlowError, IdentityError) as exc:
            link.stats.handshake_failures += 1
            await trio.aclose_forcefully(stream)
            self._report_failure(link, f"TLS with {address} failed: {_reason(exc)}", always=True)
            return None
        link.stats.connects += 1
        link.stats.connected = True
        link.failing = False
        log.info("peer link %s -> %s connected to %s", self.node_id, link.peer_id, address)
        return stream

    def _report_failure(self, link: _Link, message: str, *, always: bool = False) -> None:
        # A down peer is retried for as long as it is down: say so once, then quietly.
        level = logging.WARNING if always or not link.failing else logging.DEBUG
        link.failing = True
        log.log(level, "peer link %s -> %s: %s", self.node_id, link.peer_id, message)

    async def _pump(self, link: _Link, stream: trio.SSLStream[trio.SocketStream]) -> None:
        """Write queued frames until the connection fails; then close it."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, link, stream, nursery.cancel_scope)
                await self._write_frames(link, stream)
                nursery.cancel_scope.cancel()
        finally:
            link.stats.connected = False
            link.stats.disconnects += 1
            await trio.aclose_forcefully(stream)

    async def _write_frames(self, link: _Link, stream: trio.SSLStream[trio.SocketStream]) -> None:
        settings = self._settings
        in_flight = 0
        # One deadline scope for the link's life, armed only during a write:
        # cheaper than a fresh `fail_after` per write (as in the registrar).
        deadline = trio.CancelScope()
        try:
            with deadline:
                while True:
                    batch = await link.queue.take(_BATCH_BYTES, settings.keepalive_ms / 1000)
                    in_flight = len(batch)
                    data = b"".join(batch) if batch else _KEEPALIVE
                    deadline.deadline = trio.current_time() + settings.write_timeout_ms / 1000
                    await stream.send_all(data)
                    deadline.deadline = math.inf
                    link.stats.frames_sent += in_flight
                    link.stats.bytes_sent += len(data)
                    in_flight = 0
            reason = "write timed out"  # only the deadline ends the loop without an error
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = _reason(exc)
        finally:
            # Frames in a failed (or cancelled) write may or may not have arrived: count
            # them as dropped; Raft retransmits what matters.
            link.stats.frames_dropped += in_flight
        log.warning("peer link %s -> %s lost while writing: %s", self.node_id, link.peer_id, reason)

    async def _watch(
        self,
        link: _Link,
        stream: trio.SSLStream[trio.SocketStream],
        scope: trio.CancelScope,
    ) -> None:
        """Read the write-only link: the listener never sends, so any end, error or byte
        means the link is gone (this is also how a refused client certificate shows)."""
        try:
            data = await stream.receive_some(_RECEIVE_CHUNK)
            reason = "closed by the peer" if not data else "unexpected bytes from the listener"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = _reason(exc)
        log.warning("peer link %s -> %s lost: %s", self.node_id, link.peer_id, reason)
        scope.cancel()

    # -- inbound -----------------------------------------------------------------

    async def _handle_inbound(self, tcp: trio.SocketStream) -> None:
        stats = self.stats.listener
        stats.accepted += 1
        remote = _remote(tcp)
        try:
            # Unauthenticated handshakes cost CPU and memory: cap how many run at once.
            self._handshake_slots.acquire_nowait()
        except trio.WouldBlock:
            stats.handshake_failures += 1
            log.warning("peer link from %s refused: too many handshakes in progress", remote)
            await trio.aclose_forcefully(tcp)
            return
        stream = trio.SSLStream(tcp, self._server_context, server_side=True)
        try:
            with trio.fail_after(self._settings.handshake_timeout_ms / 1000):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            stats.handshake_failures += 1
            log.warning("peer link from %s refused: TLS handshake: %s", remote, _reason(exc))
            await trio.aclose_forcefully(stream)
            return
        finally:
            self._handshake_slots.release()
        try:
            identity = verify_peer(stream, Role.NODE, allowed_ids=self._links.keys())
        except IdentityError as exc:
            stats.refused += 1
            log.warning("peer link from %s refused: %s", remote, exc)
            await trio.aclose_forcefully(stream)
            return
        log.info("peer link %s <- %s accepted from %s", self.node_id, identity.id, remote)
        if (link := self._links.get(identity.id)) is not None and link.backoff is not None:
            # A restarted peer dials us at once; without this our side of the
            # pair would stay down for the rest of its backoff (up to
            # backoff_max_ms), and with it, our view of whether the peer is up.
            link.backoff.cancel()
        with trio.CancelScope() as scope:
            if (older := self._inbound.get(identity.id)) is not None:
                older.cancel()
            self._inbound[identity.id] = scope
            try:
                await self._read_frames(identity.id, stream)
            finally:
                if self._inbound.get(identity.id) is scope:
                    del self._inbound[identity.id]
        await trio.aclose_forcefully(stream)

    async def _read_frames(self, peer_id: str, stream: trio.SSLStream[Any]) -> None:
        stats = self.stats.listener
        decoder = FrameDecoder(self._settings.max_frame_bytes)
        idle_timeout = self._settings.idle_timeout_ms / 1000
        try:
            while True:
                with trio.move_on_after(idle_timeout) as idle:
                    data = await stream.receive_some(_RECEIVE_CHUNK)
                if idle.cancelled_caught:
                    stats.idle_timeouts += 1
                    log.warning("peer link %s <- %s idle, closed", self.node_id, peer_id)
                    return
                if not data:
                    decoder.feed_eof()
                    log.info("peer link %s <- %s closed by the peer", self.node_id, peer_id)
                    return
                decoder.feed(bytes(data))
                for payload in decoder:
                    if payload:  # empty frames are keepalives
                        stats.frames_received += 1
                        await self._incoming_send.send((peer_id, payload))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("peer link %s <- %s lost: %s", self.node_id, peer_id, _reason(exc))
        except DecodeError as exc:
            stats.decode_errors += 1
            log.warning("peer link %s <- %s dropped: %s", self.node_id, peer_id, exc)


def backoff_delay(attempt: int, settings: PeerLinkConfig, rng: random.Random) -> float:
    """Seconds to wait before redial number `attempt` (0-based): capped exponential
    backoff with "equal jitter", a random delay in [d/2, d] with d = min(max, min x 2^n).
    The jitter keeps nodes that lost a peer together from redialing in lockstep."""
    delay_ms = min(settings.backoff_max_ms, settings.backoff_min_ms << min(attempt, 32))
    return delay_ms * (0.5 + 0.5 * rng.random()) / 1000


def _bound_address(listener: trio.SocketListener) -> Address:
    host, port = listener.socket.getsockname()[:2]
    return Address(str(host), int(port))


def _remote(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "<unknown>"
    return str(Address(str(host), int(port)))


def _reason(exc: BaseException) -> str:
    """What went wrong, for a log line: the SSL error under trio's wrapper if any."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, trio.BrokenResourceError) and isinstance(cause, OSError):
        return f"{type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
