"""The replicated group state machine: groups, policies, members, keys, rekeys.

Every node applies the same committed commands (`gcks.cluster.commands`) in
the same order to its own `GroupState`. Apply is deterministic: no randomness,
no clock, no I/O. Fresh keys and times arrive inside the commands, made by
the leader, so every node holds the same KEKs, TEKs, LKH tree and signing key,
and seals byte-identical REKEY datagrams (Ed25519 signatures are
deterministic). Applying a command returns what the node must do about it:
the datagrams to send, the members that joined or left.

Rules kept here (DESIGN.md "Rekey", RFC 9838):
- message ids strictly increase per group; every message is signed by the
  group's signing key, which members never hold;
- the KEK is the LKH root key: a new KEK reaches members only as wrapped keys,
  never in a body sealed under the old KEK;
- forward access control: when members leave, the message that changes the
  KEK carries no new TEK; the new TEK follows in a second message sealed under
  the new KEK, which the departed members cannot open;
- sender ids are never reused within a group: a (re-)registered sender starts
  its sequence numbers at zero, so reusing an id under a live TEK would reuse
  AEAD nonces.

May import `gcks.proto` and `gcks.cluster.commands`. Must never read a clock,
draw randomness, do I/O, or put key material in a log line, error or repr.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gcks.cluster.commands import (
    COMMAND_VERSION,
    MAX_REKEY_BATCH,
    Command,
    CreateGroup,
    DeleteGroup,
    Join,
    Leave,
    LeaveReason,
    NewerCommand,
    Rekey,
    RestoreState,
    UpdatePolicy,
    decode_command,
)
from gcks.proto.codec import array_ends, packb, unpackb
from gcks.proto.errors import DecodeError, GcksProtoError
from gcks.proto.keytree import KeyTree
from gcks.proto.messages import (
    MAX_SENDERS,
    MAX_TEKS,
    GsaAnswer,
    KekUpdate,
    NodeEndpoint,
    RekeyBody,
    encode_key_sa,
    read_key_sa,
)
from gcks.proto.policy import GroupPolicy, MulticastEndpoint, Role
from gcks.proto.rekey import seal_rekey
from gcks.proto.sa import MAX_SPI, KeySA, WrappedKey
from gcks.proto.schema import (
    read_bytes,
    read_enum,
    read_int,
    read_list,
    read_map,
    read_optional,
    read_record,
    read_str,
)

log = logging.getLogger(__name__)

# 2 added the retired message ids, 3 the group clocks, recent departures and
# the newest command version applied; every earlier format restores.
SNAPSHOT_FORMAT: Final = 3
AUDIT_LIMIT: Final = 10_000  # audit records kept in the replicated state (all are logged)
# A proposal re-sent after a leader change may commit twice; the second copy is
# recognised by its digest (every command carries fresh random seeds) and skipped.
DEDUPE_LIMIT: Final = 16_384  # command digests and request tags remembered
MAX_SENDER_ID: Final = 0xFFFF_FFFF
# How far back of its group's clock a command may be stamped and still be moved
# up to it (`_Group.at_time`): past a proposal's longest wait for its commit
# (15 s, re-proposed on every leader change) with room for elections. Further
# back means the clock came from a node whose own ran ahead; following that
# would hold every key time at it.
CLOCK_HOLD_MS: Final = 30_000
# A join requested this much before its member's latest leave was requested is
# a stale copy (`_Group.stale`); the slack absorbs clock skew between the nodes
# that took the two requests. A stale copy is older than the leave by at least
# a member's registration deadline (5 s by default).
REQUEST_SKEW_MS: Final = 2_000


_LEAVE_EVENT: Final = {
    LeaveReason.DEREGISTER: "leave",
    LeaveReason.EVICT: "evict",
    LeaveReason.REVOKE: "revoke",
}


def _tag_key(tag: int) -> bytes:
    """The key under which apply remembers a request tag, beside command digests."""
    return b"gcks-request-tag" + tag.to_bytes(16, "big")


def _tek_key(secret: bytes, index: int) -> bytes:
    """The TEK that a command's fresh `secret` makes at log entry `index`.

    Bound to the index, so a command committed twice (re-proposed after a
    leader change, past the dedupe window) or replayed into a group made again
    never installs one key twice: senders restart their sequence numbers on
    every new TEK, so two TEKs sharing key bytes would repeat AEAD nonces."""
    return hmac.digest(secret, b"gcks tek\x00" + index.to_bytes(8, "big"), "sha256")


class StateError(Exception):
    """A snapshot could not be restored (corrupt or from an unknown format)."""


class NewerSnapshot(StateError):
    """The snapshot was written by a newer gcks: its format is above ours."""


class UpgradeRequired(Exception):
    """A committed entry was written by a newer gcks. Other nodes apply it, so
    skipping it here would make this node's keys differ from theirs for good:
    the node must stop, and apply the entry once it runs the newer version."""


@dataclass(frozen=True, slots=True)
class MemberRecord:
    member_id: str
    role: Role
    sender_id: int | None
    sender_key: bytes | None
    joined_ms: int


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One line of the audit trail (RFC 3740 section 5.4): who joined, left, was evicted."""

    index: int  # Raft log index of the command
    time_ms: int
    group: str
    event: str  # create, update, delete, join, rejoin, leave, evict, rekey
    member: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class Outbound:
    """One sealed REKEY datagram to send: identical bytes on every node."""

    group: str
    msg_id: int
    datagram: bytes
    multicast: MulticastEndpoint
    retransmit_count: int
    retransmit_interval_ms: int
    terminate: bool = False


@dataclass(frozen=True, slots=True)
class ApplyResult:
    outbound: tuple[Outbound, ...] = ()
    joined: tuple[tuple[str, str], ...] = ()  # (group, member id), re-registrations included
    left: tuple[tuple[str, str, LeaveReason], ...] = ()
    rejected: str | None = None  # why a command changed nothing (unknown group, ...)
    # Tags of the forwarded requests the command carried, applied or not: how
    # the node that forwarded one to the leader learns its outcome.
    requests: tuple[int, ...] = ()
    # (group, member id) of sender joins refused for want of a sender id or of
    # room for one more sender key in a GSA: answered GROUP_FULL.
    full: tuple[tuple[str, str], ...] = ()
    # (group, member id) of joins requested before the member's latest leave
    # was (`_Group.stale`), skipped: answered BUSY, should anyone still wait.
    stale: tuple[tuple[str, str], ...] = ()


class _Group:
    """Mutable state of one group; only `GroupState` touches it."""

    __slots__ = (
        "banned",
        "clock_ms",
        "departed",
        "kek",
        "members",
        "msg_id",
        "next_sender_id",
        "next_spi",
        "policy",
        "signer",
        "signing_seed",
        "teks",
        "tree",
        "verify_key",
    )

    def __init__(
        self,
        *,
        policy: GroupPolicy,
        signing_seed: bytes,
        tree: KeyTree,
        kek: KeySA,
        teks: list[KeySA],
        msg_id: int,
        next_spi: int,
        next_sender_id: int,
        members: dict[str, MemberRecord],
        banned: set[str],
        clock_ms: int,
        departed: dict[str, tuple[int, int]],
    ) -> None:
        self.policy = policy
        # The time the group's last rekey or creation of command version 2 or
        # later applied at (0: none yet): see `at_time`.
        self.clock_ms = clock_ms
        # Members that left in the last `CLOCK_HOLD_MS` by the clock: when each
        # one's latest leave was requested (0: made by apply) and when it
        # applied, oldest first (commands of version 2 or later only).
        self.departed = departed
        self.banned = banned  # evicted identities: refused until an admin re-admits them
        self.signing_seed = signing_seed
        self.signer = Ed25519PrivateKey.from_private_bytes(signing_seed)
        self.verify_key = self.signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.tree = tree
        self.kek = kek
        self.teks = teks
        self.msg_id = msg_id
        self.next_spi = next_spi
        self.next_sender_id = next_sender_id
        self.members = members

    def at_time(self, command: Rekey) -> int:
        """The time `command` applies at: its own stamp, but from command version
        2 on always later than the group's clock (the time its previous rekey
        applied at), unless stamped more than `CLOCK_HOLD_MS` before it.

        A batch stamped before a leader change can commit after one stamped
        later. At its own time its TEK would activate before the key it
        replaces, and its joins would date from before TEKs they must not
        receive (`GroupState.gsa` keeps TEKs activated at or after a join);
        hence strictly later, not merely as late.

        Version 1 entries replay as they were logged and leave the clock alone,
        so a node restored from a snapshot without clocks agrees with one that
        applied them."""
        if command.version < 2:
            return command.now_ms
        behind = self.clock_ms - command.now_ms
        if 0 <= behind <= CLOCK_HOLD_MS:
            self.clock_ms += 1
        else:
            if behind > 0:
                log.warning(
                    "group %s: a command stamped %.1f s before the group's previous one "
                    "applies at its own time; a node's clock ran ahead (check NTP on every node)",
                    self.policy.group_id,
                    behind / 1000,
                )
                # Departures timed by the fast clock would outstay the hold by as
                # long as it ran ahead: forget them.
                self.departed.clear()
            self.clock_ms = command.now_ms
        horizon = self.clock_ms - CLOCK_HOLD_MS
        while self.departed and next(iter(self.departed.values()))[1] < horizon:
            del self.departed[next(iter(self.departed))]
        return self.clock_ms

    def stale(self, join: Join) -> bool:
        """Whether `join` was requested before the member's latest leave was.

        Request times, not apply times: a member that deregisters and at
        once registers again, in one batch interval, is not refused however
        long the interval. The nodes that take requests stamp them no earlier
        than the newest time they applied (`Rekeyer.request_ms`), so a leader
        whose clock runs ahead locks nobody out."""
        left = self.departed.get(join.member_id)
        return (
            left is not None and left[0] > 0 and 0 < join.requested_ms < left[0] - REQUEST_SKEW_MS
        )

    def allocate_spi(self) -> int:
        spi = self.next_spi
        # SPIs identify keys in flight; 2^32 key changes per group is beyond any
        # lifetime, but wrap rather than fail, skipping 0 and SPIs still in use.
        in_use = {self.kek.spi, *(t.spi for t in self.teks)}
        while spi == 0 or spi in in_use:
            spi = spi % MAX_SPI + 1
        self.next_spi = spi % MAX_SPI + 1
        return spi

    def sender_keys(self) -> tuple[tuple[int, bytes], ...]:
        return tuple(
            sorted(
                (m.sender_id, m.sender_key)
                for m in self.members.values()
                if m.sender_id is not None and m.sender_key is not None
            )
        )


class GroupState:
    """All groups of the cluster, as of the last applied log index."""

    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}
        self._audit: deque[AuditRecord] = deque(maxlen=AUDIT_LIMIT)
        self._seen: dict[bytes, None] = {}  # digests of recent commands, oldest first
        # The last message id of each deleted group: a group of that name, made
        # again or restored from a backup, counts on from there, so no id (and,
        # under a restored KEK, no AEAD nonce) is ever sealed twice.
        self._retired: dict[str, int] = {}
        self.applied_index = 0
        # The newest time a command applied at (a lower bound after a snapshot
        # restore): proposers never stamp a command earlier (`Rekeyer.now_ms`).
        # Read by proposers only; apply never depends on it.
        self.latest_ms = 0
        # The newest command version of the entries applied: every node of an
        # older version stops at such an entry anyway, so proposers never go
        # below it (`gcks.cluster.versions`). Apply never depends on it.
        self.newest_version = 1

    # ------------------------------------------------------------------ reads

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(sorted(self._groups))

    def has_group(self, group: str) -> bool:
        return group in self._groups

    def policy(self, group: str) -> GroupPolicy:
        return self._group(group).policy

    def member_count(self, group: str) -> int:
        return len(self._group(group).members)

    def members(self, group: str) -> tuple[MemberRecord, ...]:
        return tuple(sorted(self._group(group).members.values(), key=lambda m: m.member_id))

    def is_banned(self, group: str, member_id: str) -> bool:
        g = self._groups.get(group)
        return g is not None and member_id in g.banned

    def is_member(self, group: str, member_id: str) -> bool:
        g = self._groups.get(group)
        return g is not None and member_id in g.members

    def kek(self, group: str) -> KeySA:
        return self._group(group).kek

    def teks(self, group: str) -> tuple[KeySA, ...]:
        return tuple(self._group(group).teks)

    def msg_id(self, group: str) -> int:
        return self._group(group).msg_id

    def verify_key(self, group: str) -> bytes:
        return self._group(group).verify_key

    def audit(self) -> tuple[AuditRecord, ...]:
        return tuple(self._audit)

    def gsa(
        self, group: str, member_id: str, *, request_id: int, nodes: Sequence[NodeEndpoint]
    ) -> GsaAnswer:
        """The registration answer for a member of `group`, as of now."""
        g = self._group(group)
        record = g.members[member_id]
        teks = tuple(g.teks)
        if g.policy.rekey_on_join:
            # Backward secrecy: TEKs still accepted from before the member's join
            # (the deactivation window) protect traffic it must never read.
            teks = tuple(t for t in teks if t.activation_ms >= record.joined_ms)
        return GsaAnswer(
            request_id=request_id,
            group=group,
            policy=g.policy,
            kek=g.kek,
            teks=teks,
            path_keys=g.tree.path_keys(member_id),
            leaf=g.tree.leaf_of(member_id),
            rekey_verify_key=g.verify_key,
            msg_id=g.msg_id,
            sender_id=record.sender_id,
            sender_verify_keys=g.sender_keys() if g.policy.source_auth else (),
            nodes=tuple(nodes),
        )

    def _group(self, group: str) -> _Group:
        try:
            return self._groups[group]
        except KeyError:
            raise KeyError(f"unknown group {group!r}") from None

    # ------------------------------------------------------------------ apply

    def apply(self, index: int, data: bytes) -> ApplyResult:
        """Apply the committed log entry `index` (empty data: a leader's no-op)."""
        if index <= self.applied_index:
            raise ValueError(f"entry {index} already applied (at {self.applied_index})")
        if not data:
            self.applied_index = index
            return ApplyResult()
        digest = hashlib.sha256(data).digest()
        if digest in self._seen:
            self.applied_index = index
            return ApplyResult(rejected="duplicate of an applied proposal")
        try:
            command = decode_command(data)
        except NewerCommand as exc:
            raise UpgradeRequired(
                f"log entry {index} was written by a newer gcks ({exc}): upgrade this node, "
                "it resumes at that entry"
            ) from None
        except DecodeError as exc:
            # Every node of this version rejects the same bytes the same way:
            # state stays identical.
            self.applied_index = index
            self._remember(digest)
            log.error("log entry %d is not a valid command, skipped: %s", index, exc)
            return ApplyResult(rejected=f"invalid command: {exc}")
        self._remember(digest)
        self.newest_version = max(self.newest_version, command.version)
        # `UpgradeRequired` leaves the entry unapplied: the node stops and
        # applies it once it runs the newer version.
        result = self._apply(index, command)
        self.applied_index = index
        return result

    def _apply(self, index: int, command: Command) -> ApplyResult:
        self.latest_ms = max(self.latest_ms, command.now_ms)
        match command:
            case CreateGroup():
                return self._create(index, command)
            case UpdatePolicy():
                return self._update_policy(index, command)
            case DeleteGroup():
                return self._delete(index, command)
            case Rekey():
                return self._rekey(index, command)
            case RestoreState():
                return self._restore_from(index, command)

    def _restore_from(self, index: int, cmd: RestoreState) -> ApplyResult:
        try:
            saved = GroupState.restore(cmd.snapshot)
        except NewerSnapshot as exc:
            raise UpgradeRequired(
                f"log entry {index} restores a backup written by a newer gcks ({exc}): "
                "upgrade this node, it resumes at that entry"
            ) from None
        except StateError as exc:
            return ApplyResult(rejected=str(exc))
        retired = dict(saved._retired)
        for name, last in [
            *self._retired.items(),
            *((n, g.msg_id) for n, g in self._groups.items()),
        ]:
            retired[name] = max(last, retired.get(name, 0))
        for name, g in saved._groups.items():
            # Message ids never go back: members drop ids <= the last they saw,
            # and the saved KEK sealed every id up to the group's last one.
            g.msg_id = max(g.msg_id, retired.pop(name, 0))
            # Nor do key times. The backup's departures are of another time: the
            # current ones still hold.
            current = self._groups.get(name)
            g.departed = {}
            if current is not None:
                g.clock_ms = max(g.clock_ms, current.clock_ms)
                g.departed = dict(current.departed)
        self._groups = saved._groups
        self._retired = retired
        self._record(index, cmd.now_ms, "*", "restore", None, f"{len(saved._groups)} groups")
        return ApplyResult()

    def _create(self, index: int, cmd: CreateGroup) -> ApplyResult:
        group = cmd.policy.group_id
        if group in self._groups:
            return ApplyResult(rejected=f"group {group!r} already exists")
        policy, now = cmd.policy, cmd.now_ms
        tree = KeyTree.build([], cmd.tree_seed)
        root = tree.group_key
        g = _Group(
            policy=policy,
            signing_seed=cmd.signing_seed,
            tree=tree,
            kek=KeySA(1, policy.cipher_suite, root.key, now, now + policy.kek_lifetime_s * 1000),
            teks=[
                KeySA(
                    2,
                    policy.cipher_suite,
                    _tek_key(cmd.tek_key, index),
                    now,
                    now + policy.tek_lifetime_s * 1000,
                )
            ],
            msg_id=self._retired.pop(group, 0),
            next_spi=3,
            next_sender_id=1,
            members={},
            banned=set(),
            clock_ms=now if cmd.version >= 2 else 0,  # see `_Group.at_time`
            departed={},
        )
        self._groups[group] = g
        self._record(index, now, group, "create", None, f"kek {g.kek.fingerprint}")
        return ApplyResult()

    def _update_policy(self, index: int, cmd: UpdatePolicy) -> ApplyResult:
        group = cmd.policy.group_id
        g = self._groups.get(group)
        if g is None:
            return ApplyResult(rejected=f"unknown group {group!r}")
        if cmd.policy.source_auth != g.policy.source_auth:
            # Members fix signing and verification at registration; a switch
            # would split them (and, turned on, leave earlier members accepting
            # packets any member can forge). Delete and re-create the group.
            return ApplyResult(rejected="source_auth is fixed when a group is created")
        revoked = sorted(
            mid for mid, m in g.members.items() if m.role not in cmd.policy.roles_for(mid)
        )
        if cmd.tree_seed is None:
            revoked = []  # logged before revocation existed: replay it as it was applied
        if len(revoked) > MAX_REKEY_BATCH:
            # One rekey message cannot carry the LKH update; refused whole, not halfway.
            return ApplyResult(
                rejected=f"the policy revokes {len(revoked)} members, at most "
                f"{MAX_REKEY_BATCH} per update: narrow it in steps"
            )
        g.policy = cmd.policy
        self._record(index, cmd.now_ms, group, "update", None, "policy updated")
        body = RekeyBody(policy=cmd.policy, reason="policy update")
        outbound = [self._seal(g, body)]
        if not revoked:
            return ApplyResult(outbound=tuple(outbound))
        # Forward access control: members the new policy does not admit leave
        # at this same entry, so no later key (a TEK rotation, say) reaches them.
        assert cmd.tree_seed is not None
        revocation = self._rekey_settle(
            index,
            Rekey(
                group=group,
                joins=(),
                leaves=tuple(Leave(mid, LeaveReason.REVOKE) for mid in revoked),
                tree_seed=cmd.tree_seed,
                tek_key=cmd.tek_key if cmd.policy.rekey_on_leave else None,
                refresh_kek=False,
                now_ms=cmd.now_ms,
                reason="authorization revoked by a policy update",
                version=cmd.version,
            ),
        )
        return ApplyResult(outbound=(*outbound, *revocation.outbound), left=revocation.left)

    def _delete(self, index: int, cmd: DeleteGroup) -> ApplyResult:
        g = self._groups.get(cmd.group)
        if g is None:
            return ApplyResult(rejected=f"unknown group {cmd.group!r}")
        # Secure termination (RFC 3740 section 5.5): one last signed message
        # tells every member to drop all of the group's keys.
        final = self._seal(g, RekeyBody(terminate=True, reason=cmd.reason))
        del self._groups[cmd.group]
        self._retired[cmd.group] = g.msg_id
        self._record(index, cmd.now_ms, cmd.group, "delete", None, cmd.reason)
        return ApplyResult(outbound=(dataclasses.replace(final, terminate=True),))

    def _remember(self, key: bytes) -> None:
        self._seen[key] = None
        while len(self._seen) > DEDUPE_LIMIT:
            del self._seen[next(iter(self._seen))]

    def _rekey(self, index: int, cmd: Rekey) -> ApplyResult:
        tags = tuple(t for t in (*(j.tag for j in cmd.joins), *(x.tag for x in cmd.leaves)) if t)
        result = self._rekey_settle(index, cmd)
        if not tags:
            return result
        if result.rejected is None:
            for tag in tags:
                self._remember(_tag_key(tag))
        return dataclasses.replace(result, requests=tags)

    def _rekey_settle(self, index: int, cmd: Rekey) -> ApplyResult:
        g = self._groups.get(cmd.group)
        if g is None:
            return ApplyResult(rejected=f"unknown group {cmd.group!r}")
        if len(cmd.joins) + len(cmd.leaves) > MAX_REKEY_BATCH:
            # Refused before any change: sealing might fail halfway, and an
            # exception here would stop every node at this index, at each restart.
            return ApplyResult(rejected=f"membership batch larger than {MAX_REKEY_BATCH}")
        now, policy = g.at_time(cmd), g.policy
        self.latest_ms = max(self.latest_ms, now)

        # A request sent again to a new leader may commit twice: the second
        # copy changes nothing (a sender would otherwise get a new id after
        # its answer went out), and is reported as a re-registration.
        def fresh(tag: int) -> bool:
            return not tag or _tag_key(tag) not in self._seen

        repeated = [j.member_id for j in cmd.joins if not fresh(j.tag)]
        joins = [j for j in cmd.joins if fresh(j.tag)]
        leaves = [x for x in cmd.leaves if fresh(x.tag)]

        # Settle the batch against the current membership, deterministically.
        leaving: dict[str, LeaveReason] = {}
        asked: dict[str, int] = {}  # when each member's latest leave was requested
        for leave in leaves:
            if leave.member_id in g.members and leave.member_id not in leaving:
                leaving[leave.member_id] = leave.reason
            asked[leave.member_id] = max(asked.get(leave.member_id, 0), leave.requested_ms)
        tree_joins: list[str] = []
        tree_leaves: list[str] = list(leaving)
        joined: list[MemberRecord] = []
        rejoined: list[str] = []
        seen: set[str] = set()
        full: list[str] = []
        stale: list[str] = []
        # Sender keys a GSA can still carry (source authentication): every
        # member's GSA lists them all, and one answer holds MAX_SENDERS.
        key_slots = MAX_SENDERS
        if policy.source_auth and any(j.role is Role.SENDER for j in joins):
            key_slots -= sum(
                1 for mid, m in g.members.items() if m.sender_key is not None and mid not in leaving
            )
        for join in joins:
            if join.member_id in seen or join.member_id in leaving or join.member_id in g.banned:
                continue
            if join.role not in policy.roles_for(join.member_id):
                continue  # authorized by a node's older copy of the policy, revoked since
            if g.stale(join):
                stale.append(join.member_id)
                continue
            old = g.members.get(join.member_id)
            if join.role is Role.SENDER:
                # A re-registering sender gives its old key's slot back.
                freed = int(old is not None and old.sender_key is not None)
                needed = int(join.sender_key is not None)
                if g.next_sender_id > MAX_SENDER_ID or key_slots + freed - needed < 0:
                    full.append(join.member_id)  # answered GROUP_FULL, nothing changes
                    continue
                key_slots += freed - needed
            seen.add(join.member_id)
            sender_id = None
            if join.role is Role.SENDER:
                sender_id = g.next_sender_id
                g.next_sender_id += 1
            record = MemberRecord(join.member_id, join.role, sender_id, join.sender_key, now)
            if old is None:
                tree_joins.append(join.member_id)
                joined.append(record)
            elif old.role is not join.role or policy.rekey_on_rejoin:
                tree_leaves.append(join.member_id)  # in both lists: a fresh leaf and path
                tree_joins.append(join.member_id)
                joined.append(record)
            elif sender_id is not None:
                # Same role and leaf, but a fresh sender id (see module doc). It
                # has been a member all along, so it keeps its join time and its
                # GSA the TEKs it held: no TEK is made for a batch that changes
                # no membership, and version 2 stamped this re-join, which left
                # the GSA of a re-registering sender without any TEK.
                since = old.joined_ms if cmd.version >= 3 else now
                joined.append(dataclasses.replace(record, joined_ms=since))
            else:
                rejoined.append(join.member_id)

        senders_removed = tuple(
            sorted(
                m.sender_id
                for mid in (*leaving, *(r.member_id for r in joined))
                if (m := g.members.get(mid)) is not None and m.sender_id is not None
            )
        )
        for mid, why in leaving.items():
            del g.members[mid]
            if why is LeaveReason.EVICT:
                g.banned.add(mid)
            if cmd.version >= 2:  # see `_Group.at_time`
                g.departed.pop(mid, None)  # re-inserted last: oldest first
                # No leave is asked for after it applies: a later request time
                # came from a fast clock, which must not refuse joins for as
                # long as it runs ahead.
                g.departed[mid] = (min(asked[mid], now), now)
        for record in joined:
            g.members[record.member_id] = record
        senders_added = tuple(
            sorted(
                (r.sender_id, r.sender_key)
                for r in joined
                if r.sender_id is not None and r.sender_key is not None
            )
        )
        if not policy.source_auth:
            senders_added, senders_removed = (), ()

        kek_update: KekUpdate | None = None
        wrapped: tuple[WrappedKey, ...] = ()
        old_kek = g.kek
        if tree_joins or tree_leaves or cmd.refresh_kek:
            update = g.tree.update(joins=tree_joins, leaves=tree_leaves, seed=cmd.tree_seed)
            wrapped = update.wrapped
            root = g.tree.group_key
            spi = g.allocate_spi()
            expiry = now + policy.kek_lifetime_s * 1000
            g.kek = KeySA(spi, policy.cipher_suite, root.key, now, expiry)
            kek_update = KekUpdate(spi, policy.cipher_suite, now, expiry, root.version)

        new_teks: tuple[KeySA, ...] = ()
        deactivate: tuple[tuple[int, int], ...] = ()
        g.teks = [t for t in g.teks if t.expiry_ms > now]
        # A TEK asked for because of joins or leaves is moot when none of them
        # changed the membership (re-registrations): keep the keys.
        moot = bool(cmd.joins or cmd.leaves) and not (tree_joins or tree_leaves)
        if cmd.tek_key is not None and not moot:
            activation = now + policy.activation_delay_ms if g.teks else now
            tek = KeySA(
                g.allocate_spi(),
                policy.cipher_suite,
                _tek_key(cmd.tek_key, index),
                activation,
                activation + policy.tek_lifetime_s * 1000,
            )
            # Old TEKs stay valid for receivers until the new one is active plus
            # the deactivation delay, so packets in flight still decrypt.
            end = activation + policy.deactivation_delay_ms
            kept: list[KeySA] = []
            retired: list[tuple[int, int]] = []
            for previous in g.teks:
                if previous.expiry_ms > end:
                    expiry = max(end, previous.activation_ms + 1)
                    retired.append((previous.spi, expiry))
                    previous = dataclasses.replace(previous, expiry_ms=expiry)  # noqa: PLW2901
                kept.append(previous)
            # Rekeys faster than the deactivation delay would keep more TEKs
            # than a GSA or a snapshot holds: the oldest, long superseded, go
            # first (members holding them still drop each at its expiry).
            g.teks = [*kept, tek][-MAX_TEKS:]
            new_teks, deactivate = (tek,), tuple(retired)

        events: dict[str, list[str]] = {}
        for record in joined:
            event = "join" if record.member_id in tree_joins else "rejoin"
            events.setdefault(event, []).append(record.member_id)
        if rejoined:
            events.setdefault("rejoin", []).extend(rejoined)
        for mid, why in leaving.items():
            events.setdefault(_LEAVE_EVENT[why], []).append(mid)
        for event, members in events.items():
            self._record(index, now, cmd.group, event, members, cmd.reason)

        outbound: list[Outbound] = []
        if kek_update or new_teks or senders_added or senders_removed:
            if leaving and kek_update and new_teks:
                # Forward access control: the departed hold `old_kek` and can open
                # the first message; it must not carry the new TEK.
                first = RekeyBody(
                    kek=kek_update,
                    lkh=wrapped,
                    sender_keys_added=senders_added,
                    sender_keys_removed=senders_removed,
                    reason=cmd.reason,
                )
                outbound.append(self._seal(g, first, kek=old_kek))
                second = RekeyBody(teks=new_teks, deactivate=deactivate, reason=cmd.reason)
                outbound.append(self._seal(g, second, kek=g.kek))
            else:
                body = RekeyBody(
                    kek=kek_update,
                    teks=new_teks,
                    deactivate=deactivate,
                    lkh=wrapped,
                    sender_keys_added=senders_added,
                    sender_keys_removed=senders_removed,
                    reason=cmd.reason,
                )
                outbound.append(self._seal(g, body, kek=old_kek))
            self._record(
                index,
                now,
                cmd.group,
                "rekey",
                None,
                f"msg {g.msg_id} kek {g.kek.fingerprint} tek {g.teks[-1].fingerprint}",
            )
        return ApplyResult(
            outbound=tuple(outbound),
            joined=tuple(
                (cmd.group, mid)
                for mid in [
                    *(r.member_id for r in joined),
                    *rejoined,
                    *(m for m in repeated if m in g.members and m not in seen),
                ]
            ),
            left=tuple((cmd.group, mid, why) for mid, why in leaving.items()),
            full=tuple((cmd.group, mid) for mid in full),
            stale=tuple((cmd.group, mid) for mid in stale),
        )

    def _seal(self, g: _Group, body: RekeyBody, *, kek: KeySA | None = None) -> Outbound:
        g.msg_id += 1
        datagram = seal_rekey(
            group=g.policy.group_id,
            kek=kek or g.kek,
            msg_id=g.msg_id,
            body=body.encode(),
            signer=g.signer,
        )
        return Outbound(
            group=g.policy.group_id,
            msg_id=g.msg_id,
            datagram=datagram,
            multicast=g.policy.multicast,
            retransmit_count=g.policy.retransmit_count,
            retransmit_interval_ms=g.policy.retransmit_interval_ms,
        )

    def _record(
        self,
        index: int,
        time_ms: int,
        group: str,
        event: str,
        members: Sequence[str] | None,
        detail: str,
    ) -> None:
        """One audit record per member (or one without), and one log line for
        them all: a batch of joins is one line, `member=m1,m2,...`, not one per
        member on every node."""
        for member in members or (None,):
            self._audit.append(AuditRecord(index, time_ms, group, event, member, detail))
        listed = ",".join(members) if members else None
        log.info(
            "audit index=%d group=%s event=%s member=%s %s", index, group, event, listed, detail
        )

    # ------------------------------------------------------------- snapshots

    def snapshot(self) -> bytes:
        """The whole state as bytes (holds every key: store encrypted only).

        In the lowest format that holds it: until an entry of command version
        2 applies there are no group clocks, and the nodes of the previous
        version (a rolling upgrade, `gcks.cluster.versions`) read what a
        leader sends them."""
        clocks = any(g.clock_ms or g.departed for g in self._groups.values())
        fmt = SNAPSHOT_FORMAT if clocks or self.newest_version > 1 else 2
        groups = []
        for name in sorted(self._groups):
            g = self._groups[name]
            groups.append(
                [
                    g.policy.to_mapping(),
                    g.signing_seed,
                    g.tree.to_state(),
                    encode_key_sa(g.kek),
                    [encode_key_sa(t) for t in g.teks],
                    g.msg_id,
                    g.next_spi,
                    g.next_sender_id,
                    [
                        [m.member_id, m.role.value, m.sender_id, m.sender_key, m.joined_ms]
                        for m in sorted(g.members.values(), key=lambda m: m.member_id)
                    ],
                    sorted(g.banned),
                    *(
                        [g.clock_ms, [[mid, asked, at] for mid, (asked, at) in g.departed.items()]]
                        if fmt > 2
                        else []
                    ),
                ]
            )
        audit = [[a.index, a.time_ms, a.group, a.event, a.member, a.detail] for a in self._audit]
        retired = [[name, self._retired[name]] for name in sorted(self._retired)]
        fields = [fmt, self.applied_index, groups, audit, list(self._seen), retired]
        return packb(fields if fmt < 3 else [*fields, self.newest_version])

    @staticmethod
    def snapshot_version(data: bytes) -> int:
        """The command version a node must apply up to in order to restore
        snapshot bytes, read from their first and last items alone: format 3
        came with version 2 and ends with the newest version its state applied
        (`StateError` if the bytes are not a snapshot this node reads)."""
        try:
            length, fmt, last = array_ends(data)
            if not 5 <= length <= 7:
                raise DecodeError(f"snapshot: {length} items outside [5, 7]")
            fmt = read_int(fmt, "snapshot.format", 0, 255)
            if fmt > SNAPSHOT_FORMAT:
                raise StateError(
                    f"snapshot format {fmt}, written by a newer gcks; "
                    f"this node reads up to format {SNAPSHOT_FORMAT}"
                )
            if fmt < 3 or length < 7:
                return 1 if fmt < 3 else 2
            return max(2, read_int(last, "snapshot.version", 1, 255))
        except DecodeError as exc:
            raise StateError(f"not a group state snapshot: {exc}") from None

    @classmethod
    def restore(cls, data: bytes) -> GroupState:
        """The state `snapshot()` produced; `StateError` if the bytes are not one."""
        try:
            return cls._restore(data)
        except (DecodeError, GcksProtoError, ValueError, KeyError) as exc:
            raise StateError(f"cannot restore the group state snapshot: {exc}") from None

    @classmethod
    def _restore(cls, data: bytes) -> GroupState:
        fields = read_list(unpackb(data, max_size=len(data)), "snapshot", 7, min_items=5)
        fmt = read_int(fields[0], "snapshot.format", 0, 255)
        if fmt > SNAPSHOT_FORMAT:
            raise NewerSnapshot(
                f"snapshot format {fmt}; this node reads up to format {SNAPSHOT_FORMAT}"
            )
        if (fmt, len(fields)) not in ((1, 5), (2, 6), (3, 7)):
            raise StateError("unknown snapshot format")
        applied, groups, audit, seen = fields[1:5]
        state = cls()
        state.applied_index = read_int(applied, "snapshot.applied", 0, 2**63)
        if fmt >= 3:
            state.newest_version = read_int(fields[6], "snapshot.version", 1, 255)
            if state.newest_version > COMMAND_VERSION:
                raise NewerSnapshot(
                    f"the snapshot's state applied command version {state.newest_version}; "
                    f"this node applies up to version {COMMAND_VERSION}"
                )
        for i, item in enumerate(read_list(groups, "snapshot.groups", 1 << 20)):
            name = f"snapshot.groups[{i}]"
            shape = read_record(item, name, 10 if fmt < 3 else 12)
            # Formats before 3 hold no clock nor departures: see `_Group.at_time`.
            *head, clock, departed = shape if fmt >= 3 else (*shape, 0, [])
            policy, seed, tree, kek, teks, msg_id, next_spi, next_sender, members, banned = head
            records: dict[str, MemberRecord] = {}
            for j, raw in enumerate(read_list(members, f"{name}.members", 1 << 24)):
                mid, role, sender_id, sender_key, joined = read_record(raw, f"{name}.m[{j}]", 5)
                record = MemberRecord(
                    member_id=read_str(mid, "member_id", 64),
                    role=read_enum(role, "role", Role),
                    sender_id=read_optional(sender_id, "sender_id", read_int, 1, MAX_SENDER_ID),
                    sender_key=read_optional(sender_key, "sender_key", read_bytes, 32, 32),
                    joined_ms=read_int(joined, "joined_ms", 0, 2**63 - 1),
                )
                records[record.member_id] = record
            g = _Group(
                policy=GroupPolicy.from_mapping(read_map(policy, f"{name}.policy", 64)),
                signing_seed=read_bytes(seed, f"{name}.signing_seed", 32, 32),
                tree=KeyTree.from_state(tree),
                kek=read_key_sa(kek, f"{name}.kek"),
                teks=[read_key_sa(t, f"{name}.teks") for t in read_list(teks, "teks", 64)],
                msg_id=read_int(msg_id, f"{name}.msg_id", 0, 2**64 - 1),
                next_spi=read_int(next_spi, f"{name}.next_spi", 1, MAX_SPI),
                next_sender_id=read_int(next_sender, f"{name}.next_sender_id", 1, 2**32),
                members=records,
                banned={
                    read_str(b, f"{name}.banned", 64)
                    for b in read_list(banned, f"{name}.banned", 1 << 24)
                },
                clock_ms=read_int(clock, f"{name}.clock_ms", 0, 2**63 - 1),
                departed=_read_departed(departed, f"{name}.departed"),
            )
            if set(records) != set(g.tree.members):
                raise StateError(f"{name}: members and key tree disagree")
            state._groups[g.policy.group_id] = g
        for item in read_list(fields[5] if fmt > 1 else [], "snapshot.retired", 1 << 20):
            group, msg_id = read_record(item, "snapshot.retired", 2)
            state._retired[read_str(group, "snapshot.retired.group", 64)] = read_int(
                msg_id, "snapshot.retired.msg_id", 0, 2**64 - 1
            )
        for digest in read_list(seen, "snapshot.seen", DEDUPE_LIMIT):
            state._seen[read_bytes(digest, "snapshot.seen", 32, 32)] = None
        for raw in read_list(audit, "snapshot.audit", AUDIT_LIMIT):
            index, time_ms, group, event, member, detail = read_record(raw, "audit", 6)
            state._audit.append(
                AuditRecord(
                    read_int(index, "audit.index", 0, 2**63),
                    read_int(time_ms, "audit.time_ms", 0, 2**63 - 1),
                    read_str(group, "audit.group", 64),
                    read_str(event, "audit.event", 16),
                    read_optional(member, "audit.member", read_str, 64),
                    read_str(detail, "audit.detail", 1024),
                )
            )
        state.latest_ms = max(
            (max(g.kek.activation_ms, g.clock_ms) for g in state._groups.values()), default=0
        )
        return state


def _read_departed(value: object, name: str) -> dict[str, tuple[int, int]]:
    departed: dict[str, tuple[int, int]] = {}
    for item in read_list(value, name, 1 << 24):
        member_id, asked, at = read_record(item, name, 3)
        departed[read_str(member_id, name, 64)] = (
            read_int(asked, name, 0, 2**63 - 1),
            read_int(at, name, 0, 2**63 - 1),
        )
    return departed
