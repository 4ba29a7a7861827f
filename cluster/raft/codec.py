"""Wire encoding of Raft messages for the peer link, and of membership changes.

A `Message` travels as one msgpack array of positional fields (version first);
a `ConfChange` is the data of a CONF_CHANGE log entry. Decoding takes
untrusted bytes from a peer and returns a fully validated object or raises
`RaftCodecError` (a `DecodeError`): types, sizes, ranges, enum values, and the
shape rules the core relies on (entries of an append are contiguous after
`index` and not from a future term). May import `gcks.proto` (codec, schema,
errors) and `.types`; never does I/O and never puts payload bytes in errors.
"""

from __future__ import annotations

import re
from typing import Final

from gcks.proto.codec import DEFAULT_MAX_FRAME, packb, unpackb
from gcks.proto.errors import DecodeError
from gcks.proto.schema import (
    read_bool,
    read_bytes,
    read_enum,
    read_int,
    read_list,
    read_record,
    read_str,
)

from .errors import RaftCodecError
from .types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    SnapshotMeta,
)

__all__ = [
    "MAX_CONTEXT",
    "MAX_ENTRIES_PER_MESSAGE",
    "MAX_NODES",
    "NODE_ID_PATTERN",
    "WIRE_VERSION",
    "decode_conf_change",
    "decode_message",
    "encode_conf_change",
    "encode_message",
]

WIRE_VERSION: Final = 1
MAX_U64: Final = (1 << 63) - 1  # indexes and terms; msgpack ints beyond are refused
MAX_CONTEXT: Final = 1024  # ReadIndex request ids and campaign markers are short
MAX_ENTRIES_PER_MESSAGE: Final = 1 << 16
MAX_NODES: Final = 1024  # voters + learners of one configuration
MAX_CONF_CONTEXT: Final = 4096  # e.g. a new node's peer address
NODE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MESSAGE_FIELDS: Final = 16
# Messages a follower forwards to the leader carry no term (they are local requests).
_TERMLESS: Final = frozenset(
    {MessageType.PROP, MessageType.READ_INDEX, MessageType.TRANSFER_LEADER}
)


def _node_id(value: object, name: str) -> str:
    return read_str(value, name, 64, NODE_ID_PATTERN, min_len=1)


def _encode_entry(e: Entry) -> list[object]:
    return [e.term, e.index, int(e.type), e.data]


def _decode_entry(value: object, name: str, max_data: int) -> Entry:
    term, index, etype, data = read_record(value, name, 4)
    return Entry(
        term=read_int(term, f"{name}.term", 0, MAX_U64),
        index=read_int(index, f"{name}.index", 0, MAX_U64),
        type=read_enum(etype, f"{name}.type", EntryType),
        data=read_bytes(data, f"{name}.data", max_data),
    )


def _encode_conf_state(c: ConfState) -> list[object]:
    return [sorted(c.voters), sorted(c.learners)]


def _decode_conf_state(value: object, name: str) -> ConfState:
    voters_raw, learners_raw = read_record(value, name, 2)
    voters = [
        _node_id(v, f"{name}.voters[{i}]")
        for i, v in enumerate(read_list(voters_raw, f"{name}.voters", MAX_NODES))
    ]
    learners = [
        _node_id(v, f"{name}.learners[{i}]")
        for i, v in enumerate(read_list(learners_raw, f"{name}.learners", MAX_NODES))
    ]
    vs, ls = frozenset(voters), frozenset(learners)
    if len(vs) != len(voters) or len(ls) != len(learners) or vs & ls:
        raise DecodeError(f"{name}: duplicate node ids")
    return ConfState(voters=vs, learners=ls)


def encode_message(m: Message) -> bytes:
    """The wire bytes of `m` (the core only builds valid messages; no checks here)."""
    snap = m.snapshot
    return packb(
        [
            WIRE_VERSION,
            int(m.type),
            m.to,
            m.frm,
            m.term,
            m.log_term,
            m.index,
            [_encode_entry(e) for e in m.entries],
            m.commit,
            m.reject,
            m.reject_hint,
            m.context,
            None if snap is None else [snap.index, snap.term, _encode_conf_state(snap.conf)],
            m.offset,
            m.data,
            m.done,
        ]
    )


def decode_message(data: bytes, *, max_size: int = DEFAULT_MAX_FRAME) -> Message:
    """Validate and decode one message from a peer; raises `RaftCodecError` on any bad input."""
    try:
        return _decode_message(data, max_size)
    except DecodeError as exc:
        raise RaftCodecError(f"bad raft message: {exc}") from exc


def _decode_message(data: bytes, max_size: int) -> Message:
    fields = read_record(unpackb(data, max_size=max_size), "Message", _MESSAGE_FIELDS)
    (
        version,
        mtype,
        to,
        frm,
        term,
        log_term,
        index,
        entries_raw,
        commit,
        reject,
        reject_hint,
        context,
        snap_raw,
        offset,
        chunk,
        done,
    ) = fields
    read_int(version, "Message.version", WIRE_VERSION, WIRE_VERSION)
    mt = read_enum(mtype, "Message.type", MessageType)
    m_term = read_int(term, "Message.term", 0, MAX_U64)
    m_index = read_int(index, "Message.index", 0, MAX_U64)
    raw_list = read_list(entries_raw, "Message.entries", MAX_ENTRIES_PER_MESSAGE)
    entries = tuple(
        _decode_entry(e, f"Message.entries[{i}]", max_size) for i, e in enumerate(raw_list)
    )
    if entries and mt not in (MessageType.APP, MessageType.PROP):
        raise DecodeError(f"Message.entries: not allowed in {mt.name}")
    if mt is MessageType.APP:
        for i, e in enumerate(entries):
            if e.index != m_index + 1 + i or e.term > m_term or e.term == 0:
                raise DecodeError(f"Message.entries[{i}]: not contiguous after index or bad term")
    if mt in _TERMLESS and m_term != 0:
        raise DecodeError(f"Message.term: must be 0 for {mt.name}")
    snapshot: SnapshotMeta | None = None
    if snap_raw is not None:
        s_index, s_term, s_conf = read_record(snap_raw, "Message.snapshot", 3)
        snapshot = SnapshotMeta(
            index=read_int(s_index, "Message.snapshot.index", 1, MAX_U64),
            term=read_int(s_term, "Message.snapshot.term", 1, MAX_U64),
            conf=_decode_conf_state(s_conf, "Message.snapshot.conf"),
        )
    if (snapshot is None) == (mt is MessageType.SNAP):
        raise DecodeError("Message.snapshot: required in SNAP and only there")
    m_chunk = read_bytes(chunk, "Message.data", max_size)
    if m_chunk and mt is not MessageType.SNAP:
        raise DecodeError(f"Message.data: not allowed in {mt.name}")
    return Message(
        type=mt,
        to=_node_id(to, "Message.to"),
        frm=_node_id(frm, "Message.frm"),
        term=m_term,
        log_term=read_int(log_term, "Message.log_term", 0, MAX_U64),
        index=m_index,
        entries=entries,
        commit=read_int(commit, "Message.commit", 0, MAX_U64),
        reject=read_bool(reject, "Message.reject"),
        reject_hint=read_int(reject_hint, "Message.reject_hint", 0, MAX_U64),
        context=read_bytes(context, "Message.context", MAX_CONTEXT),
        snapshot=snapshot,
        offset=read_int(offset, "Message.offset", 0, MAX_U64),
        data=m_chunk,
        done=read_bool(done, "Message.done"),
    )


def encode_conf_change(cc: ConfChange) -> bytes:
    """The data of a CONF_CHANGE log entry."""
    return packb([WIRE_VERSION, int(cc.type), cc.node_id, cc.context])


def decode_conf_change(data: bytes) -> ConfChange:
    """Validate and decode a CONF_CHANGE entry's data; raises `RaftCodecError`."""
    try:
        version, ctype, node_id, context = read_record(
            unpackb(data, max_size=MAX_CONF_CONTEXT + 256), "ConfChange", 4
        )
        read_int(version, "ConfChange.version", WIRE_VERSION, WIRE_VERSION)
        return ConfChange(
            type=read_enum(ctype, "ConfChange.type", ConfChangeType),
            node_id=_node_id(node_id, "ConfChange.node_id"),
            context=read_bytes(context, "ConfChange.context", MAX_CONF_CONTEXT),
        )
    except DecodeError as exc:
        raise RaftCodecError(f"bad conf change: {exc}") from exc
