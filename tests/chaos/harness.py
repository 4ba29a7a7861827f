"""One chaos run: a loopback cluster of `gcks node` processes behind fault
proxies, members and an administrator at work, a seeded nemesis, and the
checks at the end.

Layout: every ordered pair of nodes talks through its own proxy route (node
A's `[peers.B] peer` is the route `p-A-B`), and members reach node A through
`m-A`; all routes live in one fault proxy process. Members also share one
multicast socket, as members on one host would. The run goes:

1. start the proxy and the nodes; wait for a leader and the group;
2. for `duration_s`: workload clients and the nemesis, and a watcher that
   notes any node process that died without the nemesis killing it;
3. stop both, heal everything, and give members `convergence_s` after the
   last heal to hold the group's current KEK and TEK (`group.show`);
4. read the final state (linearizable admin reads, every node's `/status`),
   close the history and run every check (`checks`).

Every process is killed at the end, also on failure or cancellation. May
import trio, `gcks.*` and the test kits; test infrastructure only.
"""

from __future__ import annotations

import dataclasses
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from gcks.cluster.admin import AdminError
from gcks.member.datagram import open_multicast_socket
from tests.chaos.checks import FinalState, Violation, check_history
from tests.chaos.history import History, Outcome
from tests.chaos.linearizability import Verdict
from tests.chaos.nemesis import FAULTS, Nemesis, member_route, peer_route
from tests.chaos.observers import Observer, write_observer_config
from tests.chaos.workload import GROUP, Admin, ChaosMember, Workload, newest_tek
from tests.cluster.clusterkit import admin_call, free_ports, make_kit
from tests.cluster.processes import ProcessCluster
from tests.faultproxy import ProxyControl, spawn_fault_proxy

STARTUP_S = 60.0
FINAL_READ_S = 60.0


class HarnessError(Exception):
    """The run could not be set up (not a verdict on the cluster's guarantees)."""


@dataclass(frozen=True)
class ChaosConfig:
    workdir: Path
    nodes: int = 3
    duration_s: float = 60.0
    seed: int = 1
    members: int = 16
    observers: int = 6  # `gcks-member join` processes that stay in the group
    clients: int = 3
    convergence_s: float = 10.0
    faults: tuple[str, ...] = FAULTS
    hold_s: tuple[float, float] = (2.0, 5.0)
    quiet_s: tuple[float, float] = (1.0, 3.0)
    tick_ms: int = 50
    snapshot_entries: int = 64


@dataclass
class Report:
    seed: int
    nodes: int
    workdir: Path
    faults: dict[str, int] = field(default_factory=dict)
    operations: dict[str, dict[str, int]] = field(default_factory=dict)
    key_events: int = 0
    member_stats: dict[str, int] = field(default_factory=dict)
    linearizability: str = "not checked"
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        lines = [f"chaos run: {self.nodes} nodes, seed {self.seed}, logs in {self.workdir}"]
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        lines.append(f"  faults: {faults}")
        for kind, row in sorted(self.operations.items()):
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(row.items()))
            lines.append(f"  ops {kind}: {outcomes}")
        lines.append(f"  key events: {self.key_events}")
        counters = ", ".join(f"{k} {v}" for k, v in sorted(self.member_stats.items()))
        lines.append(f"  members (in-test): {counters or 'none'}")
        lines.append(f"  linearizability: {self.linearizability}")
        lines.extend(f"  note: {note}" for note in self.notes)
        lines.append(f"  violations: {len(self.violations)}")
        lines.extend(f"    {v}" for v in self.violations)
        if self.violations:
            lines.append(f"  FAILED - reproduce with --seed {self.seed}")
        return "\n".join(lines)


class _Run:
    """The state of one run, shared by its tasks."""

    def __init__(self, config: ChaosConfig, log: Callable[[str], None]) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.log = log
        self.history = History()
        self.violations: list[Violation] = []
        self.notes: list[str] = []
        ids = [f"n{i}" for i in range(1, config.nodes + 1)]
        pairs = [(a, b) for a in ids for b in ids if a != b]
        ports = free_ports(len(pairs))
        self.peer_ports = {pair: port for pair, port in zip(pairs, ports, strict=True)}
        group: dict[str, object] = {"batch_interval_ms": 50, "retransmit_count": 0}
        self.kit = make_kit(
            config.workdir,
            nodes=config.nodes,
            members=config.members + config.observers,
            tick_ms=config.tick_ms,
            snapshot_entries=config.snapshot_entries,
            group=group,
            # The proxies' ports, not bound until they start: `free_ports` never
            # hands them out again for the nodes.
            peer_address=lambda a, b: f"127.0.0.1:{self.peer_ports[(a, b)]}",
        )
        self.cluster = ProcessCluster(self.kit)
        self.deaths: set[tuple[str, int]] = set()


async def run_chaos(config: ChaosConfig, log: Callable[[str], None] = print) -> Report:
    """Run one chaos test as `config` says and judge it; the report says how it went."""
    config.workdir.mkdir(parents=True, exist_ok=True)
    run = _Run(config, log)
    kit = run.kit
    tcp = [
        (peer_route(a, b), ("127.0.0.1", port), ("127.0.0.1", kit.ports[b]["peer"]))
        for (a, b), port in run.peer_ports.items()
    ]
    tcp += [
        (member_route(n), ("127.0.0.1", 0), ("127.0.0.1", kit.ports[n]["member"]))
        for n in kit.node_ids
    ]
    report = Report(config.seed, config.nodes, config.workdir)
    # Every phase after the faults has its own deadline; this bounds the whole.
    bound = config.duration_s + STARTUP_S + 3 * FINAL_READ_S + 120
    try:
        with trio.fail_after(bound):
            async with spawn_fault_proxy(tcp, seed=config.seed, lifetime_s=bound + 60) as proxy:
                await _run_with_proxy(run, proxy, report)
    except trio.TooSlowError:
        raise HarnessError(f"the run exceeded its bound of {bound:.0f} s") from None
    finally:
        with trio.CancelScope(shield=True):
            for node in run.cluster.nodes.values():
                await node.kill()
        run.history.close(trio.current_time())
        run.history.dump(config.workdir / "history.jsonl")
    report.operations = run.history.counts()
    report.key_events = len(run.history.key_events)
    report.violations = [*run.violations, *report.violations]
    report.notes.extend(run.notes)
    return report


async def _run_with_proxy(run: _Run, proxy: ProxyControl, report: Report) -> None:
    config, kit, cluster = run.config, run.kit, run.cluster
    for node in cluster.nodes.values():
        await node.start()
    try:
        with trio.fail_after(STARTUP_S):
            await cluster.wait_group(GROUP, timeout_s=STARTUP_S)
            await cluster.leader(timeout_s=STARTUP_S)
    except trio.TooSlowError:
        raise HarnessError(
            f"the cluster did not start within {STARTUP_S} s (seed {config.seed}):\n"
            + cluster.logs()
        ) from None
    run.log(f"cluster of {config.nodes} up; seed {config.seed}")
    members = {
        mid: ChaosMember.for_kit(
            kit,
            mid,
            {n: proxy.routes[member_route(n)] for n in kit.node_ids},
            run.history,
            seed=run.rng.randrange(2**32),
        )
        for mid in kit.member_ids[: config.members]
    }
    routes = {n: proxy.routes[member_route(n)] for n in kit.node_ids}
    observers = [
        Observer(mid, write_observer_config(kit, mid, routes), kit.root / f"{mid}.log")
        for mid in kit.member_ids[config.members :]
    ]
    nemesis = Nemesis(
        kit,
        cluster,
        proxy,
        random.Random(run.rng.randrange(2**32)),
        run.log,
        kinds=config.faults,
        hold_s=config.hold_s,
        quiet_s=config.quiet_s,
    )
    admin = Admin(kit, run.history, random.Random(run.rng.randrange(2**32)), frozenset(members))
    workload = Workload(
        members, admin, lambda: list(kit.node_ids), random.Random(run.rng.randrange(2**32))
    )
    multicast = await open_multicast_socket("239.77.0.1", kit.multicast_port, "127.0.0.1")
    with multicast:
        async with trio.open_nursery() as nursery:
            for member in members.values():
                nursery.start_soon(member.run)
                nursery.start_soon(member.read_pushes)
            nursery.start_soon(_fan_out, multicast, members)
            for observer in observers:
                await nursery.start(observer.run, run.history)
            nursery.start_soon(_watch_processes, run, nemesis, observers)
            async with trio.open_nursery() as load:
                for _ in range(config.clients):
                    load.start_soon(workload.client)
                if config.faults:
                    load.start_soon(nemesis.run)
                await trio.sleep(config.duration_s)
                load.cancel_scope.cancel()
            await nemesis.heal_all()
            last_heal = trio.current_time()  # the end of the last fault
            run.log("workload and nemesis stopped; everything healed")
            try:
                converged = await _converge(run, members, observers, last_heal)
            finally:
                for observer in observers:
                    await observer.kill()
            nursery.cancel_scope.cancel()
        for member in members.values():
            if member.session is not None:
                await member.session.aclose()
    # Every client has stopped: what is still open is unknown from here on, and
    # nothing can complete after the final read.
    run.history.close(trio.current_time())
    final = await _final_state(run, members) if converged else None
    for observer in observers:
        last = observer.last[0] if observer.last else None
        run.notes.append(
            f"{observer.member_id} (gcks-member): {observer.events} key events, last {last}"
        )
        if observer.unparsed:
            run.notes.append(
                f"{observer.member_id} printed unparsable lines: {observer.unparsed[:3]}"
            )
    report.faults = nemesis.counts()
    for member in members.values():
        for name, value in dataclasses.asdict(member.stats).items():
            report.member_stats[name] = report.member_stats.get(name, 0) + value
    run.violations.extend(Violation("nemesis", e) for e in nemesis.errors)
    if final is None:
        return
    result, violations = check_history(run.history, final)
    report.linearizability = f"{result.verdict} ({result.steps} steps)"
    if result.verdict is Verdict.UNKNOWN:
        report.notes.append("linearizability search budget exhausted: inconclusive")
    report.violations.extend(violations)


async def _fan_out(sock: trio.socket.SocketType, members: dict[str, ChaosMember]) -> None:
    """Every multicast datagram to every member (one socket for the whole host)."""
    while True:
        datagram = await sock.recv(65_535)
        for member in members.values():
            member.on_datagram(datagram, "multicast")


async def _watch_processes(run: _Run, nemesis: Nemesis, observers: list[Observer]) -> None:
    """Note every node process that exited without the nemesis stopping it, and
    every observer member process that exited at all."""
    while True:
        for observer in observers:
            exited = observer.process
            if exited is None or observer.alive or observer.stopped:
                continue
            if (observer.member_id, 0) in run.deaths:
                continue
            run.deaths.add((observer.member_id, 0))
            run.violations.append(
                Violation(
                    "process",
                    f"member {observer.member_id} exited with {exited.returncode} "
                    f"(left: {observer.left}); see {observer.log_path}",
                )
            )
        for node_id, process in run.cluster.nodes.items():
            proc = process.process
            if proc is None or process.alive or node_id in nemesis.expected_down:
                continue
            incident = (node_id, process.starts)
            if incident not in run.deaths:
                run.deaths.add(incident)
                run.violations.append(
                    Violation(
                        "process",
                        f"{node_id} exited with {proc.returncode} unprompted; log tail:\n"
                        + process.log_tail(15),
                    )
                )
        await trio.sleep(0.5)


async def _leader_call(run: _Run, op: str, args: dict[str, object]) -> object:
    """An admin read that must succeed once the cluster is healed."""
    with trio.fail_after(FINAL_READ_S):
        while True:
            for node in run.kit.node_ids:
                try:
                    with trio.fail_after(10):
                        return await admin_call(run.kit, node, op, args)
                except (
                    AdminError,
                    OSError,
                    ssl.SSLError,
                    trio.TooSlowError,
                    trio.BrokenResourceError,
                ):
                    continue  # down, cut off or not caught up: the next node
            await trio.sleep(0.3)


async def _converge(
    run: _Run, members: dict[str, ChaosMember], observers: list[Observer], last_heal: float
) -> bool:
    """Convergence within `convergence_s` of the last heal (members still at
    work); False if no node answers at all."""
    deadline = last_heal + run.config.convergence_s
    laggards: list[str] = []
    shown: dict[str, Any] = {}
    while True:
        try:
            answer = await _leader_call(run, "group.show", {"group": GROUP})
        except trio.TooSlowError:
            run.violations.append(
                Violation("liveness", "no node answered group.show after healing")
            )
            return False
        assert isinstance(answer, dict)
        shown = answer
        kek = shown["kek"]["fingerprint"]
        tek = newest_tek(tuple(_Tek(**t) for t in shown["teks"]))
        laggards = [
            f"{m.member_id} (msg {m.keys.msg_id if m.keys else None})"
            for m in members.values()
            if m.want
            and not m.evicted
            and (m.keys is None or (m.keys.kek.fingerprint, newest_tek(m.keys.teks)) != (kek, tek))
        ]
        laggards += [
            f"{o.member_id} (gcks-member, msg {o.last[0] if o.last else None})"
            for o in observers
            if o.last is None or o.last[1:] != (kek, tek)
        ]
        if not laggards or trio.current_time() > deadline:
            break
        await trio.sleep(0.2)
    if laggards:
        run.violations.append(
            Violation(
                "convergence",
                f"{run.config.convergence_s} s after the last heal, not at msg "
                f"{shown['msg_id']}: {', '.join(laggards)}",
            )
        )
    return True


async def _final_state(run: _Run, members: dict[str, ChaosMember]) -> FinalState:
    """The final member list (recorded as a read), message id and policy, once
    every client has stopped; and every node must agree on them."""
    op = run.history.invoke("final", "read", None, trio.current_time())
    listed = await _leader_call(run, "member.list", {"group": GROUP})
    assert isinstance(listed, list)
    members_now = tuple(sorted(m for e in listed if (m := str(e["member"])) in members))
    run.history.complete(op, Outcome.OK, trio.current_time(), value=members_now)
    shown_final = await _leader_call(run, "group.show", {"group": GROUP})
    assert isinstance(shown_final, dict)
    await _check_node_agreement(run, shown_final)
    return FinalState(
        frozenset(members_now),
        int(shown_final["msg_id"]),
        int(shown_final["policy"]["retransmit_count"]),
    )


@dataclass(frozen=True)
class _Tek:
    spi: int
    fingerprint: str
    activation_ms: int
    expiry_ms: int


async def _check_node_agreement(run: _Run, shown: dict[str, Any]) -> None:
    """Every node applies up to the same state: same message id and KEK."""
    wanted = (shown["msg_id"], shown["kek"]["fingerprint"])
    views: dict[str, tuple[object, object] | None] = {}
    with trio.move_on_after(run.config.convergence_s):
        while True:
            views = {}
            for node_id, process in run.cluster.nodes.items():
                group = ((await process.status()) or {}).get("groups", {}).get(GROUP)
                views[node_id] = None if group is None else (group["msg_id"], group["kek"])
            if all(view == wanted for view in views.values()):
                return
            await trio.sleep(0.2)
    run.violations.append(Violation("node-agreement", f"nodes disagree after healing: {views}"))
