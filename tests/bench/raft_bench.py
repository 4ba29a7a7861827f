"""Throughput of the sans-IO Raft core: committed proposals per second.

3 and 5 in-process `RawNode`s, messages delivered in memory (no codec, no
disk), batching on: the client keeps a window of proposals outstanding on the
leader and every node is driven round by round exactly as a driver would
(ready -> "persist" -> send -> apply -> advance). Measures the core only.
Run: `python -m tests.bench.raft_bench [--seconds S]`; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque

from gcks.cluster.raft.raft import RaftConfig, RawNode
from gcks.cluster.raft.types import ConfState, Message, Role

PAYLOAD = b"x" * 64
WINDOW = 512  # proposals outstanding at once (client pipelining)


def _cluster(size: int) -> dict[str, RawNode]:
    ids = [f"n{i}" for i in range(1, size + 1)]
    conf = ConfState(frozenset(ids))
    return {i: RawNode(RaftConfig(id=i, seed=k), conf=conf) for k, i in enumerate(ids)}


def _drive(nodes: dict[str, RawNode], queue: deque[Message], applied: dict[str, int]) -> None:
    for nid, node in nodes.items():
        while node.has_ready():
            rd = node.ready()
            queue.extend(rd.messages)
            applied[nid] += sum(1 for e in rd.committed_entries if e.data)
            node.advance(rd)


def run(size: int, seconds: float) -> float:
    nodes = _cluster(size)
    queue: deque[Message] = deque()
    applied = dict.fromkeys(nodes, 0)
    leader = nodes["n1"]
    leader.campaign()
    while leader.role is not Role.LEADER or queue:
        _drive(nodes, queue, applied)
        while queue:
            m = queue.popleft()
            nodes[m.to].step(m)
        _drive(nodes, queue, applied)
    proposed = 0
    start = time.perf_counter()
    deadline = start + seconds
    rounds = 0
    while True:
        rounds += 1
        if rounds % 16 == 0 and time.perf_counter() >= deadline:
            break
        while proposed - applied["n1"] < WINDOW:
            leader.propose(PAYLOAD)
            proposed += 1
        _drive(nodes, queue, applied)
        for _ in range(len(queue)):
            m = queue.popleft()
            nodes[m.to].step(m)
        if rounds % 10 == 0:
            for node in nodes.values():
                node.tick()
    elapsed = time.perf_counter() - start
    return applied["n1"] / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per size")
    args = parser.parse_args()
    results = {}
    for size in (3, 5):
        rate = run(size, args.seconds)
        print(f"{size} nodes: {rate:,.0f} commits/s", flush=True)
        results[f"commits_per_s_{size}"] = round(rate, 1)
    print(json.dumps({"bench": "raft", "results": results}))


if __name__ == "__main__":
    main()
