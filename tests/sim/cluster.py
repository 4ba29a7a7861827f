"""One deterministic simulation run: N Raft cores, a hostile network, crashes,
membership changes, leadership transfers, snapshots and clients, from one seed.

`Simulation(seed, size).run()` drives `size` voters (plus one spare node that
membership changes may add) for a fault phase of logical ticks, then heals
everything and requires liveness: a leader emerges, a fresh write commits and
every member applies every acknowledged entry within a bounded number of
ticks. Every decision (which message comes next, which fault, which client
request) comes from one `random.Random(seed)`, so a seed replays exactly.

The driver obeys the `Ready` contract: persist (into `DurableLog`), then send,
then apply, then `advance`. A crash throws away the RawNode, its state machine
and its pending reads; a restart rebuilds the node from its `DurableLog` only.
After every step the `SafetyChecker` and `ReadWriteHistory` check the
invariants and raise `InvariantViolation`; `run_seed` turns that, or any
exception out of the core, into a `SeedResult` with the tail of the trace.
Imports the Raft core, its types and the other simulation modules; no I/O.
"""

from __future__ import annotations

import hashlib
import random
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gcks.cluster.raft.codec import decode_conf_change
from gcks.cluster.raft.errors import RaftError
from gcks.cluster.raft.raft import RaftConfig, RawNode
from gcks.cluster.raft.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    EntryType,
    Message,
    MessageType,
    NodeId,
    ReadState,
    Ready,
    Role,
    Snapshot,
)

from .checker import InvariantViolation, SafetyChecker
from .linearizability import ReadWriteHistory
from .network import LinkFaults, SimNetwork
from .statemachine import AppliedState, write_data, write_id
from .storage import DurableLog

NODE_IDS: tuple[NodeId, ...] = ("n1", "n2", "n3", "n4", "n5", "n6", "n7")
ELECTION_TICK = 10


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Shape of one run. The defaults are what the default test run uses."""

    fault_ticks: int = 300  # ticks of chaos
    liveness_ticks: int = 300  # bound on recovery once faults stop
    crash_mid_ready: float = 0.003  # chance to crash between persisting and sending
    trace_lines: int = 40  # events kept for the report of a violation
    # Checks of the core's local rules (persist before send, the commit rule). Off,
    # only the end-to-end invariants remain: how the bug tests show those suffice.
    local_checks: bool = True


@dataclass(frozen=True, slots=True)
class Intensity:
    """Per-tick probabilities of the chaos phase, drawn per seed so that some runs
    are calm and long-lived, others churn leaders every few ticks."""

    crash: float
    crash_leader: float  # share of crashes aimed at the current leader
    max_down: int  # ticks a crashed node stays down
    partition: float
    max_partition: int  # ticks a partition lasts
    write: float
    read: float
    membership: float
    transfer: float
    compact: float
    doom_new_leader: float  # chance a new leader is crashed within a few ticks
    doom_voter: float  # chance a node that granted a vote is crashed right after
    doom_commit: float  # chance a leader crashes right after advancing its commit
    doom_handover: float  # same, for a new leader's first commit

    @classmethod
    def draw(cls, rng: random.Random) -> Intensity:
        return cls(
            crash=rng.choice((0.0, 0.01, 0.03, 0.08)),
            crash_leader=rng.choice((0.3, 0.6, 0.9)),
            max_down=rng.choice((3, 10, 30)),
            partition=rng.choice((0.0, 0.02, 0.05, 0.1)),
            max_partition=rng.choice((10, 20, 40)),
            write=rng.choice((0.3, 0.6, 1.0)),
            read=rng.choice((0.1, 0.3, 0.6)),
            membership=rng.choice((0.0, 0.02, 0.05)),
            transfer=rng.choice((0.0, 0.01, 0.03)),
            compact=rng.choice((0.01, 0.04, 0.1)),
            doom_new_leader=rng.choice((0.0, 0.1, 0.3, 0.6)),
            doom_voter=rng.choice((0.0, 0.1, 0.3)),
            doom_commit=rng.choice((0.0, 0.02, 0.1)),
            doom_handover=rng.choice((0.0, 0.3, 0.7)),
        )


@dataclass(frozen=True, slots=True)
class SeedResult:
    seed: int
    size: int
    invariant: str | None  # None: the run passed
    detail: str
    trace: tuple[str, ...]
    ticks: int
    steps: int
    committed: int
    digest: str  # of the committed write order: equal for equal runs
    stats: dict[str, int]  # what the run exercised (elections, snapshots, ...)
    options: SimOptions

    @property
    def ok(self) -> bool:
        return self.invariant is None

    def replay_command(self) -> str:
        cmd = f"python -m tests.sim --seeds 1 --size {self.size} --first-seed {self.seed}"
        if self.options.fault_ticks != SimOptions().fault_ticks:
            cmd += f" --fault-ticks {self.options.fault_ticks}"
        if not self.options.local_checks:
            cmd += " --no-local-checks"
        if self.options.trace_lines != SimOptions().trace_lines:
            cmd += f" --trace {self.options.trace_lines}"
        return cmd

    def report(self) -> str:
        lines = [
            f"VIOLATION seed={self.seed} size={self.size}: {self.invariant}",
            f"  {self.detail}",
            f"  last {len(self.trace)} events:",
            *(f"    {line}" for line in self.trace),
            f"  replay: {self.replay_command()}",
        ]
        return "\n".join(lines)


@dataclass(slots=True)
class SimNode:
    id: NodeId
    log: DurableLog
    config: RaftConfig
    bootstrap: ConfState  # the configuration the node was first started with
    raw: RawNode | None = None
    state: AppliedState | None = None
    reads: list[ReadState] = field(default_factory=list)
    leading: bool = False  # as of the last soft state handed out
    first_commit_of: int = 0  # last term in which this node committed as leader
    started: bool = False


def _show_message(m: Message) -> str:
    parts = [f"{m.frm}->{m.to} {m.type.name} t{m.term}"]
    if m.index or m.log_term:
        parts.append(f"i{m.index}/lt{m.log_term}")
    if m.entries:
        parts.append(f"ents[{m.entries[0].index}..{m.entries[-1].index}]")
    if m.commit:
        parts.append(f"c{m.commit}")
    if m.reject:
        parts.append(f"reject(hint {m.reject_hint})")
    if m.snapshot is not None:
        parts.append(f"snap@{m.snapshot.index}/t{m.snapshot.term}")
    if m.type in (MessageType.SNAP, MessageType.SNAP_RESP):
        parts.append(f"off{m.offset}+{len(m.data)}{' done' if m.done else ''}")
    return " ".join(parts)


class Simulation:
    """One seeded run over `size` initial voters."""

    def __init__(self, seed: int, size: int, options: SimOptions | None = None) -> None:
        if not 1 <= size < len(NODE_IDS):
            raise ValueError(f"cluster size must be 1..{len(NODE_IDS) - 1}")
        self.seed = seed
        self.size = size
        self.options = options or SimOptions()
        self.rng = random.Random(seed)
        self.net = SimNetwork(self.rng)
        self.checker = SafetyChecker(commit_rule=self.options.local_checks)
        self.history = ReadWriteHistory()
        self.tick = 0
        self.step = 0
        self._trace: deque[tuple[int, int, object]] = deque(maxlen=self.options.trace_lines)
        self.stats: Counter[str] = Counter()  # what the run exercised
        ids = NODE_IDS[: size + 1]
        members = ConfState(voters=frozenset(ids[:size]))
        self.conf = members  # configuration as of the latest committed change
        self._conf_history: list[tuple[int, ConfState]] = [(0, members)]
        # No new membership change is proposed before this tick while one may be in flight.
        self._conf_pending_until = 0
        self._next_write = 0
        self._next_read = 0
        self._heal_at = -1
        self._restart_at: dict[NodeId, int] = {}
        self._chaos_on = False
        self._doomed: dict[NodeId, tuple[int, int]] = {}  # leader -> (its term, crash tick)
        rng = self.rng
        self._cfg = {
            "max_size_per_msg": rng.choice((1, 64, 256, 1 << 20)),
            "max_inflight_msgs": rng.choice((1, 4, 256)),
            "max_inflight_bytes": rng.choice((64, 4096, 1 << 24)),
            "snapshot_chunk_size": rng.choice((8, 64, 1 << 20)),
            "heartbeat_tick": rng.choice((1, 2, 3)),
        }
        self.intensity = Intensity.draw(rng)
        self.nodes: dict[NodeId, SimNode] = {}
        for nid in ids:
            bootstrap = members if nid in members.voters else ConfState()
            self.nodes[nid] = SimNode(nid, DurableLog(nid), self._config(nid), bootstrap)
        for nid in ids[:size]:
            self._start(self.nodes[nid])

    # -- plumbing -----------------------------------------------------------------

    def _config(self, nid: NodeId) -> RaftConfig:
        c = self._cfg
        return RaftConfig(
            id=nid,
            election_tick=ELECTION_TICK,
            heartbeat_tick=c["heartbeat_tick"],
            max_size_per_msg=c["max_size_per_msg"],
            max_inflight_msgs=c["max_inflight_msgs"],
            max_inflight_bytes=c["max_inflight_bytes"],
            snapshot_chunk_size=c["snapshot_chunk_size"],
            pre_vote=True,
            check_quorum=True,
            seed=self.seed * 31 + int(nid[1:]),
        )

    def _note(self, what: object) -> None:
        self._trace.append((self.step, self.tick, what))

    def trace_lines(self) -> tuple[str, ...]:
        out = []
        for step, tick, what in self._trace:
            text = _show_message(what) if isinstance(what, Message) else str(what)
            out.append(f"step {step} tick {tick}: {text}")
        return tuple(out)

    def _live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.raw is not None]

    def _start(self, node: SimNode) -> None:
        log = node.log
        snap = log.snapshot
        conf = snap.meta.conf if snap is not None else node.bootstrap
        node.raw = RawNode(
            node.config,
            conf=conf,
            hard_state=log.hard_state,
            entries=log.entries,
            snapshot=snap,
        )
        node.state = AppliedState.from_snapshot(snap)
        node.reads = []
        node.leading = False
        node.started = True
        self._note(f"start {node.id} (term {log.hard_state.term}, last {log.last_index})")
        self._process(node)

    def _crash(self, node: SimNode, why: str, down: int | None = None) -> None:
        """Lose everything not in the node's DurableLog; it restarts a few ticks later."""
        if down is None:
            down = self.rng.randint(0, self.intensity.max_down)
        self._restart_at[node.id] = self.tick + down
        node.raw = None
        node.state = None
        for rs in node.reads:
            self.history.read_abandoned(rs.context)
        node.reads = []
        self._note(f"crash {node.id} ({why})")
        self.stats["crashes"] += 1
        # A crashed process resets its connections: peers' transports notice
        # (most of the time, as a real one would) and hint the core.
        for other in self._live():
            if other is not node and self.rng.random() < 0.8:
                assert other.raw is not None
                other.raw.report_leader_lost(node.id)

    def _leader(self) -> SimNode | None:
        """The live leader with the highest term, if any."""
        best: SimNode | None = None
        best_term = -1
        for node in self._live():
            assert node.raw is not None
            st = node.raw.status
            if st.role is Role.LEADER and st.term > best_term:
                best, best_term = node, st.term
        return best

    # -- the Ready contract -------------------------------------------------------

    def _process(self, node: SimNode) -> None:
        raw = node.raw
        while raw is not None and raw.has_ready():
            self.step += 1
            rd = raw.ready()
            old_commit = node.log.hard_state.commit
            self._persist(node, rd)
            if self._chaos_on and self._crash_point(node, rd, old_commit):
                self._crash(node, "after persisting, before sending")
                return
            self._send(node, rd)
            self._apply(node, rd)
            raw.advance(rd)
            self._serve_reads(node)

    def _crash_point(self, node: SimNode, rd: Ready, old_commit: int) -> bool:
        """Crash between persisting and sending? Now and then at random, and more
        often right after a leader advanced its commit index: the moment a wrongly
        counted commit can be acted on (applied) before the followers learn of it."""
        rng = self.rng
        if rng.random() < self.options.crash_mid_ready:
            return True
        soft = rd.soft_state
        # A doomed new leader sometimes dies before anyone hears of its election:
        # its no-op then exists on its disk only, a conflicting suffix for later.
        if (
            soft is not None
            and soft.role is Role.LEADER
            and node.id in self._doomed
            and rng.random() < 0.5
        ):
            del self._doomed[node.id]
            return True
        hs = rd.hard_state
        if not node.leading or hs is None or hs.commit <= old_commit:
            return False
        if node.first_commit_of != hs.term:
            # The hand-over: a new leader's first commit covers its predecessors'
            # entries, and its followers have not heard of it yet.
            node.first_commit_of = hs.term
            return rng.random() < self.intensity.doom_handover
        return rng.random() < self.intensity.doom_commit

    def _persist(self, node: SimNode, rd: Ready) -> None:
        log = node.log
        if rd.snapshot is not None:
            log.install_snapshot(rd.snapshot)
        replaced = log.append(rd.entries)
        if rd.hard_state is not None:
            log.set_hard_state(rd.hard_state)
        soft = rd.soft_state
        if soft is not None:
            node.leading = soft.role is Role.LEADER
        self.checker.on_persist(
            node.id, log, rd.entries, rd.hard_state, replaced, leading=node.leading
        )
        if soft is not None:
            self._note(f"{node.id} is {soft.role} (leader {soft.leader})")
            # The term is durable by now: a candidate persists it before asking for votes.
            if soft.role is Role.LEADER:
                term = log.hard_state.term
                self._note(f"{node.id} leads term {term}")
                self.stats["leaders elected"] += 1
                self.checker.on_leader(node.id, term, log)
                if self._chaos_on and self.rng.random() < self.intensity.doom_new_leader:
                    # The hand-over window (old-term entries not yet covered by a
                    # commit of the new term) is where Raft's subtle bugs live.
                    self._doomed[node.id] = (term, self.tick + self.rng.randint(0, 3))

    def _send(self, node: SimNode, rd: Ready) -> None:
        check = self.options.local_checks
        # Stable sort by destination: the run then does not depend on the order in
        # which the core walks its peer set (string hashing differs per process).
        for m in sorted(rd.messages, key=lambda m: m.to):
            if check:
                self.checker.on_send(node.id, node.log, m)
            self.net.send(m, self.tick)
            if (
                m.type is MessageType.VOTE_RESP
                and not m.reject
                and self._chaos_on
                and self.rng.random() < self.intensity.doom_voter
            ):
                # A voter that forgets its vote across a restart can elect two leaders.
                self._doomed[node.id] = (m.term, self.tick + self.rng.randint(0, 1))

    def _apply(self, node: SimNode, rd: Ready) -> None:
        state = node.state
        assert state is not None
        history = self.history
        if rd.snapshot is not None:
            snap = rd.snapshot
            state = node.state = AppliedState.from_snapshot(snap)
            self._check_snapshot(node.id, snap)
            self._note(f"{node.id} installs snapshot @{snap.meta.index}")
            self.stats["snapshots installed"] += 1
        for e in rd.committed_entries:
            if e.index != state.index + 1:
                raise InvariantViolation(
                    "apply-order", f"{node.id} applies {e.index} after {state.index}"
                )
            self.checker.on_apply(node.id, e, node.log)
            state.apply(e)
            if e.index > history.applied_index:
                history.index_committed(e.index, write_id(e), self.step)
                if e.type is EntryType.CONF_CHANGE:
                    self._conf_committed(e.index, decode_conf_change(e.data))
        if rd.read_states:
            node.reads.extend(rs for rs in rd.read_states if history.is_pending(rs.context))

    def _check_snapshot(self, nid: NodeId, snap: Snapshot) -> None:
        """A snapshot must hold exactly the committed state at its index."""
        history = self.history
        index = snap.meta.index
        if index > history.applied_index:
            raise InvariantViolation(
                "snapshot-content",
                f"{nid} got a snapshot at {index}; nothing was applied beyond "
                f"{history.applied_index}",
            )
        writes = AppliedState.from_snapshot(snap).writes
        if writes != history.reference[: history.count_at[index]]:
            raise InvariantViolation(
                "snapshot-content",
                f"{nid}: snapshot at {index} does not hold the committed writes up to {index}",
            )
        conf = next(c for at, c in reversed(self._conf_history) if at <= index)
        if snap.meta.conf != conf:
            raise InvariantViolation(
                "snapshot-conf",
                f"{nid}: snapshot at {index} has voters={sorted(snap.meta.conf.voters)} "
                f"learners={sorted(snap.meta.conf.learners)}, committed configuration "
                f"there is voters={sorted(conf.voters)} learners={sorted(conf.learners)}",
            )

    def _serve_reads(self, node: SimNode) -> None:
        if not node.reads:
            return
        state = node.state
        assert state is not None
        keep = []
        for rs in node.reads:
            if rs.index <= state.index and self.history.is_pending(rs.context):
                self._note(f"{node.id} serves read {rs.context.decode()} @{rs.index}")
                self.history.read_served(rs.context, len(state.writes), self.step, node.id)
                self.stats["reads served"] += 1
            elif self.history.is_pending(rs.context):
                keep.append(rs)
        node.reads = keep

    def _conf_committed(self, index: int, cc: ConfChange) -> None:
        voters = set(self.conf.voters)
        learners = set(self.conf.learners)
        if cc.type is ConfChangeType.ADD_VOTER:
            voters.add(cc.node_id)
            learners.discard(cc.node_id)
        elif cc.type is ConfChangeType.ADD_LEARNER:
            learners.add(cc.node_id)
            voters.discard(cc.node_id)
        else:
            voters.discard(cc.node_id)
            learners.discard(cc.node_id)
        conf = ConfState(frozenset(voters), frozenset(learners))
        self._conf_history.append((index, conf))
        self._conf_pending_until = 0
        if conf != self.conf:  # not a bootstrap entry restating the initial members
            self.conf = conf
            self._note(f"conf now voters={sorted(voters)} learners={sorted(learners)}")
            self.stats[f"{cc.type.name.lower()} committed"] += 1

    # -- network ------------------------------------------------------------------

    def _deliver_due(self) -> None:
        net = self.net
        nodes = self.nodes
        while (m := net.pop_due(self.tick)) is not None:
            node = nodes.get(m.to)
            if node is None or node.raw is None:
                continue
            self.step += 1
            self._note(m)
            if m.type is MessageType.TIMEOUT_NOW:
                self.stats["leadership hand-offs"] += 1
            node.raw.step(m)
            self._process(node)

    def _tick_all(self) -> None:
        live = self._live()
        self.rng.shuffle(live)
        for node in live:
            if node.raw is not None:
                node.raw.tick()
                self._process(node)

    # -- clients and operators ----------------------------------------------------

    def _client_write(self, node: SimNode) -> None:
        raw = node.raw
        assert raw is not None
        self._next_write += 1
        wid = self._next_write
        self.step += 1
        self.history.write_invoked(wid, self.step)
        try:
            raw.propose(write_data(wid))
        except RaftError as e:
            self.history.write_refused(wid)
            self._note(f"write w{wid} at {node.id} refused: {type(e).__name__}")
        else:
            self._note(f"write w{wid} at {node.id}")
        self._process(node)

    def _client_read(self, node: SimNode) -> None:
        raw = node.raw
        assert raw is not None
        self._next_read += 1
        ctx = b"r%d" % self._next_read
        self.step += 1
        self.history.read_invoked(ctx, self.step)
        try:
            raw.read_index(ctx)
        except RaftError as e:
            self.history.read_abandoned(ctx)
            self._note(f"read {ctx.decode()} at {node.id} refused: {type(e).__name__}")
            return
        self._note(f"read {ctx.decode()} at {node.id}")
        self._process(node)

    def _membership_change(self) -> None:
        leader = self._leader()
        if leader is None or self.tick < self._conf_pending_until:
            return
        rng = self.rng
        voters = sorted(self.conf.voters)
        learners = sorted(self.conf.learners)
        others = sorted(set(self.nodes) - self.conf.voters - self.conf.learners)
        choices: list[Callable[[], ConfChange]] = []
        if len(voters) > max(2, self.size - 1):
            choices.append(lambda: ConfChange(ConfChangeType.REMOVE_NODE, rng.choice(voters)))
        if learners:
            choices.append(lambda: ConfChange(ConfChangeType.ADD_VOTER, rng.choice(learners)))
            choices.append(lambda: ConfChange(ConfChangeType.REMOVE_NODE, rng.choice(learners)))
        if others:
            choices.append(lambda: ConfChange(ConfChangeType.ADD_LEARNER, rng.choice(others)))
            if len(voters) <= self.size:
                choices.append(lambda: ConfChange(ConfChangeType.ADD_VOTER, rng.choice(others)))
        if not choices:
            return
        cc = rng.choice(choices)()
        target = self.nodes[cc.node_id]
        if not target.started:
            self._start(target)
        raw = leader.raw
        assert raw is not None
        self.step += 1
        try:
            raw.propose_conf_change(cc)
        except RaftError as e:
            self._note(f"conf change {cc.type.name} {cc.node_id} refused: {type(e).__name__}")
            return
        self._conf_pending_until = self.tick + 6 * ELECTION_TICK
        self._note(f"propose {cc.type.name} {cc.node_id} at {leader.id}")
        self._process(leader)

    def _transfer(self) -> None:
        leader = self._leader()
        if leader is None:
            return
        targets = sorted(self.conf.voters - {leader.id})
        if not targets:
            return
        to = self.rng.choice(targets)
        raw = leader.raw
        assert raw is not None
        self.step += 1
        try:
            raw.transfer_leadership(to)
        except RaftError as e:
            self._note(f"transfer {leader.id}->{to} refused: {type(e).__name__}")
            return
        self._note(f"transfer {leader.id}->{to}")
        self._process(leader)

    def _compact(self, node: SimNode) -> None:
        raw = node.raw
        state = node.state
        assert raw is not None
        assert state is not None
        if state.index <= node.log.snapshot_index:
            return
        self.step += 1
        snap = raw.compact(state.index, state.encode())
        node.log.compact(snap)
        self._note(f"{node.id} compacts to {state.index}")
        self.stats["compactions"] += 1
        self._process(node)

    # -- faults -------------------------------------------------------------------

    def _random_faults(self) -> LinkFaults:
        rng = self.rng
        return LinkFaults(
            drop=rng.choice((0.0, 0.02, 0.1, 0.3)),
            duplicate=rng.choice((0.0, 0.02, 0.1)),
            max_delay=rng.choice((0, 1, 2, 4)),
            long_delay=rng.choice((0.0, 0.01, 0.05)),
            long_delay_ticks=rng.choice((5, 15, 30)),
        )

    def _chaos(self) -> None:
        rng = self.rng
        net = self.net
        ids = sorted(self.nodes)
        if rng.random() < 0.03:
            net.faults = self._random_faults()
            self._note(f"network {net.faults}")
        if net.partitioned and self.tick >= self._heal_at:
            net.heal()
            self._note("heal partitions")
        elif not net.partitioned and rng.random() < self.intensity.partition:
            self._heal_at = self.tick + rng.randint(3, self.intensity.max_partition)
            kind = rng.random()
            if kind < 0.35:
                shuffled = ids[:]
                rng.shuffle(shuffled)
                cut = rng.randint(1, len(shuffled) - 1)
                net.partition([shuffled[:cut], shuffled[cut:]])
                self.stats["partitions"] += 1
                self._note(f"partition {sorted(shuffled[:cut])} | {sorted(shuffled[cut:])}")
            elif kind < 0.7:
                leader = self._leader()
                lonely = leader.id if leader is not None else rng.choice(ids)
                net.isolate(lonely, ids)
                self.stats["isolations"] += 1
                self._note(f"isolate {lonely}")
            else:
                frm = rng.sample(ids, rng.randint(1, 2))
                to = [i for i in ids if i not in frm]
                net.block_one_way(frm, to)
                self.stats["one-way partitions"] += 1
                self._note(f"one-way block {sorted(frm)} -> {to}")
        for nid, (term, when) in sorted(self._doomed.items()):
            if when <= self.tick:
                del self._doomed[nid]
                node = self.nodes[nid]
                if node.raw is not None and node.raw.status.term == term:
                    self._crash(node, f"doomed in term {term}", down=rng.randint(0, 2))
        for nid, when in sorted(self._restart_at.items()):
            if when <= self.tick:
                del self._restart_at[nid]
                self._start(self.nodes[nid])
        if rng.random() < self.intensity.crash:
            live = self._live()
            if live:
                leader = self._leader()
                aim = rng.random() < self.intensity.crash_leader
                victim = leader if leader is not None and aim else rng.choice(live)
                self._crash(victim, "crash")

    def _operate(self) -> None:
        rng = self.rng
        live = self._live()
        if not live:
            return
        intensity = self.intensity
        if rng.random() < intensity.write:
            self._client_write(rng.choice(live))
        if rng.random() < intensity.read:
            node = rng.choice(live)
            if node.raw is not None:
                self._client_read(node)
        if rng.random() < intensity.membership:
            self._membership_change()
        if rng.random() < intensity.transfer:
            self._transfer()
        if rng.random() < intensity.compact:
            node = rng.choice(live)
            if node.raw is not None:
                self._compact(node)

    # -- phases -------------------------------------------------------------------

    def _round(self, chaos: bool) -> None:
        self.tick += 1
        if chaos:
            self._chaos()
            self._operate()
        self._deliver_due()
        self._tick_all()
        self._deliver_due()

    def run(self) -> None:
        self.net.faults = self._random_faults()
        self._chaos_on = True
        for _ in range(self.options.fault_ticks):
            self._round(chaos=True)
        self._recover()
        self.history.final_check()

    def _recover(self) -> None:
        """Faults stop: heal, restart everything, then demand progress in bounded time."""
        self._chaos_on = False
        self.net.heal()
        self.net.faults = LinkFaults()
        self._note("faults stop: heal all, restart all")
        self._restart_at.clear()
        for nid in sorted(self.nodes):
            node = self.nodes[nid]
            if node.started and node.raw is None:
                self._start(node)
        # A client writes at the leader it sees and, like a real client, writes again
        # if nothing committed after a while (the leader it saw may have been stale).
        probes: list[int] = []
        last_probe = -(10**9)
        deadline = self.tick + self.options.liveness_ticks
        while self.tick < deadline:
            self._round(chaos=False)
            if any(self.history.is_committed(w) for w in probes):
                if self._all_members_caught_up():
                    return
                continue
            leader = self._leader()
            if leader is not None and self.tick - last_probe >= 2 * ELECTION_TICK:
                last_probe = self.tick
                probes.append(self._next_write + 1)
                self._client_write(leader)
        raise InvariantViolation("liveness", self._liveness_report(probes))

    def _all_members_caught_up(self) -> bool:
        target = self.history.applied_index
        for nid in self.conf.voters | self.conf.learners:
            node = self.nodes[nid]
            if node.state is None or node.state.index < target:
                return False
        return True

    def _liveness_report(self, probes: list[int]) -> str:
        parts = [f"no recovery within {self.options.liveness_ticks} ticks after faults stopped"]
        parts.append(f"probe writes {', '.join(f'w{w}' for w in probes) or 'none (no leader)'}")
        parts.append(f"committed up to {self.history.applied_index}")
        for nid in sorted(self.nodes):
            node = self.nodes[nid]
            if node.raw is None:
                parts.append(f"{nid}: {'down' if node.started else 'never started'}")
                continue
            st = node.raw.status
            applied = node.state.index if node.state is not None else -1
            parts.append(f"{nid}: {st.role} t{st.term} leader={st.leader} applied={applied}")
        parts.append(
            f"conf voters={sorted(self.conf.voters)} learners={sorted(self.conf.learners)}"
        )
        return "; ".join(parts)


def run_seed(seed: int, size: int, options: SimOptions | None = None) -> SeedResult:
    """Run one seed; never raises (a core exception is reported as a violation)."""
    sim = Simulation(seed, size, options)
    invariant: str | None = None
    detail = ""
    try:
        sim.run()
    except InvariantViolation as e:
        invariant, detail = e.invariant, e.detail
    except Exception as e:  # any exception out of the core is a finding
        invariant = "core-exception"
        detail = "".join(traceback.format_exception_only(e)).strip()
        detail += " | " + " <- ".join(
            f"{f.name}:{f.lineno}" for f in reversed(traceback.extract_tb(e.__traceback__)[-4:])
        )
    return SeedResult(
        seed=seed,
        size=size,
        invariant=invariant,
        detail=detail,
        trace=sim.trace_lines() if invariant is not None else (),
        ticks=sim.tick,
        steps=sim.step,
        committed=sim.history.applied_index,
        stats=dict(sim.stats),
        options=sim.options,
        digest=hashlib.blake2b(
            repr((sim.step, sim.history.reference)).encode(), digest_size=8
        ).hexdigest(),
    )
