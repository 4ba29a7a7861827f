"""Benchmark: a reconnect storm against one node, and against a plain TLS server.

Every member certificate of a fresh kit registers with node n1 of a 3-node
cluster at the same instant, as the members of a killed node do when they
move to a survivor. Each attempt has the member's default deadline (5 s,
`register_timeout_ms`); a member whose attempt fails retries after a backoff
(0.5 s, doubling, capped at 8 s, with jitter) until `--deadline`.

The anchor, in the same run, is the same storm of bare mutual TLS handshakes
against the registration benchmark's trivial trio TLS server (same
certificates, same deadlines and retries): a listener that runs every
handshake at once, as gcks did before its handshakes went oldest first.

Real members are separate machines, each working on its own handshake at
once; this load generator is one process. So that its own handshakes do not
advance in lockstep either (which would time them all out whatever the
server did), it orders them strictly oldest first (one turn) with the
`HandshakeTurns` the node uses: each behaves as an independent member
would, on a shared CPU.

Reported per side: successes on the first attempt, the time from the storm's
start until every member was through (null if not all were by the
deadline), attempts, and the time to success of each member (p50, p99).
`ratio` = our first-attempt successes / the anchor's: what a storm destroys
first (null if the anchor had none).

Run: `python -m tests.bench.storm [--members 5000] [--deadline 120]` from the
repository root. The last stdout line is the JSON result. Loopback only; every
process started here is killed on exit.
"""

from __future__ import annotations

import argparse
import json
import random
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from gcks.cluster.handshakes import HandshakeTurns, TurnTakingStream
from gcks.member.session import Session
from gcks.member.tls import verify_node
from gcks.proto.policy import Role
from tests.bench.registration import (
    TICK_MS,
    anchor_servers,
    log,
    member_contexts,
    percentiles,
    run_bench,
)
from tests.cluster.clusterkit import make_kit
from tests.cluster.processes import running_cluster

ATTEMPT_S = 5.0  # the member's default register_timeout_ms
Attempt = Callable[[ssl.SSLContext], Awaitable[None]]


async def _handshake(
    port: int, context: ssl.SSLContext, turns: HandshakeTurns
) -> trio.SSLStream[TurnTakingStream]:
    transport = TurnTakingStream(await trio.open_tcp_stream("127.0.0.1", port), turns)
    stream = trio.SSLStream(transport, context, server_hostname=None)
    try:
        await stream.do_handshake()
        verify_node(stream, "n1")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    finally:
        transport.handshake_done()
    return stream


def registration(port: int, turns: HandshakeTurns) -> Attempt:
    async def attempt(context: ssl.SSLContext) -> None:
        session = Session(await _handshake(port, context, turns), "n1")
        try:
            await session.register(
                "demo", Role.RECEIVER, last_msg_id=0, sender_key=None, timeout_s=ATTEMPT_S
            )
        finally:
            await session.aclose()

    return attempt


def bare_handshake(port: int, turns: HandshakeTurns) -> Attempt:
    async def attempt(context: ssl.SSLContext) -> None:
        stream = await _handshake(port, context, turns)
        try:
            if await stream.receive_some(1) != b"\x01":
                raise ConnectionError("the anchor server did not confirm")
        finally:
            await trio.aclose_forcefully(stream)

    return attempt


async def storm(
    attempt: Attempt, contexts: list[ssl.SSLContext], deadline_s: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    first_ok = attempts = 0
    through: list[float] = []
    start = time.perf_counter()

    async def member(context: ssl.SSLContext) -> None:
        nonlocal first_ok, attempts
        backoff = 0.5
        for number in range(100):
            attempts += 1
            try:
                with trio.fail_after(ATTEMPT_S):
                    await attempt(context)
            except Exception:  # counted: a failed attempt is retried, as a member does
                await trio.sleep(backoff * rng.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 8.0)
                continue
            through.append(time.perf_counter() - start)
            first_ok += number == 0
            return

    with trio.move_on_after(deadline_s):
        async with trio.open_nursery() as nursery:
            for context in contexts:
                nursery.start_soon(member, context)
    return {
        "members": len(contexts),
        "through": len(through),
        "first_attempt_ok": first_ok,
        "attempts": attempts,
        "all_through_s": round(max(through), 2) if len(through) == len(contexts) else None,
        **{k.replace("_ms", "_s"): round(v / 1000, 2) for k, v in percentiles(through).items()},
    }


async def bench(members: int, deadline_s: float, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gcks-bench-storm-") as tmp:
        kit = make_kit(Path(tmp), nodes=3, members=members, tick_ms=TICK_MS)
        contexts = list(member_contexts(kit, kit.member_ids).values())
        async with anchor_servers(kit) as (ports, _), running_cluster(kit) as cluster:
            await cluster.leader(timeout_s=30)
            await cluster.wait_group(timeout_s=30)
            log(f"storm of {members} registrations at node n1 ...")
            ours = await storm(
                registration(kit.ports["n1"]["member"], HandshakeTurns(1)),
                contexts,
                deadline_s,
                seed,
            )
            log(f"storm of {members} bare handshakes at an anchor server ...")
            anchor = await storm(
                bare_handshake(ports["n1"], HandshakeTurns(1)),
                contexts,
                deadline_s,
                seed,
            )
    ratio = None
    if anchor["first_attempt_ok"]:
        ratio = round(ours["first_attempt_ok"] / anchor["first_attempt_ok"], 2)
    return {
        "bench": "storm",
        "results": {**ours, "attempt_deadline_s": ATTEMPT_S},
        "anchor": {"what": "bare mutual TLS 1.3 handshakes, a plain trio server", **anchor},
        "ratio": ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=5000, help="members in the storm")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds per side, at most")
    parser.add_argument("--seed", type=int, default=1, help="seed of the backoff jitter")
    args = parser.parse_args()
    started = time.monotonic()
    result = run_bench(bench, args.members, args.deadline, args.seed)
    log(f"done in {time.monotonic() - started:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
