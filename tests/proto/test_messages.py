"""Specification of the member/cluster messages and the rekey body."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcks.proto import messages as wire
from gcks.proto.codec import FrameDecoder, encode_frame
from gcks.proto.errors import DecodeError, UnsupportedVersion
from gcks.proto.messages import (
    MAX_DATAGRAM,
    PROTOCOL_VERSION,
    DeregisterAnswer,
    DeregisterRequest,
    ErrorAnswer,
    ErrorCode,
    GsaAnswer,
    KekUpdate,
    Message,
    MessageType,
    NodeEndpoint,
    ProbeRequest,
    ProbeResponse,
    RegisterRequest,
    RekeyBody,
    RekeyPush,
    _read_path_key,
    _read_wrapped_key,
    decode_message,
    parse_host_port,
    read_key_sa,
)
from gcks.proto.policy import Authorization, GroupPolicy, MulticastEndpoint, Role
from gcks.proto.sa import MAX_SPI, CipherSuite, KeySA, PathKey, WrappedKey

U64 = 2**64 - 1

group_ids = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
node_ids = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
keys = st.binary(min_size=32, max_size=32)
u64 = st.integers(0, U64)
spis = st.integers(1, MAX_SPI)
suites = st.sampled_from(CipherSuite)
texts = st.text(st.characters(blacklist_categories=["Cc", "Cs"]), max_size=256)


@st.composite
def key_sas(draw: st.DrawFn) -> KeySA:
    activation = draw(st.integers(0, 2**62))
    expiry = draw(st.integers(activation + 1, 2**63 - 1))
    return KeySA(draw(spis), draw(suites), draw(keys), activation, expiry)


def unique_key_sas(max_size: int = 4) -> st.SearchStrategy[tuple[KeySA, ...]]:
    return st.lists(key_sas(), max_size=max_size, unique_by=lambda sa: sa.spi).map(tuple)


path_keys = st.builds(PathKey, node=u64, version=u64, key=keys)
wrapped_keys = st.builds(
    WrappedKey,
    node=u64,
    version=u64,
    under=u64,
    under_version=u64,
    wrapped=st.binary(min_size=40, max_size=40),
)
addresses = st.one_of(
    st.sampled_from(["gcks-0.gcks.svc.cluster.local", "10.0.0.1", "localhost", "a-b.example."]),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
).flatmap(lambda host: st.integers(1, 65535).map(lambda port: f"{host}:{port}"))
endpoints = st.builds(NodeEndpoint, node_id=node_ids, member_addr=addresses, probe_addr=addresses)
sender_keys = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), keys), max_size=4, unique_by=lambda pair: pair[0]
).map(tuple)


@st.composite
def policies(draw: st.DrawFn, group_id: str | None = None) -> GroupPolicy:
    return GroupPolicy(
        group_id=group_id if group_id is not None else draw(group_ids),
        multicast=MulticastEndpoint(
            draw(
                st.sampled_from(
                    [ipaddress.ip_address("239.1.2.3"), ipaddress.ip_address("ff15::9")]
                )
            ),
            draw(st.integers(1, 65535)),
        ),
        authorize=tuple(
            Authorization(pattern, frozenset(roles))
            for pattern, roles in draw(
                st.lists(
                    st.tuples(
                        st.from_regex(r"[a-z*?]{1,8}", fullmatch=True),
                        st.sets(st.sampled_from(Role)),
                    ),
                    max_size=3,
                    unique_by=lambda entry: entry[0],
                )
            )
        ),
        tek_lifetime_s=draw(st.integers(60, 86400)),
        source_auth=draw(st.booleans()),
        cipher_suite=draw(suites),
    )


@st.composite
def gsa_answers(draw: st.DrawFn) -> GsaAnswer:
    group = draw(group_ids)
    return GsaAnswer(
        request_id=draw(u64),
        group=group,
        policy=draw(policies(group)),
        kek=draw(key_sas()),
        teks=draw(unique_key_sas()),
        path_keys=tuple(draw(st.lists(path_keys, max_size=5, unique_by=lambda key: key.node))),
        leaf=draw(u64),
        rekey_verify_key=draw(keys),
        msg_id=draw(u64),
        sender_id=draw(st.none() | st.integers(0, 2**32 - 1)),
        sender_verify_keys=draw(sender_keys),
        nodes=tuple(draw(st.lists(endpoints, max_size=3, unique_by=lambda n: n.node_id))),
    )


kek_updates = st.integers(0, 2**62).flatmap(
    lambda activation: st.builds(
        KekUpdate,
        spi=spis,
        suite=suites,
        activation_ms=st.just(activation),
        expiry_ms=st.integers(activation + 1, 2**63 - 1),
        root_version=u64,
    )
)

rekey_bodies = st.builds(
    RekeyBody,
    kek=st.none() | kek_updates,
    teks=unique_key_sas(),
    deactivate=st.lists(
        st.tuples(spis, st.integers(0, 2**63 - 1)), max_size=3, unique_by=lambda p: p[0]
    ).map(tuple),
    lkh=st.lists(wrapped_keys, max_size=6).map(tuple),
    policy=st.none() | policies(),
    sender_keys_added=sender_keys,
    sender_keys_removed=st.lists(st.integers(0, 2**32 - 1), max_size=3, unique=True).map(tuple),
    terminate=st.booleans(),
    reason=texts,
)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        RegisterRequest,
        group=group_ids,
        role=st.sampled_from(Role),
        last_msg_id=u64,
        request_id=u64,
        sender_key=st.none() | st.binary(min_size=32, max_size=32),
    ),
    gsa_answers(),
    st.builds(
        ErrorAnswer,
        request_id=u64,
        code=st.sampled_from(ErrorCode),
        message=texts,
        leader_hint=st.none() | texts,
    ),
    st.builds(DeregisterRequest, request_id=u64, group=group_ids),
    st.builds(DeregisterAnswer, request_id=u64, group=group_ids),
    st.builds(RekeyPush, datagram=st.binary(min_size=1, max_size=200)),
    st.builds(ProbeRequest, nonce=st.binary(min_size=16, max_size=16)),
    st.builds(ProbeResponse, nonce=st.binary(min_size=16, max_size=16), node_id=node_ids),
)


def _sample_gsa() -> GsaAnswer:
    policy = GroupPolicy("g1", MulticastEndpoint(ipaddress.IPv4Address("239.1.2.3"), 5000))
    return GsaAnswer(
        request_id=7,
        group="g1",
        policy=policy,
        kek=KeySA(1, CipherSuite.AES_256_GCM, b"K" * 32, 0, 10),
        teks=(KeySA(2, CipherSuite.AES_256_GCM, b"T" * 32, 0, 10),),
        path_keys=(PathKey(1, 0, b"P" * 32),),
        leaf=4,
        rekey_verify_key=b"V" * 32,
        msg_id=3,
        sender_id=None,
        sender_verify_keys=(),
        nodes=(NodeEndpoint("n1", "n1.example:7000", "[::1]:7001"),),
    )


def _fields_of(message: Message | RekeyBody) -> list[Any]:
    decoded = msgpack.unpackb(message.encode(), raw=False)
    assert isinstance(decoded, list)
    return decoded


# --- round trips -------------------------------------------------------------


@given(messages)
@settings(max_examples=300)
def test_every_message_round_trips(message: Message) -> None:
    data = message.encode()
    assert decode_message(data) == message
    assert decode_message(data).encode() == data


@given(rekey_bodies)
@settings(max_examples=200)
def test_rekey_body_round_trips_and_encoding_is_deterministic(body: RekeyBody) -> None:
    data = body.encode()
    decoded = RekeyBody.decode(data)
    assert decoded == body
    assert decoded.encode() == data


@given(messages)
@settings(max_examples=100)
def test_messages_travel_as_stream_frames(message: Message) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(message.encode()))
    (frame,) = list(decoder)
    assert decode_message(frame) == message


def test_probe_messages_fit_a_datagram() -> None:
    response = ProbeResponse(b"\x00" * 16, "n" * 64)
    assert decode_message(response.encode(), max_size=MAX_DATAGRAM) == response
    assert len(ProbeRequest(b"\x00" * 16).encode()) < 32


# --- envelope rules ----------------------------------------------------------


def test_envelope_is_version_type_then_fields() -> None:
    data = RegisterRequest("g1", Role.SENDER, 5, 9).encode()
    assert msgpack.unpackb(data) == [
        PROTOCOL_VERSION,
        MessageType.REGISTER_REQUEST,
        "g1",
        "sender",
        5,
        9,
        None,
    ]


@pytest.mark.parametrize("version", [0, 2, 255])
def test_other_protocol_version_is_unsupported_version(version: int) -> None:
    fields = _fields_of(ProbeRequest(b"\x01" * 16))
    fields[0] = version
    with pytest.raises(UnsupportedVersion):
        decode_message(msgpack.packb(fields))


def test_unknown_type_code_is_decode_error() -> None:
    with pytest.raises(DecodeError, match=r"envelope\.type"):
        decode_message(msgpack.packb([PROTOCOL_VERSION, 99, b"x"]))


def test_rekey_body_is_not_a_standalone_message() -> None:
    with pytest.raises(DecodeError, match="not a standalone message"):
        decode_message(RekeyBody().encode())
    with pytest.raises(DecodeError, match="expected a rekey body"):
        RekeyBody.decode(ProbeRequest(b"\x01" * 16).encode())


def test_extra_or_missing_field_is_decode_error() -> None:
    fields = _fields_of(DeregisterRequest(1, "g1"))
    with pytest.raises(DecodeError, match="DeregisterRequest: expected 2 fields, got 3"):
        decode_message(msgpack.packb([*fields, 0]))
    with pytest.raises(DecodeError, match="DeregisterRequest: expected 2 fields, got 1"):
        decode_message(msgpack.packb(fields[:-1]))


@pytest.mark.parametrize(
    ("index", "value", "field"),
    [
        (6, [[1, "aes-256-gcm", b"K" * 31, 0, 10]], r"GsaAnswer\.teks\[0\]\.key"),
        (6, [[0, "aes-256-gcm", b"K" * 32, 0, 10]], r"GsaAnswer\.teks\[0\]\.spi"),
        (6, [[1, "aes-128-cbc", b"K" * 32, 0, 10]], r"GsaAnswer\.teks\[0\]\.suite"),
        (6, [[1, "aes-256-gcm", b"K" * 32, 10, 10]], r"GsaAnswer\.teks\[0\]\.expiry_ms"),
        (
            6,
            [[1, "aes-256-gcm", b"K" * 32, 0, 10], [1, "aes-256-gcm", b"L" * 32, 0, 10]],
            r"GsaAnswer\.teks\[1\]: duplicate SPI",
        ),
        (6, [[1, "aes-256-gcm", b"K" * 32, 0, 10]] * 65, r"GsaAnswer\.teks: 65 items"),
        (3, "other", r"GsaAnswer\.policy: group_id differs"),
        (4, {"group_id": "g1"}, r"GsaAnswer\.policy: invalid policy"),
        (9, b"V" * 33, r"GsaAnswer\.rekey_verify_key"),
        (11, True, r"GsaAnswer\.sender_id"),
        (12, [[1, b"S" * 32], [1, b"S" * 32]], r"GsaAnswer\.sender_verify_keys\[1\]: duplicate"),
        (13, [["n1", "nohost", "a:1"]], r"GsaAnswer\.nodes\[0\]\.member_addr"),
        (13, [["n 1", "a:1", "a:1"]], r"GsaAnswer\.nodes\[0\]\.node_id"),
        (13, [["n1", "a:1", "a:0"]], r"GsaAnswer\.nodes\[0\]\.probe_addr"),
        (7, [[1, 0, b"K" * 32], [2, 0, b"K" * 31]], r"GsaAnswer\.path_keys\[1\]\.key"),
        (7, [[1, 0, b"K" * 32], [2, True, b"K" * 32]], r"GsaAnswer\.path_keys\[1\]\.version"),
        (8, -1, r"GsaAnswer\.leaf"),
        (2, "7", r"GsaAnswer\.request_id"),
    ],
)
def test_invalid_gsa_field_is_decode_error_naming_the_field(
    index: int, value: object, field: str
) -> None:
    fields = _fields_of(_sample_gsa())
    fields[index] = value
    with pytest.raises(DecodeError, match=field):
        decode_message(msgpack.packb(fields))


@pytest.mark.parametrize(
    ("index", "value", "field"),
    [
        (2, [1, "aes-256-gcm", 5, 5, 0], r"RekeyBody\.kek\.expiry_ms"),
        (2, [1, "aes-256-gcm", b"K" * 32, 0, 5, 0], r"RekeyBody\.kek: expected 5 fields"),
        (4, [[1, 5], [1, 6]], r"RekeyBody\.deactivate\[1\]: duplicate SPI"),
        (5, [[1, 0, 2, 0, b"W" * 39]], r"RekeyBody\.lkh\[0\]\.wrapped"),
        (9, 0, r"RekeyBody\.terminate"),
        (10, "evict\nm3", r"RekeyBody\.reason"),
        (10, "x" * 257, r"RekeyBody\.reason"),
        (8, [1, 1], r"RekeyBody\.sender_keys_removed\[1\]: duplicate"),
    ],
)
def test_invalid_rekey_body_field_is_decode_error_naming_the_field(
    index: int, value: object, field: str
) -> None:
    fields = _fields_of(RekeyBody())
    fields[index] = value
    with pytest.raises(DecodeError, match=field):
        RekeyBody.decode(msgpack.packb(fields))


_near_valid_int = st.sampled_from([-1, 0, 1, 2, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1, 2**64])
_near_valid_field = (
    _near_valid_int
    | st.booleans()
    | st.none()
    | st.binary(min_size=30, max_size=42)
    | st.sampled_from([suite.value for suite in CipherSuite] + ["aes-128-gcm", ""])
)


_VALID_RECORDS: dict[str, list[object]] = {
    "read_key_sa": [7, "aes-256-gcm", b"K" * 32, 10, 20],
    "_read_path_key": [3, 1, b"K" * 32],
    "_read_wrapped_key": [3, 1, 6, 0, b"W" * 40],
}


@given(
    st.sampled_from(sorted(_VALID_RECORDS)),
    st.lists(st.tuples(st.integers(0, 5), _near_valid_field), max_size=2),
    st.sampled_from([0, 0, 0, -1, 1]),
)
@settings(max_examples=2000)
def test_record_readers_fast_path_agrees_with_the_field_readers(
    reader_name: str, changes: list[tuple[int, object]], resize: int
) -> None:
    # The hot readers check a valid list inline and send anything else through
    # the per-field readers; a tuple always takes the per-field path, so the
    # two paths must agree on every input: the same record, or both refuse.
    reader = {
        "read_key_sa": read_key_sa,
        "_read_path_key": _read_path_key,
        "_read_wrapped_key": _read_wrapped_key,
    }[reader_name]
    record = list(_VALID_RECORDS[reader_name])
    for index, value in changes:
        record[index % len(record)] = value
    if resize < 0:
        record.pop()
    elif resize > 0:
        record.append(0)
    outcomes: list[object] = []
    for value in (record, tuple(record)):
        try:
            outcomes.append(reader(value, "r"))
        except DecodeError:
            outcomes.append(DecodeError)
    assert outcomes[0] == outcomes[1]


def test_encode_refuses_invalid_local_values() -> None:
    with pytest.raises(ValueError, match=r"ProbeRequest\.nonce"):
        ProbeRequest(b"short").encode()
    with pytest.raises(ValueError, match=r"RekeyBody\.teks\[0\]\.key"):
        RekeyBody(teks=(KeySA(1, CipherSuite.AES_256_GCM, b"k", 0, 1),)).encode()


def test_encoding_a_gsa_checks_all_but_its_typed_policy() -> None:
    gsa = _sample_gsa()
    other = GroupPolicy("g2", gsa.policy.multicast)
    with pytest.raises(ValueError, match=r"GsaAnswer\.policy: group_id differs"):
        dataclasses.replace(gsa, policy=other).encode()
    with pytest.raises(ValueError, match=r"GsaAnswer\.path_keys\[0\]\.key"):
        dataclasses.replace(gsa, path_keys=(PathKey(1, 0, b"short"),)).encode()
    with pytest.raises(ValueError, match=r"GsaAnswer\.nodes\[0\]\.member_addr"):
        dataclasses.replace(gsa, nodes=(NodeEndpoint("n1", "no port", "[::1]:7001"),)).encode()
    # The policy's own constructor is its check; the bytes still carry all of it.
    assert decode_message(gsa.encode()) == gsa


def test_a_gsas_policy_is_not_read_back_on_encode_but_is_read_on_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gsa = _sample_gsa()
    data = gsa.encode()

    def refuse(value: object, name: str) -> GroupPolicy:
        raise DecodeError(f"{name}: read")

    monkeypatch.setattr(wire, "_read_policy", refuse)
    assert gsa.encode() == data
    with pytest.raises(DecodeError, match=r"GsaAnswer\.policy: read"):
        decode_message(data)


@pytest.mark.parametrize("text", ["line\x1b[31m", "two\nlines", "c1\x9b31m", "nul\x00"])
def test_error_answer_text_rejects_control_characters(text: str) -> None:
    fields = _fields_of(ErrorAnswer(1, ErrorCode.NOT_LEADER, "x", None))
    fields[4] = text
    with pytest.raises(DecodeError, match=r"ErrorAnswer\.message"):
        decode_message(msgpack.packb(fields))


def test_node_endpoint_splits_addresses_for_connecting() -> None:
    node = NodeEndpoint("n1", "gcks-0.svc:7000", "[2001:db8::1]:7001")
    assert node.member_host_port == ("gcks-0.svc", 7000)
    assert node.probe_host_port == ("2001:db8::1", 7001)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gcks-0.svc:7000", ("gcks-0.svc", 7000)),
        ("10.1.2.3:1", ("10.1.2.3", 1)),
        ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
    ],
)
def test_parse_host_port_accepts_names_and_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, "addr") == expected


@pytest.mark.parametrize(
    "text", ["host", "host:", ":80", "host:65536", "2001:db8::1:80", "[zz::1]:80", "a b:80", "-a:1"]
)
def test_parse_host_port_rejects_malformed_addresses(text: str) -> None:
    with pytest.raises(DecodeError, match="addr"):
        parse_host_port(text, "addr")


# --- secrecy of reprs --------------------------------------------------------


def _assert_hidden(secret: bytes, text: str) -> None:
    assert secret.hex() not in text
    assert repr(secret)[2:-1] not in text


@given(gsa_answers())
@settings(max_examples=100)
def test_gsa_answer_repr_shows_no_key_bytes(answer: GsaAnswer) -> None:
    text = repr(answer)
    for secret in (
        answer.kek.key,
        *(sa.key for sa in answer.teks),
        *(k.key for k in answer.path_keys),
    ):
        _assert_hidden(secret, text)


@given(rekey_bodies)
@settings(max_examples=100)
def test_rekey_body_repr_shows_no_key_bytes(body: RekeyBody) -> None:
    text = repr(body)
    for secret in (*(sa.key for sa in body.teks), *(k.wrapped for k in body.lkh)):
        _assert_hidden(secret, text)


def test_rekey_push_repr_shows_length_not_bytes() -> None:
    assert repr(RekeyPush(b"\xab" * 50)) == "RekeyPush(datagram=<50 bytes>)"


# --- untrusted bytes ---------------------------------------------------------


@given(st.binary(max_size=400))
@settings(max_examples=600)
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_message(data)
    with contextlib.suppress(DecodeError):
        RekeyBody.decode(data)


@given(st.one_of(messages, rekey_bodies), st.data())
@settings(max_examples=500)
def test_mutated_encodings_raise_only_decode_error(
    message: Message | RekeyBody, data: st.DataObject
) -> None:
    encoded = message.encode()
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    position = data.draw(st.integers(0, len(encoded) - 1))
    if kind == "flip":
        bit = data.draw(st.integers(0, 7))
        mutated = bytearray(encoded)
        mutated[position] ^= 1 << bit
        candidate = bytes(mutated)
    elif kind == "truncate":
        candidate = encoded[:position]
    else:
        candidate = (
            encoded[:position] + data.draw(st.binary(min_size=1, max_size=8)) + encoded[position:]
        )
    for decode in (decode_message, RekeyBody.decode):
        with contextlib.suppress(DecodeError):
            decode(candidate)


_junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=41),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


def _replace_somewhere(value: Any, path: list[int], junk: object) -> Any:
    """Replace the element reached by following `path` (indices modulo size)."""
    if not path or not isinstance(value, list | dict) or not value:
        return junk
    if isinstance(value, dict):
        keys = list(value)
        key = keys[path[0] % len(keys)]
        return {**value, key: _replace_somewhere(value[key], path[1:], junk)}
    index = path[0] % len(value)
    return [*value[:index], _replace_somewhere(value[index], path[1:], junk), *value[index + 1 :]]


@given(
    st.one_of(messages, rekey_bodies),
    st.lists(st.integers(0, 50), min_size=1, max_size=5),
    _junk,
)
@settings(max_examples=500)
def test_structurally_mutated_messages_raise_only_decode_error(
    message: Message | RekeyBody, path: list[int], junk: object
) -> None:
    mutated = msgpack.packb(_replace_somewhere(_fields_of(message), path, junk))
    for decode in (decode_message, RekeyBody.decode):
        with contextlib.suppress(DecodeError):
            decode(mutated)
