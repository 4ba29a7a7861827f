"""Mutual-TLS listeners of a node: bind, accept, handshake under a deadline,
check the peer's role.

The member listener (`registrar`) and the admin API (`admin`) accept
connections the same way; this module is that way, once. A connection whose
handshake fails, runs past its deadline or presents the wrong role is closed
and reported as `Refused` with a reason fit for a log line. (The peer
transport has its own accept path: it also limits concurrent handshakes and
replaces a peer's older connection.)

May import trio and `gcks.cluster` (config, tls, handshakes), `gcks.proto`.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from gcks.cluster.config import Address
from gcks.cluster.handshakes import HandshakeTurns, TurnTakingStream
from gcks.cluster.tls import verify_peer
from gcks.proto.errors import IdentityError
from gcks.proto.identity import Identity, Role


class Refused(Exception):
    """The connection was closed before it could be served; the message says why."""


async def serve(
    listen: Address,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on every address `listen` resolves to; report the bound addresses."""
    listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    bound = [Address(*listener.socket.getsockname()[:2]) for listener in listeners]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)


async def accept(
    tcp: trio.SocketStream,
    context: ssl.SSLContext,
    role: Role,
    timeout_s: float,
    *,
    turns: HandshakeTurns | None = None,
) -> tuple[trio.SSLStream[Any], Identity]:
    """The TLS stream and the verified identity of an accepted connection, or
    `Refused`. With `turns`, the handshake's CPU steps wait for their turn."""
    transport = tcp if turns is None else TurnTakingStream(tcp, turns)
    stream = trio.SSLStream(transport, context, server_side=True)
    try:
        with trio.fail_after(timeout_s):
            await stream.do_handshake()
        return stream, verify_peer(stream, role)
    except (trio.BrokenResourceError, trio.TooSlowError, IdentityError) as exc:
        await trio.aclose_forcefully(stream)
        raise Refused(str(exc) or type(exc).__name__) from None
    finally:
        if isinstance(transport, TurnTakingStream):
            transport.handshake_done()


def remote(tcp: trio.SocketStream) -> str:
    """`host:port` of the far end, for log lines."""
    try:
        host, port = tcp.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"
