"""Raft safety invariants for the simulation, checked incrementally after every step.

The simulation driver reports what it observes from outside the cores: every
`Ready` it persists, every message a node sends, every entry it applies, every
node that becomes leader. The checker keeps a global picture (which entry each
(index, term) names, which entries are known committed and from which term that
is known) and raises `InvariantViolation` the moment an observation contradicts

- election safety: at most one leader per term;
- log matching: one (index, term) names one entry, with one predecessor term;
- leader completeness: a leader of term T holds every entry known committed in
  an earlier term;
- state machine safety: no two nodes apply different entries at one index, and
  a node applies only entries its own storage holds as committed;
- no acknowledged entry is lost: a persisted log never erases a committed entry,
  and no two nodes persist different entries as committed at one index;
- the commit rule: a leader advances its commit index only to an entry of its
  own term (Raft's Figure 8), or to one some node already knew committed;
- durability before acknowledgement: a granted vote or an append
  acknowledgement is only sent once the state it promises is persisted.

Each check costs O(new entries), except leader completeness, which scans the
known committed entries once per election. Also checked, as terms and votes
never go back: a persisted term never decreases, a vote never changes within a
term, a commit index never decreases. Imports the Raft data types (and, for
type hints only, the storage model); never changes anything it observes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gcks.cluster.raft.types import Entry, HardState, Message, MessageType, NodeId

if TYPE_CHECKING:
    from .storage import DurableLog


class InvariantViolation(Exception):
    """A run broke a Raft safety or liveness property."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


class SafetyChecker:
    """Global observer of one simulated cluster."""

    def __init__(self, *, commit_rule: bool = True) -> None:
        self._check_commit_rule = commit_rule
        self.leaders: dict[int, NodeId] = {}
        # (index, term) -> (entry, term of its predecessor) for every entry ever persisted.
        self._named: dict[tuple[int, int], tuple[Entry, int]] = {}
        # index -> committed entry; index -> lowest term of a node that saw it committed
        # (an upper bound of the term in which it was committed).
        self.committed: dict[int, Entry] = {}
        self._committed_in: dict[int, int] = {}
        self._commit_seen: dict[NodeId, int] = {}  # highest persisted commit per node
        self._hard_state: dict[NodeId, HardState] = {}

    # -- elections ----------------------------------------------------------------

    def on_leader(self, node: NodeId, term: int, log: DurableLog) -> None:
        holder = self.leaders.setdefault(term, node)
        if holder != node:
            raise InvariantViolation(
                "election-safety", f"{holder} and {node} are both leader of term {term}"
            )
        snap = log.snapshot_index
        for index, entry in self.committed.items():
            if index <= snap or self._committed_in[index] >= term:
                continue
            mine = log.entry(index)
            if mine != entry:
                raise InvariantViolation(
                    "leader-completeness",
                    f"{node} leads term {term} without committed entry {_show(entry)} "
                    f"(its log has {_show(mine)})",
                )

    # -- persistence --------------------------------------------------------------

    def on_persist(
        self,
        node: NodeId,
        log: DurableLog,
        entries: tuple[Entry, ...],
        hs: HardState | None,
        replaced: list[Entry] | None = None,
        leading: bool = False,
    ) -> None:
        """After the driver wrote a Ready's snapshot, entries (replacing `replaced`)
        and hard state; `leading`: the node is leader after this Ready."""
        named = self._named
        committed = self.committed
        for old in replaced or ():
            if committed.get(old.index) == old:
                raise InvariantViolation(
                    "committed-entry-lost", f"{node} erased committed {_show(old)} from its log"
                )
        for e in entries:
            prev = log.term(e.index - 1)
            prev_term = -1 if prev is None else prev
            known = named.setdefault((e.index, e.term), (e, prev_term))
            if known[0] != e:
                raise InvariantViolation(
                    "log-matching",
                    f"{node} persisted {_show(e)}, another log holds {_show(known[0])}",
                )
            if known[1] != prev_term and prev is not None and known[1] != -1:
                raise InvariantViolation(
                    "log-matching",
                    f"{node} holds {_show(e)} after term {prev_term}, another log after "
                    f"term {known[1]}",
                )
        if hs is not None:
            self._on_hard_state(node, log, hs, leading)

    def _on_hard_state(self, node: NodeId, log: DurableLog, hs: HardState, leading: bool) -> None:
        old = self._hard_state.get(node)
        if self._check_commit_rule and leading and hs.commit > (0 if old is None else old.commit):
            # Raft's commit rule (paper §5.4.2, Figure 8): a leader counts replicas
            # only for an entry of its own term; an older entry commits underneath
            # one, or when the leader learns that a peer already knows it committed.
            term = log.term(hs.commit)
            known = self.committed.get(hs.commit)
            if term != hs.term and (known is None or known != log.entry(hs.commit)):
                raise InvariantViolation(
                    "commit-rule",
                    f"leader {node} of term {hs.term} advanced its commit to {hs.commit}, "
                    f"an entry of term {term} that no node knew committed",
                )
        if old is not None:
            if hs.term < old.term:
                raise InvariantViolation(
                    "term-regressed", f"{node} persisted term {hs.term} after {old.term}"
                )
            if hs.term == old.term and old.vote is not None and hs.vote != old.vote:
                raise InvariantViolation(
                    "vote-changed",
                    f"{node} changed its vote in term {hs.term} from {old.vote} to {hs.vote}",
                )
            if hs.commit < old.commit:
                raise InvariantViolation(
                    "commit-regressed", f"{node} persisted commit {hs.commit} after {old.commit}"
                )
        self._hard_state[node] = hs
        start = max(self._commit_seen.get(node, 0), log.snapshot_index)
        for index in range(start + 1, hs.commit + 1):
            entry = log.entry(index)
            if entry is None:
                raise InvariantViolation(
                    "commit-beyond-log",
                    f"{node} persisted commit {hs.commit} beyond its log end {log.last_index}",
                )
            self._commit(node, entry, hs.term, "commit-safety")
        self._commit_seen[node] = max(self._commit_seen.get(node, 0), hs.commit)

    def on_send(self, node: NodeId, log: DurableLog, msg: Message) -> None:
        """A message leaves `node` after its Ready was persisted."""
        if msg.type is MessageType.VOTE_RESP and not msg.reject:
            hs = log.hard_state
            if hs.term != msg.term or hs.vote != msg.to:
                raise InvariantViolation(
                    "vote-not-durable",
                    f"{node} granted its term-{msg.term} vote to {msg.to}, persisted "
                    f"(term {hs.term}, vote {hs.vote})",
                )
        elif msg.type is MessageType.APP_RESP and not msg.reject and msg.index > log.last_index:
            raise InvariantViolation(
                "ack-not-durable",
                f"{node} acknowledged index {msg.index}, persisted up to {log.last_index}",
            )

    # -- state machine ------------------------------------------------------------

    def on_apply(self, node: NodeId, entry: Entry, log: DurableLog) -> None:
        """`node` applies `entry`: it must be committed and durable here first."""
        hs = log.hard_state
        if entry.index > hs.commit or log.entry(entry.index) != entry:
            raise InvariantViolation(
                "apply-before-durable",
                f"{node} applies {_show(entry)}; persisted commit {hs.commit}, persisted "
                f"entry {_show(log.entry(entry.index))}",
            )
        self._commit(node, entry, hs.term, "state-machine-safety")

    def _commit(self, node: NodeId, entry: Entry, term: int, invariant: str) -> None:
        index = entry.index
        done = self.committed.get(index)
        if done is None:
            self.committed[index] = entry
            self._committed_in[index] = term
            return
        if done != entry:
            raise InvariantViolation(
                invariant, f"{node} has {_show(entry)} committed where {_show(done)} was"
            )
        if term < self._committed_in[index]:
            self._committed_in[index] = term


def _show(entry: Entry | None) -> str:
    if entry is None:
        return "nothing"
    return f"[{entry.index}@t{entry.term} {entry.type.name.lower()} {entry.data[:24]!r}]"
