"""The trio driver of the Raft core: the one task that owns a `RawNode`.

Everything that touches the core goes through this task, in order: clock
ticks, messages from peers, proposals, reads, transfers. After each input it
drains `ready()` the way the core's contract asks: persist the snapshot,
entries and hard state (one fsync, in a worker thread so the event loop keeps
serving), only then send the messages, then apply the committed entries to the
state machine, then `advance()`. A client is therefore answered only for an
entry that a majority, this node included, has on disk.

Proposals are tracked by their bytes (every command carries fresh random
seeds, so equal bytes mean the same proposal): the waiter resolves when this
node applies that entry, whichever node the proposal went through.

May import trio, `gcks.cluster.raft`, `gcks.cluster.state`. It never decides
what to propose: the registrar, the rekeyer and the admin API do.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from gcks.cluster.raft.codec import decode_message, encode_message
from gcks.cluster.raft.errors import NotLeader, RaftCodecError, RaftError
from gcks.cluster.raft.raft import RawNode, Status
from gcks.cluster.raft.storage import DiskStorage
from gcks.cluster.raft.types import ConfChange, EntryType, Ready, Snapshot
from gcks.cluster.state import ApplyResult, GroupState, NewerSnapshot, UpgradeRequired

log = logging.getLogger(__name__)


class Transport(Protocol):
    """What the driver needs of the peer transport."""

    def send(self, peer_id: str, payload: bytes) -> bool: ...


class NoQuorum(Exception):
    """A proposal or read did not complete within its deadline (no leader, or no
    majority reachable). The request may still commit later; retry is safe."""


class Applier(Protocol):
    """Called for every applied entry, in log order, from the driver task."""

    def __call__(self, index: int, result: ApplyResult, *, replay: bool) -> None: ...


@dataclass
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    result: ApplyResult | None = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class DriverSettings:
    tick_s: float
    snapshot_every: int = 10_000  # applied entries between snapshots
    inbox_size: int = 1024


class RaftDriver:
    """Owns the `RawNode`, the storage and the group state of one node."""

    def __init__(
        self,
        raw: RawNode,
        storage: DiskStorage,
        state: GroupState,
        transport: Transport,
        settings: DriverSettings,
        *,
        on_apply: Applier | None = None,
        on_install: Callable[[GroupState], None] | None = None,
        replay_until: int = 0,
        link_up: Callable[[str], bool] | None = None,
    ) -> None:
        self._raw = raw
        self._storage = storage
        self.state = state
        self._transport = transport
        self._settings = settings
        self._on_apply = on_apply
        # A snapshot replaces the state without applying the entries it skips:
        # whoever keeps state derived from applies (the member connections)
        # must compare it with the new state.
        self._on_install = on_install
        # Entries up to here were applied before a restart: re-applying them
        # rebuilds the state, but their side effects (sends) already happened.
        self._replay_until = replay_until
        # Whether our outbound link to a peer is connected: a link to the leader
        # that was up and broke (a killed process resets it at once) lets the
        # followers elect a new leader in a tick or two instead of waiting out
        # a whole election timeout (`RawNode.report_leader_lost`).
        self._link_up = link_up
        self._leader_link_seen: str | None = None
        self._inbox_send, self._inbox = trio.open_memory_channel[Callable[[], None]](
            settings.inbox_size
        )
        self._waiters: dict[bytes, _Waiter] = {}
        self._reads: dict[bytes, _Waiter] = {}
        # Confirmed read states (index, context) waiting for the state machine:
        # on a follower the read index is the leader's commit index, which may
        # be ahead of what this node has applied.
        self._confirmed_reads: list[tuple[int, bytes]] = []
        self._read_seq = 0
        self._last_snapshot = state.applied_index
        self.status: Status = raw.status
        self.leader_changes = 0
        self.proposals = 0
        self._status_changed = trio.Event()

    # ------------------------------------------------------------ public API

    async def propose(self, data: bytes, timeout_s: float) -> ApplyResult:
        """Propose `data` and wait until this node applied it. Raises `NoQuorum`
        when that did not happen within `timeout_s` (no leader elected, no
        majority reachable); the proposal may still commit later.

        A proposal forwarded to a leader that then fails is lost with it, so it
        is proposed again whenever the leader changes; the state machine skips
        a second committed copy (`GroupState` remembers command digests)."""
        key = hashlib.sha256(data).digest()
        waiter = self._waiters.setdefault(key, _Waiter())

        def run() -> None:
            try:
                self._raw.propose(data)
                self.proposals += 1
            except NotLeader:
                pass  # no leader yet (an election): proposed again once there is one
            except RaftError as exc:
                waiter.error = exc
                waiter.event.set()

        try:
            with trio.move_on_after(timeout_s):
                while not waiter.event.is_set():
                    leader = self.status.leader
                    await self._inbox_send.send(run)
                    while not waiter.event.is_set() and self.status.leader == leader:
                        await first_of(waiter.event.wait, self._status_changed.wait)
        finally:
            if self._waiters.get(key) is waiter:
                del self._waiters[key]
        if waiter.error is not None:
            raise waiter.error
        if waiter.result is None:
            raise NoQuorum(f"proposal not applied within {timeout_s:.1f} s")
        return waiter.result

    async def read_index(self, timeout_s: float) -> None:
        """Wait until this node's state reflects every write committed before the
        call (ReadIndex): then reads of `state` are linearizable."""
        self._read_seq += 1
        context = self._read_seq.to_bytes(8, "big")
        waiter = self._reads[context] = _Waiter()

        def run() -> None:
            try:
                self._raw.read_index(context)
            except RaftError as exc:
                waiter.error = exc
                waiter.event.set()

        try:
            with trio.move_on_after(timeout_s):
                await self._inbox_send.send(run)
                await waiter.event.wait()
        finally:
            self._reads.pop(context, None)
        if waiter.error is not None:
            raise waiter.error
        if not waiter.event.is_set():
            raise NoQuorum(f"read index not confirmed within {timeout_s:.1f} s")

    async def call(self, fn: Callable[[RawNode], None]) -> None:
        """Run `fn(raw)` in the driver task (conf changes, transfers, campaign)."""
        done = trio.Event()
        error: list[BaseException] = []

        def run() -> None:
            try:
                fn(self._raw)
            except RaftError as exc:
                error.append(exc)
            finally:
                done.set()

        await self._inbox_send.send(run)
        await done.wait()
        if error:
            raise error[0]

    async def propose_conf_change(self, change: ConfChange) -> None:
        await self.call(lambda raw: raw.propose_conf_change(change))

    async def wait_status_change(self) -> None:
        await self._status_changed.wait()

    def deliver(self, from_id: str, payload: bytes) -> bool:
        """Queue a frame from an authenticated peer; False if the inbox is full."""
        try:
            message = decode_message(payload)
        except RaftCodecError as exc:
            log.warning("dropped a malformed raft frame from %s: %s", from_id, exc)
            return True
        if message.frm != from_id:
            # The TLS identity is the only proof of who sent it.
            log.warning("dropped a raft message from %s claiming to be %s", from_id, message.frm)
            return True
        try:
            self._inbox_send.send_nowait(lambda: self._raw.step(message))
        except trio.WouldBlock:
            return False  # Raft tolerates loss; the sender retries
        return True

    # ------------------------------------------------------------------ loop

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        tick_s = self._settings.tick_s
        next_tick = trio.current_time() + tick_s
        await self._drain_ready()
        task_status.started()
        while True:
            with trio.move_on_at(next_tick):
                job = await self._inbox.receive()
                job()
                # Take whatever else is already queued before one Ready: batching.
                while True:
                    try:
                        job = self._inbox.receive_nowait()
                    except trio.WouldBlock:
                        break
                    job()
            now = trio.current_time()
            if now >= next_tick:
                # A late wake-up ticks once, not many times: a burst of ticks
                # after a stall would start elections that nothing justified.
                self._raw.tick()
                next_tick = max(next_tick + tick_s, now + tick_s / 2)
            await self._drain_ready()
            # After every step, not only on ticks: a node that has just
            # (re)started may learn its leader and lose it within one tick,
            # and the hint needs to have seen the link up under that leader.
            self._watch_leader_link()

    def _watch_leader_link(self) -> None:
        leader = self.status.leader
        if self._link_up is None or leader is None or leader == self.status.id:
            self._leader_link_seen = None
            return
        if self._link_up(leader):
            self._leader_link_seen = leader
        elif self._leader_link_seen == leader:
            log.info("link to leader %s lost: starting an election early", leader)
            self._leader_link_seen = None
            self._raw.report_leader_lost(leader)

    async def _drain_ready(self) -> None:
        while self._raw.has_ready():
            rd = self._raw.ready()
            await self._persist(rd)
            for m in rd.messages:
                self._transport.send(m.to, encode_message(m))
            if rd.snapshot is not None:
                await self._install_snapshot(rd.snapshot)
            for entry in rd.committed_entries:
                if entry.index <= self.state.applied_index:
                    continue
                data = entry.data if entry.type is EntryType.NORMAL else b""
                self._apply(entry.index, data)
            self._confirmed_reads.extend((rs.index, rs.context) for rs in rd.read_states)
            self._release_reads()
            self._raw.advance(rd)
            if rd.soft_state is not None:
                self.leader_changes += 1 if rd.soft_state.leader != self.status.leader else 0
            self._update_status()
            await self._maybe_snapshot()

    async def _persist(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            await trio.to_thread.run_sync(self._storage.save_snapshot, rd.snapshot)
        if rd.entries or rd.hard_state is not None:
            await trio.to_thread.run_sync(self._storage.save, rd.hard_state, list(rd.entries))

    def _release_reads(self) -> None:
        """Answer the reads whose read index this node has applied (etcd's rule:
        serve once applied >= ReadState.index); forget those nobody awaits."""
        applied, waiting = self.state.applied_index, []
        for index, context in self._confirmed_reads:
            waiter = self._reads.get(context)
            if waiter is None:
                continue
            if index <= applied:
                waiter.event.set()
            else:
                waiting.append((index, context))
        self._confirmed_reads = waiting

    async def _install_snapshot(self, snapshot: Snapshot) -> None:
        # Decoding a large state (a 100k-member group is ~16 MB) is CPU work:
        # off the event loop, so listeners keep answering meanwhile.
        try:
            state = await trio.to_thread.run_sync(GroupState.restore, snapshot.data)
        except NewerSnapshot as exc:
            raise UpgradeRequired(
                f"the leader sent a snapshot written by a newer gcks ({exc}): upgrade this node"
            ) from None
        self.state = state
        self.state.applied_index = snapshot.meta.index
        self._last_snapshot = snapshot.meta.index
        log.info("installed snapshot at index %d", snapshot.meta.index)
        if self._on_install is not None:
            self._on_install(state)

    def _apply(self, index: int, data: bytes) -> None:
        result = self.state.apply(index, data)
        if self._on_apply is not None:
            self._on_apply(index, result, replay=index <= self._replay_until)
        if data:
            waiter = self._waiters.pop(hashlib.sha256(data).digest(), None)
            if waiter is not None:
                waiter.result = result
                waiter.event.set()

    def _update_status(self) -> None:
        old = self.status
        self.status = self._raw.status
        if (old.role, old.leader, old.term) != (
            self.status.role,
            self.status.leader,
            self.status.term,
        ):
            self._status_changed.set()
            self._status_changed = trio.Event()

    async def _maybe_snapshot(self) -> None:
        applied = self.state.applied_index
        if applied - self._last_snapshot < self._settings.snapshot_every:
            return
        # Only this task mutates the state, and it waits here: encoding it in a
        # worker thread is safe and keeps the event loop serving (readers only).
        data = await trio.to_thread.run_sync(self.state.snapshot)
        snapshot = self._raw.compact(applied, data)
        await trio.to_thread.run_sync(self._storage.save_snapshot, snapshot)
        self._last_snapshot = applied
        log.info("snapshot at index %d (%d bytes)", applied, len(snapshot.data))


async def first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as any of `waits` returns (the others are cancelled)."""
    async with trio.open_nursery() as nursery:
        for wait in waits:

            async def run(wait: Callable[[], Awaitable[object]] = wait) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
