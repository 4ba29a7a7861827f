"""Deterministic simulation of the Raft core: 1,000 seeds each of a 3-node and a
5-node cluster under loss, duplication, reordering, delay, partitions, crashes,
membership changes, leadership transfers, snapshots, writes and ReadIndex reads
keep every safety invariant after every step, recover in bounded time once the
faults stop, and replay exactly from their seed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from gcks.cluster.raft.raft import RawNode
from gcks.cluster.raft.types import HardState
from tests.sim.__main__ import main
from tests.sim.cluster import SeedResult, run_seed
from tests.sim.runner import DEFAULT_SEEDS, run_seeds

JOBS = 2
EXERCISED = (
    "crashes",
    "partitions",
    "one-way partitions",
    "isolations",
    "leaders elected",
    "leadership hand-offs",
    "add_voter committed",
    "add_learner committed",
    "remove_node committed",
    "compactions",
    "snapshots installed",
    "reads served",
)
REPO = Path(__file__).resolve().parents[2]


def _failures(results: list[SeedResult]) -> str:
    bad = [r for r in results if not r.ok]
    return "\n\n".join(r.report() for r in bad[:3]) + f"\n({len(bad)} failing seeds)"


@pytest.mark.slow
@pytest.mark.parametrize("size", [3, 5])
def test_every_default_seed_keeps_safety_and_recovers_after_faults(size: int) -> None:
    results = run_seeds(range(DEFAULT_SEEDS), size, jobs=JOBS)
    assert len(results) == DEFAULT_SEEDS
    assert all(r.ok for r in results), _failures(results)
    # The runs did the work they claim: every kind of fault and operation happened.
    assert sum(r.committed for r in results) > DEFAULT_SEEDS * 20
    exercised: Counter[str] = Counter()
    for r in results:
        exercised.update(r.stats)
    for kind in EXERCISED:
        assert exercised[kind] >= 10, (kind, exercised)


def test_a_seed_replays_to_the_same_run() -> None:
    first = run_seed(12, 5)
    again = run_seed(12, 5)
    assert first == again
    assert first.digest != run_seed(13, 5).digest


def test_parallel_runs_give_the_same_results_as_serial_ones() -> None:
    assert run_seeds(range(4), 3, jobs=2) == run_seeds(range(4), 3, jobs=1)


def test_a_seed_replays_identically_under_another_string_hash_seed() -> None:
    code = (
        "from tests.sim.cluster import run_seed\n"
        "for seed in range(20, 26):\n"
        "    r = run_seed(seed, 5)\n"
        "    print(seed, r.steps, r.digest, r.invariant)\n"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
    assert len(outputs) == 1


def test_cli_exits_zero_and_summarises_a_clean_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seeds", "3", "--size", "3", "--first-seed", "40"]) == 0
    assert "3 seeds, size 3: 0 violation(s)" in capsys.readouterr().out


def test_cli_exits_nonzero_and_prints_seed_trace_and_replay_command_on_a_violation(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_vote_persisted(self: RawNode) -> HardState:
        return HardState(self.term, None, self.log.committed)

    monkeypatch.setattr(RawNode, "_hard_state", no_vote_persisted)
    assert main(["--seeds", "5", "--size", "3", "--first-seed", "0", "--stop-at-first"]) == 1
    out = capsys.readouterr().out
    assert "VIOLATION seed=0 size=3: vote-not-durable" in out
    assert "step " in out  # the trace tail
    assert "replay: python -m tests.sim --seeds 1 --size 3 --first-seed 0" in out
