"""Oldest-first handshake turns: who computes next, and who holds nothing."""

from __future__ import annotations

from typing import cast

import trio
import trio.testing

from gcks.cluster.handshakes import HandshakeTurns, TurnTakingStream


async def _take_and_record(
    turns: HandshakeTurns, ticket: int, order: list[int], scope: trio.CancelScope | None
) -> None:
    with scope or trio.CancelScope():
        await turns.take(ticket)
        order.append(ticket)
        turns.give_back()


async def _queue(
    nursery: trio.Nursery,
    turns: HandshakeTurns,
    tickets: list[int],
    order: list[int],
    scopes: dict[int, trio.CancelScope] | None = None,
) -> None:
    """Start a task per ticket, in the order given, each waiting in line for the turn."""
    for ticket in tickets:
        scope = (scopes or {}).get(ticket)
        nursery.start_soon(_take_and_record, turns, ticket, order, scope)
        await trio.testing.wait_all_tasks_blocked()


async def test_the_turn_goes_to_the_oldest_ticket_waiting_not_the_first_to_ask() -> None:
    turns = HandshakeTurns(capacity=1)
    await turns.take(100)
    order: list[int] = []
    async with trio.open_nursery() as nursery:
        await _queue(nursery, turns, [7, 3, 9, 5], order)
        turns.give_back()  # the test's own turn
    assert order == [3, 5, 7, 9]
    assert turns.waiting == 0
    with trio.fail_after(5):
        await turns.take(0)  # free again: taken at once
    turns.give_back()


async def test_a_waiter_cancelled_before_its_turn_is_skipped() -> None:
    turns = HandshakeTurns(capacity=1)
    await turns.take(100)
    order: list[int] = []
    gave_up = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        await _queue(nursery, turns, [1, 2], order, {1: gave_up})
        assert turns.waiting == 2
        gave_up.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert turns.waiting == 1
        turns.give_back()
    assert order == [2]


async def test_a_waiter_cancelled_just_before_the_hand_over_does_not_get_the_turn() -> None:
    turns = HandshakeTurns(capacity=1)
    await turns.take(100)
    order: list[int] = []
    first = trio.CancelScope()
    with trio.fail_after(5):  # a turn given to the cancelled waiter would hang ticket 2
        async with trio.open_nursery() as nursery:
            await _queue(nursery, turns, [1, 2], order, {1: first})
            first.cancel()  # ticket 1 is cancelled, and before it runs again ...
            turns.give_back()  # ... the turn is given back: it must go to ticket 2
        await turns.take(0)  # nobody holds it now
    assert order == [2]


async def test_up_to_capacity_steps_run_at_once_and_the_next_waits() -> None:
    turns = HandshakeTurns(capacity=3)
    for ticket in range(3):
        with trio.fail_after(5):
            await turns.take(ticket)
    order: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_take_and_record, turns, 7, order, None)
        await trio.testing.wait_all_tasks_blocked()
        assert turns.waiting == 1
        assert order == []
        turns.give_back()
    assert order == [7]
    for _ in range(2):
        turns.give_back()
    with trio.fail_after(5):
        for ticket in range(3):
            await turns.take(ticket)  # all three free again


async def test_a_handshake_waiting_for_its_peer_holds_no_turn() -> None:
    turns = HandshakeTurns(capacity=1)
    _peer, ours = trio.testing.memory_stream_pair()
    stream = TurnTakingStream(cast(trio.SocketStream, ours), turns)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.receive_some)  # the peer sends nothing
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(1):
            await turns.take(0)  # free: the silent peer holds nothing
        turns.give_back()
        nursery.cancel_scope.cancel()


async def test_bytes_from_the_peer_are_worked_on_only_with_the_turn() -> None:
    turns = HandshakeTurns(capacity=1)
    peer, ours = trio.testing.memory_stream_pair()
    stream = TurnTakingStream(cast(trio.SocketStream, ours), turns)
    received: list[bytes] = []

    async def handshake_step() -> None:
        received.append(bytes(await stream.receive_some()))

    await turns.take(-1)  # an older handshake is computing
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_step)
        await peer.send_all(b"ClientHello")
        await trio.testing.wait_all_tasks_blocked()
        assert received == []
        assert turns.waiting == 1
        turns.give_back()
    assert received == [b"ClientHello"]
    stream.handshake_done()  # gives the turn back
    with trio.fail_after(5):
        await turns.take(0)
    turns.give_back()
    await peer.send_all(b"after")
    assert await stream.receive_some() == b"after", "after the handshake: passes through"


async def test_a_turn_taken_for_the_peers_bytes_is_given_back_while_waiting_for_more() -> None:
    turns = HandshakeTurns(capacity=1)
    peer, ours = trio.testing.memory_stream_pair()
    stream = TurnTakingStream(cast(trio.SocketStream, ours), turns)
    await peer.send_all(b"ClientHello")
    await stream.receive_some()  # computing on it: holds the turn
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.receive_some)  # the next flight of the peer
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            await turns.take(0)  # free while it waits
        turns.give_back()
        nursery.cancel_scope.cancel()


async def test_a_turn_handed_over_is_not_also_freed() -> None:
    turns = HandshakeTurns(capacity=1)
    await turns.take(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(turns.take, 1)
        await trio.testing.wait_all_tasks_blocked()
        turns.give_back()  # to ticket 1, which keeps it
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(turns.take, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert turns.waiting == 1, "a second holder got the one turn"
        nursery.cancel_scope.cancel()


async def test_a_peer_that_hung_up_does_not_queue_for_a_turn() -> None:
    turns = HandshakeTurns(capacity=1)
    peer, ours = trio.testing.memory_stream_pair()
    stream = TurnTakingStream(cast(trio.SocketStream, ours), turns)
    await turns.take(-1)
    await peer.aclose()
    with trio.fail_after(5):
        assert await stream.receive_some() == b""
    assert turns.waiting == 0
    turns.give_back()
