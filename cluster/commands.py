"""Commands of the replicated group state machine, as they travel in the Raft log.

The leader makes every command: it draws the fresh keys and seeds and reads
its clock, and puts the results *in* the command. Applying a command
(`gcks.cluster.state`) then only computes, so every node that applies the same
log holds the same keys and seals byte-identical rekey messages.

Commands are msgpack arrays `[COMMAND_VERSION, type, fields...]`. The log is
authenticated and encrypted at rest, but a node may still meet a command from
a newer or buggy peer, so decoding validates every field and raises
`DecodeError` like any other decoder of bytes from elsewhere.

Any change that an older node would decode differently, or apply differently,
bumps `COMMAND_VERSION`: a node that meets a higher version raises
`NewerCommand` and stops (see `GroupState.apply`) instead of skipping an entry
that newer nodes apply. Every node of one version skips a malformed entry of
its own version the same way, so that stays a plain `DecodeError`. Entries of
every earlier version still decode, with their `version`, and apply exactly as
they did when they were logged: nodes that restart replay them.

Versions: 1, the first; 2, apply never lets a group's key times go back (a
batch stamped before a leader change can commit after one stamped later), and
joins and leaves carry the time their request arrived, so apply can tell a
join that arrives after a later leave of the member (`_Group.at_time`,
`_Group.stale`); 3, a sender that registers again in the same role (a resync
or failover: a fresh sender id, the same leaf) keeps the time it joined, so
its GSA still carries the current TEKs.

May import `gcks.proto`. Must never read a clock, draw randomness or do I/O.
Key material is kept out of every repr.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from gcks.proto.codec import packb, unpackb
from gcks.proto.errors import DecodeError, PolicyError
from gcks.proto.policy import GROUP_ID_PATTERN, GroupPolicy, Role
from gcks.proto.schema import (
    read_bool,
    read_bytes,
    read_enum,
    read_int,
    read_list,
    read_optional,
    read_record,
    read_str,
)

COMMAND_VERSION: Final = 3
SEED_SIZE: Final = 32
KEY_SIZE: Final = 32
ED25519_KEY_SIZE: Final = 32
MAX_BATCH: Final = 65_536
# Joins plus leaves that one Rekey may carry and still seal: each costs up to
# 2 x tree depth wrapped keys, and one rekey body holds at most 2^16 of them.
# The rekeyer splits bursts into commands this size; apply refuses larger ones.
MAX_REKEY_BATCH: Final = 1024
MAX_TIME_MS: Final = 2**63 - 1
MAX_REQUEST_TAG: Final = 2**63 - 1  # a forwarded request's random tag (never 0)
MAX_REASON: Final = 256
MEMBER_ID_PATTERN = GROUP_ID_PATTERN  # member ids share the certificate id alphabet


class CommandType(enum.IntEnum):
    CREATE_GROUP = 1
    UPDATE_POLICY = 2
    DELETE_GROUP = 3
    REKEY = 4
    RESTORE = 5


class LeaveReason(enum.StrEnum):
    DEREGISTER = "deregister"  # the member asked to leave
    EVICT = "evict"  # an administrator removed it (and it may not join again)
    REVOKE = "revoke"  # a policy update no longer authorizes it


@dataclass(frozen=True, slots=True)
class Join:
    member_id: str
    role: Role
    sender_key: bytes | None = None  # Ed25519 public key, senders under source auth
    # The forwarded request that asked for it (0: asked at the proposing node).
    # Apply skips a tag it has applied before: a request sent again to a new
    # leader may commit twice, and a second join would move a sender's id.
    tag: int = 0
    # When the node serving the member got the request: its clock, but never
    # before the newest time it applied (0: logged before command version 2).
    # A forwarded copy can still be re-sent, and commit, after the member gave
    # up, registered elsewhere and left: apply skips a join requested before
    # the member's latest leave was.
    requested_ms: int = 0


@dataclass(frozen=True, slots=True)
class Leave:
    member_id: str
    reason: LeaveReason
    tag: int = 0  # as `Join.tag`
    requested_ms: int = 0  # as `Join.requested_ms` (0: also a leave apply made)


@dataclass(frozen=True, slots=True)
class CreateGroup:
    policy: GroupPolicy
    signing_seed: bytes = field(repr=False)  # the group's Ed25519 rekey signing key
    tree_seed: bytes = field(repr=False)  # seeds the empty LKH tree's root key
    tek_key: bytes = field(repr=False)  # seeds the first TEK (state binds it to the index)
    now_ms: int
    version: int = field(default=COMMAND_VERSION, kw_only=True)  # how apply treats it


@dataclass(frozen=True, slots=True)
class UpdatePolicy:
    """Replace a group's policy. Members it no longer authorizes leave the group
    in the same entry, rekeyed from `tree_seed` and `tek_key` (entries logged
    before these fields existed carry None and revoke nobody)."""

    policy: GroupPolicy
    now_ms: int
    tree_seed: bytes | None = field(default=None, repr=False)
    tek_key: bytes | None = field(default=None, repr=False)
    version: int = field(default=COMMAND_VERSION, kw_only=True)  # how apply treats it


@dataclass(frozen=True, slots=True)
class DeleteGroup:
    group: str
    now_ms: int
    reason: str = "group deleted"
    version: int = field(default=COMMAND_VERSION, kw_only=True)  # how apply treats it


@dataclass(frozen=True, slots=True)
class Rekey:
    """One coalesced key change of a group: a batch of joins and leaves, a
    fresh TEK, a refreshed KEK, or any mix. `tree_seed` derives every new LKH
    key of the batch; `tek_key` (None: keep the TEKs) seeds the new TEK."""

    group: str
    joins: tuple[Join, ...]
    leaves: tuple[Leave, ...]
    tree_seed: bytes = field(repr=False)
    tek_key: bytes | None = field(repr=False)
    refresh_kek: bool
    now_ms: int
    reason: str
    version: int = field(default=COMMAND_VERSION, kw_only=True)  # how apply treats it


@dataclass(frozen=True, slots=True)
class RestoreState:
    """Replace every group with those of a saved snapshot (disaster recovery)."""

    snapshot: bytes = field(repr=False)
    now_ms: int
    version: int = field(default=COMMAND_VERSION, kw_only=True)  # how apply treats it


Command = CreateGroup | UpdatePolicy | DeleteGroup | Rekey | RestoreState

MAX_SNAPSHOT: Final = 1 << 30


def encode_command(command: Command) -> bytes:
    """The log entry bytes of `command`."""
    match command:
        case CreateGroup():
            fields: list[object] = [
                CommandType.CREATE_GROUP,
                command.policy.to_mapping(),
                command.signing_seed,
                command.tree_seed,
                command.tek_key,
                command.now_ms,
            ]
        case UpdatePolicy():
            fields = [
                CommandType.UPDATE_POLICY,
                command.policy.to_mapping(),
                command.now_ms,
                command.tree_seed,
                command.tek_key,
            ]
        case DeleteGroup():
            fields = [CommandType.DELETE_GROUP, command.group, command.now_ms, command.reason]
        case RestoreState():
            fields = [CommandType.RESTORE, command.snapshot, command.now_ms]
        case Rekey():
            fields = [
                CommandType.REKEY,
                command.group,
                [join_fields(join, command.version) for join in command.joins],
                [leave_fields(leave, command.version) for leave in command.leaves],
                command.tree_seed,
                command.tek_key,
                command.refresh_kek,
                command.now_ms,
                command.reason,
            ]
    data = packb([command.version, *(int(f) if isinstance(f, CommandType) else f for f in fields)])
    decode_command(data)  # refuse to log what no node could apply
    return data


class NewerCommand(DecodeError):
    """The entry was written by a newer gcks: its command version is above ours."""


def decode_command(data: bytes) -> Command:
    """Validate and decode a log entry; raises `NewerCommand` for a version above
    `COMMAND_VERSION` and `DecodeError` on anything else malformed."""
    obj = read_list(unpackb(data), "command", 16, min_items=2)
    version = read_int(obj[0], "command.version", 0, 255)
    if version > COMMAND_VERSION:
        raise NewerCommand(
            f"command version {version}; this node applies up to version {COMMAND_VERSION}"
        )
    if version < 1:
        raise DecodeError(f"command.version: {version} is not supported")
    kind = read_enum(obj[1], "command.type", CommandType)
    body = obj[2:]
    if kind is CommandType.CREATE_GROUP:
        policy, signing_seed, tree_seed, tek_key, now_ms = read_record(body, "CreateGroup", 5)
        return CreateGroup(
            policy=_read_policy(policy, "CreateGroup.policy"),
            signing_seed=read_bytes(signing_seed, "CreateGroup.signing_seed", SEED_SIZE, SEED_SIZE),
            tree_seed=read_bytes(tree_seed, "CreateGroup.tree_seed", SEED_SIZE, SEED_SIZE),
            tek_key=read_bytes(tek_key, "CreateGroup.tek_key", KEY_SIZE, KEY_SIZE),
            now_ms=read_int(now_ms, "CreateGroup.now_ms", 0, MAX_TIME_MS),
            version=version,
        )
    if kind is CommandType.UPDATE_POLICY:
        if len(body) == 2:
            body = (*body, None, None)  # logged before revocation existed: no seeds
        policy, now_ms, tree_seed, tek_key = read_record(body, "UpdatePolicy", 4)
        return UpdatePolicy(
            policy=_read_policy(policy, "UpdatePolicy.policy"),
            now_ms=read_int(now_ms, "UpdatePolicy.now_ms", 0, MAX_TIME_MS),
            version=version,
            tree_seed=read_optional(
                tree_seed, "UpdatePolicy.tree_seed", read_bytes, SEED_SIZE, SEED_SIZE
            ),
            tek_key=read_optional(tek_key, "UpdatePolicy.tek_key", read_bytes, KEY_SIZE, KEY_SIZE),
        )
    if kind is CommandType.DELETE_GROUP:
        group, now_ms, reason = read_record(body, "DeleteGroup", 3)
        return DeleteGroup(
            group=read_str(group, "DeleteGroup.group", 64, GROUP_ID_PATTERN),
            now_ms=read_int(now_ms, "DeleteGroup.now_ms", 0, MAX_TIME_MS),
            version=version,
            reason=read_str(reason, "DeleteGroup.reason", MAX_REASON),
        )
    if kind is CommandType.RESTORE:
        snapshot, now_ms = read_record(body, "RestoreState", 2)
        return RestoreState(
            snapshot=read_bytes(snapshot, "RestoreState.snapshot", MAX_SNAPSHOT),
            now_ms=read_int(now_ms, "RestoreState.now_ms", 0, MAX_TIME_MS),
            version=version,
        )
    group, joins, leaves, tree_seed, tek_key, refresh_kek, now_ms, reason = read_record(
        body, "Rekey", 8
    )
    return Rekey(
        group=read_str(group, "Rekey.group", 64, GROUP_ID_PATTERN),
        joins=read_joins(joins, "Rekey.joins", MAX_BATCH, version),
        leaves=read_leaves(leaves, "Rekey.leaves", MAX_BATCH, version),
        tree_seed=read_bytes(tree_seed, "Rekey.tree_seed", SEED_SIZE, SEED_SIZE),
        tek_key=read_optional(tek_key, "Rekey.tek_key", read_bytes, KEY_SIZE, KEY_SIZE),
        refresh_kek=read_bool(refresh_kek, "Rekey.refresh_kek"),
        now_ms=read_int(now_ms, "Rekey.now_ms", 0, MAX_TIME_MS),
        version=version,
        reason=read_str(reason, "Rekey.reason", MAX_REASON),
    )


def _read_policy(value: object, name: str) -> GroupPolicy:
    try:
        return GroupPolicy.from_mapping(value)
    except PolicyError as exc:
        raise DecodeError(f"{name}: {exc}") from None


def join_fields(join: Join, version: int) -> list[object]:
    """A join as a command of `version` carries it: version 1 nodes read 4 fields."""
    fields: list[object] = [join.member_id, join.role.value, join.sender_key, join.tag]
    return fields if version < 2 else [*fields, join.requested_ms]


def leave_fields(leave: Leave, version: int) -> list[object]:
    fields: list[object] = [leave.member_id, leave.reason.value, leave.tag]
    return fields if version < 2 else [*fields, leave.requested_ms]


def _read_join(value: object, name: str, version: int) -> Join:
    # 3 fields: logged before request tags; 4: before command version 2.
    fields = read_list(value, name, 4 if version < 2 else 5, min_items=3)
    member_id, role, sender_key, tag, requested_ms = (*fields, 0, 0)[:5]
    return Join(
        member_id=read_str(member_id, f"{name}.member_id", 64, MEMBER_ID_PATTERN),
        role=read_enum(role, f"{name}.role", Role),
        sender_key=read_optional(
            sender_key, f"{name}.sender_key", read_bytes, ED25519_KEY_SIZE, ED25519_KEY_SIZE
        ),
        tag=read_int(tag, f"{name}.tag", 0, MAX_REQUEST_TAG),
        requested_ms=read_int(requested_ms, f"{name}.requested_ms", 0, MAX_TIME_MS),
    )


def read_joins(value: object, name: str, max_items: int, version: int) -> tuple[Join, ...]:
    """Joins as a command of `version` carries them: version 1 had no request time."""
    items = read_list(value, name, max_items)
    return tuple(_read_join(item, f"{name}[{i}]", version) for i, item in enumerate(items))


def read_leaves(value: object, name: str, max_items: int, version: int) -> tuple[Leave, ...]:
    items = read_list(value, name, max_items)
    return tuple(_read_leave(item, f"{name}[{i}]", version) for i, item in enumerate(items))


def read_request_tag(value: object, name: str) -> int:
    return read_int(value, name, 1, MAX_REQUEST_TAG)


def _read_leave(value: object, name: str, version: int) -> Leave:
    # 2 fields: logged before request tags; 3: before command version 2.
    fields = read_list(value, name, 3 if version < 2 else 4, min_items=2)
    member_id, reason, tag, requested_ms = (*fields, 0, 0)[:4]
    return Leave(
        member_id=read_str(member_id, f"{name}.member_id", 64, MEMBER_ID_PATTERN),
        reason=read_enum(reason, f"{name}.reason", LeaveReason),
        tag=read_int(tag, f"{name}.tag", 0, MAX_REQUEST_TAG),
        requested_ms=read_int(requested_ms, f"{name}.requested_ms", 0, MAX_TIME_MS),
    )
