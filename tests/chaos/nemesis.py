"""The nemesis: seeded faults against real node processes and their links.

One fault at a time, chosen by a seeded RNG: SIGKILL a node (the leader or
any) and restart it on its data directory; isolate the leader; isolate a
minority; cut the leader's outbound links only (one-way); SIGSTOP/SIGCONT a
node; add latency to every peer link; wipe a node (admin remove-node, kill,
delete its data directory, start it empty, admin add-node: it must catch up
by snapshot). Each fault is held a random time, then healed, and logged with
its start and end. `expected_down` tells the process watcher which nodes the
nemesis has stopped on purpose.

Network faults act on the fault proxy routes: `p-A-B` carries node A's peer
link to node B (A dials B), `m-A` the members' links to node A. Test
infrastructure; may import trio and the test kits. Bounded: every wait has a
deadline.
"""

from __future__ import annotations

import random
import shutil
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from gcks.cluster.admin import AdminError
from tests.cluster.clusterkit import Kit, admin_call
from tests.cluster.processes import ProcessCluster
from tests.faultproxy import FaultProxyError, ProxyControl

FAULTS = (
    "kill",
    "kill-leader",
    "partition-leader",
    "partition-minority",
    "partition-oneway",
    "pause",
    "slow-network",
    "wipe",
)
ADMIN_RETRY_S = 30.0


def peer_route(source: str, target: str) -> str:
    return f"p-{source}-{target}"


def member_route(node: str) -> str:
    return f"m-{node}"


class NemesisError(Exception):
    """The nemesis could not inject or heal a fault (the cluster did not let it)."""


@dataclass
class FaultRecord:
    kind: str
    targets: tuple[str, ...]
    start: float
    end: float | None = None
    note: str = ""


@dataclass
class Nemesis:
    kit: Kit
    cluster: ProcessCluster
    proxy: ProxyControl
    rng: random.Random
    log: Callable[[str], None]
    kinds: tuple[str, ...] = FAULTS
    hold_s: tuple[float, float] = (2.0, 5.0)
    quiet_s: tuple[float, float] = (1.0, 3.0)
    records: list[FaultRecord] = field(default_factory=list)
    expected_down: set[str] = field(default_factory=set)
    killed: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> list[str]:
        return list(self.kit.node_ids)

    def counts(self) -> dict[str, int]:
        return dict(Counter(r.kind for r in self.records))

    async def run(self) -> None:
        """Inject faults one after another until cancelled (heal is shielded).
        A fault the cluster does not let the nemesis set up or undo (an admin
        change that never succeeds) is recorded in `errors`."""
        while True:
            await trio.sleep(self.rng.uniform(*self.quiet_s))
            kind = self.rng.choice(self.kinds)
            try:
                await self.one(kind)
            except (NemesisError, trio.TooSlowError) as exc:
                self.errors.append(f"{kind}: {exc or type(exc).__name__}")
                self.log(f"nemesis {kind} failed: {exc or type(exc).__name__}")
                await self.heal_all()

    async def heal_all(self) -> None:
        """Undo whatever may be left: links, paused and stopped nodes, removed voters."""
        with trio.CancelScope(shield=True), trio.move_on_after(ADMIN_RETRY_S + 30):
            await self.proxy.reset("*")
            for node, process in self.cluster.nodes.items():
                if process.alive:
                    await process.signal(signal.SIGCONT)
                    continue
                if node not in self.expected_down and process.process is not None:
                    self.errors.append(
                        f"{node} was found down (exit {process.process.returncode}) "
                        "though the nemesis had not stopped it"
                    )
                await process.start()
                self.expected_down.discard(node)
            leader = await self._leader()
            status = await self.cluster.nodes[leader].status() if leader else None
            if status is not None:
                for node in self.nodes:
                    if node not in status.get("voters", self.nodes):
                        try:
                            await self._admin("cluster.add-node", {"node": node}, self.nodes)
                        except NemesisError as exc:
                            self.errors.append(f"re-adding {node}: {exc}")

    async def one(self, kind: str) -> None:
        hold = self.rng.uniform(*self.hold_s)
        leader = await self._leader()
        record = FaultRecord(kind, (), trio.current_time())
        self.records.append(record)
        # Injection is shielded: a fault is either not started or fully set up,
        # so the heal below always has something consistent to undo.
        try:
            with trio.CancelScope(shield=True), trio.fail_after(ADMIN_RETRY_S + 30):
                heal = await self._inject(kind, record, leader)
        except BaseException:
            record.end = trio.current_time()
            raise
        self.log(f"nemesis {kind} {','.join(record.targets)} {record.note}".rstrip())
        try:
            await trio.sleep(hold)
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(ADMIN_RETRY_S + 30):
                await heal()
                record.end = trio.current_time()
                self.log(f"nemesis healed {kind} {','.join(record.targets)}")

    async def _leader(self) -> str | None:
        with trio.move_on_after(5):
            return await self.cluster.leader(timeout_s=5)
        return None

    async def _inject(
        self, kind: str, record: FaultRecord, leader: str | None
    ) -> Callable[[], Awaitable[None]]:
        nodes = self.nodes
        victim = leader if kind == "kill-leader" and leader else self.rng.choice(nodes)
        if kind in ("kill", "kill-leader"):
            record.targets = (victim,)
            await self._kill(victim)
            return lambda: self._restart(victim)
        if kind == "pause":
            record.targets = (victim,)
            self.expected_down.add(victim)
            await self.cluster.nodes[victim].signal(signal.SIGSTOP)

            async def resume() -> None:
                await self.cluster.nodes[victim].signal(signal.SIGCONT)
                self.expected_down.discard(victim)

            return resume
        if kind in ("partition-leader", "partition-minority", "partition-oneway"):
            if kind == "partition-minority":
                size = (len(nodes) - 1) // 2
                side = sorted(self.rng.sample(nodes, size))
            else:
                side = [leader or victim]
            record.targets = tuple(side)
            cut = self.rng.random() < 0.5
            record.note = "cut" if cut else "hold"
            await self._isolate(side, one_way=kind == "partition-oneway", cut=cut)
            return self._heal_network
        if kind == "slow-network":
            delay = self.rng.randint(10, 60)
            record.targets = ("*",)
            record.note = f"{delay} ms"
            for source in nodes:
                for target in nodes:
                    if source != target:
                        await self.proxy.set_delay(peer_route(source, target), delay, delay / 2)
            return self._heal_network
        if kind == "wipe":
            record.targets = (victim,)
            await self._wipe(victim)
            return lambda: self._readd(victim)
        raise NemesisError(f"unknown fault {kind!r}")

    async def _kill(self, node: str) -> None:
        self.expected_down.add(node)
        self.killed[node] += 1
        await self.cluster.nodes[node].kill()

    async def _restart(self, node: str) -> None:
        await self.cluster.nodes[node].start()
        self.expected_down.discard(node)

    async def _isolate(self, side: list[str], *, one_way: bool, cut: bool) -> None:
        """Block peer links between `side` and the rest (only side -> rest if
        `one_way`), and the members' links to `side`."""
        rest = [n for n in self.nodes if n not in side]
        for a in side:
            for b in rest:
                await self.proxy.partition(peer_route(a, b), cut=cut)
                if not one_way:
                    await self.proxy.partition(peer_route(b, a), cut=cut)
            if not one_way:
                await self.proxy.partition(member_route(a), cut=cut)

    async def _heal_network(self) -> None:
        await self.proxy.reset("*")

    async def _admin(self, op: str, args: dict[str, object], among: list[str]) -> object:
        """An admin change that must happen: follow the leader, bounded."""
        last: Exception | None = None
        with trio.move_on_after(ADMIN_RETRY_S):
            while True:
                for node in among:
                    try:
                        return await admin_call(self.kit, node, op, args)
                    except (AdminError, OSError, trio.TooSlowError, FaultProxyError) as exc:
                        last = exc
                await trio.sleep(0.3)
        raise NemesisError(f"{op} {args} did not succeed in {ADMIN_RETRY_S} s: {last}")

    async def _wipe(self, node: str) -> None:
        others = [n for n in self.nodes if n != node]
        await self._admin("cluster.remove-node", {"node": node}, others)
        # Wait until the survivors applied the removal, so the node is not
        # counted for quorum while it is away.
        with trio.fail_after(ADMIN_RETRY_S):
            while True:
                statuses = [await self.cluster.nodes[n].status() for n in others]
                if all(s is not None and node not in s.get("voters", [node]) for s in statuses):
                    break
                await trio.sleep(0.2)
        await self._kill(node)
        shutil.rmtree(self.kit.root / "data" / node, ignore_errors=True)

    async def _readd(self, node: str) -> None:
        await self._restart(node)
        others = [n for n in self.nodes if n != node]
        await self._admin("cluster.add-node", {"node": node}, others)
