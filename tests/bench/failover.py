"""Benchmark: leader failover under load, against etcd; leader stability without faults.

gcks: three `gcks node` processes with the product's default Raft timing
(`tick_ms` 100, election timeout 10 ticks, randomised up to 2x: etcd's
defaults too). First `--steady` seconds of continuous registrations with no
fault: leader changes are counted from every node's `/metrics`
(`gcks_raft_leader_changes_total`) and `/status` term. Then `--trials` times:
SIGKILL the leader while clients register continuously (open loop: a new
request every 20 ms, each a fresh TLS connection and a re-registration, which
commits through Raft; nodes taken round robin; requests stuck on the dead
leader do not hold back the next ones), and measure the time
from the kill to the first acknowledged registration that was *sent after*
the kill. The killed node is restarted on its data directory and the cluster
settles before the next trial.

Anchor, same run: the same on a 3-member etcd (Debian `etcd-server`, default
timeouts) with a write loop (`PUT /v3/kv/put`, the v3 JSON gateway, one fresh
connection per write, same open-loop client) when `etcd` is on PATH; otherwise the
anchor carries a skip message and `ratio` is null.

`ratio` = gcks p50 / etcd p50 (target <= 0.5); `leader_changes_without_faults`
should be 0.

Run: `python -m tests.bench.failover [--trials 20] [--steady 60]` from the
repository root (about 4 minutes). The last stdout line is the JSON result;
every process started here is killed on exit, error or Ctrl-C. Loopback only.

May import trio, `gcks` and the cluster test kits. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import base64
import functools
import itertools
import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from gcks.member.session import Session
from gcks.proto.policy import Role
from tests.bench.registration import log, member_contexts, percentiles, run_bench
from tests.cluster.clusterkit import free_ports, make_kit
from tests.cluster.processes import ProcessCluster, running_cluster

CLIENTS = 8  # member identities (gcks) or keys (etcd) the requests rotate over
INTERVAL_S = 0.02  # one new request every 20 ms: the resolution of the measurement
MAX_IN_FLIGHT = 200
ATTEMPT_TIMEOUT_S = 5.0  # per request, both systems
RECOVERY_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 60.0

Attempt = Callable[[int, int], Awaitable[None]]  # (client, node index)


class LoadLoop:
    """Open-loop clients: a request every `INTERVAL_S` (round robin over the nodes),
    each under `ATTEMPT_TIMEOUT_S`, at most `MAX_IN_FLIGHT` at once. A request
    stuck on a dead leader does not hold the next one back, so the first
    acknowledgement after a kill is seen within one interval of it."""

    def __init__(self, nodes: int, attempt: Attempt) -> None:
        self._nodes = nodes
        self._attempt = attempt
        self.acks = 0
        self.failures = 0
        self._since = float("inf")
        self._first_ack: float | None = None
        self._acked = trio.Event()
        self._in_flight = trio.Semaphore(MAX_IN_FLIGHT)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for k in itertools.count():
                await self._in_flight.acquire()
                nursery.start_soon(self._one, k % CLIENTS, k % self._nodes)
                await trio.sleep(INTERVAL_S)

    async def _one(self, client: int, node: int) -> None:
        start = time.perf_counter()
        try:
            with trio.fail_after(ATTEMPT_TIMEOUT_S):
                await self._attempt(client, node)
        except Exception:  # a refused or timed-out request: the next one goes on
            self.failures += 1
            return
        finally:
            self._in_flight.release()
        self.acks += 1
        if start >= self._since and self._first_ack is None:
            self._first_ack = time.perf_counter()
            self._acked.set()

    async def time_to_ack_after(self, kill: Callable[[], Awaitable[None]]) -> float:
        """Run `kill`, then wait for the first ack of a request sent after it (seconds)."""
        self._first_ack = None
        self._acked = trio.Event()
        await kill()
        self._since = killed = time.perf_counter()
        with trio.fail_after(RECOVERY_TIMEOUT_S):
            await self._acked.wait()
        self._since = float("inf")
        assert self._first_ack is not None
        return self._first_ack - killed


# -------------------------------------------------------------------- gcks


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


async def leader_view(cluster: ProcessCluster) -> dict[str, tuple[float, int]]:
    """node -> (gcks_raft_leader_changes_total, term)."""
    view = {}
    for nid, node in cluster.nodes.items():
        _, text = await node.http("/metrics")
        status = await node.status()
        view[nid] = (
            metric(text, "gcks_raft_leader_changes_total"),
            status["term"] if status else -1,
        )
    return view


async def bench_gcks(root: Path, trials: int, steady_s: float, tick_ms: int) -> dict[str, Any]:
    kit = make_kit(root, nodes=3, members=CLIENTS, tick_ms=tick_ms)
    contexts = member_contexts(kit, kit.member_ids)

    async def attempt(client: int, node: int) -> None:
        nid = kit.node_ids[node]
        session = await Session.connect(
            "127.0.0.1",
            kit.ports[nid]["member"],
            contexts[kit.member_ids[client]],
            expected_node=nid,
            timeout_s=ATTEMPT_TIMEOUT_S,
        )
        try:
            await session.register(
                "demo", Role.RECEIVER, last_msg_id=0, sender_key=None, timeout_s=ATTEMPT_TIMEOUT_S
            )
        finally:
            await session.aclose()

    loop = LoadLoop(3, attempt)
    async with running_cluster(kit) as cluster, trio.open_nursery() as nursery:
        await cluster.leader(timeout_s=SETTLE_TIMEOUT_S)
        await cluster.wait_group(timeout_s=SETTLE_TIMEOUT_S)
        nursery.start_soon(loop.run)
        log(f"gcks: {steady_s:.0f} s of steady registrations, no faults ...")
        before = await leader_view(cluster)
        leaders_seen = {await cluster.leader()}
        end = trio.current_time() + steady_s
        while trio.current_time() < end:
            await trio.sleep(0.5)
            statuses = [await n.status() for n in cluster.nodes.values()]
            leaders_seen |= {s["leader"] for s in statuses if s and s["leader"]}
        after = await leader_view(cluster)
        changes = max(after[n][0] - before[n][0] for n in after)
        term_delta = max(after[n][1] for n in after) - max(before[n][1] for n in before)
        steady_acks = loop.acks
        log(f"  leader changes {changes:.0f}, term +{term_delta}, {steady_acks} registrations")
        samples = []
        for trial in range(trials):
            leader = await cluster.leader(timeout_s=SETTLE_TIMEOUT_S)
            victim = cluster.nodes[leader]
            dt = await loop.time_to_ack_after(victim.kill)
            samples.append(dt)
            log(f"  trial {trial + 1}: killed {leader}, next registration after {dt * 1000:.0f} ms")
            await victim.start()
            await settle(cluster)
        nursery.cancel_scope.cancel()
    return {
        "leader_changes_without_faults": int(changes),
        "term_increase_without_faults": term_delta,
        "leaders_seen_without_faults": len(leaders_seen),
        "steady_seconds": steady_s,
        "steady_registrations": steady_acks,
        "trials": len(samples),
        "tick_ms": tick_ms,
        "election_timeout_ms": f"{10 * tick_ms}-{20 * tick_ms}",
        **percentiles(samples),
    }


async def settle(cluster: ProcessCluster) -> None:
    """Every node up, agreeing on one leader and caught up to its commit index."""
    with trio.fail_after(SETTLE_TIMEOUT_S):
        await cluster.leader(timeout_s=SETTLE_TIMEOUT_S)
        while True:
            statuses = [await n.status() for n in cluster.nodes.values()]
            if all(statuses):
                commits = [s["applied_index"] for s in statuses if s]
                if max(commits) - min(commits) <= 50:
                    return
            await trio.sleep(0.1)


# -------------------------------------------------------------------- etcd


async def http_post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST JSON to 127.0.0.1:`port`; the JSON answer, or an exception unless 200."""
    data = json.dumps(body).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        chunks = []
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    if b"Transfer-Encoding: chunked" in head:
        payload = _dechunk(payload)
    code = int(head.split()[1])
    answer: dict[str, Any] = json.loads(payload or b"{}")
    if code != 200 or "error" in answer:
        raise ConnectionError(f"etcd answered {code}: {answer.get('error')}")
    return answer


def _dechunk(payload: bytes) -> bytes:
    out = b""
    while payload:
        size_line, _, rest = payload.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        payload = rest[size + 2 :]
    return out


class Etcd:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.names = ["e1", "e2", "e3"]
        ports = free_ports(6)
        self.peer = dict(zip(self.names, ports[:3], strict=True))
        self.client = dict(zip(self.names, ports[3:], strict=True))
        self.processes: dict[str, trio.Process] = {}

    async def start(self, name: str) -> None:
        cluster = ",".join(f"{n}=http://127.0.0.1:{self.peer[n]}" for n in self.names)
        log_file = (self.root / f"{name}.log").open("ab")
        self.processes[name] = await trio.lowlevel.open_process(
            [
                "etcd",
                "--name",
                name,
                "--data-dir",
                str(self.root / name),
                "--listen-peer-urls",
                f"http://127.0.0.1:{self.peer[name]}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{self.peer[name]}",
                "--listen-client-urls",
                f"http://127.0.0.1:{self.client[name]}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{self.client[name]}",
                "--initial-cluster",
                cluster,
                "--initial-cluster-token",
                "gcks-bench",
                "--initial-cluster-state",
                "new",
                "--log-level",
                "warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()

    async def kill(self, name: str) -> None:
        process = self.processes[name]
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
            await process.wait()

    async def status(self, name: str) -> dict[str, Any] | None:
        try:
            with trio.fail_after(1):
                return await http_post(self.client[name], "/v3/maintenance/status", {})
        except (OSError, ConnectionError, ValueError, trio.TooSlowError):
            return None

    async def leader(self) -> str:
        """The name of the leader every member agrees on."""
        with trio.fail_after(SETTLE_TIMEOUT_S):
            while True:
                statuses = {n: await self.status(n) for n in self.names}
                if all(statuses.values()):
                    leaders = {s["leader"] for s in statuses.values() if s}
                    if len(leaders) == 1:
                        (lid,) = leaders
                        for n, s in statuses.items():
                            if s and s["header"]["member_id"] == lid:
                                return n
                await trio.sleep(0.1)


@asynccontextmanager
async def running_etcd(root: Path) -> AsyncIterator[Etcd]:
    etcd = Etcd(root)
    try:
        for name in etcd.names:
            await etcd.start(name)
        yield etcd
    finally:
        with trio.CancelScope(shield=True):
            for name in etcd.processes:
                await etcd.kill(name)


async def bench_etcd(root: Path, trials: int) -> dict[str, Any]:
    async with running_etcd(root) as etcd, trio.open_nursery() as nursery:
        counter = itertools.count()

        async def attempt(client: int, node: int) -> None:
            key = base64.b64encode(f"bench/{client}".encode()).decode()
            value = base64.b64encode(str(next(counter)).encode()).decode()
            await http_post(
                etcd.client[etcd.names[node]], "/v3/kv/put", {"key": key, "value": value}
            )

        await etcd.leader()
        loop = LoadLoop(3, attempt)
        nursery.start_soon(loop.run)
        samples = []
        for trial in range(trials):
            leader = await etcd.leader()
            dt = await loop.time_to_ack_after(functools.partial(etcd.kill, leader))
            samples.append(dt)
            log(f"  trial {trial + 1}: killed {leader}, next write after {dt * 1000:.0f} ms")
            await etcd.start(leader)
            await etcd.leader()
        nursery.cancel_scope.cancel()
    version = await trio.run_process(["etcd", "--version"], capture_stdout=True, check=False)
    return {
        "what": "etcd 3 members, default timeouts, PUT loop via the v3 JSON gateway",
        "version": version.stdout.decode().split("\n")[0],
        "trials": len(samples),
        **percentiles(samples),
    }


async def bench(trials: int, steady_s: float, tick_ms: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gcks-bench-failover-") as tmp:
        root = Path(tmp)
        ours = await bench_gcks(root / "gcks", trials, steady_s, tick_ms)
        anchor: dict[str, Any]
        if shutil.which("etcd") is None:
            anchor = {"skipped": "etcd is not on PATH (Debian: apt-get install etcd-server)"}
            ratio = None
        else:
            log(f"etcd: {trials} trials ...")
            (root / "etcd").mkdir()
            anchor = await bench_etcd(root / "etcd", trials)
            ratio = round(ours["p50_ms"] / anchor["p50_ms"], 3)
        return {"bench": "failover", "results": ours, "anchor": anchor, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="leader kills per system")
    parser.add_argument("--steady", type=float, default=60.0, help="seconds of load, no faults")
    parser.add_argument("--tick-ms", type=int, default=100, help="gcks raft.tick_ms")
    args = parser.parse_args()
    started = time.monotonic()
    result = run_bench(bench, args.trials, args.steady, args.tick_ms)
    log(f"done in {time.monotonic() - started:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
