"""The group member: registers with the nearest node and keeps its GSA current.

`async with Member(config) as m:` probes every known node (median RTT over
`probe.count` probes), registers with the fastest (a sender first makes its own
Ed25519 key pair and sends the public half), joins the group's multicast
address on the configured interface and reads the unicast pushes of its
session. Every rekey datagram, from either path and from any node, goes to
`GroupKeys.handle_rekey`, which accepts each message id once and drops copies
by their clear header before any cryptography. A message that arrives past a
gap is held for `rekey.gap_wait_ms` while the missing ones may still come by
the other path, then applied in order. What it cannot follow exactly (a gap
still open after that wait, an unknown KEK SPI, an LKH update that does not
unwrap, or TEKs running out with no successor) makes the member re-register
with its last message id rather than guess. A signed termination drops every
key and ends the member.

Node choice follows `gcks.member.ranking`: a lost connection or a registration
deadline fails over to the next node in the ranking at once; periodic probe
rounds switch only on a clear, stable gain. All nodes hand out the same keys,
so a switch is only a new registration. Every decision is an event:

    {"event": "registered", "group", "node", "rtt_ms": {node: ms}, "msg_id", "kek", "tek"}
    {"event": "rekey", "group", "node", "msg_id", "kek", "tek"}
    {"event": "duplicate", "group", "node", "msg_id", "count"}
    {"event": "resync", "group", "node", "msg_id", "reason"}
    {"event": "failover", "group", "from", "to", "reason", "rtt_ms"}
    {"event": "left", "group", "reason"}

`node` is the session's node id for pushes and "multicast" for the multicast
copy; `kek` and `tek` are fingerprints (`tek`: the TEK a sender would use now,
or null). Key activation times are wall-clock milliseconds set by the nodes,
so `protect` and `unprotect` read the wall clock.

The trio driver around the sans-IO parts (`group`, `ranking`); may import
trio, `gcks.proto` and `gcks.member`. Must never import `gcks.cluster`, log or
emit a key (fingerprints only), or leave a task without an owner.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gcks.member.config import MemberConfig
from gcks.member.datagram import MAX_DATAGRAM, DatagramError, open_multicast_socket
from gcks.member.discovery import (
    Candidate,
    Discovery,
    DiscoveryError,
    DnsConfig,
    Resolver,
    resolve_addresses,
)
from gcks.member.group import GroupKeys, Outcome
from gcks.member.probe import ProbeConfig, Prober, open_probe_socket
from gcks.member.ranking import Choice, Ranking, RankingConfig
from gcks.member.session import Refused, Session, SessionError
from gcks.member.tls import MemberTls
from gcks.proto.errors import DecodeError, ProtocolError
from gcks.proto.messages import ErrorCode, NodeEndpoint
from gcks.proto.policy import MulticastEndpoint, Role
from gcks.proto.rekey import parse_rekey_header

__all__ = ["Event", "Member", "MemberError", "MemberStats", "wall_clock_ms"]

log = logging.getLogger(__name__)

Event = dict[str, object]

MULTICAST: Final = "multicast"
"""The `node` of a rekey that arrived by IP multicast."""

# Refusals that another node or a retry will not change: the member stops.
_FATAL_REFUSALS: Final = frozenset(
    {
        ErrorCode.UNAUTHORIZED,
        ErrorCode.UNKNOWN_GROUP,
        ErrorCode.BAD_REQUEST,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.GROUP_FULL,
    }
)
# How often TEK/KEK lifetimes are checked against `rekey.resync_margin_ms`:
# a local computation, no network wait.
_EXPIRY_CHECK_S: Final = 1.0
_MULTICAST_RETRY_S: Final = 5.0  # first wait to join the group again, doubling ...
_MULTICAST_RETRY_MAX_S: Final = 60.0  # ... up to this (one warning a minute at most)
_EVENT_BUFFER: Final = 10_000
# Rekey datagrams held while a (re-)registration is in flight, then replayed
# against the keys it brings: a message that overtakes the answer is not lost.
_HELD_DATAGRAMS: Final = 256
# Authentic rekey datagrams that arrived past a gap, held (by message id) for
# `rekey.gap_wait_ms` while the missing ones may still come by the other path.
_AHEAD_DATAGRAMS: Final = 64
_DEREGISTERED: Final = "deregistered"


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch: the clock of key activation and expiry."""
    return time.time_ns() // 1_000_000


class MemberError(Exception):
    """The member cannot do what was asked (not registered, refused, no node
    reachable); the message says why."""


@dataclass(slots=True)
class MemberStats:
    """Counters over the member's life (for tests, metrics and the CLI)."""

    registrations: int = 0
    rekeys: int = 0
    duplicates: int = 0
    bad_rekeys: int = 0  # datagrams that were not an authentic rekey of the group
    resyncs: int = 0
    ahead: int = 0  # datagrams that arrived before one still missing (held for it)
    failovers: int = 0
    events_dropped: int = 0  # oldest events dropped because nobody read them


class _Kind(enum.Enum):
    RESYNC = "resync"
    LOST = "lost"
    SWITCH = "switch"


@dataclass(frozen=True, slots=True)
class _Request:
    """Work for the supervisor task, which alone (re-)registers."""

    kind: _Kind
    node: str = ""
    reason: str = ""
    msg_id: int = 0  # RESYNC: the message that could not be followed (0: lifetimes)
    choice: Choice | None = None
    session: Session | None = None  # LOST: the session that ended
    registrations: int = 0  # RESYNC: registrations done when it was asked (`_ask_resync`)


@dataclass(frozen=True, slots=True)
class _Ahead:
    """An authentic rekey datagram that arrived past a gap, and when (trio clock)."""

    datagram: bytes
    source: str
    arrived_s: float


class _Left(Exception):
    """Internal: the member is out of the group (refused or terminated)."""


class Member:
    """One member of one group; see the module docstring. Single use: `async
    with` it once; `__aenter__` returns once registered, or raises `MemberError`."""

    def __init__(
        self,
        config: MemberConfig,
        *,
        multicast: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        resolver: Resolver = resolve_addresses,
        ranking: RankingConfig | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        """`multicast=False` relies on unicast pushes alone (networks that IP
        multicast does not reach). Raises `MemberTlsError` for unusable TLS files."""
        self.config = config
        self._multicast = multicast
        # A member process reloads its TLS files when they change; tests and
        # benchmarks pass one fixed context.
        self.tls: MemberTls | None = None
        if ssl_context is None:
            self.tls = MemberTls(
                cluster_ca=config.tls.cluster_ca, cert=config.tls.cert, key=config.tls.key
            )
            self._tls_context: Callable[[], ssl.SSLContext] = self.tls.context
        else:
            self._tls_context = lambda: ssl_context
        if config.discovery is not None:
            dns = config.discovery
            self._discovery = Discovery.dns(
                DnsConfig(dns.dns, dns.member_port, dns.probe_port, dns.interval_s, dns.timeout_s),
                resolver,
            )
        else:
            self._discovery = Discovery.static(config.nodes)
        self._endpoints: dict[str, NodeEndpoint] = {n.node_id: n for n in config.nodes}
        probe = config.probe
        self.ranking = Ranking(
            ranking
            or RankingConfig(
                window=probe.count,
                switch_ratio=probe.switch_margin,
                switch_min_ms=probe.switch_min_ms,
            ),
            nodes=self._endpoints,
        )
        self._probe_config = ProbeConfig(
            probes_per_round=probe.count, timeout_s=probe.timeout_ms / 1000
        )
        self._register_timeout_s = config.rekey.register_timeout_ms / 1000
        self._clock_ms = clock_ms
        self._signer = Ed25519PrivateKey.generate() if config.role is Role.SENDER else None
        self.stats = MemberStats()
        self.left_reason: str | None = None
        self._keys: GroupKeys | None = None
        self._attaching = False
        self._held: deque[tuple[bytes, str]] = deque(maxlen=_HELD_DATAGRAMS)
        self._gap_wait_s = config.rekey.gap_wait_ms / 1000
        self._ahead: dict[int, _Ahead] = {}  # by message id
        self._gap_timer = False  # a `_resync_unless_filled` task is waiting
        self._registered_s = -math.inf  # trio time of the last registration
        self._session: Session | None = None
        self._session_scope: trio.CancelScope | None = None
        self._multicast_endpoint: MulticastEndpoint | None = None
        self._multicast_scope: trio.CancelScope | None = None
        self._events: deque[Event] = deque(maxlen=_EVENT_BUFFER)
        self._events_changed = trio.lowlevel.ParkingLot()
        self._events_closed = False
        self._send_request, self._requests = trio.open_memory_channel[_Request](math.inf)
        self._prober: Prober | None = None
        self._probe_lock = trio.Lock()
        self._tasks_done = trio.Event()
        self._tasks: trio.Nursery | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    # ----------------------------------------------------------------- public

    @property
    def gsa(self) -> GroupKeys:
        """The group's keys and policy as this member holds them now (after
        leaving: as they were, or none after a termination). `MemberError`
        before the first registration."""
        if self._keys is None:
            raise MemberError("not registered")
        return self._keys

    @property
    def node(self) -> str | None:
        """The node of the current registration session (None once left)."""
        return None if self._session is None else self._session.node_id

    @property
    def left(self) -> bool:
        return self.left_reason is not None

    def protect(self, payload: bytes) -> bytes:
        """A data packet carrying `payload` under the TEK active now (senders only)."""
        try:
            return self.gsa.protect(payload, self._clock_ms())
        except (PermissionError, LookupError) as exc:
            raise MemberError(str(exc)) from None

    def unprotect(self, packet: bytes) -> tuple[int, bytes]:
        """(sender id, payload) of a data packet; `ProtocolError` if it does not verify."""
        return self.gsa.unprotect(packet, self._clock_ms())

    async def events(self) -> AsyncIterator[Event]:
        """Events in order (see the module docstring), until the member is closed.
        One reader: events are consumed as they are yielded."""
        while True:
            while self._events:
                yield self._events.popleft()
            if self._events_closed:
                return
            await self._events_changed.park()

    def receive_rekey(self, datagram: bytes, source: str) -> None:
        """Take in a rekey datagram obtained by other means (an application relay),
        exactly as if it had arrived by multicast; `source` names it in events."""
        self._on_datagram(datagram, source)

    # --------------------------------------------------------------- lifetime

    async def __aenter__(self) -> Self:
        if self._prober is not None:
            raise RuntimeError("a Member is entered once; make a new one to join again")
        stack = contextlib.AsyncExitStack()
        try:
            nursery = await stack.enter_async_context(trio.open_nursery())
            sock = stack.enter_context(open_probe_socket())
            self._prober = Prober(sock, self._probe_config)
            await self._first_registration()
            await nursery.start(self._run)
        except BaseException:
            if self._session is not None:
                await self._session.aclose()
                self._session = None
            await stack.aclose()
            self._close_events()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Shielded but bounded: a cancelled caller (Ctrl-C) still deregisters.
        with trio.CancelScope(shield=True):
            if self._tasks is not None:
                self._tasks.cancel_scope.cancel()
                # The push reader must be gone before deregistration reads the stream.
                await self._tasks_done.wait()
            await self._deregister()
        stack, self._stack = self._stack, None
        assert stack is not None
        try:
            # The background nursery is empty by now; the caller's own exception,
            # if any, propagates as it is (not wrapped in an exception group).
            await stack.aclose()
        finally:
            self._close_events()

    async def _deregister(self) -> None:
        session, self._session = self._session, None
        if self._session_scope is not None:
            self._session_scope.cancel()
        if session is None:
            return
        reason = _DEREGISTERED
        try:
            if not self.left:
                await session.deregister(self.config.group, timeout_s=self._register_timeout_s)
        except SessionError as exc:
            log.warning("deregistration at %s failed: %s", session.node_id, exc)
            reason = f"left without deregistering: {exc}"
        finally:
            await session.aclose()
        self._leave(reason)

    # ------------------------------------------------------------- background

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                session = self._session
                assert session is not None
                await tasks.start(self._read_pushes, session)
                self._ensure_multicast()
                tasks.start_soon(self._supervise)
                tasks.start_soon(self._probe_periodically)
                tasks.start_soon(self._watch_lifetimes)
                if self.config.discovery is not None:
                    tasks.start_soon(self._discovery.watch, self._on_candidates)
                task_status.started()
        finally:
            self._tasks = None  # closed: nothing may be started in it any more
            self._tasks_done.set()

    def _on_candidates(self, _candidates: tuple[Candidate, ...]) -> None:
        # The next probe round takes the new list; nothing to do before it.
        log.info("discovery: %d candidate nodes", len(self._discovery.candidates))

    async def _read_pushes(
        self, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.CancelScope() as scope:
            self._session_scope = scope
            task_status.started()
            reason = f"{session.node_id} closed the connection"
            try:
                async for datagram in session.pushes():
                    self._on_datagram(datagram, session.node_id)
            except SessionError as exc:
                reason = str(exc)
            if self._session is session:  # not a session being replaced or closed
                self._post(
                    _Request(_Kind.LOST, node=session.node_id, reason=reason, session=session)
                )

    def _ensure_multicast(self) -> None:
        """Listen on the group's multicast endpoint, following policy changes."""
        if not self._multicast or self._tasks is None or self._keys is None:
            return
        endpoint = self._keys.policy.multicast
        if endpoint == self._multicast_endpoint:
            return
        if self._multicast_scope is not None:
            self._multicast_scope.cancel()
        self._multicast_endpoint = endpoint
        scope = self._multicast_scope = trio.CancelScope()
        self._tasks.start_soon(self._read_multicast, endpoint, scope)

    async def _read_multicast(self, endpoint: MulticastEndpoint, scope: trio.CancelScope) -> None:
        with scope:
            # An interface that is not up yet (a pod's network still coming up)
            # must not leave the member on pushes for good: try again, less often.
            delay = _MULTICAST_RETRY_S
            while True:
                try:
                    sock = await open_multicast_socket(
                        str(endpoint.address),
                        endpoint.port,
                        self.config.rekey.multicast_interface,
                        self.config.rekey.multicast_interface6,
                    )
                    break
                except DatagramError as exc:
                    log.warning(
                        "no multicast rekeys for now (unicast pushes only), "
                        "trying again in %.0f s: %s",
                        delay,
                        exc,
                    )
                await trio.sleep(delay)
                delay = min(2 * delay, _MULTICAST_RETRY_MAX_S)
            with sock:
                while True:
                    try:
                        datagram, _source = await sock.recvfrom(MAX_DATAGRAM)
                    except OSError as exc:
                        log.debug("multicast receive error: %s", exc)
                        continue
                    self._on_datagram(datagram, MULTICAST)

    async def _probe_periodically(self) -> None:
        while True:
            await trio.sleep(self.config.probe.interval_s)
            await self._probe_round()
            choice = self.ranking.on_round_complete(trio.current_time())
            if choice is not None:
                self._post(_Request(_Kind.SWITCH, node=choice.node_id, choice=choice))

    async def _probe_round(self) -> None:
        assert self._prober is not None
        # The periodic round and a failover may both want one: one at a time.
        async with self._probe_lock:
            candidates = self._discovery.candidates
            if self.config.discovery is not None and not candidates:
                candidates = await self._refresh_candidates()
            result = await self._prober.probe_round(candidates, self.ranking)
        self._endpoints.update(result.endpoints)
        # Nodes that DNS or the cluster's address book no longer name are forgotten.
        self.ranking.set_nodes(result.endpoints)

    async def _refresh_candidates(self) -> tuple[Candidate, ...]:
        try:
            return await self._discovery.refresh()
        except DiscoveryError as exc:
            log.warning("discovery failed, keeping the last list: %s", exc)
            return self._discovery.candidates

    async def _watch_lifetimes(self) -> None:
        margin = self.config.rekey.resync_margin_ms
        # If the cluster has not made a successor yet, asking again at once would
        # only repeat the registration: at most one ask per quarter of the margin.
        spacing_s = max(_EXPIRY_CHECK_S, margin / 4000)
        asked_at = -math.inf
        while True:
            await trio.sleep(_EXPIRY_CHECK_S)
            keys = self._keys
            if keys is None or trio.current_time() - asked_at < spacing_s:
                continue
            reason = keys.needs_resync(self._clock_ms(), margin)
            if reason is not None:
                asked_at = trio.current_time()
                self._ask_resync(reason)

    # --------------------------------------------------------------- datagrams

    def _on_datagram(self, datagram: bytes, source: str) -> None:
        if self.left:
            return
        if self._keys is None or self._attaching:
            self._held.append((datagram, source))
            return
        if self._ahead and (held := self._held_copy(datagram)) is not None:
            # A copy (the other path, another node) of one held: dropped by
            # its header, like any copy, not verified and held again.
            self._duplicate(source, held)
            return
        self._take(datagram, source)
        self._take_ahead()

    def _held_copy(self, datagram: bytes) -> int | None:
        """The message id of `datagram` if one with that id is held ahead."""
        try:
            msg_id = parse_rekey_header(datagram).msg_id
        except ProtocolError:
            return None  # `_take` counts and logs it
        return msg_id if msg_id in self._ahead else None

    def _take(self, datagram: bytes, source: str) -> None:
        keys = self._keys
        assert keys is not None
        try:
            result = keys.handle_rekey(datagram, self._clock_ms())
        except ProtocolError as exc:
            self.stats.bad_rekeys += 1
            log.warning("rekey datagram from %s dropped: %s", source, exc)
            return
        group = self.config.group
        match result.outcome:
            case Outcome.DUPLICATE:
                self._duplicate(source, result.msg_id)
            case Outcome.ACCEPTED:
                self.stats.rekeys += 1
                self._emit(
                    {
                        "event": "rekey",
                        "group": group,
                        "node": source,
                        "msg_id": result.msg_id,
                        **self._fingerprints(keys),
                    }
                )
                self._ensure_multicast()
            case Outcome.RESYNC:
                self._ask_resync(result.reason, node=source, msg_id=result.msg_id)
            case Outcome.AHEAD:
                self.stats.ahead += 1
                if self._gap_wait_s <= 0 or self._tasks is None:
                    self._ask_resync(result.reason, node=source, msg_id=result.msg_id)
                    return
                self._hold_ahead(result.msg_id, _Ahead(datagram, source, trio.current_time()))
                self._wait_for_gap()
            case Outcome.TERMINATED:
                self._leave(f"group terminated: {result.reason}")
                self._stop_tasks()

    def _duplicate(self, source: str, msg_id: int) -> None:
        self.stats.duplicates += 1
        self._emit(
            {
                "event": "duplicate",
                "group": self.config.group,
                "node": source,
                "msg_id": msg_id,
                "count": self.stats.duplicates,
            }
        )

    def _hold_ahead(self, msg_id: int, ahead: _Ahead) -> None:
        if len(self._ahead) >= _AHEAD_DATAGRAMS:
            # Full: the lowest ids are the ones the gap closes on first.
            highest = max(self._ahead)
            if msg_id > highest:
                return
            del self._ahead[highest]
        self._ahead[msg_id] = ahead

    def _take_ahead(self) -> None:
        """Take in the held datagrams that now follow on, in order; wait for
        what is still missing before the rest."""
        if not self._ahead:
            return
        while (keys := self._keys) is not None and not self.left:
            ahead = self._ahead.pop(keys.msg_id + 1, None)
            if ahead is None:
                break
            self._take(ahead.datagram, ahead.source)
        if self._prune_ahead():
            self._wait_for_gap()

    def _prune_ahead(self) -> bool:
        """Forget the held datagrams the keys have reached; whether any are left."""
        keys = self._keys
        if keys is None or self.left:
            self._ahead.clear()
        else:
            for msg_id in [m for m in self._ahead if m <= keys.msg_id]:
                del self._ahead[msg_id]
        return bool(self._ahead)

    def _wait_for_gap(self) -> None:
        if not self._gap_timer and self._tasks is not None:
            self._gap_timer = True
            self._tasks.start_soon(self._resync_unless_filled)

    async def _resync_unless_filled(self) -> None:
        """Messages still missing `gap_wait_ms` after a datagram past them came
        were lost, not late: register again. Each gap gets its whole wait,
        counted from its own first datagram."""
        try:
            while self._prune_ahead():
                first = min(self._ahead)
                # A gap still open after a registration (a node behind the one
                # whose multicast came first) gets a whole wait from there.
                since = max(self._ahead[first].arrived_s, self._registered_s)
                deadline = since + self._gap_wait_s
                if trio.current_time() < deadline:
                    await trio.sleep_until(deadline)
                    continue  # filled meanwhile, or not: look again
                keys = self._keys
                assert keys is not None  # or `_prune_ahead` emptied it
                newest = max(self._ahead)
                self._ask_resync(
                    f"gap: {keys.msg_id} -> {newest}, not filled in {self._gap_wait_s:g} s",
                    node=self._ahead[newest].source,
                    msg_id=newest,
                )
                return  # the registration's `_take_ahead` starts a wait if need be
        finally:
            self._gap_timer = False

    # -------------------------------------------------------------- supervisor

    def _post(self, request: _Request) -> None:
        self._send_request.send_nowait(request)

    def _ask_resync(self, reason: str, *, node: str = "", msg_id: int = 0) -> None:
        registrations = self.stats.registrations  # one registration since answers it
        self._post(_Request(_Kind.RESYNC, node, reason, msg_id, registrations=registrations))

    async def _supervise(self) -> None:
        try:
            async for request in self._requests:
                await self._serve(request)
        except _Left:
            self._stop_tasks()

    async def _serve(self, request: _Request) -> None:
        current = self.node
        keys = self._keys
        if current is None or keys is None:
            return
        match request.kind:
            case _Kind.RESYNC:
                if request.registrations < self.stats.registrations:
                    # A registration since it was asked brought a current GSA.
                    # (Lifetime checks go on asking while a failover waits for
                    # a node: those must not each register again afterwards.)
                    return
                if request.msg_id and keys.msg_id >= request.msg_id:
                    return  # an earlier resync already caught up past it
                self.stats.resyncs += 1
                self._emit(
                    {
                        "event": "resync",
                        "group": self.config.group,
                        "node": request.node or current,
                        "msg_id": request.msg_id or keys.msg_id,
                        "reason": request.reason,
                    }
                )
                try:
                    await self._attach(current)
                except SessionError as exc:
                    await self._failover(current, f"resync at {current} failed: {exc}")
            case _Kind.LOST:
                # The very session: a resync at the same node may have replaced it.
                if request.session is self._session:
                    await self._failover(current, request.reason)
            case _Kind.SWITCH:
                choice = request.choice
                assert choice is not None
                if choice.node_id == current:
                    return
                try:
                    await self._attach(choice.node_id)
                except SessionError as exc:
                    log.warning("switch to %s failed, staying: %s", choice.node_id, exc)
                    self.ranking.stay(current, failed=choice.node_id)
                    return
                self._failed_over(current, choice.node_id, choice.reason, choice.rtts)

    async def _failover(self, failed: str, reason: str) -> None:
        """Register with the next node in the ranking; retry until one accepts."""
        original, node, why = failed, failed, reason
        backoff = self._probe_config.timeout_s
        while True:
            choice = self.ranking.next_after_failure(node)
            if choice is None:
                # Every node failed: wait (doubling, up to a probe interval), then
                # a probe round clears those that answer and the cycle restarts.
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.config.probe.interval_s)
                await self._probe_round()
                choice = self.ranking.choose_initial()
                if choice is None:
                    # No node answered a probe (a firewalled probe port, an
                    # address family not probed): after the wait, try every
                    # node again rather than none for good.
                    self.ranking.clear_failed()
                    choice = self.ranking.choose_initial()
                    if choice is None:
                        continue  # no node known at all (discovery found none)
            try:
                await self._attach(choice.node_id)
            except SessionError as exc:
                log.warning("failover to %s failed: %s", choice.node_id, exc)
                node = choice.node_id
                continue
            self._failed_over(original, choice.node_id, why, choice.rtts)
            return

    def _failed_over(self, old: str, new: str, reason: str, rtts: dict[str, float]) -> None:
        self.stats.failovers += 1
        log.info("member %s now at node %s (was %s): %s", self.config.member_id, new, old, reason)
        self._emit(
            {
                "event": "failover",
                "group": self.config.group,
                "from": old,
                "to": new,
                "reason": reason,
                "rtt_ms": _rounded(rtts),
            }
        )

    # ------------------------------------------------------------ registration

    async def _first_registration(self) -> None:
        if self.config.discovery is not None:
            await self._refresh_candidates()
        await self._probe_round()
        choice = self.ranking.choose_initial()
        errors: list[str] = []
        while choice is not None:
            try:
                await self._attach(choice.node_id, rtts=choice.rtts)
                return
            except SessionError as exc:
                errors.append(f"{choice.node_id}: {exc}")
                choice = self.ranking.next_after_failure(choice.node_id)
            except _Left as exc:
                raise MemberError(str(exc)) from None
        raise MemberError(
            f"could not register in {self.config.group!r}: " + ("; ".join(errors) or "no nodes")
        )

    async def _attach(self, node_id: str, *, rtts: dict[str, float] | None = None) -> None:
        """Open a session to `node_id` and register there; on success it replaces
        the current session. Raises `SessionError` (try another node) or `_Left`."""
        self._attaching = True
        try:
            await self._register_at(node_id, rtts)
        finally:
            self._attaching = False
            held, self._held = list(self._held), deque(maxlen=_HELD_DATAGRAMS)
            for datagram, source in held:
                self._on_datagram(datagram, source)
            self._take_ahead()

    async def _register_at(self, node_id: str, rtts: dict[str, float] | None) -> None:
        endpoint = self._endpoints.get(node_id)
        if endpoint is None:
            raise SessionError(f"no address known for node {node_id}")
        try:
            host, port = endpoint.member_host_port
        except DecodeError as exc:
            raise SessionError(str(exc)) from None
        timeout = self._register_timeout_s
        # A DNS-discovered node is known by the id its probes answered with.
        session = await Session.connect(
            host, port, self._tls_context(), expected_node=node_id, timeout_s=timeout
        )
        try:
            previous = self._keys
            answer = await session.register(
                self.config.group,
                self.config.role,
                last_msg_id=0 if previous is None else previous.msg_id,
                sender_key=self._sender_public_key(),
                timeout_s=timeout,
            )
            if previous is not None and answer.msg_id < previous.msg_id:
                raise SessionError(
                    f"node {node_id} is behind (message {answer.msg_id} < {previous.msg_id})"
                )
            try:
                # Sign packets only where the policy distributes sender keys:
                # receivers reject a signature they cannot check.
                signer = self._signer if answer.policy.source_auth else None
                keys = GroupKeys(answer, signer=signer, now_ms=self._clock_ms(), previous=previous)
            except ProtocolError as exc:
                raise SessionError(f"node {node_id} sent an unusable GSA: {exc}") from None
        except Refused as exc:
            await session.aclose()
            if exc.answer.code in _FATAL_REFUSALS:
                self._leave(f"refused by {node_id}: {exc}")
                raise _Left(f"refused by {node_id}: {exc}") from None
            raise
        except BaseException:
            await session.aclose()
            raise
        await self._replace_session(session)
        self._keys = keys
        self._registered_s = trio.current_time()
        if self._discovery.learn(answer.nodes):
            # Probed from the next round on, like any other node.
            log.info(
                "the cluster's address book changed the candidates: %s",
                ", ".join(str(c.node_id) for c in self._discovery.candidates),
            )
        self.stats.registrations += 1
        self._emit(
            {
                "event": "registered",
                "group": self.config.group,
                "node": node_id,
                "rtt_ms": _rounded(self._rtts() if rtts is None else rtts),
                "msg_id": keys.msg_id,
                **self._fingerprints(keys),
            }
        )
        self._ensure_multicast()

    async def _replace_session(self, session: Session) -> None:
        old, self._session = self._session, session
        if self._session_scope is not None:
            self._session_scope.cancel()
            self._session_scope = None
        if old is not None:
            await old.aclose()
        if self._tasks is not None:
            await self._tasks.start(self._read_pushes, session)

    def _sender_public_key(self) -> bytes | None:
        if self._signer is None:
            return None
        return self._signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    # ------------------------------------------------------------------ events

    def _fingerprints(self, keys: GroupKeys) -> dict[str, object]:
        tek = keys.sending_tek(self._clock_ms())
        return {"kek": keys.kek.fingerprint, "tek": None if tek is None else tek.fingerprint}

    def _rtts(self) -> dict[str, float]:
        return {node: ms for node, ms in self.ranking.ranking() if ms is not None}

    def _emit(self, event: Event) -> None:
        if len(self._events) == self._events.maxlen:
            self.stats.events_dropped += 1
        self._events.append(event)
        self._events_changed.unpark_all()

    def _leave(self, reason: str) -> None:
        if self.left:
            return
        self.left_reason = reason
        log.info("member %s left %s: %s", self.config.member_id, self.config.group, reason)
        self._emit({"event": "left", "group": self.config.group, "reason": reason})

    def _stop_tasks(self) -> None:
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()
        self._close_events()

    def _close_events(self) -> None:
        self._events_closed = True
        self._events_changed.unpark_all()

    async def wait_left(self) -> str:
        """Wait until the member is out of the group; the reason."""
        while self.left_reason is None:
            await self._events_changed.park()
        return self.left_reason


def _rounded(rtts: dict[str, float]) -> dict[str, float]:
    return {node: round(ms, 3) for node, ms in sorted(rtts.items())}
