"""A Wing-Gong-Lowe linearizability checker for recorded client histories.

Given operations with real-time invoke and completion times, it searches for a
total order that respects real time (an operation that completed before
another was invoked comes first) and that a sequential model accepts. The
search is Lowe's just-in-time linearization with memoisation (as in Knossos
and Porcupine): walk the time-ordered list of call and return events;
linearize a call whenever the model allows it and the (linearized set, model
state) pair is new; meeting a return whose call is not yet linearized means
backtracking. An operation whose outcome is unknown gets its return at
+infinity: it may take effect at any time after its invocation, or - placed
after everything else - in effect never.

`MembershipModel` is the specification of a group's member set: register adds
a member, deregister and eviction remove one (eviction also bans it), a
linearizable read returns the exact set. Pure computation; imports the standard library only.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

S = TypeVar("S", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Call:
    """One operation as the checker sees it. `complete` None: outcome unknown."""

    id: int
    invoke: float
    complete: float | None
    action: str
    argument: str | None = None
    result: frozenset[str] | None = None


class Model(Protocol[S]):
    def initial(self) -> S: ...

    def step(self, state: S, call: Call) -> S | None:
        """The state after `call` in `state`, or None if `call` cannot happen there."""


class Verdict(enum.StrEnum):
    LINEARIZABLE = "linearizable"
    NOT_LINEARIZABLE = "not linearizable"
    UNKNOWN = "unknown (search budget exhausted)"


@dataclass(frozen=True, slots=True)
class CheckResult:
    verdict: Verdict
    steps: int
    # On NOT_LINEARIZABLE: the ids of the longest prefix the search could order,
    # and the operation whose return it could not get past.
    longest_prefix: tuple[int, ...] = ()
    stuck_at: int | None = None


Membership = tuple[frozenset[str], frozenset[str]]


class MembershipModel:
    """A group's member set, and the set of evicted (banned) identities.

    `add` (a registration) adds a member unless it is banned: an acknowledged
    add of a banned identity is impossible; an unknown one changed nothing.
    `remove` (deregistration) removes it; `evict` removes a member and bans
    it (an eviction of a non-member changes nothing); `read` returns exactly
    the member set."""

    def initial(self) -> Membership:
        return frozenset(), frozenset()

    def step(self, state: Membership, call: Call) -> Membership | None:
        members, banned = state
        member = call.argument
        if call.action == "read":
            return state if call.result == members else None
        assert member is not None
        if call.action == "add":
            if member in banned:
                return None if call.complete is not None else state
            return members | {member}, banned
        if call.action == "remove":
            return members - {member}, banned
        if call.action == "evict":
            if member not in members:
                return state
            return members - {member}, banned | {member}
        raise ValueError(f"unknown action {call.action!r}")


class _Events:
    """The doubly linked list of call/return events, with lift and unlift."""

    def __init__(self, calls: Sequence[Call]) -> None:
        # (time, 0 = call | 1 = return, position): calls before returns at equal
        # times, so operations that merely touch count as concurrent.
        events: list[tuple[float, int, int]] = []
        for position, call in enumerate(calls):
            events.append((call.invoke, 0, position))
            end = math.inf if call.complete is None else call.complete
            events.append((end, 1, position))
        events.sort()
        size = len(events)
        self.is_call = [kind == 0 for _, kind, _ in events]
        self.call_of = [position for _, _, position in events]
        self.match = [0] * size  # a call event's return event and vice versa
        where: dict[tuple[int, int], int] = {}
        for event, (_, kind, position) in enumerate(events):
            where[(kind, position)] = event
        for event, (_, kind, position) in enumerate(events):
            self.match[event] = where[(1 - kind, position)]
        # A circular list through the sentinel `size` (the head).
        self.head = size
        self.next = [*range(1, size + 1), 0]
        self.prev = [size, *range(size)]

    def first(self) -> int | None:
        event = self.next[self.head]
        return None if event == self.head else event

    def following(self, event: int) -> int | None:
        nxt = self.next[event]
        return None if nxt == self.head else nxt

    def _unlink(self, event: int) -> None:
        self.next[self.prev[event]] = self.next[event]
        self.prev[self.next[event]] = self.prev[event]

    def _relink(self, event: int) -> None:
        self.next[self.prev[event]] = event
        self.prev[self.next[event]] = event

    def lift(self, call_event: int) -> None:
        self._unlink(call_event)
        self._unlink(self.match[call_event])

    def unlift(self, call_event: int) -> None:
        self._relink(self.match[call_event])
        self._relink(call_event)


def check(calls: Sequence[Call], model: Model[S], *, max_steps: int = 2_000_000) -> CheckResult:
    """Decide whether `calls` is linearizable with respect to `model`."""
    if not calls:
        return CheckResult(Verdict.LINEARIZABLE, 0)
    events = _Events(calls)
    state = model.initial()
    linearized = 0
    cache: set[tuple[int, S]] = {(0, state)}
    stack: list[tuple[int, S]] = []
    longest: tuple[int, ...] = ()
    stuck_at: int | None = None
    steps = 0
    event = events.first()
    while event is not None:
        steps += 1
        if steps > max_steps:
            return CheckResult(Verdict.UNKNOWN, steps)
        if events.is_call[event]:
            call = calls[events.call_of[event]]
            after = model.step(state, call)
            if after is not None:
                marked = linearized | (1 << events.call_of[event])
                if (marked, after) not in cache:
                    cache.add((marked, after))
                    stack.append((event, state))
                    state, linearized = after, marked
                    events.lift(event)
                    event = events.first()
                    continue
            event = events.following(event)
            continue
        # A return whose call is still in the list: this order cannot work.
        if len(stack) >= len(longest):
            longest = tuple(calls[events.call_of[e]].id for e, _ in stack)
            stuck_at = calls[events.call_of[event]].id
        if not stack:
            return CheckResult(Verdict.NOT_LINEARIZABLE, steps, longest, stuck_at)
        top, state = stack.pop()
        linearized &= ~(1 << events.call_of[top])
        events.unlift(top)
        event = events.following(top)
    return CheckResult(Verdict.LINEARIZABLE, steps)
