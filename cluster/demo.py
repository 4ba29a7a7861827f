"""`gcks demo`: a whole cluster on loopback, in one command, in under a minute.

Lays out throwaway certificates and configurations in a temporary directory
(`gcks dev init`), starts three `gcks node` processes and several
`gcks-member` processes, and narrates what happens: which node each member
chose and the round-trip times it measured, protected data flowing, an
eviction and its rekey, the leader killed and the cluster carrying on. It
ends with a summary and exits 0 only if every step worked and every member
holds the same keys as the nodes. Every process is killed and the directory
removed on the way out, on Ctrl-C too.

Members run as separate processes speaking the public CLI (`gcks-member
--json`), so this module imports nothing from `gcks.member`.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from gcks.cluster.admin import AdminClient, AdminError
from gcks.cluster.devinit import dev_init
from gcks.cluster.tls import admin_client_context

NODES: Final = ("n1", "n2", "n3")
TIMEOUT_S: Final = 55.0
Event = dict[str, Any]


class DemoFailed(Exception):
    """A step of the demo did not happen in time."""


def script(name: str) -> str:
    """The console script `name` installed beside this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name) or name


@dataclass
class MemberProc:
    name: str
    process: trio.Process
    events: list[Event] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def last(self, *kinds: str) -> Event:
        return next((e for e in reversed(self.events) if e.get("event") in kinds), {})

    async def wait_for(self, predicate: Callable[[Event], bool], timeout_s: float) -> Event:
        seen = 0
        with trio.move_on_after(timeout_s):
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                await self.changed.wait()
        raise DemoFailed(f"{self.name}: the expected event did not come in {timeout_s:.0f} s")


def _tek(event: Event) -> str:
    # A joiner's first TEK waits for its activation time, so receivers learn it first.
    return str(event["tek"]) if event["tek"] is not None else "not active yet"


def is_event(kind: str) -> Callable[[Event], bool]:
    return lambda event: event.get("event") == kind


class Demo:
    def __init__(self, root: Path, base_port: int, say: Callable[[str], None]) -> None:
        self.root = root
        self.base_port = base_port
        self.say = say
        self.nodes: dict[str, trio.Process] = {}
        self.members: dict[str, MemberProc] = {}
        self.rekeys: set[int] = set()
        self.failovers = 0
        self._admin_context = admin_client_context(
            cluster_ca=root / "pki/ca/cluster.crt",
            cert=root / "pki/admin/admin.crt",
            key=root / "pki/admin/admin.key",
        )

    # ------------------------------------------------------------- processes

    async def start_node(self, node_id: str) -> None:
        with (self.root / f"{node_id}.log").open("ab") as log:
            self.nodes[node_id] = await trio.lowlevel.open_process(
                [script("gcks"), "node", "--config", str(self.root / f"{node_id}.toml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def start_member(self, nursery: trio.Nursery, name: str, *args: str) -> MemberProc:
        config = str(self.root / f"{name}.toml")
        with (self.root / f"{name}.log").open("ab") as log:
            process = await trio.lowlevel.open_process(
                [script("gcks-member"), *args, "--config", config, "--json"],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        member = MemberProc(name, process)
        self.members[name] = member
        nursery.start_soon(self._read_events, member)
        return member

    async def _read_events(self, member: MemberProc) -> None:
        assert member.process.stdout is not None
        buffer = b""
        async for chunk in member.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    member.events.append(event)
                    self._narrate(member.name, event)
                    member.changed.set()
                    member.changed = trio.Event()

    def _narrate(self, name: str, event: Event) -> None:
        kind = event.get("event")
        if kind == "registered":
            rtts = ", ".join(f"{n} {ms:.2f} ms" for n, ms in sorted(event["rtt_ms"].items()))
            self.say(
                f"  {name} registered with {event['node']} (RTT {rtts}); "
                f"message {event['msg_id']}, KEK {event['kek']}, TEK {_tek(event)}"
            )
        elif kind == "rekey":
            self.rekeys.add(int(event["msg_id"]))
            self.say(
                f"  {name} accepted rekey {event['msg_id']} via {event['node']}: "
                f"KEK {event['kek']}, TEK {_tek(event)}"
            )
        elif kind == "failover":
            self.failovers += 1
            self.say(f"  {name} failed over {event['from']} -> {event['to']}: {event['reason']}")
        elif kind == "data":
            self.say(f"  {name} decrypted from sender {event['sender_id']}: {event['payload']!r}")
        elif kind == "resync":
            self.say(f"  {name} cannot follow, re-registers: {event.get('reason')}")
        elif kind == "left":
            self.say(f"  {name} left: {event.get('reason', '')}")

    async def stop_all(self) -> None:
        processes = [*(m.process for m in self.members.values()), *self.nodes.values()]
        for process in processes:
            if process.returncode is None:
                process.kill()
        for process in processes:
            await process.wait()

    # ------------------------------------------------------------------ admin

    def _alive(self) -> list[str]:
        return [n for n, p in self.nodes.items() if p.returncode is None]

    async def _call(self, node_id: str, op: str, args: dict[str, object]) -> Any:
        port = self.base_port + 400 + NODES.index(node_id) + 1
        client = await AdminClient.connect("127.0.0.1", port, self._admin_context, 3)
        try:
            return await client.call(op, args, timeout_s=10)
        finally:
            await client.aclose()

    async def admin(self, op: str, args: dict[str, object] | None = None) -> Any:
        """One admin request, to whichever live node completes it."""
        error = "timeout"
        with trio.move_on_after(20):
            while True:
                for node_id in self._alive():
                    try:
                        return await self._call(node_id, op, args or {})
                    except (AdminError, OSError, trio.TooSlowError) as exc:
                        error = str(exc) or type(exc).__name__
                await trio.sleep(0.2)
        raise DemoFailed(f"admin {op} failed: {error}")

    async def statuses(self) -> list[Event]:
        rows = []
        for node_id in self._alive():
            try:
                rows.append(await self._call(node_id, "status", {}))
            except (AdminError, OSError, trio.TooSlowError):
                continue
        return rows

    async def leader(self, want: str | None = None) -> str:
        """The leader every live node agrees on (and has the group), or `want`."""
        with trio.move_on_after(20):
            while True:
                rows = await self.statuses()
                leaders = {row.get("leader") for row in rows}
                ready = rows and all("demo" in row["groups"] for row in rows)
                if ready and len(leaders) == 1:
                    leader = leaders.pop()
                    if leader in self._alive() and want in (None, leader):
                        return str(leader)
                await trio.sleep(0.1)
        raise DemoFailed("no leader elected within 20 s" if want is None else f"no move to {want}")

    # -------------------------------------------------------------------- run

    async def run(self) -> bool:
        say = self.say
        async with trio.open_nursery() as nursery:
            say("1. Starting three GCKS nodes on 127.0.0.1 (Raft over mutual TLS 1.3)")
            for node_id in NODES:
                await self.start_node(node_id)
            leader = await self.leader()
            say(f"  leader elected: {leader}; group 'demo' created through consensus")

            say("2. Members probe every node and register with the nearest")
            watchers = [
                await self.start_member(nursery, name, "join") for name in ("m3", "m4", "m5")
            ]
            for member in watchers:
                await member.wait_for(is_event("registered"), 20)

            say("3. Protected data: m1 sends, m2 decrypts (AES-256-GCM under the group's TEK)")
            receiver = await self.start_member(nursery, "m2", "recv", "--count", "3")
            await receiver.wait_for(is_event("registered"), 20)
            await self.start_member(
                nursery, "m1", "send", "--count", "3", "--interval-ms", "400", "--ttl", "0"
            )
            await receiver.wait_for(is_event("data_stats"), 25)

            say("4. Evicting m5: the cluster rekeys; m5 cannot follow and stays out")
            before = max(m.last("registered", "rekey").get("msg_id", 0) for m in watchers)
            await self.admin("member.evict", {"group": "demo", "member": "m5"})

            def newer(event: Event, b: int = before) -> bool:
                return event.get("event") == "rekey" and event["msg_id"] > b

            for member in watchers[:2]:
                await member.wait_for(newer, 20)
            await watchers[2].wait_for(is_event("left"), 20)

            # Kill the leader where a member is attached, so the demo shows both
            # a new election and a member failing over.
            target = watchers[0].last("registered").get("node", leader)
            if target != leader:
                await self.admin("cluster.transfer-leader", {"node": target})
                leader = await self.leader(want=target)
            say(f"5. Killing the leader {leader} (m3 is attached to it) with SIGKILL")
            self.nodes[leader].send_signal(signal.SIGKILL)
            await self.nodes[leader].wait()
            new_leader = await self.leader()
            say(f"  new leader: {new_leader}; forcing a rekey through the survivors")
            result = await self.admin("rekey", {"group": "demo"})
            msg_id = max(result["msg_ids"])

            def caught_up(event: Event, m: int = msg_id) -> bool:
                return event.get("event") in ("registered", "rekey") and event["msg_id"] >= m

            for member in watchers[:2]:
                await member.wait_for(caught_up, 25)

            rows = await self.statuses()
            keks = {row["groups"]["demo"]["kek"] for row in rows}
            held = {m.last("registered", "rekey").get("kek") for m in watchers[:2]}
            agree = len(keks) == 1 and held == keks
            say("Summary")
            verdict = "yes" if agree else "NO"
            say(f"  members agree with the nodes on the KEK: {verdict} ({', '.join(sorted(keks))})")
            say(f"  rekeys accepted: {len(self.rekeys)}; failovers: {self.failovers}")
            nursery.cancel_scope.cancel()
        return agree


def _free_base_port() -> int:
    """A base port whose ports (see `gcks dev init`) are free on 127.0.0.1 now."""
    offsets = [k * 100 + i for k in range(5) for i in (1, 2, 3)] + [500, 501]
    for base in range(20_000, 60_000, 1000):
        try:
            for offset in offsets:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise DemoFailed("no free block of ports on 127.0.0.1")


def run_demo(say: Callable[[str], None] = print) -> int:
    """Run the demo; 0 only if every step worked and all keys agree."""
    root = Path(tempfile.mkdtemp(prefix="gcks-demo-"))
    failure: BaseException | None = None
    agree = False
    try:
        base = _free_base_port()
        dev_init(root / "cluster", nodes=len(NODES), members=5, base_port=base, force=True)
        demo = Demo(root / "cluster", base, say)

        async def main() -> bool:
            try:
                with trio.fail_after(TIMEOUT_S):
                    return await demo.run()
            finally:
                with trio.CancelScope(shield=True):
                    await demo.stop_all()

        agree = trio.run(main)
    except* (DemoFailed, trio.TooSlowError, OSError) as group:
        failure = group.exceptions[0]
    except* KeyboardInterrupt:
        failure = KeyboardInterrupt("interrupted")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    while isinstance(failure, BaseExceptionGroup):
        failure = failure.exceptions[0]
    if failure is not None:
        say(f"demo failed: {failure or 'it took longer than the time limit'}")
        return 1
    say("demo OK" if agree else "demo FAILED: members and nodes disagree on the keys")
    return 0 if agree else 1
