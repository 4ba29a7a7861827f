"""Leader-side bookkeeping of ReadIndex requests (etcd's ReadOnlySafe).

A read is safe to serve at the commit index it was given only once a quorum
of voters confirmed, *after* the request arrived, that this node is still the
leader. Requests get increasing sequence numbers; each heartbeat round carries
the newest one as its context, and a peer's answer confirms every request up
to that number. The quorum-th highest confirmed number releases requests in
order, one round serving many reads. Pure state: imports only `.quorum` and
`.types`; never builds messages.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from .quorum import committed_index
from .types import NodeId

_SEQ_BYTES = 8


@dataclass(slots=True)
class ReadRequest:
    seq: int
    index: int  # the leader's commit index when the request arrived
    frm: NodeId  # who asked: this node, or a follower that forwarded it
    context: bytes = field(repr=False)


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(_SEQ_BYTES, "big")


def decode_seq(context: bytes) -> int | None:
    """The request number a heartbeat answer confirms, or None for a plain heartbeat."""
    if len(context) != _SEQ_BYTES:
        return None
    return int.from_bytes(context, "big")


class ReadOnly:
    __slots__ = ("_acked", "_next_seq", "_queue")

    def __init__(self) -> None:
        self._queue: deque[ReadRequest] = deque()
        self._acked: dict[NodeId, int] = {}
        self._next_seq = 1

    def add(self, index: int, frm: NodeId, context: bytes) -> int:
        seq = self._next_seq
        self._next_seq += 1
        self._queue.append(ReadRequest(seq, index, frm, context))
        return seq

    def last_seq(self) -> int | None:
        """Newest request still waiting for confirmation (heartbeats carry it)."""
        return self._queue[-1].seq if self._queue else None

    def recv_ack(
        self, frm: NodeId, seq: int, self_id: NodeId, voters: Collection[NodeId]
    ) -> list[ReadRequest]:
        """Record that `frm` confirmed requests up to `seq`; return the requests now safe."""
        if seq > self._acked.get(frm, 0):
            self._acked[frm] = seq
        return self.release(self_id, voters)

    def release(self, self_id: NodeId, voters: Collection[NodeId]) -> list[ReadRequest]:
        if not self._queue:
            return []
        acked = dict(self._acked)
        acked[self_id] = self._next_seq
        confirmed = committed_index(voters, acked)
        done: list[ReadRequest] = []
        queue = self._queue
        while queue and queue[0].seq <= confirmed:
            done.append(queue.popleft())
        return done

    def reset(self) -> None:
        """Leadership lost or regained: pending reads are dropped (clients retry)."""
        self._queue.clear()
        self._acked.clear()
