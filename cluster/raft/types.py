"""Plain data of the Raft core: entries, hard state, snapshots, messages, Ready.

Shared by the sans-IO core (`raft.py`), the durable storage (`storage.py`), the
wire codec and the simulation tests. Only frozen dataclasses and enums: no
behaviour, no I/O. Node ids are short strings (`"n1"`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

NodeId = str


class EntryType(enum.IntEnum):
    NORMAL = 0  # application command (empty data: the leader's no-op of its term)
    CONF_CHANGE = 1  # data is an encoded ConfChange


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = field(default=b"", repr=False)  # commands carry key material


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it is sent."""

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    voters: frozenset[NodeId] = frozenset()
    learners: frozenset[NodeId] = frozenset()


class ConfChangeType(enum.IntEnum):
    ADD_VOTER = 0  # also promotes an existing learner
    ADD_LEARNER = 1
    REMOVE_NODE = 2


@dataclass(frozen=True, slots=True)
class ConfChange:
    type: ConfChangeType
    node_id: NodeId
    context: bytes = b""  # application data, e.g. the new node's peer address


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int
    term: int
    conf: ConfState


@dataclass(frozen=True, slots=True)
class Snapshot:
    meta: SnapshotMeta
    data: bytes = field(default=b"", repr=False)  # holds keys: never printed


class Role(enum.StrEnum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"
    LEARNER = "learner"


class MessageType(enum.IntEnum):
    PRE_VOTE = 1
    PRE_VOTE_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    APP = 5  # AppendEntries
    APP_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAP = 9  # one chunk of InstallSnapshot
    SNAP_RESP = 10
    TIMEOUT_NOW = 11  # leadership transfer: campaign now
    READ_INDEX = 12  # follower asks the leader for a read index
    READ_INDEX_RESP = 13
    PROP = 14  # proposal forwarded by a follower to the leader
    TRANSFER_LEADER = 15  # transfer request forwarded to the leader


@dataclass(frozen=True, slots=True)
class Message:
    """One Raft message. Fields unused by a type keep their defaults."""

    type: MessageType
    to: NodeId
    frm: NodeId
    term: int = 0
    log_term: int = 0  # APP: term of the entry at `index`; votes: candidate's last term
    index: int = 0  # APP: index preceding `entries`; votes: candidate's last index
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0  # APP_RESP: follower's hint for fast back-off
    context: bytes = b""  # ReadIndex request id; campaign-by-transfer marker
    snapshot: SnapshotMeta | None = None  # SNAP: what the chunks build
    offset: int = 0  # SNAP: byte offset of `data` in the snapshot
    data: bytes = field(default=b"", repr=False)  # SNAP: chunk bytes
    done: bool = False  # SNAP: last chunk


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served once the state machine applied `index`."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True)
class SoftState:
    leader: NodeId | None
    role: Role


@dataclass(frozen=True, slots=True)
class Ready:
    """Work the driver must do, in this order: persist `snapshot`, `entries` and
    `hard_state` (one fsync), then send `messages`, then apply `committed_entries`
    (and install `snapshot` into the state machine first if present), then
    call `advance(ready)`."""

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    committed_entries: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    read_states: tuple[ReadState, ...] = ()
