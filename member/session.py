"""One member's registration connection (REG SA) to one GCKS node.

Opens TLS 1.3 with the member certificate, checks that the far end is a node
(and the expected one), sends requests as length-prefixed frames and reads
answers and unicast rekey pushes from the same stream. Every wait is under a
deadline. A thin trio driver: all judgement about keys is in
`gcks.member.group`.

May import trio and `gcks.proto`, `gcks.member`; never `gcks.cluster`.
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import AsyncIterator
from typing import Any

import trio

from gcks.member.tls import verify_node
from gcks.proto.codec import FrameDecoder, encode_frame
from gcks.proto.errors import ProtocolError
from gcks.proto.messages import (
    DeregisterAnswer,
    DeregisterRequest,
    ErrorAnswer,
    GsaAnswer,
    Message,
    RegisterRequest,
    RekeyPush,
    decode_message,
)
from gcks.proto.policy import Role

_RECEIVE_CHUNK = 65536


class SessionError(Exception):
    """The node could not be reached, refused us, or broke the protocol."""


class Refused(SessionError):
    """The node answered the request with an `ErrorAnswer`."""

    def __init__(self, answer: ErrorAnswer) -> None:
        super().__init__(f"{answer.code.name}: {answer.message}")
        self.answer = answer


class Session:
    """A connected, authenticated registration stream to one node."""

    _ids = itertools.count(1)

    def __init__(self, stream: trio.SSLStream[Any], node_id: str) -> None:
        self._stream = stream
        self.node_id = node_id
        self._decoder = FrameDecoder()
        self._pushes: list[bytes] = []

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        context: ssl.SSLContext,
        *,
        expected_node: str | None,
        timeout_s: float,
    ) -> Session:
        stream: trio.SSLStream[Any] | None = None
        try:
            with trio.fail_after(timeout_s):
                tcp = await trio.open_tcp_stream(host, port)
                stream = trio.SSLStream(tcp, context, server_hostname=None)
                await stream.do_handshake()
                identity = verify_node(stream, expected_node)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ProtocolError) as exc:
            if stream is not None:  # not left to the garbage collector: failovers retry
                await trio.aclose_forcefully(stream)
            raise SessionError(
                f"cannot reach node at {host}:{port}: {exc or type(exc).__name__}"
            ) from exc
        return cls(stream, identity.id)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)

    async def register(
        self,
        group: str,
        role: Role,
        *,
        last_msg_id: int,
        sender_key: bytes | None,
        timeout_s: float,
    ) -> GsaAnswer:
        request_id = next(self._ids)
        request = RegisterRequest(group, role, last_msg_id, request_id, sender_key)
        answer = await self._request(request, request_id, timeout_s)
        if not isinstance(answer, GsaAnswer):
            raise SessionError(f"unexpected answer {type(answer).__name__} to a registration")
        return answer

    async def deregister(self, group: str, *, timeout_s: float) -> None:
        request_id = next(self._ids)
        answer = await self._request(DeregisterRequest(request_id, group), request_id, timeout_s)
        if not isinstance(answer, DeregisterAnswer):
            raise SessionError(f"unexpected answer {type(answer).__name__} to a deregistration")

    async def pushes(self) -> AsyncIterator[bytes]:
        """Rekey datagrams pushed by the node, until the connection ends."""
        while True:
            while self._pushes:
                yield self._pushes.pop(0)
            message = await self._receive()
            if message is None:
                return
            if isinstance(message, RekeyPush):
                yield message.datagram

    async def _request(self, message: Message, request_id: int, timeout_s: float) -> Message:
        # One deadline over the send too: a node that stops reading (a full
        # TCP window) must not hold a failover, or a member leaving, for good.
        try:
            with trio.fail_after(timeout_s):
                await self._send(message)
                return await self._answer(request_id)
        except trio.TooSlowError:
            raise SessionError(f"no answer from {self.node_id} within {timeout_s:.1f} s") from None

    async def _send(self, message: Message) -> None:
        try:
            await self._stream.send_all(encode_frame(message.encode()))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise SessionError(f"connection to {self.node_id} lost") from exc

    async def _answer(self, request_id: int) -> Message:
        while True:
            message = await self._receive()
            if message is None:
                raise SessionError(f"node {self.node_id} closed the connection")
            if isinstance(message, RekeyPush):
                self._pushes.append(message.datagram)
                continue
            if getattr(message, "request_id", None) != request_id:
                raise SessionError(f"node {self.node_id} answered another request")
            if isinstance(message, ErrorAnswer):
                raise Refused(message)
            return message

    async def _receive(self) -> Message | None:
        while True:
            try:
                # The frame header is checked here (a length past the limit), the
                # body by the decoder: either way the node broke the protocol.
                frame = self._decoder.next_frame()
                if frame is not None:
                    return decode_message(frame)
            except ProtocolError as exc:
                raise SessionError(f"node {self.node_id} sent a bad frame: {exc}") from exc
            try:
                data = await self._stream.receive_some(_RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise SessionError(f"connection to {self.node_id} lost") from exc
            if not data:
                return None
            try:
                self._decoder.feed(bytes(data))
            except ProtocolError as exc:
                raise SessionError(f"node {self.node_id} sent a bad frame: {exc}") from exc
