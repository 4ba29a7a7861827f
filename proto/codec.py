"""Stream framing and the msgpack codec with safe limits.

Two independent layers, both payload-agnostic:

- framing: a frame is a 4-byte big-endian length followed by that many bytes.
  `FrameDecoder` is a sans-IO buffer in the style of h11: the caller feeds it
  whatever the socket returned (any split, any size) and pulls whole frames.
  A header announcing more than the maximum is rejected at once, before a
  single byte of the body is buffered, so a peer cannot make us allocate.
- msgpack: `packb`/`unpackb` fix the options every gcks message uses (binary
  and text kept apart, no ext types, no timestamps, lists, string map keys)
  and turn every msgpack failure into `DecodeError`.

Datagrams (UDP probes, rekey messages) are one `packb` payload each, without
a frame header. May import: the standard library, msgpack, `gcks.proto.errors`.
Must never do I/O or log payloads.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

import msgpack  # type: ignore[import-untyped]

from gcks.proto.errors import DecodeError, FrameTooLarge

__all__ = [
    "DEFAULT_MAX_FRAME",
    "FRAME_HEADER_SIZE",
    "FrameDecoder",
    "encode_frame",
    "packb",
    "unpackb",
]

DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024
"""Largest frame payload accepted by default (16 MiB): above the largest GSA or
rekey body (2^16 wrapped keys) with a wide margin, small enough to bound memory."""

_HEADER: Final = struct.Struct(">I")
FRAME_HEADER_SIZE: Final = _HEADER.size
_MAX_ENCODABLE: Final = 0xFFFF_FFFF


def encode_frame(payload: bytes, *, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """`payload` with its 4-byte big-endian length prefix.

    Raises `ValueError` when the payload exceeds `max_size`: that is a local
    bug (we never send what the peer must reject), not a remote fault."""
    if len(payload) > min(max_size, _MAX_ENCODABLE):
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds maximum {max_size}")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Sans-IO reassembly of length-prefixed frames from a byte stream.

    `feed()` bytes as they arrive, then call `next_frame()` (or iterate) until
    it returns `None` / stops. After a `FrameTooLarge` the stream position is
    lost, so the decoder stays failed and every later call raises again: the
    caller must drop the connection.
    """

    __slots__ = ("_buffer", "_failed", "_max_size", "_need", "_start")

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        if not 0 <= max_size <= _MAX_ENCODABLE:
            raise ValueError(f"max_size must be in [0, {_MAX_ENCODABLE}]")
        self._max_size = max_size
        self._buffer = bytearray()
        # Consumed bytes are skipped by offset and compacted lazily, so that
        # pulling many small frames out of one large read stays linear.
        self._start = 0
        self._need: int | None = None  # body length once a header has been read
        self._failed: FrameTooLarge | None = None

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return (
            len(self._buffer) - self._start + (FRAME_HEADER_SIZE if self._need is not None else 0)
        )

    def feed(self, data: bytes) -> None:
        """Append bytes received from the stream."""
        if self._failed is not None:
            raise self._failed
        if self._start and self._start * 2 >= len(self._buffer):
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete frame payload, or `None` when more bytes are needed.

        Raises `FrameTooLarge` as soon as a header announces more than
        `max_size` bytes, however few body bytes have arrived."""
        if self._failed is not None:
            raise self._failed
        available = len(self._buffer) - self._start
        if self._need is None:
            if available < FRAME_HEADER_SIZE:
                return None
            (length,) = _HEADER.unpack_from(self._buffer, self._start)
            if length > self._max_size:
                self._failed = FrameTooLarge(
                    f"frame announces {length} bytes, maximum is {self._max_size}"
                )
                raise self._failed
            self._start += FRAME_HEADER_SIZE
            available -= FRAME_HEADER_SIZE
            self._need = length
        if available < self._need:
            return None
        end = self._start + self._need
        frame = bytes(self._buffer[self._start : end])
        self._start = end
        self._need = None
        return frame

    def __iter__(self) -> Iterator[bytes]:
        """Every complete frame currently buffered."""
        while (frame := self.next_frame()) is not None:
            yield frame

    def feed_eof(self) -> None:
        """The stream ended: raise `DecodeError` if it ended inside a frame."""
        if self._failed is not None:
            raise self._failed
        if self.buffered:
            raise DecodeError(f"stream ended inside a frame ({self.buffered} bytes pending)")


def _reject_ext(code: int, data: bytes) -> object:
    raise ValueError("msgpack ext types are not part of the gcks protocol")


def packb(obj: object) -> bytes:
    """Encode plain values (None, bool, int, bytes, str, list/tuple, dict) to msgpack.

    Raises `TypeError`/`OverflowError` for anything else: a local bug."""
    result = msgpack.packb(obj, use_bin_type=True, datetime=False)
    assert isinstance(result, bytes)
    return result


def _untrusted(max_size: int) -> dict[str, object]:
    """msgpack's decoding options for untrusted bytes of at most `max_size`."""
    return {
        "raw": False,
        "use_list": True,
        "strict_map_key": True,
        "ext_hook": _reject_ext,
        "timestamp": 0,
        "max_str_len": max_size,
        "max_bin_len": max_size,
        "max_array_len": max_size,
        "max_map_len": max_size,
        # A zero ext length makes msgpack refuse timestamps (ext -1), which
        # bypass ext_hook; every other ext reaches `_reject_ext`.
        "max_ext_len": 0,
    }


def unpackb(data: bytes, *, max_size: int = DEFAULT_MAX_FRAME) -> object:
    """Decode exactly one msgpack value from untrusted `data`.

    Raises `DecodeError` for oversize input, malformed or truncated msgpack,
    trailing bytes, nesting too deep, non-string map keys, ext types and
    timestamps, or invalid UTF-8 in strings. Arrays come back as lists."""
    if len(data) > max_size:
        raise DecodeError(f"message of {len(data)} bytes exceeds maximum {max_size}")
    try:
        return msgpack.unpackb(data, **_untrusted(max_size))
    except (ValueError, msgpack.UnpackException, RecursionError) as exc:
        # ValueError covers msgpack's ExtraData, FormatError, StackError and
        # UnicodeDecodeError; the cause is kept for debugging, not for the peer.
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}") from exc


def array_ends(data: bytes) -> tuple[int, object, object]:
    """The length of the msgpack array `data`, and its first and last items,
    skipping the ones between without building them: a look at a large
    document's header and trailer (a snapshot's format and newest command
    version) that costs a fraction of decoding it. Raises `DecodeError` if
    `data` is not one non-empty array."""
    size = max(len(data), 1)
    unpacker = msgpack.Unpacker(max_buffer_size=size, **_untrusted(size))
    try:
        unpacker.feed(data)
        length = unpacker.read_array_header()
        if length == 0:
            raise DecodeError("expected a non-empty array")
        first = last = unpacker.unpack()
        if length > 1:
            for _ in range(length - 2):
                unpacker.skip()
            last = unpacker.unpack()
    except (ValueError, msgpack.UnpackException, msgpack.OutOfData, RecursionError) as exc:
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}") from exc
    if unpacker.tell() != len(data):
        raise DecodeError("trailing bytes after the array")
    return length, first, last
