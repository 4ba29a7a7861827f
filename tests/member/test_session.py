"""A member's registration connection: every fault of the node or the wire is a
`SessionError` (which the member answers by failing over), never another
exception that would end the member."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import trio
import trio.testing

from gcks.cluster import pki
from gcks.cluster.tls import member_server_context
from gcks.member.session import Session, SessionError
from gcks.member.tls import member_client_context
from gcks.proto.identity import Role as CertRole
from gcks.proto.policy import Role

_PAST_THE_LIMIT = struct.pack(">I", 0xFFFF_FFFF)  # a frame length far over the member's limit


def _session() -> tuple[Session, trio.abc.Stream]:
    client, node = trio.testing.memory_stream_pair()
    return Session(client, "n1"), node  # type: ignore[arg-type]  # only send/receive are used


async def test_a_frame_header_past_the_limit_in_an_answer_is_a_session_error() -> None:
    session, node = _session()
    await node.send_all(_PAST_THE_LIMIT)
    with pytest.raises(SessionError, match="bad frame"):
        await session.register("demo", Role.RECEIVER, last_msg_id=0, sender_key=None, timeout_s=5)


async def test_a_frame_header_past_the_limit_in_a_push_is_a_session_error() -> None:
    session, node = _session()
    await node.send_all(_PAST_THE_LIMIT)
    with pytest.raises(SessionError, match="bad frame"):
        async for _ in session.pushes():
            pass


async def test_a_node_that_reads_nothing_cannot_hold_a_registration_past_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A lockstep stream: send_all waits until the far end reads, which it never does.
    client, _node = trio.testing.lockstep_stream_pair()
    session = Session(client, "n1")  # type: ignore[arg-type]  # only send/receive are used
    with trio.fail_after(60), pytest.raises(SessionError, match=r"no answer from n1 within 5\.0 s"):
        await session.register("demo", Role.RECEIVER, last_msg_id=0, sender_key=None, timeout_s=5)


async def test_a_node_that_reads_nothing_cannot_hold_a_deregistration_past_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, _node = trio.testing.lockstep_stream_pair()
    session = Session(client, "n1")  # type: ignore[arg-type]
    with trio.fail_after(60), pytest.raises(SessionError, match=r"no answer from n1 within 5\.0 s"):
        await session.deregister("demo", timeout_s=5)


async def test_a_node_with_the_wrong_identity_is_hung_up_on_at_once(tmp_path: Path) -> None:
    layout = pki.pki_init(tmp_path, nodes=["n1"], members=["m1"], admins=[])
    crt, key = pki.cert_paths(layout.directory, CertRole.NODE, "n1")
    server_context = member_server_context(member_ca=layout.member_ca.cert_path, cert=crt, key=key)
    member_crt, member_key = pki.cert_paths(layout.directory, CertRole.MEMBER, "m1")
    client_context = member_client_context(
        cluster_ca=layout.cluster_ca.cert_path, cert=member_crt, key=member_key
    )
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: list[bytes] = []

    async def node() -> None:
        tcp = await listeners[0].accept()
        stream = trio.SSLStream(tcp, server_context, server_side=True)
        try:
            await stream.do_handshake()
            seen.append(bytes(await stream.receive_some(100)))
        except trio.BrokenResourceError:
            seen.append(b"")
        finally:
            await trio.aclose_forcefully(stream)

    with trio.fail_after(20):  # a bound on a hang, not a timing check
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node)
            with pytest.raises(SessionError, match="cannot reach node") as caught:
                await Session.connect(
                    "127.0.0.1", port, client_context, expected_node="n2", timeout_s=10
                )
            # The error (and the frames it holds) is still alive here: the
            # connection must have been closed, not left to the garbage collector.
            assert caught.value is not None
    assert seen == [b""]
    await listeners[0].aclose()
