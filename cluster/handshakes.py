"""Oldest first: the order in which a listener's TLS handshakes get the CPU.

Concurrent handshakes on one event loop advance in lockstep: every step of
every handshake runs before the next step of any, so each handshake takes as
long as all of them together. In a storm (the members of a killed node all
arriving at a survivor) that is past any deadline: every handshake times out,
the members retry, and the next storm does the same. Ordered by age instead,
handshakes finish one after another at the rate the CPU allows, and the
youngest are the ones that wait.

So a handshake runs its CPU steps only with a turn (there are a few), and a
turn given back goes to the oldest connection waiting for one. A handshake
waiting for its peer's bytes holds no turn: a stalled or slow peer delays
nobody (a cap on concurrent handshakes would let a few stalled peers hold
every slot).

`TurnTakingStream` is the transport an `SSLStream` handshakes over: it gives
the turn back whenever the TLS layer goes to the network and takes it again
before the TLS layer computes on bytes that came in. After the handshake it
only passes bytes through.

May import trio only.
"""

from __future__ import annotations

import heapq
import itertools

import trio


class HandshakeTurns:
    """`capacity` handshake steps at a time, oldest connections first."""

    def __init__(self, capacity: int) -> None:
        self._free = capacity
        self._heap: list[int] = []  # tickets waiting; some may have given up
        self._waiting: dict[int, trio.lowlevel.Task] = {}  # tickets still waiting
        self._tickets = itertools.count()

    def ticket(self) -> int:
        """A connection's place in line: lower is older."""
        return next(self._tickets)

    @property
    def waiting(self) -> int:
        """Handshakes with bytes to work on, waiting for the turn."""
        return len(self._waiting)

    async def take(self, ticket: int) -> None:
        if self._free:  # then nobody waits: a turn is handed over when one does
            self._free -= 1  # no checkpoint: a cancellation now would lose the turn
            return
        self._waiting[ticket] = trio.lowlevel.current_task()
        heapq.heappush(self._heap, ticket)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            # Not handed the turn yet (that would have rescheduled us): leave
            # the line; the heap entry is skipped when it comes up.
            del self._waiting[ticket]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def give_back(self) -> None:
        while self._heap:
            task = self._waiting.pop(heapq.heappop(self._heap), None)
            if task is not None:
                trio.lowlevel.reschedule(task)  # handed over: the turn stays held
                return
        self._free += 1


class TurnTakingStream(trio.abc.Stream):
    """A TCP stream that holds `turns` for its TLS handshake's CPU steps."""

    __slots__ = ("_holding", "_ticket", "_turns", "tcp")  # one per member connection

    def __init__(self, tcp: trio.SocketStream, turns: HandshakeTurns) -> None:
        self.tcp = tcp
        self._turns: HandshakeTurns | None = turns
        self._ticket = turns.ticket()
        self._holding = False

    def handshake_done(self) -> None:
        """From now on bytes only pass through; a turn still held goes back."""
        self._leave()
        self._turns = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # Not taken again afterwards: what follows a flight is a wait for the
        # peer's answer, and waiting a turn to find that out would be wasted.
        self._leave()
        await self.tcp.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self._leave()
        data = await self.tcp.receive_some(max_bytes)
        if data:  # nothing to compute on after the peer hung up
            await self._enter()
        return data

    async def wait_send_all_might_not_block(self) -> None:
        await self.tcp.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self.handshake_done()
        await self.tcp.aclose()

    async def _enter(self) -> None:
        if self._turns is not None:
            await self._turns.take(self._ticket)
            self._holding = True

    def _leave(self) -> None:
        if self._holding:
            self._holding = False
            assert self._turns is not None
            self._turns.give_back()
