"""The member listener's resource bounds: connections and writes under limits.

A member that stops reading, or a flood of connections, must cost the node a
bounded amount of memory and time: the listener refuses connections beyond
its limit and cuts off a member whose pushes cannot be written in time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
import trio.testing

from gcks.cluster import pki, tls
from gcks.cluster.config import Address
from gcks.cluster.registrar import Registrar, RegistrarSettings, _MemberLink
from gcks.cluster.state import ApplyResult
from gcks.member.tls import member_client_context
from gcks.proto.codec import encode_frame
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
from tests.cluster.test_state import Cluster


def _registrar(settings: RegistrarSettings, root: Path | None = None) -> Registrar:
    context = None
    if root is not None:
        pki.pki_init(root, nodes=["n1"], members=["m1"], admins=[])
        context = tls.member_server_context(
            member_ca=root / "ca/member.crt", cert=root / "node/n1.crt", key=root / "node/n1.key"
        )
    # Neither test reaches registration: no driver, rekeyer or node list needed.
    return Registrar(None, None, (), context, settings)  # type: ignore[arg-type]


async def test_member_that_stops_reading_is_cut_off_after_the_write_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registrar = _registrar(RegistrarSettings(write_timeout_s=7.0))
    _client, server = trio.testing.lockstep_stream_pair()  # nobody reads `_client`
    link = _MemberLink("m1", 4)
    link.send.send_nowait(b"a rekey push")
    connection = trio.CancelScope()
    start = trio.current_time()
    with trio.fail_after(60):
        await registrar._writer(server, link, connection)  # type: ignore[arg-type]
    assert trio.current_time() - start == pytest.approx(7.0)
    assert connection.cancel_called, "the reader must not wait on a queue nobody drains"


class _RecordingStream:
    """Records each `send_all` as one write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        await trio.lowlevel.checkpoint()


async def test_writer_sends_queued_frames_in_order_in_one_write_and_idles_without_a_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registrar = _registrar(RegistrarSettings(write_timeout_s=7.0))
    stream = _RecordingStream()
    link = _MemberLink("m1", 8)
    for frame in (b"answer", b"push-1", b"push-2"):
        link.send.send_nowait(frame)
    connection = trio.CancelScope()
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(registrar._writer, stream, link, connection)
            await trio.sleep(70.0)  # ten write deadlines of idling: no cut-off
            assert stream.writes == [b"answerpush-1push-2"]
            assert not connection.cancel_called
            link.send.send_nowait(b"push-3")
            await trio.sleep(1.0)
            assert stream.writes[1:] == [b"push-3"]
            nursery.cancel_scope.cancel()


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
    link = _MemberLink("m1", 4)
    request = RegisterRequest("demo", Role.RECEIVER, last_msg_id=0, request_id=7)
    await member.send_all(encode_frame(request.encode()))
    await member.aclose()
    with trio.fail_after(10):
        await registrar._reader(node, link)  # type: ignore[arg-type]
        frame = link.outgoing.receive_nowait()
    answer = decode_message(frame[4:])
    assert isinstance(answer, ErrorAnswer)
    assert (answer.request_id, answer.code) == (7, ErrorCode.INTERNAL)


async def test_a_sender_join_refused_for_room_is_answered_group_full() -> None:
    cluster = Cluster()

    class _Driver:
        state = cluster.state

    class _FullRekeyer:
        async def join(self, group: str, member_id: str, *_: object) -> ApplyResult:
            await trio.lowlevel.checkpoint()
            return ApplyResult(full=((group, member_id),))

    registrar = Registrar(_Driver(), _FullRekeyer(), (), None, RegistrarSettings())  # type: ignore[arg-type]
    link = _MemberLink("s9", 4)
    request = RegisterRequest("demo", Role.SENDER, last_msg_id=0, request_id=3)
    answer = await registrar._register(link, request)
    assert isinstance(answer, ErrorAnswer)
    assert (answer.request_id, answer.code) == (3, ErrorCode.GROUP_FULL)
    assert registrar.stats.registration_errors == 1
