"""Benchmark: committed proposals per second on a 3-process cluster, against PySyncObj.

gcks: three nodes, three processes, real mTLS peer links and fsync'd logs.
Node n1 runs inside a loader process (`Node` plus a load task in the same trio
run); once n1 leads, the load task keeps `--window` proposals in flight
through `RaftDriver.propose` and counts those committed and applied on n1.
Each proposal is a valid `Rekey` command that changes nothing (fresh seed, no
joins, leaves or keys): it crosses the codec, the log, the quorum and apply,
but seals no rekey message, so the figure is consensus, not cryptography.

Anchor, same run: PySyncObj (`pip install pysyncobj`) with three processes on
loopback, `password` set (its encryption on) and a journal file, the loader
node made leader and proposing payloads of the same size the same way
(`--window` replicated calls in flight, counted on their commit callback).
PySyncObj writes its journal through mmap without fsync, while gcks fsyncs
before acknowledging: the anchor is the easier one.

`ratio` = gcks / PySyncObj proposals per second (target >= 1). If PySyncObj
is missing the anchor says so and `ratio` is null.

Run: `python -m tests.bench.consensus [--seconds 10] [--window 256]` from the
repository root. The last stdout line is the JSON result; every process
started here is killed on exit, error or Ctrl-C. Loopback only.

May import trio, `gcks`, the cluster test kits and (in its own processes)
pysyncobj. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from gcks.cluster.commands import Rekey, encode_command
from gcks.cluster.config import load_config
from gcks.cluster.node import Node
from gcks.cluster.raft.types import Role as RaftRole
from tests.bench.registration import TICK_MS, log, percentiles, run_bench
from tests.cluster.clusterkit import admin_call, free_ports, make_kit
from tests.cluster.processes import NodeProcess, ProcessCluster

GROUP = "demo"
WARMUP_S = 1.0
READY_TIMEOUT_S = 60.0
PROPOSE_TIMEOUT_S = 10.0
PASSWORD = "bench-password"


def noop_command() -> bytes:
    """A valid command that commits and applies but changes no key."""
    return encode_command(
        Rekey(
            group=GROUP,
            joins=(),
            leaves=(),
            tree_seed=os.urandom(32),
            tek_key=None,
            refresh_kek=False,
            now_ms=time.time_ns() // 1_000_000,
            reason="bench",
        )
    )


# ------------------------------------------------------------- gcks loader


async def gcks_loader(config: Path, seconds: float, window: int) -> None:
    """Run node n1 in this process and, once it leads, drive proposals through it."""
    node = Node(load_config(config))
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        driver = node.driver
        assert driver is not None
        with trio.fail_after(READY_TIMEOUT_S):
            while not (driver.status.role is RaftRole.LEADER and driver.state.has_group(GROUP)):
                await trio.sleep(0.05)
        latencies: list[float] = []
        failures = 0
        measuring = False

        async def worker(end: float) -> None:
            nonlocal failures
            while trio.current_time() < end:
                data = noop_command()
                start = time.perf_counter()
                try:
                    await driver.propose(data, PROPOSE_TIMEOUT_S)
                except Exception:  # counted: a lost proposal is a result, not a crash
                    failures += 1
                    continue
                if measuring:
                    latencies.append(time.perf_counter() - start)

        async with trio.open_nursery() as load:
            for _ in range(window):
                load.start_soon(worker, trio.current_time() + WARMUP_S)
        measuring = True
        start = time.perf_counter()
        async with trio.open_nursery() as load:
            for _ in range(window):
                load.start_soon(worker, trio.current_time() + seconds)
        elapsed = time.perf_counter() - start
        result = {
            "committed": len(latencies),
            "failed": failures,
            "elapsed_s": elapsed,
            **percentiles(latencies),
            "entry_bytes": len(noop_command()),
            "leader_changes": driver.leader_changes,
        }
        print(json.dumps(result), flush=True)
        nursery.cancel_scope.cancel()


async def read_result(process: trio.Process, timeout_s: float) -> dict[str, Any]:
    """The JSON line a loader process prints on stdout."""
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(timeout_s):
        while b"\n" not in buffer:
            chunk = await process.stdout.receive_some(65536)
            if not chunk:
                raise RuntimeError(f"the loader exited (status {await process.wait()})")
            buffer += chunk
    result: dict[str, Any] = json.loads(buffer.split(b"\n")[0])
    return result


@asynccontextmanager
async def killing(processes: list[trio.Process]) -> AsyncIterator[list[trio.Process]]:
    """Kill and reap every process in `processes` on the way out, whatever happens."""
    try:
        yield processes
    finally:
        with trio.CancelScope(shield=True):
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()


async def probe_status(node: NodeProcess, samples: list[float]) -> None:
    """Time `/status` on `node` twice a second (a failed probe counts as its timeout)."""
    while True:
        start = time.perf_counter()
        await node.status()
        samples.append(time.perf_counter() - start)
        await trio.sleep(0.5)


async def followers_leader(nodes: list[NodeProcess]) -> str:
    """The leader that `nodes` agree on, once the group exists."""
    with trio.fail_after(READY_TIMEOUT_S):
        while True:
            statuses = [await n.status() for n in nodes]
            leaders = {s["leader"] if s and GROUP in s["groups"] else None for s in statuses}
            if len(leaders) == 1 and None not in leaders:
                return str(leaders.pop())
            await trio.sleep(0.1)


async def bench_gcks(root: Path, seconds: float, window: int) -> dict[str, Any]:
    kit = make_kit(root, nodes=3, members=1, tick_ms=TICK_MS)
    cluster = ProcessCluster(kit)
    others: list[NodeProcess] = [cluster.nodes["n2"], cluster.nodes["n3"]]
    async with killing([]) as processes:
        try:
            loader = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "tests.bench.consensus",
                    "--gcks-loader",
                    str(kit.config("n1")),
                    str(seconds),
                    str(window),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=(root / "n1.log").open("ab"),
            )
            processes.append(loader)
            for node in others:
                await node.start()
            # n1 starts its load as soon as it leads: ask only n2 and n3 who leads.
            leader = await followers_leader(others)
            if leader != "n1":
                log(f"  leader is {leader}: transferring leadership to n1")
                await admin_call(kit, leader, "cluster.transfer-leader", {"node": "n1"})
            # Meanwhile, how long the loaded leader takes to answer /status (ops probes).
            probes: list[float] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe_status, cluster.nodes["n1"], probes)
                result = await read_result(loader, READY_TIMEOUT_S + WARMUP_S + seconds + 30)
                nursery.cancel_scope.cancel()
            return {**result, "ops_status_under_load": percentiles(probes)}
        except BaseException:
            print(cluster.logs(), file=sys.stderr)
            raise
        finally:
            with trio.CancelScope(shield=True):
                for node in others:
                    await node.kill()


# ------------------------------------------------------------ PySyncObj side


def pysyncobj_node(me: str, others: list[str], journal: str, load: list[str] | None) -> None:
    """One PySyncObj node (its own process); with `load`, also the proposer."""
    from pysyncobj import (  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: PLC0415
        FAIL_REASON,
        SyncObj,
        SyncObjConf,
        replicated,
    )

    class Sink(SyncObj):  # type: ignore[misc]
        def __init__(self) -> None:
            conf = SyncObjConf(
                password=PASSWORD, journalFile=journal, dynamicMembershipChange=False
            )
            super().__init__(me, others, conf)
            self.applied = 0

        @replicated  # type: ignore[untyped-decorator]
        def put(self, data: bytes) -> None:
            self.applied += len(data) > 0

    obj = Sink()
    if load is None:
        loader_addr = os.environ["BENCH_LOADER"]
        while True:  # hand leadership to the loader node, as gcks's run does
            if obj._isLeader() and loader_addr != me:
                obj.transferLeadership(loader_addr)
            time.sleep(0.2)
    seconds, window, size = float(load[0]), int(load[1]), int(load[2])
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (obj._isLeader() and obj.isReady()):
        if time.monotonic() > deadline:
            raise SystemExit("pysyncobj: the loader never became leader")
        time.sleep(0.05)
    slots = threading.Semaphore(window)
    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0}
    latencies: list[float] = []
    measuring = threading.Event()

    def issue() -> None:
        slots.acquire()
        start = time.perf_counter()

        def done(_result: object, error: int) -> None:
            with lock:
                if error == FAIL_REASON.SUCCESS:
                    counts["ok"] += 1
                    if measuring.is_set():
                        latencies.append(time.perf_counter() - start)
                else:
                    counts["failed"] += 1
            slots.release()

        obj.put(os.urandom(size), callback=done)

    end = time.monotonic() + WARMUP_S
    while time.monotonic() < end:
        issue()
    for _ in range(window):  # drain the warm-up
        slots.acquire()
    with lock:
        counts["ok"] = counts["failed"] = 0
    for _ in range(window):
        slots.release()
    measuring.set()
    start = time.perf_counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        issue()
    for _ in range(window):
        slots.acquire()
    elapsed = time.perf_counter() - start
    with lock:
        result = {
            "committed": counts["ok"],
            "failed": counts["failed"],
            "elapsed_s": elapsed,
            **percentiles(latencies),
        }
    print(json.dumps(result), flush=True)
    os._exit(0)  # its threads would keep the process alive


async def bench_pysyncobj(root: Path, seconds: float, window: int, size: int) -> dict[str, Any]:
    ports = free_ports(3)
    addrs = [f"127.0.0.1:{p}" for p in ports]
    env = {**os.environ, "BENCH_LOADER": addrs[0]}
    async with killing([]) as processes:
        for i, addr in enumerate(addrs):
            others = ",".join(a for a in addrs if a != addr)
            cmd = [
                sys.executable,
                "-m",
                "tests.bench.consensus",
                "--pysyncobj-node",
                addr,
                others,
                str(root / f"pso{i}.journal"),
            ]
            if i == 0:
                cmd += ["--pysyncobj-load", str(seconds), str(window), str(size)]
            processes.append(
                await trio.lowlevel.open_process(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                    stderr=(root / f"pso{i}.log").open("ab"),
                )
            )
        return await read_result(processes[0], READY_TIMEOUT_S + WARMUP_S + seconds + 30)


async def bench(seconds: float, window: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gcks-bench-consensus-") as tmp:
        root = Path(tmp)
        log(f"gcks: 3 processes, {window} proposals in flight on the leader, {seconds} s ...")
        ours = await bench_gcks(root / "gcks", seconds, window)
        ours_rate = ours["committed"] / ours["elapsed_s"]
        log(f"  {ours_rate:.0f} proposals/s")
        anchor: dict[str, Any]
        if importlib.util.find_spec("pysyncobj") is None:
            anchor = {"skipped": "pysyncobj is not installed (pip install pysyncobj)"}
            ratio = None
        else:
            log("PySyncObj: 3 processes, password on, journal file ...")
            (root / "pso").mkdir()
            theirs = await bench_pysyncobj(root / "pso", seconds, window, ours["entry_bytes"])
            their_rate = theirs["committed"] / theirs["elapsed_s"]
            log(f"  {their_rate:.0f} proposals/s")
            anchor = {
                "what": "PySyncObj 3 processes, password encryption, journal file",
                "proposals_per_s": round(their_rate, 1),
                **theirs,
            }
            ratio = round(ours_rate / their_rate, 3) if their_rate else None
        return {
            "bench": "consensus",
            "results": {
                "proposals_per_s": round(ours_rate, 1),
                "window": window,
                "seconds": seconds,
                **ours,
            },
            "anchor": anchor,
            "ratio": ratio,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per side")
    parser.add_argument("--window", type=int, default=256, help="proposals in flight")
    parser.add_argument("--gcks-loader", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--pysyncobj-node", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--pysyncobj-load", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gcks_loader:
        logging.basicConfig(level=logging.WARNING)
        config, seconds, window = args.gcks_loader
        trio.run(gcks_loader, Path(config), float(seconds), int(window))
        return
    if args.pysyncobj_node:
        me, others, journal = args.pysyncobj_node
        pysyncobj_node(me, others.split(","), journal, args.pysyncobj_load)
        return
    started = time.monotonic()
    result = run_bench(bench, args.seconds, args.window)
    log(f"done in {time.monotonic() - started:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
