"""The member listener's resource bounds: connections and writes under limits.

A member that stops reading, or a flood of connections, must cost the node a
bounded amount of memory and time: the listener refuses connections beyond
its limit and cuts off a member whose pushes cannot be written in time.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from gcks.cluster import pki, tls, tlslisten
from gcks.cluster.commands import Leave, LeaveReason
from gcks.cluster.config import Address
from gcks.cluster.handshakes import HandshakeTurns
from gcks.cluster.logthrottle import LogThrottle
from gcks.cluster.raft.types import Role as RaftRole
from gcks.cluster.registrar import (
    HANDSHAKE_TURNS,
    Registrar,
    RegistrarSettings,
    _FrameWriter,
    _MemberLink,
)
from gcks.cluster.state import ApplyResult
from gcks.member.tls import member_client_context
from gcks.proto.codec import encode_frame
from gcks.proto.identity import Identity
from gcks.proto.identity import Role as CertRole
from gcks.proto.messages import (
    MAX_SENDERS,
    ErrorAnswer,
    ErrorCode,
    GsaAnswer,
    Message,
    RegisterRequest,
    decode_message,
)
from gcks.proto.policy import Role
from tests.cluster.test_rekeyer import _driver as _rekeyer_driver
from tests.cluster.test_rekeyer import _rekeyer
from tests.cluster.test_state import Cluster
from tests.tlspipe import handshake


def _registrar(settings: RegistrarSettings, root: Path | None = None) -> Registrar:
    context = None
    if root is not None:
        pki.pki_init(root, nodes=["n1"], members=["m1"], admins=[])
        context = tls.member_server_context(
            member_ca=root / "ca/member.crt", cert=root / "node/n1.crt", key=root / "node/n1.key"
        )
    # Neither test reaches registration: no driver, rekeyer or node list needed.
    return Registrar(None, None, (), context, settings)  # type: ignore[arg-type]


def _writer(
    stream: object, spawn: trio.Nursery, connection: trio.CancelScope, queue_size: int = 4
) -> _FrameWriter:
    return _FrameWriter(
        stream,  # type: ignore[arg-type]
        spawn,
        connection,
        "m1",
        queue_size=queue_size,
        timeout_s=7.0,
    )


async def test_member_that_stops_reading_is_cut_off_after_the_write_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _client, server = trio.testing.lockstep_stream_pair()  # nobody reads `_client`
    start = trio.current_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as spawn:
            with trio.CancelScope() as connection:
                writer = _writer(server, spawn, connection)
                assert writer.push(b"a rekey push")
                await trio.sleep_forever()  # the reader, waiting for a request
    assert connection.cancel_called, "the connection ends with the stalled write"
    assert trio.current_time() - start == pytest.approx(7.0)
    assert not writer.push(b"another push"), "a cut-off member gets nothing more"


async def test_a_member_reading_a_large_answer_slowly_but_steadily_is_not_cut_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 2 MiB at 128 KiB/s takes 16 s, longer than the 7 s deadline, but the
    # member never goes 7 s without reading: the deadline is per chunk.
    client, server = trio.testing.lockstep_stream_pair()
    answer = b"x" * (2 * 1024 * 1024)
    received = bytearray()

    async def slow_member() -> None:
        while len(received) < len(answer):
            received.extend(await client.receive_some(64 * 1024))
            await trio.sleep(0.5)

    with trio.fail_after(60):
        async with trio.open_nursery() as spawn:
            spawn.start_soon(slow_member)
            with trio.CancelScope() as connection:
                await _writer(server, spawn, connection).send(answer)
    assert not connection.cancelled_caught
    assert bytes(received) == answer


async def test_closing_ends_a_push_write_in_progress_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The connection is ending: its stream is about to close under the write.
    _client, server = trio.testing.lockstep_stream_pair()  # nobody reads `_client`
    start = trio.current_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as spawn:
            connection = trio.CancelScope()
            writer = _writer(server, spawn, connection)
            assert writer.push(b"a rekey push")
            await trio.testing.wait_all_tasks_blocked()
            assert spawn.child_tasks, "the push is being written"
            writer.close()
    assert trio.current_time() == start, "ended at once, not at the write deadline"
    assert not connection.cancel_called, "closing is not a failure of the member"


async def test_a_reader_cut_off_in_its_own_answer_goes_no_further(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Its next request may already sit in the buffer: it must not be acted on.
    _client, server = trio.testing.lockstep_stream_pair()  # nobody reads `_client`
    went_on = False
    with trio.fail_after(60):
        async with trio.open_nursery() as spawn:
            with trio.CancelScope() as connection:
                writer = _writer(server, spawn, connection)
                await writer.send(b"an answer nobody reads")
                went_on = True
    assert connection.cancelled_caught
    assert not went_on


class _RecordingStream:
    """Records each `send_all` as one write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        await trio.lowlevel.checkpoint()


async def test_pushes_queued_together_go_out_in_order_in_one_write_and_idle_without_a_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = _RecordingStream()
    with trio.fail_after(600):
        async with trio.open_nursery() as spawn:
            connection = trio.CancelScope()
            writer = _writer(stream, spawn, connection, queue_size=8)
            for frame in (b"push-1", b"push-2", b"push-3"):
                assert writer.push(frame)
            await trio.sleep(70.0)  # ten write deadlines of idling: no cut-off
            assert stream.writes == [b"push-1push-2push-3"]
            assert not connection.cancel_called
            assert writer.push(b"push-4")
            await trio.sleep(1.0)
            assert stream.writes[1:] == [b"push-4"]
            assert not spawn.child_tasks, "no task holds an idle connection"


async def test_an_answer_is_written_by_the_reader_itself_when_no_push_is_in_flight() -> None:
    stream = _RecordingStream()
    async with trio.open_nursery() as spawn:
        writer = _writer(stream, spawn, trio.CancelScope())
        await writer.send(b"answer")
        assert stream.writes == [b"answer"], "written before `send` returns"
        assert not spawn.child_tasks, "no task started for it"


async def test_an_answer_waits_for_the_push_in_flight_and_goes_out_after_it() -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as spawn:
        writer = _writer(server, spawn, trio.CancelScope(), queue_size=1)
        assert writer.push(b"push")
        assert not writer.push(b"dropped"), "beyond the queue bound, a push is dropped"
        await writer.send(b"answer")
        assert await client.receive_some() == b"pushanswer"


async def test_pushes_after_the_connection_ended_are_refused() -> None:
    async with trio.open_nursery() as spawn:
        writer = _writer(_RecordingStream(), spawn, trio.CancelScope())
        writer.close()
        assert not writer.push(b"push")
        assert not spawn.child_tasks


async def test_member_connections_beyond_the_limit_are_refused_before_the_handshake(
    tmp_path: Path,
) -> None:
    settings = RegistrarSettings(max_connections=1, handshake_timeout_s=60.0)
    registrar = _registrar(settings, tmp_path / "pki")
    ca, crt, key = (
        tmp_path / "pki/ca/cluster.crt",
        *pki.cert_paths(tmp_path / "pki", CertRole.MEMBER, "m1"),
    )
    client_context = member_client_context(cluster_ca=ca, cert=crt, key=key)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(registrar.serve, Address("127.0.0.1", 0))
            first = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", bound[0].port),
                client_context,
                server_hostname=None,
            )
            await first.do_handshake()
            second = await trio.open_tcp_stream("127.0.0.1", bound[0].port)
            with trio.fail_after(10):  # well before the handshake deadline
                assert await second.receive_some(1) == b"", "closed at once, no TLS"
            assert registrar.stats.refused == 1
            await second.aclose()
            await first.aclose()
            nursery.cancel_scope.cancel()


async def test_each_refused_connection_is_counted_and_warned_about_once_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A reconnect storm refuses thousands: a warning line each would flood the log.
    registrar = _registrar(RegistrarSettings(max_connections=0))

    async def refused(port: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        assert await stream.receive_some(1) == b""
        await stream.aclose()

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    with trio.fail_after(60), caplog.at_level(logging.DEBUG, logger="gcks.cluster.registrar"):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(registrar.serve, Address("127.0.0.1", 0))
            for _ in range(5):
                await refused(bound[0].port)
            assert registrar.stats.refused == 5
            assert len(warnings()) == 1
            assert "refused: 0 open" in warnings()[0]
            registrar._refusal_warnings = LogThrottle(0.0)  # as if the interval had passed
            await refused(bound[0].port)
            assert registrar.stats.refused == 6
            assert len(warnings()) == 2
            assert "(4 more since the last such warning)" in warnings()[1]
            nursery.cancel_scope.cancel()


def _member_context(root: Path) -> ssl.SSLContext:
    crt, key = pki.cert_paths(root, CertRole.MEMBER, "m1")
    return member_client_context(cluster_ca=root / "ca/cluster.crt", cert=crt, key=key)


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.01)


async def test_member_handshakes_compute_only_with_their_turn(tmp_path: Path) -> None:
    registrar = _registrar(RegistrarSettings(handshake_timeout_s=60.0), tmp_path / "pki")
    client_context = _member_context(tmp_path / "pki")
    done = trio.Event()

    async def member(port: int) -> None:
        stream = trio.SSLStream(
            await trio.open_tcp_stream("127.0.0.1", port), client_context, server_hostname=None
        )
        await stream.do_handshake()
        done.set()
        await stream.aclose()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(registrar.serve, Address("127.0.0.1", 0))
            for older in range(-HANDSHAKE_TURNS, 0):  # older handshakes are computing
                await registrar._turns.take(older)
            nursery.start_soon(member, bound[0].port)
            await _until(lambda: registrar.handshakes_waiting == 1)  # its ClientHello came
            assert not done.is_set()
            registrar._turns.give_back()
            await done.wait()
            assert registrar.handshakes_waiting == 0
            assert registrar.stats.refused == 0
            nursery.cancel_scope.cancel()


async def test_every_turn_is_free_again_after_handshakes(tmp_path: Path) -> None:
    # The server's last flight of a TLS 1.3 handshake goes out after it: only
    # the end of the handshake gives that turn back.
    registrar = _registrar(RegistrarSettings(handshake_timeout_s=60.0), tmp_path / "pki")
    client_context = _member_context(tmp_path / "pki")
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(registrar.serve, Address("127.0.0.1", 0))
            for _ in range(HANDSHAKE_TURNS + 2):
                stream = trio.SSLStream(
                    await trio.open_tcp_stream("127.0.0.1", bound[0].port),
                    client_context,
                    server_hostname=None,
                )
                await stream.do_handshake()
                await stream.aclose()
            await _until(lambda: registrar.stats.connections == HANDSHAKE_TURNS + 2)
            await _until(lambda: registrar._open == 0)
            for older in range(HANDSHAKE_TURNS):
                await registrar._turns.take(older)  # every one free: taken at once
            nursery.start_soon(registrar._turns.take, HANDSHAKE_TURNS)
            await trio.testing.wait_all_tasks_blocked()
            assert registrar._turns.waiting == 1, "no more turns than that"
            nursery.cancel_scope.cancel()


async def test_an_established_member_connection_takes_no_turn(tmp_path: Path) -> None:
    _registrar(RegistrarSettings(), tmp_path / "pki")  # issues the certificates
    root = tmp_path / "pki"
    server_context = tls.member_server_context(
        member_ca=root / "ca/member.crt", cert=root / "node/n1.crt", key=root / "node/n1.key"
    )
    turns = HandshakeTurns(2)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            client = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", port),
                _member_context(root),
                server_hostname=None,
            )
            nursery.start_soon(client.do_handshake)
            tcp = await listeners[0].accept()
            server, _ = await tlslisten.accept(
                tcp, server_context, CertRole.MEMBER, 30, turns=turns
            )
            for older in (-2, -1):  # handshakes of others hold every turn
                await turns.take(older)
            await client.send_all(b"a request")
            with trio.fail_after(10):  # read without a turn
                assert await server.receive_some() == b"a request"
            await server.aclose()
            await client.aclose()
    await listeners[0].aclose()


class _OversizedAnswers(Registrar):
    """Answers every request with a GSA past a wire limit: more sender keys
    than one answer carries (a source-authenticated group of 65,537 senders)."""

    def __init__(self, gsa: GsaAnswer) -> None:
        super().__init__(None, None, (), None, RegistrarSettings())  # type: ignore[arg-type]
        self._gsa = gsa

    async def _dispatch(self, link: _MemberLink, message: Message) -> GsaAnswer:
        keys = tuple((i, bytes(32)) for i in range(1, MAX_SENDERS + 2))
        assert isinstance(message, RegisterRequest)
        return dataclasses.replace(
            self._gsa, request_id=message.request_id, sender_verify_keys=keys
        )


async def test_an_answer_past_a_wire_limit_is_a_typed_error_not_a_crash() -> None:
    cluster = Cluster()
    cluster.join("m1")
    registrar = _OversizedAnswers(cluster.state.gsa("demo", "m1", request_id=0, nodes=()))
    member, node = trio.testing.memory_stream_pair()
    request = RegisterRequest("demo", Role.RECEIVER, last_msg_id=0, request_id=7)
    await member.send_all(encode_frame(request.encode()))
    await member.send_eof()
    with trio.fail_after(10):
        async with trio.open_nursery() as spawn:
            link = _MemberLink("m1", _writer(node, spawn, trio.CancelScope()))
            await registrar._reader(node, link)  # type: ignore[arg-type]
        frame = await member.receive_some()
    answer = decode_message(frame[4:])
    assert isinstance(answer, ErrorAnswer)
    assert (answer.request_id, answer.code) == (7, ErrorCode.INTERNAL)


@pytest.mark.parametrize(
    ("skipped", "code"),
    [
        ("full", ErrorCode.GROUP_FULL),  # no room for one more sender
        ("stale", ErrorCode.BUSY),  # older than the member's last leave: retry
    ],
)
async def test_a_join_skipped_at_apply_is_answered_with_why(skipped: str, code: ErrorCode) -> None:
    cluster = Cluster()

    class _Driver:
        state = cluster.state

    class _SkippingRekeyer:
        async def join(self, group: str, member_id: str, *_: object) -> ApplyResult:
            await trio.lowlevel.checkpoint()
            return ApplyResult(**{skipped: ((group, member_id),)})  # type: ignore[arg-type]

    registrar = Registrar(_Driver(), _SkippingRekeyer(), (), None, RegistrarSettings())  # type: ignore[arg-type]
    link = _MemberLink("s9", cast(Any, None))  # never written to: the answer is returned
    request = RegisterRequest("demo", Role.SENDER, last_msg_id=0, request_id=3)
    answer = await registrar._register(link, request)
    assert isinstance(answer, ErrorAnswer)
    assert (answer.request_id, answer.code) == (3, code)
    assert registrar.stats.registration_errors == 1


async def test_a_group_that_batches_longer_than_the_commit_deadline_still_registers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 20 s between batches (policies allow up to 600 s): the deadline counts
    # from the end of the batch, so the first request is answered and makes
    # one rekey, instead of every retry timing out and making another.
    driver = _rekeyer_driver(batch_interval_ms=20_000)
    driver.status.role = RaftRole.LEADER
    rekeyer = _rekeyer(driver)
    registrar = Registrar(driver, rekeyer, (), None, RegistrarSettings(request_timeout_s=15.0))  # type: ignore[arg-type]
    propose = driver.propose

    async def propose_and_apply(data: bytes, timeout_s: float) -> ApplyResult:
        result = await propose(data, timeout_s)
        registrar.on_apply(result)
        return result

    driver.propose = propose_and_apply  # type: ignore[method-assign]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(rekeyer.run)
            link = _MemberLink("m1", cast(Any, None))  # the answer is returned, not written
            request = RegisterRequest("demo", Role.RECEIVER, last_msg_id=0, request_id=1)
            answer = await registrar._register(link, request)
            nursery.cancel_scope.cancel()
    assert isinstance(answer, GsaAnswer)
    assert len(driver.proposed) == 1


async def test_member_connections_have_tcp_keepalive_so_a_vanished_member_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registrar = _registrar(RegistrarSettings())
    seen: list[tuple[int, int]] = []

    async def serve_member(tcp: trio.SocketStream) -> None:
        sock = tcp.socket
        seen.append(
            (
                sock.getsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_KEEPALIVE),
                sock.getsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_KEEPIDLE),
            )
        )

    monkeypatch.setattr(registrar, "_serve_member", serve_member)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", port):
            await registrar._handle(await listeners[0].accept())
    await listeners[0].aclose()
    assert seen == [(1, 60)]


def test_after_a_snapshot_install_connections_of_members_gone_meanwhile_get_no_pushes() -> None:
    # The snapshot skipped the leave of m2 and, on another group, its deletion:
    # no apply ever detached them here.
    cluster = Cluster()
    cluster.join("m1")
    registrar = _registrar(RegistrarSettings())
    links = {member: _MemberLink(member, cast(Any, None)) for member in ("m1", "m2", "m3")}
    for member, group in (("m1", "demo"), ("m2", "demo"), ("m3", "deleted")):
        links[member].groups.add(group)
        registrar._attached[group].add(links[member])
        registrar._connections[member].add(links[member])
    registrar.reconcile(cluster.state)
    assert registrar._attached == {"demo": {links["m1"]}}
    assert [link.groups for link in links.values()] == [{"demo"}, set(), set()]


async def test_a_refused_request_repeated_in_a_loop_is_logged_once_and_counted_each_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = Cluster()

    class _Driver:
        state = cluster.state

    registrar = Registrar(_Driver(), None, (), None, RegistrarSettings())  # type: ignore[arg-type]
    link = _MemberLink("m1", cast(Any, None))
    with caplog.at_level(logging.INFO, logger="gcks.cluster.registrar"):
        for request_id in range(50):
            request = RegisterRequest("nope", Role.RECEIVER, last_msg_id=0, request_id=request_id)
            answer = await registrar._register(link, request)
            assert isinstance(answer, ErrorAnswer)
            assert answer.code is ErrorCode.UNKNOWN_GROUP
    assert registrar.stats.registration_errors == 50
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert [r.getMessage() for r in infos] == [
        "registration of m1 to nope refused: no group 'nope'"
    ]


@pytest.mark.parametrize("still_member", [True, False])
async def test_a_connection_detached_by_a_leave_while_its_join_waited_is_attached_or_refused(
    still_member: bool,
) -> None:
    # Another connection of m1 deregisters: its leave applies between this
    # connection's attach and its own join, and takes this connection along.
    cluster = Cluster()
    cluster.join("m1")

    class _Driver:
        state = cluster.state

    class _LeaveThenJoin:
        async def join(self, group: str, member_id: str, *_: object) -> ApplyResult:
            await trio.lowlevel.checkpoint()
            registrar.detach(group, member_id)
            result = ApplyResult(joined=((group, member_id),))
            registrar.on_apply(result)
            if not still_member:
                cluster.rekey(leaves=[Leave(member_id, LeaveReason.DEREGISTER)])
            return result

    registrar = Registrar(_Driver(), _LeaveThenJoin(), (), None, RegistrarSettings())  # type: ignore[arg-type]
    link = _MemberLink("m1", cast(Any, None))
    request = RegisterRequest("demo", Role.RECEIVER, last_msg_id=0, request_id=5)
    answer = await registrar._register(link, request)
    if still_member:
        assert isinstance(answer, GsaAnswer)
        assert registrar._attached["demo"] == {link}, "it gets the pushes that follow"
    else:
        assert isinstance(answer, ErrorAnswer)
        assert answer.code is ErrorCode.BUSY, "the member registers again"
        assert not registrar._attached


async def test_a_members_connection_ends_when_its_certificate_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No revocation list: an open connection must not outlive its credential,
    # or an expired member could go on re-registering over it.
    registrar = _registrar(RegistrarSettings())
    member, node = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with trio.fail_after(600):
        async with trio.open_nursery() as spawn:
            registrar._spawn = spawn
            identity = Identity(CertRole.MEMBER, "m1")
            await registrar._serve_stream(node, identity, seconds_left=300.0)  # type: ignore[arg-type]
            assert await member.receive_some() == b"", "the node closed the connection"
            spawn.cancel_scope.cancel()
    assert trio.current_time() - start == pytest.approx(300.0)


async def test_the_seconds_a_peer_certificate_has_left_are_read_from_it(tmp_path: Path) -> None:
    layout = pki.pki_init(tmp_path, nodes=["n1"], members=["m1"], admins=[], days=30)
    crt, key = pki.cert_paths(tmp_path, CertRole.NODE, "n1")
    server_context = tls.member_server_context(
        member_ca=layout.member_ca.cert_path, cert=crt, key=key
    )
    member_crt, member_key = pki.cert_paths(tmp_path, CertRole.MEMBER, "m1")
    client_context = member_client_context(
        cluster_ca=layout.cluster_ca.cert_path, cert=member_crt, key=member_key
    )
    server, _ = await handshake(server_context, client_context)
    assert server is not None
    left = tls.peer_seconds_left(server)  # type: ignore[arg-type]
    assert 29 * 86400 < left <= 30 * 86400


async def test_a_member_id_over_its_connection_limit_loses_its_oldest_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One certificate must not hold a share of `max_connections` that starves
    # every other member; the oldest goes, since a restarted member leaves
    # connections behind that only keepalive reaps, and its newest must be served.
    registrar = _registrar(RegistrarSettings(max_connections_per_member=2))

    async def connect(member_id: str, nursery: trio.Nursery) -> trio.abc.Stream:
        member, node = trio.testing.memory_stream_pair()
        identity = Identity(CertRole.MEMBER, member_id)
        nursery.start_soon(registrar._serve_stream, node, identity, 3600.0)
        await trio.testing.wait_all_tasks_blocked()
        return member

    async def closed(stream: trio.abc.Stream) -> bool:
        with trio.move_on_after(60):
            return await stream.receive_some() == b""
        return False  # still open a minute later

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            registrar._spawn = nursery
            first = await connect("m1", nursery)
            second = await connect("m1", nursery)
            other = await connect("m2", nursery)
            assert registrar.stats.evicted == 0, "two of m1 are within its limit"
            third = await connect("m1", nursery)
            assert await closed(first), "m1's oldest connection was closed"
            assert registrar.stats.evicted == 1
            for stream in (second, third, other):
                assert not await closed(stream), "only the oldest of m1 is closed"
            assert {m: len(held) for m, held in registrar._open_by_member.items()} == {
                "m1": 2,
                "m2": 1,
            }
            nursery.cancel_scope.cancel()
    assert not registrar._open_by_member, "closed connections leave nothing behind"
