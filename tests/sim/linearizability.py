"""Linearizability of the simulated clients' writes and ReadIndex reads.

The replicated state machine of the simulation is an append-only list of unique
client write ids, so a history has a simple exact check. Writes are ordered by
their position (rank) in the committed list: the list itself reveals that order.
A read returns how many writes its node had applied, `v`, so it must sit after
write `v` and before write `v + 1`. Give write k the key (k, 0) and a read that
saw v writes the key (v, 1): the history is linearizable if and only if no
operation that completed before another was invoked has the larger key (sort by
key and break ties between reads by invocation time for the linear order).
`check_linearizable` tests exactly that in O(n log n).

`ReadWriteHistory` records the simulated history (time is the global step
count), keeps the reference list (the order in which write ids first became
committed anywhere: a write is acknowledged from that moment, which is at least
as strict as acknowledging when the client's own node applies it) and checks
each read as it completes. Imports nothing from the core; no I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from .checker import InvariantViolation

WRITE = 0
READ = 1


@dataclass(frozen=True, slots=True)
class Op:
    kind: int  # WRITE or READ
    invoked: int
    completed: int
    value: int  # WRITE: its rank (1-based); READ: how many writes it saw
    name: str


def check_linearizable(ops: Iterable[Op]) -> str | None:
    """None if the completed operations admit a linear order, else why not."""
    by_invoke = sorted(ops, key=lambda op: (op.invoked, op.completed))
    done: list[tuple[int, tuple[int, int], str]] = []  # (completed, key, name) heap
    best: tuple[int, int] | None = None  # largest key among ops completed so far
    best_name = ""
    for op in by_invoke:
        while done and done[0][0] < op.invoked:
            _, key, name = heapq.heappop(done)
            if best is None or key > best:
                best, best_name = key, name
        key = (op.value, op.kind)
        if best is not None and best > key:
            return f"{best_name} completed before {op.name} was invoked but must follow it"
        heapq.heappush(done, (op.completed, key, op.name))
    return None


class ReadWriteHistory:
    """Client history plus the reference list of committed write ids."""

    def __init__(self) -> None:
        self.reference: list[int] = []  # write ids in commit order
        self.count_at: list[int] = [0]  # count_at[i]: writes among indices 1..i
        self._rank: dict[int, int] = {}
        self._write_invoked: dict[int, int] = {}
        self._write_completed: dict[int, int] = {}
        self._refused: set[int] = set()
        self._reads: dict[bytes, tuple[int, int]] = {}  # ctx -> (invoked, writes acked then)
        self._read_ops: list[Op] = []

    @property
    def applied_index(self) -> int:
        return len(self.count_at) - 1

    def write_invoked(self, wid: int, now: int) -> None:
        self._write_invoked[wid] = now

    def write_refused(self, wid: int) -> None:
        """The core raised on the proposal: the client was told it failed."""
        self._refused.add(wid)

    def index_committed(self, index: int, wid: int | None, now: int) -> None:
        """Index `index` was applied for the first time anywhere; `wid` is the
        client write it carries, if any."""
        if index != self.applied_index + 1:
            raise InvariantViolation(
                "apply-order",
                f"index {index} applied first while the cluster had applied only up to "
                f"{self.applied_index}",
            )
        if wid is not None and wid not in self._rank:
            if wid in self._refused:
                raise InvariantViolation(
                    "refused-write-committed", f"write w{wid} was refused but committed"
                )
            self.reference.append(wid)
            self._rank[wid] = len(self.reference)
            self._write_completed[wid] = now
        self.count_at.append(len(self.reference))

    def is_committed(self, wid: int) -> bool:
        return wid in self._rank

    def was_refused(self, wid: int) -> bool:
        return wid in self._refused

    def read_invoked(self, ctx: bytes, now: int) -> None:
        self._reads[ctx] = (now, len(self.reference))

    def read_abandoned(self, ctx: bytes) -> None:
        self._reads.pop(ctx, None)

    def is_pending(self, ctx: bytes) -> bool:
        return ctx in self._reads

    def read_served(self, ctx: bytes, seen: int, now: int, node: str) -> None:
        """A read completed at `node`, whose state machine held `seen` writes."""
        invoked, acked = self._reads.pop(ctx)
        if seen < acked:
            raise InvariantViolation(
                "linearizable-read",
                f"read {ctx!r} at {node} saw {seen} writes but {acked} were acknowledged "
                f"before it was invoked",
            )
        self._read_ops.append(Op(READ, invoked, now, seen, f"read {ctx.decode()}"))

    def operations(self) -> list[Op]:
        ops = list(self._read_ops)
        for wid, rank in self._rank.items():
            invoked = self._write_invoked.get(wid)
            if invoked is not None:
                ops.append(Op(WRITE, invoked, self._write_completed[wid], rank, f"write w{wid}"))
        return ops

    def final_check(self) -> None:
        problem = check_linearizable(self.operations())
        if problem is not None:
            raise InvariantViolation("linearizability", problem)
