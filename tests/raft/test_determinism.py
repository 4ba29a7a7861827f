"""Determinism: the same construction and call sequence give the same outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gcks.cluster.raft.types import Message

from .network import Network


def _scenario(seed: int) -> list[Message]:
    net = Network(["n1", "n2", "n3", "n4", "n5"], seed=seed)
    net.run(30)
    leader = net.leader()
    for i in range(10):
        net.nodes[leader].propose(b"%d" % i)
    net.isolate(leader)
    net.run(40)
    net.heal()
    net.run(20)
    return net.sent


def test_same_inputs_same_outputs() -> None:
    assert _scenario(7) == _scenario(7)


def test_seed_changes_election_timing() -> None:
    runs = {tuple((m.type, m.frm, m.to, m.term) for m in _scenario(s)[:10]) for s in range(4)}
    assert len(runs) > 1


def test_same_outputs_whatever_the_hash_seed() -> None:
    # Sets of node ids iterate in hash order; the core must never depend on it.
    code = (
        "import hashlib;from tests.raft.test_determinism import _scenario;"
        "print(hashlib.sha256(repr(_scenario(3)).encode()).hexdigest())"
    )
    root = Path(__file__).resolve().parents[2]
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1
