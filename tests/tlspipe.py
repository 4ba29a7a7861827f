"""TLS handshakes over an in-memory pipe, for tests of contexts and certificates."""

from __future__ import annotations

import ssl

import trio
import trio.testing

Side = trio.SSLStream[
    trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]
]


async def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[Side | None, Side | None]:
    """Handshake over an in-memory pipe; each side is its stream, or None if it failed."""
    left, right = trio.testing.memory_stream_pair()
    server = trio.SSLStream(left, server_ctx, server_side=True)
    client = trio.SSLStream(right, client_ctx, server_hostname=None)
    done: dict[str, Side | None] = {}

    async def shake(name: str, stream: Side) -> None:
        try:
            await stream.do_handshake()
            done[name] = stream
        except trio.BrokenResourceError:
            done[name] = None
            await trio.aclose_forcefully(stream)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shake, "server", server)
            nursery.start_soon(shake, "client", client)
    return done["server"], done["client"]


def peer_certificate(side: Side | None) -> bytes:
    """DER of the certificate the other end presented to `side` (which must have
    completed its handshake)."""
    assert side is not None, "the handshake failed"
    der = side.getpeercert(binary_form=True)
    assert der is not None
    return der
