"""The judgements made after every chaos run, as pure functions of the record.

- lost acknowledgements: the last acknowledged registration or removal of a
  member, with nothing that could have overtaken it, decides whether it is in
  the final member list; no acknowledged rekey is above the final message id;
  the final policy is the last acknowledged update or a later one.
- agreement: for each message id, every member that accepted it (by rekey or
  in a GSA) holds the same KEK and newest-TEK fingerprints.
- monotonic: a member never accepts a rekey id <= its last, nor a GSA older
  than what it holds.
- forward secrecy: an evicted member accepts no message of its eviction or
  after it.
- linearizability of membership operations (`linearizability.check`).

Convergence and process deaths are observed live by the harness and reported
through `Violation` too. Pure computation over `History`; no I/O.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from tests.chaos.history import History, Op, Outcome
from tests.chaos.linearizability import Call, CheckResult, MembershipModel, Verdict, check


@dataclass(frozen=True, slots=True)
class Violation:
    check: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.message}"


@dataclass(frozen=True, slots=True)
class FinalState:
    """What the cluster holds at the end (from linearizable admin reads)."""

    members: frozenset[str]
    msg_id: int
    retransmit_count: int


_ADDS = ("register",)
_REMOVES = ("deregister", "evict")


def _end(op: Op) -> float:
    return math.inf if op.outcome is not Outcome.OK or op.complete is None else op.complete


def _might_follow(op: Op, anchor: Op) -> bool:
    """True unless `op` certainly completed before `anchor` was invoked."""
    return _end(op) > anchor.invoke


def check_lost_acknowledgements(history: History, final: FinalState) -> list[Violation]:
    violations: list[Violation] = []
    by_member: dict[str, list[Op]] = defaultdict(list)
    for op in history.ops:
        if (
            op.member is not None
            and op.kind in (*_ADDS, *_REMOVES)
            and op.outcome is not Outcome.FAIL
        ):
            by_member[op.member].append(op)
    for member, ops in sorted(by_member.items()):
        acked = [op for op in ops if op.outcome is Outcome.OK]
        if not acked:
            continue
        last = max(acked, key=_end)
        rivals = [
            op for op in ops if op is not last and op.kind != last.kind and _might_follow(op, last)
        ]
        if rivals:
            continue
        if last.kind in _ADDS and member not in final.members:
            violations.append(
                Violation(
                    "lost-ack",
                    f"registration of {member} (op {last.index}) acknowledged, "
                    "never undone, but it is not a member at the end",
                )
            )
        if last.kind in _REMOVES and member in final.members:
            violations.append(
                Violation(
                    "lost-ack",
                    f"{last.kind} of {member} (op {last.index}) acknowledged, "
                    "never undone, but it is still a member at the end",
                )
            )
    acked_ids = [
        int(i)
        for op in history.ops
        if op.kind in ("rekey", "evict") and op.outcome is Outcome.OK
        for i in op.value or ()
    ]
    if acked_ids and max(acked_ids) > final.msg_id:
        violations.append(
            Violation(
                "lost-ack",
                f"rekey message {max(acked_ids)} acknowledged, "
                f"but the group's final message id is {final.msg_id}",
            )
        )
    updates = [op for op in history.ops if op.kind == "policy" and op.outcome is not Outcome.FAIL]
    acked_updates = [op for op in updates if op.outcome is Outcome.OK]
    if acked_updates:
        last = max(acked_updates, key=_end)
        allowed = {op.value for op in updates if op is last or _might_follow(op, last)}
        if (str(final.retransmit_count),) not in allowed:
            violations.append(
                Violation(
                    "lost-ack",
                    f"policy update (op {last.index}) acknowledged, but the "
                    f"final retransmit_count {final.retransmit_count} was never set after it",
                )
            )
    return violations


def check_agreement(history: History) -> list[Violation]:
    seen: dict[int, dict[tuple[str, str | None], list[str]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for event in history.key_events:
        seen[event.msg_id][(event.kek, event.tek)].append(event.member)
    violations = []
    for msg_id, views in sorted(seen.items()):
        if len(views) > 1:
            described = "; ".join(
                f"kek {kek} tek {tek}: {sorted(set(members))}"
                for (kek, tek), members in views.items()
            )
            violations.append(Violation("agreement", f"message id {msg_id}: {described}"))
    return violations


def check_monotonic(history: History) -> list[Violation]:
    last: dict[str, int] = {}
    violations = []
    for event in history.key_events:
        before = last.get(event.member)
        is_gsa = event.how.startswith("gsa")
        if before is not None and (
            event.msg_id < before or (not is_gsa and event.msg_id == before)
        ):
            violations.append(
                Violation(
                    "monotonic",
                    f"{event.member} accepted {event.msg_id} after {before} ({event.how})",
                )
            )
        last[event.member] = max(event.msg_id, before or 0)
    return violations


def check_forward_secrecy(history: History) -> list[Violation]:
    """An acknowledged eviction names the message that rekeys the member out."""
    violations = []
    for op in history.ops:
        if op.kind != "evict" or op.outcome is not Outcome.OK or not op.value:
            continue
        first = min(int(i) for i in op.value)
        if any(
            other.kind == "register"
            and other.member == op.member
            and other.outcome is Outcome.OK
            and _might_follow(other, op)
            for other in history.ops
        ):
            continue  # it was not a member when the eviction applied: no ban
        for event in history.key_events:
            if event.member == op.member and event.msg_id >= first:
                violations.append(
                    Violation(
                        "forward-secrecy",
                        f"{op.member} was evicted by message {first} "
                        f"but accepted message {event.msg_id} ({event.how})",
                    )
                )
    return violations


def membership_calls(history: History) -> list[Call]:
    """The membership operations that may have taken effect, as checker calls.
    An operation still open (no outcome yet) is as unknown as an INFO one."""
    actions = {"register": "add", "deregister": "remove", "evict": "evict"}
    calls = []
    for op in history.ops:
        if op.outcome is Outcome.FAIL:
            continue
        complete = op.complete if op.outcome is Outcome.OK else None
        if op.kind == "read":
            if op.outcome is Outcome.OK and op.value is not None:
                calls.append(
                    Call(op.index, op.invoke, complete, "read", result=frozenset(op.value))
                )
        elif op.kind in actions:
            calls.append(Call(op.index, op.invoke, complete, actions[op.kind], op.member))
    return calls


def check_linearizable(
    history: History, max_steps: int = 5_000_000
) -> tuple[CheckResult, list[Violation]]:
    result = check(membership_calls(history), MembershipModel(), max_steps=max_steps)
    if result.verdict is Verdict.NOT_LINEARIZABLE:
        tail = ", ".join(str(i) for i in result.longest_prefix[-8:])
        return result, [
            Violation(
                "linearizable",
                f"membership history is not linearizable: stuck at op "
                f"{result.stuck_at} after ... {tail}",
            )
        ]
    return result, []


def check_history(history: History, final: FinalState) -> tuple[CheckResult, list[Violation]]:
    """Every post-run check over the record; the linearizability result besides."""
    result, violations = check_linearizable(history)
    violations = [
        *check_lost_acknowledgements(history, final),
        *check_agreement(history),
        *check_monotonic(history),
        *check_forward_secrecy(history),
        *violations,
    ]
    return result, violations
