"""Specification of stream framing and the safe msgpack codec."""

from __future__ import annotations

import contextlib
import itertools

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcks.proto.codec import (
    DEFAULT_MAX_FRAME,
    FRAME_HEADER_SIZE,
    FrameDecoder,
    array_ends,
    encode_frame,
    packb,
    unpackb,
)
from gcks.proto.errors import DecodeError, FrameTooLarge


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def test_frame_header_is_four_byte_big_endian_length() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert FRAME_HEADER_SIZE == 4


def test_encode_frame_refuses_payload_over_maximum() -> None:
    with pytest.raises(ValueError, match="exceeds maximum"):
        encode_frame(b"x" * 11, max_size=10)


@given(
    frames=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
@settings(max_examples=300)
def test_frame_decoder_reassembles_frames_at_any_split_points(
    frames: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(f, max_size=300) for f in frames)
    decoder = FrameDecoder(max_size=300)
    out: list[bytes] = []
    for chunk in _split(stream, cuts):
        decoder.feed(chunk)
        out.extend(decoder)
    assert out == frames
    assert decoder.buffered == 0
    decoder.feed_eof()


def test_frame_decoder_byte_by_byte_returns_none_until_complete() -> None:
    decoder = FrameDecoder()
    stream = encode_frame(b"hello")
    for byte in stream[:-1]:
        decoder.feed(bytes([byte]))
        assert decoder.next_frame() is None
    decoder.feed(stream[-1:])
    assert decoder.next_frame() == b"hello"
    assert decoder.next_frame() is None


def test_frame_too_large_raised_from_header_alone_and_decoder_stays_failed() -> None:
    decoder = FrameDecoder(max_size=1024)
    decoder.feed((1025).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"more")
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_frame_decoder_default_limit_is_16_mib() -> None:
    decoder = FrameDecoder()
    assert decoder.max_size == DEFAULT_MAX_FRAME == 16 * 1024 * 1024
    decoder.feed((DEFAULT_MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_eof_inside_frame_is_a_decode_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"abc")[:5])
    assert decoder.next_frame() is None
    with pytest.raises(DecodeError, match="stream ended inside a frame"):
        decoder.feed_eof()


def test_empty_frame_is_a_valid_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b""))
    assert decoder.next_frame() == b""


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=300), max_size=6))
@settings(max_examples=500)
def test_frame_decoder_on_random_bytes_raises_only_frame_too_large(
    data: bytes, cuts: list[int]
) -> None:
    decoder = FrameDecoder(max_size=64)
    try:
        for chunk in _split(data, cuts):
            decoder.feed(chunk)
            for frame in decoder:
                assert len(frame) <= 64
    except FrameTooLarge:
        pass


_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@given(_plain)
@settings(max_examples=300)
def test_packb_unpackb_round_trip_plain_values(value: object) -> None:
    assert unpackb(packb(value)) == value


@given(st.binary(max_size=300))
@settings(max_examples=800)
def test_unpackb_on_random_bytes_raises_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        unpackb(data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xd6\xff\x00\x00\x00\x01", "timestamp ext"),
        (b"\xd4\x05\x00", "application ext"),
        (b"\xc7\x00\x05", "empty ext"),
        (b"\x91" * 100_000, "nesting too deep"),
        (b"\xa1\xff", "invalid utf-8"),
        (b"\x81\x01\x02", "integer map key"),
        (b"\x01\x02", "trailing bytes"),
        (b"", "empty input"),
        (b"\x92\x01", "truncated array"),
        (b"\xc1", "reserved byte"),
        (b"\xdd\xff\xff\xff\xff", "absurd array length"),
    ],
)
def test_unpackb_rejects_unsafe_or_malformed_input(data: bytes, why: str) -> None:
    with pytest.raises(DecodeError):
        unpackb(data)


def test_unpackb_rejects_input_over_max_size_before_parsing() -> None:
    with pytest.raises(DecodeError, match="exceeds maximum"):
        unpackb(msgpack.packb(b"x" * 100), max_size=50)


def test_unpackb_keeps_bin_and_str_apart_and_returns_lists() -> None:
    assert unpackb(packb([b"a", "a", (1, 2)])) == [b"a", "a", [1, 2]]


def test_array_ends_reads_the_length_and_first_and_last_items() -> None:
    document = msgpack.packb([3, "x" * 1000, list(range(100)), 7])
    assert array_ends(document) == (4, 3, 7)
    assert array_ends(msgpack.packb([5])) == (1, 5, 5)


def test_array_ends_builds_nothing_between_the_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    # The items between are skipped, never built: a hook that fails on any
    # map built shows it (the middle item is the only map).
    document = msgpack.packb([3, {"big": list(range(1000))}, 7])
    built: list[object] = []
    original = msgpack.Unpacker

    def unpacker(*args: object, **kwargs: object) -> msgpack.Unpacker:
        return original(*args, **{**kwargs, "object_pairs_hook": built.append})

    monkeypatch.setattr(msgpack, "Unpacker", unpacker)
    assert array_ends(document) == (3, 3, 7)
    assert built == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        msgpack.packb([]),
        msgpack.packb({"format": 3}),
        msgpack.packb(7),
        msgpack.packb([1, 2])[:1],  # the header alone, no first item
        msgpack.packb([1, 2, 3])[:-1],  # cut short before the last item
        msgpack.packb([1, 2]) + b"\x01",  # something after the array
        b"\x92\xc7\x01\x05x",  # an ext type as the first item
    ],
)
def test_array_ends_refuses_what_is_not_one_non_empty_array(data: bytes) -> None:
    with pytest.raises(DecodeError):
        array_ends(data)
