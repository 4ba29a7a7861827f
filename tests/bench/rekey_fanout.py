"""Benchmark: eviction rekey fan-out, from the admin request to the last member holding the new KEK.

Three `gcks node` processes (a fresh cluster per size, product Raft timing);
members live in this process as real registration sessions (TLS 1.3, one
connection each, spread round robin over the nodes), each keeping a
`GroupKeys` current from the rekey datagrams the nodes push over its
connection (the unicast path, which works where multicast does not). The
members first all register, then each registers once more for a current GSA
and starts applying pushes (see `Members.add`: otherwise this one process
would verify every join rekey for every member). With size + `--evictions`
members in the group (sizes 200 and 1,000), an administrator evicts one
member `--evictions` times; each time
is measured from sending the `member.evict` request (to the leader's admin
API) to the moment the last remaining member has accepted the message that
carries the new KEK (its message id is the first of those the admin answer
names). p50/p99 over the evictions, per size, plus the first member's time.

The policy batch interval (coalescing) is part of the path and reported.
Every member decrypts, verifies and unwraps in this one process, so at 1,000
members the figure includes 1,000 signature checks on the client side.

Run: `python -m tests.bench.rekey_fanout [--sizes 200,1000] [--evictions 10]`
from the repository root. The last stdout line is the JSON result; every
process started here is killed on exit, error or Ctrl-C. Loopback only.

May import trio, `gcks` and the cluster test kits. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import functools
import json
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from gcks.member.group import GroupKeys, Outcome
from gcks.member.session import Session, SessionError
from gcks.proto.messages import GsaAnswer
from gcks.proto.policy import Role
from tests.bench.registration import (
    TICK_MS,
    TIMEOUT_S,
    log,
    member_contexts,
    percentiles,
    run_bench,
)
from tests.cluster.clusterkit import Kit, admin_call, make_kit
from tests.cluster.processes import running_cluster

REGISTER_CONCURRENCY = 50
REGISTER_ATTEMPTS = 3
DEACTIVATION_MS = 10_000  # the policy default, set explicitly
FANOUT_TIMEOUT_S = 60.0
PAUSE_S = 0.3  # between evictions, so that two batches never merge


async def bounded(jobs: list[Callable[[], Awaitable[None]]]) -> None:
    """Run `jobs`, `REGISTER_CONCURRENCY` at a time."""
    limit = trio.Semaphore(REGISTER_CONCURRENCY)

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        try:
            await job()
        finally:
            limit.release()

    async with trio.open_nursery() as nursery:
        for job in jobs:
            await limit.acquire()
            nursery.start_soon(run, job)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Members:
    """In-process members: registered sessions applying pushed rekeys."""

    def __init__(self, kit: Kit, contexts: dict[str, ssl.SSLContext]) -> None:
        self._kit = kit
        self._contexts = contexts
        self.keys: dict[str, GroupKeys] = {}
        # member -> (message id it reached, when), in order; a resync jumps ahead.
        self.reached: dict[str, list[tuple[int, float]]] = {}
        self.resyncs = 0
        self.retries = 0
        self.reconnects = 0
        self.evicted: set[str] = set()
        self._changed = trio.Event()

    async def add(self, nursery: trio.Nursery, member_ids: list[str]) -> None:
        """Register `member_ids`, then bring each up to date and keep it listening.

        Every join batch makes a rekey that the nodes push to every attached
        member; were the members already applying them, this one process would
        verify O(n^2 / batch) signatures while they join. So each member first
        only registers (pushes stay unread), then, once all are in, registers
        again (a re-registration: no tree change, no rekey) for a current GSA
        and starts applying pushes."""
        sessions: dict[str, Session] = {}

        async def first(i: int, mid: str) -> None:
            sessions[mid], _ = await self._register(mid, i)

        async def again(i: int, mid: str) -> None:
            try:
                gsa = await sessions[mid].register(
                    "demo", Role.RECEIVER, last_msg_id=0, sender_key=None, timeout_s=TIMEOUT_S
                )
            except SessionError:
                # Its unread pushes overflowed the node's queue for it: cut off, as
                # designed. A fresh connection is the same re-registration.
                self.reconnects += 1
                await sessions[mid].aclose()
                sessions[mid], gsa = await self._register(mid, i)
            self.keys[mid] = GroupKeys(gsa, now_ms=now_ms())
            self.reached[mid] = []
            nursery.start_soon(self._listen, mid, sessions[mid])

        await bounded([functools.partial(first, i, m) for i, m in enumerate(member_ids)])
        # Every join batch made a TEK that stays valid for the deactivation delay;
        # a re-registration gets them all, and a GSA holds at most 64 (a product
        # limit that a join burst exceeds): let them expire first.
        await trio.sleep(DEACTIVATION_MS / 1000 + 1)
        await bounded([functools.partial(again, i, m) for i, m in enumerate(member_ids)])

    async def _register(self, mid: str, i: int) -> tuple[Session, GsaAnswer]:
        """A registered session of `mid` and its GSA (nodes round robin), retried like
        a member would."""
        for attempt in range(REGISTER_ATTEMPTS):
            node = self._kit.node_ids[(i + attempt) % len(self._kit.node_ids)]
            try:
                session = await Session.connect(
                    "127.0.0.1",
                    self._kit.ports[node]["member"],
                    self._contexts[mid],
                    expected_node=node,
                    timeout_s=TIMEOUT_S,
                )
            except SessionError:
                self.retries += 1
                continue
            try:
                gsa = await session.register(
                    "demo", Role.RECEIVER, last_msg_id=0, sender_key=None, timeout_s=TIMEOUT_S
                )
            except SessionError:
                self.retries += 1
                await session.aclose()
                continue
            return session, gsa
        raise SessionError(f"{mid} could not register in {REGISTER_ATTEMPTS} attempts")

    def _reach(self, mid: str, msg_id: int) -> None:
        self.reached[mid].append((msg_id, time.perf_counter()))
        self._changed.set()

    async def _listen(self, mid: str, session: Session) -> None:
        try:
            async for datagram in session.pushes():
                result = self.keys[mid].handle_rekey(datagram, now_ms())
                if result.outcome is Outcome.ACCEPTED:
                    self._reach(mid, result.msg_id)
                elif result.outcome in (Outcome.RESYNC, Outcome.AHEAD) and mid not in self.evicted:
                    # What a real member does on a gap: register again for a fresh GSA.
                    self.resyncs += 1
                    gsa = await session.register(
                        "demo",
                        Role.RECEIVER,
                        last_msg_id=self.keys[mid].msg_id,
                        sender_key=None,
                        timeout_s=TIMEOUT_S,
                    )
                    self.keys[mid] = GroupKeys(gsa, now_ms=now_ms())
                    self._reach(mid, gsa.msg_id)
        finally:
            await session.aclose()

    async def settle(self) -> None:
        """Until every remaining member holds the same message id (resyncs done)."""
        with trio.fail_after(FANOUT_TIMEOUT_S):
            while len({k.msg_id for m, k in self.keys.items() if m not in self.evicted}) > 1:
                await trio.sleep(0.1)

    def _when(self, mid: str, msg_id: int) -> float | None:
        return next((t for m, t in self.reached[mid] if m >= msg_id), None)

    async def wait_all(self, msg_id: int) -> tuple[float, float]:
        """(first, last) time a remaining member reached `msg_id` (accepted it, or a
        later one by resync)."""
        with trio.move_on_after(FANOUT_TIMEOUT_S):
            while True:
                remaining = [m for m in self.keys if m not in self.evicted]
                times = [t for m in remaining if (t := self._when(m, msg_id)) is not None]
                if len(times) == len(remaining):
                    return min(times), max(times)
                self._changed = trio.Event()
                await self._changed.wait()
        missing = {
            m: self.keys[m].msg_id
            for m in self.keys
            if m not in self.evicted and self._when(m, msg_id) is None
        }
        raise RuntimeError(
            f"{len(missing)} members never accepted message {msg_id} within "
            f"{FANOUT_TIMEOUT_S} s (their message ids: {sorted(set(missing.values()))[:10]}, "
            f"e.g. {sorted(missing)[:5]}; resyncs {self.resyncs})"
        )


async def fanout(root: Path, size: int, evictions: int, batch_ms: int) -> dict[str, Any]:
    """A fresh cluster, `size + evictions` members, `evictions` evictions."""
    total = size + evictions
    await trio.Path(root).mkdir(parents=True)
    log(f"{size}: issuing {total} member certificates ...")
    kit = make_kit(
        root,
        nodes=3,
        members=total,
        tick_ms=TICK_MS,
        group={"batch_interval_ms": batch_ms, "deactivation_delay_ms": DEACTIVATION_MS},
    )
    contexts = member_contexts(kit, kit.member_ids)
    async with running_cluster(kit) as cluster, trio.open_nursery() as nursery:
        await cluster.leader(timeout_s=30)
        await cluster.wait_group(timeout_s=30)
        members = Members(kit, contexts)
        started = time.perf_counter()
        await members.add(nursery, list(kit.member_ids))
        await members.settle()
        log(f"  {total} members registered and current in {time.perf_counter() - started:.1f} s")
        samples, firsts = [], []
        for k in range(evictions):
            victim = kit.member_ids[k]
            leader = await cluster.leader(timeout_s=30)
            await trio.sleep(PAUSE_S)
            start = time.perf_counter()
            members.evicted.add(victim)
            answer = await admin_call(
                kit, leader, "member.evict", {"group": "demo", "member": victim}
            )
            first, last = await members.wait_all(min(answer["msg_ids"]))
            samples.append(last - start)
            firsts.append(first - start)
            log(
                f"  n={total - k} eviction {k + 1}: last member has the new KEK "
                f"after {(last - start) * 1000:.0f} ms (first {(first - start) * 1000:.0f})"
            )
        nursery.cancel_scope.cancel()
    return {
        "members_before_eviction": f"{total}..{size + 1}",
        "evictions": len(samples),
        "last_member": percentiles(samples),
        "first_member": percentiles(firsts),
        "resyncs": members.resyncs,
        "registration_retries": members.retries,
        "cut_off_while_idle": members.reconnects,
    }


async def bench(sizes: list[int], evictions: int, batch_ms: int) -> dict[str, Any]:
    results: dict[str, Any] = {"batch_interval_ms": batch_ms, "nodes": 3, "tick_ms": TICK_MS}
    with tempfile.TemporaryDirectory(prefix="gcks-bench-fanout-") as tmp:
        for size in sizes:
            results[str(size)] = await fanout(Path(tmp) / str(size), size, evictions, batch_ms)
    return {
        "bench": "rekey_fanout",
        "results": results,
        "anchor": {
            "none": "no comparable system; the batch interval is the floor",
            "batch_interval_ms": batch_ms,
        },
        "ratio": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,1000", help="member counts, ascending")
    parser.add_argument("--evictions", type=int, default=10, help="evictions per size")
    parser.add_argument("--batch-ms", type=int, default=50, help="policy batch interval")
    args = parser.parse_args()
    started = time.monotonic()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    result = run_bench(bench, sizes, args.evictions, args.batch_ms)
    log(f"done in {time.monotonic() - started:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
