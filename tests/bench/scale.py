"""Benchmark: one group of 10k and 100k members: node RSS, snapshot size, registration latency.

Registering 100,000 members through TLS does not fit in 5 minutes on 2
cores, so the group is grown the way the rekeyer grows it, only in bigger
batches: node n1 runs inside a loader process and proposes `Rekey` commands
of `--batch` synthetic joins each (`Join(member_id, RECEIVER)`, fresh seeds
and TEK, exactly what `Rekeyer` proposes after a batch interval) through
`RaftDriver.propose`. Every node applies them through the real Raft log
(mTLS links, fsync), LKH tree and state machine. At each size in `--sizes`,
once the followers caught up, the bench records the resident set size of
each node process (`/proc/PID/status` VmRSS), the size of the group state
snapshot (`GroupState.snapshot()`, what a snapshot file and InstallSnapshot
carry), and the latency of `--probes` real registrations of fresh member
certificates over TLS 1.3, one at a time, round robin over the nodes. The
latency should stay flat as the group grows.

Run: `python -m tests.bench.scale [--sizes 1000,10000,100000] [--batch 1000]`
from the repository root. The last stdout line is the JSON result; every
process started here is killed on exit, error or Ctrl-C. Loopback only.

May import trio, `gcks` and the cluster test kits. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from gcks.cluster.commands import Join, Rekey, encode_command
from gcks.cluster.config import load_config
from gcks.cluster.node import Node
from gcks.member.session import SessionError
from gcks.proto.policy import Role
from tests.bench.consensus import followers_leader, killing
from tests.bench.failover import metric
from tests.bench.registration import (
    TICK_MS,
    log,
    member_contexts,
    percentiles,
    registration_job,
    run_bench,
)
from tests.cluster.clusterkit import make_kit
from tests.cluster.processes import ProcessCluster

GROUP = "demo"
READY_TIMEOUT_S = 60.0
GROW_TIMEOUT_S = 240.0
PROPOSE_TIMEOUT_S = 60.0
METHOD = (
    "group grown by Rekey commands of BATCH synthetic joins proposed through an in-process "
    "node (n1) over the real Raft log of 3 node processes; at each size: VmRSS per node, "
    "GroupState.snapshot() bytes, and PROBES real TLS registrations one at a time"
)


# ------------------------------------------------------------ grow loader


async def grow_loader(config: Path) -> None:
    """Run node n1 here; for each `grow N BATCH` line on stdin, grow the group to N."""
    node = Node(load_config(config))
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        driver = node.driver
        assert driver is not None
        with trio.fail_after(READY_TIMEOUT_S):
            while not driver.state.has_group(GROUP):
                await trio.sleep(0.05)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        synthetic = 0
        while True:
            while b"\n" not in buffer:
                chunk = await stdin.receive_some(4096)
                if not chunk:
                    nursery.cancel_scope.cancel()
                    return
                buffer += chunk
            line, _, buffer = buffer.partition(b"\n")
            _, target, batch = line.split()
            start = time.perf_counter()
            while len(driver.state.members(GROUP)) < int(target):
                count = min(int(batch), int(target) - len(driver.state.members(GROUP)))
                # "m" first: the kit's policy authorizes m* (apply skips anyone else).
                joins = tuple(Join(f"ms{synthetic + i:07d}", Role.RECEIVER) for i in range(count))
                synthetic += count
                before = len(driver.state.members(GROUP))
                await driver.propose(
                    encode_command(
                        Rekey(
                            group=GROUP,
                            joins=joins,
                            leaves=(),
                            tree_seed=os.urandom(32),
                            tek_key=os.urandom(32),
                            refresh_kek=False,
                            now_ms=time.time_ns() // 1_000_000,
                            reason="bench growth",
                        )
                    ),
                    PROPOSE_TIMEOUT_S,
                )
                if len(driver.state.members(GROUP)) == before:
                    raise SystemExit("a growth batch added no member: is the policy refusing them?")
            answer = {
                "members": len(driver.state.members(GROUP)),
                "grow_s": time.perf_counter() - start,
                "snapshot_bytes": len(driver.state.snapshot()),
                "applied_index": driver.state.applied_index,
            }
            print(json.dumps(answer), flush=True)


# -------------------------------------------------------------------- main


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def line(self, timeout_s: float) -> bytes:
        with trio.fail_after(timeout_s):
            while b"\n" not in self._buffer:
                chunk = await self._stream.receive_some(65536)
                if not chunk:
                    raise RuntimeError("the loader exited")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


async def leader_changes(cluster: ProcessCluster) -> float:
    """The most leader changes any node has seen since it started."""
    counts = []
    for node in cluster.nodes.values():
        _, text = await node.http("/metrics")
        counts.append(metric(text, "gcks_raft_leader_changes_total"))
    return max(counts)


async def caught_up(cluster: ProcessCluster, index: int) -> None:
    with trio.fail_after(GROW_TIMEOUT_S):
        for node in cluster.nodes.values():
            while True:
                status = await node.status()
                if status is not None and status["applied_index"] >= index:
                    break
                await trio.sleep(0.2)


async def bench(sizes: list[int], batch: int, probes: int, batch_ms: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gcks-bench-scale-") as tmp:
        root = Path(tmp)
        kit = make_kit(
            root,
            nodes=3,
            members=probes * len(sizes),
            tick_ms=TICK_MS,
            group={"batch_interval_ms": batch_ms},
        )
        contexts = member_contexts(kit, kit.member_ids)
        probe_ids = list(kit.member_ids)
        cluster = ProcessCluster(kit)
        others = [cluster.nodes["n2"], cluster.nodes["n3"]]
        points = []
        async with killing([]) as processes:
            try:
                loader = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-m",
                        "tests.bench.scale",
                        "--grow-loader",
                        str(kit.config("n1")),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=(root / "n1.log").open("ab"),
                )
                processes.append(loader)
                assert loader.stdin is not None
                assert loader.stdout is not None
                reader = LineReader(loader.stdout)
                for node in others:
                    await node.start()
                await followers_leader(others)
                changes_at_start = await leader_changes(cluster)
                for size in sizes:
                    log(f"growing the group to {size} members ...")
                    await loader.stdin.send_all(f"grow {size} {batch}\n".encode())
                    grown = json.loads(await reader.line(GROW_TIMEOUT_S))
                    await caught_up(cluster, grown["applied_index"])
                    pids = {
                        "n1": loader.pid,
                        **{n.node_id: n.process.pid for n in others if n.process is not None},
                    }
                    latencies = []
                    failed = 0
                    for i in range(probes):
                        mid = probe_ids.pop(0)
                        nid = kit.node_ids[i % 3]
                        job = registration_job(kit.ports[nid]["member"], contexts[mid], nid)
                        start = time.perf_counter()
                        try:
                            await job()
                        except SessionError as exc:  # a result to report, not a crash
                            failed += 1
                            log(f"  registration of {mid} at {nid} failed: {exc}")
                            continue
                        latencies.append(time.perf_counter() - start)
                    point = {
                        "members": grown["members"],
                        "grow_s": round(grown["grow_s"], 1),
                        "rss_mib": {nid: rss_mib(pid) for nid, pid in sorted(pids.items())},
                        "snapshot_bytes": grown["snapshot_bytes"],
                        "registration": {**percentiles(latencies), "failed": failed},
                        "leader_changes_since_start": await leader_changes(cluster)
                        - changes_at_start,
                    }
                    log(f"  {json.dumps(point)}")
                    points.append(point)
            except BaseException:
                print(cluster.logs(), file=sys.stderr)
                raise
            finally:
                with trio.CancelScope(shield=True):
                    for node in others:
                        await node.kill()
        first, last = points[0]["registration"]["p50_ms"], points[-1]["registration"]["p50_ms"]
        return {
            "bench": "scale",
            "method": METHOD.replace("BATCH", str(batch)).replace("PROBES", str(probes)),
            "results": {"points": points, "batch_interval_ms": batch_ms, "batch": batch},
            "anchor": {
                "what": f"registration p50 at {points[0]['members']} members",
                "p50_ms": first,
            },
            "ratio": round(last / first, 3) if first else None,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="group sizes, ascending")
    parser.add_argument("--batch", type=int, default=1000, help="synthetic joins per command")
    parser.add_argument("--probes", type=int, default=20, help="TLS registrations per size")
    parser.add_argument("--batch-ms", type=int, default=50, help="policy batch interval")
    parser.add_argument("--grow-loader", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grow_loader:
        logging.basicConfig(level=logging.WARNING)
        trio.run(grow_loader, Path(args.grow_loader))
        return
    started = time.monotonic()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    result = run_bench(bench, sizes, args.batch, args.probes, args.batch_ms)
    log(f"done in {time.monotonic() - started:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
