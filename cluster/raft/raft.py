"""The sans-IO Raft state machine: `RawNode` and its per-role step functions.

Modelled on etcd-io/raft: time arrives as `tick()`, peers' messages as
`step()`, and all output leaves through `ready()` (messages to send, entries
and hard state to persist, a snapshot to install, committed entries to apply)
acknowledged by `advance()`. Leader election uses PreVote and CheckQuorum;
replication batches entries (`max_size_per_msg`), pipelines them within
in-flight bounds and backs off conflicts a term at a time; snapshots travel
in chunks; membership changes go one server at a time; leadership transfer
uses TimeoutNow; ReadIndex serves linearizable reads.

Deterministic: the only randomness is a `random.Random` seeded from the
config, and every iteration over peers is in sorted order. May import only
the standard library and this package; must never do I/O, read a clock or log
entry data. A peer's message never makes it raise, except `LogInvariantError`
when the message proves that safety already broke elsewhere (a leader
overwriting our committed entries, e.g. after a disk lost fsynced data): the
driver must then stop the node rather than go on.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .codec import decode_conf_change, encode_conf_change
from .errors import NotLeader, ProposalDropped, RaftCodecError, RaftUsageError, TransferRefused
from .log import ENTRY_OVERHEAD, RaftLog
from .progress import Inflights, Progress, ProgressState
from .quorum import VoteResult, committed_index, has_quorum, vote_result
from .readonly import ReadOnly, ReadRequest, decode_seq, encode_seq
from .types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    NodeId,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)

__all__ = ["CAMPAIGN_TRANSFER", "PeerStatus", "RaftConfig", "RawNode", "Status"]

# Vote requests of a campaign started by TimeoutNow carry this context: voters
# then skip the leader-lease check, since the old leader asked for it.
CAMPAIGN_TRANSFER = b"transfer"

_MT = MessageType
_TERMLESS = frozenset({_MT.PROP, _MT.READ_INDEX, _MT.TRANSFER_LEADER})


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Tunables of one node. Ticks are the driver's unit of time."""

    id: NodeId
    election_tick: int = 10  # randomized in [election_tick, 2*election_tick)
    heartbeat_tick: int = 1
    max_size_per_msg: int = 1 << 20  # bytes of entries per append
    max_inflight_msgs: int = 256  # pipelined appends per peer
    max_inflight_bytes: int = 8 << 20
    snapshot_chunk_size: int = 1 << 20
    pre_vote: bool = True
    check_quorum: bool = True
    seed: int = 0  # seeds the election-timeout RNG

    def __post_init__(self) -> None:
        if not self.id:
            raise RaftUsageError("RaftConfig.id must be a non-empty node id")
        if self.heartbeat_tick < 1 or self.election_tick <= self.heartbeat_tick:
            raise RaftUsageError("RaftConfig needs 1 <= heartbeat_tick < election_tick")
        if min(self.max_size_per_msg, self.max_inflight_msgs, self.max_inflight_bytes) < 1:
            raise RaftUsageError("RaftConfig size and in-flight limits must be positive")
        if self.snapshot_chunk_size < 1:
            raise RaftUsageError("RaftConfig.snapshot_chunk_size must be positive")


@dataclass(frozen=True, slots=True)
class PeerStatus:
    match: int
    next: int
    state: ProgressState
    recent_active: bool


@dataclass(frozen=True, slots=True)
class Status:
    id: NodeId
    role: Role
    term: int
    leader: NodeId | None
    commit: int
    applied: int
    conf: ConfState
    progress: Mapping[NodeId, PeerStatus]  # leader only; empty elsewhere
    lead_transferee: NodeId | None


def _bootstrap_entries(conf: ConfState) -> list[Entry]:
    """The log every member of a new cluster starts with: its configuration, committed.

    Nodes added later replay these entries, so they learn the configuration
    from the log instead of being told it out of band."""
    changes = [ConfChange(ConfChangeType.ADD_VOTER, v) for v in sorted(conf.voters)]
    changes += [ConfChange(ConfChangeType.ADD_LEARNER, v) for v in sorted(conf.learners)]
    return [
        Entry(term=1, index=i, type=EntryType.CONF_CHANGE, data=encode_conf_change(cc))
        for i, cc in enumerate(changes, start=1)
    ]


class RawNode:
    """One Raft member. Drive it from a single task: `tick`/`step`/`propose`..., then
    `while has_ready(): rd = ready(); persist; send; apply; advance(rd)`."""

    def __init__(
        self,
        config: RaftConfig,
        *,
        conf: ConfState,
        hard_state: HardState = HardState(),  # noqa: B008 - frozen, shared safely
        entries: Sequence[Entry] = (),
        snapshot: Snapshot | None = None,
    ) -> None:
        self._cfg = config
        self.id = config.id
        self._rng = random.Random(config.seed)  # noqa: S311 - timing jitter, not security
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._readonly = ReadOnly()
        self._pending_reads: list[tuple[NodeId, bytes]] = []  # wait for a commit of our term
        self._read_heartbeat = False
        self._prs: dict[NodeId, Progress] = {}
        self._votes: dict[NodeId, bool] = {}
        # A snapshot being received: who sends it (leader, term, meta) and the bytes so far.
        # Two leaders may serialize the same snapshot differently: never mix their chunks.
        self._snap_recv: tuple[tuple[NodeId, int, SnapshotMeta], bytearray] | None = None
        self._awaiting: Ready | None = None

        self._prev_hard = hard_state
        if (
            snapshot is None
            and not entries
            and hard_state == HardState()
            and (conf.voters or conf.learners)
        ):
            boot = _bootstrap_entries(conf)
            self.log = RaftLog(None, (), 0)
            self.log.append(boot)
            self.log.committed = len(boot)
            hard_state = HardState(term=1, vote=None, commit=len(boot))
        else:
            self.log = RaftLog(snapshot, entries, hard_state.commit)
        self.term = hard_state.term
        self.vote: NodeId | None = hard_state.vote
        self.lead: NodeId | None = None

        # Configuration: the snapshot's, then every committed conf change after it.
        # `_conf_base` is the configuration at the log's snapshot, `_conf_history`
        # each later one by the index of its entry (for the snapshots `compact` makes),
        # and every conf change at or below `_conf_applied` is in effect.
        base = snapshot.meta.conf if snapshot is not None else ConfState()
        self._conf_base = base
        self._conf_history: list[tuple[int, ConfState]] = []
        self._voters: set[NodeId] = set(base.voters)
        self._learners: set[NodeId] = set(base.learners)
        self._state = Role.FOLLOWER
        for e in self.log.slice(self.log.first_index(), self.log.committed + 1):
            if e.type is EntryType.CONF_CHANGE:
                self._apply_conf_change(e)
        self._conf_applied = self.log.committed

        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = config.election_tick
        self._lead_transferee: NodeId | None = None
        self._pending_conf_index = 0
        self._become_follower(self.term, None)
        self._prev_soft = self._soft_state()

    # ------------------------------------------------------------------ API

    @property
    def role(self) -> Role:
        if self._state is Role.FOLLOWER and self.id in self._learners:
            return Role.LEARNER
        return self._state

    @property
    def conf(self) -> ConfState:
        return ConfState(frozenset(self._voters), frozenset(self._learners))

    @property
    def status(self) -> Status:
        progress = {
            pid: PeerStatus(pr.match, pr.next, pr.state, pr.recent_active)
            for pid, pr in self._prs.items()
        }
        return Status(
            id=self.id,
            role=self.role,
            term=self.term,
            leader=self.lead,
            commit=self.log.committed,
            applied=self.log.applied,
            conf=self.conf,
            progress=progress,
            lead_transferee=self._lead_transferee,
        )

    def tick(self) -> None:
        """One unit of logical time passed."""
        if self._state is Role.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def campaign(self) -> None:
        """Start an election now (with a pre-vote round when configured)."""
        self._hup(transfer=False)

    def step(self, m: Message) -> None:
        """Feed one message from a peer."""
        if m.to != self.id or m.frm == self.id:
            return
        # Messages from removed nodes are not filtered (ids may be re-added, and a
        # stale filter would deafen a node to its new leader): PreVote and the
        # CheckQuorum lease already keep a removed node from disrupting anyone.
        if m.type in (_MT.PRE_VOTE_RESP, _MT.VOTE_RESP) and m.reject:
            self._learn_commit(m.index, m.log_term)  # a fact whatever the term
        if m.type in _TERMLESS:
            pass  # a forwarded local request: no term to compare
        elif m.term > self.term:
            if m.type in (_MT.PRE_VOTE, _MT.VOTE):
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = (
                    self._cfg.check_quorum
                    and self.lead is not None
                    and self._election_elapsed < self._cfg.election_tick
                )
                if in_lease and not force:
                    # Leader lease: we heard from a live leader within the minimum
                    # election timeout, so this campaign can only be disruptive.
                    return
            if m.type is _MT.PRE_VOTE or (m.type is _MT.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes never change terms; a won pre-vote leads to a real campaign
            elif m.type in (_MT.APP, _MT.HEARTBEAT, _MT.SNAP):
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            if (self._cfg.check_quorum or self._cfg.pre_vote) and m.type in (
                _MT.APP,
                _MT.HEARTBEAT,
            ):
                # A stale leader (e.g. just back from a partition): tell it our term so
                # it steps down, instead of letting it stall the cluster.
                self._send(Message(_MT.APP_RESP, m.frm, self.id, self.term))
            elif m.type is _MT.PRE_VOTE:
                self._reject_vote(m)
            return

        if m.type in (_MT.PRE_VOTE, _MT.VOTE):
            self._handle_vote_request(m)
        elif self._state is Role.LEADER:
            self._step_leader(m)
        elif self._state is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def propose(self, data: bytes) -> None:
        """Propose an application command; raises `NotLeader` if it cannot be taken here."""
        self._propose(EntryType.NORMAL, data)

    def propose_conf_change(self, cc: ConfChange) -> None:
        """Propose one membership change; `ProposalDropped` if invalid or one is pending."""
        reason = self._conf_change_refusal(cc)
        if reason is not None:
            raise ProposalDropped(reason)
        if self._state is Role.LEADER and self._pending_conf_index > self.log.applying:
            raise ProposalDropped("a membership change is already pending; retry once applied")
        self._propose(EntryType.CONF_CHANGE, encode_conf_change(cc))

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read; a `ReadState` with `context` comes out of `ready()`."""
        if self._state is Role.LEADER:
            self._leader_read(self.id, context)
        elif self.lead is None:
            raise NotLeader(None)
        else:
            self._send(Message(_MT.READ_INDEX, self.lead, self.id, context=context))

    def transfer_leadership(self, to: NodeId) -> None:
        """Hand leadership to voter `to` once it caught up; abandoned after an election timeout."""
        if to not in self._voters:
            raise TransferRefused(f"{to!r} is not a voter of the current configuration")
        if self._state is Role.LEADER:
            self._leader_transfer(to)
        elif self.lead is None:
            raise NotLeader(None)
        else:
            self._send(Message(_MT.TRANSFER_LEADER, self.lead, self.id, context=to.encode("utf-8")))

    def report_unreachable(self, peer: NodeId) -> None:
        """Transport hint: sends to `peer` failed; stop pipelining to it until it answers."""
        pr = self._prs.get(peer)
        if self._state is Role.LEADER and pr is not None and pr.state is ProgressState.REPLICATE:
            pr.become_probe()

    def report_leader_lost(self, peer: NodeId) -> None:
        """Transport hint: the connection to our leader `peer` broke (its process
        died or its host went away). Stop honouring its lease and campaign at the
        next tick instead of waiting out a whole election timeout. Safe: PreVote
        still needs a majority that has also stopped hearing from the leader (the
        lease check), so one flapping link disrupts nothing."""
        if self._state is Role.FOLLOWER and peer == self.lead and self._promotable():
            # Every follower gets the hint within about a tick of the others;
            # campaigning together would split the vote. So they take turns by
            # id: the first campaigns two ticks later, the next two ticks after
            # it, and so on. Two, not one: a pre-vote that reaches a follower
            # still honouring the dead leader's lease is refused, and if that
            # follower's log is behind (it cannot win either) the cluster
            # waits out a whole election timeout.
            rank = sorted(v for v in self._voters if v != peer).index(self.id)
            # No known leader means no lease: this node now grants pre-votes to
            # the others; a heartbeat from a leader that is in fact alive sets
            # the leader again and restarts the election timer.
            self.lead = None
            self._election_elapsed = max(
                self._election_elapsed, self._randomized_timeout - 2 - 2 * rank
            )

    def compact(self, index: int, data: bytes) -> Snapshot:
        """The application snapshotted its state at applied `index`: keep that snapshot
        (to send to lagging peers) and drop the log up to it. Call after `advance()`;
        the driver persists the returned snapshot and compacts its storage."""
        if not self.log.offset < index <= self.log.applied:
            raise RaftUsageError(
                f"compaction index {index} outside ({self.log.offset}, applied {self.log.applied}]"
            )
        term = self.log.term(index)
        assert term is not None
        snap = Snapshot(self._snapshot_meta(index, term), data)
        self.log.compact(snap)
        while self._conf_history and self._conf_history[0][0] <= index:
            self._conf_base = self._conf_history.pop(0)[1]
        return snap

    def has_ready(self) -> bool:
        if self._awaiting is not None:
            return False
        self._flush()
        if self._msgs or self._read_states:
            return True
        log = self.log
        if log.has_unstable() or log.pending_snapshot is not None or log.has_next_committed():
            return True
        soft = self._prev_soft  # compared field by field: this runs after every step
        return (
            self.lead != soft.leader
            or self.role is not soft.role
            or self._hard_state() != self._prev_hard
        )

    def ready(self) -> Ready:
        """Hand out pending work; conf changes among the committed entries take effect now.
        Must be followed by `advance(ready)` before the next `ready()`."""
        if self._awaiting is not None:
            raise RaftUsageError("ready() called again before advance()")
        self._flush()
        log = self.log
        soft = self._soft_state()
        hard = self._hard_state()
        committed = log.next_committed()
        rd = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hard if hard != self._prev_hard else None,
            entries=log.unstable_entries(),
            snapshot=log.pending_snapshot,
            committed_entries=committed,
            messages=tuple(self._msgs),
            read_states=tuple(self._read_states),
        )
        self._msgs = []
        self._read_states = []
        self._prev_soft = soft
        self._prev_hard = hard
        self._awaiting = rd
        if committed:
            log.applying = committed[-1].index
            for e in committed:
                if e.type is EntryType.CONF_CHANGE and e.index > self._conf_applied:
                    self._apply_conf_change(e)
            self._conf_applied = max(self._conf_applied, log.applying)
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied everything in `rd`."""
        if rd is not self._awaiting:
            raise RaftUsageError("advance() must be given the Ready returned by ready()")
        self._awaiting = None
        log = self.log
        if rd.snapshot is not None:
            if log.pending_snapshot is rd.snapshot:
                log.pending_snapshot = None
            log.applied = max(log.applied, rd.snapshot.meta.index)
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
        if rd.committed_entries:
            log.applied = max(log.applied, rd.committed_entries[-1].index)

    # ------------------------------------------------------------ state changes

    def _soft_state(self) -> SoftState:
        return SoftState(self.lead, self.role)

    def _hard_state(self) -> HardState:
        """What must be durable before this Ready's messages go out (term, vote, commit)."""
        return HardState(self.term, self.vote, self.log.committed)

    def _promotable(self) -> bool:
        return self.id in self._voters

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = None
        self.lead = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomize_timeout()
        self._lead_transferee = None
        self._votes = {}
        self._prs = {}
        self._readonly.reset()
        self._pending_reads = []
        self._read_heartbeat = False
        self._pending_conf_index = 0

    def _randomize_timeout(self) -> None:
        et = self._cfg.election_tick
        self._randomized_timeout = et + self._rng.randrange(et)

    def _become_follower(self, term: int, lead: NodeId | None) -> None:
        self._reset(term)
        self.lead = lead
        self._state = Role.FOLLOWER

    def _become_pre_candidate(self) -> None:
        # Term and vote stay: a pre-vote only asks whether a real campaign could win.
        self._votes = {}
        self.lead = None
        self._election_elapsed = 0
        self._randomize_timeout()
        self._state = Role.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self._state = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.lead = self.id
        self._state = Role.LEADER
        last = self.log.last_index()
        for pid in sorted(self._voters | self._learners):
            self._prs[pid] = self._new_progress(pid, last + 1)
        me = self._prs.get(self.id)
        if me is not None:
            me.match = last
            me.become_replicate()
        # No conf change until every entry of earlier terms is applied: there may be
        # a pending one among them that we cannot see as such yet.
        self._pending_conf_index = last
        # The no-op of the new term: commits everything before it (Figure 8) and
        # lets ReadIndex serve once it is committed.
        self._append([(EntryType.NORMAL, b"")])

    def _new_progress(self, pid: NodeId, next_index: int) -> Progress:
        cfg = self._cfg
        return Progress(
            next_index,
            Inflights(cfg.max_inflight_msgs, cfg.max_inflight_bytes),
            is_learner=pid in self._learners,
        )

    # ------------------------------------------------------------------ timers

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._promotable() and self._election_elapsed >= self._randomized_timeout:
            self._election_elapsed = 0
            self._hup(transfer=False)

    def _tick_heartbeat(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self._cfg.election_tick:
            self._election_elapsed = 0
            if self._cfg.check_quorum and not self._quorum_active():
                # We cannot reach a majority: stop acting as leader, so clients
                # go elsewhere and reads are not served from a stale view.
                self._become_follower(self.term, None)
                return
            self._lead_transferee = None  # transfer timed out
            if self.id not in self._voters:
                # Removed, and the hand-over did not happen within an election
                # timeout: stop leading; the voters elect a leader among themselves.
                self._become_follower(self.term, None)
                return
        if self._state is Role.LEADER and self._heartbeat_elapsed >= self._cfg.heartbeat_tick:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat()

    def _quorum_active(self) -> bool:
        active = {pid for pid, pr in self._prs.items() if pr.recent_active or pid == self.id}
        for pid, pr in self._prs.items():
            if pid != self.id:
                pr.recent_active = False
        return has_quorum(self._voters, active)

    # ---------------------------------------------------------------- elections

    def _hup(self, *, transfer: bool) -> None:
        if self._state is Role.LEADER or not self._promotable():
            return
        # A committed but unapplied conf change could remove us or change the quorum.
        for e in self.log.slice(self._conf_applied + 1, self.log.committed + 1):
            if e.type is EntryType.CONF_CHANGE:
                return
        if self._cfg.pre_vote and not transfer:
            self._campaign(pre=True, transfer=False)
        else:
            self._campaign(pre=False, transfer=transfer)

    def _campaign(self, *, pre: bool, transfer: bool) -> None:
        if pre:
            self._become_pre_candidate()
            vote_type, vote_term = _MT.PRE_VOTE, self.term + 1
        else:
            self._become_candidate()
            vote_type, vote_term = _MT.VOTE, self.term
        if self._poll(self.id, granted=True) is VoteResult.WON:
            # A single voter wins on its own vote.
            if pre:
                self._campaign(pre=False, transfer=transfer)
            else:
                self._become_leader()
            return
        last_index, last_term = self.log.last_index(), self.log.last_term()
        context = CAMPAIGN_TRANSFER if transfer else b""
        for v in sorted(self._voters):
            if v != self.id:
                self._send(
                    Message(
                        vote_type,
                        v,
                        self.id,
                        vote_term,
                        log_term=last_term,
                        index=last_index,
                        context=context,
                    )
                )

    def _poll(self, frm: NodeId, *, granted: bool) -> VoteResult:
        self._votes.setdefault(frm, granted)
        return vote_result(self._voters, self._votes)

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type is _MT.PRE_VOTE
        resp = _MT.PRE_VOTE_RESP if pre else _MT.VOTE_RESP
        can_vote = (
            self.vote == m.frm
            or (self.vote is None and self.lead is None)
            or (pre and m.term > self.term)
        )
        if can_vote and self._vote_log_ok(m):
            # Pre-vote grants answer in the future term the candidate would use.
            self._send(Message(resp, m.frm, self.id, m.term))
            if not pre:
                self._election_elapsed = 0
                self.vote = m.frm
        else:
            self._reject_vote(m)

    def _reject_vote(self, m: Message) -> None:
        # The refusal carries what we know is committed, within the candidate's log:
        # conf changes take effect when applied, so a candidate may not know that the
        # change removing us committed and keep asking for a vote we cannot give.
        resp = _MT.PRE_VOTE_RESP if m.type is _MT.PRE_VOTE else _MT.VOTE_RESP
        c = min(self.log.committed, m.index)
        ct = self.log.term(c)
        if ct is None:
            c = ct = 0
        self._send(Message(resp, m.frm, self.id, self.term, reject=True, index=c, log_term=ct))

    def _learn_commit(self, index: int, term: int) -> None:
        """A peer says (index, term) is committed. If we hold that very entry, Log
        Matching makes our prefix identical to the peer's, so it is committed here too."""
        log = self.log
        if index > log.committed and log.match_term(index, term):
            log.commit_to(index)

    def _vote_log_ok(self, m: Message) -> bool:
        """Election restriction (§5.4.1): only a candidate at least as up to date as us."""
        return self.log.is_up_to_date(m.index, m.log_term)

    # ------------------------------------------------------------- role steps

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (_MT.APP, _MT.HEARTBEAT, _MT.SNAP):
            # Someone won this term: follow it.
            self._become_follower(m.term, m.frm)
            self._step_follower(m)
        elif (t is _MT.PRE_VOTE_RESP and self._state is Role.PRE_CANDIDATE) or (
            t is _MT.VOTE_RESP and self._state is Role.CANDIDATE
        ):
            result = self._poll(m.frm, granted=not m.reject)
            if result is VoteResult.WON:
                if self._state is Role.PRE_CANDIDATE:
                    self._campaign(pre=False, transfer=False)
                else:
                    self._become_leader()
            elif result is VoteResult.LOST:
                self._become_follower(self.term, None)
        # Proposals, reads and transfers are dropped: there is no leader to take them.

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t is _MT.APP:
            self._election_elapsed = 0
            self.lead = m.frm
            self._handle_append(m)
        elif t is _MT.HEARTBEAT:
            self._election_elapsed = 0
            self.lead = m.frm
            self.log.commit_to(min(m.commit, self.log.last_index()))
            self._send(Message(_MT.HEARTBEAT_RESP, m.frm, self.id, self.term, context=m.context))
        elif t is _MT.SNAP:
            self._election_elapsed = 0
            self.lead = m.frm
            self._handle_snapshot(m)
        elif t is _MT.TIMEOUT_NOW:
            self._hup(transfer=True)
        elif t is _MT.READ_INDEX_RESP:
            self._read_states.append(ReadState(m.index, m.context))
        elif t in _TERMLESS and self.lead is not None and m.frm != self.lead:
            self._send(Message(t, self.lead, self.id, entries=m.entries, context=m.context))

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t is _MT.PROP:
            if self._lead_transferee is None:
                self._append(self._accept_forwarded(m.entries))
            return
        if t is _MT.READ_INDEX:
            self._leader_read(m.frm, m.context)
            return
        if t is _MT.TRANSFER_LEADER:
            try:
                to = m.context.decode("utf-8")
            except UnicodeDecodeError:
                return
            if to in self._voters:
                self._leader_transfer(to)
            return
        pr = self._prs.get(m.frm)
        if pr is None:
            return
        if t is _MT.APP_RESP:
            pr.recent_active = True
            self._handle_append_response(m, pr)
        elif t is _MT.HEARTBEAT_RESP:
            pr.recent_active = True
            self._handle_heartbeat_response(m, pr)
        elif t is _MT.SNAP_RESP:
            pr.recent_active = True
            self._handle_snapshot_response(m, pr)

    # ----------------------------------------------------------- replication

    def _propose(self, etype: EntryType, data: bytes) -> None:
        if self._state is Role.LEADER:
            if self._lead_transferee is not None:
                raise NotLeader(self._lead_transferee)
            self._append([(etype, data)])
            if etype is EntryType.CONF_CHANGE:
                self._pending_conf_index = self.log.last_index()
        elif self.lead is None or self._state is not Role.FOLLOWER:
            raise NotLeader(None)
        else:
            self._send(Message(_MT.PROP, self.lead, self.id, entries=(Entry(0, 0, etype, data),)))

    def _accept_forwarded(self, entries: Iterable[Entry]) -> list[tuple[EntryType, bytes]]:
        out: list[tuple[EntryType, bytes]] = []
        for e in entries:
            if e.type is EntryType.CONF_CHANGE:
                if self._pending_conf_index > self.log.applying:
                    continue
                try:
                    cc = decode_conf_change(e.data)
                except RaftCodecError:
                    continue
                if self._conf_change_refusal(cc) is not None:
                    continue
                self._pending_conf_index = self.log.last_index() + len(out) + 1
            out.append((e.type, e.data))
        return out

    def _append(self, items: Sequence[tuple[EntryType, bytes]]) -> None:
        if not items:
            return
        log = self.log
        term = self.term
        first = log.last_index() + 1
        log.append([Entry(term, first + i, et, data) for i, (et, data) in enumerate(items)])
        # The leader counts itself at once: its own entries are persisted in the
        # same Ready, before any message that could reveal a commit goes out.
        me = self._prs.get(self.id)
        if me is not None:
            me.maybe_update(log.last_index())
        self._maybe_commit()

    def _maybe_commit(self) -> bool:
        """Advance the commit index to what a quorum of voters stored (current term only)."""
        prs = self._prs
        mci = committed_index(self._voters, {pid: pr.match for pid, pr in prs.items()})
        if not self.log.maybe_commit(mci, self.term):
            return False
        if self._pending_reads:
            pending, self._pending_reads = self._pending_reads, []
            for frm, ctx in pending:
                self._leader_read(frm, ctx)
        return True

    def _flush(self) -> None:
        """Leader: send what each peer is missing, batched, within its flow-control bounds."""
        if self._state is not Role.LEADER:
            return
        if self._read_heartbeat:
            self._read_heartbeat = False
            self._bcast_heartbeat()
        log = self.log
        committed = log.committed
        last = log.last_index()
        for pid, pr in self._prs.items():
            if pid == self.id or (pr.next > last and pr.sent_commit >= committed):
                continue  # the peer has been sent everything already
            sent = False
            while self._maybe_send_append(pid, pr, send_if_empty=False):
                sent = True
                if pr.state is not ProgressState.REPLICATE:
                    break
            if not sent and pr.sent_commit < committed:
                self._maybe_send_append(pid, pr, send_if_empty=True)

    def _maybe_send_append(self, to: NodeId, pr: Progress, *, send_if_empty: bool) -> bool:
        if pr.is_paused():
            return False
        log = self.log
        prev = pr.next - 1
        prev_term = log.term(prev)
        if prev_term is None:
            return self._send_snapshot(to, pr)
        ents = (
            log.entries_from(pr.next, self._cfg.max_size_per_msg) if prev < log.last_index() else []
        )
        if not ents and not send_if_empty:
            return False
        committed = log.committed
        self._send(
            Message(
                _MT.APP,
                to,
                self.id,
                self.term,
                log_term=prev_term,
                index=prev,
                entries=tuple(ents),
                commit=committed,
            )
        )
        pr.sent_commit = committed
        if pr.state is ProgressState.REPLICATE:
            if ents:
                last = ents[-1].index
                pr.next = last + 1
                size = 0
                for e in ents:
                    size += len(e.data) + ENTRY_OVERHEAD
                pr.inflights.add(last, size)
        else:
            pr.probe_sent = True
        return True

    def _handle_append(self, m: Message) -> None:
        log = self.log
        if m.index < log.committed:
            self._send(Message(_MT.APP_RESP, m.frm, self.id, self.term, index=log.committed))
            return
        last_new = log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self._send(Message(_MT.APP_RESP, m.frm, self.id, self.term, index=last_new))
            return
        # Tell the leader where our log may agree with its: the last index whose
        # term is <= the term it probed with, skipping a whole term per round trip.
        hint_index, hint_term = log.find_conflict_by_term(
            min(m.index, log.last_index()), m.log_term
        )
        self._send(
            Message(
                _MT.APP_RESP,
                m.frm,
                self.id,
                self.term,
                index=m.index,
                reject=True,
                reject_hint=hint_index,
                log_term=hint_term,
            )
        )

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, next_probe) and pr.state is ProgressState.REPLICATE:
                pr.become_probe()
            return
        if not pr.maybe_update(m.index):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT:
            if pr.match >= pr.pending_snapshot or pr.match + 1 >= self.log.first_index():
                pr.become_probe()
                if pr.match + 1 >= self.log.first_index():
                    pr.become_replicate()
        else:
            pr.inflights.free_le(m.index)
        self._maybe_commit()
        if m.frm == self._lead_transferee and pr.match == self.log.last_index():
            self._send_timeout_now(m.frm)

    def _bcast_heartbeat(self) -> None:
        seq = self._readonly.last_seq()
        context = b"" if seq is None else encode_seq(seq)
        committed = self.log.committed
        for pid, pr in self._prs.items():
            if pid != self.id:
                self._send(
                    Message(
                        _MT.HEARTBEAT,
                        pid,
                        self.id,
                        self.term,
                        commit=min(pr.match, committed),
                        context=context,
                    )
                )

    def _handle_heartbeat_response(self, m: Message, pr: Progress) -> None:
        pr.probe_sent = False
        if pr.state is ProgressState.REPLICATE and pr.inflights.full():
            # An append may have been lost: make room to send again.
            pr.inflights.free_first_one()
        if pr.state is ProgressState.SNAPSHOT:
            pr.snap_stall += 1
            if pr.snap_stall >= 2:
                # No chunk acknowledged for a while: the last one was probably lost.
                self._send_snap_chunk(m.frm, pr)
        elif pr.match < self.log.last_index():
            self._maybe_send_append(m.frm, pr, send_if_empty=True)
        seq = decode_seq(m.context)
        if seq is not None:
            for req in self._readonly.recv_ack(m.frm, seq, self.id, self._voters):
                self._deliver_read(req)

    # ---------------------------------------------------------------- snapshots

    def _send_snapshot(self, to: NodeId, pr: Progress) -> bool:
        snap = self.log.snapshot
        if snap is None:
            return False
        pr.become_snapshot(snap)
        self._send_snap_chunk(to, pr)
        return True

    def _send_snap_chunk(self, to: NodeId, pr: Progress) -> None:
        snap = pr.snap
        if snap is None:
            return
        pr.snap_stall = 0
        off = pr.snap_offset
        chunk = snap.data[off : off + self._cfg.snapshot_chunk_size]
        self._send(
            Message(
                _MT.SNAP,
                to,
                self.id,
                self.term,
                snapshot=snap.meta,
                offset=off,
                data=chunk,
                done=off + len(chunk) >= len(snap.data),
            )
        )

    def _handle_snapshot_response(self, m: Message, pr: Progress) -> None:
        if pr.state is not ProgressState.SNAPSHOT or m.index != pr.pending_snapshot:
            return
        # The follower's byte count is the truth: it may have restarted and lost its
        # partial copy, or a duplicated answer may be stale; either way resend from there.
        offset = 0 if m.reject else m.offset
        if offset != pr.snap_offset:
            pr.snap_offset = offset
            self._send_snap_chunk(m.frm, pr)
        elif m.reject:
            self._send_snap_chunk(m.frm, pr)

    def _handle_snapshot(self, m: Message) -> None:
        meta = m.snapshot
        if meta is None:
            return
        log = self.log
        if meta.index <= log.committed:
            self._snap_recv = None
            self._send(Message(_MT.APP_RESP, m.frm, self.id, self.term, index=log.committed))
            return
        recv = self._snap_recv
        key = (m.frm, m.term, meta)
        if recv is not None and recv[0] == key:
            if m.offset != len(recv[1]):
                # A duplicate or a gap: tell the leader where we are.
                self._send(
                    Message(
                        _MT.SNAP_RESP,
                        m.frm,
                        self.id,
                        self.term,
                        index=meta.index,
                        offset=len(recv[1]),
                    )
                )
                return
        elif m.offset == 0:
            recv = self._snap_recv = (key, bytearray())
        else:
            # A chunk of a transfer we know nothing of (we restarted): start over.
            self._send(
                Message(_MT.SNAP_RESP, m.frm, self.id, self.term, index=meta.index, reject=True)
            )
            return
        buf = recv[1]
        buf += m.data
        if not m.done:
            self._send(
                Message(_MT.SNAP_RESP, m.frm, self.id, self.term, index=meta.index, offset=len(buf))
            )
            return
        self._snap_recv = None
        if self._restore(Snapshot(meta, bytes(buf))):
            self._send(Message(_MT.APP_RESP, m.frm, self.id, self.term, index=log.last_index()))
        else:
            self._send(Message(_MT.APP_RESP, m.frm, self.id, self.term, index=log.committed))

    def _restore(self, snap: Snapshot) -> bool:
        """Install a snapshot from the leader; False if our log already covers it."""
        meta = snap.meta
        log = self.log
        if meta.index <= log.committed:
            return False
        if log.match_term(meta.index, meta.term):
            log.commit_to(meta.index)
            return False
        log.restore(snap)
        self._conf_base = meta.conf
        self._conf_history = []
        self._voters = set(meta.conf.voters)
        self._learners = set(meta.conf.learners)
        self._conf_applied = meta.index
        return True

    def _snapshot_meta(self, index: int, term: int) -> SnapshotMeta:
        conf = self._conf_base
        for idx, c in self._conf_history:
            if idx > index:
                break
            conf = c
        return SnapshotMeta(index, term, conf)

    # -------------------------------------------------------- membership changes

    def _conf_change_refusal(self, cc: ConfChange) -> str | None:
        if cc.type is ConfChangeType.ADD_LEARNER and cc.node_id in self._voters:
            return f"{cc.node_id!r} is a voter; demotion to learner is not supported"
        if cc.type is ConfChangeType.REMOVE_NODE:
            if cc.node_id not in self._voters and cc.node_id not in self._learners:
                return f"{cc.node_id!r} is not a member"
            if self._voters == {cc.node_id}:
                return "cannot remove the last voter"
        return None

    def _apply_conf_change(self, e: Entry) -> None:
        try:
            cc = decode_conf_change(e.data)
        except RaftCodecError:
            return  # the leader validated it; a corrupt entry changes nothing anywhere
        nid = cc.node_id
        if cc.type is ConfChangeType.ADD_VOTER:
            self._voters.add(nid)
            self._learners.discard(nid)
        elif cc.type is ConfChangeType.ADD_LEARNER:
            if nid not in self._voters:  # demotion is refused at proposal time
                self._learners.add(nid)
        elif self._voters != {nid}:  # the last voter is never removed
            self._voters.discard(nid)
            self._learners.discard(nid)
        self._conf_history.append((e.index, self.conf))
        if self._state is Role.LEADER:
            self._leader_conf_applied(cc)
        elif self._state is not Role.FOLLOWER and not self._promotable():
            self._become_follower(self.term, None)

    def _leader_conf_applied(self, cc: ConfChange) -> None:
        nid = cc.node_id
        if cc.type is ConfChangeType.REMOVE_NODE:
            self._prs.pop(nid, None)
            if nid == self._lead_transferee:
                self._lead_transferee = None
        else:
            pr = self._prs.get(nid)
            if pr is None:
                self._prs[nid] = self._new_progress(nid, self.log.last_index() + 1)
            else:
                pr.is_learner = nid in self._learners
        if self.id not in self._voters:
            self._hand_over()
            return
        self._maybe_commit()

    def _hand_over(self) -> None:
        """We were removed: lead on (without counting ourselves) until the most
        caught-up voter has our whole log, then make it campaign and step down.

        Stepping down at once could strand the others: our uncommitted tail
        makes our log longer than theirs, so we would refuse them our vote,
        while they cannot tell yet that the change removing us committed."""
        best = max(
            sorted(self._voters),
            key=lambda v: self._prs[v].match if v in self._prs else -1,
        )
        self._lead_transferee = best
        self._election_elapsed = 0
        pr = self._prs.get(best)
        if pr is not None and pr.match == self.log.last_index():
            self._send_timeout_now(best)

    def _send_timeout_now(self, to: NodeId) -> None:
        self._send(Message(_MT.TIMEOUT_NOW, to, self.id, self.term))
        if self.id not in self._voters:
            self._become_follower(self.term, None)

    # ------------------------------------------------------------- leader extras

    def _leader_transfer(self, to: NodeId) -> None:
        if to in (self.id, self._lead_transferee):
            return
        self._lead_transferee = to
        self._election_elapsed = 0  # the transfer times out after one election timeout
        pr = self._prs.get(to)
        if pr is not None and pr.match == self.log.last_index():
            self._send_timeout_now(to)

    def _leader_read(self, frm: NodeId, context: bytes) -> None:
        log = self.log
        if log.term(log.committed) != self.term:
            # Until an entry of our term commits we do not know the true commit index.
            self._pending_reads.append((frm, context))
            return
        self._readonly.add(log.committed, frm, context)
        if self._voters == {self.id}:
            for req in self._readonly.release(self.id, self._voters):
                self._deliver_read(req)
        else:
            self._read_heartbeat = True

    def _deliver_read(self, req: ReadRequest) -> None:
        if req.frm == self.id:
            self._read_states.append(ReadState(req.index, req.context))
        else:
            self._send(
                Message(
                    _MT.READ_INDEX_RESP,
                    req.frm,
                    self.id,
                    self.term,
                    index=req.index,
                    context=req.context,
                )
            )

    def _send(self, m: Message) -> None:
        self._msgs.append(m)
