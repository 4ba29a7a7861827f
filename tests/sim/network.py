"""Simulated network for the Raft simulation: delay, reordering, loss,
duplication and partitions, all driven by the one seeded `random.Random` of a run.

A message handed to `send` is delivered at a logical tick chosen from the fault
settings; messages due at the same tick come out in a random order, and a
longer delay lets a later message overtake an earlier one. Partitions are a set
of blocked directed links checked at delivery time, so a partition also eats
what was already in flight. Imports only the standard library and the Raft data
types; never reads a clock or uses any randomness other than the run's `rng`, so
the same seed always produces the same deliveries.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass

from gcks.cluster.raft.types import Message, NodeId


@dataclass(slots=True)
class LinkFaults:
    """How badly the network behaves. All zero: every message is delivered once,
    in the tick it was sent."""

    drop: float = 0.0  # probability that a message is lost
    duplicate: float = 0.0  # probability that a message is delivered twice
    max_delay: int = 0  # usual delay: 0..max_delay ticks
    long_delay: float = 0.0  # probability of a long delay instead
    long_delay_ticks: int = 0  # a long delay is 1..long_delay_ticks ticks


class SimNetwork:
    """In-flight messages ordered by (delivery tick, random rank)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._queue: list[tuple[int, float, int, Message]] = []
        self._seq = itertools.count()
        self._blocked: set[tuple[NodeId, NodeId]] = set()
        self.faults = LinkFaults()
        self.sent = 0
        self.dropped = 0
        self.duplicated = 0

    def __len__(self) -> int:
        return len(self._queue)

    def send(self, msg: Message, now: int) -> None:
        self.sent += 1
        rng = self._rng
        faults = self.faults
        if faults.drop and rng.random() < faults.drop:
            self.dropped += 1
            return
        copies = 1
        if faults.duplicate and rng.random() < faults.duplicate:
            copies = 2
            self.duplicated += 1
        for _ in range(copies):
            heapq.heappush(self._queue, (now + self._delay(), rng.random(), next(self._seq), msg))

    def _delay(self) -> int:
        faults = self.faults
        if faults.long_delay and self._rng.random() < faults.long_delay:
            return self._rng.randint(1, max(1, faults.long_delay_ticks))
        if faults.max_delay:
            return self._rng.randint(0, faults.max_delay)
        return 0

    def pop_due(self, now: int) -> Message | None:
        """The next message due at or before `now` whose link is open, or None.
        Messages on a blocked link are dropped, as a cut cable would."""
        queue = self._queue
        while queue and queue[0][0] <= now:
            msg = heapq.heappop(queue)[3]
            if (msg.frm, msg.to) in self._blocked:
                self.dropped += 1
                continue
            return msg
        return None

    # -- partitions ---------------------------------------------------------------

    def is_blocked(self, frm: NodeId, to: NodeId) -> bool:
        return (frm, to) in self._blocked

    def partition(self, groups: Iterable[Iterable[NodeId]]) -> None:
        """Symmetric partition: no traffic between different groups."""
        sides = [frozenset(g) for g in groups]
        for i, a in enumerate(sides):
            for b in sides[i + 1 :]:
                for x in a:
                    for y in b:
                        self._blocked.add((x, y))
                        self._blocked.add((y, x))

    def block_one_way(self, frm: Iterable[NodeId], to: Iterable[NodeId]) -> None:
        """Asymmetric partition: `frm` cannot reach `to`, the reverse still works."""
        targets = frozenset(to)
        for x in frm:
            for y in targets:
                if x != y:
                    self._blocked.add((x, y))

    def isolate(self, node: NodeId, others: Iterable[NodeId]) -> None:
        self.partition([[node], [o for o in others if o != node]])

    def heal(self) -> None:
        self._blocked.clear()

    @property
    def partitioned(self) -> bool:
        return bool(self._blocked)
