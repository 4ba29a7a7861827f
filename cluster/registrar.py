"""The member listener: registration (REG SA) and unicast rekey push.

A member connects over TLS 1.3 with a member-CA certificate; its identity
(`urn:gcks:member:ID`) is checked right after the handshake. It then sends
length-prefixed messages: `RegisterRequest` or `DeregisterRequest`. A join is
authorized by the group's policy, handed to the rekeyer's batch and answered
only after the batch's command is committed and applied here: the GSA is
built at that exact log index, so any node would have answered the same.
Failures are typed `ErrorAnswer`s (unknown group, unauthorized, no quorum
within the deadline), never a hang.

Handshakes get the CPU oldest first (`gcks.cluster.handshakes`), so that a
storm of reconnecting members is served in order instead of timing out
together.

The connection then stays open: every rekey datagram this node applies for
the member's groups is pushed to it as a `RekeyPush` (the same bytes as the
multicast copy), for networks that multicast does not reach.

May import trio, `gcks.proto`, `gcks.cluster` (tls, state, rekeyer, driver).
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections import defaultdict, deque
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import trio

from gcks.cluster import tls, tlslisten
from gcks.cluster.commands import LeaveReason
from gcks.cluster.config import Address
from gcks.cluster.driver import NoQuorum, RaftDriver
from gcks.cluster.handshakes import HandshakeTurns
from gcks.cluster.logthrottle import LogThrottle
from gcks.cluster.raft.errors import NotLeader, RaftError
from gcks.cluster.rekeyer import Rekeyer
from gcks.cluster.state import ApplyResult, GroupState, Outbound
from gcks.proto.codec import FrameDecoder, encode_frame
from gcks.proto.errors import IdentityError, ProtocolError
from gcks.proto.identity import Identity
from gcks.proto.identity import Role as CertRole
from gcks.proto.messages import (
    DeregisterAnswer,
    DeregisterRequest,
    ErrorAnswer,
    ErrorCode,
    GsaAnswer,
    Message,
    NodeEndpoint,
    RegisterRequest,
    RekeyPush,
    decode_message,
)
from gcks.proto.policy import GroupPolicy, Role

log = logging.getLogger(__name__)

_RECEIVE_CHUNK = 65536
_COALESCE_BYTES = 256 * 1024  # queued frames joined into one write, up to about this size
# The write deadline is per chunk of this size, so it cuts off a member that
# reads nothing, not one that reads a large answer (a source-authenticated
# group's GSA can be megabytes) steadily but slowly.
_WRITE_CHUNK_BYTES = 64 * 1024
MAX_REQUEST_FRAME = 64 * 1024  # members send small requests; answers can be large
# Member handshake steps computing at once, oldest first. Few: between two
# hand-overs the event loop also serves the connections already in (their
# answers, Raft), so a storm's registrations still complete in time. With 16
# turns, 5,000 members at once got 51 and 844 first attempts through (two
# runs of the storm benchmark); with 4, 1,914 and 1,218; with 1, 1,330 and
# 1,442. Each hand-over costs a pass of the event loop, too little to tell
# from the noise: at 200 in flight, node CPU per registration was 1.62-1.86 ms
# with 4 turns and 1.61-1.85 ms with 1,000 (no waiting; 4 and 3 runs).
HANDSHAKE_TURNS = 4
# TCP keepalive on member connections: a member that vanished without a FIN
# or RST (a host gone, a NAT entry dropped) holds a connection, an attachment
# and a push queue; in an idle group no write ever fails to reveal it. With
# these the kernel gives up on it after about 2 minutes of silence.
_KEEPALIVE_IDLE_S = 60
_KEEPALIVE_INTERVAL_S = 10
_KEEPALIVE_PROBES = 6
REFUSAL_WARNING_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class RegistrarSettings:
    handshake_timeout_s: float = 5.0
    # After the group's batch interval (a join waits for its batch), the time a
    # commit may take; then NO_QUORUM.
    request_timeout_s: float = 15.0
    push_queue: int = 256  # pushes buffered per member before it is cut off (it resyncs)
    max_connections: int = 100_000  # open member connections; more are closed unanswered
    # Open connections of one member id; a newer one closes the oldest.
    max_connections_per_member: int = 64
    write_timeout_s: float = 10.0  # a member that reads nothing for this long is cut off


@dataclass
class RegistrarStats:
    connections: int = 0
    refused: int = 0  # over the limit, a failed handshake or a wrong role
    evicted: int = 0  # closed for a newer connection of the same member id
    registrations: int = 0
    registration_errors: int = 0
    bad_frames: int = 0
    pushes: int = 0
    pushes_dropped: int = 0


class _FrameWriter:
    """The outgoing side of one member connection: answers and pushes, in order.

    It holds no task while idle. Whoever finds it idle writes: the reader its
    answer (in line), or a short task that the first queued push starts in
    `spawn`, the registrar's nursery (a nursery per connection cost about 2 %
    of a serving node's CPU). Frames queued meanwhile go out with the write in
    progress, joined into one TLS record and one syscall. A member that reads
    nothing for `timeout_s`, or a write that fails, ends the connection
    (`connection`, the reader's scope, is cancelled); a member too far behind
    misses pushes (it notices the gap and resyncs) instead of growing the queue
    without bound. `close` also ends a push's write in progress.
    """

    def __init__(
        self,
        stream: trio.abc.SendStream,
        spawn: trio.Nursery,
        connection: trio.CancelScope,
        member_id: str,
        *,
        queue_size: int,
        timeout_s: float,
    ) -> None:
        self._stream = stream
        self._spawn = spawn
        self._connection = connection
        self._member_id = member_id
        self._queue_size = queue_size
        self._timeout_s = timeout_s
        self._queue: deque[bytes] = deque()
        self._written: trio.Event | None = None  # set when the write in progress ends
        self._pushing: trio.CancelScope | None = None  # the push task's, while it writes
        self._closed = False

    def push(self, frame: bytes) -> bool:
        """Queue a push without waiting; False if it was dropped (queue full, connection ending)."""
        if self._closed or len(self._queue) >= self._queue_size:
            return False
        self._queue.append(frame)
        if self._written is None:
            self._written = trio.Event()
            self._spawn.start_soon(self._write_pushes)
        return True

    async def _write_pushes(self) -> None:
        with trio.CancelScope() as self._pushing:
            await self._write_queued()
        self._pushing = None

    async def send(self, frame: bytes) -> None:
        """Write an answer, after the frames queued before it. The reader waits
        here, so a member that sends requests but reads nothing stalls itself."""
        if not self._closed:
            self._queue.append(frame)
            if self._written is not None:
                await self._written.wait()  # the write in progress takes it along
            else:
                self._written = trio.Event()
                await self._write_queued()
        if self._closed:
            # Cut off: the connection's cancellation ends the reader here, before
            # it acts on a request it has already read.
            await trio.lowlevel.checkpoint()

    async def _write_queued(self) -> None:
        try:
            # One scope for all the queued writes, armed per write: cheaper than
            # a fresh `fail_after` per frame.
            with trio.CancelScope() as deadline:
                while self._queue:
                    frames = [self._queue.popleft()]
                    size = len(frames[0])
                    while self._queue and size < _COALESCE_BYTES:
                        frames.append(self._queue.popleft())
                        size += len(frames[-1])
                    data = memoryview(frames[0] if len(frames) == 1 else b"".join(frames))
                    for start in range(0, len(data), _WRITE_CHUNK_BYTES):
                        deadline.deadline = trio.current_time() + self._timeout_s
                        await self._stream.send_all(data[start : start + _WRITE_CHUNK_BYTES])
            if deadline.cancelled_caught:
                log.warning("member %s reads nothing, connection dropped", self._member_id)
                self._fail()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("member %s: connection lost while writing: %s", self._member_id, _reason(exc))
            self._fail()
        finally:
            written, self._written = self._written, None
            assert written is not None
            written.set()

    def close(self) -> None:
        """Refuse pushes from now on, and end a push's write (the connection is ending)."""
        self._closed = True
        self._queue.clear()
        if self._pushing is not None:
            self._pushing.cancel()

    def _fail(self) -> None:
        self.close()
        self._connection.cancel()


def _keep_alive(tcp: trio.SocketStream) -> None:
    sock = tcp.socket
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_KEEPALIVE, 1)
        # Linux names; elsewhere the system's (much longer) defaults apply.
        for name, value in (
            ("TCP_KEEPIDLE", _KEEPALIVE_IDLE_S),
            ("TCP_KEEPINTVL", _KEEPALIVE_INTERVAL_S),
            ("TCP_KEEPCNT", _KEEPALIVE_PROBES),
        ):
            if hasattr(trio.socket, name):
                sock.setsockopt(trio.socket.IPPROTO_TCP, getattr(trio.socket, name), value)
    except OSError as exc:  # a connection already reset: the handshake will fail
        log.debug("member connection: no TCP keepalive: %s", exc)


class _MemberLink:
    """One member connection: its identity, groups and outgoing frames."""

    def __init__(self, member_id: str, writer: _FrameWriter) -> None:
        self.member_id = member_id
        self.groups: set[str] = set()
        self.writer = writer


class Registrar:
    def __init__(
        self,
        driver: RaftDriver,
        rekeyer: Rekeyer,
        nodes: Sequence[NodeEndpoint],
        context: ssl.SSLContext,
        settings: RegistrarSettings,
    ) -> None:
        self._driver = driver
        self._rekeyer = rekeyer
        self._nodes = tuple(nodes)
        self._context = context
        self._settings = settings
        self._attached: dict[str, set[_MemberLink]] = defaultdict(set)
        # Open connections that have asked to register, by member id: a leave
        # looks at that member's connections only, not at every one attached to
        # the group (a policy update can remove 1,024 of 100,000 in one entry).
        self._connections: dict[str, set[_MemberLink]] = defaultdict(set)
        # GSAs built at the index where the member's join applied, per (group, member).
        self._answers: dict[tuple[str, str], GsaAnswer] = {}
        self._waiting: dict[tuple[str, str], int] = defaultdict(int)
        # Connections of members whose join has not applied yet: they get pushes
        # from the entry after the one that builds their GSA (everything up to
        # it is already in the GSA, so pushing it would be wasted work).
        self._pending: dict[tuple[str, str], set[_MemberLink]] = defaultdict(set)
        self._open = 0
        # The cancel scopes of each member id's open connections, oldest first.
        self._open_by_member: dict[str, deque[trio.CancelScope]] = {}
        self._spawn: trio.Nursery | None = None
        self._turns = HandshakeTurns(HANDSHAKE_TURNS)  # oldest first: gcks.cluster.handshakes
        # Refusals come in storms: a reconnect storm makes one per handshake
        # that times out. Each is counted; a warning goes out once a while.
        self._refusal_warnings = LogThrottle(REFUSAL_WARNING_INTERVAL_S)
        self._refusals_unlogged = 0
        self.stats = RegistrarStats()

    # ------------------------------------------------------------ apply hook

    def on_apply(self, result: ApplyResult) -> None:
        """Called by the node for every applied entry, after the entry's pushes."""
        state = self._driver.state
        for group, member_id in result.joined:
            if self._waiting.get((group, member_id)) and state.is_member(group, member_id):
                self._answers[(group, member_id)] = state.gsa(
                    group, member_id, request_id=0, nodes=self._nodes
                )
                self._attached[group].update(self._pending.pop((group, member_id), ()))

    def push(self, outbound: Outbound) -> None:
        """Queue a rekey datagram to every member attached for its group."""
        frame = encode_frame(RekeyPush(outbound.datagram).encode())
        for link in self._attached.get(outbound.group, ()):  # a push changes no set
            if link.writer.push(frame):
                self.stats.pushes += 1
            else:
                # A member that cannot keep up misses this copy; the gap makes
                # it re-register, which is cheaper than unbounded buffering.
                self.stats.pushes_dropped += 1
        if outbound.terminate:
            for link in self._attached.pop(outbound.group, set()):
                link.groups.discard(outbound.group)

    def detach(self, group: str, member_id: str) -> None:
        # A connection whose join is still to apply stays pending: that join
        # comes after this leave in the log (another connection of the same
        # member deregistering while this one registers).
        pending = self._pending.get((group, member_id), ())
        for link in tuple(self._connections.get(member_id, ())):
            if group in link.groups and link not in pending:
                self._unlink(link, group)

    def reconcile(self, state: GroupState) -> None:
        """After a snapshot install (no applies for the entries it skipped):
        connections of members that left, or of groups deleted, in between
        get no more pushes."""
        for group, links in tuple(self._attached.items()):
            exists = state.has_group(group)
            for link in tuple(links):
                if not exists or not state.is_member(group, link.member_id):
                    self._unlink(link, group)

    @property
    def handshakes_waiting(self) -> int:
        """Handshakes with bytes to work on, waiting for their turn."""
        return self._turns.waiting

    @property
    def attached(self) -> int:
        return sum(len(links) for links in self._attached.values())

    # ----------------------------------------------------------------- serve

    async def serve(
        self,
        listen: Address,
        *,
        task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._spawn = nursery  # the members' push writes
            bound = await nursery.start(tlslisten.serve, listen, self._handle)
            log.info("member listener on %s", ", ".join(map(str, bound)))
            task_status.started(bound)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        if self._open >= self._settings.max_connections:
            # Refused before the handshake: each connection holds a task, TLS
            # state and a push queue, so their number is what bounds memory.
            self._refused(tlslisten.remote(tcp), f"{self._open} open")
            await trio.aclose_forcefully(tcp)
            return
        self._open += 1
        try:
            _keep_alive(tcp)
            await self._serve_member(tcp)
        finally:
            self._open -= 1

    async def _serve_member(self, tcp: trio.SocketStream) -> None:
        remote = tlslisten.remote(tcp)
        self.stats.connections += 1
        try:
            stream, identity = await tlslisten.accept(
                tcp,
                self._context,
                CertRole.MEMBER,
                self._settings.handshake_timeout_s,
                turns=self._turns,
            )
        except tlslisten.Refused as exc:
            self._refused(remote, str(exc))
            return
        try:
            seconds_left = tls.peer_seconds_left(stream)
        except IdentityError as exc:  # parsed once already by accept: not expected
            await trio.aclose_forcefully(stream)
            self._refused(remote, str(exc))
            return
        log.debug("member %s connected from %s", identity.id, remote)
        await self._serve_stream(stream, identity, seconds_left)

    async def _serve_stream(
        self, stream: trio.SSLStream[Any], identity: Identity, seconds_left: float
    ) -> None:
        assert self._spawn is not None, "connections come only while `serve` runs"
        try:
            # Cancelled when the member is cut off (a stalled or failed write),
            # and when its certificate expires: an open connection must not
            # outlive the credential it was authenticated with (there is no
            # revocation list; short-lived certificates stand in for one).
            with trio.CancelScope(deadline=trio.current_time() + seconds_left) as connection:
                self._hold(identity.id, connection)
                writer = _FrameWriter(
                    stream,
                    self._spawn,
                    connection,
                    identity.id,
                    queue_size=self._settings.push_queue,
                    timeout_s=self._settings.write_timeout_s,
                )
                link = _MemberLink(identity.id, writer)
                try:
                    await self._reader(stream, link)
                finally:
                    writer.close()  # before the stream closes: no push writes to it
                    self._forget(link)
                    self._release(identity.id, connection)
            if connection.cancelled_caught and trio.current_time() >= connection.deadline:
                log.info("member %s: certificate expired, connection closed", identity.id)
        finally:
            await trio.aclose_forcefully(stream)
            log.debug("member %s disconnected", identity.id)

    def _hold(self, member_id: str, connection: trio.CancelScope) -> None:
        """Count an open connection of `member_id`; past the limit, close its oldest.

        One member certificate must not take a share of `max_connections` that
        starves every other member. The oldest goes rather than the newest: a
        member that restarts leaves connections behind that only keepalive
        reaps (about 2 minutes), and its current connection must be served."""
        held = self._open_by_member.setdefault(member_id, deque())
        held.append(connection)
        if len(held) > self._settings.max_connections_per_member:
            held.popleft().cancel()
            self.stats.evicted += 1
            level = logging.INFO if self._refusal_warnings.ready("evicted") else logging.DEBUG
            log.log(
                level,
                "member %s has more than %d connections open: the oldest closed",
                member_id,
                self._settings.max_connections_per_member,
            )

    def _release(self, member_id: str, connection: trio.CancelScope) -> None:
        held = self._open_by_member.get(member_id)
        if held is not None:
            with suppress(ValueError):  # already taken out by `_hold`
                held.remove(connection)
            if not held:
                del self._open_by_member[member_id]

    def _refused(self, remote: str, why: str) -> None:
        self.stats.refused += 1
        if not self._refusal_warnings.ready():
            self._refusals_unlogged += 1
            log.debug("member connection from %s refused: %s", remote, why)
            return
        unlogged, self._refusals_unlogged = self._refusals_unlogged, 0
        log.warning(
            "member connection from %s refused: %s%s",
            remote,
            why,
            f" ({unlogged} more since the last such warning)" if unlogged else "",
        )

    def _forget(self, link: _MemberLink) -> None:
        """A closed connection gets no more pushes, even from a join still to apply."""
        for group in tuple(link.groups):
            self._unlink(link, group)
        connections = self._connections.get(link.member_id)
        if connections is not None:
            connections.discard(link)
            if not connections:
                del self._connections[link.member_id]

    def _unlink(self, link: _MemberLink, group: str) -> None:
        # Empty sets go: a deleted group or a gone member leaves nothing behind.
        link.groups.discard(group)
        attached = self._attached.get(group)
        if attached is not None:
            attached.discard(link)
            if not attached:
                del self._attached[group]
        key = (group, link.member_id)
        pending = self._pending.get(key)
        if pending is not None:
            pending.discard(link)
            if not pending:
                del self._pending[key]

    async def _reader(self, stream: trio.SSLStream[Any], link: _MemberLink) -> None:
        decoder = FrameDecoder(MAX_REQUEST_FRAME)
        try:
            while True:
                data = await stream.receive_some(_RECEIVE_CHUNK)
                if not data:
                    return
                decoder.feed(bytes(data))
                for frame in decoder:
                    message = decode_message(frame)
                    answer = await self._dispatch(link, message)
                    await link.writer.send(_answer_frame(link, answer))
        except ProtocolError as exc:
            self.stats.bad_frames += 1
            log.warning("member %s sent a bad frame, connection dropped: %s", link.member_id, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _dispatch(
        self, link: _MemberLink, message: Message
    ) -> GsaAnswer | ErrorAnswer | DeregisterAnswer:
        match message:
            case RegisterRequest():
                return await self._register(link, message)
            case DeregisterRequest():
                return await self._deregister(link, message)
            case _:
                raise _UnexpectedMessage(f"{type(message).__name__} is not a request")

    async def _register(self, link: _MemberLink, req: RegisterRequest) -> GsaAnswer | ErrorAnswer:
        member_id, state = link.member_id, self._driver.state

        newly_attached = False

        def error(code: ErrorCode, text: str, hint: str | None = None) -> ErrorAnswer:
            if newly_attached:
                self._unlink(link, req.group)
            self.stats.registration_errors += 1
            # One connection may repeat a refused request as fast as it likes:
            # one line per kind of refusal every 10 s, the rest at debug
            # (gcks_registration_errors_total counts them all).
            level = logging.INFO if self._refusal_warnings.ready(code) else logging.DEBUG
            log.log(level, "registration of %s to %s refused: %s", member_id, req.group, text)
            return ErrorAnswer(req.request_id, code, text, hint)

        if not state.has_group(req.group):
            return error(ErrorCode.UNKNOWN_GROUP, f"no group {req.group!r}")
        policy = state.policy(req.group)
        if req.role not in policy.roles_for(member_id) or state.is_banned(req.group, member_id):
            return error(ErrorCode.UNAUTHORIZED, f"{member_id} may not join as {req.role}")
        if policy.source_auth and req.role is Role.SENDER and req.sender_key is None:
            return error(ErrorCode.BAD_REQUEST, "source authentication needs a sender key")
        key = (req.group, member_id)
        self._waiting[key] += 1
        # Attach before the join commits: a rekey applied between the answer and
        # the member's first read must still reach it (the member holds pushes
        # that arrive before the answer and drops the ones it already has). A
        # new connection is attached by `on_apply` when its GSA is built.
        newly_attached = req.group not in link.groups
        link.groups.add(req.group)
        self._connections[member_id].add(link)
        if newly_attached:
            self._pending[key].add(link)
        try:
            with trio.fail_after(self._deadline_s(policy)):
                result = await self._rekeyer.join(req.group, member_id, req.role, req.sender_key)
            # Only the apply of this request's own batch answers it: an older
            # entry that joined the same member (a node catching up) may have
            # left a stale GSA here, though this batch skipped the join (banned).
            answer = self._answers.get(key) if key in result.joined else None
        except NotLeader as exc:
            return error(ErrorCode.NO_QUORUM, "no leader reachable", exc.leader_hint)
        except (NoQuorum, trio.TooSlowError, RaftError) as exc:
            return error(ErrorCode.NO_QUORUM, f"not committed in time: {exc}")
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
                self._answers.pop(key, None)
        if key in result.full:
            return error(ErrorCode.GROUP_FULL, "the group has room for no more senders")
        if key in result.stale:
            # A member still waiting here only if this node's clock lags the one
            # that took the leave by more than the skew allowed, and it had not
            # applied the leave yet: the member retries on BUSY, later and newer.
            return error(ErrorCode.BUSY, "the join was older than the member's last leave")
        if answer is None:
            return error(ErrorCode.UNAUTHORIZED, "the join was not applied (evicted?)")
        if not state.is_member(req.group, member_id):
            # It left again after its join applied (another of its connections
            # deregistering, an eviction): the GSA is stale, and a leave's
            # detach has already taken this connection out.
            return error(ErrorCode.BUSY, "the member left again before its answer")
        self.stats.registrations += 1
        # Debug: the audit line of the entry (every node, one per batch) already
        # names each member that joined; one more line per registration made a
        # restart storm of 100,000 members 100,000 lines on the serving nodes.
        log.debug(
            "registered %s to %s as %s (msg %d, kek %s)",
            member_id,
            req.group,
            req.role,
            answer.msg_id,
            answer.kek.fingerprint,
        )
        return dataclasses.replace(answer, request_id=req.request_id)

    def _deadline_s(self, policy: GroupPolicy) -> float:
        # A policy may batch for minutes (up to 600 s): a fixed deadline shorter
        # than its interval would refuse every request, and each retry would
        # only make another batch.
        return policy.batch_interval_ms / 1000 + self._settings.request_timeout_s

    async def _deregister(
        self, link: _MemberLink, req: DeregisterRequest
    ) -> DeregisterAnswer | ErrorAnswer:
        state = self._driver.state
        if not state.is_member(req.group, link.member_id):
            return ErrorAnswer(req.request_id, ErrorCode.NOT_REGISTERED, "not a member")
        try:
            with trio.fail_after(self._deadline_s(state.policy(req.group))):
                await self._rekeyer.leave(req.group, link.member_id, LeaveReason.DEREGISTER)
        except NotLeader as exc:
            return ErrorAnswer(
                req.request_id, ErrorCode.NO_QUORUM, "no leader reachable", exc.leader_hint
            )
        except (NoQuorum, trio.TooSlowError, RaftError) as exc:
            return ErrorAnswer(req.request_id, ErrorCode.NO_QUORUM, f"not committed: {exc}")
        self.detach(req.group, link.member_id)
        return DeregisterAnswer(req.request_id, req.group)


class _UnexpectedMessage(ProtocolError):
    """A member sent a message that is not a request (an answer, a push...)."""


def _answer_frame(link: _MemberLink, answer: GsaAnswer | ErrorAnswer | DeregisterAnswer) -> bytes:
    try:
        return encode_frame(answer.encode())
    except ValueError as exc:
        # A GSA past a wire limit (more sender keys than one answer holds): a
        # typed refusal and a log line, not an exception that ends the listener.
        log.error("answer to member %s cannot be encoded: %s", link.member_id, exc)
        refusal = ErrorAnswer(answer.request_id, ErrorCode.INTERNAL, "answer too large to send")
        return encode_frame(refusal.encode())


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
