"""The default chaos runs: one 3-node and one 5-node cluster under the nemesis.

Each run lasts about a minute of faults (every kind of the nemesis may come
up: kills of the leader and of followers, partitions of the leader, of a
minority and one-way, pauses, slow links, wiped and re-added nodes) under a
workload of registrations, deregistrations, evictions, forced rekeys, policy
updates and linearizable reads, and must end with no violation of any check
(`tests.chaos.checks`). Seeds are fixed so that a failure reproduces with
`python -m tests.chaos --nodes N --duration 60 --seed S`; longer and other
seeds run from that command, not here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.chaos.harness import ChaosConfig, run_chaos

pytestmark = pytest.mark.slow

DURATION_S = 60.0
# Startup, healing, convergence and the final reads on top of the faults.
RUN_BOUND_S = DURATION_S + 150


@pytest.mark.parametrize(("nodes", "seed"), [(3, 3003), (5, 5005)], ids=["3-nodes", "5-nodes"])
async def test_chaos_run_keeps_every_guarantee(tmp_path: Path, nodes: int, seed: int) -> None:
    lines: list[str] = []
    config = ChaosConfig(workdir=tmp_path, nodes=nodes, duration_s=DURATION_S, seed=seed)
    with trio.fail_after(RUN_BOUND_S):
        report = await run_chaos(config, log=lines.append)
    summary = report.summary()
    print("\n".join(lines), summary, sep="\n")
    assert report.ok, summary
    assert sum(report.faults.values()) >= 8, f"too few faults injected:\n{summary}"
    assert report.operations["register"].get("ok", 0) > 0, summary
    assert report.operations["read"].get("ok", 0) > 0, summary
    assert report.linearizability.startswith("linearizable"), summary
