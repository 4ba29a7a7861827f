"""A tiny in-memory network of `RawNode`s for the Raft interaction tests.

Drives each node exactly like a real driver (persist, send, apply, advance),
keeps each node's "durable" state so a node can be restarted from it, and
delivers messages FIFO with optional cuts between nodes. Deterministic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from gcks.cluster.raft.raft import RaftConfig, RawNode
from gcks.cluster.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    ReadState,
    Role,
    Snapshot,
    SnapshotMeta,
)
from gcks.proto.codec import packb, unpackb


@dataclass
class Disk:
    """What a node fsynced: enough to restart it."""

    hard_state: HardState = field(default_factory=HardState)
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None

    def append(self, ents: Iterable[Entry]) -> None:
        for e in ents:
            first = (
                self.entries[0].index
                if self.entries
                else (self.snapshot.meta.index + 1 if self.snapshot else 1)
            )
            del self.entries[e.index - first :]
            self.entries.append(e)


@dataclass
class App:
    """The state machine: the list of applied application commands."""

    commands: list[bytes] = field(default_factory=list)
    applied_index: int = 0
    reads: list[ReadState] = field(default_factory=list)

    def snapshot_data(self) -> bytes:
        return packb(self.commands)

    def restore(self, snap: Snapshot) -> None:
        data = unpackb(snap.data)
        assert isinstance(data, list)
        self.commands = list(data)
        self.applied_index = snap.meta.index


Filter = Callable[[Message], bool]


class Network:
    def __init__(
        self,
        ids: Iterable[str],
        *,
        learners: Iterable[str] = (),
        seed: int = 0,
        logs: dict[str, tuple[int, list[int]]] | None = None,
        **config: Any,
    ) -> None:
        """`logs` maps a node to (current term, terms of its entries from index 2 on),
        on top of a snapshot at index 1 (term 1) holding the configuration."""
        self.ids = list(ids)
        self.conf = ConfState(frozenset(self.ids), frozenset(learners))
        self.config = config
        self.seed = seed
        self.nodes: dict[str, RawNode] = {}
        self.disks: dict[str, Disk] = {}
        self.apps: dict[str, App] = {}
        self.queue: deque[Message] = deque()
        self.cut: set[tuple[str, str]] = set()
        self.down: set[str] = set()
        self.filters: list[Filter] = []  # return False to drop a message
        self.sent: list[Message] = []
        for i, nid in enumerate(list(self.ids) + list(learners)):
            if logs is not None and nid in logs:
                term, terms = logs[nid]
                disk = Disk(
                    HardState(term, None, 1),
                    [Entry(t, i, data=b"%d" % i) for i, t in enumerate(terms, start=2)],
                    Snapshot(SnapshotMeta(1, 1, self.conf), packb([])),
                )
                self.disks[nid] = disk
                self.nodes[nid] = RawNode(
                    RaftConfig(id=nid, seed=seed * 100 + i, **config),
                    conf=self.conf,
                    hard_state=disk.hard_state,
                    entries=disk.entries,
                    snapshot=disk.snapshot,
                )
                self.apps[nid] = App(applied_index=1)
            else:
                self.add_node(nid, conf=self.conf, seed=seed * 100 + i)

    def add_node(self, nid: str, *, conf: ConfState, seed: int = 0, **overrides: Any) -> RawNode:
        cfg = RaftConfig(id=nid, seed=seed, **{**self.config, **overrides})
        node = RawNode(cfg, conf=conf)
        self.nodes[nid] = node
        self.disks[nid] = Disk()
        self.apps[nid] = App()
        return node

    def restart(self, nid: str) -> RawNode:
        """Crash `nid` and start it again from its disk (unsent messages lost)."""
        old = self.nodes[nid]
        disk = self.disks[nid]
        cfg = replace(old._cfg)
        node = RawNode(
            cfg,
            conf=self.conf,
            hard_state=disk.hard_state,
            entries=list(disk.entries),
            snapshot=disk.snapshot,
        )
        self.nodes[nid] = node
        app = App()
        if disk.snapshot is not None:
            app.restore(disk.snapshot)
        self.apps[nid] = app
        return node

    # -- driving ---------------------------------------------------------------

    def process(self, nid: str) -> None:
        node = self.nodes[nid]
        disk = self.disks[nid]
        app = self.apps[nid]
        while node.has_ready():
            rd = node.ready()
            if rd.snapshot is not None:
                disk.snapshot = rd.snapshot
                disk.entries = []
            disk.append(rd.entries)
            if rd.hard_state is not None:
                disk.hard_state = rd.hard_state
            for m in rd.messages:
                self.sent.append(m)
                self.queue.append(m)
            if rd.snapshot is not None:
                app.restore(rd.snapshot)
            for e in rd.committed_entries:
                assert e.index == app.applied_index + 1, (nid, e.index, app.applied_index)
                app.applied_index = e.index
                if e.type is EntryType.NORMAL and e.data:
                    app.commands.append(e.data)
            app.reads.extend(rd.read_states)
            node.advance(rd)

    def process_all(self) -> None:
        for nid in list(self.nodes):
            if nid not in self.down:
                self.process(nid)

    def deliver(self, max_messages: int = 100_000) -> int:
        """Deliver until quiet; returns the number of messages delivered."""
        n = 0
        self.process_all()
        while self.queue and n < max_messages:
            m = self.queue.popleft()
            if self._passes(m):
                n += 1
                self.nodes[m.to].step(m)
                self.process(m.to)
            if not self.queue:
                self.process_all()
        return n

    def _passes(self, m: Message) -> bool:
        if m.to not in self.nodes or m.to in self.down or m.frm in self.down:
            return False
        if (m.frm, m.to) in self.cut:
            return False
        return all(f(m) for f in self.filters)

    def tick(self, nid: str | None = None, times: int = 1) -> None:
        for _ in range(times):
            for x in [nid] if nid else list(self.nodes):
                if x not in self.down:
                    self.nodes[x].tick()

    def run(self, ticks: int) -> None:
        """Tick every live node `ticks` times, delivering everything after each tick."""
        for _ in range(ticks):
            self.tick()
            self.deliver()

    # -- faults ----------------------------------------------------------------

    def isolate(self, nid: str) -> None:
        for other in self.nodes:
            if other != nid:
                self.cut.add((nid, other))
                self.cut.add((other, nid))

    def partition(self, *groups: Iterable[str]) -> None:
        gs = [set(g) for g in groups]
        for a in self.nodes:
            for b in self.nodes:
                if a != b and not any(a in g and b in g for g in gs):
                    self.cut.add((a, b))

    def heal(self) -> None:
        self.cut.clear()
        self.filters.clear()

    # -- queries ---------------------------------------------------------------

    def leaders(self) -> list[str]:
        return [
            n for n, node in self.nodes.items() if node.role is Role.LEADER and n not in self.down
        ]

    def leader(self) -> str:
        ls = self.leaders()
        assert len(ls) == 1, ls
        return ls[0]

    def elect(self, nid: str) -> None:
        self.nodes[nid].campaign()
        self.deliver()
        assert self.nodes[nid].role is Role.LEADER, self.nodes[nid].status

    def propose(self, nid: str, data: bytes) -> None:
        self.nodes[nid].propose(data)
        self.deliver()
