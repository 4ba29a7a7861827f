"""Decides when a group's keys change, and makes the commands that change them.

Two sources of rekeys (DESIGN.md "Rekey"):
- membership: joins and leaves are coalesced per group over the policy's
  batch interval into one `Rekey` command, so a burst of registrations costs
  one LKH update and one multicast message, not one each. The batch is the
  leader's: a follower forwards each request to it with a random tag
  (`gcks.cluster.membership`) and waits for its own apply of the entry that
  reports the tag, so the whole cluster sends one rekey per interval, stamped
  by one clock;
- lifetimes: on the leader only, a TEK close to expiry gets a successor
  (early enough for its activation delay), and a KEK close to expiry is
  refreshed through the LKH tree; an administrator can force either.

This is where fresh key material and the wall clock enter the system: the
seeds and TEKs are drawn here with `os.urandom` and travel inside the command,
so applying it on every node gives the same keys.

May import trio and `gcks.cluster` (driver, state, commands). Never logs keys.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from gcks.cluster.commands import (
    COMMAND_VERSION,
    MAX_REASON,
    MAX_REKEY_BATCH,
    MAX_REQUEST_TAG,
    Command,
    CreateGroup,
    Join,
    Leave,
    LeaveReason,
    Rekey,
    UpdatePolicy,
    encode_command,
)
from gcks.cluster.driver import RaftDriver
from gcks.cluster.logthrottle import LogThrottle
from gcks.cluster.membership import MembershipRequest, decode_request, encode_request
from gcks.cluster.raft.types import Role as RaftRole
from gcks.cluster.state import ApplyResult
from gcks.proto.errors import DecodeError
from gcks.proto.policy import GroupPolicy, Role

log = logging.getLogger(__name__)


CLOCK_SKEW_WARN_MS = 1000
CLOCK_CLAMP_MS = 10_000


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class RekeyerSettings:
    request_timeout_s: float = 10.0  # how long a registration may wait for its commit
    check_interval_s: float = 1.0  # how often the leader checks key lifetimes
    min_margin_ms: int = 5_000  # rekey at least this long before a key expires
    resend_s: float = 2.0  # a forwarded request not answered by then is sent again


@dataclass
class _Batch:
    joins: dict[str, Join] = field(default_factory=dict)
    leaves: dict[str, Leave] = field(default_factory=dict)
    # Leaves of a member already leaving in this batch: they go in the entry
    # after the one that counts (apply takes a member's first), so that their
    # tags are reported and their requests answered.
    merged: list[Leave] = field(default_factory=list)
    taken: trio.Event = field(default_factory=trio.Event)  # out of the open batches
    done: trio.Event = field(default_factory=trio.Event)
    result: ApplyResult | None = None
    error: BaseException | None = None

    @property
    def tags(self) -> list[int]:
        """Of every request queued here (0: a request without one)."""
        leaves = (*self.leaves.values(), *self.merged)
        return [j.tag for j in self.joins.values()] + [x.tag for x in leaves]

    @property
    def full(self) -> bool:
        return len(self.joins) + len(self.leaves) + len(self.merged) >= MAX_REKEY_BATCH


@dataclass
class _Forwarded:
    """A request this node forwarded to the leader, waiting for its entry to apply here."""

    result: ApplyResult | None = None
    # Set by the entry that answers the request and by every change of leader;
    # the waiter then looks again, with a fresh event.
    wake: trio.Event = field(default_factory=trio.Event)


class Rekeyer:
    """Membership batching and lifetime-driven rekeys for every group of a node."""

    def __init__(
        self,
        driver: RaftDriver,
        settings: RekeyerSettings,
        *,
        bootstrap_groups: tuple[GroupPolicy, ...] = (),
        clock_ms: Callable[[], int] = wall_clock_ms,
        forward: Callable[[str, bytes], object] | None = None,
        command_version: Callable[[], int] = lambda: COMMAND_VERSION,
    ) -> None:
        """`forward(node_id, payload)` sends a membership request to a peer
        node (best effort); without it every request is batched here.
        `command_version()` is the newest version every node of the cluster
        applies (`gcks.cluster.versions`): commands are made in it."""
        self._driver = driver
        self._forward = forward
        self._forwarded: dict[int, _Forwarded] = {}  # by request tag
        self._settings = settings
        self._bootstrap = bootstrap_groups
        self._clock_ms = clock_ms
        self.command_version = command_version
        self._skew_warnings = LogThrottle()
        # Per group, the batches not yet proposed, oldest first: a request goes
        # to the first one that can take it (see `_batch`).
        self._batches: dict[str, list[_Batch]] = {}
        # Request tags in those batches and in the proposals still out: a copy
        # that a follower sends again meanwhile is already in hand.
        self._queued: dict[int, _Batch] = {}
        # One item per batch opened and not yet flushed, so the open batches
        # (one per active group, plus full ones) bound it: a fixed capacity
        # would refuse, by an exception, the storm that opens many at once.
        self._flush_send, self._flush_receive = trio.open_memory_channel[tuple[str, _Batch]](
            math.inf
        )
        self.rekeys_proposed = 0

    # ------------------------------------------------------------ membership

    async def join(
        self, group: str, member_id: str, role: Role, sender_key: bytes | None
    ) -> ApplyResult:
        """Add `member_id` to the group's next batch and wait until the entry
        that carries it is applied here; that entry's result."""
        tag = _new_tag()
        join = Join(member_id, role, sender_key, tag=tag, requested_ms=self.request_ms())
        return await self._request(MembershipRequest(tag, group, joins=(join,)))

    async def leave(self, group: str, member_id: str, reason: LeaveReason) -> ApplyResult:
        tag = _new_tag()
        leave = Leave(member_id, reason, tag=tag, requested_ms=self.request_ms())
        return await self._request(MembershipRequest(tag, group, leaves=(leave,)))

    async def _request(self, request: MembershipRequest) -> ApplyResult:
        status = self._driver.status
        if self._forward is None or status.leader is None or status.role is RaftRole.LEADER:
            # The leader batches; so does a node that knows no leader yet (its
            # proposal waits in the driver until there is one, then goes there).
            batch = self._add(request)
            return await self._wait(batch)
        return await self._forward_to_leader(request)

    def _add(self, request: MembershipRequest) -> _Batch:
        batch: _Batch | None = None
        for join in request.joins:
            batch = self._queued.get(join.tag) if join.tag else None
            if batch is None:
                # A second registration of a member (a retry through another
                # node) goes to a later batch: an entry carries one join per
                # member, and each request's tag must reach an entry.
                batch = self._batch(request.group, join.member_id, join=True)
                batch.joins[join.member_id] = join
                self._queue_tag(join.tag, batch)
        for leave in request.leaves:
            queued = self._queued.get(leave.tag) if leave.tag else None
            if queued is not None:
                batch = queued
                continue
            batch = self._batch(request.group, leave.member_id, join=False)
            earlier = batch.leaves.get(leave.member_id)
            if earlier is None:
                batch.leaves[leave.member_id] = leave
            elif leave.reason is LeaveReason.EVICT and earlier.reason is not LeaveReason.EVICT:
                batch.leaves[leave.member_id] = leave  # an eviction (and its ban) wins
                batch.merged.append(earlier)
            else:
                batch.merged.append(leave)
            self._queue_tag(leave.tag, batch)
        if batch is None:
            raise ValueError("a membership request needs a join or a leave")
        return batch

    def _queue_tag(self, tag: int, batch: _Batch) -> None:
        if tag:
            self._queued[tag] = batch

    async def _forward_to_leader(self, request: MembershipRequest) -> ApplyResult:
        waiter = self._forwarded[request.tag] = _Forwarded()
        assert self._forward is not None
        try:
            while waiter.result is None:
                waiter.wake = trio.Event()
                status = self._driver.status
                if status.role is RaftRole.LEADER:
                    # Leadership came here meanwhile: our own batch, still
                    # answered by the tag (the batch's waiters are others).
                    self._add(request)
                elif status.leader is not None:
                    # Sent again to each new leader, and after a while to the
                    # same one: a copy can be lost (a full peer queue, a leader
                    # that fails before proposing it, an answer that arrived
                    # inside a snapshot). Apply skips a tag it has seen, so a
                    # second copy that commits changes nothing.
                    self._forward(status.leader, encode_request(request, self.command_version()))
                # One event and one deadline, not three racing tasks (`first_of`):
                # most registrations wait here, and a nursery per wait cost about
                # five times as much CPU.
                with trio.move_on_after(self._settings.resend_s):
                    await waiter.wake.wait()
        finally:
            del self._forwarded[request.tag]
        return waiter.result

    def deliver(self, from_id: str, payload: bytes) -> None:
        """A request forwarded by node `from_id`: into this node's batch if it leads."""
        try:
            request = decode_request(payload)
        except DecodeError as exc:
            log.warning("dropped a malformed membership request from %s: %s", from_id, exc)
            return
        if self._driver.status.role is not RaftRole.LEADER:
            return  # the sender forwards it again once it learns who leads now
        if request.joins or request.leaves:
            self._add(request)

    def on_apply(self, result: ApplyResult) -> None:
        """Called for every applied entry: answers the forwarded requests it carried."""
        for tag in result.requests:
            waiter = self._forwarded.get(tag)
            if waiter is not None and waiter.result is None:
                waiter.result = result
                waiter.wake.set()

    def now_ms(self) -> int:
        """This node's clock for a new command, not before the newest command time
        it applied when that is at most `CLOCK_CLAMP_MS` ahead: when leadership
        moves to a node whose clock lags a little, key times must not move
        backwards. Not further: one node whose clock runs ahead would otherwise
        freeze every proposer's time at its own. A lag of more than
        `CLOCK_SKEW_WARN_MS` is logged (at most once a minute): fix NTP."""
        local, latest = self._clock_ms(), self._driver.state.latest_ms
        lag = latest - local
        if lag > CLOCK_SKEW_WARN_MS and self._skew_warnings.ready():
            log.warning(
                "this node's clock is %.1f s behind the newest committed command; %s "
                "(check NTP on every node)",
                lag / 1000,
                "using that time" if lag <= CLOCK_CLAMP_MS else "too far to follow",
            )
        return latest if 0 < lag <= CLOCK_CLAMP_MS else local

    def request_ms(self) -> int:
        """When a membership request arrived (`Join.requested_ms`): this node's
        clock, but never before the newest time it applied, however far its
        clock lags. A node that has applied a member's leave then stamps that
        member's next request later than the leave, whatever the clocks."""
        return max(self._clock_ms(), self._driver.state.latest_ms)

    async def force(self, group: str, *, tek: bool = True, kek: bool = False) -> ApplyResult:
        """An administrator's rekey: a new TEK, a refreshed KEK, or both."""
        return await self._propose(
            Rekey(
                group=group,
                joins=(),
                leaves=(),
                tree_seed=os.urandom(32),
                tek_key=os.urandom(32) if tek else None,
                refresh_kek=kek,
                now_ms=self.now_ms(),
                reason="forced by administrator",
            )
        )

    async def update_policy(self, policy: GroupPolicy) -> ApplyResult:
        """Replace a group's policy; members it no longer authorizes leave in the
        same entry, rekeyed from the seeds drawn here."""
        return await self._propose(
            UpdatePolicy(
                policy,
                self.now_ms(),
                tree_seed=os.urandom(32),
                tek_key=os.urandom(32),
            )
        )

    async def create_group(self, policy: GroupPolicy) -> ApplyResult:
        return await self._propose(
            CreateGroup(
                policy=policy,
                signing_seed=os.urandom(32),
                tree_seed=os.urandom(32),
                tek_key=os.urandom(32),
                now_ms=self.now_ms(),
            )
        )

    def _batch(self, group: str, member_id: str, *, join: bool) -> _Batch:
        """The first batch of `group` not yet proposed that has room for a join
        (or leave) of `member_id`; a new one if none has. A batch holds one join
        per member; a leave never goes before the member's latest join (with
        it, the leave wins), a join always after the member's latest leave:
        the requests of one member take effect in their order."""
        batches = self._batches.setdefault(group, [])
        start = 0
        for position, batch in enumerate(batches):
            if join and member_id in batch.leaves:
                start = position + 1
            elif not join and member_id in batch.joins:
                start = position
        for batch in batches[start:]:
            if not batch.full and not (join and member_id in batch.joins):
                return batch
        # A full batch keeps its flush; later arrivals start the next one, so
        # a burst becomes several commands that each fit one rekey message.
        batch = _Batch()
        batches.append(batch)
        self._flush_send.send_nowait((group, batch))
        return batch

    async def _wait(self, batch: _Batch) -> ApplyResult:
        await batch.done.wait()
        if batch.error is not None:
            raise batch.error
        assert batch.result is not None
        return batch.result

    # ------------------------------------------------------------------ tasks

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flusher, nursery)
            nursery.start_soon(self._lifetimes)
            if self._forward is not None:
                nursery.start_soon(self._wake_forwarders)
            task_status.started()

    async def _flusher(self, nursery: trio.Nursery) -> None:
        async for group, batch in self._flush_receive:
            nursery.start_soon(self._flush_after_interval, group, batch)

    async def _flush_after_interval(self, group: str, batch: _Batch) -> None:
        state = self._driver.state
        interval_ms = state.policy(group).batch_interval_ms if state.has_group(group) else 0
        await trio.sleep(interval_ms / 1000)
        # Proposed in the order the batches opened, also when their intervals
        # end together: a second join of a member (a later batch) must not
        # overtake a leave of it (an earlier one).
        batches = self._batches[group]
        while batches[0] is not batch:
            await batches[0].taken.wait()
        batches.pop(0)
        if not batches:
            del self._batches[group]
        batch.taken.set()
        state = self._driver.state  # a snapshot install may have replaced it meanwhile
        try:
            policy = state.policy(group) if state.has_group(group) else None
            # Whether a join is new is decided at apply, not here: this node's
            # state may lag (a leave committed elsewhere), and a newcomer whose
            # batch carried no TEK would get a GSA without one (rekey_on_join
            # hides older TEKs). Apply drops the TEK if membership is unchanged.
            new_tek = policy is not None and bool(
                (batch.joins and policy.rekey_on_join) or (batch.leaves and policy.rekey_on_leave)
            )
            names = [*(f"+{m}" for m in batch.joins), *(f"-{m}" for m in batch.leaves)]
            reason = "membership " + " ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            if len(reason) > MAX_REASON:  # ids run to 64 characters: keep the command valid
                reason = reason[: MAX_REASON - 4] + " ..."
            batch.result = await self._propose(
                Rekey(
                    group=group,
                    joins=tuple(batch.joins.values()),
                    leaves=(*batch.leaves.values(), *batch.merged),
                    tree_seed=os.urandom(32),
                    tek_key=os.urandom(32) if new_tek else None,
                    refresh_kek=False,
                    now_ms=self.now_ms(),
                    reason=reason,
                )
            )
        except Exception as exc:  # handed to every waiter of the batch, not swallowed
            batch.error = exc
        finally:
            for tag in batch.tags:
                if self._queued.get(tag) is batch:
                    del self._queued[tag]
            batch.done.set()

    def encode(self, command: Command) -> bytes:
        """The log entry of `command`, in the newest version every node applies
        (`command_version`): commands are made here and by the admin API."""
        return encode_command(dataclasses.replace(command, version=self.command_version()))

    async def _propose(self, command: CreateGroup | Rekey | UpdatePolicy) -> ApplyResult:
        result = await self._driver.propose(self.encode(command), self._settings.request_timeout_s)
        self.rekeys_proposed += 1
        return result

    async def _wake_forwarders(self) -> None:
        """On every change of leader (or of term, or to none), each forwarded
        request is sent again at once: to the new leader, or batched here."""
        while True:
            await self._driver.wait_status_change()
            for waiter in self._forwarded.values():
                waiter.wake.set()

    async def _lifetimes(self) -> None:
        while True:
            await trio.sleep(self._settings.check_interval_s)
            if self._driver.status.role is not RaftRole.LEADER:
                continue
            try:
                await self._leader_duties()
            except Exception as exc:
                # A lost proposal (leadership moved, no quorum) is retried on
                # the next check by whichever node leads then.
                log.warning("lifetime rekey check failed: %s", exc)

    async def _leader_duties(self) -> None:
        state = self._driver.state
        for policy in self._bootstrap:
            if not state.has_group(policy.group_id):
                log.info("creating configured group %s", policy.group_id)
                await self.create_group(policy)
        for group in state.groups:
            if not state.has_group(group):
                continue
            policy = state.policy(group)
            now = self.now_ms()
            newest_tek = max((t.expiry_ms for t in state.teks(group)), default=0)
            tek_margin = max(
                self._settings.min_margin_ms,
                policy.activation_delay_ms + policy.tek_lifetime_s * 100,  # 10% of lifetime
            )
            kek_margin = max(self._settings.min_margin_ms, policy.kek_lifetime_s * 100)
            refresh_kek = state.kek(group).expiry_ms - now <= kek_margin
            new_tek = newest_tek - now <= tek_margin
            if new_tek or refresh_kek:
                log.info("lifetime rekey of %s (tek=%s kek=%s)", group, new_tek, refresh_kek)
                await self._propose(
                    Rekey(
                        group=group,
                        joins=(),
                        leaves=(),
                        tree_seed=os.urandom(32),
                        tek_key=os.urandom(32) if new_tek else None,
                        refresh_kek=refresh_kek,
                        now_ms=now,
                        reason="key lifetime",
                    )
                )


def _new_tag() -> int:
    """A random request tag in [1, 2**63 - 1]: unique without coordination."""
    return int.from_bytes(os.urandom(8), "big") % MAX_REQUEST_TAG + 1
