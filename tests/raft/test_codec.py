"""Wire codec of Raft messages and conf changes: round trips and hostile bytes."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gcks.cluster.raft.codec import (
    decode_conf_change,
    decode_message,
    encode_conf_change,
    encode_message,
)
from gcks.cluster.raft.errors import RaftCodecError
from gcks.cluster.raft.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    SnapshotMeta,
)
from gcks.proto.codec import packb, unpackb
from gcks.proto.errors import DecodeError

U63 = st.integers(min_value=0, max_value=(1 << 63) - 1)
node_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}", fullmatch=True)
TERMLESS = {MessageType.PROP, MessageType.READ_INDEX, MessageType.TRANSFER_LEADER}


@st.composite
def messages(draw: st.DrawFn) -> Message:
    mtype = draw(st.sampled_from(list(MessageType)))
    term = 0 if mtype in TERMLESS else draw(st.integers(1, 1 << 40))
    index = draw(st.integers(0, 1 << 40))
    entries: tuple[Entry, ...] = ()
    if mtype is MessageType.APP:
        n = draw(st.integers(0, 4))
        entries = tuple(
            Entry(
                draw(st.integers(1, term)),
                index + 1 + i,
                draw(st.sampled_from(list(EntryType))),
                draw(st.binary(max_size=32)),
            )
            for i in range(n)
        )
    elif mtype is MessageType.PROP:
        entries = (
            Entry(0, 0, draw(st.sampled_from(list(EntryType))), draw(st.binary(max_size=32))),
        )
    snapshot = None
    data = b""
    if mtype is MessageType.SNAP:
        voters = draw(st.frozensets(node_ids, max_size=4))
        learners = draw(st.frozensets(node_ids, max_size=3)) - voters
        snapshot = SnapshotMeta(
            draw(st.integers(1, 1 << 40)), draw(st.integers(1, 99)), ConfState(voters, learners)
        )
        data = draw(st.binary(max_size=64))
    return Message(
        type=mtype,
        to=draw(node_ids),
        frm=draw(node_ids),
        term=term,
        log_term=draw(U63),
        index=index,
        entries=entries,
        commit=draw(U63),
        reject=draw(st.booleans()),
        reject_hint=draw(U63),
        context=draw(st.binary(max_size=16)),
        snapshot=snapshot,
        offset=draw(U63),
        data=data,
        done=draw(st.booleans()),
    )


@given(messages())
def test_message_round_trip(m: Message) -> None:
    assert decode_message(encode_message(m)) == m


@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_one_typed_error(data: bytes) -> None:
    with contextlib.suppress(RaftCodecError):
        decode_message(data)


@given(messages(), st.data())
def test_corrupted_message_decodes_or_raises_typed_error(m: Message, data: st.DataObject) -> None:
    raw = bytearray(encode_message(m))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = data.draw(st.integers(0, 255))
    with contextlib.suppress(RaftCodecError):
        decode_message(bytes(raw))


def test_codec_error_is_a_proto_decode_error() -> None:
    assert issubclass(RaftCodecError, DecodeError)


def _fields(m: Message) -> list[object]:
    obj = unpackb(encode_message(m))
    assert isinstance(obj, list)
    return obj


BASE = Message(MessageType.APP, "n2", "n1", 3, log_term=2, index=5, entries=(Entry(3, 6),))


@pytest.mark.parametrize(
    ("position", "value"),
    [
        (0, 2),  # unknown wire version
        (1, 99),  # unknown message type
        (1, True),  # a bool is not a type code
        (2, ""),  # empty node id
        (2, "bad id!"),
        (3, "x" * 65),
        (4, -1),  # negative term
        (4, (1 << 64) - 1),  # beyond the signed 63-bit range
        (6, "5"),  # index as text
        (7, [[3, 7, 0, b""]]),  # entry not contiguous after index
        (7, [[4, 6, 0, b""]]),  # entry from a future term
        (7, [[3, 6, 5, b""]]),  # unknown entry type
        (7, [[3, 6, 0]]),  # short entry record
        (9, 1),  # reject as int
        (11, b"c" * 2000),  # oversize context
        (12, [1, 1, [[], []]]),  # snapshot meta outside SNAP
        (14, b"chunk"),  # snapshot data outside SNAP
    ],
)
def test_invalid_fields_rejected(position: int, value: object) -> None:
    fields = _fields(BASE)
    fields[position] = value
    with pytest.raises(RaftCodecError):
        decode_message(packb(fields))


def test_wrong_shape_rejected() -> None:
    for obj in (None, 1, [], [1] * 15, {"a": 1}):
        with pytest.raises(RaftCodecError):
            decode_message(packb(obj))


def test_forwarded_request_must_not_carry_term() -> None:
    fields = _fields(Message(MessageType.PROP, "n1", "n2", 0, entries=(Entry(0, 0),)))
    fields[4] = 3
    with pytest.raises(RaftCodecError):
        decode_message(packb(fields))


def test_snap_requires_meta_and_rejects_duplicate_ids() -> None:
    snap = Message(
        MessageType.SNAP,
        "n2",
        "n1",
        3,
        snapshot=SnapshotMeta(4, 2, ConfState(frozenset({"n1"}))),
        data=b"z",
    )
    assert decode_message(encode_message(snap)) == snap
    fields = _fields(snap)
    fields[12] = None
    with pytest.raises(RaftCodecError):
        decode_message(packb(fields))
    fields[12] = [4, 2, [["n1", "n1"], []]]
    with pytest.raises(RaftCodecError):
        decode_message(packb(fields))
    fields[12] = [4, 2, [["n1"], ["n1"]]]
    with pytest.raises(RaftCodecError):
        decode_message(packb(fields))


@given(st.sampled_from(list(ConfChangeType)), node_ids, st.binary(max_size=64))
def test_conf_change_round_trip(kind: ConfChangeType, nid: str, ctx: bytes) -> None:
    cc = ConfChange(kind, nid, ctx)
    assert decode_conf_change(encode_conf_change(cc)) == cc


@given(st.binary(max_size=64))
def test_conf_change_random_bytes(data: bytes) -> None:
    with contextlib.suppress(RaftCodecError):
        decode_conf_change(data)


def test_conf_change_invalid_rejected() -> None:
    for obj in ([1, 7, "n1", b""], [1, 0, "", b""], [2, 0, "n1", b""], [1, 0, "n1"], "x"):
        with pytest.raises(RaftCodecError):
            decode_conf_change(packb(obj))
