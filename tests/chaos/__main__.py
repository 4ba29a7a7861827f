"""`python -m tests.chaos`: a chaos run from the shell, longer than the default tests.

    python -m tests.chaos --nodes 5 --duration 600 --seed S [--workdir DIR]

Prints the nemesis log as it goes and a summary at the end (faults by kind,
operations by outcome, violations); exits 1 on any violation, printing the
seed to reproduce it. The work directory (default: a fresh temporary one)
keeps node logs and `history.jsonl` for a post-mortem.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from tests.chaos.harness import ChaosConfig, HarnessError, run_chaos
from tests.chaos.nemesis import FAULTS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--nodes", type=int, choices=(3, 5), default=5)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of faults")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument(
        "--observers", type=int, default=6, help="gcks-member join processes kept in the group"
    )
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    faults = tuple(f for f in args.faults.split(",") if f)
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        print(f"unknown faults: {', '.join(unknown)}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"gcks-chaos-{seed}-"))
    config = ChaosConfig(
        workdir=workdir,
        nodes=args.nodes,
        duration_s=args.duration,
        seed=seed,
        members=args.members,
        clients=args.clients,
        observers=args.observers,
        faults=faults,
    )
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:8.2f}] {line}", flush=True)

    log(f"seed {seed}; work directory {workdir}")
    try:
        report = trio.run(run_chaos, config, log)
    except HarnessError as exc:
        print(f"chaos run could not complete (seed {seed}, logs in {workdir}): {exc}")
        return 1
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
