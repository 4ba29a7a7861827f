"""The record of a chaos run: every client operation with invoke and completion
times and its outcome, and every key event members observed.

An operation is OK (it took effect and the client was told so), FAIL (the
client was told it did not take effect: a refusal before any proposal), or
INFO (unknown: a timeout or a lost connection; it may or may not have taken
effect, at any time after its invocation). This is the vocabulary of Jepsen
histories, which the linearizability checker and the checks read.

Pure data and bookkeeping; may import the standard library only. Never holds
key material: key events carry fingerprints.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


class Outcome(enum.StrEnum):
    OK = "ok"
    FAIL = "fail"
    INFO = "info"


@dataclass(slots=True)
class Op:
    """One client operation. `kind` is register, deregister, evict, read,
    rekey or policy; `member` the member it is about (reads: none); `value`
    what a read returned (sorted member ids) or what an admin change set."""

    index: int
    client: str
    kind: str
    member: str | None
    invoke: float
    complete: float | None = None
    outcome: Outcome | None = None
    value: tuple[str, ...] | None = None
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.outcome is not None


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """A member accepted a group state: at registration (`how` = "gsa") or by a
    rekey. `tek` is the newest TEK's fingerprint (None: no TEK)."""

    member: str
    at: float
    msg_id: int
    kek: str
    tek: str | None
    how: str


@dataclass(slots=True)
class History:
    """Operations and key events of one run, in the order they were recorded."""

    ops: list[Op] = field(default_factory=list)
    key_events: list[KeyEvent] = field(default_factory=list)

    def invoke(self, client: str, kind: str, member: str | None, now: float) -> Op:
        op = Op(len(self.ops), client, kind, member, now)
        self.ops.append(op)
        return op

    @staticmethod
    def complete(
        op: Op,
        outcome: Outcome,
        now: float,
        *,
        value: tuple[str, ...] | None = None,
        detail: str = "",
    ) -> None:
        assert op.outcome is None, f"operation {op.index} completed twice"
        op.outcome, op.complete, op.value, op.detail = outcome, now, value, detail

    def close(self, now: float) -> None:
        """Operations still open at the end are unknown (INFO)."""
        for op in self.ops:
            if op.outcome is None:
                self.complete(op, Outcome.INFO, now, detail="still open at the end")

    def counts(self) -> dict[str, dict[str, int]]:
        """kind -> outcome -> count, for the summary."""
        table: dict[str, dict[str, int]] = {}
        for op in self.ops:
            row = table.setdefault(op.kind, {})
            key = str(op.outcome or "open")
            row[key] = row.get(key, 0) + 1
        return table

    def dump(self, path: Path) -> None:
        """One JSON object a line: operations, then key events (for a post-mortem)."""
        with path.open("w") as out:
            for op in self.ops:
                out.write(json.dumps({"op": asdict(op)}) + "\n")
            for event in self.key_events:
                out.write(json.dumps({"key": asdict(event)}) + "\n")
