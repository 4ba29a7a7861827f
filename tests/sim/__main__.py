"""Command line of the Raft simulation:
`python -m tests.sim --seeds N --size 5 [--first-seed S] [--jobs J]`.

Runs seeds S .. S+N-1, prints one report per violation (seed, invariant, trace
tail and the one-line replay command) and a summary; exits 1 on any violation,
0 otherwise. Imports the simulation runner only.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from .cluster import SimOptions
from .runner import run_seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--size", type=int, default=5, help="initial number of voters")
    parser.add_argument("--first-seed", type=int, default=0, help="first seed")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--fault-ticks", type=int, default=SimOptions().fault_ticks, help="ticks of chaos"
    )
    parser.add_argument(
        "--trace", type=int, default=SimOptions().trace_lines, help="events shown per violation"
    )
    parser.add_argument(
        "--no-local-checks",
        action="store_true",
        help="keep only end-to-end invariants (no persist-before-send or commit-rule checks)",
    )
    parser.add_argument("--stop-at-first", action="store_true", help="stop at the first violation")
    args = parser.parse_args(argv)
    if (
        args.seeds < 1
        or not 1 <= args.size <= 6
        or args.jobs < 1
        or args.fault_ticks < 0
        or args.trace < 1
    ):
        parser.error(
            "need --seeds >= 1, 1 <= --size <= 6, --jobs >= 1, --fault-ticks >= 0, --trace >= 1"
        )
    options = SimOptions(
        fault_ticks=args.fault_ticks,
        local_checks=not args.no_local_checks,
        trace_lines=args.trace,
    )
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    started = time.monotonic()
    results = run_seeds(
        seeds,
        args.size,
        jobs=args.jobs,
        options=options,
        stop_when=(lambda r: not r.ok) if args.stop_at_first else None,
    )
    elapsed = time.monotonic() - started
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(r.report())
    exercised: Counter[str] = Counter()
    for r in results:
        exercised.update(r.stats)
    print("exercised: " + ", ".join(f"{k} {v}" for k, v in sorted(exercised.items())))
    ticks = sum(r.ticks for r in results)
    committed = sum(r.committed for r in results)
    print(
        f"{len(results)} seeds, size {args.size}: {len(failed)} violation(s); "
        f"{ticks} ticks, {committed} committed entries, {elapsed:.1f}s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
